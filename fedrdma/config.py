"""Settings of the aggregator and the silos: one place for every default.

Each setting is a key in the TOML file and a flag of the command (`--rounds 5` overrides
`rounds = 5`); pydantic validates both, and a bad value is reported with its key and the
form expected.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedrdma.core.addresses import LOOPBACK_HOST, is_loopback, split_host_port
from fedrdma.core.chunks import CHUNK_ALIGN, DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, MAX_WINDOW
from fedrdma.core.errors import FedRDMAError
from fedrdma.core.modes import Mode, Wire, choices
from fedrdma.core.rules import MAX_SAMPLES, MIN_SILOS, NORM_FACTOR, WEIGHT_FACTOR
from fedrdma.transport.fabric import AUTO
from fedrdma.transport.streams import DEFAULT_STREAMS, MAX_STREAMS

DEFAULT_LISTEN = f"{LOOPBACK_HOST}:7700"
"""Loopback by default: exposing the control plane is a deliberate act."""

FirstBroadcast = Literal["always", "unless-held"]
"""Whether a silo's first broadcast of a join is sent when the silo already holds the global."""

Inbox = Literal["slots", "full"]
"""Where the aggregator lands a silo's upload: a few chunk-sized slots (tcp-e) or a whole-state inbox."""

INBOXES: tuple[str, ...] = get_args(Inbox)

Verify = Literal["xxh3", "fabric"]
"""How a one-sided receiver checks a landed chunk (`transport.fabric.require_checks`)."""

VERIFIES: tuple[str, ...] = get_args(Verify)

INBOX_MB = 32
"""Memory all silos' tcp-e and pull uploads share, in chunk-sized slots, whatever the silo count: 8
slots of 4 MiB chunks, 67 of gpt2-tiny's whole-state one. On this host the fold drains a
slot in about a ms (5.8-6.7 GB/s, `scripts/fold_rate.py`), faster than a line fills one; fewer slots than silos
uploading at once serialized 64 gpt2-tiny silos (a round of 14 s instead of 1.2 s)."""

INBOX_MB_MAX = 4096
"""Slots are registered as one buffer for a pull, and a registration slice is 4 GiB."""

KEEP_CHECKPOINTS = 3
"""Checkpoints kept on disk: the newest few, so a bad round can still be rolled back."""

DEFAULT_ROUNDS = 3

DEFAULT_ROUND_DEADLINE_S = 600.0
"""A silo that has not uploaded this long after the round started is left out of it."""

DEFAULT_JOIN_TIMEOUT_S = 120.0
"""How long the aggregator waits for `min_silos` silos before the first round."""

DEFAULT_GATHER_S = 2.0
"""At a round's start, wait up to this long for configured silos that are not ready yet, so
a silo that is rejoining catches the round instead of the next one."""

DEFAULT_MODEL = "gpt2-small"
DEFAULT_LORA_R = 8
DEFAULT_LORA_ALPHA = 16
DEFAULT_LOCAL_STEPS = 4
DEFAULT_BATCH_SIZE = 4
DEFAULT_SEQ_LEN = 128
DEFAULT_LR = 5e-4
DEFAULT_SEED = 0
DEFAULT_HEARTBEAT_S = 2.0
"""Both sides say they are alive this often; three missed beats declare a peer dead."""

DEFAULT_REJOIN_S = 120.0
"""How long a silo keeps redialing a lost aggregator before it gives up."""

SILO_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
"""Silo ids appear in file names, metrics and logs: keep them short and plain."""

RENAMED = {
    "transport": "`transport` and `upload` are now one setting, `mode`: grpc, rdma, rdma-e (silos push "
                 "their updates) or rdma-e-pull (the aggregator READs them)",
}
RENAMED["upload"] = RENAMED["transport"]
RENAMED["token"] = ("tokens are gone: a silo authenticates with its certificate (`fedrdma certs issue DIR ID "
                    "--role silo`), given with --certs DIR")
"""Settings of earlier releases, refused with what replaced them rather than as unknown keys."""


FLAGS = "flags"
"""The source of settings given on the command line rather than in a file."""


@dataclass(frozen=True)
class Issue:
    """One setting that cannot be used: its key (None for the file as a whole) and why."""

    key: str | None
    message: str


