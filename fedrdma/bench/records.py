"""What the benchmarks write down: `bench transfer`'s JSON, `bench paper`'s paper.json, `bench heap`'s JSON.

One model per record, used by the writer and by every reader (the tables, `bench
compare`, the report), so a figure has one name and one type everywhere. Results from
before a field existed still read: such fields have defaults, and a renamed field reads
under its old name too (T1's rows said `transport` for what is now `mode`). Field names
scripts read stay as they are: `modes[mode].goodput_gb_s`, `reference.goodput_gb_s`,
`reference_read.goodput_gb_s`, `receiver_extra_rss_mb`, `identical`.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from fedrdma.bench.wan import LOOPBACK_PATH
from fedrdma.config import Inbox, Verify
from fedrdma.core.modes import Mode, Wire
from fedrdma.fl.records import AggregatorRound, Record

# --- bench transfer -------------------------------------------------------------------------


class ModeSummary(Record):
    """One mode's transfers in one run (or a raw NIXL reference's): medians over the counted ones.

    A mover may report timings of its own (the grpc baseline: serialize, wire, deserialize);
    those it names here are typed, any other is kept as it came.
    """

    model_config = ConfigDict(extra="allow")

    seconds: float
    seconds_min: float
    goodput_gb_s: float = Field(description="bytes of the state over the median seconds, in GB/s")
    cpu_seconds: float = Field(description="sender's and receiver's CPU seconds together, median")
    cpu_seconds_min: float | None = Field(None, description="absent in older results")
    receiver_extra_rss_mb: float = Field(description="the receiver's peak RSS above its pool, MiB, largest of the runs")
    sender_extra_rss_mb: float
    identical: bool = Field(description="every transfer's received bytes hashed as the sender's")
    tls: bool | None = Field(None, description="the mode's bytes crossed the wire encrypted (grpc over mutual TLS, "
                             "tcp-e's sealed chunks); absent for references and older results")
    repeat: int = Field(ge=1, description="counted transfers")
    bytes_posted: int | None = None
    serialize_seconds: float | None = None
    wire_seconds: float | None = None
    deserialize_seconds: float | None = None
    goodput_wire_gb_s: float | None = Field(None, description="grpc: goodput of the wire alone")
    vs_line: float | None = Field(None, description="goodput over the lab path's line rate")
    vs_reference: float | None = Field(None, description="goodput over the raw NIXL WRITE's (READ's for rdma-e-pull)")
    vs_raw_same_pair: float | None = Field(None, description="rdma-e, rdma-e-pull: median over the transfers of a raw "
                                           "NIXL WRITE's (READ's) seconds, same pools and endpoint, right after, over "
                                           "the transfer's: the ceiling a drifting host cannot skew")
    vs_grpc: float | None = Field(None, description="goodput over grpc's in the same run")
    encode_seconds: float | None = Field(None, description="with a compressed wire: the sender's encoding of the "
                                         "state before each transfer, median (not in `seconds`)")
    decode_seconds: float | None = Field(None, description="with a compressed wire: the receiver's decoding into "
                                         "its state after each transfer, median (not in `seconds`)")


class TransferResult(Record):
    """`fedrdma bench transfer --json`: one state moved by each mode between two processes, in one run."""

    size_bytes: int
    chunk_size: int
    window: int
    repeat: int
    interleaved: bool = Field(False, description="modes took turns, a fresh pair per counted transfer")
    data_streams: int | None = Field(None, description="tcp-e's data connections per session; absent in older results")
    verify: Verify = Field("xxh3", description="how receivers checked landed chunks: xxh3, or fabric (taken as "
                                               "good unhashed, to measure what hashing costs)")
    inbox: Inbox = Field("full", description="where receivers landed chunks: their whole state, or slots (a few "
                                             "reused chunk-sized slots, copied into the state; tcp-e, rdma-e, "
                                             "rdma-e-pull)")
    wire: Wire = Field(Wire.FP32, description="what the modes moved (the raw references move the fp32 state); "
                       "goodputs count the fp32 state's bytes")
    ucx_tls: str = ""
    path: str = Field(LOOPBACK_PATH, description="where the peers ran")
    link_rate_gbit: float | None = Field(None, description="the lab path's line rate; None on loopback")
    rtt_ms: float | None = None
    loss: float | None = None
    mtu: int | None = None
    modes: dict[Mode, ModeSummary]
    reference: ModeSummary | None = Field(None, description="a raw NIXL WRITE of the same bytes: one descriptor")
    reference_read: ModeSummary | None = Field(None, description="a raw NIXL READ of the same bytes")


# --- bench paper ----------------------------------------------------------------------------


class T1Round(Record):
    """A round's times, as T1 keeps them from the aggregator's round record."""

    round: int = Field(ge=1)
    comm_seconds: float
    compute_seconds: float
    comm_share: float
    round_seconds: float | None = None

    @classmethod
    def of(cls, record: AggregatorRound) -> T1Round:
        return cls.model_validate(record, from_attributes=True)


class T1Row(Record):
    rate_bps: int
    rtt_s: float
    mode: Mode = Field(validation_alias=AliasChoices("mode", "transport"), description="`transport` in older results")
    path: str
    rounds: list[T1Round]


class T1Table(Record):
    """Communication share of a round: federations in the lab, per rate and mode."""

    rounds: int
    model: str
    local_steps: int
    silos: int
    rows: list[T1Row]


class Cell(Record):
    """One chunk size x window on one path: medians of its counted transfers (`sweep.CellResult`)."""

    chunk_size: int
    window: int
    seconds: float
    seconds_min: float
    repeat: int
    goodput_gbit_s: float
    goodput_gbit_s_best: float
    identical: bool
    vs_line: float | None = None


class ChunkWindow(Record):
    chunk_size: int
    window: int


class ModelChunk(Record):
    chunk_size: int
    unchunked: bool
    goodput_fraction: float
    p_fail: float


class ModelPick(Record):
    """The RoCE model's figures for the same path and state (`fedrdma.sim`)."""

    chunk_size: int
    window: int
    goodput_fraction: float
    by_chunk: list[ModelChunk]


