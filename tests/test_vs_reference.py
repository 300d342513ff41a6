"""bnpy's C core against bnpy.reference, the float64 NumPy statement of DESIGN.md §1.

Every layout the memory model serves ([outer][C][inner] with inner = 1, inner > 1,
outer = 1), both dtypes, training and eval, every combination of affine and
track_running_stats, momentum a number and None; the layer and the functional
API; the worked examples of the course notes; inputs that are not C-contiguous,
aligned, native-order floats; ``out=``; and finite-difference gradient checks.

Tolerances. The reference computes in float64 from exactly the values bnpy sees
(float32 data, gamma and beta are converted to float64 first), so the only
differences are bnpy's own rounding:
- float64: agreement to 1e-10 relative;
- float32: agreement to 1e-5 relative. bnpy rounds its float32 results once from
  double (about 6e-8 relative), so 1e-5 leaves room for the rounding of saved
  statistics while still catching any real formula error.
"Relative" is max|actual - expected| / max|expected| over the whole array, so
that entries near zero do not make a correct result look wrong; the data keep
every feature on a comparable scale so that this cannot hide a bad feature.
"""

import zlib

import numpy as np
import pytest

import bnpy
from bnpy import reference as ref

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
TOL = {np.float32: 1e-5, np.float64: 1e-10}

# name: (shape, axis). Covers inner = 1 ((N, C), channels-last), inner > 1,
# outer = 1 (feature axis first), a middle feature axis and negative axes.
LAYOUTS = {
    "NC": ((6, 3), 1),
    "NCL": ((4, 3, 5), 1),
    "NCHW": ((3, 2, 4, 3), 1),
    "NCDHW": ((2, 3, 2, 3, 2), 1),
    "NHWC-axis-1": ((2, 3, 4, 3), -1),
    "NHCW-axis2": ((2, 3, 4, 2), 2),
    "NCHW-axis-3": ((3, 4, 2, 3), -3),
    "CN-axis0": ((3, 5), 0),
}
LAYOUT_IDS = list(LAYOUTS)


# --------------------------------------------------------------------------- helpers


