"""The weighted mean as Flower's FedAvg computes it, to the bit, over a node's inboxes.

`core.fedavg` sums every update times its whole-number weight and divides once. Flower's
`aggregate_arrayrecords` multiplies each update by its share `n_i / N` in the array's own
dtype and adds the products in reply order. The two means differ in the last bit, and a
last bit is enough: AdamW's first step moves a weight by the sign of its gradient, so over a
few rounds of GPT-2 the two ways' models drifted 3.9e-4 apart. A `FedRDMA`-wrapped strategy
asks the node for this formula, so wrapping changes where the arrays travel, not the model.

The expressions are numpy's, as Flower's are (`x * share`, then `+=`), so the same numpy
gives the same bits; elementwise, they give them slice by slice as well as whole.
"""

from __future__ import annotations

from fedrdma.core.errors import LayoutError
from fedrdma.core.layout import FlatState


def flower_mean(updates: list[tuple[FlatState, int]], into: FlatState, slice_bytes: int) -> None:
    """Write sum_i x_i * (n_i / N) into `into`, the updates taken in the order given.

    The shares are Flower's: each weight over the plain sum of the weights, in Python floats."""
    if not updates:
        raise ValueError("the mean of no updates")
    total = sum(weight for _, weight in updates)
    shares = [weight / total for _, weight in updates]
    for spec in into.layout.specs:
        try:
            out = into.views[spec.name].numpy().reshape(-1)
        except TypeError as exc:  # bfloat16: Flower's arrays are numpy's, which has none
            raise LayoutError(f"tensor {spec.name!r} is {spec.dtype}, which Flower's arrays cannot hold: "
                              "average it with the node's own mean") from exc
        step = max(1, slice_bytes // out.itemsize)
        sources = [state.views[spec.name].numpy().reshape(-1) for state, _ in updates]
        for start in range(0, out.size, step):
            part = slice(start, start + step)
            acc = sources[0][part] * shares[0]
            for source, share in zip(sources[1:], shares[1:], strict=True):
                acc += source[part] * share
            out[part] = acc
