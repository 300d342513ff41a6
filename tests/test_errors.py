"""DESIGN.md section 3, "Errors users meet": the exception type, the values in
the message, and that a failed call changes nothing.

For the layer, every failing call is made against several layer states
(fresh or after a forward/backward, training or eval, with or without affine
and running statistics). A snapshot of everything observable -- state_dict,
mode, eps/momentum, grad_gamma/grad_beta, and what a backward with a fixed dy
returns (or that it still raises) -- must be bitwise identical afterwards.
"""

import re

import numpy as np
import pytest
from bitwise import bits

import bnpy

C = 3


def data(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape) * 2 + 0.5


def shape_text(shape):
    """A shape as Python prints it, ready for pytest.raises(match=...)."""
    return re.escape(str(tuple(shape)))


# --- the layer: exact messages ----------------------------------------------


def test_feature_mismatch_message():
    bn = bnpy.BatchNorm(64)
    msg = "expected 64 features on axis 1, got input of shape (8, 32)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        bn(np.zeros((8, 32), np.float32))
    bn.eval()
    with pytest.raises(ValueError, match=re.escape(msg)):
        bn(np.zeros((8, 32), np.float32))


def test_feature_mismatch_message_4d_and_other_axes():
    with pytest.raises(
        ValueError,
        match=re.escape("expected 3 features on axis 1, got input of shape (2, 5, 4, 4)"),
    ):
        bnpy.BatchNorm(3)(np.zeros((2, 5, 4, 4)))
    with pytest.raises(
        ValueError, match=re.escape("expected 3 features on axis 2, got input of shape (2, 3, 4)")
    ):
        bnpy.BatchNorm(3, axis=2)(np.zeros((2, 3, 4)))
    # a negative axis: the values must be there; how the axis is spelled is open
    with pytest.raises(
        ValueError,
        match=r"expected 64 features on axis (-1|2), got input of shape " + shape_text((8, 5, 32)),
    ):
        bnpy.BatchNorm(64, axis=-1)(np.zeros((8, 5, 32)))


@pytest.mark.parametrize("shape", [(1, 64), (1, 64, 1), (1, 64, 1, 1)])
def test_one_value_per_channel_message(shape):
    bn = bnpy.BatchNorm(64)
    msg = f"Expected more than 1 value per channel when training, got input of shape {shape}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        bn(np.ones(shape, np.float32))


def test_one_value_per_channel_is_fine_when_not_training():
    bn = bnpy.BatchNorm(4).eval()
    y = bn(np.arange(4.0).reshape(1, 4))
    np.testing.assert_allclose(y, np.arange(4.0).reshape(1, 4) / np.sqrt(1 + 1e-5), rtol=1e-6)
    bn = bnpy.BatchNorm(4)
    assert bn(np.arange(8.0).reshape(1, 4, 2)).shape == (1, 4, 2)  # 2 values per channel


@pytest.mark.parametrize(
    "x",
    [np.zeros(64, np.float32), np.float32(1.0), np.zeros((64,), np.float64)],
    ids=["(64,)", "()", "(64,)f64"],
)
@pytest.mark.parametrize("training", [True, False])
def test_fewer_than_two_dims(x, training):
    bn = bnpy.BatchNorm(64).train(training)
    with pytest.raises(ValueError, match=shape_text(np.shape(x))):
        bn(x)


@pytest.mark.parametrize(
    "axis, x_shape", [(2, (8, 3)), (5, (4, 3, 2)), (-3, (8, 3)), (-4, (2, 3, 4))]
)
def test_layer_axis_out_of_range(axis, x_shape):
    bn = bnpy.BatchNorm(3, axis=axis)
    with pytest.raises(ValueError, match=rf"axis {axis}\b"):
        bn(np.zeros(x_shape))


def test_backward_dy_shape_message():
    bn = bnpy.BatchNorm(3)
    bn(data((8, 3)))
    with pytest.raises(ValueError) as info:
        bn.backward(np.zeros((8, 4), np.float32))
    assert "(8, 4)" in str(info.value) and "(8, 3)" in str(info.value), str(info.value)