class T2Path(Record):
    rate_bps: int
    rtt_s: float
    loss: float
    state_bytes: int
    label: str
    cells: list[Cell]
    best: ChunkWindow
    model: ModelPick

    def of_line(self, cell: Cell) -> float:
        """A cell's median goodput as a fraction of this path's line (older cells may not say)."""
        return cell.vs_line if cell.vs_line is not None else cell.goodput_gbit_s * 1e9 / self.rate_bps


class T2Table(Record):
    """Goodput by chunk size and window, per path."""

    paths: list[T2Path]
    mtu: int
    repeat: int
    ceiling_bps: float


class T3Row(Record):
    model: str
    lora: bool
    state_bytes: int
    path: str
    link_rate_gbit: float | None = None
    rtt_ms: float | None = None
    memcpy_gb_s: list[float] | None = Field(None, description="the host's memory copy rate before and after the row")
    modes: dict[Mode, ModeSummary]


class T3Table(Record):
    """Transfer time per mode, per state and path."""

    repeat: int
    interleaved: bool = False
    rows: list[T3Row]


class T4Row(Record):
    model: str
    state_bytes: int
    mode: Mode
    cpu_seconds: float
    cpu_seconds_min: float | None = None
    receiver_extra_rss_mb: float
    sender_extra_rss_mb: float
    seconds: float


class T4Table(Record):
    """CPU and memory per transfer, from T3's loopback rows."""

    repeat: int
    rows: list[T4Row]


class PaperTables(Record):
    """The tables a run measured; the others are absent (a run may measure a subset)."""

    T1: T1Table | None = None
    T2: T2Table | None = None
    T3: T3Table | None = None
    T4: T4Table | None = None

    @model_serializer(mode="wrap")
    def _measured_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {name: table for name, table in handler(self).items() if table is not None}

    def names(self) -> set[str]:
        return {name for name in type(self).model_fields if getattr(self, name) is not None}


class Host(Record):
    machine: str
    python: str
    cpus: int
    memcpy_gb_s: list[float] = Field(default_factory=list, description="memory copy rate at the run's start and end")


class TableCounts(Record):
    figures: int
    within_noise: int
    direction_holds: int | None = Field(None, description="host-bound claims only")


