"""The BatchNorm object's contract: DESIGN.md section 3, "Public Python API".

Constructor, attributes, modes, forward/backward bookkeeping, state_dict,
pickling, repr and the layer's dtype rules. The numerics are checked only as
far as needed to see that the API wires the right data through; the full
comparison with the reference lives elsewhere.
"""

import copy
import gc
import pickle
import re

import numpy as np
import pytest
from bitwise import bits

import bnpy
from bnpy import reference
from bnpy.reference import batch_stats, normalize

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
TOL = {F32: dict(rtol=3e-5, atol=3e-5), F64: dict(rtol=1e-11, atol=1e-11)}
PARAMS = ("gamma", "beta", "running_mean", "running_var")


# --- small helpers (float64, written for reading) ---------------------------


def data(shape, seed=0, scale=3.0, offset=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale + offset


def train_grads(dy, x, gamma=None, eps=1e-5, axis=1):
    """(dx, dgamma, dbeta) of training-mode batch normalization."""
    return reference.backward(dy, x, *batch_stats(x, axis), gamma, eps, axis, training=True)


def state(bn):
    """Everything observable about a layer's state, bitwise."""
    out = {}
    for k, v in bn.state_dict().items():
        a = np.asarray(v)
        out[k] = (a.dtype.str, a.shape, a.tobytes())
    out["training"] = bn.training
    out["eps"] = bn.eps
    out["momentum"] = bn.momentum
    for k in ("grad_gamma", "grad_beta"):
        g = getattr(bn, k)
        out[k] = None if g is None else (np.asarray(g).shape, np.asarray(g).tobytes())
    return out


# --- constructor ------------------------------------------------------------


def test_constructor_defaults():
    bn = bnpy.BatchNorm(4)
    assert bn.num_features == 4 and type(bn.num_features) is int
    assert bn.eps == 1e-5
    assert bn.momentum == 0.1
    assert bn.affine is True
    assert bn.track_running_stats is True
    assert bn.axis == 1
    assert np.dtype(bn.dtype) == F32
    assert bn.training is True
    assert bn.num_batches_tracked == 0 and type(bn.num_batches_tracked) is int
    assert bn.grad_gamma is None and bn.grad_beta is None
    for name, value in [("gamma", 1), ("beta", 0), ("running_mean", 0), ("running_var", 1)]:
        a = getattr(bn, name)
        assert isinstance(a, np.ndarray), name
        assert a.shape == (4,) and a.dtype == F32, name
        assert np.array_equal(a, np.full(4, value, F32)), name


def test_constructor_keywords():
    bn = bnpy.BatchNorm(
        num_features=6,
        eps=1e-3,
        momentum=0.25,
        affine=False,
        track_running_stats=True,
        axis=-1,
        dtype=np.float64,
    )
    assert (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.axis) == (
        6,
        1e-3,
        0.25,
        False,
        True,
        -1,
    )
    assert np.dtype(bn.dtype) == F64
    assert bn.gamma is None and bn.beta is None
    assert bn.running_mean.dtype == F64 and bn.running_mean.shape == (6,)


def test_constructor_positional():
    bn = bnpy.BatchNorm(5, 1e-3, 0.5, True, False, 2, np.float64)
    assert (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.axis) == (
        5,
        1e-3,
        0.5,
        True,
        False,
        2,
    )
    assert np.dtype(bn.dtype) == F64
    assert bn.running_mean is None and bn.running_var is None
    assert bn.gamma.dtype == F64


@pytest.mark.parametrize(
    "spelling, expected",
    [
        (np.float32, F32),
        ("float32", F32),
        (np.dtype("float32"), F32),
        (np.float64, F64),
        ("float64", F64),
        (np.dtype("float64"), F64),
    ],
)
def test_dtype_spellings(spelling, expected):
    bn = bnpy.BatchNorm(3, dtype=spelling)
    assert np.dtype(bn.dtype) == expected
    for name in PARAMS:
        assert getattr(bn, name).dtype == expected, name
    assert bn(data((4, 3))).dtype == expected


def test_boundary_values_accepted():
    # momentum is in the closed interval [0, 1], or None; plain ints are numbers too
    for m in (0.0, 1.0, None, 0, 1):
        assert bnpy.BatchNorm(2, momentum=m).momentum == m
    assert bnpy.BatchNorm(2, eps=1).eps == 1.0
    assert bnpy.BatchNorm(np.int64(3)).num_features == 3
    assert bnpy.BatchNorm(1).num_features == 1


BAD_ARGUMENTS = [
    (dict(num_features=0), ValueError, "num_features"),
    (dict(num_features=-1), ValueError, "num_features"),
    (dict(num_features=2.5), TypeError, "num_features"),
    (dict(num_features="3"), TypeError, "num_features"),
    (dict(num_features=None), TypeError, "num_features"),
    (dict(num_features=3, eps=0), ValueError, "eps"),
    (dict(num_features=3, eps=0.0), ValueError, "eps"),
    (dict(num_features=3, eps=-1.0), ValueError, "eps"),
    (dict(num_features=3, eps=float("nan")), ValueError, "eps"),
    (dict(num_features=3, eps="1e-5"), TypeError, "eps"),
    (dict(num_features=3, momentum=-0.1), ValueError, "momentum"),
    (dict(num_features=3, momentum=1.5), ValueError, "momentum"),
    (dict(num_features=3, momentum=float("nan")), ValueError, "momentum"),
    (dict(num_features=3, momentum=float("inf")), ValueError, "momentum"),
    (dict(num_features=3, momentum="0.1"), TypeError, "momentum"),
    (dict(num_features=3, affine="False"), TypeError, "affine"),
    (dict(num_features=3, affine=None), TypeError, "affine"),
    (dict(num_features=3, track_running_stats="False"), TypeError, "track_running_stats"),
    (dict(num_features=3, track_running_stats=None), TypeError, "track_running_stats"),
    (dict(num_features=3, axis=1.0), TypeError, "axis"),
    (dict(num_features=3, axis="1"), TypeError, "axis"),
    (dict(num_features=3, axis=None), TypeError, "axis"),
]


@pytest.mark.parametrize(
    "kwargs, exc, name",
    BAD_ARGUMENTS,
    ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _, _ in BAD_ARGUMENTS],
)
def test_constructor_rejects(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        bnpy.BatchNorm(**kwargs)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, "foo", np.complex64, "int64", object])
def test_constructor_rejects_dtype(dtype):
    # a wrong type or an unsupported dtype: either error, but it must name dtype
    with pytest.raises((TypeError, ValueError), match="dtype"):
        bnpy.BatchNorm(3, dtype=dtype)


