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

FLOAT32_EPS = 2.0**-23
"""float32's unit roundoff: the precision the global state is kept in."""

SUBTRACT_ULPS = 1.0
"""Taking a silo back out of the running sum by subtracting it again may cost the mean at
most this many float32 ulps of the global's largest value; a silo that added more (a huge
finite outlier, or a claimed weight far above the others') is not subtracted: the sum is
rebuilt from the accepted silos, which is exact but reads every one of them again."""


def subtractable(weight: float, largest: float, kept: float, scale: float, eps: float) -> bool:
    """Whether subtracting `weight` times values of magnitude up to `largest` from a sum kept
    with unit roundoff `eps` stays within SUBTRACT_ULPS of `scale` in the mean of the
    silos kept (total weight `kept`): the subtraction's rounding is about `eps * weight * largest`."""
    return eps * weight * largest <= SUBTRACT_ULPS * FLOAT32_EPS * kept * scale