def test_backward_before_forward_is_runtime_error():
    for bn in (
        bnpy.BatchNorm(3),
        bnpy.BatchNorm(3).eval(),
        bnpy.BatchNorm(3, affine=False, track_running_stats=False),
    ):
        with pytest.raises(RuntimeError):
            bn.backward(np.zeros((8, 3), np.float32))


# --- the layer: a failed call changes nothing --------------------------------

LAYERS = {
    "default": dict(kw=dict(), shape=(8, C)),
    "momentum-none-f64": dict(kw=dict(momentum=None, dtype=np.float64), shape=(6, C, 2)),
    "plain": dict(kw=dict(affine=False, track_running_stats=False), shape=(5, C, 2)),
    "axis2": dict(kw=dict(axis=2, eps=1e-3), shape=(4, 2, C)),
}
AXES = {"default": 1, "momentum-none-f64": 1, "plain": 1, "axis2": 2}


def make_layer(name, mode, history):
    spec = LAYERS[name]
    bn = bnpy.BatchNorm(C, **spec["kw"])
    if bn.affine:
        bn.gamma[:] = [0.5, -1.5, 2.0]
        bn.beta[:] = [0.25, 0.0, -1.0]
    if history == "forward":
        for seed in range(2):
            bn(data(spec["shape"], seed))
    if mode == "eval":
        bn.eval()
    dy = None
    if history == "forward":
        x = data(spec["shape"], 5)
        bn(x)
        dy = data(spec["shape"], 6)
        bn.backward(dy)
    return bn, dy


def snapshot(bn, dy):
    snap = {k: bits(v) for k, v in bn.state_dict().items()}
    snap["training"] = bn.training
    snap["eps"] = bn.eps
    snap["momentum"] = bn.momentum
    for k in ("gamma", "beta", "running_mean", "running_var"):
        v = getattr(bn, k)
        snap["attr_" + k] = None if v is None else bits(v)
    if bn.track_running_stats:
        snap["num_batches_tracked"] = bn.num_batches_tracked
    for k in ("grad_gamma", "grad_beta"):
        g = getattr(bn, k)
        snap[k] = None if g is None else bits(g)
    if dy is None:
        # no forward yet: backward must still refuse
        try:
            bn.backward(np.zeros((8, C), np.float32))
        except RuntimeError:
            snap["backward"] = "RuntimeError"
        else:
            snap["backward"] = "returned"
        snap["grads_after_backward"] = (bn.grad_gamma is None, bn.grad_beta is None)
    else:
        # the last forward's backward; it was already run with this dy, so the
        # grads it sets are the ones recorded above
        snap["backward"] = bits(bn.backward(dy))
        snap["grads_after_backward"] = (
            bits(bn.grad_gamma) if bn.grad_gamma is not None else None,
            bits(bn.grad_beta) if bn.grad_beta is not None else None,
        )
    return snap


def _shape_with(name, **changes):
    shape = list(LAYERS[name]["shape"])
    ax = AXES[name]
    if "features" in changes:
        shape[ax] = changes["features"]
    if changes.get("single"):
        shape = [1] * len(shape)
        shape[ax] = C
    return tuple(shape)


def _strided_out(shape, dtype):
    """out with gaps between its rows: no axis order makes it one block"""
    return np.zeros((2 * shape[0],) + tuple(shape[1:]), dtype)[::2]


def _readonly(shape, dtype):
    a = np.zeros(shape, dtype)
    a.flags.writeable = False
    return a


def _layer_dtype(bn):
    return np.dtype(bn.dtype)


def _other_dtype(bn):
    return np.float64 if _layer_dtype(bn) == np.float32 else np.float32