def test_constructor_signature_errors():
    with pytest.raises(TypeError):
        bnpy.BatchNorm()
    with pytest.raises(TypeError):
        bnpy.BatchNorm(3, bogus=1)
    with pytest.raises(TypeError):
        bnpy.BatchNorm(3, 1e-5, 0.1, True, True, 1, np.float32, "extra")


# --- parameter and statistics attributes -----------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_optional_attributes_are_none(affine, track):
    bn = bnpy.BatchNorm(3, affine=affine, track_running_stats=track)
    assert (bn.gamma is None) == (not affine)
    assert (bn.beta is None) == (not affine)
    assert (bn.running_mean is None) == (not track)
    assert (bn.running_var is None) == (not track)


@pytest.mark.parametrize("name", PARAMS)
def test_reading_shares_memory_with_layer(name):
    bn = bnpy.BatchNorm(3)
    a, b = getattr(bn, name), getattr(bn, name)
    assert a.flags.writeable
    assert np.shares_memory(a, b)
    a[1] = 7.5
    assert getattr(bn, name)[1] == np.float32(7.5)
    assert bn.state_dict()[name][1] == np.float32(7.5)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_writing_through_views_changes_forward(dtype):
    x = data((8, 3))
    bn = bnpy.BatchNorm(3, dtype=dtype)
    bn.gamma[:] = 2
    bn.beta[:] = [1, -1, 0.5]
    mean, var = batch_stats(x.astype(dtype))
    np.testing.assert_allclose(
        bn(x), normalize(x.astype(dtype), mean, var, [2, 2, 2], [1, -1, 0.5]), **TOL[dtype]
    )

    bn.eval()
    bn.running_mean[:] = [1, 2, 3]
    bn.running_var[:] = [4, 0.25, 9]
    np.testing.assert_allclose(
        bn(x),
        normalize(x.astype(dtype), [1, 2, 3], [4, 0.25, 9], [2, 2, 2], [1, -1, 0.5]),
        **TOL[dtype],
    )


