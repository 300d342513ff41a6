"""bnpy.LayerNorm, RMSNorm, GroupNorm and InstanceNorm, and their functional
forms (bnpy/family.py on the core's row kernels).

- Against PyTorch (torch.nn.LayerNorm, RMSNorm, GroupNorm, InstanceNorm1d/2d/3d
  in float64, on the very values bnpy gets): y, dx, the gradients of gamma and
  beta, InstanceNorm's running statistics over training and eval steps. Shapes
  with rows of 1, 5, 17 and 37 values, rows longer than 2048 and 4096 values,
  2-D to 5-D inputs, several normalized axes, channels-last (axis=-1, compared
  with PyTorch on the moved axis), without gamma or beta.
- Exactness: float64 against rationals (tests/family_spec.py's exact_rows)
  to a few ulps; data offset by 1e8; constant rows.
- Gradients by finite differences (bnpy.gradcheck).
- Bitwise the same results at one and two threads and in every CPU build.
- Bad input: a TypeError, ValueError or RuntimeError that says what is wrong,
  and the layer exactly as before (state, gradients, what backward uses).
- out=, state_dict/load_state_dict, pickle and deepcopy, repr, train/eval,
  empty batches.

Tolerances (assert_close): max|bnpy - reference| <= TOL * scale, where scale is
the larger of max|reference| and the magnitude of the terms whose rounding the
result carries (dx = invstd * (gamma*dy - ...) can be far smaller than
gamma*dy*invstd, and PyTorch's rounding of those terms is not bnpy's error).
float64: 1e-10; float32 (bnpy rounds once to float32 from double): 2e-6.
"""

import copy
import functools
import math
import pickle
import re
import zlib
from fractions import Fraction

import numpy as np
import pytest
from bitwise import bits
from family_spec import Spec, exact_rows, torch_step

import bnpy
from bnpy._core import IncompatibleKeys
from bnpy.gradcheck import check_layer, gradcheck

TOL = {np.float32: 2e-6, np.float64: 1e-10}
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
EPS = 1e-5
ULP = 2.0**-52


def seed_of(*parts):
    """a seed of its own for every test case, stable across runs"""
    return zlib.crc32(" ".join(map(str, parts)).encode())


def data(rng, shape, dtype):
    """x whose samples each have a scale and an offset of their own, and dy
    with an offset (so that sums of dy are not small by chance)"""
    lead = (shape[0],) + (1,) * (len(shape) - 1)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, lead) + rng.uniform(-3, 3, lead)
    dy = rng.standard_normal(shape) * 1.5 + 0.3
    return x.astype(dtype), dy.astype(dtype)


def randomize(layer, rng):
    """gamma and beta (where the layer has them) away from 1 and 0"""
    if layer.gamma is not None:
        layer.gamma = rng.normal(1.0, 0.5, layer.gamma.shape)
    if layer.beta is not None:
        layer.beta = rng.normal(0.0, 1.0, layer.beta.shape)
    return layer


def assert_close(actual, expected, dtype, what, scale=0.0):
    """max|actual - expected| <= TOL[dtype] * max(max|expected|, scale)"""
    if expected is None:
        assert actual is None, f"{what}: bnpy gave {actual!r}, the reference None"
        return
    assert actual is not None, f"{what}: bnpy gave None"
    assert np.shape(actual) == np.shape(expected), f"{what}: shape {np.shape(actual)}"
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.isfinite(actual).all(), f"{what}: not finite"
    scale = max(float(np.max(np.abs(expected), initial=0.0)), scale, 1e-300)
    err = float(np.max(np.abs(actual - expected), initial=0.0)) / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


def scales(spec, x, dy, gamma, eps, running=None):
    """The magnitudes rounding errors scale with (see the module docstring):
    y, dx, dgamma, dbeta. running: InstanceNorm's (mean, var) in eval mode."""
    rows, index = spec.rows(x)
    dyr, _ = spec.rows(dy)
    if running is not None:
        mean = np.asarray(running[0], np.float64)[index[:, :1]]
        var = np.asarray(running[1], np.float64)[index[:, :1]]
    elif spec.centered:
        mean = rows.mean(axis=1, keepdims=True)
        var = rows.var(axis=1, keepdims=True)
    else:
        mean, var = 0.0, np.mean(rows**2, axis=1, keepdims=True)
    invstd = 1 / np.sqrt(var + eps)
    xhat = (rows - mean) * invstd
    g = 1.0 if gamma is None else np.asarray(gamma, np.float64).reshape(-1)[index]
    per_param = index.reshape(-1)
    return dict(
        y=float(np.max(np.abs(g) * np.maximum(np.abs(xhat), 1.0))),
        dx=float(np.max(np.abs(g * dyr) * invstd)),
        dgamma=float(
            np.bincount(per_param, (np.abs(dyr) * np.maximum(np.abs(xhat), 1.0)).reshape(-1)).max()
        ),
        dbeta=float(np.bincount(per_param, np.abs(dyr).reshape(-1)).max()),
    )


def copy_params(torch, module, layer):
    with torch.no_grad():
        for name, value in (("weight", layer.gamma), ("bias", layer.beta)):
            if value is not None:
                getattr(module, name).copy_(torch.from_numpy(value.astype(np.float64)))


# ---- against PyTorch ------------------------------------------------------------

TORCH_SPECS = [
    # layer norm: rows of 1, 5, 17, 37, > 2048, > 4096 values; 2-D to 5-D; 1 to 3 axes
    Spec("layer", (4, 1), 1),
    Spec("layer", (6, 5), 5),
    Spec("layer", (2, 3, 17), 17),
    Spec("layer", (3, 37), 37, bias=False),
    Spec("layer", (70, 37), 37),  # more rows than the backward's 32 blocks
    Spec("layer", (2, 2, 2100), 2100),
    Spec("layer", (2, 4100), 4100),
    Spec("layer", (2, 3, 4, 5), (4, 5)),
    Spec("layer", (2, 3, 4, 5, 2), (4, 5, 2), affine=False),
    Spec("layer", (3, 17), 17, affine=False),
    # RMS norm
    Spec("rms", (4, 1), 1),
    Spec("rms", (3, 5), 5),
    Spec("rms", (2, 3, 17), 17),
    Spec("rms", (70, 37), 37),
    Spec("rms", (2, 4100), 4100),
    Spec("rms", (2, 3, 4, 5), (4, 5)),
    Spec("rms", (3, 37), 37, affine=False),
    # group norm: (N, C) to 5-D, rows of 1, long rows, channels-last, a middle axis
    Spec("group", (5, 6), 3),
    Spec("group", (5, 6), 6),  # rows of one value
    Spec("group", (4, 6), 1),
    Spec("group", (3, 6, 5), 2),
    Spec("group", (3, 6, 5), 3, affine=False),
    Spec("group", (2, 4, 17, 3), 4),
    Spec("group", (2, 3, 5, 4, 3), 3),
    Spec("group", (40, 8, 5), 4),  # 160 rows
    Spec("group", (2, 4, 1100), 2),  # rows of 2200
    Spec("group", (2, 2, 2100), 1),  # rows of 4200
    Spec("group", (2, 5, 6), 3, axis=-1),
    Spec("group", (2, 7, 3, 6), 3, axis=-1),
    Spec("group", (2, 3, 2, 4, 6), 2, axis=-1, affine=False),
    Spec("group", (2, 3, 6, 4), 3, axis=2),
    # instance norm: InstanceNorm1d/2d/3d, tracked or not, channels-last
    Spec("instance", (3, 4, 5), affine=False, track=True),
    Spec("instance", (3, 4, 5), affine=True, track=True),
    Spec("instance", (2, 3, 17), affine=True),
    Spec("instance", (2, 3, 4, 5), affine=True, track=True),
    Spec("instance", (2, 3, 2, 3, 4), affine=True, track=True, momentum=1.0),
    Spec("instance", (2, 3, 2, 3, 4), affine=False),
    Spec("instance", (2, 5, 3), axis=-1, affine=True, track=True),
    Spec("instance", (2, 4, 5, 3), axis=-1, affine=False, track=True),
    Spec("instance", (2, 3, 4, 2, 3), axis=-1, affine=True),
    Spec("instance", (2, 2, 2100), affine=True, track=True),
    Spec("instance", (2, 2, 4100), affine=True, track=True, momentum=0.5),
]

# training steps, eval steps, training again
MODES = [True, True, True, False, False, True]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", TORCH_SPECS, ids=str)
def test_layer_against_torch(torch, spec, dtype):
    rng = np.random.default_rng(seed_of(spec, dtype.__name__))
    layer = randomize(spec.layer(dtype), rng)
    module = spec.torch_module(torch, layer.eps)
    copy_params(torch, module, layer)
    trained = 0
    for step, training in enumerate(MODES):
        assert layer.train(training) is layer
        module.train(training)
        x, dy = data(rng, spec.shape, dtype)
        running = None
        if not training and spec.track:
            running = (layer.running_mean.copy(), layer.running_var.copy())
        y = layer(x)
        dx = layer.backward(dy)
        want = torch_step(torch, spec, module, x, dy)
        trained += training
        s = scales(spec, x, dy, layer.gamma, layer.eps, running)
        where = f"step {step} ({'train' if training else 'eval'})"
        assert y.dtype == dtype and dx.dtype == dtype
        assert_close(y, want[0], dtype, f"y, {where}", s["y"])
        assert_close(dx, want[1], dtype, f"dx, {where}", s["dx"])
        assert_close(layer.grad_gamma, want[2], dtype, f"dgamma, {where}", s["dgamma"])
        assert_close(layer.grad_beta, want[3], dtype, f"dbeta, {where}", s["dbeta"])
        if spec.track:
            assert_close(layer.running_mean, module.running_mean, dtype, f"running_mean, {where}")
            assert_close(layer.running_var, module.running_var, dtype, f"running_var, {where}")
            assert layer.num_batches_tracked == trained