def rng_for(*parts):
    """A generator seeded from the test's parameters (stable across runs)."""
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def per_feature(values, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(values).reshape(shape)


def make_x(rng, shape, axis, dtype):
    """Data with a different non-zero mean and non-unit std in every feature."""
    c = shape[axis]
    loc = per_feature(rng.uniform(-3.0, 3.0, c), len(shape), axis)
    scale = per_feature(rng.uniform(0.5, 3.0, c), len(shape), axis)
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def make_dy(rng, shape, dtype):
    return (rng.standard_normal(shape) * 1.5 + 0.3).astype(dtype)


def make_affine(rng, c, dtype):
    """Non-trivial gamma (both signs, away from 0) and beta."""
    gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.uniform(-1.0, 1.0, c)
    return gamma.astype(dtype), beta.astype(dtype)


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def rel_err(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-300)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def assert_close(actual, expected, dtype, what, tol=None):
    tol = TOL[dtype] if tol is None else tol
    assert actual is not None, f"{what} is None"
    assert np.shape(actual) == np.shape(expected), (
        f"{what}: shape {np.shape(actual)} != expected {np.shape(expected)}"
    )
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def check_param_grads(bn, dgamma, dbeta, dtype, when):
    """grad_gamma and grad_beta of the layer after a backward."""
    if bn.affine:
        assert_close(bn.grad_gamma, dgamma, dtype, f"grad_gamma ({when})")
        assert_close(bn.grad_beta, dbeta, dtype, f"grad_beta ({when})")
        assert bn.grad_gamma.dtype == dtype and bn.grad_beta.dtype == dtype
    else:
        # no parameters, no gradients: None, like the functional API's dgamma
        # and dbeta when gamma is None
        assert bn.grad_gamma is None and bn.grad_beta is None, when


def new_layer(c, dtype, axis, affine, track, momentum=0.1, eps=1e-3, rng=None):
    bn = bnpy.BatchNorm(
        c,
        eps=eps,
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
        axis=axis,
        dtype=dtype,
    )
    gamma = beta = None
    if affine:
        gamma, beta = make_affine(rng, c, dtype)
        bn.gamma[:] = gamma
        bn.beta[:] = beta
    return bn, gamma, beta


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("momentum", [0.3, None], ids=["momentum0.3", "momentumNone"])
@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_layer_train_then_eval(layout, dtype, affine, track, momentum):
    shape, axis = LAYOUTS[layout]
    c = shape[axis]
    n = int(np.prod(shape)) // c
    eps = 1e-3  # not the default, so that an ignored eps shows
    rng = rng_for("layer", layout, dtype.__name__, affine, track, momentum)
    bn, gamma, beta = new_layer(c, dtype, axis, affine, track, momentum, eps, rng)
    g64, b64 = f64(gamma), f64(beta)
    assert bn.training

    if affine:
        np.testing.assert_array_equal(bn.gamma, gamma)
        np.testing.assert_array_equal(bn.beta, beta)
    else:
        assert bn.gamma is None and bn.beta is None
    if track:
        np.testing.assert_array_equal(bn.running_mean, np.zeros(c))
        np.testing.assert_array_equal(bn.running_var, np.ones(c))
    else:
        assert bn.running_mean is None and bn.running_var is None
    assert bn.num_batches_tracked == 0

    run_mean, run_var, tracked = np.zeros(c), np.ones(c), 0
    for step in range(3):
        when = f"train step {step}"
        x = make_x(rng, shape, axis, dtype)
        dy = make_dy(rng, shape, dtype)
        x_before = x.copy()

        y = bn(x)
        assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == shape
        np.testing.assert_array_equal(x, x_before)  # the input is not modified
        y_ref, mean, var = ref.forward_train(x, g64, b64, eps, axis)
        assert_close(y, y_ref, dtype, f"y ({when})")

        if track:
            tracked += 1
            factor = 1.0 / tracked if momentum is None else momentum
            run_mean, run_var = ref.update_running(run_mean, run_var, mean, var, n, factor)
            assert bn.running_mean.dtype == dtype and bn.running_var.dtype == dtype
            assert_close(bn.running_mean, run_mean, dtype, f"running_mean ({when})")
            assert_close(bn.running_var, run_var, dtype, f"running_var ({when})")
            assert bn.num_batches_tracked == tracked
        else:
            assert bn.running_mean is None and bn.running_var is None
            assert bn.num_batches_tracked == 0

        dx = bn.backward(dy)
        assert isinstance(dx, np.ndarray) and dx.dtype == dtype and dx.shape == shape
        dx_ref, dg_ref, db_ref = ref.backward(dy, x, mean, var, g64, eps, axis, training=True)
        assert_close(dx, dx_ref, dtype, f"dx ({when})")
        check_param_grads(bn, dg_ref, db_ref, dtype, when)

    assert bn.eval() is bn
    assert not bn.training
    if track:
        held_mean, held_var = bn.running_mean.copy(), bn.running_var.copy()
    for step in range(2):
        when = f"eval step {step}"
        x = make_x(rng, shape, axis, dtype)
        dy = make_dy(rng, shape, dtype)

        y = bn(x)
        assert y.dtype == dtype and y.shape == shape
        if track:
            # normalize with the statistics the layer holds (checked above
            # against the reference's running statistics)
            mean, var = f64(bn.running_mean), f64(bn.running_var)
            y_ref = ref.forward_eval(x, mean, var, g64, b64, eps, axis)
            training_backward = False
        else:
            # no running statistics: batch statistics, as PyTorch does
            y_ref, mean, var = ref.forward_train(x, g64, b64, eps, axis)
            training_backward = True
        assert_close(y, y_ref, dtype, f"y ({when})")

        if track:  # eval mode updates nothing
            np.testing.assert_array_equal(bn.running_mean, held_mean)
            np.testing.assert_array_equal(bn.running_var, held_var)
            assert_close(bn.running_mean, run_mean, dtype, f"running_mean ({when})")
            assert_close(bn.running_var, run_var, dtype, f"running_var ({when})")
            assert bn.num_batches_tracked == tracked
        else:
            assert bn.running_mean is None and bn.num_batches_tracked == 0

        dx = bn.backward(dy)
        assert dx.dtype == dtype and dx.shape == shape
        dx_ref, dg_ref, db_ref = ref.backward(
            dy, x, mean, var, g64, eps, axis, training=training_backward
        )
        assert_close(dx, dx_ref, dtype, f"dx ({when})")
        check_param_grads(bn, dg_ref, db_ref, dtype, when)


@pytest.mark.parametrize("momentum", [0.0, 1.0], ids=["momentum0", "momentum1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_momentum_extremes(dtype, momentum):
    """momentum 0 keeps the initial statistics; 1 keeps only the last batch."""
    shape, axis = LAYOUTS["NCL"]
    c = shape[axis]
    n = int(np.prod(shape)) // c
    rng = rng_for("extremes", dtype.__name__, momentum)
    bn = bnpy.BatchNorm(c, momentum=momentum, dtype=dtype)
    for _ in range(2):
        x = make_x(rng, shape, axis, dtype)
        bn(x)
    _, mean, var = ref.forward_train(x, axis=axis)
    if momentum == 0.0:
        np.testing.assert_array_equal(bn.running_mean, np.zeros(c))
        np.testing.assert_array_equal(bn.running_var, np.ones(c))
    else:
        assert_close(bn.running_mean, mean, dtype, "running_mean")
        assert_close(bn.running_var, var * n / (n - 1), dtype, "running_var")
    assert bn.num_batches_tracked == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_defaults_match_reference(dtype):
    """BatchNorm(C) is eps=1e-5, momentum=0.1, affine, tracked, axis=1."""
    shape, axis = (5, 3, 4), 1
    c = shape[axis]
    n = int(np.prod(shape)) // c
    rng = rng_for("defaults", dtype.__name__)
    bn = bnpy.BatchNorm(c, dtype=dtype)
    assert bn.dtype == dtype and bn.axis == 1 and bn.affine and bn.track_running_stats
    # small variances make eps visible in float32 too
    x = (make_x(rng, shape, axis, np.float64) * 1e-2).astype(dtype)
    y = bn(x)
    y_ref, mean, var = ref.forward_train(x, np.ones(c), np.zeros(c), 1e-5, axis)
    assert_close(y, y_ref, dtype, "y")
    rm, rv = ref.update_running(np.zeros(c), np.ones(c), mean, var, n, 0.1)
    assert_close(bn.running_mean, rm, dtype, "running_mean")
    assert_close(bn.running_var, rv, dtype, "running_var")


def test_layer_default_dtype_is_float32():
    bn = bnpy.BatchNorm(2)
    y = bn(np.arange(8.0).reshape(4, 2))
    assert y.dtype == np.float32
    assert bn.gamma.dtype == np.float32 and bn.running_var.dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_common_offset(dtype):
    """A large offset must not cancel the variance (no E[x^2] - E[x]^2)."""
    shape, axis = (16, 3), 1
    rng = rng_for("offset", dtype.__name__)
    offset = 1e5
    x = (rng.standard_normal(shape) + offset).astype(dtype)
    bn = bnpy.BatchNorm(3, dtype=dtype, track_running_stats=False)
    y = bn(x)
    y_ref, _, var = ref.forward_train(x, np.ones(3), np.zeros(3), 1e-5, axis)
    assert_close(y, y_ref, dtype, "y")
    _, _, invstd = bnpy.batch_norm_forward(x, None, None, eps=1e-5, axis=axis)
    assert_close(invstd, 1.0 / np.sqrt(var + 1e-5), dtype, "invstd")


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_is_for_the_last_forward(dtype):
    """Switching mode between forward and backward does not change the gradient,
    and a second backward for one forward gives the same result."""
    shape, axis = LAYOUTS["NCHW"]
    c = shape[axis]
    rng = rng_for("last-forward", dtype.__name__)
    bn, gamma, _ = new_layer(c, dtype, axis, True, True, rng=rng)
    x = make_x(rng, shape, axis, dtype)
    dy = make_dy(rng, shape, dtype)
    bn(x)
    bn.eval()
    dx = bn.backward(dy)
    _, mean, var = ref.forward_train(x, axis=axis)
    dx_ref, dg_ref, db_ref = ref.backward(dy, x, mean, var, f64(gamma), 1e-3, axis, True)
    assert_close(dx, dx_ref, dtype, "dx (train forward, backward after eval())")
    check_param_grads(bn, dg_ref, db_ref, dtype, "backward after eval()")
    dx2 = bn.backward(dy)
    np.testing.assert_array_equal(dx2, dx)

    # and the other way round: an eval forward, then train()
    x = make_x(rng, shape, axis, dtype)
    bn(x)
    rm, rv = f64(bn.running_mean), f64(bn.running_var)
    bn.train()
    dx = bn.backward(dy)
    dx_ref, dg_ref, db_ref = ref.backward(dy, x, rm, rv, f64(gamma), 1e-3, axis, False)
    assert_close(dx, dx_ref, dtype, "dx (eval forward, backward after train())")
    check_param_grads(bn, dg_ref, db_ref, dtype, "backward after train()")


# --------------------------------------------------------------------------- functional API


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_functional_matches_reference(layout, dtype, affine):
    shape, axis = LAYOUTS[layout]
    c = shape[axis]
    eps = 1e-3
    rng = rng_for("functional", layout, dtype.__name__, affine)
    x = make_x(rng, shape, axis, dtype)
    dy = make_dy(rng, shape, dtype)
    gamma, beta = make_affine(rng, c, dtype) if affine else (None, None)
    g64, b64 = f64(gamma), f64(beta)

    # training: batch statistics
    y, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta, eps=eps, axis=axis)
    y_ref, mean_ref, var_ref = ref.forward_train(x, g64, b64, eps, axis)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, y_ref, dtype, "y (batch_norm_forward)")
    assert_close(mean, mean_ref, dtype, "mean")
    assert_close(invstd, 1.0 / np.sqrt(var_ref + eps), dtype, "invstd")

    dx, dgamma, dbeta = bnpy.batch_norm_backward(
        dy, x, gamma, mean, invstd, axis=axis, training=True
    )
    dx_ref, dg_ref, db_ref = ref.backward(dy, x, mean_ref, var_ref, g64, eps, axis, True)
    assert dx.dtype == dtype and dx.shape == shape
    assert_close(dx, dx_ref, dtype, "dx (training)")
    if affine:
        assert_close(dgamma, dg_ref, dtype, "dgamma (training)")
        assert_close(dbeta, db_ref, dtype, "dbeta (training)")
    else:
        assert dgamma is None and dbeta is None

    # inference: given statistics, which are constants for the backward
    run_mean = rng.uniform(-2.0, 2.0, c).astype(dtype)
    run_var = rng.uniform(0.5, 4.0, c).astype(dtype)
    y = bnpy.batch_norm_inference(x, gamma, beta, run_mean, run_var, eps=eps, axis=axis)
    y_ref = ref.forward_eval(x, f64(run_mean), f64(run_var), g64, b64, eps, axis)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, y_ref, dtype, "y (batch_norm_inference)")

    run_invstd = (1.0 / np.sqrt(f64(run_var) + eps)).astype(dtype)
    dx, dgamma, dbeta = bnpy.batch_norm_backward(
        dy, x, gamma, run_mean, run_invstd, axis=axis, training=False
    )
    dx_ref, dg_ref, db_ref = ref.backward(dy, x, f64(run_mean), f64(run_var), g64, eps, axis, False)
    assert_close(dx, dx_ref, dtype, "dx (training=False)")
    if affine:
        assert_close(dgamma, dg_ref, dtype, "dgamma (training=False)")
        assert_close(dbeta, db_ref, dtype, "dbeta (training=False)")
    else:
        assert dgamma is None and dbeta is None