def test_view_outlives_layer():
    views = [bnpy.BatchNorm(5).gamma, bnpy.BatchNorm(5).running_var]
    gc.collect()
    others = [bnpy.BatchNorm(5) for _ in range(64)]
    for o in others:
        o.gamma[:] = -3
        o.running_var[:] = -3
    for v in views:
        assert np.array_equal(v, np.ones(5, F32))


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_assignment_copies_values_in(name, dtype):
    bn = bnpy.BatchNorm(3, dtype=dtype)
    old_view = getattr(bn, name)
    src = np.array([0.5, 2.0, 3.25])  # float64 whatever the layer's dtype
    setattr(bn, name, src)
    got = getattr(bn, name)
    assert got.dtype == dtype and got.shape == (3,)
    assert np.array_equal(got, src.astype(dtype))
    assert not np.shares_memory(got, src)
    src[:] = -1
    assert np.array_equal(getattr(bn, name), np.array([0.5, 2.0, 3.25], dtype))
    # "copies the values in": a view read earlier sees the new values
    assert np.array_equal(old_view, np.array([0.5, 2.0, 3.25], dtype))
    setattr(bn, name, [4, 5, 6])  # any array-like of the right length
    assert np.array_equal(getattr(bn, name), np.array([4, 5, 6], dtype))


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize(
    "bad",
    [np.ones(4), np.ones(2), np.ones((3, 1)), np.ones((1, 3)), np.float64(1.0), np.ones(0)],
    ids=["(4,)", "(2,)", "(3,1)", "(1,3)", "()", "(0,)"],
)
def test_assignment_wrong_shape(name, bad):
    bn = bnpy.BatchNorm(3)
    bn(data((6, 3)))
    before = state(bn)
    with pytest.raises(ValueError):
        setattr(bn, name, bad)
    assert state(bn) == before


@pytest.mark.parametrize(
    "name, value",
    [
        ("num_features", 5),
        ("affine", False),
        ("track_running_stats", False),
        ("axis", 0),
        ("dtype", np.float64),
    ],
)
def test_read_only_attributes(name, value):
    bn = bnpy.BatchNorm(3)
    before = getattr(bn, name)
    with pytest.raises(AttributeError):
        setattr(bn, name, value)
    assert getattr(bn, name) == before
    assert bn.gamma.shape == (3,) and bn.gamma.dtype == F32


def test_eps_and_momentum_are_settable():
    x = data((10, 3))
    bn = bnpy.BatchNorm(3)
    bn.eps = 0.5
    assert bn.eps == 0.5
    mean, var = batch_stats(x.astype(np.float32))
    np.testing.assert_allclose(
        bn(x), normalize(x.astype(np.float32), mean, var, eps=0.5), **TOL[F32]
    )

    bn = bnpy.BatchNorm(3, dtype=np.float64)
    bn.momentum = 0.5
    assert bn.momentum == 0.5
    bn(x)
    m, v = batch_stats(x)
    np.testing.assert_allclose(bn.running_mean, 0.5 * m, **TOL[F64])
    np.testing.assert_allclose(bn.running_var, 0.5 + 0.5 * v * 10 / 9, **TOL[F64])

    # None: cumulative average over the batches seen so far
    bn = bnpy.BatchNorm(3, dtype=np.float64)
    bn.momentum = None
    assert bn.momentum is None
    x2 = data((10, 3), seed=1)
    bn(x)
    bn(x2)
    m2, v2 = batch_stats(x2)
    np.testing.assert_allclose(bn.running_mean, (m + m2) / 2, **TOL[F64])
    np.testing.assert_allclose(bn.running_var, (v + v2) / 2 * 10 / 9, **TOL[F64])
    assert bn.num_batches_tracked == 2


@pytest.mark.parametrize(
    "name, value, exc",
    [
        ("eps", 0.0, ValueError),
        ("eps", -1e-5, ValueError),
        ("eps", float("nan"), ValueError),
        ("eps", "0.1", TypeError),
        ("eps", None, TypeError),
        ("momentum", -0.1, ValueError),
        ("momentum", 1.5, ValueError),
        ("momentum", float("nan"), ValueError),
        ("momentum", "0.1", TypeError),
    ],
)
def test_eps_and_momentum_setters_validate(name, value, exc):
    bn = bnpy.BatchNorm(3, eps=1e-3, momentum=0.3)
    with pytest.raises(exc, match=name):
        setattr(bn, name, value)
    assert (bn.eps, bn.momentum) == (1e-3, 0.3)


# --- modes ------------------------------------------------------------------


def test_train_and_eval_return_layer():
    bn = bnpy.BatchNorm(3)
    assert bn.training is True
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False) is bn and bn.training is False
    assert bn.train(mode=True) is bn and bn.training is True
    assert bn.train(mode=False) is bn and bn.training is False


def test_modes_choose_statistics():
    x = data((12, 3)).astype(np.float32)
    bn = bnpy.BatchNorm(3, momentum=0.5)
    mean, var = batch_stats(x)
    y = bn(x)  # training: batch statistics, running stats updated
    np.testing.assert_allclose(y, normalize(x, mean, var), **TOL[F32])
    assert bn.num_batches_tracked == 1
    np.testing.assert_allclose(bn.running_mean, 0.5 * mean, **TOL[F32])
    np.testing.assert_allclose(bn.running_var, 0.5 + 0.5 * var * 12 / 11, **TOL[F32])

    bn.eval()  # eval: running statistics, nothing updated
    before = state(bn)
    y = bn(x)
    np.testing.assert_allclose(y, normalize(x, 0.5 * mean, 0.5 + 0.5 * var * 12 / 11), **TOL[F32])
    assert state(bn) == before
    assert bn.num_batches_tracked == 1

    # not tracked: eval mode normalizes with the batch statistics
    bn = bnpy.BatchNorm(3, track_running_stats=False).eval()
    np.testing.assert_allclose(bn(x), normalize(x, mean, var), **TOL[F32])