# Each case: (name, applies(layer, mode, history), call(bn, layer_name), exception, match)
# match may be a callable of the layer name.
CASES = [
    (
        "forward-features",
        None,
        lambda bn, n: bn(data(_shape_with(n, features=C + 1))),
        ValueError,
        lambda n: (
            rf"expected {C} features on axis \d, got input of shape "
            + shape_text(_shape_with(n, features=C + 1))
        ),
    ),
    ("forward-1d", None, lambda bn, n: bn(np.zeros(C)), ValueError, lambda n: shape_text((C,))),
    ("forward-0d", None, lambda bn, n: bn(np.float64(1.0)), ValueError, lambda n: r"\(\)"),
    (
        "forward-single-value",
        lambda layer, mode, h: mode == "train",
        lambda bn, n: bn(data(_shape_with(n, single=True))),
        ValueError,
        lambda n: re.escape(
            "Expected more than 1 value per channel when training, got input of "
            "shape " + str(_shape_with(n, single=True))
        ),
    ),
    (
        "forward-axis-out-of-range",
        lambda layer, mode, h: layer == "axis2",
        lambda bn, n: bn(np.zeros((8, C))),
        ValueError,
        lambda n: r"axis 2\b",
    ),
    (
        "forward-complex",
        None,
        lambda bn, n: bn(data(LAYERS[n]["shape"]).astype(complex)),
        TypeError,
        None,
    ),
    (
        "forward-object",
        None,
        lambda bn, n: bn(data(LAYERS[n]["shape"]).astype(object)),
        TypeError,
        None,
    ),
    ("forward-str", None, lambda bn, n: bn(np.full(LAYERS[n]["shape"], "1.0")), TypeError, None),
    (
        "forward-out-shape",
        None,
        lambda bn, n: bn.forward(
            data(LAYERS[n]["shape"]), out=np.zeros(_shape_with(n, features=C + 1), _layer_dtype(bn))
        ),
        (ValueError, TypeError),
        None,
    ),
    (
        "forward-out-dtype",
        None,
        lambda bn, n: bn.forward(
            data(LAYERS[n]["shape"]), out=np.zeros(LAYERS[n]["shape"], _other_dtype(bn))
        ),
        (ValueError, TypeError),
        None,
    ),
    (
        "forward-out-noncontiguous",
        None,  # a Fortran out is fine: x takes its layout
        lambda bn, n: bn.forward(
            data(LAYERS[n]["shape"]), out=_strided_out(LAYERS[n]["shape"], _layer_dtype(bn))
        ),
        (ValueError, TypeError),
        None,
    ),
    (
        "forward-out-readonly",
        None,
        lambda bn, n: bn.forward(
            data(LAYERS[n]["shape"]), out=_readonly(LAYERS[n]["shape"], _layer_dtype(bn))
        ),
        (ValueError, TypeError),
        None,
    ),
    (
        "backward-before-forward",
        lambda layer, mode, h: h == "fresh",
        lambda bn, n: bn.backward(data(LAYERS[n]["shape"])),
        RuntimeError,
        None,
    ),
    (
        "backward-dy-features",
        lambda layer, mode, h: h == "forward",
        lambda bn, n: bn.backward(data(_shape_with(n, features=C + 1))),
        ValueError,
        lambda n: shape_text(_shape_with(n, features=C + 1)),
    ),
    (
        "backward-dy-extra-dim",
        lambda layer, mode, h: h == "forward",
        lambda bn, n: bn.backward(data(LAYERS[n]["shape"] + (1,))),
        ValueError,
        lambda n: shape_text(LAYERS[n]["shape"] + (1,)),
    ),
    (
        "backward-dy-1d",
        lambda layer, mode, h: h == "forward",
        lambda bn, n: bn.backward(np.zeros(C)),
        ValueError,
        None,
    ),
    (
        "backward-out-shape",
        lambda layer, mode, h: h == "forward",
        lambda bn, n: bn.backward(
            data(LAYERS[n]["shape"], 6),
            out=np.zeros(_shape_with(n, features=C + 1), _layer_dtype(bn)),
        ),
        (ValueError, TypeError),
        None,
    ),
    (
        "backward-out-readonly",
        lambda layer, mode, h: h == "forward",
        lambda bn, n: bn.backward(
            data(LAYERS[n]["shape"], 6), out=_readonly(LAYERS[n]["shape"], _layer_dtype(bn))
        ),
        (ValueError, TypeError),
        None,
    ),
    (
        "backward-dy-complex",
        lambda layer, mode, h: h == "forward",
        lambda bn, n: bn.backward(data(LAYERS[n]["shape"], 6).astype(complex)),
        TypeError,
        None,
    ),
    (
        "set-gamma-shape",
        lambda layer, mode, h: LAYERS[layer]["kw"].get("affine", True),
        lambda bn, n: setattr(bn, "gamma", np.ones(C + 1)),
        ValueError,
        None,
    ),
    (
        "set-running_var-shape",
        lambda layer, mode, h: LAYERS[layer]["kw"].get("track_running_stats", True),
        lambda bn, n: setattr(bn, "running_var", np.ones((C, 1))),
        ValueError,
        None,
    ),
    ("set-eps", None, lambda bn, n: setattr(bn, "eps", -1.0), ValueError, lambda n: "eps"),
    (
        "set-momentum",
        None,
        lambda bn, n: setattr(bn, "momentum", 1.5),
        ValueError,
        lambda n: "momentum",
    ),
    ("set-num_features", None, lambda bn, n: setattr(bn, "num_features", 4), AttributeError, None),
]


