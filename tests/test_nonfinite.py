"""NaN and infinity (issue 6, "Nothing lost, nothing crashes").

- A training-mode forward whose batch statistics are not finite raises
  FloatingPointError naming exactly the affected features, and leaves the
  layer as it was: running statistics, num_batches_tracked, and the backward
  cache (what backward differentiates, and which dy shape it accepts).
- In eval mode (with running statistics) NaN and infinity stay in the
  elements they came from; everything else is bitwise what a clean input gives.
- The functional API holds no state: it propagates NaN as NumPy would, feature
  by feature, without raising.
"""

import re

import numpy as np
import pytest
from bitwise import bits

import bnpy

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]

# name: (shape of a good batch, shape of the bad batch, axis). The bad batch
# has another shape, so that a backward cache it replaced would show.
LAYOUTS = {
    "interleaved": ((12, 5), (10, 5), 1),
    "planar": ((4, 5, 6), (3, 5, 7), 1),  # short rows: as lanes
    "planar-short-rows": ((4, 5, 150), (3, 5, 140), 1),  # planar rows of 150: tiles of rows
    "channels-last": ((3, 4, 5), (2, 4, 5), -1),
    "planar-long-rows": ((2, 5, 3000), (2, 5, 2500), 1),  # rows span several tiles
}
C = 5

# the non-finite values to plant, and where (feature: list of (index, value))
POISONS = {
    "nan": {1: [(0, np.nan)]},
    "posinf": {3: [(-1, np.inf)]},
    "neginf": {0: [(2, -np.inf)]},
    "inf-minus-inf": {4: [(0, np.inf), (1, -np.inf)]},  # the mean is NaN, not inf
    "two-features": {0: [(1, np.nan)], 4: [(0, np.inf)]},
    "whole-feature-nan": {2: "all"},
}

LAYERS = {
    "default": dict(),
    "momentum-none": dict(momentum=None),
    "untracked": dict(track_running_stats=False),
    "no-affine": dict(affine=False, eps=1e-3),
}


def data(shape, seed, dtype=np.float64):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)


def feature_view(x, axis, c):
    """x's values of feature c (a view), as a flat-indexable array."""
    return np.moveaxis(x, axis, 0)[c]


def poisoned(x, axis, poison):
    """A copy of x with the poison planted; returns (copy, mask of planted places)."""
    x = x.copy()
    mask = np.zeros(x.shape, bool)
    for c, where in poison.items():
        values, marks = feature_view(x, axis, c), feature_view(mask, axis, c)
        if where == "all":
            values[...] = np.nan
            marks[...] = True
            continue
        for index, value in where:
            flat_index = np.unravel_index(index % values.size, values.shape)
            values[flat_index] = value
            marks[flat_index] = True
    return x, mask


def make_layer(kind, axis, dtype, good_shape):
    bn = bnpy.BatchNorm(C, axis=axis, dtype=dtype, **LAYERS[kind])
    if bn.affine:
        bn.gamma[:] = [0.5, -1.5, 2.0, 1.0, -0.25]
        bn.beta[:] = [0.25, 0.0, -1.0, 3.0, 0.5]
    for seed in range(2):
        bn(data(good_shape, seed))
    return bn


def snapshot(bn, dy):
    """Everything observable, bitwise, including what backward(dy) returns."""
    snap = {k: bits(v) for k, v in bn.state_dict().items()}
    snap["num_batches_tracked"] = bn.num_batches_tracked
    snap["training"] = bn.training
    for k in ("grad_gamma", "grad_beta"):
        v = getattr(bn, k)
        snap[k] = None if v is None else bits(v)
    snap["backward"] = bits(bn.backward(dy))
    snap["grads_after_backward"] = tuple(
        None if g is None else bits(g) for g in (bn.grad_gamma, bn.grad_beta)
    )
    return snap


def named_features(message):
    """The feature indices a FloatingPointError message names."""
    return {int(n) for n in re.findall(r"\d+", message)}