class Repeats(Record):
    """The comparison with the previous run, as paper.json records it (`bench compare` reports it in full)."""

    agrees: bool = Field(description="every claim bound by the line or the transport repeats within noise")
    agrees_strictly: bool | None = Field(None, description="host-bound claims too; absent in older results")
    tables: dict[str, TableCounts] = Field(default_factory=dict, description="'<table> <kind>' -> counts")
    t2_picks_hold: bool | None = None


class PaperResult(Record):
    """`fedrdma bench paper`'s paper.json: tables T1-T4 of one run, and how it compares with the previous."""

    command: str = ""
    host: Host
    mtu: int
    repeat: int
    tables: PaperTables = Field(default_factory=PaperTables)
    against: str | None = Field(None, description="the run compared with: a name inside the run's directory, or a path")
    minutes: float | None = None
    repeats: Repeats | None = None


# --- bench heap -----------------------------------------------------------------------------


class HeapVariant(Record):
    seconds: float
    seconds_min: float
    rounds_counted: int
    vs_default: float
    chunk_mmapped_while_training: bool | None = Field(description="whether malloc mmapped a chunk-sized block")


class HeapResult(Record):
    """`fedrdma bench heap --json`: local training under each malloc setting, in one run."""

    model: str
    rounds: int
    repeat: int
    local_steps: int
    batch_size: int
    seq_len: int
    time: float
    variants: dict[str, HeapVariant]


# --- bench scale ----------------------------------------------------------------------------


class ScaleRound(Record):
    round: int
    accepted: list[str]
    seconds: float = Field(description="the round as the aggregator timed it: broadcast, uploads, aggregation")
    aggregation_seconds: float = Field(description="closing the round: checks, retractions, the mean")


class ScaleRun(Record):
    """One federation of `silos` non-training silos on one aggregator."""

    silos: int
    rounds: list[ScaleRound]
    all_accepted: bool = Field(description="every silo was accepted in every round")
    aggregator_cpu_seconds: float = Field(description="user and system CPU of the aggregator process, start to end")
    aggregator_peak_rss_mb: float
    aggregator_rss_above_globals_mb: float = Field(
        description="peak RSS less its two global pools (the model's double-buffered state): the interpreter, "
                    "the inboxes and everything else")


class ScaleResult(Record):
    """`fedrdma bench scale --json`: one aggregator with more and more silos, in one run."""

    model: str
    mode: Mode
    inbox: Inbox = Field("full", description="the aggregator's `inbox` setting (runs "
                                            "recorded before it existed had full inboxes)")
    state_mb: float
    silo_processes: int = Field(description="processes the silos shared (each silo keeps its own link and endpoint)")
    time: float
    runs: list[ScaleRun]


# --- bench soak -----------------------------------------------------------------------------


class SoakLeaks(Record):
    processes: list[str] = Field(description="processes still running once the run was over")
    fds: int = Field(description="descriptors the soak's own process held more at the end than at the start")
    tmp_files: list[str] = Field(description="half-written checkpoints left in the aggregator's directory")
    namespaces: list[str] = Field(default_factory=list, description="the soak lab's namespaces still there "
                                  "after it was taken down (in the lab only)")


class SoakResult(Record):
    """`fedrdma bench soak --json`: a federation under random faults, each round recomputed from files."""

    rounds: int
    silos: int
    seed: int
    model: str
    mode: Mode | None = Field(None, description="how updates moved; absent in older results (tcp-e)")
    lab: bool = Field(False, description="the processes ran in the WAN lab, each silo on its own shaped path")
    seconds: float
    faults: dict[str, int] = Field(description="faults injected, by kind")
    survived: dict[str, int] = Field(description="of those, the ones after which the run went on to a correct end")
    rounds_retried: int = Field(description="round attempts that did not close: too few silos, or the aggregator killed")
    mismatched_rounds: list[int] = Field(description="rounds whose checkpoint is not the weighted mean of the "
                                         "updates it accepted (or whose checkpoint or updates are missing)")
    stale_updates: list[str] = Field(description="SILO@ROUND: accepted updates not built on the previous global")
    double_counted: list[int] = Field(description="rounds recorded again after the aggregator resumed past them")
    unexpected_exits: list[str] = Field(description="silos that left without being told to (restarted)")
    leaks: SoakLeaks


