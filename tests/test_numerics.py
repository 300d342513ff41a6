"""Numerical edge cases (issue 6), exactly as the issue states them:

- a float32 feature with mean 1e4 and std 1 normalizes to within 2e-3 of the
  float64 reference computed from the same float32 values;
- a float64 feature with mean 1e8 and std 1 normalizes to within 1e-6;
- a constant feature gives exactly beta (x_hat = 0, never +-1);
- float32 values near 1e30 give finite, correct outputs (no overflow in the
  squared sums); a float32 layer that keeps running statistics refuses them,
  since their variance has no float32 value (issue 25).

Each runs through every kernel family: interleaved rows (inner == 1, several
row groups), planar rows shorter and longer than a tile, channels-last, and
the functional API, since each has its own reduction code.

For the 1e8 case the reference is computed with math.fsum (correctly rounded
sums): bnpy.reference's plain float64 np.mean of 1e5 values near 1e8 is
itself off by ~1e-6 in x_hat, too close to the bound to judge by.
"""

import math

import numpy as np
import pytest

import bnpy
from bnpy import reference

# name: (shape, axis); every family of kernels
LAYOUTS = {
    "interleaved": ((30000, 3), 1),  # 8 row groups of 4096 rows
    "planar-short-rows": ((700, 3, 150), 1),  # planar: tiles of 13 rows
    "planar-spread-rows": ((3000, 3, 20), 1),  # short rows as lanes: wide rows of 60
    "planar-long-rows": ((6, 3, 5000), 1),  # rows cut into 2048-value tiles
    "channels-last": ((100, 30, 3), -1),
}
C = 3


