"""BatchNorm.calibrate and bnpy.nn.recalibrate: exact population statistics."""

from fractions import Fraction

import numpy as np
import pytest

import bnpy
from bnpy import nn


def exact_mean_var(values):
    """The exact mean and unbiased variance of float64 values (rationals)."""
    exact = [Fraction(float(v)) for v in np.ravel(values)]
    mean = sum(exact) / len(exact)
    return mean, sum((v - mean) ** 2 for v in exact) / (len(exact) - 1)


def relative(got, want):
    return abs(float((Fraction(float(got)) - want) / want))


@pytest.mark.parametrize("offset, std", [(0.0, 1.0), (1e6, 3.0), (1e8, 1.0)])
@pytest.mark.parametrize("shape, axis", [((4, 5), 1), ((3, 2), -1)])
def test_calibrate_gives_the_exact_statistics_of_all_batches(offset, std, shape, axis):
    rng = np.random.default_rng(0)
    sizes = (3, 17, 1, 40, 0, 2)
    batches = [rng.normal(offset, std, size=(n,) + shape) for n in sizes]
    channels = batches[0].shape[axis]
    layer = bnpy.BatchNorm(channels, axis=axis, dtype=np.float64)
    assert layer.calibrate(batches) is layer
    whole = np.moveaxis(np.concatenate(batches), axis, -1)
    for c in range(channels):
        mean, var = exact_mean_var(whole[..., c])
        assert relative(layer.running_var[c], var) < 1e-12
        if mean != 0:
            assert relative(layer.running_mean[c], mean) < 1e-12


def test_averaging_per_batch_variances_is_not_the_same():
    """What 'precise BN' in most frameworks does differs from the exact value."""
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc, 1.0, size=(n, 3)) for loc, n in ((0, 8), (5, 3), (-2, 20))]
    layer = bnpy.BatchNorm(3, dtype=np.float64).calibrate(batches)
    averaged = np.mean([b.var(axis=0, ddof=1) for b in batches], axis=0)
    exact = np.concatenate(batches).var(axis=0, ddof=1)
    np.testing.assert_allclose(layer.running_var, exact, rtol=1e-12)
    assert np.all(np.abs(averaged - exact) > 0.1 * exact)


def test_calibrate_leaves_parameters_mode_and_count_alone():
    rng = np.random.default_rng(2)
    layer = bnpy.BatchNorm(3, dtype=np.float32).eval()
    layer.gamma, layer.beta = [1.0, 2.0, 3.0], [0.5, 0.0, -0.5]
    layer.calibrate(rng.normal(size=(10, 3)) for _ in range(4))  # any iterable
    assert layer.training is False and layer.num_batches_tracked == 0
    assert np.array_equal(layer.gamma, np.float32([1, 2, 3]))
    assert np.array_equal(layer.beta, np.float32([0.5, 0, -0.5]))


def test_a_rejected_batch_leaves_the_layer_unchanged():
    rng = np.random.default_rng(3)
    layer = bnpy.BatchNorm(3, dtype=np.float64)
    layer(rng.normal(size=(6, 3)))
    before = layer.state_dict()
    bad_batches = [
        [rng.normal(size=(5, 3)), rng.normal(size=(5, 4))],  # wrong feature count
        [rng.normal(size=(5, 3)), np.array([["a", "b", "c"]])],  # not numbers
        [rng.normal(size=(1, 3))],  # one value: no variance
        [np.full((4, 3), np.nan)],  # not finite
        [],  # nothing at all
    ]
    for batches in bad_batches:
        with pytest.raises((ValueError, TypeError, FloatingPointError)):
            layer.calibrate(batches)
        after = layer.state_dict()
        assert all(np.array_equal(before[k], after[k]) for k in before)


def test_calibrate_needs_running_statistics():
    layer = bnpy.BatchNorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        layer.calibrate([np.zeros((4, 3))])
    with pytest.raises(TypeError, match="iterable"):
        bnpy.BatchNorm(3).calibrate(3)


def test_merging_partials_in_order_matches_one_pass():
    rng = np.random.default_rng(4)
    batches = [rng.normal(2.0, 3.0, size=(n, 4)) for n in (5, 1, 9)]
    layer = bnpy.BatchNorm(4, dtype=np.float64)
    parts = np.stack([layer._stats_of([b]) for b in batches])
    merged = bnpy._core._merge_partials(parts)
    whole = np.concatenate(batches)
    np.testing.assert_array_equal(merged[:, 0], len(whole))
    np.testing.assert_allclose(merged[:, 1], whole.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(merged[:, 2], ((whole - whole.mean(0)) ** 2).sum(0), rtol=1e-12)


def test_recalibrate_gives_each_batchnorm_the_statistics_of_its_inputs():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 2)).astype(np.float32)
    model = nn.mlp(2, 3, width=16, depth=3, activation="tanh", batch_norm=True, rng=0)
    labels = rng.integers(0, 3, size=300)
    nn.fit(model, x, labels, lr=0.1, steps=20, batch_size=32, rng=1)
    model.layers[1].train(False)  # a mixed mode, to check it comes back
    modes = [getattr(layer, "training", None) for layer in model.layers]
    assert nn.recalibrate(model, np.array_split(x, 7)) is model
    assert [getattr(layer, "training", None) for layer in model.layers] == modes
    # each BatchNorm now holds the exact statistics of what reaches it in eval mode
    activations = x.astype(np.float64)
    model.eval()
    for layer in model.layers:
        if isinstance(layer, bnpy.BatchNorm):
            np.testing.assert_allclose(
                layer.running_mean, activations.mean(0), rtol=1e-4, atol=1e-6
            )
            np.testing.assert_allclose(layer.running_var, activations.var(0, ddof=1), rtol=1e-4)
        activations = layer(activations)