# --- forward ----------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_call_is_forward(training):
    x = data((7, 4))
    a = bnpy.BatchNorm(4).train(training)
    b = bnpy.BatchNorm(4).train(training)
    for layer in (a, b):
        layer.running_mean[:] = [0.5, 1, -1, 2]
        layer.running_var[:] = [2, 3, 4, 0.5]
    assert bits(a(x)) == bits(b.forward(x))
    assert state(a) == state(b)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_forward_out(dtype):
    x = data((5, 3, 2))
    ref = bnpy.BatchNorm(3, dtype=dtype)(x)
    bn = bnpy.BatchNorm(3, dtype=dtype)
    out = np.full((5, 3, 2), np.nan, dtype)
    y = bn.forward(x, out=out)
    assert y is out
    assert bits(out) == bits(ref)
    with pytest.raises(TypeError):
        bn.forward(x, np.empty((5, 3, 2), dtype))  # out is keyword-only


def _bad_outs():
    base = np.full((8, 6), 99.0, np.float32)
    ro = np.full((4, 3), 99.0, np.float32)
    ro.flags.writeable = False
    return {
        "shape": np.full((4, 4), 99.0, np.float32),
        "transposed-shape": np.full((3, 4), 99.0, np.float32),
        "dtype": np.full((4, 3), 99.0, np.float64),
        "non-contiguous": base[::2, ::2],
        "fortran": np.asfortranarray(np.full((4, 3), 99.0, np.float32)),
        "read-only": ro,
    }


@pytest.mark.parametrize("kind", [k for k in _bad_outs() if k != "fortran"])  # x takes its layout
def test_forward_out_rejected(kind):
    out = _bad_outs()[kind]
    snapshot = out.copy()
    bn = bnpy.BatchNorm(3)
    bn(data((4, 3), seed=3))
    before = state(bn)
    with pytest.raises((ValueError, TypeError)):
        bn.forward(data((4, 3)), out=out)
    assert np.array_equal(out, snapshot)
    assert state(bn) == before


def test_forward_leaves_input_and_old_results_alone():
    x = data((6, 3)).astype(np.float32)
    x_before = x.copy()
    bn = bnpy.BatchNorm(3)
    y1 = bn(x)
    y1_copy = y1.copy()
    assert np.array_equal(x, x_before)
    assert not np.shares_memory(y1, x)
    dy = data((6, 3), seed=5).astype(np.float32)
    dy_before = dy.copy()
    dx1 = bn.backward(dy)
    dx1_copy = dx1.copy()
    assert np.array_equal(dy, dy_before)
    bn(data((6, 3), seed=9))
    bn.backward(data((6, 3), seed=10))
    assert np.array_equal(y1, y1_copy)
    assert np.array_equal(dx1, dx1_copy)


# --- backward ---------------------------------------------------------------


def test_backward_before_forward():
    bn = bnpy.BatchNorm(3)
    with pytest.raises(RuntimeError):
        bn.backward(np.ones((4, 3), np.float32))
    assert bn.grad_gamma is None and bn.grad_beta is None


@pytest.mark.parametrize("dtype", [F32, F64])
def test_backward_sets_gradients(dtype):
    x = data((8, 3, 2)).astype(dtype)
    dy = data((8, 3, 2), seed=1).astype(dtype)
    bn = bnpy.BatchNorm(3, dtype=dtype)
    bn.gamma[:] = [0.5, 2, -1]
    bn(x)
    assert bn.grad_gamma is None and bn.grad_beta is None
    dx = bn.backward(dy)
    edx, edg, edb = train_grads(dy, x, [0.5, 2, -1])
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_allclose(dx, edx, **TOL[dtype])
    assert np.shape(bn.grad_gamma) == (3,) and np.shape(bn.grad_beta) == (3,)
    np.testing.assert_allclose(bn.grad_gamma, edg, **TOL[dtype])
    np.testing.assert_allclose(bn.grad_beta, edb, **TOL[dtype])

    # overwritten, not accumulated: same forward, another dy
    dy2 = data((8, 3, 2), seed=2).astype(dtype)
    bn.backward(dy2)
    _, edg2, edb2 = train_grads(dy2, x, [0.5, 2, -1])
    np.testing.assert_allclose(bn.grad_gamma, edg2, **TOL[dtype])
    np.testing.assert_allclose(bn.grad_beta, edb2, **TOL[dtype])
    # and after a new forward
    x3 = data((4, 3, 5), seed=3).astype(dtype)
    dy3 = data((4, 3, 5), seed=4).astype(dtype)
    bn(x3)
    bn.backward(dy3)
    _, edg3, edb3 = train_grads(dy3, x3, [0.5, 2, -1])
    np.testing.assert_allclose(bn.grad_gamma, edg3, **TOL[dtype])
    np.testing.assert_allclose(bn.grad_beta, edb3, **TOL[dtype])