def test_rms_norm_eps_none_is_the_dtypes_machine_epsilon(torch):
    """RMSNorm(eps=None), as PyTorch's: eps is finfo(dtype).eps"""
    assert bnpy.RMSNorm(4, dtype=np.float32).eps == np.finfo(np.float32).eps
    assert bnpy.RMSNorm(4, dtype=np.float64).eps == np.finfo(np.float64).eps
    spec = Spec("rms", (3, 4), 4)
    x, dy = data(np.random.default_rng(1), spec.shape, np.float64)
    x[0] = 1e-9  # a row whose mean square is below the default 1e-5: eps shows
    layer = bnpy.RMSNorm(4, dtype=np.float64)
    module = spec.torch_module(torch, None)
    want = torch_step(torch, spec, module, x, dy)
    s = scales(spec, x, dy, None, np.finfo(np.float64).eps)
    assert_close(layer(x), want[0], np.float64, "y", s["y"])
    assert_close(layer.backward(dy), want[1], np.float64, "dx", s["dx"])
    assert_close(layer.grad_gamma, want[2], np.float64, "dgamma", s["dgamma"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_instance_norm_momentum_none_is_a_cumulative_average(dtype, axis):
    """momentum=None: the running statistics are the plain average over all
    training forwards so far of the batch's mean of each instance's mean and
    unbiased variance (PyTorch's InstanceNorm has no cumulative average, so
    the reference is NumPy's); eval mode then normalizes with them."""
    rng = np.random.default_rng(seed_of("cumulative", axis, dtype.__name__))
    shape = (3, 7, 3) if axis == -1 else (3, 3, 7)
    spec = Spec("instance", shape, axis=axis, affine=False, track=True, momentum=None)
    layer = spec.layer(dtype)
    means, variances = [], []
    for step in range(1, 5):
        x, _ = data(rng, spec.shape, dtype)
        rows, _ = spec.rows(x)  # (N * C, positions)
        means.append(rows.mean(axis=1).reshape(-1, 3).mean(axis=0))
        variances.append(rows.var(axis=1, ddof=1).reshape(-1, 3).mean(axis=0))
        layer(x)
        assert layer.num_batches_tracked == step
        assert_close(layer.running_mean, np.mean(means, axis=0), dtype, f"running_mean {step}")
        assert_close(layer.running_var, np.mean(variances, axis=0), dtype, f"running_var {step}")
    x, dy = data(rng, spec.shape, dtype)
    rows, index = spec.rows(x)
    mean, var = (np.mean(a, axis=0)[index] for a in (means, variances))
    want = spec.from_rows((rows - mean) / np.sqrt(var + EPS))
    assert_close(layer.eval()(x), want, dtype, "eval y", 1.0)
    invstd = spec.from_rows(1 / np.sqrt(var + EPS))
    assert_close(layer.backward(dy), dy * invstd, dtype, "eval dx", 1.0)


@pytest.mark.parametrize("std", [1e-3, 1e-7, 1e-12])
def test_instance_norm_running_var_of_small_variances(std):
    """momentum 1: running_var is the batch's mean of the instances' unbiased
    variances, to 1e-10 in float64 however small they are against eps"""
    x = np.random.default_rng(4).normal(0.0, std, (2, 3, 50))
    layer = bnpy.InstanceNorm(3, momentum=1.0, track_running_stats=True, dtype=np.float64)
    layer(x)
    assert_close(layer.running_var, x.var(axis=2, ddof=1).mean(axis=0), np.float64, "running_var")


FUNCTIONAL_SPECS = [
    Spec("layer", (3, 17), 17),
    Spec("layer", (2, 3, 4, 5), (4, 5)),
    Spec("layer", (2, 4100), 4100),
    Spec("rms", (3, 17), 17),
    Spec("rms", (2, 3, 4, 5), (4, 5)),
    Spec("group", (3, 6, 5), 2),
    Spec("group", (5, 6), 3),
    Spec("group", (2, 7, 3, 6), 3, axis=-1),
    Spec("instance", (2, 3, 17)),
    Spec("instance", (2, 4, 5, 3), axis=-1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "none"])
@pytest.mark.parametrize("spec", FUNCTIONAL_SPECS, ids=str)
def test_functional_against_torch(torch, spec, affine, dtype):
    """the functional forms' y, mean, invstd, dx, dgamma and dbeta against
    PyTorch's: native_layer_norm and native_group_norm give the statistics;
    with gamma None, dx is that of gamma 1 and dgamma still sum(dy * xhat)."""
    rng = np.random.default_rng(seed_of("functional", spec, affine, dtype.__name__))
    x, dy = data(rng, spec.shape, dtype)
    layer = randomize(spec.layer(dtype), rng)  # only for its parameters' shapes
    gamma = layer.gamma if affine else None
    beta = layer.beta if affine else None
    y, mean, invstd = spec.forward(x, gamma, beta, EPS)
    dx, dgamma, dbeta = spec.backward(dy, x, gamma, mean, invstd)

    # modules with weight 1 and bias 0 from the start (their gradients are
    # dgamma and dbeta also when bnpy is given None); instance norm as group
    # norm with a group per channel, which has them whatever affine says
    if spec.kind == "instance":
        module = torch.nn.GroupNorm(spec.channels, spec.channels, eps=EPS, dtype=torch.float64)
    else:
        module = spec.torch_module(torch, EPS)
    if affine:
        copy_params(torch, module, layer)
    want = torch_step(torch, spec, module, x, dy)
    s = scales(spec, x, dy, gamma, EPS)
    assert y.dtype == dtype and dx.dtype == dtype
    assert mean is None or mean.dtype == np.float64
    assert invstd.dtype == np.float64
    assert_close(y, want[0], dtype, "y", s["y"])
    assert_close(dx, want[1], dtype, "dx", s["dx"])
    assert_close(dgamma, want[2], dtype, "dgamma", s["dgamma"])
    if spec.kind != "rms":
        assert_close(dbeta, want[3], dtype, "dbeta", s["dbeta"])

    xt = torch.from_numpy(spec.to_torch(x.astype(np.float64)))
    if spec.kind == "layer":
        _, t_mean, t_invstd = torch.native_layer_norm(xt, spec.normalized, None, None, EPS)
    elif spec.kind == "rms":
        t_mean = None
        t_invstd = torch.rsqrt(xt.pow(2).mean(dim=tuple(range(-len(spec.normalized), 0))) + EPS)
    else:
        n, c = xt.shape[:2]
        _, t_mean, t_invstd = torch.native_group_norm(
            xt, None, None, n, c, xt[0, 0].numel(), spec.groups, EPS
        )
    if t_mean is not None:
        assert_close(mean, t_mean.reshape(-1), dtype, "mean", float(np.max(np.abs(x))))
    assert_close(invstd, t_invstd.reshape(-1), dtype, "invstd")


def test_functional_dtypes():
    """float32, float64 and float16 stay (float16 is tested in test_half);
    other real inputs compute in float64; gamma and beta follow x's dtype
    (float32 for halves)"""
    x = np.arange(24).reshape(2, 3, 4)
    for spec in (Spec("layer", x.shape, 4), Spec("rms", x.shape, 4), Spec("group", x.shape, 3)):
        y32 = spec.forward(x.astype(np.float32), np.ones(spec.layer(np.float64).gamma.shape), None)
        assert y32[0].dtype == np.float32
        assert spec.forward(x.astype(np.float16), None, None)[0].dtype == np.float16
        for source in (x, x.astype(np.int8), x.astype(np.uint16), x > 5):
            y, _, invstd = spec.forward(source, None, None)
            assert y.dtype == np.float64 and invstd.dtype == np.float64
            want = spec.forward(np.asarray(source, np.float64), None, None)[0]
            assert bits(y) == bits(want)


# ---- exactness --------------------------------------------------------------------

EXACT_SPECS = [
    Spec("layer", (3, 5), 5),
    Spec("layer", (2, 3, 4), (3, 4)),
    Spec("layer", (4, 17), 17, bias=False),
    Spec("rms", (3, 7), 7),
    Spec("group", (2, 4, 3), 2),
    Spec("group", (3, 6), 3),
    Spec("group", (2, 3, 4), 2, axis=-1),
    Spec("instance", (2, 3, 5), affine=True),
    Spec("instance", (2, 5, 3), axis=-1, affine=True),
]


@pytest.mark.parametrize("spec", EXACT_SPECS, ids=str)
def test_float64_against_exact_rationals(spec):
    """float64 results within 8 ulps of the exact ones. The ulps are those of
    the magnitudes that float64 inputs bound the error by: x - mean has the
    error of x's and the mean's last bits, so xhat's is ulp * (|x| + |mean|) *
    invstd (a row of values near 10 with a spread of 1e-3 loses 4000 ulps of
    xhat however it is computed), and each result carries that of xhat."""
    rng = np.random.default_rng(seed_of("exact", spec))
    n = spec.shape[0]
    lead = (n,) + (1,) * (len(spec.shape) - 1)
    scale = 10.0 ** rng.integers(-3, 4, lead)
    x = rng.standard_normal(spec.shape) * scale + rng.normal(0, 10, lead)
    dy = rng.standard_normal(spec.shape) + 0.5
    layer = randomize(spec.layer(np.float64), rng)
    y, dx = layer(x), layer.backward(dy)

    rows, index = spec.rows(x)
    dyr, _ = spec.rows(dy)
    g = np.ones(rows.shape) if layer.gamma is None else layer.gamma.reshape(-1)[index]
    b = np.zeros(rows.shape) if layer.beta is None else layer.beta.reshape(-1)[index]
    exact = exact_rows(rows, dyr, g, b, EPS, spec.centered)
    mean, invstd = exact["mean"][:, None], exact["invstd"][:, None]
    cond = (np.abs(rows) + np.abs(mean)) * invstd
    g_dy = np.abs(g * dyr)
    c = np.abs(np.mean(g * dyr * exact["xhat"], axis=1, keepdims=True))
    bound = {
        "y": np.abs(g) * cond + np.abs(b),
        "dx": invstd * (g_dy + np.mean(g_dy, axis=1, keepdims=True) + cond * c),
    }
    for name, got in (("y", y), ("dx", dx)):
        err = np.abs(spec.rows(got)[0] - exact[name]) / bound[name]
        assert err.max() <= 8 * ULP, f"{name}: {err.max() / ULP:.1f} ulps"

    # sums of the exact terms rounded once each (half an ulp of the bound at most)
    per_param = index.reshape(-1)
    terms = (dyr * exact["xhat"]).reshape(-1)
    want_dgamma = [math.fsum(terms[per_param == p]) for p in range(index.max() + 1)]
    want_dbeta = [math.fsum(dyr.reshape(-1)[per_param == p]) for p in range(index.max() + 1)]
    bound_dgamma = np.bincount(per_param, (np.abs(dyr) * cond).reshape(-1))
    bound_dbeta = np.bincount(per_param, np.abs(dyr).reshape(-1))
    err = np.abs(layer.grad_gamma.reshape(-1) - want_dgamma) / bound_dgamma
    assert err.max() <= 8 * ULP, f"dgamma: {err.max() / ULP:.1f} ulps"
    if layer.grad_beta is not None:
        err = np.abs(layer.grad_beta.reshape(-1) - want_dbeta) / bound_dbeta
        assert err.max() <= 8 * ULP, f"dbeta: {err.max() / ULP:.1f} ulps"

    # the functional forms: the same kernels, and the statistics to an ulp or two
    fy, fmean, finvstd = spec.forward(x, layer.gamma, layer.beta, EPS)
    assert bits(fy) == bits(y)
    assert bits(spec.backward(dy, x, layer.gamma, fmean, finvstd)[0]) == bits(dx)
    err = np.abs(finvstd - exact["invstd"]) / exact["invstd"]
    assert err.max() <= 2 * ULP, f"invstd: {err.max() / ULP:.1f} ulps"
    if fmean is not None:
        err = np.abs(fmean - exact["mean"]) / np.mean(np.abs(rows), axis=1)
        assert err.max() <= 2 * ULP, f"mean: {err.max() / ULP:.1f} ulps"


OFFSET_SPECS = [
    Spec("layer", (3, 17), 17),
    Spec("layer", (2, 300), 300),
    Spec("layer", (2, 5000), 5000),
    Spec("rms", (3, 17), 17),
    Spec("rms", (2, 5000), 5000),
    Spec("group", (2, 4, 150), 2),
    Spec("group", (2, 2, 2600), 1),
    Spec("group", (2, 150, 4), 2, axis=-1),
    Spec("instance", (2, 3, 17), track=True, momentum=1.0),
    Spec("instance", (2, 2, 5000), track=True, momentum=1.0),
]


@pytest.mark.parametrize("spec", OFFSET_SPECS, ids=str)
def test_data_offset_by_1e8(spec):
    """x = 1e8 + N(0, 1) in float64: the variance comes out as that of x - 1e8
    (exact in float64, so the reference loses nothing) to 1e-10, the mean to
    an ulp of 1e8, and y as well as a mean rounded to an ulp of 1e8 allows.
    RMS norm: the mean square against rationals."""
    rng = np.random.default_rng(seed_of("offset", spec))
    x = 1e8 + rng.standard_normal(spec.shape)
    layer = spec.layer(np.float64)
    y_layer = layer(x)
    y, mean, invstd = spec.forward(x, None, None, EPS)
    assert np.array_equal(y, y_layer)  # gamma 1 and beta 0 change no value
    rows, _ = spec.rows(x)
    centered, _ = spec.rows(x - 1e8)
    y_rows, _ = spec.rows(y)
    ulp = np.spacing(1e8)
    variances = []
    for r, (values, d) in enumerate(zip(rows, centered)):
        n = len(d)
        if spec.kind == "rms":
            square = sum((Fraction(v) ** 2 for v in values), Fraction(0)) / n
            want = 1 / math.sqrt(float(square + Fraction(EPS)))  # 1 ulp of rounding
            assert abs(invstd[r] - want) <= 3 * ULP * want, f"row {r}: invstd"
            assert np.max(np.abs(y_rows[r] - values * want)) <= 4 * ULP * np.max(values * want)
            continue
        m = math.fsum(d) / n
        m += math.fsum(d - m) / n
        var = math.fsum((d - m) ** 2) / n
        variances.append(var * n / (n - 1))
        assert abs((mean[r] - 1e8) - m) <= ulp, f"row {r}: mean"
        got = 1 / invstd[r] ** 2 - EPS
        assert abs(got - var) <= 1e-10 * var, f"row {r}: variance {got!r}, want {var!r}"
        want_y = (d - m) / math.sqrt(var + EPS)
        err = np.max(np.abs(y_rows[r] - want_y))
        assert err <= 2 * ulp / math.sqrt(var + EPS), f"row {r}: y off by {err:.3g}"
    if spec.track:  # momentum 1: the running statistics are the batch's
        want_var = np.mean(np.reshape(variances, (-1, spec.channels)), axis=0)
        assert_close(layer.running_var, want_var, np.float64, "running_var")
        want_mean = np.mean(mean.reshape(-1, spec.channels), axis=0)
        assert np.max(np.abs(layer.running_mean - want_mean)) <= ulp


def test_a_row_whose_first_values_stray_keeps_its_variance():
    """A row's statistics are summed about the mean of its first 16 values;
    when those stray far from the rest (here 1 against 0, with noise of
    1e-3), the squares about them would cancel up to 7 bits, so the row is
    summed again about its mean: invstd within 2 ulps of the rational one
    (130 ulps off without the second pass)."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        x = rng.standard_normal((1, 2048)) * 1e-3
        x[0, :16] = 1.0 + rng.standard_normal(16) * 1e-3
        _, _, invstd = bnpy.layer_norm_forward(x, 2048, eps=1e-300)
        values = [Fraction(v) for v in x[0]]
        mean = sum(values, Fraction(0)) / len(values)
        var = sum(((v - mean) ** 2 for v in values), Fraction(0)) / len(values)
        want = 1 / math.sqrt(float(var))
        assert abs(invstd[0] - want) <= 2 * np.spacing(want)


def test_float32_data_offset_by_1e4():
    """float32 x = 1e4 + N(0, 1): statistics in double, so the variance is
    that of the float32 values to 1e-10 and y within float32's rounding"""
    spec = Spec("layer", (3, 300), 300)
    x = (1e4 + np.random.default_rng(5).standard_normal(spec.shape)).astype(np.float32)
    y, mean, invstd = spec.forward(x, None, None, EPS)
    assert y.dtype == np.float32
    for r, d in enumerate(x.astype(np.float64) - 1e4):
        m = math.fsum(d) / len(d)
        m += math.fsum(d - m) / len(d)
        var = math.fsum((d - m) ** 2) / len(d)
        assert abs((mean[r] - 1e4) - m) <= np.spacing(1e4)
        assert abs(1 / invstd[r] ** 2 - EPS - var) <= 1e-10 * var
        want = (d - m) / math.sqrt(var + EPS)
        assert np.all(np.abs(y[r] - want) <= 2.0**-23 * np.abs(want) + 1e-10)


CONSTANT_SPECS = [
    Spec("layer", (6, 37), 37),
    Spec("layer", (6, 4, 5), (4, 5)),
    Spec("layer", (6, 4100), 4100),
    Spec("group", (4, 6, 5), 3),
    Spec("group", (4, 5, 6), 2, axis=-1),
    Spec("instance", (2, 3, 17), affine=True, track=True, momentum=1.0),
]
CONSTANTS = [0.1, -3.7, 1e8 + 0.5, 0.0, 1e-30, 7.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", CONSTANT_SPECS, ids=str)
def test_constant_rows(spec, dtype):
    """a row of equal values has exactly that mean, xhat exactly 0: y is
    exactly beta, dgamma exactly 0, dx = invstd * (g*dy - mean(g*dy))"""
    rng = np.random.default_rng(seed_of("constant", spec, dtype.__name__))
    probe, index = spec.rows(np.zeros(spec.shape))
    values = np.resize(np.array(CONSTANTS, dtype), len(probe)).astype(np.float64)
    x = spec.from_rows(np.repeat(values[:, None], probe.shape[1], axis=1)).astype(dtype)
    dy = rng.standard_normal(spec.shape).astype(dtype)
    layer = randomize(spec.layer(dtype), rng)
    y = layer(x)
    assert np.array_equal(spec.rows(y)[0], layer.beta.reshape(-1)[index].astype(np.float64))
    dx = layer.backward(dy)
    assert np.all(layer.grad_gamma == 0)
    _, mean, invstd = spec.forward(x, layer.gamma, layer.beta, EPS)
    assert np.array_equal(mean, values)
    assert_close(invstd, np.full(len(values), 1 / math.sqrt(EPS)), dtype, "invstd")
    g_dy = spec.rows(dy)[0] * layer.gamma.reshape(-1)[index]
    want = (g_dy - g_dy.mean(axis=1, keepdims=True)) / math.sqrt(EPS)
    assert_close(spec.rows(dx)[0], want, dtype, "dx", float(np.max(np.abs(g_dy))) / math.sqrt(EPS))
    if spec.track:
        want_mean = values.reshape(-1, spec.channels).mean(axis=0)
        bound = np.finfo(dtype).eps * np.max(np.abs(values))  # rounded to the layer's dtype
        assert np.all(np.abs(layer.running_mean - want_mean) <= bound)
        assert np.all(np.abs(layer.running_var) <= 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_zero_rows(dtype):
    """a row of zeros: y exactly 0, dgamma exactly 0, invstd 1/sqrt(eps),
    dx = gamma * dy * invstd"""
    layer = randomize(bnpy.RMSNorm(17, eps=EPS, dtype=dtype), np.random.default_rng(2))
    x = np.zeros((3, 17), dtype)
    x[1] = 0.5  # a row that is not zero, between two that are
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(dtype)
    y = layer(x)
    dx = layer.backward(dy)
    assert np.all(y[[0, 2]] == 0)
    _, invstd = bnpy.rms_norm_forward(x, 17, layer.gamma, eps=EPS)
    assert_close(invstd[[0, 2]], [1 / math.sqrt(EPS)] * 2, dtype, "invstd")
    assert_close(dx[[0, 2]], layer.gamma * dy[[0, 2]] / math.sqrt(EPS), dtype, "dx")
    assert_close(layer.grad_gamma, dy[1] * (0.5 / math.sqrt(0.25 + EPS)), dtype, "dgamma")


# ---- gradients by finite differences ----------------------------------------------

GRADCHECK_SPECS = [
    pytest.param(Spec("layer", (3, 4, 5), (4, 5)), True, id="layer"),
    pytest.param(Spec("layer", (3, 5), 5, affine=False), True, id="layer-no-affine"),
    pytest.param(Spec("group", (2, 4, 3), 2), True, id="group"),
    pytest.param(Spec("group", (3, 6), 3), True, id="group-2d"),
    pytest.param(Spec("group", (2, 3, 4), 2, axis=-1), True, id="group-channels-last"),
    pytest.param(Spec("instance", (2, 3, 4), affine=True), True, id="instance"),
    pytest.param(Spec("instance", (2, 3, 4), affine=True, track=True), True, id="instance-tracked"),
    pytest.param(Spec("instance", (2, 3, 4), affine=True, track=True), False, id="instance-eval"),
    pytest.param(
        Spec("instance", (2, 4, 3), axis=-1, affine=True, track=True),
        False,
        id="instance-eval-last",
    ),
]


@pytest.mark.parametrize("spec, training", GRADCHECK_SPECS)
def test_check_layer(spec, training):
    """bnpy.gradcheck.check_layer on each layer in float64: dx, dgamma and
    dbeta agree with central differences (eval mode with tracked statistics:
    those of a few training steps), and the layer is left as it was"""
    rng = np.random.default_rng(seed_of("gradcheck", spec, training))
    layer = randomize(spec.layer(np.float64), rng)
    for _ in range(3):
        layer(data(rng, spec.shape, np.float64)[0])
    layer.train(training)
    before = {k: bits(v) for k, v in layer.state_dict().items()}
    report = check_layer(layer, data(rng, spec.shape, np.float64)[0])
    assert report.passed, str(report)
    checked = [r.name for r in report.inputs if r.checked]
    assert checked == (["x", "gamma", "beta"] if spec.affine else ["x"])
    assert {k: bits(v) for k, v in layer.state_dict().items()} == before
    assert layer.training == training


GAMMA_ONLY = [
    pytest.param(Spec("rms", (3, 5), 5), id="rms"),
    pytest.param(Spec("rms", (2, 3, 4), (3, 4)), id="rms-2-axes"),
    pytest.param(Spec("layer", (3, 5), 5, bias=False), id="layer-no-bias"),
]


@pytest.mark.parametrize("spec", GAMMA_ONLY)
def test_check_layer_on_gamma_only_layers(spec):
    layer = randomize(spec.layer(np.float64), np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal(spec.shape)
    assert check_layer(layer, x).passed


@pytest.mark.parametrize("spec", GAMMA_ONLY)
def test_gamma_only_layers_by_gradcheck(spec):
    """RMSNorm and LayerNorm(bias=False) through bnpy.gradcheck.gradcheck
    itself, gamma as the second input"""
    rng = np.random.default_rng(seed_of("gamma only", spec))
    layer = randomize(spec.layer(np.float64, eps=1e-3), rng)

    def forward(x, gamma):
        layer.gamma = gamma
        return layer(x)

    def backward(dy, x, gamma):
        forward(x, gamma)
        return layer.backward(dy), layer.grad_gamma.copy()

    x = data(rng, spec.shape, np.float64)[0]
    report = gradcheck(forward, backward, [x, layer.gamma.copy()], names=["x", "gamma"])
    assert report.passed, str(report)


@pytest.mark.parametrize(
    "spec",
    [
        Spec("layer", (3, 2, 3), (2, 3)),
        Spec("rms", (3, 7), 7),
        Spec("group", (2, 4, 3), 2),
        Spec("group", (2, 3, 4), 2, axis=-1),
        Spec("instance", (2, 3, 4), affine=True),
    ],
    ids=str,
)
def test_functional_gradients_by_gradcheck(spec):
    """the functional backward, given the forward's statistics, against
    central differences of the functional forward in x, gamma and beta"""
    rng = np.random.default_rng(seed_of("functional gradcheck", spec))
    layer = randomize(spec.layer(np.float64), rng)
    params = [layer.gamma] + ([layer.beta] if spec.has_beta else [])

    def forward(x, *params):
        return spec.forward(x, *params, *[None] * (3 - 1 - len(params)), EPS)[0]

    def backward(dy, x, *params):
        _, mean, invstd = spec.forward(x, *params, *[None] * (3 - 1 - len(params)), EPS)
        dx, dgamma, dbeta = spec.backward(dy, x, params[0], mean, invstd)
        return (dx, dgamma, dbeta)[: 1 + len(params)]

    x = data(rng, spec.shape, np.float64)[0]
    report = gradcheck(forward, backward, [x, *params])
    assert report.passed, str(report)


# ---- bitwise the same at any thread count and in every build -------------------------

BITWISE_SPECS = [
    # small: one thread whatever the setting
    Spec("layer", (3, 37), 37),
    Spec("rms", (5, 17), 17),
    Spec("group", (2, 6, 5), 3),
    Spec("instance", (2, 3, 17), affine=True, track=True),
    # more than 65536 values: multithreaded
    Spec("layer", (20, 4100), 4100),
    Spec("layer", (600, 8, 16), (8, 16)),
    Spec("rms", (300, 256), 256),
    Spec("group", (4, 8, 48, 48), 4),
    Spec("group", (2000, 48), 4),
    Spec("group", (4, 48, 48, 8), 2, axis=-1),
    Spec("instance", (4, 8, 48, 48), affine=True, track=True),
]


@pytest.fixture
def machine():
    """threads and CPU capability put back after the test"""
    threads, capability = bnpy.get_num_threads(), bnpy.get_cpu_capability()
    yield
    bnpy.set_num_threads(threads)
    bnpy.set_cpu_capability(capability)


def everything(spec, dtype, x, dy):
    """every result of a layer and the functional forms, as bytes"""
    layer = randomize(spec.layer(dtype), np.random.default_rng(7))
    results = [layer(x), layer.backward(dy), layer.grad_gamma, layer.grad_beta]
    if spec.track:
        layer(x[::-1])
        results += [layer.running_mean, layer.running_var, layer.eval()(x), layer.backward(dy)]
        results += [layer.grad_gamma, layer.grad_beta]
    y, mean, invstd = spec.forward(x, layer.gamma, layer.beta, EPS)
    results += [y, mean, invstd, *spec.backward(dy, x, layer.gamma, mean, invstd)]
    return [bits(r) for r in results]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", BITWISE_SPECS, ids=str)
def test_bitwise_same_at_any_thread_count_and_capability(machine, spec, dtype):
    rng = np.random.default_rng(seed_of("bitwise", spec))
    x = rng.normal(1e3, 3.0, spec.shape).astype(dtype)
    dy = rng.normal(100.0, 1.0, spec.shape).astype(dtype)  # an offset: dbeta sums large values
    results = {}
    for threads in (1, 2) if bnpy.has_openmp() else (1,):
        bnpy.set_num_threads(threads)
        for capability in bnpy.cpu_capabilities():
            bnpy.set_cpu_capability(capability)
            results[threads, capability] = everything(spec, dtype, x, dy)
    (first_key, first), *others = results.items()
    for key, value in others:
        assert value == first, f"{key} differs from {first_key}"


# ---- bad input: a clear error, and the layer as it was --------------------------------

# name: (spec, training, shapes of x the layer must refuse)
BAD = {
    "layer": (Spec("layer", (3, 4, 5), (4, 5)), True, [(3, 4, 6), (3, 5, 5), (20,), ()]),
    "rms": (Spec("rms", (3, 4, 5), 5), True, [(3, 4, 6), (5, 4), ()]),
    "group": (Spec("group", (3, 4, 5), 2), True, [(3, 5, 5), (3, 2, 5), (4,), (3, 4, 0)]),
    "group-last": (Spec("group", (3, 5, 4), 2, axis=-1), True, [(3, 5, 5), (3, 4, 5), (4,)]),
    "instance": (
        Spec("instance", (3, 4, 5), affine=True, track=True),
        True,
        [(3, 5, 5), (4,), (3, 4, 1), (3, 4, 0)],
    ),
    "instance-eval": (
        Spec("instance", (3, 4, 5), affine=True, track=True),
        False,
        [(3, 5, 5), (4,), (5, 3)],
    ),
}


def snapshot(layer):
    """everything a failed call must leave as it was, as bytes"""
    return dict(
        state={k: bits(v) for k, v in layer.state_dict().items()},
        grads=(bits(layer.grad_gamma), bits(layer.grad_beta)),
        training=layer.training,
        eps=layer.eps,
        momentum=getattr(layer, "momentum", None),
        num_batches_tracked=getattr(layer, "num_batches_tracked", None),
    )


def primed(name):
    """(layer, x, x's buffer, dy, dx): a float64 layer with parameters and
    running statistics of its own, after a forward of x (which lies one value
    into a buffer, so that an out can overlap it partly) and a backward of dy"""
    spec, training, _ = BAD[name]
    rng = np.random.default_rng(seed_of("bad", name))
    layer = randomize(spec.layer(np.float64), rng)
    for _ in range(2):
        layer(data(rng, spec.shape, np.float64)[0])
    layer.train(training)
    buffer = np.empty(math.prod(spec.shape) + 1)
    x = buffer[1:].reshape(spec.shape)
    x[...], dy = data(rng, spec.shape, np.float64)
    layer(x)
    return layer, x, buffer, dy, layer.backward(dy)


def assert_refused(layer, call, error, match, dy, dx):
    """call() raises error (its message matching), and the layer is exactly as
    before: state, gradients, and what its backward computes"""
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        call()
    assert snapshot(layer) == before
    assert bits(layer.backward(dy)) == bits(dx), "backward differs after the failed call"
    assert snapshot(layer) == before


def read_only(shape):
    out = np.zeros(shape)
    out.flags.writeable = False
    return out


def backward_overlapping_dy(layer, dy):
    """backward of dy with an out one value before it in the same buffer"""
    buffer = np.zeros(dy.size + 1)
    view = buffer[1:].reshape(dy.shape)
    view[...] = dy
    return layer.backward(view, out=buffer[:-1].reshape(dy.shape))


# (id, call(layer, x, x's buffer, dy), error, message)
FORWARD_ERRORS = [
    ("complex", lambda ly, x, b, dy: ly(x.astype(complex)), TypeError, "real"),
    ("string", lambda ly, x, b, dy: ly(x.astype(str)), TypeError, "real"),
    ("object", lambda ly, x, b, dy: ly(x.astype(object)), TypeError, "real"),
    ("none", lambda ly, x, b, dy: ly(None), TypeError, "real"),
    ("masked", lambda ly, x, b, dy: ly(np.ma.masked_array(x, x > 0)), TypeError, "masked"),
    ("out-shape", lambda ly, x, b, dy: ly(x, out=np.zeros(x.shape + (1,))), ValueError, "shape"),
    (
        "out-dtype",
        lambda ly, x, b, dy: ly(x, out=np.zeros(x.shape, np.float32)),
        ValueError,
        "dtype",
    ),
    ("out-int", lambda ly, x, b, dy: ly(x, out=np.zeros(x.shape, int)), ValueError, "dtype"),
    ("out-read-only", lambda ly, x, b, dy: ly(x, out=read_only(x.shape)), ValueError, "writ"),
    ("out-list", lambda ly, x, b, dy: ly(x, out=x.tolist()), TypeError, "out"),
    ("out-overlap", lambda ly, x, b, dy: ly(x, out=b[:-1].reshape(x.shape)), ValueError, "overlap"),
]
BACKWARD_ERRORS = [
    ("dy-shape", lambda ly, x, b, dy: ly.backward(dy[:-1]), ValueError, "shape"),
    ("dy-transposed", lambda ly, x, b, dy: ly.backward(dy.T), ValueError, "shape"),
    ("dy-complex", lambda ly, x, b, dy: ly.backward(dy * 1j), TypeError, "real"),
    ("dy-string", lambda ly, x, b, dy: ly.backward(dy.astype(str)), TypeError, "real"),
    ("dy-masked", lambda ly, x, b, dy: ly.backward(np.ma.masked_array(dy)), TypeError, "masked"),
    (
        "out-shape",
        lambda ly, x, b, dy: ly.backward(dy, out=np.zeros(dy.shape[:-1])),
        ValueError,
        "shape",
    ),
    (
        "out-dtype",
        lambda ly, x, b, dy: ly.backward(dy, out=np.zeros(dy.shape, np.float32)),
        ValueError,
        "dtype",
    ),
    (
        "out-read-only",
        lambda ly, x, b, dy: ly.backward(dy, out=read_only(dy.shape)),
        ValueError,
        "writ",
    ),
    ("out-list", lambda ly, x, b, dy: ly.backward(dy, out=dy.tolist()), TypeError, "out"),
    ("out-overlap-dy", lambda ly, x, b, dy: backward_overlapping_dy(ly, dy), ValueError, "overlap"),
    (
        "out-overlap-x",
        lambda ly, x, b, dy: ly.backward(dy, out=b[:-1].reshape(x.shape)),
        ValueError,
        "overlap",
    ),
]


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize(
    "case, call, error, match",
    FORWARD_ERRORS + BACKWARD_ERRORS,
    ids=[c[0] for c in FORWARD_ERRORS + BACKWARD_ERRORS],
)
def test_bad_call_changes_nothing(name, case, call, error, match):
    layer, x, buffer, dy, dx = primed(name)
    kept = bits(buffer)
    assert_refused(layer, lambda: call(layer, x, buffer, dy), error, match, dy, dx)
    assert bits(buffer) == kept, "x was written"


@pytest.mark.parametrize("name", list(BAD))
def test_wrong_shapes_change_nothing(name):
    layer, _, _, dy, dx = primed(name)
    for shape in BAD[name][2]:
        wrong = np.random.default_rng(0).standard_normal(shape)
        call = functools.partial(layer, wrong)
        assert_refused(layer, call, ValueError, re.escape(str(shape)), dy, dx)


def changed_state(layer):
    """a valid state dict whose every value differs from the layer's"""
    state = layer.state_dict()
    return {k: v + 3 if k == "num_batches_tracked" else v * 0.5 + 0.25 for k, v in state.items()}


def last_array(state):
    return [k for k, v in state.items() if np.ndim(v)][-1]


def with_value(state, key, value):
    state = dict(state)
    state[key] = value
    return state


def without(state, key):
    return {k: v for k, v in state.items() if k != key}


# (id, call(layer), error, message); the state dicts hold valid values too, and
# those must not be loaded when another is refused
STATE_ERRORS = [
    (
        "load-wrong-shape",
        lambda ly: ly.load_state_dict(with_value(changed_state(ly), "gamma", np.ones(7))),
        ValueError,
        "shape",
    ),
    (
        "load-last-wrong-shape",
        lambda ly: ly.load_state_dict(
            with_value(changed_state(ly), last_array(ly.state_dict()), np.ones((2, 2)))
        ),
        ValueError,
        "shape",
    ),
    (
        "load-missing",
        lambda ly: ly.load_state_dict(without(changed_state(ly), "gamma")),
        ValueError,
        "missing",
    ),
    (
        "load-unexpected",
        lambda ly: ly.load_state_dict(with_value(changed_state(ly), "extra", np.ones(3))),
        ValueError,
        "unexpected",
    ),
    (
        "load-string",
        lambda ly: ly.load_state_dict(with_value(changed_state(ly), "gamma", "abc")),
        TypeError,
        "gamma",
    ),
    (
        "load-complex",
        lambda ly: ly.load_state_dict(with_value(changed_state(ly), "gamma", ly.gamma * 1j)),
        TypeError,
        "gamma",
    ),
    (
        "load-not-a-dict",
        lambda ly: ly.load_state_dict(list(ly.state_dict().items())),
        TypeError,
        "dict",
    ),
    ("set-gamma-shape", lambda ly: setattr(ly, "gamma", np.ones(7)), ValueError, "shape"),
    ("set-gamma-string", lambda ly: setattr(ly, "gamma", "abc"), TypeError, "gamma"),
    ("set-weight-shape", lambda ly: setattr(ly, "weight", np.ones((1, 1))), ValueError, "shape"),
]
TRACKED_STATE_ERRORS = [
    (
        "load-negative-count",
        lambda ly: ly.load_state_dict(with_value(changed_state(ly), "num_batches_tracked", -1)),
        ValueError,
        "num_batches_tracked",
    ),
    (
        "load-fractional-count",
        lambda ly: ly.load_state_dict(with_value(changed_state(ly), "num_batches_tracked", 2.5)),
        ValueError,
        "num_batches_tracked",
    ),
    (
        "load-running-var-shape",
        lambda ly: ly.load_state_dict(with_value(changed_state(ly), "running_var", np.ones(5))),
        ValueError,
        "shape",
    ),
]
MORE_STATE_ERRORS = [
    pytest.param(
        "load-nan",
        lambda ly: ly.load_state_dict(
            with_value(changed_state(ly), "gamma", np.full(ly.gamma.shape, np.nan))
        ),
        ValueError,
        "finite",
        id="load-nan",
    ),
    pytest.param(
        "set-gamma-inf",
        lambda ly: setattr(ly, "gamma", np.full(ly.gamma.shape, np.inf)),
        ValueError,
        "finite",
        id="set-gamma-inf",
    ),
    pytest.param(
        "set-eps-negative",
        lambda ly: setattr(ly, "eps", -1.0),
        ValueError,
        "eps",
        id="set-eps-negative",
    ),
    pytest.param(
        "set-eps-string",
        lambda ly: setattr(ly, "eps", "1e-5"),
        TypeError,
        "eps",
        id="set-eps-string",
    ),
]


@pytest.mark.parametrize("name", ["layer", "rms", "group", "instance"])
@pytest.mark.parametrize(
    "case, call, error, match",
    [pytest.param(*c, id=c[0]) for c in STATE_ERRORS] + MORE_STATE_ERRORS,
)
def test_bad_state_changes_nothing(name, case, call, error, match):
    layer, _, _, dy, dx = primed(name)
    assert_refused(layer, lambda: call(layer), error, match, dy, dx)


@pytest.mark.parametrize(
    "case, call, error, match",
    [pytest.param(*c, id=c[0]) for c in TRACKED_STATE_ERRORS]
    + [
        pytest.param(
            "set-momentum",
            lambda ly: setattr(ly, "momentum", 2.0),
            ValueError,
            "momentum",
            id="set-momentum",
        ),
        pytest.param(
            "load-inf-running-var",
            lambda ly: ly.load_state_dict(
                with_value(changed_state(ly), "running_var", np.full(4, np.inf))
            ),
            ValueError,
            "finite",
            id="load-inf-running-var",
        ),
    ],
)
def test_bad_tracked_state_changes_nothing(case, call, error, match):
    layer, _, _, dy, dx = primed("instance-eval")
    assert_refused(layer, lambda: call(layer), error, match, dy, dx)


@pytest.mark.parametrize("name", list(BAD))
def test_backward_before_forward(name):
    """RuntimeError, also after a forward that failed"""
    spec, training, wrong = BAD[name]
    layer = spec.layer(np.float64).train(training)
    dy = np.ones(spec.shape)
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(dy)
    with pytest.raises(ValueError):
        layer(np.ones(wrong[0]))
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(dy)
    assert layer.grad_gamma is None or np.all(layer.grad_gamma == 0)


@pytest.mark.parametrize("name", ["layer", "rms", "group", "instance"])
def test_gradients_are_none_before_any_backward(name):
    layer = BAD[name][0].layer(np.float64)
    assert layer.grad_gamma is None
    assert layer.grad_beta is None


CONSTRUCTOR_ERRORS = [
    (lambda: bnpy.LayerNorm(0), ValueError, "normalized_shape"),
    (lambda: bnpy.LayerNorm(()), ValueError, "normalized_shape"),
    (lambda: bnpy.LayerNorm((4, -1)), ValueError, "normalized_shape"),
    (lambda: bnpy.LayerNorm(2.5), (TypeError, ValueError), "normalized_shape"),
    (lambda: bnpy.LayerNorm("4"), (TypeError, ValueError), "normalized_shape"),
    (lambda: bnpy.LayerNorm(4, eps=0), ValueError, "eps"),
    (lambda: bnpy.LayerNorm(4, eps=-1e-5), ValueError, "eps"),
    (lambda: bnpy.LayerNorm(4, eps=float("nan")), ValueError, "eps"),
    (lambda: bnpy.LayerNorm(4, eps=float("inf")), ValueError, "eps"),
    (lambda: bnpy.LayerNorm(4, eps="1e-5"), TypeError, "eps"),
    (lambda: bnpy.LayerNorm(4, eps=None), TypeError, "eps"),
    (lambda: bnpy.LayerNorm(4, dtype=np.float16), ValueError, "dtype"),
    (lambda: bnpy.LayerNorm(4, dtype="int32"), ValueError, "dtype"),
    (lambda: bnpy.LayerNorm(4, dtype="banana"), ValueError, "dtype"),
    (lambda: bnpy.RMSNorm(4, eps=0.0), ValueError, "eps"),
    (lambda: bnpy.RMSNorm(4, dtype=complex), ValueError, "dtype"),
    (lambda: bnpy.RMSNorm(0), ValueError, "normalized_shape"),
    (lambda: bnpy.GroupNorm(3, 4), ValueError, "divide"),
    (lambda: bnpy.GroupNorm(0, 4), ValueError, "num_groups"),
    (lambda: bnpy.GroupNorm(True, 4), ValueError, "num_groups"),
    (lambda: bnpy.GroupNorm(2, 0), ValueError, "num_channels"),
    (lambda: bnpy.GroupNorm(2, 4.0), (TypeError, ValueError), "num_channels"),
    (lambda: bnpy.GroupNorm(2, 4, axis=0), ValueError, "axis"),
    (lambda: bnpy.GroupNorm(2, 4, axis="1"), (TypeError, ValueError), "axis"),
    (lambda: bnpy.GroupNorm(2, 4, eps=-1), ValueError, "eps"),
    (lambda: bnpy.GroupNorm(2, 4, dtype=np.int64), ValueError, "dtype"),
    (lambda: bnpy.InstanceNorm(4, momentum=1.5), ValueError, "momentum"),
    (lambda: bnpy.InstanceNorm(4, momentum=-0.1), ValueError, "momentum"),
    (lambda: bnpy.InstanceNorm(4, momentum=float("nan")), ValueError, "momentum"),
    (lambda: bnpy.InstanceNorm(4, momentum="0.1"), TypeError, "momentum"),
    (lambda: bnpy.InstanceNorm(4, axis=0), ValueError, "axis"),
    (lambda: bnpy.InstanceNorm(4, eps=0), ValueError, "eps"),
    (lambda: bnpy.InstanceNorm(4, dtype="float16"), ValueError, "dtype"),
    pytest.param(
        lambda: bnpy.InstanceNorm(0),
        ValueError,
        "num_features",
        id="InstanceNorm(0)",
    ),
]


@pytest.mark.parametrize("make, error, match", CONSTRUCTOR_ERRORS)
def test_constructor_refuses_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


X = np.random.default_rng(9).standard_normal((3, 4, 5))
MEAN_LN, INVSTD_LN = np.zeros((3, 4)), np.ones((3, 4))
MEAN_GN, INVSTD_GN = np.zeros((3, 2)), np.ones((3, 2))
FUNCTIONAL_ERRORS = [
    (lambda x: bnpy.layer_norm_forward(x, 6), ValueError, r"\(6,\)"),
    (lambda x: bnpy.layer_norm_forward(x, (5, 5)), ValueError, "normalized shape"),
    (lambda x: bnpy.layer_norm_forward(x, 5, np.ones(4)), ValueError, "gamma"),
    (lambda x: bnpy.layer_norm_forward(x, 5, None, np.ones(6)), ValueError, "beta"),
    (lambda x: bnpy.layer_norm_forward(x.astype(complex), 5), TypeError, "x"),
    (lambda x: bnpy.layer_norm_forward(x, 5, eps=0), ValueError, "eps"),
    (lambda x: bnpy.layer_norm_forward(x, 0), ValueError, "normalized_shape"),
    (
        lambda x: bnpy.layer_norm_backward(x, x, 5, None, MEAN_LN, np.ones((3, 5))),
        ValueError,
        "invstd",
    ),
    (
        lambda x: bnpy.layer_norm_backward(x[:2], x, 5, None, MEAN_LN, INVSTD_LN),
        ValueError,
        "dy",
    ),
    (
        lambda x: bnpy.layer_norm_backward(x, x, 5, np.ones(3), MEAN_LN, INVSTD_LN),
        ValueError,
        "gamma",
    ),
    (lambda x: bnpy.rms_norm_forward(x, 5, eps=-1.0), ValueError, "eps"),
    (lambda x: bnpy.rms_norm_forward(x.astype(str), 5), TypeError, "x"),
    (lambda x: bnpy.rms_norm_backward(x, x, 5, None, np.ones(3)), ValueError, "invstd"),
    (lambda x: bnpy.group_norm_forward(x, 3), ValueError, "groups"),
    (lambda x: bnpy.group_norm_forward(x, 0), ValueError, "num_groups"),
    (lambda x: bnpy.group_norm_forward(x, 2, axis=0), ValueError, "axis"),
    (lambda x: bnpy.group_norm_forward(x, 2, axis=3), ValueError, "axis"),
    (lambda x: bnpy.group_norm_forward(x, 2, axis="1"), TypeError, "axis"),
    (lambda x: bnpy.group_norm_forward(x[0, 0], 1), ValueError, "dimensions"),
    (lambda x: bnpy.group_norm_forward(x, 2, np.ones(5)), ValueError, "gamma"),
    (lambda x: bnpy.group_norm_forward(np.ma.masked_array(x), 2), TypeError, "masked"),
    (
        lambda x: bnpy.group_norm_backward(x, x, 2, None, MEAN_LN, INVSTD_GN),
        ValueError,
        "mean",
    ),
    (
        lambda x: bnpy.group_norm_backward(x * 1j, x, 2, None, MEAN_GN, INVSTD_GN),
        TypeError,
        "dy",
    ),
    (lambda x: bnpy.instance_norm_forward(x.astype(object)), TypeError, "x"),
    (lambda x: bnpy.instance_norm_forward(x, eps=float("nan")), ValueError, "eps"),
    (
        lambda x: bnpy.instance_norm_backward(x, x, None, MEAN_GN, INVSTD_GN),
        ValueError,
        "mean",
    ),
    (
        lambda x: bnpy.layer_norm_forward(x, 5, out=np.zeros(x.shape, np.float32)),
        ValueError,
        "out",
    ),
    (lambda x: bnpy.group_norm_forward(x, 2, out=read_only(x.shape)), ValueError, "writ"),
    (lambda x: bnpy.instance_norm_forward(x, out=np.zeros((3, 4))), ValueError, "out"),
    (lambda x: bnpy.rms_norm_forward(x, 5, out=x[:, :, ::-1]), ValueError, "overlap"),
    (
        lambda x: bnpy.layer_norm_backward(x, x, 5, None, MEAN_LN, INVSTD_LN, out=x[::-1]),
        ValueError,
        "overlap",
    ),
]


@pytest.mark.parametrize("call, error, match", FUNCTIONAL_ERRORS)
def test_functional_refuses_bad_arguments(call, error, match):
    x = X.copy()
    with pytest.raises(error, match=match):
        call(x)
    assert bits(x) == bits(X), "x was written"


# ---- out= -----------------------------------------------------------------------------

OUT_CASES = {
    "layer": (Spec("layer", (3, 4, 5), (4, 5)), True),
    "rms": (Spec("rms", (3, 4, 5), 5), True),
    "group": (Spec("group", (3, 4, 5), 2), True),
    "group-2d": (Spec("group", (6, 4), 2), True),
    "group-last": (Spec("group", (3, 5, 4), 2, axis=-1), True),
    "instance": (Spec("instance", (3, 4, 5), affine=True, track=True), True),
    "instance-eval": (Spec("instance", (3, 4, 5), affine=True, track=True), False),
    "instance-eval-last": (Spec("instance", (3, 5, 4), axis=-1, affine=True, track=True), False),
}


def out_layer(name, dtype):
    """(layer, x, dy, y, dx, gradients as bytes): a layer after training steps,
    in its mode, with the results of a forward and backward without out"""
    spec, training = OUT_CASES[name]
    rng = np.random.default_rng(seed_of("out", name))
    layer = randomize(spec.layer(dtype), rng)
    for _ in range(2):
        layer(data(rng, spec.shape, dtype)[0])
    layer.train(training)
    x, dy = data(rng, spec.shape, dtype)
    y, dx = layer(x), layer.backward(dy)
    return layer, x, dy, y, dx, (bits(layer.grad_gamma), bits(layer.grad_beta))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OUT_CASES)
def test_out(name, dtype):
    layer, x, dy, y, dx, grads = out_layer(name, dtype)
    out = np.full(x.shape, np.nan, dtype)
    assert layer(x, out=out) is out
    assert bits(out) == bits(y)
    out = np.full(x.shape, np.nan, dtype)
    assert layer.forward(x.astype(np.float64), out=out) is out  # converted to the layer's dtype
    assert bits(out) == bits(y)
    out = np.full(x.shape, np.nan, dtype)
    assert layer.backward(dy, out=out) is out
    assert bits(out) == bits(dx)
    assert (bits(layer.grad_gamma), bits(layer.grad_beta)) == grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OUT_CASES)
def test_out_is_x(name, dtype):
    """forward(x, out=x) writes y over x, and backward still has the x it was
    given (the layer keeps a copy when out is x)"""
    layer, x, dy, y, dx, grads = out_layer(name, dtype)
    inplace = x.copy()
    assert layer(inplace, out=inplace) is inplace
    assert bits(inplace) == bits(y)
    assert bits(layer.backward(dy)) == bits(dx)
    assert (bits(layer.grad_gamma), bits(layer.grad_beta)) == grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OUT_CASES)
def test_backward_out_is_dy(name, dtype):
    layer, _, dy, _, dx, grads = out_layer(name, dtype)
    inplace = dy.copy()
    assert layer.backward(inplace, out=inplace) is inplace
    assert bits(inplace) == bits(dx)
    assert (bits(layer.grad_gamma), bits(layer.grad_beta)) == grads


def strided_outs(shape, dtype):
    """(out, the buffer it lies in, the buffer's values out must leave): every
    other value of a buffer of NaN, and a Fortran-ordered array"""
    wide = np.full(shape[:-1] + (2 * shape[-1],), np.nan, dtype)
    yield wide[..., ::2], wide[..., 1::2]
    fortran = np.full(shape[::-1], np.nan, dtype).T
    yield fortran, np.empty(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OUT_CASES)
def test_non_contiguous_out(name, dtype):
    layer, x, dy, y, dx, grads = out_layer(name, dtype)
    for out, gaps in strided_outs(x.shape, dtype):
        assert layer(x, out=out) is out
        assert bits(np.ascontiguousarray(out)) == bits(y)
        assert np.isnan(gaps).all(), "wrote between out's values"
    for out, gaps in strided_outs(x.shape, dtype):
        assert layer.backward(dy, out=out) is out
        assert bits(np.ascontiguousarray(out)) == bits(dx)
        assert np.isnan(gaps).all(), "wrote between out's values"
    assert (bits(layer.grad_gamma), bits(layer.grad_beta)) == grads


FUNCTIONAL_OUT = [
    Spec("layer", (3, 4, 5), (4, 5)),
    Spec("rms", (3, 17), 17),
    Spec("group", (3, 4, 5), 2),
    Spec("group", (6, 4), 2),
    Spec("group", (3, 5, 4), 2, axis=-1),
    Spec("instance", (2, 3, 17), affine=True),
    Spec("instance", (2, 17, 3), axis=-1, affine=True),
]


def functional_case(spec, dtype):
    rng = np.random.default_rng(seed_of("functional out", spec))
    layer = randomize(spec.layer(dtype), rng)
    x, dy = data(rng, spec.shape, dtype)
    return x, dy, layer.gamma, layer.beta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", FUNCTIONAL_OUT, ids=str)
def test_functional_out(spec, dtype):
    """out= of the functional forms: a new array, x itself, a strided view;
    backward's out: a new array"""
    x, dy, gamma, beta = functional_case(spec, dtype)
    y, mean, invstd = spec.forward(x, gamma, beta)
    for kind in ("new", "x", "strided"):
        source = x.copy()
        out = {
            "new": np.empty_like(x),
            "x": source,
            "strided": next(strided_outs(x.shape, dtype))[0],
        }[kind]
        result = spec.forward(source, gamma, beta, out=out)
        assert result[0] is out
        assert bits(np.ascontiguousarray(out)) == bits(y), f"out is {kind}"
        assert (bits(result[1]), bits(result[2])) == (bits(mean), bits(invstd)), kind
    want = [bits(r) for r in spec.backward(dy, x, gamma, mean, invstd)]
    for out, _ in [(np.empty_like(x), None), *strided_outs(x.shape, dtype)]:
        result = spec.backward(dy, x, gamma, mean, invstd, out=out)
        assert result[0] is out
        got = [bits(np.ascontiguousarray(result[0]))] + [bits(r) for r in result[1:]]
        assert got == want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "spec",
    [pytest.param(s, id=str(s)) for s in FUNCTIONAL_OUT],
)
@pytest.mark.parametrize("which", ["dy", "x"])
def test_functional_backward_in_place(spec, dtype, which):
    """backward's out may be dy or x itself: dx and the parameter gradients
    are those of a backward into new memory"""
    x, dy, gamma, beta = functional_case(spec, dtype)
    _, mean, invstd = spec.forward(x, gamma, beta)
    want = [bits(r) for r in spec.backward(dy, x, gamma, mean, invstd)]
    xc, dyc = x.copy(), dy.copy()
    out = dyc if which == "dy" else xc
    result = spec.backward(dyc, xc, gamma, mean, invstd, out=out)
    assert result[0] is out
    assert [bits(r) for r in result] == want


# ---- state_dict, pickle, repr, train/eval ----------------------------------------------

STATE_SPECS = {
    "layer": (Spec("layer", (3, 4, 5), (4, 5)), ["gamma", "beta"]),
    "layer-no-bias": (Spec("layer", (3, 5), 5, bias=False), ["gamma"]),
    "layer-no-affine": (Spec("layer", (3, 5), 5, affine=False), []),
    "rms": (Spec("rms", (3, 5), 5), ["gamma"]),
    "group": (Spec("group", (3, 4, 5), 2), ["gamma", "beta"]),
    "group-last": (Spec("group", (3, 5, 4), 2, axis=-1, affine=False), []),
    "instance": (Spec("instance", (3, 4, 5), affine=False), []),
    "instance-tracked": (
        Spec("instance", (3, 4, 5), affine=True, track=True, momentum=0.3),
        ["gamma", "beta", "running_mean", "running_var", "num_batches_tracked"],
    ),
    "instance-tracked-last": (
        Spec("instance", (3, 5, 4), axis=-1, affine=False, track=True, momentum=None),
        ["running_mean", "running_var", "num_batches_tracked"],
    ),
}


def trained_layer(name, dtype=np.float64, eps=1e-5):
    """a layer of STATE_SPECS with parameters of its own after three
    training steps, and an x for it"""
    spec = STATE_SPECS[name][0]
    rng = np.random.default_rng(seed_of("state", name))
    layer = randomize(spec.layer(dtype, eps=eps), rng)
    for _ in range(3):
        layer(data(rng, spec.shape, dtype)[0])
    return layer, data(rng, spec.shape, dtype)


def state_bits(layer):
    return {k: bits(v) for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(STATE_SPECS))
def test_state_dict_round_trip(name, dtype):
    """state_dict: copies under the expected keys; load_state_dict into a new
    layer gives the same state and the same results"""
    spec, keys = STATE_SPECS[name]
    layer, (x, dy) = trained_layer(name, dtype)
    state = layer.state_dict()
    assert list(state) == keys
    for key, value in state.items():
        if key == "num_batches_tracked":
            assert value == 3
            continue
        assert value.dtype == dtype
        assert not np.shares_memory(value, getattr(layer, key)), f"{key} is not a copy"
        if key != "running_var":
            assert np.any(value != (1 if key == "gamma" else 0)), f"{key} was not trained"
    before = state_bits(layer)
    for value in state.values():
        if isinstance(value, np.ndarray):
            value += 1  # changes the copies only
    assert state_bits(layer) == before

    fresh = spec.layer(dtype)
    assert fresh.load_state_dict(layer.state_dict()) == IncompatibleKeys([], [])
    assert state_bits(fresh) == before
    for mode in (False, True):
        layer.train(mode)
        fresh.train(mode)
        assert bits(fresh(x)) == bits(layer(x))
        assert bits(fresh.backward(dy)) == bits(layer.backward(dy))
        assert state_bits(fresh) == state_bits(layer)


def test_load_state_dict_strict_false():
    """strict=False loads the keys given and reports the others; a bad value
    still refuses the whole dict"""
    layer = bnpy.InstanceNorm(3, affine=True, track_running_stats=True, dtype=np.float64)
    result = layer.load_state_dict({"gamma": [1.0, 2.0, 3.0], "extra": 1}, strict=False)
    assert result == IncompatibleKeys(
        ["beta", "running_mean", "running_var", "num_batches_tracked"], ["extra"]
    )
    assert result.missing_keys[0] == "beta" and result.unexpected_keys == ["extra"]
    assert layer.gamma.tolist() == [1.0, 2.0, 3.0]
    assert layer.beta.tolist() == [0.0] * 3
    result = layer.load_state_dict({"running_var": [4.0, 5.0, 6.0], "bias": [7, 8, 9]}, False)
    assert result == IncompatibleKeys(["gamma", "running_mean", "num_batches_tracked"], [])
    assert layer.running_var.tolist() == [4.0, 5.0, 6.0]
    assert layer.beta.tolist() == [7.0, 8.0, 9.0]
    before = state_bits(layer)
    with pytest.raises(ValueError, match="shape"):
        layer.load_state_dict({"gamma": [0.0, 0.0, 0.0], "beta": [1.0]}, strict=False)
    assert state_bits(layer) == before
    layer = bnpy.LayerNorm(3, elementwise_affine=False)
    assert layer.load_state_dict({}, strict=True) == IncompatibleKeys([], [])
    assert layer.load_state_dict({"gamma": [1.0, 2.0, 3.0]}, strict=False) == IncompatibleKeys(
        [], ["gamma"]
    )
    with pytest.raises(ValueError, match="unexpected"):
        layer.load_state_dict({"gamma": [1.0, 2.0, 3.0]})


def test_weight_and_bias_are_gamma_and_beta():
    layer = bnpy.GroupNorm(2, 4, dtype=np.float64)
    assert layer.load_state_dict({"weight": [1, 2, 3, 4], "bias": [5, 6, 7, 8]}) == (
        IncompatibleKeys([], [])
    )
    assert layer.gamma.tolist() == [1, 2, 3, 4] and layer.beta.tolist() == [5, 6, 7, 8]
    assert np.shares_memory(layer.weight, layer.gamma)
    assert np.shares_memory(layer.bias, layer.beta)
    layer.weight = [4, 3, 2, 1]
    layer.bias[:] = 0  # the layer's own memory
    assert layer.gamma.tolist() == [4, 3, 2, 1] and layer.beta.tolist() == [0] * 4
    assert list(layer.state_dict()) == ["gamma", "beta"]


@pytest.mark.parametrize("name", ["layer", "rms", "group", "instance-tracked"])
def test_load_torch_state_dict(torch, name):
    """PyTorch's state dict (weight, bias, running statistics, a 0-d
    num_batches_tracked), as NumPy arrays, loads as it is; the layer then
    computes what the module computes"""
    spec = STATE_SPECS[name][0]
    rng = np.random.default_rng(seed_of("torch state", name))
    module = spec.torch_module(torch, EPS)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.from_numpy(rng.normal(1.0, 0.5, tuple(param.shape))))
    for _ in range(2):
        module(torch.from_numpy(spec.to_torch(data(rng, spec.shape, np.float64)[0])))
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    layer = spec.layer(np.float64)
    assert layer.load_state_dict(state) == IncompatibleKeys([], [])
    assert np.array_equal(layer.gamma, state["weight"])
    module.eval()
    layer.eval()
    x, dy = data(rng, spec.shape, np.float64)
    want = torch_step(torch, spec, module, x, dy)
    running = (layer.running_mean, layer.running_var) if spec.track else None
    s = scales(spec, x, dy, layer.gamma, EPS, running)
    assert_close(layer(x), want[0], np.float64, "y", s["y"])
    assert_close(layer.backward(dy), want[1], np.float64, "dx", s["dx"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(STATE_SPECS))
def test_pickle_and_deepcopy(name, training, dtype):
    """the whole layer: configuration, parameters, running statistics, mode;
    the copy then computes bitwise what the original does, in memory of its own"""
    layer, (x, dy) = trained_layer(name, dtype, eps=1e-3)
    layer.train(training)
    copies = [pickle.loads(pickle.dumps(layer, protocol)) for protocol in (2, 5)]
    state = layer.state_dict()
    for clone in [*copies, copy.deepcopy(layer)]:
        layer.load_state_dict(state)  # as it was when copied
        assert type(clone) is type(layer)
        assert repr(clone) == repr(layer)
        assert clone.training == training and clone.dtype == layer.dtype
        assert clone.eps == layer.eps
        assert getattr(clone, "momentum", 0) == getattr(layer, "momentum", 0)
        assert state_bits(clone) == state_bits(layer)
        if clone.gamma is not None:
            assert not np.shares_memory(clone.gamma, layer.gamma)
        assert bits(clone(x)) == bits(layer(x))
        assert bits(clone.backward(dy)) == bits(layer.backward(dy))
        assert (bits(clone.grad_gamma), bits(clone.grad_beta)) == (
            bits(layer.grad_gamma),
            bits(layer.grad_beta),
        )
        assert state_bits(clone) == state_bits(layer)


REPRS = [
    (
        lambda: bnpy.LayerNorm(5, dtype=np.float64),
        ["LayerNorm(5,", "eps=1e-05", "elementwise_affine=True", "bias=True", "'float64'"],
    ),
    (
        lambda: bnpy.LayerNorm((4, 5), eps=1e-3, elementwise_affine=False),
        ["LayerNorm((4, 5),", "eps=0.001", "elementwise_affine=False", "'float32'"],
    ),
    (lambda: bnpy.LayerNorm(5, bias=False), ["LayerNorm(5,", "bias=False"]),
    (
        lambda: bnpy.RMSNorm(7, eps=1e-6, elementwise_affine=False, dtype="float64"),
        ["RMSNorm(7,", "eps=1e-06", "elementwise_affine=False", "'float64'"],
    ),
    (lambda: bnpy.RMSNorm((2, 3)), ["RMSNorm((2, 3),", "eps=None", "'float32'"]),
    (
        lambda: bnpy.GroupNorm(4, 8, eps=1e-3, affine=False, axis=-1, dtype=np.float64),
        ["GroupNorm(4, 8,", "eps=0.001", "affine=False", "axis=-1", "'float64'"],
    ),
    (
        lambda: bnpy.InstanceNorm(3, momentum=None, affine=True, track_running_stats=True, axis=2),
        [
            "InstanceNorm(3,",
            "momentum=None",
            "affine=True",
            "track_running_stats=True",
            "axis=2",
            "'float32'",
        ],
    ),
    (
        lambda: bnpy.InstanceNorm(6, eps=0.5, momentum=0.25),
        [
            "InstanceNorm(6,",
            "eps=0.5",
            "momentum=0.25",
            "affine=False",
            "track_running_stats=False",
        ],
    ),
]


@pytest.mark.parametrize("make, parts", REPRS)
def test_repr_shows_the_arguments_and_the_mode(make, parts):
    layer = make()
    text = repr(layer)
    for part in parts:
        assert part in text, f"{part!r} not in {text}"
    assert "training=True" in text
    assert "training=False" in repr(layer.eval())


def test_rms_norm_repr_after_setting_eps():
    layer = bnpy.RMSNorm(3)
    layer.eps = 1e-3
    assert "eps=0.001" in repr(layer)


@pytest.mark.parametrize("name", list(STATE_SPECS))
def test_train_and_eval(name):
    """train() and eval() return the layer and set the mode; only
    InstanceNorm with tracked statistics computes differently in eval mode,
    and only training changes its statistics"""
    spec = STATE_SPECS[name][0]
    layer, (x, dy) = trained_layer(name)
    assert layer.training
    assert layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training
    assert layer.train(False) is layer and not layer.training
    assert layer.train(True) is layer and layer.training
    y, dx = layer(x), layer.backward(dy)
    before = state_bits(layer)
    y_eval, dx_eval = layer.eval()(x), layer.backward(dy)
    assert state_bits(layer) == before
    if spec.track:
        assert not np.array_equal(y_eval, y)
        layer.train()(x)
        assert state_bits(layer) != before
    else:
        assert bits(y_eval) == bits(y) and bits(dx_eval) == bits(dx)


# ---- empty batches -----------------------------------------------------------------

EMPTY_SPECS = [
    pytest.param(Spec("layer", (0, 3, 4), (3, 4)), True, id="layer"),
    pytest.param(Spec("layer", (2, 0, 4), 4), True, id="layer-empty-middle"),
    pytest.param(Spec("rms", (0, 5), 5), True, id="rms"),
    pytest.param(Spec("group", (0, 4, 3), 2), True, id="group"),
    pytest.param(Spec("group", (0, 3, 4), 2, axis=-1), True, id="group-last"),
    pytest.param(Spec("instance", (0, 4, 3), affine=True, track=True), True, id="instance"),
    pytest.param(Spec("instance", (0, 4, 3), affine=True, track=True), False, id="instance-eval"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec, training", EMPTY_SPECS)
def test_empty_batch(spec, training, dtype):
    """N = 0: empty y and dx of x's shape and the layer's dtype, zero
    parameter gradients (overwriting those of the last backward), running
    statistics and num_batches_tracked untouched; out= works"""
    rng = np.random.default_rng(seed_of("empty", spec))
    full = (2,) + spec.shape[1:] if spec.shape[0] == 0 else (2, 3) + spec.shape[2:]
    layer = randomize(spec.layer(dtype), rng)
    layer(data(rng, full, dtype)[0])
    layer.backward(data(rng, full, dtype)[1])
    assert np.any(layer.grad_gamma != 0)
    layer.train(training)
    before = state_bits(layer)
    x = np.zeros(spec.shape, dtype)
    y = layer(x)
    assert y.shape == spec.shape and y.dtype == dtype
    dx = layer.backward(x)
    assert dx.shape == spec.shape and dx.dtype == dtype
    assert np.all(layer.grad_gamma == 0) and layer.grad_gamma.shape == layer.gamma.shape
    if layer.grad_beta is not None:
        assert np.all(layer.grad_beta == 0)
    assert state_bits(layer) == before
    out = np.empty(spec.shape, dtype)
    assert layer(x, out=out) is out
    assert layer.backward(x, out=out) is out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(Spec("layer", (0, 3, 4), (3, 4)), id="layer"),
        pytest.param(Spec("layer", (2, 0, 4), 4), id="layer-empty-middle"),
        pytest.param(Spec("rms", (0, 5), 5), id="rms"),
        pytest.param(
            Spec("group", (0, 4, 3), 2),
            id="group",
        ),
        pytest.param(
            Spec("group", (0, 3, 4), 2, axis=-1),
            id="group-last",
        ),
        pytest.param(
            Spec("instance", (0, 4, 3), affine=True),
            id="instance",
        ),
    ],
)
def test_functional_empty_batch(spec, dtype):
    """the functional forms on N = 0: empty y and statistics (shape (0, groups)
    for group and instance norm), empty dx and zero parameter gradients"""
    gamma = np.ones(spec.layer(dtype).gamma.shape, dtype)
    x = np.zeros(spec.shape, dtype)
    y, mean, invstd = spec.forward(x, gamma, None)
    assert y.shape == spec.shape and y.dtype == dtype and invstd.size == 0
    assert mean is None or mean.size == 0
    dx, dgamma, dbeta = spec.backward(x, x, gamma, mean, invstd)
    assert dx.shape == spec.shape
    assert dgamma.shape == gamma.shape and np.all(dgamma == 0)
    assert dbeta is None or np.all(dbeta == 0)


def test_float32_running_statistics_are_the_float64_ones_rounded_once():
    """InstanceNorm's running update steps in double and rounds once to the
    layer's dtype: after one training step from the initial 0 and 1 (exact
    in both dtypes), a float32 layer holds the float64 layer's running
    statistics rounded to float32, bit for bit."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal((4, 3, 50)) * 2 + 1).astype(np.float32)
        narrow = bnpy.InstanceNorm(3, track_running_stats=True)
        wide = bnpy.InstanceNorm(3, track_running_stats=True, dtype=np.float64)
        narrow(x)
        wide(x)
        assert bits(narrow.running_mean) == bits(wide.running_mean.astype(np.float32))
        assert bits(narrow.running_var) == bits(wide.running_var.astype(np.float32))


@pytest.mark.parametrize("make", [lambda: bnpy.LayerNorm(4), lambda: bnpy.GroupNorm(2, 4)])
def test_integer_input_is_rounded_once_to_the_layer_dtype(make):
    """int64 straight to float32, not through float64 (which rounds twice)"""
    v = np.array([[2**60 + 2**36 + 1, 2**60, 0, 1]] * 2, dtype=np.int64)
    assert bits(make()(v)) == bits(make()(v.astype(np.float32)))
