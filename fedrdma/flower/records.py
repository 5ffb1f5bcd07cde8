"""Flower's ArrayRecord and a node's pool: one layout, the arrays written in and read out.

An `Array` holds its values as `.npy` bytes; they are written into the pool straight from
those bytes (the header parsed, the values viewed where they lie), so the one copy is the
one into shared memory. Reading a pool back into an ArrayRecord copies once, into the
bytes Flower's records are made of, array by array (`_npy`: the `.npy` header and the values
joined, one copy). With `release`, a shared pool's pages are let go of array by array behind
the copy (`SharedPool.release`), so an app holds one array's pages of the pool at a time, not
the state's; with `into`, the arrays replace those of a record of the same layout one by one,
so the old record's bytes go as the new ones come.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from fedrdma.core.errors import LayoutError
from fedrdma.core.layout import FlatState, Layout, torch_dtype


def layout_of(arrays: ArrayRecord) -> Layout:
    """The layout of an ArrayRecord's arrays, in its order: what both sides' pools hold."""
    return Layout.from_shapes((name, torch_dtype(a.dtype), tuple(a.shape)) for name, a in arrays.items())


def _values(array: Array) -> np.ndarray:
    """The array's values as a read-only view into its `.npy` bytes."""
    data = array.data
    stream = io.BytesIO(data)
    fmt = np.lib.format
    reader = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(stream))
    if reader is None:
        return array.numpy()
    shape, fortran, dtype = reader(stream)
    if fortran or dtype.hasobject:
        return array.numpy()
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell()).reshape(shape)


_GONE = Array(np.empty(0, dtype=np.uint8))
"""Holds an array's place in a record being refilled, between its old bytes and its new ones."""

Release = Callable[[int, int], None]
"""Told each array's byte span once it is copied: `SharedPool.release`."""


def write(arrays: ArrayRecord, state: FlatState, release: Release | None = None) -> None:
    if layout_of(arrays).layout_id != state.layout_id:
        raise LayoutError(f"these arrays have layout {layout_of(arrays).layout_id}; the pool holds {state.layout_id}")
    for spec, (name, array) in zip(state.layout.specs, arrays.items()):
        values, view = _values(array), state.views[name].numpy()
        if values.shape != view.shape:  # the Array's own header against what it announced
            raise LayoutError(f"array {name!r} holds shape {values.shape}, it announced {view.shape}")
        np.copyto(view, values)
        if release is not None:
            release(spec.offset, spec.offset + spec.nbytes)


def read(state: FlatState, release: Release | None = None, into: ArrayRecord | None = None) -> ArrayRecord:
    if into is not None and layout_of(into).layout_id != state.layout_id:
        raise LayoutError(f"the record to fill has layout {layout_of(into).layout_id}; the pool holds "
                          f"{state.layout_id}")
    record = ArrayRecord() if into is None else into
    for spec in state.layout.specs:
        if into is not None:
            record[spec.name] = _GONE  # the old bytes go before the new ones are made, the key keeps its place
        record[spec.name] = _npy(state.views[spec.name].numpy())
        if release is not None:
            release(spec.offset, spec.offset + spec.nbytes)
    return record


def _npy(values: np.ndarray) -> Array:
    """An `Array` of `values` as `.npy` bytes, made with one copy: the header and the values joined.

    `Array(ndarray)` saves into a BytesIO and takes its value, holding an array's bytes twice
    for a moment, and a state's largest array is a few hundred MiB. For a pool's views, which are
    C-ordered, these are the bytes `np.save` writes, so every reader of Flower's arrays reads them.
    """
    if not values.flags.c_contiguous:
        values = values.copy(order="C")
    header = io.BytesIO()
    fields = np.lib.format.header_data_from_array_1_0(values)
    try:
        np.lib.format.write_array_header_1_0(header, fields)
    except ValueError:  # a header past 64 KiB: an array of very many dimensions
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, fields)
    data = b"".join((header.getvalue(), memoryview(values.reshape(-1).view(np.uint8))))
    return Array(dtype=str(values.dtype), shape=tuple(int(d) for d in values.shape), stype=SType.NUMPY, data=data)