def test_backward_twice_is_bitwise_equal():
    bn = bnpy.BatchNorm(4)
    bn(data((16, 4, 3)))
    dy = data((16, 4, 3), seed=7)
    dx1 = bn.backward(dy)
    g1, b1 = bits(bn.grad_gamma), bits(bn.grad_beta)
    dx2 = bn.backward(dy)
    assert bits(dx1) == bits(dx2)
    assert (g1, b1) == (bits(bn.grad_gamma), bits(bn.grad_beta))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_backward_out(dtype):
    x, dy = data((6, 3)), data((6, 3), seed=1)
    bn = bnpy.BatchNorm(3, dtype=dtype)
    bn(x)
    ref = bn.backward(dy)
    out = np.full((6, 3), np.nan, dtype)
    got = bn.backward(dy, out=out)
    assert got is out
    assert bits(out) == bits(ref)
    with pytest.raises(TypeError):
        bn.backward(dy, np.empty((6, 3), dtype))  # out is keyword-only


@pytest.mark.parametrize("kind", list(_bad_outs()))
def test_backward_out_rejected(kind):
    out = _bad_outs()[kind]
    snapshot = out.copy()
    bn = bnpy.BatchNorm(3)
    bn(data((4, 3)))
    bn.backward(data((4, 3), seed=1))
    before = state(bn)
    with pytest.raises((ValueError, TypeError)):
        bn.backward(data((4, 3), seed=2), out=out)
    assert np.array_equal(out, snapshot)
    assert state(bn) == before


@pytest.mark.parametrize("shape", [(6, 4), (4, 3), (6, 3, 1), (18,), (3, 6)])
def test_backward_wrong_dy_shape(shape):
    bn = bnpy.BatchNorm(3)
    bn(data((6, 3)))
    with pytest.raises(ValueError):
        bn.backward(np.ones(shape, np.float32))


def test_backward_follows_last_forward_not_current_mode():
    x, dy = data((8, 3)), data((8, 3), seed=1)
    bn = bnpy.BatchNorm(3, dtype=np.float64)
    bn(x)
    bn.eval()  # switching mode after the forward must not change its backward
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, train_grads(dy, x)[0], **TOL[F64])

    # and an eval-mode forward is differentiated with constant statistics
    bn.running_mean[:] = [1, 0, -1]
    bn.running_var[:] = [2, 0.5, 4]
    bn(x)
    bn.train()
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, dy / np.sqrt(np.array([2, 0.5, 4]) + 1e-5), **TOL[F64])


def test_backward_after_in_place_forward():
    # forward(x, out=x) normalizes in place; backward still needs the old x
    x = data((8, 3)).astype(np.float32)
    dy = data((8, 3), seed=1).astype(np.float32)
    ref = bnpy.BatchNorm(3)
    y_ref = ref(x.copy())
    expected = bits(ref.backward(dy))

    bn = bnpy.BatchNorm(3)
    xx = x.copy()
    assert bn.forward(xx, out=xx) is xx
    assert bits(xx) == bits(y_ref)
    assert bits(bn.backward(dy)) == expected


def test_backward_converts_dy():
    x = data((6, 3))
    bn = bnpy.BatchNorm(3)
    bn(x)
    dy = data((6, 3), seed=1)
    a = bn.backward(dy.astype(np.float32))
    b = bn.backward(dy)  # float64 dy to a float32 layer
    c = bn.backward(dy.astype(np.float32).tolist())  # nested lists
    np.testing.assert_allclose(b, a, **TOL[F32])
    np.testing.assert_allclose(c, a, **TOL[F32])


# --- state_dict / load_state_dict ------------------------------------------


@pytest.mark.parametrize(
    "affine, track, keys",
    [
        (True, True, {"gamma", "beta", "running_mean", "running_var", "num_batches_tracked"}),
        (True, False, {"gamma", "beta"}),
        (False, True, {"running_mean", "running_var", "num_batches_tracked"}),
        (False, False, set()),
    ],
)
def test_state_dict_keys(affine, track, keys):
    bn = bnpy.BatchNorm(3, affine=affine, track_running_stats=track)
    assert set(bn.state_dict()) == keys