def _good_state(bn):
    """A valid state_dict for bn, with values different from bn's."""
    sd = {}
    dt = np.dtype(bn.dtype)
    if bn.affine:
        sd["gamma"] = np.array([9.0, 8.0, 7.0], dt)
        sd["beta"] = np.array([-9.0, -8.0, -7.0], dt)
    if bn.track_running_stats:
        sd["running_mean"] = np.array([0.1, 0.2, 0.3], dt)
        sd["running_var"] = np.array([5.0, 6.0, 7.0], dt)
        sd["num_batches_tracked"] = 123
    return sd


def _load_with(change):
    def call(bn, n):
        sd = _good_state(bn)
        change(sd)
        bn.load_state_dict(sd)

    return call


def _set(key, value):
    def change(sd):
        sd[key] = value

    return change


def _drop(key):
    def change(sd):
        del sd[key]

    return change


_affine = lambda layer, mode, h: LAYERS[layer]["kw"].get("affine", True)  # noqa: E731
_tracked = lambda layer, mode, h: LAYERS[layer]["kw"].get("track_running_stats", True)  # noqa: E731

CASES += [
    ("load-missing-gamma", _affine, _load_with(_drop("gamma")), ValueError, lambda n: "gamma"),
    (
        "load-missing-running_var",
        _tracked,
        _load_with(_drop("running_var")),
        ValueError,
        lambda n: "running_var",
    ),
    ("load-unknown-key", None, _load_with(_set("foo", np.zeros(C))), ValueError, lambda n: "foo"),
    (
        "load-gamma-shape",
        _affine,
        _load_with(_set("gamma", np.ones(C + 1))),
        ValueError,
        lambda n: "gamma",
    ),
    (
        "load-running_mean-shape",
        _tracked,
        _load_with(_set("running_mean", np.zeros((1, C)))),
        ValueError,
        lambda n: "running_mean",
    ),
    (
        "load-beta-nan",
        _affine,
        _load_with(_set("beta", np.array([0, np.nan, 0]))),
        ValueError,
        lambda n: "beta",
    ),
    (
        "load-running_var-inf",
        _tracked,
        _load_with(_set("running_var", np.array([1, 1, np.inf]))),
        ValueError,
        lambda n: "running_var",
    ),
]


def _matrix():
    for layer in LAYERS:
        for mode in ("train", "eval"):
            for history in ("fresh", "forward"):
                for name, applies, _call, _exc, _match in CASES:
                    if applies is None or applies(layer, mode, history):
                        yield pytest.param(
                            layer, mode, history, name, id=f"{layer}-{mode}-{history}-{name}"
                        )


