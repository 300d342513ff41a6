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


@pytest.mark.parametrize("shape, axis", [
    ((6000, 2), 1),        # interleaved: two row groups, many wide rows
    ((12, 2, 2500), 1),    # planar: rows cut into tiles, the next feature pipelined
    ((300, 2, 7), 1),      # planar: tiles of many short rows
])
@pytest.mark.parametrize("offset", [0.0, 1e8])
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
