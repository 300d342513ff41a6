"""Outputs larger than half the last-level cache are written past the caches
with non-temporal stores, a cache line at a time from the first line each
row (or run of lanes) starts: y and dx, over planar rows of 1 KB or more and
over lanes (channels last, short rows). They must hold the same bits as
outputs written through the caches: written in place (dx over dy, y over
x), they never stream, so the two are compared, in every instruction-set
build, at every start of the rows within a cache line."""

import numpy as np
import pytest
from bitwise import assert_same_bits_at_line_offsets, at_line_offset

import bnpy

STREAM_BYTES = 16 << 20
FEATURE_STREAM_BYTES = 1 << 20


def _long_rows(itemsize):
    """6 odd rows: each starts at another place within a line"""
    return (2, 3, STREAM_BYTES // (6 * itemsize) + 3)


def _many_rows(itemsize):
    """thousands of rows of 401 values: planar, in the pipeline; features of
    just over 1 MiB"""
    return (STREAM_BYTES // (15 * 401 * itemsize) + 1, 15, 401)


def _short_rows(itemsize):
    """rows of 200 values: planar, tiles of 10 rows; rows under 1 KB in
    float32, which do not stream"""
    return (STREAM_BYTES // (3 * 200 * itemsize) + 1, 3, 200)


def _interleaved(itemsize):
    """channels last, 64 features: lanes, wide rows of 64 values"""
    return (STREAM_BYTES // (64 * itemsize) + 3, 64)


def _spread(itemsize):
    """rows of 16 values, 4 features: lanes, wide rows of 64 values"""
    return (STREAM_BYTES // (64 * itemsize) + 5, 4, 16)


ROWS = [_long_rows, _many_rows, _short_rows, _interleaved, _spread]
ROW_IDS = ["long-rows", "many-rows", "short-rows", "interleaved", "spread"]


@pytest.mark.parametrize("rows", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("build", bnpy.cpu_capabilities())
def test_streamed_dx_has_the_bits_of_dx_written_in_place(capability, build, dtype, training, rows):
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
    assert in_place.nbytes >= STREAM_BYTES
    assert_same_bits_at_line_offsets(
        lambda out: bn.backward(dy, out=out), in_place, (0, 1, 64 // itemsize - 1)
    )


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


@pytest.mark.parametrize("rows", ROWS, ids=ROW_IDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("build", bnpy.cpu_capabilities())
def test_streamed_y_has_the_bits_of_y_written_in_place(capability, build, dtype, training, rows):
    capability(build)
    itemsize = np.dtype(dtype).itemsize
    shape = rows(itemsize)
    channels = shape[1]
    assert np.prod(shape) // channels * itemsize >= FEATURE_STREAM_BYTES or rows in (
        _short_rows,
        _interleaved,
        _spread,
    )
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, size=shape).astype(dtype)
    bn = bnpy.BatchNorm(channels, dtype=dtype)  # training: y uses the batch's statistics
    bn.gamma, bn.beta = rng.normal(size=channels), rng.normal(size=channels)
    if not training:  # inference: the running ones
        bn.running_mean = rng.normal(size=channels)
        bn.running_var = rng.uniform(0.5, 2.0, size=channels)
        bn.eval()
    in_place = x.copy()
    bn.forward(in_place, out=in_place)
    assert in_place.nbytes >= STREAM_BYTES
    assert_same_bits_at_line_offsets(
        lambda out: bn.forward(x, out=out), in_place, (0, 1, 64 // itemsize - 1)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_y_of_the_functional_forward(dtype):
    """The functional forward streams too, on the same condition; its
    statistics do not depend on where y goes"""
    itemsize = np.dtype(dtype).itemsize
    shape = (2, 3, STREAM_BYTES // (6 * itemsize) + 7)
    x = np.random.default_rng(8).normal(5.0, 0.5, size=shape).astype(dtype)
    y, mean, invstd = bnpy.batch_norm_forward(
        x, None, None, axis=1, out=at_line_offset(shape, dtype, 3)
    )
    in_place = x.copy()
    y2, mean2, invstd2 = bnpy.batch_norm_forward(in_place, None, None, axis=1, out=in_place)
    assert y.tobytes() == y2.tobytes()
    assert mean.tobytes() == mean2.tobytes() and invstd.tobytes() == invstd2.tobytes()
