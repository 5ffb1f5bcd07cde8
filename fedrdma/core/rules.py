"""FedAvg's rules as numbers: the quorum, the outlier factor, the bounds on a silo's weight.

Kept apart from `core.fedavg` (which needs torch) so that settings and the command line can
name them, and state their defaults, without loading torch.
"""

from __future__ import annotations

NORM_FACTOR = 10.0
"""An update whose delta norm exceeds this many times the median of the other silos' norms
is rejected: honest non-IID silos differ by small factors, a scaled or runaway update by orders."""

MIN_SILOS = 1
"""A round closes once this many silos delivered (or all of them before the deadline)."""

MAX_SAMPLES = 1 << 29
"""Above this a float32 value times n_samples is no longer exact in float64."""

WEIGHT_FACTOR = 3.0
"""A silo's self-reported sample count weighs at most this many times the median of the
other accepted silos' weights: members of one consortium rarely differ more in size, and a
silo claiming 2**29-1 samples then counts as three ordinary silos, not as the whole round.
Members that do differ more agree their weights in the aggregator's `silos` instead."""