def test_functional_default_eps_and_axis():
    rng = rng_for("functional-defaults")
    x = make_x(rng, (6, 3, 2), 1, np.float64) * 1e-2  # eps matters at this scale
    y, _, invstd = bnpy.batch_norm_forward(x, None, None)
    y_ref, _, var = ref.forward_train(x, eps=1e-5, axis=1)
    assert_close(y, y_ref, np.float64, "y")
    assert_close(invstd, 1.0 / np.sqrt(var + 1e-5), np.float64, "invstd")
    rm, rv = np.array([0.1, -0.2, 0.3]), np.array([1e-4, 2e-4, 5e-5])
    y = bnpy.batch_norm_inference(x, None, None, rm, rv)
    assert_close(y, ref.forward_eval(x, rm, rv, eps=1e-5, axis=1), np.float64, "y (inference)")


# --------------------------------------------------------------------------- DESIGN.md §1 worked examples


def _worked_example_bounds(dtype, gamma, beta):
    """Rounding slack of one y = (x - m) * s + b computed in double, then stored."""
    ideal_max = abs(beta) + np.sqrt(2.0) * abs(gamma)
    unit = np.finfo(dtype).eps
    return 8 * unit * ideal_max


@pytest.mark.parametrize("dtype", DTYPES)
def test_worked_example_2_0_2_4(dtype):
    eps = 1e-5
    gamma, beta = 1.5, -0.25  # exact in float32
    bn = bnpy.BatchNorm(1, eps=eps, dtype=dtype)
    bn.gamma[:] = gamma
    bn.beta[:] = beta
    x = np.array([2.0, 0.0, 2.0, 4.0], dtype=dtype).reshape(4, 1)
    y = bn(x)
    r2 = np.sqrt(2.0)
    ideal = np.array([beta, beta - r2 * gamma, beta, beta + r2 * gamma]).reshape(4, 1)
    rounding = _worked_example_bounds(dtype, gamma, beta)
    # exactly, x_hat = ±2 / sqrt(2 + eps) = ±√2 / sqrt(1 + eps/2), and
    # 0 <= 1 - 1/sqrt(1 + t) <= t/2, so |y - ideal| <= |gamma| √2 eps/4.
    eps_effect = abs(gamma) * r2 * eps / 4
    assert np.max(np.abs(y - ideal)) <= eps_effect + rounding
    exact = beta + gamma * (np.array([2.0, 0.0, 2.0, 4.0]) - 2.0) / np.sqrt(2.0 + eps)
    assert np.max(np.abs(y.ravel() - exact)) <= rounding
    # mean 2, biased variance 2 (unbiased 8/3 into the running variance)
    np.testing.assert_allclose(bn.running_mean, [0.1 * 2.0], rtol=TOL[dtype])
    np.testing.assert_allclose(bn.running_var, [0.9 + 0.1 * 8.0 / 3.0], rtol=TOL[dtype])
    _, mean, invstd = bnpy.batch_norm_forward(x, None, None, eps=eps)
    np.testing.assert_allclose(mean, [2.0], rtol=TOL[dtype])
    np.testing.assert_allclose(invstd, [1.0 / np.sqrt(2.0 + eps)], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_worked_example_scaled_by_100(dtype):
    """[200, 0, 200, 400] gives the y of [2, 0, 2, 4], up to eps."""
    eps = 1e-5
    gamma, beta = 1.5, -0.25
    r2 = np.sqrt(2.0)
    ideal = np.array([beta, beta - r2 * gamma, beta, beta + r2 * gamma]).reshape(4, 1)
    rounding = _worked_example_bounds(dtype, gamma, beta)
    ys = []
    for scale in (1.0, 100.0):
        bn = bnpy.BatchNorm(1, eps=eps, dtype=dtype)
        bn.gamma[:] = gamma
        bn.beta[:] = beta
        ys.append(bn(scale * np.array([2.0, 0.0, 2.0, 4.0], dtype=dtype).reshape(4, 1)))
    y1, y100 = ys
    # variance 2e4: x_hat = ±√2 / sqrt(1 + eps/2e4), so eps barely matters ...
    assert np.max(np.abs(y100 - ideal)) <= abs(gamma) * r2 * eps / (4 * 1e4) + rounding
    # ... and the two differ by at most the eps effect on the small batch
    assert np.max(np.abs(y100 - y1)) <= abs(gamma) * r2 * eps / 4 + 2 * rounding


# --------------------------------------------------------------------------- unusual inputs


def _variants(x):
    """Arrays with x's values but another memory layout or representation."""
    out = {}
    out["transposed"] = np.ascontiguousarray(x.swapaxes(0, -1)).swapaxes(0, -1)
    big = np.zeros((2 * x.shape[0],) + x.shape[1:-1] + (3 * x.shape[-1],), dtype=x.dtype)
    big[::2, ..., ::3] = x
    out["strided"] = big[::2, ..., ::3]
    out["fortran"] = np.asfortranarray(x)
    out["reversed"] = np.ascontiguousarray(x[::-1, ..., ::-1])[::-1, ..., ::-1]
    out["byteswapped"] = x.astype(x.dtype.newbyteorder())
    buf = np.zeros(x.nbytes + 1, dtype=np.uint8)
    unaligned = np.ndarray(x.shape, dtype=x.dtype, buffer=buf, offset=1)
    unaligned[...] = x
    out["unaligned"] = unaligned
    for name, v in out.items():
        np.testing.assert_array_equal(v, x)
        assert not v.flags.c_contiguous or name in ("byteswapped", "unaligned"), name
    assert not out["unaligned"].flags.aligned
    assert not out["byteswapped"].dtype.isnative
    return out


VARIANTS = ["transposed", "strided", "fortran", "reversed", "byteswapped", "unaligned"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unusual_memory_layouts(dtype, variant):
    shape, axis = (3, 4, 2, 5), 1
    c = shape[axis]
    rng = rng_for("variants", dtype.__name__, variant)
    x0 = make_x(rng, shape, axis, dtype)
    dy0 = make_dy(rng, shape, dtype)
    x = _variants(x0)[variant]
    dy = _variants(dy0)[variant]
    x_copy = x.copy()

    bn, gamma, beta = new_layer(c, dtype, axis, True, True, rng=rng)
    y = bn(x)
    y_ref, mean, var = ref.forward_train(x0, f64(gamma), f64(beta), 1e-3, axis)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, y_ref, dtype, f"y ({variant} x)")
    assert_close(bn.running_mean, 0.1 * mean, dtype, "running_mean")
    dx = bn.backward(dy)
    dx_ref, dg_ref, db_ref = ref.backward(dy0, x0, mean, var, f64(gamma), 1e-3, axis, True)
    assert_close(dx, dx_ref, dtype, f"dx ({variant} x and dy)")
    check_param_grads(bn, dg_ref, db_ref, dtype, variant)
    np.testing.assert_array_equal(x, x_copy)

    yf, m, invstd = bnpy.batch_norm_forward(x, gamma, beta, eps=1e-3, axis=axis)
    assert_close(yf, y_ref, dtype, f"y (functional, {variant} x)")
    dxf, dgf, dbf = bnpy.batch_norm_backward(dy, x, gamma, m, invstd, axis=axis)
    assert_close(dxf, dx_ref, dtype, f"dx (functional, {variant})")
    assert_close(dgf, dg_ref, dtype, f"dgamma (functional, {variant})")
    assert_close(dbf, db_ref, dtype, f"dbeta (functional, {variant})")


@pytest.mark.parametrize("layout", ["NHWC-axis-1", "NHCW-axis2"])
def test_channels_last_view_of_channels_first(layout):
    """A transposed view whose feature axis is not axis 1."""
    shape, axis = LAYOUTS[layout]
    c = shape[axis]
    rng = rng_for("view", layout)
    x0 = make_x(rng, shape, axis, np.float64)
    perm = list(range(len(shape)))
    perm[1], perm[axis % len(shape)] = perm[axis % len(shape)], perm[1]
    x = np.ascontiguousarray(x0.transpose(perm)).transpose(perm)  # channels-first memory
    assert not x.flags.c_contiguous
    bn = bnpy.BatchNorm(c, axis=axis, dtype=np.float64)
    y = bn(x)
    assert_close(y, ref.forward_train(x0, np.ones(c), np.zeros(c), 1e-5, axis)[0], np.float64, "y")


@pytest.mark.parametrize("itype", [np.int64, np.int32, np.uint8, np.int16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_inputs_are_converted(dtype, itype):
    shape, axis = (5, 3, 2), 1
    c = shape[axis]
    rng = rng_for("int", dtype.__name__, itype.__name__)
    x = rng.integers(0, 50, size=shape).astype(itype)
    dy = make_dy(rng, shape, dtype)
    bn, gamma, beta = new_layer(c, dtype, axis, True, True, rng=rng)
    y = bn(x)
    assert y.dtype == dtype
    y_ref, mean, var = ref.forward_train(x.astype(np.float64), f64(gamma), f64(beta), 1e-3, axis)
    assert_close(y, y_ref, dtype, "y (integer x)")
    assert_close(bn.running_mean, 0.1 * mean, dtype, "running_mean (integer x)")
    dx = bn.backward(dy)
    dx_ref, _, _ = ref.backward(dy, x, mean, var, f64(gamma), 1e-3, axis, True)
    assert_close(dx, dx_ref, dtype, "dx (integer x)")

    # the functional API computes integer inputs in float64
    yf, m, invstd = bnpy.batch_norm_forward(x, None, None, eps=1e-3, axis=axis)
    assert yf.dtype == np.float64
    assert_close(yf, ref.forward_train(x, eps=1e-3, axis=axis)[0], np.float64, "y (functional)")
    yi = bnpy.batch_norm_inference(x, None, None, m, 1.0 / invstd**2 - 1e-3, eps=1e-3, axis=axis)
    assert yi.dtype == np.float64
    assert_close(yi, yf, np.float64, "y (functional inference, integer x)", tol=1e-9)


def test_nested_list_input():
    x = [[2, 1.5], [0, -1.0], [2, 4.5], [4, 0.0]]
    bn = bnpy.BatchNorm(2, dtype=np.float64)
    y = bn(x)
    assert isinstance(y, np.ndarray) and y.shape == (4, 2) and y.dtype == np.float64
    assert_close(y, ref.forward_train(np.array(x), np.ones(2), np.zeros(2))[0], np.float64, "y")


# --------------------------------------------------------------------------- out=


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_argument(dtype):
    shape, axis = LAYOUTS["NCHW"]
    c = shape[axis]
    rng = rng_for("out", dtype.__name__)
    bn, gamma, beta = new_layer(c, dtype, axis, True, True, rng=rng)
    g64, b64 = f64(gamma), f64(beta)
    x = make_x(rng, shape, axis, dtype)
    dy = make_dy(rng, shape, dtype)

    out = np.full(shape, np.nan, dtype=dtype)
    y = bn.forward(x, out=out)
    assert y is out
    y_ref, mean, var = ref.forward_train(x, g64, b64, 1e-3, axis)
    assert_close(out, y_ref, dtype, "y written to out")

    dx_out = np.full(shape, np.nan, dtype=dtype)
    dx = bn.backward(dy, out=dx_out)
    assert dx is dx_out
    dx_ref, _, _ = ref.backward(dy, x, mean, var, g64, 1e-3, axis, True)
    assert_close(dx_out, dx_ref, dtype, "dx written to out")

    bn.eval()
    y = bn.forward(x, out=out)
    assert y is out
    assert_close(
        out,
        ref.forward_eval(x, f64(bn.running_mean), f64(bn.running_var), g64, b64, 1e-3, axis),
        dtype,
        "y (eval) written to out",
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_may_be_the_input(dtype):
    """forward(x, out=x) normalizes in place; backward still sees the original x."""
    shape, axis = LAYOUTS["NCL"]
    c = shape[axis]
    rng = rng_for("inplace", dtype.__name__)
    bn, gamma, beta = new_layer(c, dtype, axis, True, True, rng=rng)
    x = make_x(rng, shape, axis, dtype)
    x0 = x.copy()
    dy = make_dy(rng, shape, dtype)
    y = bn.forward(x, out=x)
    assert y is x
    y_ref, mean, var = ref.forward_train(x0, f64(gamma), f64(beta), 1e-3, axis)
    assert_close(x, y_ref, dtype, "y in place")
    dx = bn.backward(dy)
    dx_ref, dg_ref, db_ref = ref.backward(dy, x0, mean, var, f64(gamma), 1e-3, axis, True)
    assert_close(dx, dx_ref, dtype, "dx after an in-place forward")
    check_param_grads(bn, dg_ref, db_ref, dtype, "after an in-place forward")


def _bad_outs(shape, dtype):
    other = np.float64 if dtype is np.float32 else np.float32
    readonly = np.zeros(shape, dtype=dtype)
    readonly.flags.writeable = False
    return {
        "wrong dtype": np.zeros(shape, dtype=other),
        "wrong shape": np.zeros((shape[0] + 1,) + shape[1:], dtype=dtype),
        "flat": np.zeros(int(np.prod(shape)), dtype=dtype),
        "not contiguous": np.zeros((2 * shape[0],) + shape[1:], dtype=dtype)[::2],
        "read-only": readonly,
        "list": np.zeros(shape, dtype=dtype).tolist(),
    }


@pytest.mark.parametrize(
    "bad", ["wrong dtype", "wrong shape", "flat", "not contiguous", "read-only", "list"]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_out_raises_and_changes_nothing(dtype, bad):
    shape, axis = LAYOUTS["NCL"]
    c = shape[axis]
    rng = rng_for("bad-out", dtype.__name__, bad)
    bn, _gamma, _ = new_layer(c, dtype, axis, True, True, rng=rng)
    x = make_x(rng, shape, axis, dtype)
    dy = make_dy(rng, shape, dtype)
    bn(x)
    state = bn.state_dict()
    dx_before = bn.backward(dy).copy()

    out = _bad_outs(shape, dtype)[bad]
    with pytest.raises((ValueError, TypeError)):
        bn.forward(make_x(rng, shape, axis, dtype), out=out)
    with pytest.raises((ValueError, TypeError)):
        bn.backward(dy, out=out)
    after = bn.state_dict()
    assert after.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(after[key], state[key], err_msg=key)
    np.testing.assert_array_equal(bn.backward(dy), dx_before)


# --------------------------------------------------------------------------- finite differences

FD_STEP = 1e-5
FD_TOL = 1e-7
FD_LAYOUTS = ["NC", "NCHW", "NHWC-axis-1"]
FD_SHAPES = {"NC": ((5, 3), 1), "NCHW": ((2, 3, 2, 2), 1), "NHWC-axis-1": ((2, 2, 2, 3), -1)}


def central_difference(loss, values, h=FD_STEP):
    """d loss / d values by central differences, perturbing values in place."""
    grad = np.zeros(values.shape)
    for idx in np.ndindex(values.shape):
        saved = values[idx]
        values[idx] = saved + h
        up = loss()
        values[idx] = saved - h
        down = loss()
        values[idx] = saved
        grad[idx] = (up - down) / (2.0 * h)
    return grad


def fd_error(numeric, analytic):
    """Largest difference relative to the largest gradient entry."""
    numeric, analytic = np.asarray(numeric), np.asarray(analytic, dtype=np.float64)
    scale = max(np.max(np.abs(numeric)), np.max(np.abs(analytic)), 1e-300)
    return float(np.max(np.abs(numeric - analytic))) / scale


def assert_fd(numeric, analytic, what):
    assert analytic is not None, what
    assert np.shape(analytic) == numeric.shape, what
    assert np.max(np.abs(numeric)) > 1e-3, f"{what}: degenerate check, gradient ~ 0"
    err = fd_error(numeric, analytic)
    assert err < FD_TOL, f"{what}: finite-difference relative error {err:.3g} >= {FD_TOL:g}"


@pytest.mark.parametrize("mode", ["train", "eval", "eval-untracked"])
@pytest.mark.parametrize("layout", FD_LAYOUTS)
def test_layer_gradients_by_finite_differences(layout, mode):
    shape, axis = FD_SHAPES[layout]
    c = shape[axis]
    rng = rng_for("fd-layer", layout, mode)
    track = mode == "eval"
    bn, _, _ = new_layer(c, np.float64, axis, True, track, rng=rng)
    if mode == "eval":
        for _ in range(2):  # non-trivial running statistics
            bn(make_x(rng, shape, axis, np.float64))
    if mode != "train":
        bn.eval()
    x = make_x(rng, shape, axis, np.float64)
    weights = make_dy(rng, shape, np.float64)
    state = bn.state_dict()

    bn(x)
    dx = bn.backward(weights)
    dgamma, dbeta = bn.grad_gamma.copy(), bn.grad_beta.copy()

    def loss():
        return float(np.sum(weights * bn(x)))

    assert_fd(central_difference(loss, x), dx, f"dx ({mode})")
    assert_fd(central_difference(loss, bn.gamma), dgamma, f"dgamma ({mode})")
    assert_fd(central_difference(loss, bn.beta), dbeta, f"dbeta ({mode})")
    # the checks did not disturb the layer
    after = bn.state_dict()
    for key in state:
        np.testing.assert_array_equal(after[key], state[key], err_msg=key)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("layout", FD_LAYOUTS)
def test_functional_gradients_by_finite_differences(layout, training):
    shape, axis = FD_SHAPES[layout]
    c = shape[axis]
    eps = 1e-3
    rng = rng_for("fd-functional", layout, training)
    x = make_x(rng, shape, axis, np.float64)
    weights = make_dy(rng, shape, np.float64)
    gamma, beta = make_affine(rng, c, np.float64)
    run_mean = rng.uniform(-2.0, 2.0, c)
    run_var = rng.uniform(0.5, 4.0, c)

    if training:

        def loss():
            return float(
                np.sum(weights * bnpy.batch_norm_forward(x, gamma, beta, eps=eps, axis=axis)[0])
            )

        _, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta, eps=eps, axis=axis)
    else:

        def loss():
            return float(
                np.sum(
                    weights
                    * bnpy.batch_norm_inference(
                        x, gamma, beta, run_mean, run_var, eps=eps, axis=axis
                    )
                )
            )

        mean, invstd = run_mean, 1.0 / np.sqrt(run_var + eps)
    dx, dgamma, dbeta = bnpy.batch_norm_backward(
        weights, x, gamma, mean, invstd, axis=axis, training=training
    )
    assert_fd(central_difference(loss, x), dx, "dx")
    assert_fd(central_difference(loss, gamma), dgamma, "dgamma")
    assert_fd(central_difference(loss, beta), dbeta, "dbeta")
