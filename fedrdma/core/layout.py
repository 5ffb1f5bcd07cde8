"""FlatState: a model's trainable tensors in one contiguous buffer.

Why one buffer: a single region is registered with NIXL once, described to a peer with
two integers (address, length), and moved chunk by chunk with no serialization. The
module's parameters are re-pointed to views into the buffer, so training writes the very
bytes that will be sent, and a received update lands directly in the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedrdma.core.errors import LayoutError

ALIGNMENT = 256
"""Byte alignment of every tensor in the buffer: keeps each tensor's start on a cache line
and satisfies the strictest dtype and DMA alignment we meet (also what GPU copies like)."""

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}


MAX_TENSORS = 1 << 16
"""Tensors an announced layout may hold: a 70B model with LoRA on every projection has a few thousand."""

MAX_DIM = 1 << 40
"""Largest extent of one dimension an announced layout may give: far beyond any model, small
enough that a product of a few stays an exact integer."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise LayoutError(f"dtype {dtype} cannot travel in a FlatState; supported: {', '.join(_DTYPES)}")


def torch_dtype(name: str) -> torch.dtype:
    """The dtype a FlatState spells `name` (numpy's spelling too: "float32")."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise LayoutError(f"dtype {name!r} cannot travel in a FlatState; supported: {', '.join(_DTYPES)}") from None


def _align(value: int) -> int:
    return (value + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in the buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass(frozen=True)
class Layout:
    """The manifest of a FlatState; two peers with different layouts must not exchange bytes."""

    specs: tuple[TensorSpec, ...]
    nbytes: int

    @classmethod
    def from_shapes(cls, items: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> Layout:
        specs: list[TensorSpec] = []
        offset = 0
        seen: set[str] = set()
        for name, dtype, shape in items:
            if name in seen:
                raise LayoutError(f"tensor name {name!r} appears twice; names must be unique")
            seen.add(name)
            numel = 1
            for dim in shape:
                numel *= int(dim)
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            specs.append(TensorSpec(name, dtype_name(dtype), tuple(int(d) for d in shape), offset, nbytes))
            offset = _align(offset + nbytes)
        if not specs:
            raise LayoutError("a layout needs at least one tensor; is anything trainable?")
        return cls(tuple(specs), offset)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Layout:
        return cls.from_shapes((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())

    @property
    def layout_id(self) -> str:
        """A short hash of the manifest: equal ids mean byte-compatible buffers."""
        doc = json.dumps(
            [[s.name, s.dtype, list(s.shape), s.offset] for s in self.specs] + [self.nbytes],
            separators=(",", ":"),
        )
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, doc: object, max_tensors: int = MAX_TENSORS) -> Layout:
        """The layout another process announced (`to_json`), rebuilt here and held to it.

        Offsets and sizes are recomputed, never taken: an announced manifest whose offsets
        disagree with the rebuilt one describes other bytes, and is refused.
        """
        if not isinstance(doc, list) or not 0 < len(doc) <= max_tensors:
            raise LayoutError(f"a layout is a list of 1 to {max_tensors} tensors")
        items = []
        for k, entry in enumerate(doc):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                    or entry.get("dtype") not in _DTYPES or not isinstance(entry.get("shape"), list) \
                    or not all(isinstance(d, int) and 0 <= d < MAX_DIM for d in entry["shape"]):
                raise LayoutError(f"tensor {k} of the layout needs a name, a dtype of {', '.join(_DTYPES)} "
                                  f"and a shape of integers below {MAX_DIM}")
            items.append((entry["name"], _DTYPES[entry["dtype"]], tuple(entry["shape"])))
        layout = cls.from_shapes(items)
        for spec, entry in zip(layout.specs, doc):
            if entry.get("offset", spec.offset) != spec.offset or entry.get("nbytes", spec.nbytes) != spec.nbytes:
                raise LayoutError(f"tensor {spec.name!r} is announced at offset {entry.get('offset')} with "
                                  f"{entry.get('nbytes')} bytes; its layout puts it at {spec.offset} ({spec.nbytes})")
        return layout

    def to_json(self) -> list[dict[str, object]]:
        return [
            {"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "offset": s.offset, "nbytes": s.nbytes}
            for s in self.specs
        ]


class FlatState:
    """A layout plus the uint8 buffer that holds it, and named views into that buffer."""

    def __init__(self, layout: Layout, buffer: torch.Tensor) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise LayoutError("a FlatState buffer must be a contiguous 1-D uint8 tensor")
        if buffer.numel() != layout.nbytes:
            raise LayoutError(f"buffer has {buffer.numel()} bytes, layout needs {layout.nbytes}")
        self.layout = layout
        self.buffer = buffer
        self.version = 0
        """Bumped by whoever changes the bytes (`touch`); cached chunk checksums name it."""
        self.checksums: dict[int, tuple[int, list[int]]] = {}
        """chunk size -> (version, checksum per chunk): a sender hashes an unchanged state
        once however often it sends it (the aggregator broadcasts one global to every silo)."""
        self.views: dict[str, torch.Tensor] = {
            s.name: buffer[s.offset : s.offset + s.nbytes].view(s.torch_dtype).view(s.shape)
            for s in layout.specs
        }

    @classmethod
    def allocate(cls, layout: Layout, fill: int | None = 0) -> FlatState:
        """A fresh buffer; `fill=None` leaves it untouched (pages not yet faulted in)."""
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
        if fill is not None:
            buffer.fill_(fill)
        return cls(layout, buffer)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> FlatState:
        """A copy of `tensors` in a new flat buffer."""
        state = cls.allocate(Layout.from_tensors(tensors), fill=0)
        with torch.no_grad():
            for name, tensor in tensors.items():
                state.views[name].copy_(tensor)
        return state

    @classmethod
    def adopt(cls, module: torch.nn.Module, trainable_only: bool = True) -> FlatState:
        """Move a module's parameters into one buffer and make them views of it.

        After this, `module` trains in the buffer: no copy is needed to send it, and bytes
        that land in the buffer are the module's new weights.
        """
        params = [
            (name, p) for name, p in module.named_parameters() if p.requires_grad or not trainable_only
        ]
        if not params:
            raise LayoutError("the module has no trainable parameters to put in a FlatState")
        state = cls.from_tensors({name: p.detach() for name, p in params})
        with torch.no_grad():
            for name, p in params:
                p.data = state.views[name]
        return state

    def touch(self) -> None:
        """Declare the bytes changed (training, a received transfer, an aggregation).

        Forgetting it is loud, not silent: stale checksums make every chunk fail its
        verification at the receiver, and the transfer ends in an error.
        """
        self.version += 1
        self.checksums.clear()

    def bind(self, module: torch.nn.Module) -> None:
        """Point `module`'s parameters at this state's views (after swapping buffers)."""
        params = dict(module.named_parameters())
        missing = [name for name in self.views if name not in params]
        if missing:
            raise LayoutError(f"the module has no parameters named {missing[:3]}; is it the same model?")
        with torch.no_grad():
            for name, view in self.views.items():
                params[name].data = view

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @property
    def layout_id(self) -> str:
        return self.layout.layout_id

    def address(self) -> int:
        return int(self.buffer.data_ptr())

    def memoryview(self, offset: int = 0, length: int | None = None) -> memoryview:
        """Zero-copy bytes of a range, for checksums and serialization."""
        end = self.nbytes if length is None else offset + length
        return memoryview(self.buffer.numpy()).cast("B")[offset:end]