class ConfigError(FedRDMAError):
    """Settings that cannot be used; each issue names its key and the expected form.

    The issues stay apart so that a command can name its own flag beside each key.
    """

    def __init__(self, source: str, issues: Sequence[Issue]) -> None:
        self.source = source
        self.issues = tuple(issues)
        super().__init__("\n".join(f"{source}: `{i.key}`: {i.message}" if i.key else f"{source}: {i.message}"
                                   for i in self.issues))


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old in RENAMED:
                if old in data:
                    raise ValueError(f"`{old}` was replaced: {RENAMED[old]}")
        return data


class ModelSettings(_Settings):
    model: str = Field(DEFAULT_MODEL, description="gpt2-tiny|gpt2-small|gpt2-medium|gpt2-large or a local checkpoint dir")
    lora: bool = Field(False, description="train LoRA adapters only (only they travel)")
    lora_r: int = Field(DEFAULT_LORA_R, ge=1, le=1024)
    lora_alpha: int = Field(DEFAULT_LORA_ALPHA, ge=1)
    seed: int = Field(DEFAULT_SEED, ge=0)


class SecuritySettings(_Settings):
    """How a process proves who it is, and what it lets its peers reach."""

    certs: Path | None = Field(None, description="directory with the federation's ca.pem and this side's "
                                                 "NAME.pem and NAME.key (`fedrdma certs`)")
    insecure: bool = Field(False, description="no certificates, plaintext control plane: loopback only, for "
                                              "trying things on one host")
    trusted_fabric: bool = Field(False, description="every peer may read and write every process: needed for "
                                                    "rdma, rdma-e and rdma-e-pull where the fabric does not "
                                                    "enforce remote keys (UCX over TCP or shared memory)")

    verify: Verify = Field("xxh3", description="how a receiver checks each landed chunk: xxh3 (hash it against "
                                               "the holder's checksum) or fabric (trust InfiniBand's or RoCE's "
                                               "per-packet CRC; refused on other fabrics)")

    def _check_security(self, address: str, what: str) -> None:
        if self.certs is None and not self.insecure:
            raise ValueError(
                "the control plane needs certificates: give --certs DIR (made with `fedrdma certs init DIR` and "
                "`fedrdma certs issue DIR NAME --role ...`), or --insecure to try it on one host"
            )
        if self.certs is not None and self.insecure:
            raise ValueError("give either --certs or --insecure, not both")
        if self.insecure and not is_loopback(split_host_port(address)[0]):
            raise ValueError(f"--insecure is allowed on loopback only, and {what} {address} is not loopback: "
                             "give --certs DIR for a federation across hosts")


class TransportSettings(_Settings):
    mode: Mode | Literal["auto"] = Field(AUTO, description=f"how updates move: auto (rdma-e where the fabric "
                                         f"enforces remote keys, tcp-e elsewhere), {choices()}")
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, gt=0, description=f"bytes per chunk, a multiple of {CHUNK_ALIGN}")
    window: int = Field(DEFAULT_WINDOW, ge=1, le=MAX_WINDOW)
    tuning: Path | None = Field(None, description="JSON written by `fedrdma tune --json` (model or --probe): "
                                                  "its chunk_size and window apply unless set here")

    @field_validator("chunk_size")
    @classmethod
    def _aligned(cls, value: int) -> int:
        if value % CHUNK_ALIGN:
            raise ValueError(f"must be a multiple of {CHUNK_ALIGN} bytes, so no chunk splits a tensor element")
        return value