@pytest.mark.parametrize("dtype", [F32, F64])
def test_state_dict_is_a_copy(dtype):
    bn = bnpy.BatchNorm(3, dtype=dtype)
    bn.gamma[:] = [1, 2, 3]
    bn(data((5, 3)))
    bn(data((5, 3), seed=1))
    sd = bn.state_dict()
    assert int(sd["num_batches_tracked"]) == 2
    for name in PARAMS:
        assert sd[name].dtype == dtype and sd[name].shape == (3,)
        assert np.array_equal(sd[name], getattr(bn, name))
        assert not np.shares_memory(sd[name], getattr(bn, name))
    before = state(bn)
    for name in PARAMS:
        sd[name][:] = 42
    assert state(bn) == before


def _trained(dtype=np.float32, **kw):
    bn = bnpy.BatchNorm(3, dtype=dtype, **kw)
    bn.gamma[:] = [0.5, 1.5, -2]
    bn.beta[:] = [0.25, 0, 1]
    for seed in range(3):
        bn(data((6, 3), seed=seed))
    return bn


def _new_state(dtype=np.float32):
    return {
        "gamma": np.array([3.0, 4.0, 5.0], dtype),
        "beta": np.array([-1.0, -2.0, -3.0], dtype),
        "running_mean": np.array([0.1, 0.2, 0.3], dtype),
        "running_var": np.array([1.5, 2.5, 3.5], dtype),
        "num_batches_tracked": 17,
    }


def test_load_state_dict_round_trip():
    src = _trained()
    dst = bnpy.BatchNorm(3)
    dst.load_state_dict(src.state_dict())
    assert state(dst) == state(src)
    assert dst.num_batches_tracked == 3
    x = data((4, 3), seed=11)
    assert bits(dst.eval()(x)) == bits(src.eval()(x))


def test_load_state_dict_values():
    bn = _trained()
    new = _new_state()
    bn.load_state_dict(new)
    for name in PARAMS:
        assert np.array_equal(getattr(bn, name), new[name])
        assert not np.shares_memory(getattr(bn, name), new[name])
    assert bn.num_batches_tracked == 17 and type(bn.num_batches_tracked) is int
    new["gamma"][:] = 0
    assert np.array_equal(bn.gamma, [3, 4, 5])


def test_load_state_dict_torch_names_and_conversion():
    # what {k: v.numpy() for k, v in torch_bn.state_dict().items()} looks like
    sd = _new_state(np.float32)
    sd["weight"] = sd.pop("gamma")
    sd["bias"] = sd.pop("beta")
    sd["num_batches_tracked"] = np.array(17, np.int64)
    bn = bnpy.BatchNorm(3, dtype=np.float64)
    bn.load_state_dict(sd)
    assert bn.gamma.dtype == F64
    assert np.array_equal(bn.gamma, np.float32([3, 4, 5]).astype(np.float64))
    assert np.array_equal(bn.beta, [-1, -2, -3])
    assert np.array_equal(bn.running_var, np.float32([1.5, 2.5, 3.5]).astype(np.float64))
    assert bn.num_batches_tracked == 17


def _corrupt(kind):
    sd = _new_state()
    if kind.startswith("missing-"):
        key = kind[len("missing-") :]
        del sd[key]
        return sd, key
    if kind == "unknown":
        sd["foo"] = np.zeros(3, np.float32)
        return sd, "foo"
    key, how = {
        "shape-gamma": ("gamma", np.ones(4, np.float32)),
        "shape-beta": ("beta", np.float32(0)),
        "shape-running_mean": ("running_mean", np.zeros((3, 1), np.float32)),
        "shape-running_var": ("running_var", np.ones(2, np.float32)),
        "nan-gamma": ("gamma", np.array([1, np.nan, 1], np.float32)),
        "inf-beta": ("beta", np.array([0, 0, np.inf], np.float32)),
        "neginf-running_mean": ("running_mean", np.array([-np.inf, 0, 0], np.float32)),
        "nan-running_var": ("running_var", np.array([1, 1, np.nan], np.float32)),
        "negative-running_var": ("running_var", np.array([1, -0.5, 1], np.float32)),
    }[kind]
    sd[key] = how
    return sd, key


@pytest.mark.parametrize(
    "kind",
    [
        "missing-gamma",
        "missing-beta",
        "missing-running_mean",
        "missing-running_var",
        "unknown",
        "shape-gamma",
        "shape-beta",
        "shape-running_mean",
        "shape-running_var",
        "nan-gamma",
        "inf-beta",
        "neginf-running_mean",
        "nan-running_var",
        "negative-running_var",
    ],
)
def test_load_state_dict_rejects(kind):
    bn = _trained()
    bn.backward(data((6, 3), seed=8))
    sd, key = _corrupt(kind)
    before = state(bn)
    with pytest.raises(ValueError, match=key):
        bn.load_state_dict(sd)
    assert state(bn) == before
    assert bn.num_batches_tracked == 3


