"""A dx too large for the caches (16 MiB or more) is written past them with
non-temporal stores, starting at the first value of each row that begins a
cache line. It must hold the same bits as the dx written through the caches:
backward in place (out=dy) never streams, so the two are compared, in every
instruction-set build, at every start of the rows within a cache line."""
import numpy as np
import pytest

import bnpy

STREAM_BYTES = 16 << 20


def _at_line_offset(shape, dtype, offset):
    """An empty array whose first value lies `offset` values past a 64-byte line."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = np.empty(count + 64 // dtype.itemsize * 2, dtype)
    skip = (-raw.ctypes.data % 64) // dtype.itemsize + offset
    return raw[skip:skip + count].reshape(shape)


def _long_rows(itemsize):
    """6 odd rows: each starts at another place within a line"""
    return (2, 3, STREAM_BYTES // (6 * itemsize) + 3)


def _many_rows(itemsize):
    """thousands of rows of 401 values (pipelined, not the short-row path)"""
    return (STREAM_BYTES // (15 * 401 * itemsize) + 1, 15, 401)


@pytest.mark.parametrize("rows", [_long_rows, _many_rows], ids=["long-rows", "many-rows"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("build", bnpy.cpu_capabilities())
def test_streamed_dx_has_the_bits_of_dx_written_in_place(capability, build, dtype, training,
                                                          rows):
    capability(build)
    itemsize = np.dtype(dtype).itemsize
    shape = rows(itemsize)
    channels = shape[1]
    rng = np.random.default_rng(5)
    x = rng.normal(2.0, 3.0, size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    bn = bnpy.BatchNorm(channels, dtype=dtype)
    bn.gamma, bn.beta = rng.normal(size=channels), rng.normal(size=channels)
    bn.train(training)
    bn.forward(x)
    in_place = dy.copy()
    bn.backward(in_place, out=in_place)
    for offset in (0, 1, 64 // itemsize - 1):
        out = _at_line_offset(shape, dtype, offset)
        assert out.nbytes >= STREAM_BYTES
        bn.backward(dy, out=out)
        assert out.tobytes() == in_place.tobytes(), f"offset {offset}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("build", bnpy.cpu_capabilities())
def test_streamed_dx_over_x_itself(capability, build, dtype):
    """The functional backward may write dx over x (it reads each x value
    before its dx is written): streamed stores there, and into a separate
    out, give the bits of dx written in place over dy, which is not streamed."""
    capability(build)
    itemsize = np.dtype(dtype).itemsize
    shape = (2, 3, STREAM_BYTES // (6 * itemsize) + 5)
    rng = np.random.default_rng(6)
    x = rng.normal(-1.0, 2.0, size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    gamma = rng.normal(size=3).astype(dtype)
    _, mean, invstd = bnpy.batch_norm_forward(x, gamma, None, axis=1)
    separate = bnpy.batch_norm_backward(dy, x, gamma, mean, invstd, axis=1)
    dy_in_place = dy.copy()
    want = bnpy.batch_norm_backward(dy_in_place, x, gamma, mean, invstd, axis=1, out=dy_in_place)
    got = bnpy.batch_norm_backward(dy, x, gamma, mean, invstd, axis=1, out=x)
    assert got[0] is x
    for w, g, s in zip(want, got, separate):
        assert w.tobytes() == g.tobytes() == s.tobytes()