# --- training mode: raise, change nothing ------------------------------------


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_forward_raises_and_changes_nothing(dtype, layout, poison, layer):
    good_shape, bad_shape, axis = LAYOUTS[layout]
    bn = make_layer(layer, axis, dtype, good_shape)
    dy = data(good_shape, 9, dtype)
    bn(data(good_shape, 5))
    bn.backward(dy)
    before = snapshot(bn, dy)

    x, _ = poisoned(data(bad_shape, 7), axis, POISONS[poison])
    x_before = bits(x)
    with pytest.raises(FloatingPointError) as info:
        bn(x)
    assert named_features(str(info.value)) == set(POISONS[poison]), str(info.value)
    assert bits(x) == x_before

    # the backward cache is the last good forward's: its dy works, bitwise as
    # before, and the failed batch's shape is refused
    with pytest.raises(ValueError):
        bn.backward(np.zeros(bad_shape, dtype))
    assert snapshot(bn, dy) == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_forward_raises_before_any_forward(dtype):
    bn = bnpy.BatchNorm(C, dtype=dtype, momentum=None)
    x, _ = poisoned(data((6, C), 1), 1, {2: [(3, np.nan)]})
    with pytest.raises(FloatingPointError, match=r"\b2\b"):
        bn(x)
    assert bn.num_batches_tracked == 0
    assert np.array_equal(bn.running_mean, np.zeros(C)) and np.array_equal(
        bn.running_var, np.ones(C)
    )
    with pytest.raises(RuntimeError):  # still no forward to differentiate
        bn.backward(np.zeros((6, C), dtype))
    assert bn.grad_gamma is None and bn.grad_beta is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_given_to_a_failing_forward_keeps_the_layer(dtype):
    good_shape, bad_shape, axis = LAYOUTS["planar"]
    bn = make_layer("default", axis, dtype, good_shape)
    dy = data(good_shape, 9, dtype)
    bn(data(good_shape, 5))
    bn.backward(dy)
    before = snapshot(bn, dy)
    x, _ = poisoned(data(bad_shape, 7), axis, POISONS["nan"])
    out = np.zeros(bad_shape, dtype)
    with pytest.raises(FloatingPointError):
        bn.forward(x, out=out)
    assert snapshot(bn, dy) == before


@pytest.mark.parametrize("layout", ["interleaved", "planar"])
def test_failing_in_place_forward_leaves_the_input_alone(layout):
    _, bad_shape, axis = LAYOUTS[layout]
    bn = bnpy.BatchNorm(C, axis=axis)
    x, _ = poisoned(data(bad_shape, 7, np.float32), axis, POISONS["nan"])
    x_before = bits(x)
    with pytest.raises(FloatingPointError):
        bn.forward(x, out=x)
    assert bits(x) == x_before


def test_overflowing_statistics_of_finite_input_raise():
    # finite float64 values whose squared deviations overflow: the batch
    # statistics are not finite, so training refuses this batch too
    x = data((8, C), 3)
    x[:, 3] *= 1e200
    bn = bnpy.BatchNorm(C, dtype=np.float64)
    with pytest.raises(FloatingPointError) as info:
        bn(x)
    assert named_features(str(info.value)) == {3}
    assert bn.num_batches_tracked == 0
    assert np.array_equal(bn.running_var, np.ones(C))