# --- bench flower ---------------------------------------------------------------------------


class FlowerRound(Record):
    round: int
    seconds: float = Field(description="the training step, from the ServerApp's configure to its aggregate's end")
    comm_seconds: float = Field(description="the step less the slowest ClientApp's own work (app_seconds)")
    app_seconds: float = Field(description="the slowest ClientApp's seconds inside its train function")
    node_seconds: float | None = Field(None, description="fedrdma only: the slowest site's fetch plus delivery, "
                                                         "as its node timed them")
    replies: int = Field(description="replies that were not errors")
    rss_mb: float | None = Field(None, description="the ServerApp's resident memory (VmRSS) as the step began; "
                                                   "round 1's is its baseline")
    peak_rss_mb: float | None = Field(None, description="the ServerApp's high-water mark (VmHWM) as the step ended")


class FlowerWay(Record):
    """One run of the app, its arrays moved by Flower or by fedrdma."""

    rounds: list[FlowerRound]
    peak_rss_mb: dict[str, float] = Field(description="per role (serverapp, clientapp, superlink, supernode, "
                                                      "node-SITE): the largest high-water mark sampled")
    baseline_rss_mb: dict[str, float] = Field(
        default_factory=dict, description="per role, the resident memory before any array moved: the serverapp's "
                                          "as round 1 began; a long-lived process's (superlink, supernode, node-SITE) "
                                          "idle, as the run was submitted. None for the clientapp, a process per "
                                          "message that holds the arrays as its own code first runs")
    seconds: float = Field(description="the whole run, submitted to finished")

    def above_baseline_mb(self) -> dict[str, float]:
        """Per role with a baseline: its peak less that baseline, what the run added on top."""
        return {role: self.peak_rss_mb[role] - base for role, base in self.baseline_rss_mb.items()
                if role in self.peak_rss_mb}


class FlowerResult(Record):
    """`fedrdma bench flower --json`: the same Flower app both ways, in one run."""

    app: str
    model: str
    rounds_asked: int
    state_mb: float
    flower: FlowerWay
    fedrdma: FlowerWay
    max_abs_diff: float = Field(description="largest difference between the two ways' final models")
    time: float
    path: str = Field("loopback", description="loopback, or the lab path each site sat on (--rate/--rtt)")


class WireRound(Record):
    """One round of one wire format's federation, as `bench wire` records it."""

    round: int = Field(ge=1)
    eval_loss: float | None = Field(description="held-out loss of the global model after the round")
    bytes_up: int = Field(description="upload bytes of the round, summed over the silos that uploaded")
    bytes_down: int = Field(description="broadcast bytes of the round, summed over the silos")
    comm_seconds: float = Field(description="mean over accepted silos of broadcast plus upload seconds")
    codec_seconds: float = Field(description="the aggregator's encoding of the broadcast plus the mean over "
                                 "accepted silos of their encoding and decoding")


class WireFormat(Record):
    initial_loss: float | None = Field(description="held-out loss of the initial model (round 0)")
    rounds: list[WireRound]

    def total(self, field: str, after: int = 0) -> int:
        """`bytes_up` or `bytes_down` summed over the rounds after round `after`."""
        return sum(getattr(r, field) for r in self.rounds if r.round > after)

    def per_round(self, *fields: str, after: int = 0) -> float:
        """The mean over the rounds after round `after` of these seconds, added up (0 without rounds)."""
        rounds = [r for r in self.rounds if r.round > after]
        return sum(getattr(r, f) for r in rounds for f in fields) / max(1, len(rounds))


class WireResult(Record):
    """`fedrdma bench wire --json`: the same federation (seeds, data, mode) once per wire format."""

    model: str
    mode: Mode
    silos: list[str]
    rounds_asked: int
    path: str = Field(description="loopback, or the lab path's shape")
    first_broadcast: str = Field("always", description="the aggregator's setting: unless-held sends no format's "
                                 "silos the initial global they built themselves")
    formats: dict[str, WireFormat] = Field(description="by wire format, fp32 first")
    time: float
