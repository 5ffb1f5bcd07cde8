"""What a process spent: CPU seconds (all threads) and peak resident memory.

Peak memory comes from the kernel's own high-water mark (VmHWM), reset before each
measured span through /proc/self/clear_refs, so no sampling thread can miss a spike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_RESET_HWM = "5"
"""Writing this to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""


def _status_kib(field: str, pid: int | None = None) -> int:
    path = _PROC_STATUS if pid is None else f"/proc/{pid}/status"
    with open(path) as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from {path}")


def rss_bytes(pid: int | None = None) -> int:
    return _status_kib("VmRSS", pid) * 1024


def shared_rss_bytes(pid: int | None = None) -> int:
    """Resident pages of shared memory (`RssShmem`): a node's pools, or the part of them an app maps."""
    return _status_kib("RssShmem", pid) * 1024


def peak_rss_bytes(pid: int | None = None) -> int:
    """This process's peak RSS, or process `pid`'s (while it lives: the kernel forgets it at exit)."""
    return _status_kib("VmHWM", pid) * 1024


def reset_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as fh:
            fh.write(_RESET_HWM)
        return True
    except OSError:
        return False


@dataclass
class Span:
    seconds: float
    cpu_seconds: float
    rss_before: int
    peak_rss: int

    @property
    def extra_rss(self) -> int:
        """Peak resident memory above what the process held when the span began."""
        return max(0, self.peak_rss - self.rss_before)


class Meter:
    """Measure one span: `with Meter() as m: ...; m.span`."""

    def __enter__(self) -> Meter:
        reset_peak()
        self._rss = rss_bytes()
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.span = Span(
            time.perf_counter() - self._wall,
            time.process_time() - self._cpu,
            self._rss,
            max(peak_rss_bytes(), self._rss),
        )


_RUNTIME_RSS = [0]


def mark_runtime() -> None:
    """Remember the RSS of the interpreter and its libraries, before any model exists.

    Called by the aggregator and the silo at start, when the modules they are made of (torch,
    transformers, gRPC, NIXL) are imported and nothing else is allocated yet.
    """
    _RUNTIME_RSS[0] = rss_bytes()


def memory_report(model: object, optimizer: object, pool_bytes: int, pool_is_model: bool = False) -> dict[str, int]:
    """Peak RSS split into runtime, model, optimizer, registered pools and the rest, in bytes.

    `runtime` is the interpreter with torch, transformers, gRPC and NIXL loaded, before any
    model existed (`mark_runtime`); `rest` is what is left: activations, buffers, copies.

    When the pool is the model's own parameters (a silo in rdma-e), it is counted once,
    under `pools`, and `pool_is_model` says so.
    """
    import torch  # here, not at the top: the command line imports this module and must start without torch

    model_bytes = 0
    if isinstance(model, torch.nn.Module):
        seen: set[int] = set()
        for t in list(model.parameters()) + list(model.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                model_bytes += t.numel() * t.element_size()
    opt_bytes = 0
    if isinstance(optimizer, torch.optim.Optimizer):
        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    opt_bytes += v.numel() * v.element_size()
    if pool_is_model:
        model_bytes = max(0, model_bytes - pool_bytes)
    peak = peak_rss_bytes()
    runtime = _RUNTIME_RSS[0]
    return {
        "peak_rss": peak,
        "runtime": runtime,
        "model": model_bytes,
        "optimizer": opt_bytes,
        "pools": pool_bytes,
        "rest": max(0, peak - runtime - model_bytes - opt_bytes - pool_bytes),
        "pool_is_model": int(pool_is_model),
    }
