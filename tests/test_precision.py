"""Statistics to the last bits: a training forward's mean and variance against
the exact values (rationals), for data far from zero and inputs large enough
that the kernels merge many tiles and row groups."""

from fractions import Fraction

import numpy as np
import pytest

import bnpy


def exact(values):
    vals = [Fraction(float(v)) for v in values]
    mean = sum(vals) / len(vals)
    return mean, sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)


@pytest.mark.parametrize(
    "shape, axis",
    [
        ((6000, 2), 1),  # interleaved: two row groups, many wide rows
        ((12, 2, 2500), 1),  # planar: rows cut into tiles, the next feature pipelined
        ((300, 2, 7), 1),  # short rows as lanes: wide rows of 14 values, folded
    ],
)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_batch_statistics_are_exact_to_rounding(shape, axis, offset):
    x = np.random.default_rng(0).normal(offset, 1.0, size=shape)
    layer = bnpy.BatchNorm(2, axis=axis, dtype=np.float64, momentum=1.0)  # running = batch
    layer(x)
    values = np.moveaxis(x, axis, -1).reshape(-1, 2)
    for c in range(2):
        mean, var = exact(values[:, c])
        assert abs(float((Fraction(float(layer.running_var[c])) - var) / var)) < 1e-14
        scale = max(abs(mean), 1)
        assert abs(float((Fraction(float(layer.running_mean[c])) - mean) / scale)) < 1e-15


@pytest.mark.parametrize(
    "shape",
    [
        (4100, 3),  # channels-last, 11 rows folded into a wide row
        (4100, 40),  # one row a wide row: each lane is one feature's column
        (4100, 3, 5),  # short rows as lanes: 3 rows of 15 lanes a wide row
    ],
)
@pytest.mark.parametrize("far_rows", [slice(0, 16), slice(16, 32), slice(256, 272)])
@pytest.mark.parametrize("far_by", [0.0, 1e4])
def test_lane_statistics_when_some_rows_are_far_from_the_rest(shape, far_rows, far_by):
    """Channels-last statistics, and those of short planar rows run as lanes
    of wide rows, sum each lane in blocks of 64 wide rows: the first about its
    own rough mean, each later block about the mean of the rows before it.
    Rows far from the rest put a block's center far from its values: rows of
    the first block (every later center is off), rows of the first block and
    the next, or rows in the middle. Still exact to rounding. With 40
    features no folding of several rows into a wide row dilutes the far ones
    (a test of one block down each lane missed it: 1.9e-12 there)."""
    channels, width = shape[1], int(np.prod(shape[1:]))
    x = np.random.default_rng(1).normal(1e6, 1.0, size=shape)  # one group of rows, and a few
    fold = -(-32 // width)  # rows in a wide row
    x[far_rows.start * fold : far_rows.stop * fold] -= far_by  # exactly those wide rows
    layer = bnpy.BatchNorm(channels, dtype=np.float64, momentum=1.0)
    layer(x)
    for c in range(channels):
        mean, var = exact(x[:, c].ravel())
        assert abs(float((Fraction(float(layer.running_var[c])) - var) / var)) < 1e-14
        assert abs(float((Fraction(float(layer.running_mean[c])) - mean) / abs(mean))) < 1e-15


@pytest.mark.parametrize("inner", [49, 200])
@pytest.mark.parametrize("first_tile_off_by", [0.0, 1e4])
def test_short_row_statistics_when_the_first_tile_is_far_from_the_rest(inner, first_tile_off_by):
    """Statistics tiles: rows of 49 values run as lanes (blocks of 64 rows),
    rows of 200 feature by feature in tiles of 2048 // 200 = 10 rows; the
    first block or tile centers on its own rough mean, each later one on the
    mean of those before it. First rows far from the rest put every later
    center far from its values: the squares those lose, the spread between
    the blocks makes up. Still exact to rounding."""
    x = np.random.default_rng(2).normal(1e6, 1.0, size=(400, 2, inner))
    x[: max(256 // inner, 1)] -= first_tile_off_by  # exactly the first tile's rows
    layer = bnpy.BatchNorm(2, dtype=np.float64, momentum=1.0)
    layer(x)
    for c in range(2):
        mean, var = exact(x[:, c].ravel())
        assert abs(float((Fraction(float(layer.running_var[c])) - var) / var)) < 1e-14
        assert abs(float((Fraction(float(layer.running_mean[c])) - mean) / abs(mean))) < 1e-15