def test_load_state_dict_keys_follow_flags():
    bn = bnpy.BatchNorm(3, affine=False)
    sd = _new_state()
    before = state(bn)
    with pytest.raises(ValueError, match=r"gamma|beta"):
        bn.load_state_dict(sd)  # gamma/beta are unknown keys without affine
    assert state(bn) == before
    del sd["gamma"], sd["beta"]
    bn.load_state_dict(sd)
    assert np.array_equal(bn.running_var, np.float32([1.5, 2.5, 3.5]))


# --- pickle and deepcopy ----------------------------------------------------

CONFIGS = {
    "default": dict(),
    "f64-momentum-none-eval": dict(dtype=np.float64, momentum=None, eval=True),
    "channels-last": dict(axis=-1, eps=1e-3, momentum=0.7),
    "no-affine": dict(affine=False, eps=0.25),
    "untracked-eval": dict(track_running_stats=False, eval=True),
}


def _configured(cfg):
    cfg = dict(cfg)
    to_eval = cfg.pop("eval", False)
    bn = bnpy.BatchNorm(3, **cfg)
    if bn.affine:
        bn.gamma[:] = [0.5, 1.5, -2]
        bn.beta[:] = [0.25, 0, 1]
    for seed in range(3):
        bn(_x_for(bn, seed))
    if to_eval:
        bn.eval()
    return bn


def _x_for(bn, seed):
    x = data((5, 3, 4), seed=seed)
    return np.moveaxis(x, 1, -1).copy() if bn.axis == -1 else x


