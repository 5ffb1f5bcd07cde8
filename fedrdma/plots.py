"""PNG plots of results people would rather see than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

PHASES = ("broadcast_seconds", "train_seconds", "upload_seconds")


def demo_plot(result: dict[str, Any], path: Path) -> Path:
    """Held-out loss per round per transport, and each transport's time per round by phase."""
    transports = list(result["transports"])
    fig, axes = plt.subplots(1, 1 + len(transports), figsize=(5 * (1 + len(transports)), 4))
    loss_ax = axes[0]
    for t in transports:
        rounds = result["transports"][t]["rounds"]
        loss_ax.plot([r["round"] for r in rounds], [r["eval_loss"] for r in rounds], marker="o", label=t)
    loss_ax.set_xlabel("round")
    loss_ax.set_ylabel("held-out loss")
    loss_ax.set_title("held-out loss")
    loss_ax.legend()
    for ax, t in zip(axes[1:], transports, strict=True):
        rounds = [r for r in result["transports"][t]["rounds"] if r["round"] > 0]
        xs = [r["round"] for r in rounds]
        bottom = [0.0] * len(rounds)
        for phase in PHASES:
            vals = [mean_over_silos(r, phase) for r in rounds]
            ax.bar(xs, vals, bottom=bottom, label=phase.replace("_seconds", ""))
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        agg = [r.get("aggregation_seconds", 0.0) for r in rounds]
        ax.bar(xs, agg, bottom=bottom, label="aggregation")
        ax.set_xlabel("round")
        ax.set_ylabel("seconds (mean over silos)")
        ax.set_title(f"{t}: time per round")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mean_over_silos(record: dict[str, Any], key: str) -> float:
    vals = [s[key] for s in record.get("silos", []) if s.get("ok") and key in s]
    return sum(vals) / len(vals) if vals else 0.0
