"""What the federated runtime writes down: metrics rows of the aggregator and the silos, and the demo's result.

One model per record, used by the writer (built, then `model_dump(mode="json")`) and by
every reader (validated, then read by attribute): the live rounds table, the plots, the
demo's table and JSON, `bench paper`'s T1. Field names are the ones scripts already read
(`transports[mode].rounds[i].eval_loss`, `comm_share`, `max_abs_diff_between_transports`);
a renamed field still reads under its old name. `fedrdma schemas` writes each model's JSON
Schema into docs/schemas/.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from fedrdma.core.modes import Mode, Wire


class Record(BaseModel):
    """A record refuses keys it does not know, so a writer's typo fails where it is made."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)


class MemorySplit(Record):
    """A process's peak resident memory split by owner, in bytes (`fedrdma.metrics.memory_report`)."""

    peak_rss: int
    runtime: int = Field(description="the interpreter with its libraries, before any model existed")
    model: int
    optimizer: int
    pools: int = Field(description="memory registered for one-sided transfers")
    rest: int = Field(description="activations, buffers and copies: what is left")
    pool_is_model: int = Field(ge=0, le=1, description="1 when the pool is the model's own parameters, counted once")


class SiloOutcome(Record):
    """One silo's part of a round, as the aggregator saw it; figures are absent where the silo got no further."""

    silo: str
    ok: bool
    reason: str = Field("", description="why the silo was left out, empty when it was not")
    n_samples: int | None = Field(None, description="the training-set size the silo reported")
    weight: float | None = Field(None, description="its share of the round's FedAvg mean; absent when left out")
    capped_samples: int | None = Field(None, description="the count it weighed with instead of its report, "
                                       "when that exceeded weight_factor x the others' median")
    train_loss: float | None = None
    train_seconds: float | None = None
    silo_broadcast_seconds: float | None = Field(
        None, validation_alias=AliasChoices("silo_broadcast_seconds", "silo_download_seconds"),
        description="the broadcast as the silo timed it (`silo_download_seconds` in older results)")
    silo_cpu_seconds: float | None = None
    silo_codec_seconds: float | None = Field(None, description="the silo's encoding of its upload and decoding "
                                             "of the broadcast (0 with fp32)")
    silo_memory: MemorySplit | None = None
    broadcast_seconds: float | None = None
    broadcast_bytes: int | None = None
    broadcast_goodput_gb_s: float | None = None
    broadcast_resent_bytes: int | None = None
    upload_seconds: float | None = None
    upload_bytes: int | None = None
    upload_goodput_gb_s: float | None = None
    upload_resent_bytes: int | None = None
    comm_share: float | None = Field(None, description="broadcast and upload over those plus training")


class AggregatorRound(Record):
    """A line of the aggregator's metrics.jsonl whose event is `round`: one round as it closed.

    Round 0 is the held-out score of the initial model, before any round ran.
    """

    event: Literal["round"] = "round"
    time: float | None = Field(None, description="Unix time the round closed; absent in older demo results")
    round: int = Field(ge=0)
    mode: Mode | None = Field(None, validation_alias=AliasChoices("mode", "transport"),
                              description="how updates moved (`transport` in older rows); absent in older demo results")
    wire: Wire = Field(Wire.FP32, description="what updates travelled as (fp32 in older rows)")
    accepted: list[str] = Field(default_factory=list, description="silos whose updates made the new global model")
    rejected: dict[str, str] = Field(default_factory=dict, description="silo -> why its update was left out")
    eval_loss: float | None = Field(None, description="held-out loss of the global model after the round")
    eval_perplexity: float | None = None
    comm_seconds: float = Field(0.0, description="mean over accepted silos of broadcast plus upload seconds")
    compute_seconds: float = Field(0.0, description="mean training seconds of accepted silos plus the aggregation")
    comm_share: float = Field(0.0, description="comm_seconds / (comm_seconds + compute_seconds)")
    aggregation_seconds: float = 0.0
    codec_seconds: float = Field(0.0, description="encoding the round's broadcast delta (0 with fp32 and in the "
                                 "first round); uploads are decoded inside the fold, in upload_seconds")
    round_seconds: float = 0.0
    state_bytes: int | None = None
    aggregator_memory: MemorySplit | None = None
    silos: list[SiloOutcome] = Field(default_factory=list)

    def silo_mean(self, field: str) -> float:
        """A figure of `SiloOutcome` averaged over the silos that delivered (0 when none did)."""
        values = [getattr(s, field) for s in self.silos if s.ok and getattr(s, field) is not None]
        return sum(values) / len(values) if values else 0.0


class SiloRoundRecord(Record):
    """A line of a silo's own metrics file (`<id>.jsonl`) whose event is `round`."""

    event: Literal["round"] = "round"
    time: float
    silo: str
    round: int = Field(ge=1)
    train_loss: float
    train_seconds: float
    broadcast_seconds: float = Field(description="the broadcast as this silo received it")
    upload_seconds: float
    codec_seconds: float = Field(0.0, description="encoding the upload and decoding the broadcast (0 with fp32)")
    memory: MemorySplit


class DemoMode(Record):
    """One mode's federation in the demo: the aggregator's rounds, round 0 first."""

    rounds: list[AggregatorRound]


class DemoResult(Record):
    """`fedrdma demo --json`: the same federation once per mode, side by side.

    `transports` keeps its name (one entry per mode, keyed by the mode) because scripts read
    `transports[mode].rounds[i].eval_loss`; so does `max_abs_diff_between_transports`, the
    largest difference between the modes' final models (the mode must not change the math).
    """

    model: str
    lora: bool
    silos: list[str]
    transports: dict[Mode, DemoMode]
    max_abs_diff_between_transports: float