ROUND_TRIPS = {
    "pickle": lambda bn: pickle.loads(pickle.dumps(bn)),
    "pickle-highest": lambda bn: pickle.loads(pickle.dumps(bn, pickle.HIGHEST_PROTOCOL)),
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_round_trip(how, cfg):
    bn = _configured(CONFIGS[cfg])
    c = ROUND_TRIPS[how](bn)
    assert type(c) is type(bn) and c is not bn
    for name in (
        "num_features",
        "eps",
        "momentum",
        "affine",
        "track_running_stats",
        "axis",
        "training",
    ):
        assert getattr(c, name) == getattr(bn, name), name
    assert np.dtype(c.dtype) == np.dtype(bn.dtype)
    if bn.track_running_stats:
        assert c.num_batches_tracked == bn.num_batches_tracked == 3
    sd_b, sd_c = bn.state_dict(), c.state_dict()
    assert set(sd_b) == set(sd_c)
    for k in sd_b:
        assert bits(sd_b[k]) == bits(sd_c[k]), k
    # same behaviour: one more forward (which in training updates the running
    # stats, by the cumulative average when momentum is None)
    x = _x_for(bn, 10)
    assert bits(c(x)) == bits(bn(x))
    for k, v in bn.state_dict().items():
        assert bits(v) == bits(c.state_dict()[k]), k


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
def test_round_trip_is_independent(how):
    bn = _configured(CONFIGS["default"])
    c = ROUND_TRIPS[how](bn)
    for name in PARAMS:
        assert not np.shares_memory(getattr(c, name), getattr(bn, name)), name
    before = state(bn)
    for name in PARAMS:
        getattr(c, name)[:] = 9
    c.eps = 0.5
    c.momentum = 0.9
    c.eval()
    c.train()
    c(_x_for(c, 20))
    c.backward(_x_for(c, 21))
    assert state(bn) == before


# --- repr -------------------------------------------------------------------


def test_repr_shows_arguments_and_mode():
    bn = bnpy.BatchNorm(
        7,
        eps=0.001,
        momentum=0.25,
        affine=False,
        track_running_stats=True,
        axis=-1,
        dtype=np.float64,
    )
    r = repr(bn)
    assert "BatchNorm" in r
    assert re.search(r"\b7\b", r), r
    assert re.search(r"\beps\W+0\.001\b", r), r
    assert re.search(r"\bmomentum\W+0\.25\b", r), r
    assert re.search(r"\baffine\W+False\b", r), r
    assert re.search(r"\btrack_running_stats\W+True\b", r), r
    assert re.search(r"\baxis\W+-1\b", r), r
    assert re.search(r"\bdtype\W+.*float64", r), r
    r_eval = repr(bn.eval())
    assert r_eval != r
    assert re.search(r"eval|training\W+False", r_eval), r_eval

    r = repr(bnpy.BatchNorm(2, momentum=None, affine=True, track_running_stats=False))
    assert re.search(r"\bmomentum\W+None\b", r), r
    assert re.search(r"\baffine\W+True\b", r), r
    assert re.search(r"\btrack_running_stats\W+False\b", r), r
    assert re.search(r"\baxis\W+1\b", r), r
    assert "float32" in r


# --- the layer's dtype rules ------------------------------------------------


@pytest.mark.parametrize("layer_dtype", [F32, F64])
@pytest.mark.parametrize(
    "input_dtype",
    [np.float32, np.float64, np.float16, np.int8, np.int32, np.int64, np.uint8, np.uint64],
)
def test_input_converted_to_layer_dtype(layer_dtype, input_dtype):
    x = np.arange(24).reshape(6, 4) % 7 + np.array([0, 1, 3, 5])
    x = x.astype(input_dtype)
    bn = bnpy.BatchNorm(4, dtype=layer_dtype)
    y = bn(x)
    # a float32 layer keeps float16 (mixed precision: tests/test_half.py)
    kept = input_dtype == np.float16 and layer_dtype == F32
    assert y.dtype == (np.float16 if kept else layer_dtype) and y.shape == (6, 4)
    ref = bnpy.BatchNorm(4, dtype=layer_dtype)(x.astype(layer_dtype))
    np.testing.assert_allclose(y, ref, **(dict(rtol=1e-3, atol=1e-3) if kept else TOL[layer_dtype]))
    np.testing.assert_allclose(bn.running_mean, batch_stats(x)[0] * 0.1, **TOL[layer_dtype])


def test_float64_input_to_float32_layer():
    x = data((8, 3))
    bn = bnpy.BatchNorm(3)
    y = bn(x)
    assert y.dtype == F32
    mean, var = batch_stats(x)
    np.testing.assert_allclose(y, normalize(x, mean, var), rtol=1e-4, atol=1e-4)


def test_bool_input():
    x = np.array([[True, False], [False, False], [True, True], [False, True]])
    y = bnpy.BatchNorm(2)(x)
    assert y.dtype == F32
    mean, var = batch_stats(x.astype(np.float64))
    np.testing.assert_allclose(y, normalize(x, mean, var), **TOL[F32])


def test_python_lists():
    x = [[1, 2, 3], [4, 6, 8], [0.5, -1, 2]]
    bn = bnpy.BatchNorm(3)
    y = bn(x)
    assert isinstance(y, np.ndarray) and y.shape == (3, 3) and y.dtype == F32
    mean, var = batch_stats(np.array(x))
    np.testing.assert_allclose(y, normalize(np.array(x), mean, var), **TOL[F32])


@pytest.mark.parametrize(
    "x",
    [
        np.ones((4, 3), np.complex128),
        np.ones((4, 3), np.complex64),
        np.ones((4, 3), object),
        np.full((4, 3), "a"),
        np.full((4, 3), b"a"),
    ],
    ids=["complex128", "complex64", "object", "str", "bytes"],
)
def test_non_real_inputs(x):
    bn = bnpy.BatchNorm(3)
    before = state(bn)
    with pytest.raises(TypeError):
        bn(x)
    assert state(bn) == before


@pytest.mark.parametrize("layout", ["fortran", "strided", "byteswapped", "transposed-view"])
def test_any_memory_layout(layout):
    base = data((6, 3, 5)).astype(np.float32)
    x = {
        "fortran": lambda: np.asfortranarray(base),
        "strided": lambda: np.repeat(base, 2, axis=0)[::2],
        "byteswapped": lambda: base.astype(base.dtype.newbyteorder()),
        "transposed-view": lambda: np.ascontiguousarray(base.transpose(2, 1, 0)).transpose(2, 1, 0),
    }[layout]()
    assert np.array_equal(x, base)
    a, b = bnpy.BatchNorm(3), bnpy.BatchNorm(3)
    np.testing.assert_allclose(a(x), b(base), **TOL[F32])
    dy = data((6, 3, 5), seed=1).astype(np.float32)
    np.testing.assert_allclose(a.backward(np.asfortranarray(dy)), b.backward(dy), **TOL[F32])
    assert state(a) == state(b)


def test_axis_selects_feature_dimension():
    x = data((4, 3, 5, 2))  # NCHW
    nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    y1 = bnpy.BatchNorm(3, dtype=np.float64)(x)
    for axis in (-1, 3):
        bn = bnpy.BatchNorm(3, axis=axis, dtype=np.float64)
        y = bn(nhwc)
        np.testing.assert_allclose(y, np.moveaxis(y1, 1, -1), **TOL[F64])
    bn = bnpy.BatchNorm(5, axis=2, dtype=np.float64)
    mean, var = batch_stats(x, axis=2)
    np.testing.assert_allclose(bn(x), normalize(x, mean, var, axis=2), **TOL[F64])
    bn = bnpy.BatchNorm(4, axis=0, dtype=np.float64)
    mean, var = batch_stats(x, axis=0)
    np.testing.assert_allclose(bn(x), normalize(x, mean, var, axis=0), **TOL[F64])