def per_feature(values, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(values).reshape(shape)


def offset_data(shape, axis, offsets, std, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * std + per_feature(offsets, len(shape), axis)
    return x.astype(dtype)


def exact_normalized(x, axis, eps):
    """(x - mean) / sqrt(var + eps) per feature, with correctly rounded sums."""
    x = np.asarray(x, np.float64)
    moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    out = np.empty_like(moved)
    for c, values in enumerate(moved):
        n = values.size
        mean = math.fsum(values) / n
        mean += math.fsum(values - mean) / n  # one refinement: the mean to ~1 ulp
        dev = values - mean
        var = math.fsum(dev * dev) / n
        out[c] = dev / math.sqrt(var + eps)
    shape = (x.shape[axis],) + tuple(np.delete(x.shape, axis % x.ndim))
    return np.moveaxis(out.reshape(shape), 0, axis)


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def run_all(x, axis, dtype, eps=1e-5, gamma=None, beta=None, track_running_stats=True):
    """y from the layer (training mode) and from the functional API."""
    c = x.shape[axis]
    bn = bnpy.BatchNorm(c, axis=axis, dtype=dtype, eps=eps, track_running_stats=track_running_stats)
    if gamma is not None:
        bn.gamma, bn.beta = gamma, beta
    y_layer = bn(x)
    y_functional, mean, invstd = bnpy.batch_norm_forward(
        x,
        None if gamma is None else np.asarray(gamma, dtype),
        None if beta is None else np.asarray(beta, dtype),
        eps=eps,
        axis=axis,
    )
    return {"layer": y_layer, "functional": y_functional}, bn, mean, invstd


# --- large offsets ---------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_float32_mean_1e4_std_1(layout):
    shape, axis = LAYOUTS[layout]
    x = offset_data(shape, axis, [1e4, -1e4, 1e4 + 123.0], 1.0, np.float32, seed=1)
    want, want_mean, want_var = reference.forward_train(x, axis=axis)  # float64, same values
    ys, bn, mean, invstd = run_all(x, axis, np.float32)
    for name, y in ys.items():
        assert y.dtype == np.float32
        err = max_abs(y, want)
        assert err <= 2e-3, f"{name}: max |y - reference| = {err:.3g}"
    # the statistics behind it, to float32's resolution of 1e4 (~1e-3)
    assert max_abs(mean, want_mean) <= 1e-3
    np.testing.assert_allclose(invstd, 1 / np.sqrt(want_var + 1e-5), rtol=1e-4)
    np.testing.assert_allclose(bn.running_mean, 0.1 * want_mean, rtol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_float64_mean_1e8_std_1(layout):
    shape, axis = LAYOUTS[layout]
    x = offset_data(shape, axis, [1e8, -1e8, 1e8 + 0.5], 1.0, np.float64, seed=2)
    want = exact_normalized(x, axis, 1e-5)
    ys, _, _, _ = run_all(x, axis, np.float64)
    for name, y in ys.items():
        err = max_abs(y, want)
        assert err <= 1e-6, f"{name}: max |y - exact| = {err:.3g}"


def test_exact_reference_is_exact_enough():
    """The fsum reference agrees with bnpy.reference where float64 sums are
    exact (small integers), so its own error is not what the 1e-6 measures."""
    x = np.random.default_rng(3).integers(-50, 50, size=(400, 3)).astype(np.float64) + 1e8
    np.testing.assert_allclose(
        exact_normalized(x, 1, 1e-5), reference.forward_train(x, axis=1)[0], rtol=0, atol=1e-12
    )


# --- constant features ---------------------------------------------------------------

CONSTANTS = {
    np.float32: [0.0, 0.1, 1 / 3, -7.3, 1e4 + 0.1, 1e30, 3.0e38, -1e-30],
    np.float64: [0.0, 0.1, 1 / 3, -7.3, 1e8 + 0.5, 1e300, -1e-300, 2.0**52 + 1],
}


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_constant_feature_gives_exactly_beta(dtype, layout, eps):
    shape, axis = LAYOUTS[layout]
    beta = np.array([0.75, -2.5, 0.0], dtype)
    gamma = np.array([3.0, -0.5, 1e3], dtype)
    for value in CONSTANTS[dtype]:
        # features 0 and 2 constant, feature 1 random (its neighbours stay exact)
        x = offset_data(shape, axis, [0.0, 5.0, 0.0], 2.0, np.float64, seed=4)
        moved = np.moveaxis(x, axis, 0)
        moved[0] = value
        moved[2] = -value
        x = x.astype(dtype)
        ys, bn, mean, invstd = run_all(x, axis, dtype, eps=eps, gamma=gamma, beta=beta)
        for name, y in ys.items():
            y0 = np.moveaxis(y, axis, 0)
            assert np.all(y0[0] == beta[0]), (name, value, np.unique(y0[0])[:4])
            assert np.all(y0[2] == beta[2]), (name, value, np.unique(y0[2])[:4])
        assert mean[0] == dtype(value) and mean[2] == dtype(-value), value
        assert invstd[0] == invstd[2] == dtype(1 / np.sqrt(np.float64(eps))), value

        # backward: x_hat = 0 makes dgamma exactly 0, and dx finite
        dy = offset_data(shape, axis, [0.0, 0.0, 0.0], 1.0, dtype, seed=5)
        dx = bn.backward(dy)
        assert bn.grad_gamma[0] == 0 and bn.grad_gamma[2] == 0, value
        assert np.isfinite(dx).all()
        dxf, dgf, _ = bnpy.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis)
        assert dgf[0] == 0 and dgf[2] == 0 and np.isfinite(dxf).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_constant_feature_in_eval_without_running_stats(dtype):
    x = np.full((7, 2, 3), 0.1, dtype)
    x[:, 1] = np.arange(21, dtype=dtype).reshape(7, 3)
    bn = bnpy.BatchNorm(2, dtype=dtype, track_running_stats=False, eps=1e-12).eval()
    bn.beta = [1.5, 0.0]
    assert np.all(bn(x)[:, 0] == dtype(1.5))


def test_two_valued_feature_is_plus_minus_one():
    """The other side of "never +-1": two distinct values normalize to +-1
    (up to eps), a constant to exactly 0 -- the kernels do not confuse them."""
    x = np.array([[5.0, 1e4], [5.0, 1e4 + 2.0]] * 50, np.float32)
    ys, _, _, _ = run_all(x, 1, np.float32, eps=1e-12)
    for y in ys.values():
        assert np.all(y[:, 0] == 0)
        np.testing.assert_allclose(np.abs(y[:, 1]), 1.0, rtol=1e-6)


# --- huge and tiny float32 values --------------------------------------------------------

HUGE = {
    "spread-1e30": lambda rng, shape: rng.standard_normal(shape) * 1e30,
    "offset-1e30": lambda rng, shape: 1e30 + rng.standard_normal(shape) * 1e28,
    "mixed-sign-1e30": lambda rng, shape: (
        rng.choice([-1.0, 1.0], shape) * 1e30 * (1 + rng.standard_normal(shape) * 1e-3)
    ),
    "near-float32-max": lambda rng, shape: rng.uniform(-3.4e38, 3.4e38, shape),
}


@pytest.mark.parametrize("case", list(HUGE))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_float32_values_near_1e30(layout, case):
    shape, axis = LAYOUTS[layout]
    x = HUGE[case](np.random.default_rng(6), shape).astype(np.float32)
    assert np.isfinite(x).all() and np.max(np.abs(x)) > 1e29
    assert np.max(np.abs(x)) > np.sqrt(np.finfo(np.float32).max)  # squares overflow float32
    gamma, beta = np.array([1.5, -0.5, 2.0]), np.array([0.25, 1.0, -1.0])
    want, want_mean, want_var = reference.forward_train(x, gamma, beta, axis=axis)
    # the running variance (1e56 and more) has no float32 value: a layer that
    # keeps running statistics refuses the batch and changes nothing, rather
    # than hold an inf it could not save and reload (issue 25)
    tracking = bnpy.BatchNorm(C, axis=axis)
    with pytest.raises(FloatingPointError, match=r"running statistics .* float32"):
        tracking(x)
    assert tracking.num_batches_tracked == 0 and np.all(tracking.running_var == 1)
    ys, bn, mean, invstd = run_all(
        x, axis, np.float32, gamma=gamma, beta=beta, track_running_stats=False
    )
    for name, y in ys.items():
        assert np.isfinite(y).all(), name
        err = max_abs(y, want) / np.max(np.abs(want))
        assert err <= 1e-5, f"{name}: relative error {err:.3g}"
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(want_var + 1e-5), rtol=1e-6)

    dy = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    dx = bn.backward(dy)
    want_dx, want_dgamma, _want_dbeta = reference.backward(
        dy, x, want_mean, want_var, gamma, axis=axis
    )
    assert np.isfinite(dx).all() and np.isfinite(bn.grad_gamma).all()
    assert max_abs(dx, want_dx) <= 1e-5 * np.max(np.abs(want_dx))
    np.testing.assert_allclose(
        bn.grad_gamma, want_dgamma, rtol=1e-4, atol=1e-5 * np.max(np.abs(want_dgamma))
    )


def test_float32_values_near_1e30_in_eval_mode():
    x = (np.random.default_rng(8).standard_normal((50, 3)) * 1e30).astype(np.float32)
    bn = bnpy.BatchNorm(3).eval()
    bn.running_mean = [1e30, -1e30, 0.0]
    bn.running_var = [1e38, 3e38, 1e36]
    y = bn(x)
    want = reference.forward_eval(x, bn.running_mean, bn.running_var, bn.gamma, bn.beta)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6 * np.max(np.abs(want)))
    y = bnpy.batch_norm_inference(x, None, None, bn.running_mean, bn.running_var)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6 * np.max(np.abs(want)))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_float32_tiny_values_whose_squares_underflow(layout):
    """The other end: values near 1e-30 square to 1e-60, below float32's
    smallest subnormal; in double they are fine, and with an eps below that
    the features normalize to unit variance."""
    shape, axis = LAYOUTS[layout]
    x = offset_data(shape, axis, [0.0, 3e-30, -5e-30], 1e-30, np.float32, seed=9)
    want = reference.forward_train(x, eps=1e-80, axis=axis)[0]
    ys, _, _, _ = run_all(x, axis, np.float32, eps=1e-80)
    for name, y in ys.items():
        assert max_abs(y, want) <= 1e-5 * np.max(np.abs(want)), name
        np.testing.assert_allclose(
            np.moveaxis(y, axis, 0).reshape(C, -1).std(axis=1), 1.0, rtol=1e-4
        )