CASE_BY_NAME = {c[0]: c for c in CASES}


@pytest.mark.parametrize("layer, mode, history, case", list(_matrix()))
def test_failed_call_changes_nothing(layer, mode, history, case):
    _, _, call, exc, match = CASE_BY_NAME[case]
    bn, dy = make_layer(layer, mode, history)
    before = snapshot(bn, dy)
    pattern = match(layer) if match is not None else None
    with pytest.raises(exc, match=pattern):
        call(bn, layer)
    assert snapshot(bn, dy) == before


def test_good_state_is_accepted():
    # the base of the load-* cases above is valid: only the change makes it fail
    for layer in LAYERS:
        bn, _ = make_layer(layer, "train", "forward")
        bn.load_state_dict(_good_state(bn))
        if bn.affine:
            assert np.array_equal(bn.gamma, [9, 8, 7])


def test_failed_forward_keeps_previous_forward_for_backward():
    # after a failed forward of another shape, backward still belongs to the
    # last good forward: dy of that shape works, dy of the failed shape doesn't
    bn = bnpy.BatchNorm(C)
    x, dy = data((8, C)), data((8, C), 1)
    bn(x)
    expected = bits(bn.backward(dy))
    with pytest.raises(ValueError):
        bn(data((1, C)))
    with pytest.raises(ValueError):
        bn.backward(data((1, C)))
    assert bits(bn.backward(dy)) == expected


# --- empty batch (a later issue): empty output, running statistics unchanged


@pytest.mark.parametrize("shape", [(0, C), (4, C, 0), (0, C, 2)])
def test_empty_batch(shape):
    bn = bnpy.BatchNorm(C)
    bn(data((6, C)))
    rm, rv = bits(bn.running_mean), bits(bn.running_var)
    y = bn(np.zeros(shape, np.float32))
    assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == np.float32
    assert (bits(bn.running_mean), bits(bn.running_var)) == (rm, rv)


# --- the functional API -------------------------------------------------------


def _stats(n=C):
    return np.linspace(-0.5, 0.5, n), np.linspace(1.0, 2.0, n)