def read_tuning(path: Path) -> dict[str, int]:
    """`chunk_size` and `window` from a `fedrdma tune --json` file, or a ValueError naming the fix."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"tuning file {path} does not exist: write one with `fedrdma tune ... --json {path}`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"tuning file {path} is not readable JSON ({exc}): rewrite it with `fedrdma tune --json`") from None
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or not {"chunk_size", "window"} <= set(config):
        raise ValueError(f"tuning file {path} has no `config` with chunk_size and window: "
                         "it must come from `fedrdma tune --json`")
    return {"chunk_size": int(config["chunk_size"]), "window": int(config["window"])}


class SiloEntry(_Settings):
    id: str = Field(pattern=SILO_ID_PATTERN, description="the name in the silo's certificate")
    weight: int | None = Field(None, gt=0, lt=MAX_SAMPLES, description="the silo's FedAvg weight as the "
                               "consortium agreed it (its training-set size); when set, the count the "
                               "silo reports is ignored")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"id": data} if isinstance(data, str) else data


class RuntimeSettings(ModelSettings, SecuritySettings):
    """Settings both processes have."""

    seq_len: int = Field(DEFAULT_SEQ_LEN, ge=8)
    heartbeat_s: float = Field(DEFAULT_HEARTBEAT_S, gt=0)
    wire: Wire = Field(Wire.FP32, description="what updates travel as, the same for the whole federation: fp32 "
                       "(the state's bytes), bf16 (deltas from the global, 0.5 of the bytes) or int8 (deltas "
                       "quantized in blocks, 0.25); float32 models only")


class AggregatorConfig(RuntimeSettings, TransportSettings):
    listen: str = DEFAULT_LISTEN
    rounds: int = Field(DEFAULT_ROUNDS, ge=1)
    min_silos: int = Field(MIN_SILOS, ge=1, description="a round closes once this many silos uploaded, "
                           "or all of them before the deadline")
    round_deadline_s: float = Field(DEFAULT_ROUND_DEADLINE_S, gt=0, description="a silo not done this long after "
                                    "the round started is left out, unless its upload is still landing chunks "
                                    "(then up to 4x this)")
    join_timeout_s: float = Field(DEFAULT_JOIN_TIMEOUT_S, gt=0)
    gather_s: float = Field(DEFAULT_GATHER_S, ge=0)
    keep_checkpoints: int = Field(KEEP_CHECKPOINTS, ge=1, description="this run's newest checkpoints kept in "
                                  "out_dir; older ones are pruned (raise it to keep every round, for an audit)")
    weight_factor: float = Field(WEIGHT_FACTOR, ge=1, description="a silo without an agreed weight "
                                 "counts with at most this many times the median of the others' weights")
    norm_factor: float = Field(NORM_FACTOR, gt=1, description="an update whose delta norm is this many times "
                               "the others' median is rejected")
    silos: list[SiloEntry] = Field(default_factory=list, description="silos allowed to join, by the name in "
                                   "their certificates; repeatable")
    cert_name: str = Field("aggregator", pattern=SILO_ID_PATTERN, description="with --certs: the name of this "
                           "aggregator's certificate in that directory")
    data_port: int = Field(0, ge=0, le=65535, description="tcp-e: the port silos open data connections to "
                           "(0: any free one; fix it for a firewall)")
    data_streams: int = Field(DEFAULT_STREAMS, ge=1, le=MAX_STREAMS, description="tcp-e: data connections per "
                              "silo and direction")
    inbox: Inbox = Field("slots", description="tcp-e, rdma-e and rdma-e-pull: land each silo's upload in a "
                                            "few chunk-sized slots, folded and reused (full: a whole-state inbox "
                                            "per silo; staged rdma always uses one)")
    inbox_mb: int = Field(INBOX_MB, ge=1, le=INBOX_MB_MAX, description="with inbox = slots: MiB of chunk-sized "
                          "slots all silos' uploads share (at least one slot); a silo holds at most 2 per data "
                          "connection (tcp-e) or its window and 2 more (rdma-e-pull, rdma-e)")
    first_broadcast: FirstBroadcast = Field("always", description="unless-held: a joining silo whose state's "
                                            "digest is the global's (a fresh run's silos build the same initial "
                                            "model) is not sent it; its first broadcast costs nothing")
    eval_data: Path | None = Field(None, description="held-out text the aggregator scores the global model on")
    out_dir: Path = Field(Path("runs/aggregator"), description="checkpoints, metrics.jsonl, plots")
    resume: bool = Field(False, description="continue from the last checkpoint in out_dir")

    @model_validator(mode="after")
    def _check(self) -> AggregatorConfig:
        self._check_security(self.listen, "listen")
        if not self.silos:
            raise ValueError("list the silos allowed to join: --silos hospital --silos bank (the names in their "
                             "certificates)")
        ids = [s.id for s in self.silos]
        if len(set(ids)) != len(ids):
            raise ValueError("silo ids must be unique")
        if self.silos and self.min_silos > len(self.silos):
            raise ValueError(f"min_silos={self.min_silos} but only {len(self.silos)} silos are configured")
        return self


class SiloConfig(RuntimeSettings):
    id: str = Field(pattern=SILO_ID_PATTERN, description="this silo's name, as its certificate says")
    aggregator: str = Field(DEFAULT_LISTEN, description="HOST:PORT of the aggregator; with --certs HOST must be "
                            "a name in the aggregator's certificate")
    data: Path | None = Field(None, description="this silo's local text: .txt or .jsonl with a 'text' field")
    train: Literal["local", "none"] = Field("local", description="none: skip local training and add a seeded "
                                           "perturbation instead, so benchmarks of scale run many silos per host")
    local_steps: int = Field(DEFAULT_LOCAL_STEPS, ge=1)
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)
    lr: float = Field(DEFAULT_LR, gt=0)
    rejoin_s: float = Field(DEFAULT_REJOIN_S, ge=0)
    out_dir: Path = Field(Path("runs/silo"), description="this silo's metrics")

    @model_validator(mode="after")
    def _check(self) -> SiloConfig:
        self._check_security(self.aggregator, "aggregator")
        if self.train == "local" and self.data is None:
            raise ValueError("a silo that trains needs its local text: --data FILE (.txt or .jsonl), "
                             "or --train none for a benchmark silo that does not train")
        return self


HOST_PATTERN = r"^[A-Za-z0-9._:-]{1,253}$"
"""A DNS name or an IP address, no port and no brackets: what a certificate's names can match."""