@pytest.mark.parametrize("layout", ["interleaved", "planar"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_refused_batch_leaves_no_trace(dtype, momentum, layout):
    """Training on b1, (a refused batch), b2 gives bitwise what b1, b2 gives."""
    good_shape, bad_shape, axis = LAYOUTS[layout]
    b1, b2 = data(good_shape, 1), data(good_shape, 2)
    bad, _ = poisoned(data(bad_shape, 3), axis, POISONS["two-features"])
    dy = data(good_shape, 4, dtype)
    clean = bnpy.BatchNorm(C, axis=axis, dtype=dtype, momentum=momentum)
    tried = bnpy.BatchNorm(C, axis=axis, dtype=dtype, momentum=momentum)
    y_clean = [clean(b1), clean(b2)]
    y_tried = [tried(b1)]
    with pytest.raises(FloatingPointError):
        tried(bad)
    y_tried.append(tried(b2))
    assert [bits(y) for y in y_tried] == [bits(y) for y in y_clean]
    assert bits(tried.backward(dy)) == bits(clean.backward(dy))
    assert tried.num_batches_tracked == clean.num_batches_tracked == 2
    for k, v in clean.state_dict().items():
        assert bits(tried.state_dict()[k]) == bits(v), k


# --- eval mode: NaN stays where it was ----------------------------------------


def _trained_for_eval(dtype, axis, good_shape):
    bn = make_layer("default", axis, dtype, good_shape)
    bn.eval()
    return bn


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_nonfinite_stays_in_its_elements(dtype, layout, poison):
    good_shape, bad_shape, axis = LAYOUTS[layout]
    bn = _trained_for_eval(dtype, axis, good_shape)
    state = {k: bits(v) for k, v in bn.state_dict().items()}
    clean = data(bad_shape, 7)
    x, mask = poisoned(clean, axis, POISONS[poison])
    y = bn(x)  # no exception in eval mode
    y_clean = bn(clean)
    assert np.array_equal(~np.isfinite(y), mask)
    assert np.array_equal(np.isnan(y), np.isnan(x))
    # infinities keep their sign through a positive or negative gamma
    gamma_along = np.moveaxis(
        np.broadcast_to(bn.gamma.reshape([-1] + [1] * (x.ndim - 1)), np.moveaxis(x, axis, 0).shape),
        0,
        axis,
    )
    inf = np.isinf(x)
    assert np.array_equal(np.sign(y[inf]), np.sign(x[inf]) * np.sign(gamma_along[inf]))
    assert bits(y[~mask]) == bits(y_clean[~mask])
    assert {k: bits(v) for k, v in bn.state_dict().items()} == state


@pytest.mark.parametrize("layout", ["interleaved", "planar", "channels-last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_backward_of_nonfinite_input(dtype, layout):
    """Eval-mode dx = dy * gamma * invstd does not look at x: it stays finite and
    exact; dgamma = sum dy * xhat is NaN for the poisoned features only."""
    good_shape, bad_shape, axis = LAYOUTS[layout]
    bn = _trained_for_eval(dtype, axis, good_shape)
    poison = POISONS["two-features"]
    clean = data(bad_shape, 7)
    x, _ = poisoned(clean, axis, poison)
    dy = data(bad_shape, 8, dtype)
    bn(clean)
    dx_clean = bn.backward(dy)
    dgamma_clean, dbeta_clean = bn.grad_gamma.copy(), bn.grad_beta.copy()
    bn(x)
    dx = bn.backward(dy)
    assert bits(dx) == bits(dx_clean)
    assert bits(bn.grad_beta) == bits(dbeta_clean)
    bad = np.isin(np.arange(C), list(poison))
    assert np.array_equal(~np.isfinite(bn.grad_gamma), bad)
    assert bits(bn.grad_gamma[~bad]) == bits(dgamma_clean[~bad])


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_without_running_stats_propagates_feature_by_feature(dtype):
    """Without running statistics eval mode normalizes with the batch's own
    statistics, like the functional API: it does not raise (it is not
    training), a poisoned feature comes out non-finite, and the others are
    bitwise what the clean batch gives."""
    _good_shape, bad_shape, axis = LAYOUTS["planar"]
    bn = bnpy.BatchNorm(C, axis=axis, dtype=dtype, track_running_stats=False).eval()
    clean = data(bad_shape, 7)
    x, _ = poisoned(clean, axis, POISONS["two-features"])
    y, y_clean = bn(x), bn(clean)
    for c in range(C):
        got, want = feature_view(y, axis, c), feature_view(y_clean, axis, c)
        if c in POISONS["two-features"]:
            assert not np.isfinite(got).any()
        else:
            assert bits(got) == bits(want)


# --- the functional API: propagates, never raises -------------------------------


@pytest.mark.parametrize("poison", ["nan", "posinf", "inf-minus-inf", "two-features"])
@pytest.mark.parametrize("layout", ["interleaved", "planar", "channels-last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_forward_propagates_per_feature(dtype, layout, poison):
    _, shape, axis = LAYOUTS[layout]
    clean = data(shape, 7, dtype)
    x, _ = poisoned(clean, axis, POISONS[poison])
    gamma, beta = np.linspace(0.5, 2, C).astype(dtype), np.linspace(-1, 1, C).astype(dtype)
    y, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta, axis=axis)
    y_clean, mean_clean, invstd_clean = bnpy.batch_norm_forward(clean, gamma, beta, axis=axis)
    bad = np.isin(np.arange(C), list(POISONS[poison]))
    assert np.array_equal(~np.isfinite(mean) | ~np.isfinite(invstd), bad)
    assert np.isnan(mean[bad]).all() or np.isinf(mean[bad]).any()
    for c in range(C):
        got = feature_view(y, axis, c)
        if bad[c]:
            assert np.isnan(got).all(), c  # NaN spreads through the feature's statistics
        else:
            assert bits(got) == bits(feature_view(y_clean, axis, c)), c
    assert bits(mean[~bad]) == bits(mean_clean[~bad])
    assert bits(invstd[~bad]) == bits(invstd_clean[~bad])

    # and backward with those statistics: the poisoned features' dx and
    # dgamma are NaN, the others exact
    dy = data(shape, 8, dtype)
    dx, dgamma, dbeta = bnpy.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis)
    dx_clean, dgamma_clean, dbeta_clean = bnpy.batch_norm_backward(
        dy, clean, gamma, mean_clean, invstd_clean, axis=axis
    )
    for c in range(C):
        if bad[c]:
            assert np.isnan(feature_view(dx, axis, c)).all()
            assert np.isnan(dgamma[c])
        else:
            assert bits(feature_view(dx, axis, c)) == bits(feature_view(dx_clean, axis, c))
            assert bits(dgamma[c]) == bits(dgamma_clean[c])
    assert bits(dbeta) == bits(dbeta_clean)  # sum dy: x does not enter it


@pytest.mark.parametrize("layout", ["interleaved", "planar", "channels-last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_inference_confines_nonfinite_input(dtype, layout):
    _, shape, axis = LAYOUTS[layout]
    clean = data(shape, 7, dtype)
    x, mask = poisoned(clean, axis, POISONS["two-features"])
    mean, var = np.linspace(-1, 1, C), np.linspace(0.5, 3, C)
    y = bnpy.batch_norm_inference(x, None, None, mean, var, axis=axis)
    y_clean = bnpy.batch_norm_inference(clean, None, None, mean, var, axis=axis)
    assert np.array_equal(~np.isfinite(y), mask)
    assert bits(y[~mask]) == bits(y_clean[~mask])


@pytest.mark.parametrize("which", ["mean", "var", "gamma", "beta"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_inference_nonfinite_statistics_stay_in_their_feature(dtype, which):
    _, shape, axis = LAYOUTS["planar"]
    x = data(shape, 7, dtype)
    args = dict(
        gamma=np.linspace(0.5, 2, C),
        beta=np.linspace(-1, 1, C),
        mean=np.linspace(-1, 1, C),
        var=np.linspace(0.5, 3, C),
    )
    y_clean = bnpy.batch_norm_inference(x, **args, axis=axis)
    args[which] = args[which].copy()
    args[which][2] = np.nan
    y = bnpy.batch_norm_inference(x, **args, axis=axis)
    for c in range(C):
        got = feature_view(y, axis, c)
        if c == 2:
            assert np.isnan(got).all()
        else:
            assert bits(got) == bits(feature_view(y_clean, axis, c))


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_backward_nan_dy_stays_in_its_feature(dtype):
    _, shape, _axis = LAYOUTS["interleaved"]
    x = data(shape, 7, dtype)
    _y, mean, invstd = bnpy.batch_norm_forward(x, None, None)
    dy_clean = data(shape, 8, dtype)
    dy = dy_clean.copy()
    dy[3, 1] = np.nan
    for training in (True, False):
        dx, _, _ = bnpy.batch_norm_backward(dy, x, None, mean, invstd, training=training)
        dx_clean, _, _ = bnpy.batch_norm_backward(
            dy_clean, x, None, mean, invstd, training=training
        )
        if training:  # the sums over feature 1 carry the NaN to all of it
            assert np.isnan(dx[:, 1]).all()
        else:  # elementwise
            assert np.array_equal(np.isnan(dx), np.isnan(dy))
            assert bits(dx[:, 1][~np.isnan(dy[:, 1])]) == bits(dx_clean[:, 1][~np.isnan(dy[:, 1])])
        others = [0, 2, 3, 4]
        assert bits(dx[:, others]) == bits(dx_clean[:, others])


@pytest.mark.parametrize("shape", [(512, 40), (512, 2, 5)])  # channels-last; spread rows
def test_overflow_inside_one_statistics_block_still_raises(shape):
    """The lane statistics sum blocks of rows about the mean so far. Rows of
    0, then rows of 1.5e153 and 0.5e153: a later block's squares overflow
    while the spread between the blocks does not. The overflow must not be
    clamped away into a finite, wrong variance."""
    x = np.random.default_rng(5).normal(size=shape)
    feature = x[:, 0]
    feature[:256] = 0.0
    feature[256::2] = 1.5e153
    feature[257::2] = 0.5e153
    bn = bnpy.BatchNorm(shape[1], dtype=np.float64)
    with pytest.raises(FloatingPointError) as info:
        bn(x)
    assert named_features(str(info.value)) == {0}


@pytest.mark.parametrize("shape", [(16, 40), (16, 2, 5)])  # channels-last; spread rows
def test_a_constant_feature_far_from_the_shift_has_no_spread(shape):
    """Statistics less a shift (as SyncBatchNorm takes them, less the running
    mean): a constant feature 1e200 away has mean 1e200 and m2 exactly 0,
    though the mean's square would overflow."""
    x = np.full(shape, 1e200)
    bn = bnpy.BatchNorm(shape[1], dtype=np.float64)
    stats = bn._stats_of([x], shift=np.zeros(shape[1]))
    assert np.array_equal(stats[:, 1], np.full(shape[1], 1e200))
    assert np.array_equal(stats[:, 2], np.zeros(shape[1]))