FUNCTIONAL_CASES = {
    # name: (function, args, kwargs, exception, match)
    "forward-1d": (
        bnpy.batch_norm_forward,
        lambda: (data(5), None, None),
        {},
        ValueError,
        shape_text((5,)),
    ),
    "forward-0d": (
        bnpy.batch_norm_forward,
        lambda: (np.float64(2.0), None, None),
        {},
        ValueError,
        r"\(\)",
    ),
    "forward-axis": (
        bnpy.batch_norm_forward,
        lambda: (data((8, C)), None, None),
        dict(axis=2),
        ValueError,
        r"axis 2\b",
    ),
    "forward-axis-neg": (
        bnpy.batch_norm_forward,
        lambda: (data((8, C)), None, None),
        dict(axis=-3),
        ValueError,
        r"axis -3\b",
    ),
    "forward-gamma-shape": (
        bnpy.batch_norm_forward,
        lambda: (data((8, C)), np.ones(C + 1), np.zeros(C)),
        {},
        ValueError,
        "gamma",
    ),
    "forward-beta-shape": (
        bnpy.batch_norm_forward,
        lambda: (data((8, C)), np.ones(C), np.zeros((C, 1))),
        {},
        ValueError,
        "beta",
    ),
    "forward-complex": (
        bnpy.batch_norm_forward,
        lambda: (data((8, C)).astype(complex), None, None),
        {},
        TypeError,
        None,
    ),
    "forward-str": (
        bnpy.batch_norm_forward,
        lambda: (np.full((8, C), "x"), None, None),
        {},
        TypeError,
        None,
    ),
    "inference-1d": (
        bnpy.batch_norm_inference,
        lambda: (data(C), None, None) + _stats(),
        {},
        ValueError,
        shape_text((C,)),
    ),
    "inference-axis": (
        bnpy.batch_norm_inference,
        lambda: (data((8, C)), None, None) + _stats(),
        dict(axis=3),
        ValueError,
        r"axis 3\b",
    ),
    "inference-mean-shape": (
        bnpy.batch_norm_inference,
        lambda: (data((8, C)), None, None, np.zeros(C + 1), np.ones(C)),
        {},
        ValueError,
        "mean",
    ),
    "inference-var-shape": (
        bnpy.batch_norm_inference,
        lambda: (data((8, C)), None, None, np.zeros(C), np.ones(C - 1)),
        {},
        ValueError,
        "var",
    ),
    "inference-gamma-shape": (
        bnpy.batch_norm_inference,
        lambda: (data((8, C)), np.ones(C + 1), None) + _stats(),
        {},
        ValueError,
        "gamma",
    ),
    "inference-complex": (
        bnpy.batch_norm_inference,
        lambda: (data((8, C)).astype(complex), None, None) + _stats(),
        {},
        TypeError,
        None,
    ),
    "backward-dy-shape": (
        bnpy.batch_norm_backward,
        lambda: (data((8, C + 1)), data((8, C)), None) + _stats(),
        {},
        ValueError,
        None,
    ),
    "backward-1d": (
        bnpy.batch_norm_backward,
        lambda: (data(C), data(C), None) + _stats(),
        {},
        ValueError,
        shape_text((C,)),
    ),
    "backward-axis": (
        bnpy.batch_norm_backward,
        lambda: (data((8, C)), data((8, C)), None) + _stats(),
        dict(axis=-3),
        ValueError,
        r"axis -3\b",
    ),
    "backward-mean-shape": (
        bnpy.batch_norm_backward,
        lambda: (data((8, C)), data((8, C)), None, np.zeros(C + 1), np.ones(C)),
        {},
        ValueError,
        "mean",
    ),
    "backward-invstd-shape": (
        bnpy.batch_norm_backward,
        lambda: (data((8, C)), data((8, C)), None, np.zeros(C), np.ones((C, 1))),
        {},
        ValueError,
        "invstd",
    ),
    "backward-gamma-shape": (
        bnpy.batch_norm_backward,
        lambda: (data((8, C)), data((8, C)), np.ones(C - 1)) + _stats(),
        {},
        ValueError,
        "gamma",
    ),
    "backward-complex-dy": (
        bnpy.batch_norm_backward,
        lambda: (data((8, C)).astype(complex), data((8, C)), None) + _stats(),
        {},
        TypeError,
        None,
    ),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_functional_errors(case):
    fn, make_args, kwargs, exc, match = FUNCTIONAL_CASES[case]
    args = make_args()
    before = [None if a is None else bits(a) for a in args]
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    # inputs untouched
    assert [None if a is None else bits(a) for a in args] == before


def test_functional_backward_dy_shape_message():
    mean, invstd = _stats()
    with pytest.raises(ValueError) as info:
        bnpy.batch_norm_backward(data((8, C + 1)), data((8, C)), None, mean, invstd)
    msg = str(info.value)
    assert str((8, C + 1)) in msg and str((8, C)) in msg, msg


def test_functional_valid_calls_work():
    # the error cases above differ from these only in the one broken argument
    x = data((8, C))
    y, mean, invstd = bnpy.batch_norm_forward(x, np.ones(C), np.zeros(C))
    assert y.shape == (8, C) and np.shape(mean) == (C,) and np.shape(invstd) == (C,)
    m, v = _stats()
    assert bnpy.batch_norm_inference(x, None, None, m, v).shape == (8, C)
    dx, dg, db = bnpy.batch_norm_backward(data((8, C), 1), x, None, m, v)
    assert dx.shape == (8, C) and dg is None and db is None
    dx, dg, db = bnpy.batch_norm_backward(data((8, C), 1), x, np.ones(C), mean, invstd)
    assert np.shape(dg) == (C,) and np.shape(db) == (C,)