DEFAULT_NODE_LISTEN = f"{LOOPBACK_HOST}:7710"
"""Where a serving node (the aggregator's site) takes peer nodes: loopback until an operator widens it."""


NodeMode = Literal["auto", "tcp-e", "rdma-e"]
"""A node moves a whole pool one way per transfer: the two FedRDMA-E modes whose receiver places
the bytes, pushed by whoever holds them."""


class NodeConfig(SecuritySettings):
    """`fedrdma node`: one site's data plane, for apps that attach over its Unix socket."""

    site: str = Field(pattern=SILO_ID_PATTERN, description="this site's name, as its certificate says; apps "
                      "attach as this site or are refused")
    serve: bool = Field(False, description="take peer nodes' fetches and deliveries on --listen (the "
                        "aggregator's site); without it the node only dials out")
    listen: str = Field(DEFAULT_NODE_LISTEN, description="with --serve: HOST:PORT peer nodes dial; with --certs "
                        "HOST must be a name in this site's certificate")
    data_port: int = Field(0, ge=0, le=65535, description="with --serve: the port tcp-e data connections "
                           "arrive on (0: any free one; fix it for a firewall)")
    data_streams: int = Field(DEFAULT_STREAMS, ge=1, le=MAX_STREAMS, description="tcp-e: data connections per "
                              "transfer")
    peer_host: str | None = Field(None, pattern=HOST_PATTERN, description="dial the serving node at this host, "
                                  "on the port its descriptors name: for a site that reaches the aggregator's "
                                  "site by another name than the one it announces (one listening on 0.0.0.0)")
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, gt=0, multiple_of=CHUNK_ALIGN,
                            description=f"bytes per chunk, a multiple of {CHUNK_ALIGN}")
    window: int = Field(DEFAULT_WINDOW, ge=1, le=MAX_WINDOW)
    mode: NodeMode = Field(AUTO, description="how nodes move pools: auto (rdma-e where the fabric enforces remote "
                           "keys, tcp-e elsewhere), tcp-e or rdma-e; the serving node's descriptors name its mode, "
                           "and a dialing node running another refuses them by name")
    runtime_dir: Path | None = Field(None, description="where the node's socket and token live (default "
                                     "$XDG_RUNTIME_DIR/fedrdma, else /tmp/fedrdma-UID); only this user may enter it")

    @model_validator(mode="after")
    def _check(self) -> NodeConfig:
        self._check_security(self.listen, "listen")
        return self


def _issues(err: ValidationError) -> list[Issue]:
    """Each error with its key; a rule across keys (loc empty) is stated on its own, without the input."""
    return [Issue(".".join(str(p) for p in e["loc"]), f"{e['msg']} (got {e.get('input')!r})") if e["loc"]
            else Issue(None, str(e["msg"]).removeprefix("Value error, ")) for e in err.errors()]


def load(kind: type[BaseModel], path: Path | None, overrides: dict[str, Any]) -> Any:
    """Settings from a TOML file (optional) with flag overrides on top, validated."""
    data: dict[str, Any] = {}
    source = FLAGS
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(source, [Issue(None, f"config file {path} does not exist")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, [Issue(None, f"{path} is not valid TOML: {exc}")]) from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    if data.get("tuning") and "tuning" in kind.model_fields:
        try:  # the tuning file fills only what the file and the flags left unset
            data = read_tuning(Path(data["tuning"])) | data
        except ValueError as exc:
            raise ConfigError(source, [Issue("tuning", str(exc))]) from None
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _issues(exc)) from None
