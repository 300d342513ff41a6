"""The bad-input matrix (issue 6): every public function and method, fed
arguments of the wrong type, range or shape, raises the right exception (with
the argument's name where it has one) and changes nothing.

"Nothing" is checked, not assumed: for the layer, everything observable
(state_dict, configuration, mode, gradients, and what a backward with a fixed
dy returns, or that it still raises) is bitwise the same after the failed
call; for the functional API, the inputs are unchanged; for set_num_threads,
the thread count. tests/test_errors.py holds the messages users meet most
(feature mismatch, one value per channel, ...); this file is the breadth.
"""

import collections
import copy
import pickle
import re

import numpy as np
import pytest
from bitwise import bits

import bnpy

C = 3


def data(shape, seed=0, dtype=np.float64):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 0.5).astype(dtype)


class ArrayRaises:
    """An array-like whose conversion fails with its own error."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("conversion refused")


class IndexRaises:
    def __index__(self):
        raise RuntimeError("no index")


class FloatRaises:
    def __float__(self):
        raise RuntimeError("no float")


# Values that are not arrays of real numbers: (value, exception)
NOT_REAL = {
    "None": (None, TypeError),
    "str": ("abc", TypeError),
    "dict": ({}, TypeError),
    "complex": (np.ones((4, C), complex), TypeError),
    "object-of-floats": (np.ones((4, C)).astype(object), TypeError),
    "str-array": (np.full((4, C), "1.0"), TypeError),
    "bytes-array": (np.full((4, C), b"1"), TypeError),
    "datetime64": (np.zeros((4, C), "M8[s]"), TypeError),
    "timedelta64": (np.zeros((4, C), "m8[s]"), TypeError),
    "structured": (np.zeros((4, C), [("a", "f4")]), TypeError),
    "void": (np.zeros((4, C), "V4"), TypeError),
    "ragged": ([[1.0, 2.0, 3.0], [1.0, 2.0]], ValueError),
    "array-raises": (ArrayRaises(), RuntimeError),
}

# Values of the wrong shape for a (C,) vector argument
BAD_VECTORS = {
    "too-long": (np.ones(C + 1), ValueError),
    "too-short": (np.ones(C - 1), ValueError),
    "column": (np.ones((C, 1)), ValueError),
    "row": (np.ones((1, C)), ValueError),
    "scalar": (2.0, ValueError),
    "empty": (np.ones(0), ValueError),
    "None": (None, TypeError),
    "str": ("abc", TypeError),
    "complex": (np.ones(C, complex), TypeError),
    "object": (np.ones(C).astype(object), TypeError),
    "ragged": ([[1.0, 2.0], [3.0]], ValueError),
    "array-raises": (ArrayRaises(), RuntimeError),
}


# --- snapshots ------------------------------------------------------------------

DY = data((8, C), 6)


def snapshot(bn):
    snap = {k: bits(v) for k, v in bn.state_dict().items()}
    for name in (
        "num_features",
        "eps",
        "momentum",
        "affine",
        "track_running_stats",
        "axis",
        "training",
        "num_batches_tracked",
    ):
        snap[name] = getattr(bn, name)
    snap["dtype"] = np.dtype(bn.dtype).str
    snap["repr"] = repr(bn)
    for name in ("gamma", "beta", "running_mean", "running_var", "grad_gamma", "grad_beta"):
        v = getattr(bn, name)
        snap["attr-" + name] = None if v is None else bits(v)
    try:
        dx = bn.backward(DY)
    except RuntimeError:
        snap["backward"] = "RuntimeError"
        snap["grads-after"] = (bn.grad_gamma is None, bn.grad_beta is None)
    else:
        snap["backward"] = bits(dx)
        snap["grads-after"] = tuple(
            None if g is None else bits(g) for g in (bn.grad_gamma, bn.grad_beta)
        )
    return snap


def _fresh():
    return bnpy.BatchNorm(C)


def _trained(**kw):
    bn = bnpy.BatchNorm(C, **kw)
    if bn.affine:
        bn.gamma[:] = [0.5, -1.5, 2.0]
        bn.beta[:] = [0.25, 0.0, -1.0]
    for seed in range(2):
        bn(data((8, C), seed))
    bn.backward(DY)
    return bn


LAYERS = {
    "fresh": _fresh,
    "trained": _trained,
    "eval-f64-momentum-none": lambda: _trained(dtype=np.float64, momentum=None).eval(),
    "plain": lambda: _trained(affine=False, track_running_stats=False, eps=1e-3),
}


# --- the layer's methods and attributes --------------------------------------------
# Each case: call(bn), exception, regex the message must match (or None), and
# which layers it applies to (None: all).


def _affine(bn):
    return bn.affine


def _tracked(bn):
    return bn.track_running_stats


def _has_forward(bn):
    try:
        bn.backward(DY)
    except RuntimeError:
        return False
    return True


def _no_forward(bn):
    return not _has_forward(bn)


LAYER_CASES = {}


def case(name, call, exc, match=None, applies=None):
    assert name not in LAYER_CASES, name
    LAYER_CASES[name] = (call, exc, match, applies)


# forward / __call__: x
for key, (value, exc) in NOT_REAL.items():
    case(
        f"forward-x-{key}",
        lambda bn, v=value: bn.forward(v),
        exc,
        "x" if exc is TypeError and key != "array-raises" else None,
    )
    case(f"call-x-{key}", lambda bn, v=value: bn(v), exc)
case("forward-no-args", lambda bn: bn.forward(), TypeError)
case("forward-two-positional", lambda bn: bn.forward(data((8, C)), np.empty((8, C))), TypeError)
case("forward-unknown-keyword", lambda bn: bn.forward(data((8, C)), where=True), TypeError)
case("forward-x-1d", lambda bn: bn(np.ones(C)), ValueError, re.escape(f"({C},)"))
case("forward-x-0d", lambda bn: bn(np.float32(1)), ValueError, r"\(\)")
case(
    "forward-x-features",
    lambda bn: bn(np.ones((8, C + 2))),
    ValueError,
    re.escape(f"expected {C} features"),
)
case(
    "forward-x-features-lists",
    lambda bn: bn([[1.0] * (C + 1)] * 4),
    ValueError,
    re.escape(f"expected {C} features"),
)

# backward: dy (before any forward, backward refuses whatever dy is)
for key, (value, exc) in NOT_REAL.items():
    case(
        f"backward-dy-{key}",
        lambda bn, v=value: bn.backward(v),
        exc,
        "dy" if exc is TypeError else None,
        _has_forward,
    )
    case(
        f"backward-before-forward-dy-{key}",
        lambda bn, v=value: bn.backward(v),
        RuntimeError,
        "forward" if key != "array-raises" else None,
        _no_forward,
    )
case("backward-no-args", lambda bn: bn.backward(), TypeError)
case("backward-two-positional", lambda bn: bn.backward(DY, np.empty((8, C))), TypeError)
case("backward-unknown-keyword", lambda bn: bn.backward(DY, scale=2), TypeError)
for key, value in {
    "features": np.ones((8, C + 1)),
    "transposed": np.ones((C, 8)),
    "batch": np.ones((7, C)),
    "extra-dim": np.ones((8, C, 1)),
    "1d": np.ones(8 * C),
}.items():
    case(
        f"backward-dy-{key}",
        lambda bn, v=value: bn.backward(v),
        ValueError,
        re.escape(str(value.shape)),
        _has_forward,
    )
    case(
        f"backward-before-forward-dy-{key}",
        lambda bn, v=value: bn.backward(v),
        RuntimeError,
        "forward",
        _no_forward,
    )

# train / eval / state_dict
for key, value in {"str": "yes", "None": None, "int": 1, "float": 1.0, "array": np.ones(1)}.items():
    case(f"train-mode-{key}", lambda bn, v=value: bn.train(v), TypeError, "mode")
    case(f"train-keyword-mode-{key}", lambda bn, v=value: bn.train(mode=v), TypeError, "mode")
    case(
        f"set-training-{key}", lambda bn, v=value: setattr(bn, "training", v), TypeError, "training"
    )
case("train-two-args", lambda bn: bn.train(True, False), TypeError)
case("train-unknown-keyword", lambda bn: bn.train(training=True), TypeError)
case("eval-arg", lambda bn: bn.eval(True), TypeError)
case("state_dict-arg", lambda bn: bn.state_dict(True), TypeError)

# eps and momentum
for key, (value, exc) in {
    "zero": (0.0, ValueError),
    "negative": (-1e-5, ValueError),
    "nan": (np.nan, ValueError),
    "inf": (np.inf, ValueError),
    "-inf": (-np.inf, ValueError),
    "str": ("1e-5", TypeError),
    "None": (None, TypeError),
    "bool": (True, TypeError),
    "complex": (1e-5 + 0j, TypeError),
    "list": ([1e-5], TypeError),
    "float-raises": (FloatRaises(), TypeError),
}.items():
    case(f"set-eps-{key}", lambda bn, v=value: setattr(bn, "eps", v), exc, "eps")
for key, (value, exc) in {
    "negative": (-0.1, ValueError),
    "above-one": (1.5, ValueError),
    "nan": (np.nan, ValueError),
    "inf": (np.inf, ValueError),
    "str": ("0.1", TypeError),
    "bool": (True, TypeError),
    "complex": (0.1 + 0j, TypeError),
    "list": ([0.1], TypeError),
}.items():
    case(f"set-momentum-{key}", lambda bn, v=value: setattr(bn, "momentum", v), exc, "momentum")
case("del-eps", lambda bn: delattr(bn, "eps"), AttributeError, "eps")
case("del-momentum", lambda bn: delattr(bn, "momentum"), AttributeError, "momentum")
case("del-training", lambda bn: delattr(bn, "training"), AttributeError, "training")

# parameter and statistic setters
for param in ("gamma", "beta", "running_mean", "running_var"):
    applies = _affine if param in ("gamma", "beta") else _tracked
    for key, (value, exc) in BAD_VECTORS.items():
        case(
            f"set-{param}-{key}",
            lambda bn, v=value, p=param: setattr(bn, p, v),
            exc,
            param if exc is not RuntimeError and key != "ragged" else None,
            applies,
        )
    case(f"del-{param}", lambda bn, p=param: delattr(bn, p), AttributeError, param)
    case(
        f"set-{param}-missing",
        lambda bn, p=param: setattr(bn, p, np.ones(C)),
        ValueError,
        param,
        lambda bn, a=applies: not a(bn),
    )

# read-only attributes, and no others
for name, value in {
    "num_features": 4,
    "affine": False,
    "track_running_stats": False,
    "axis": 0,
    "dtype": np.float64,
    "num_batches_tracked": 5,
    "grad_gamma": np.ones(C),
    "grad_beta": np.ones(C),
}.items():
    case(f"set-readonly-{name}", lambda bn, n=name, v=value: setattr(bn, n, v), AttributeError)
case("set-unknown-attribute", lambda bn: setattr(bn, "scale", np.ones(C)), AttributeError)

# __init__ again, even with valid arguments
case("init-again", lambda bn: bn.__init__(C), RuntimeError, "__init__")
case("init-again-other", lambda bn: bn.__init__(5, dtype=np.float64), RuntimeError, "__init__")


# load_state_dict
def _good_state(bn):
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


def _load(change):
    def call(bn):
        sd = _good_state(bn)
        change(sd)
        bn.load_state_dict(sd)

    return call


def _put(key, value):
    return lambda sd: sd.__setitem__(key, value)


case("load-not-a-dict-list", lambda bn: bn.load_state_dict([]), TypeError, "dict")
case("load-not-a-dict-None", lambda bn: bn.load_state_dict(None), TypeError, "dict")
case(
    "load-not-a-dict-items",
    lambda bn: bn.load_state_dict(list(_good_state(bn).items())),
    TypeError,
    "dict",
)
case("load-no-args", lambda bn: bn.load_state_dict(), TypeError)
case("load-two-args", lambda bn: bn.load_state_dict({}, {}), TypeError)
case(
    "load-strict-not-bool",
    lambda bn: bn.load_state_dict(_good_state(bn), strict=None),
    TypeError,
    "strict",
)
case(
    "load-unknown-keyword",
    lambda bn: bn.load_state_dict(_good_state(bn), assign=True),
    TypeError,
    "assign",
)
case("load-int-key", _load(_put(1, np.ones(C))), ValueError, "1")
case("load-unknown-key", _load(_put("momentum", 0.5)), ValueError, "momentum")
for param in ("gamma", "beta", "running_mean", "running_var"):
    applies = _affine if param in ("gamma", "beta") else _tracked
    for key, (value, exc) in BAD_VECTORS.items():
        case(
            f"load-{param}-{key}",
            _load(_put(param, value)),
            exc,
            param if exc is not RuntimeError and key != "ragged" else None,
            applies,
        )
    case(
        f"load-{param}-nan",
        _load(_put(param, np.array([1.0, np.nan, 1.0]))),
        ValueError,
        param,
        applies,
    )
    case(
        f"load-{param}-inf",
        _load(_put(param, np.array([1.0, 1.0, -np.inf]))),
        ValueError,
        param,
        applies,
    )
    case(f"load-{param}-missing", _load(lambda sd, p=param: sd.pop(p)), ValueError, param, applies)
case(
    "load-running_var-negative",
    _load(_put("running_var", np.array([1.0, -1e-30, 1.0]))),
    ValueError,
    "running_var",
    _tracked,
)
case(
    "load-gamma-and-weight",
    _load(lambda sd: sd.__setitem__("weight", sd["gamma"])),
    ValueError,
    "weight",
    _affine,
)
case(
    "load-params-without-affine",
    _load(_put("gamma", np.ones(C))),
    ValueError,
    "gamma",
    lambda bn: not bn.affine,
)
case(
    "load-stats-without-tracking",
    _load(_put("running_mean", np.ones(C))),
    ValueError,
    "running_mean",
    lambda bn: not bn.track_running_stats,
)
for key, value in {
    "negative": -1,
    "float": 1.5,
    "str": "3",
    "None": None,
    "huge": 2**70,
    "array": np.array([3]),
    "float-array": np.array(3.0),
}.items():
    case(
        f"load-num_batches_tracked-{key}",
        _load(_put("num_batches_tracked", value)),
        ValueError,
        "num_batches_tracked",
        _tracked,
    )
# the last key is the bad one: everything before it was checked and converted
case(
    "load-last-key-bad",
    _load(lambda sd: sd.update(running_var=np.array([1, 1, np.nan]))),
    ValueError,
    "running_var",
    _tracked,
)


# __setstate__ (what pickle and copy call)
def _state(bn, **changes):
    state = {
        "training": not bn.training,
        "state_dict": _good_state(bn),
        "grad_gamma": np.ones(C) if bn.affine else None,
        "grad_beta": np.ones(C) if bn.affine else None,
    }
    state.update(changes)
    return {k: v for k, v in state.items() if v is not _DROP}


_DROP = object()

case("setstate-not-a-dict", lambda bn: bn.__setstate__([("training", True)]), TypeError)
case("setstate-None", lambda bn: bn.__setstate__(None), TypeError)
case(
    "setstate-no-training",
    lambda bn: bn.__setstate__(_state(bn, training=_DROP)),
    ValueError,
    "training",
)
case(
    "setstate-no-state_dict",
    lambda bn: bn.__setstate__(_state(bn, state_dict=_DROP)),
    ValueError,
    "state_dict",
)
case(
    "setstate-training-str",
    lambda bn: bn.__setstate__(_state(bn, training="yes")),
    TypeError,
    "training",
)
case(
    "setstate-state_dict-list",
    lambda bn: bn.__setstate__(_state(bn, state_dict=[])),
    TypeError,
    "dict",
)
case(
    "setstate-state_dict-bad",
    lambda bn: bn.__setstate__(_state(bn, state_dict={**_good_state(bn), "foo": 1})),
    ValueError,
    "foo",
)
case(
    "setstate-grad_gamma-shape",
    lambda bn: bn.__setstate__(_state(bn, grad_gamma=np.ones(4))),
    ValueError,
    "grad_gamma",
)
case(
    "setstate-grad_beta-complex",
    lambda bn: bn.__setstate__(_state(bn, grad_beta=np.ones(C, complex))),
    TypeError,
    "grad_beta",
)
case(
    "setstate-instance-dict",
    lambda bn: bn.__setstate__(_state(bn, __dict__={"a": 1})),
    AttributeError,
)


def _layer_matrix():
    for layer in LAYERS:
        bn = LAYERS[layer]()
        for name, (_, _, _, applies) in LAYER_CASES.items():
            if applies is None or applies(bn):
                yield pytest.param(layer, name, id=f"{layer}-{name}")


@pytest.mark.parametrize("layer, name", list(_layer_matrix()))
def test_layer_bad_input_changes_nothing(layer, name):
    call, exc, match, _ = LAYER_CASES[name]
    bn = LAYERS[layer]()
    before = snapshot(bn)
    with pytest.raises(exc, match=match):
        call(bn)
    assert snapshot(bn) == before


def test_good_variants_of_the_bad_cases_work():
    """The matrix above breaks one thing at a time: the same calls with that
    one thing right succeed."""
    for make in LAYERS.values():
        bn = make()
        bn.load_state_dict(_good_state(bn))
        bn.__setstate__(_state(bn))
        bn.__setstate__(_state(bn, grad_gamma=None, grad_beta=None))
        bn.train(True)
        bn.train(mode=False)
        bn.eps = 1e-3
        bn.momentum = 0.5
        bn.momentum = None
        bn.training = True
        y = bn(data((8, C)))
        assert bn.backward(DY).shape == y.shape
    bn = _trained()
    for name in ("gamma", "beta", "running_mean", "running_var"):
        setattr(bn, name, [1.0, 2.0, 3.0])


def test_setstate_rejects_gradients_for_a_layer_without_affine():
    bn = _trained(affine=False)
    before = snapshot(bn)
    state = _state(bn, grad_gamma=np.ones(C), grad_beta=np.ones(C))
    with pytest.raises(ValueError):
        bn.__setstate__(state)
    assert snapshot(bn) == before


# --- an uninitialized layer -------------------------------------------------------------

UNINITIALIZED_CALLS = {
    "forward": lambda bn: bn.forward(data((8, C))),
    "call": lambda bn: bn(data((8, C))),
    "backward": lambda bn: bn.backward(DY),
    "state_dict": lambda bn: bn.state_dict(),
    "load_state_dict": lambda bn: bn.load_state_dict({}),
    "setstate": lambda bn: bn.__setstate__({"training": True, "state_dict": {}}),
    "set-gamma": lambda bn: setattr(bn, "gamma", np.ones(C)),
    "set-running_var": lambda bn: setattr(bn, "running_var", np.ones(C)),
    "dtype": lambda bn: bn.dtype,
    "pickle": lambda bn: pickle.dumps(bn),
    "deepcopy": lambda bn: copy.deepcopy(bn),
}


@pytest.mark.parametrize("call", list(UNINITIALIZED_CALLS))
def test_uninitialized_layer_raises(call):
    """BatchNorm.__new__ without __init__ (as a subclass might leave it): a clear
    RuntimeError, no crash; __init__ afterwards gives a working layer."""
    bn = bnpy.BatchNorm.__new__(bnpy.BatchNorm)
    with pytest.raises(RuntimeError, match="__init__"):
        UNINITIALIZED_CALLS[call](bn)
    assert bn.gamma is None and bn.running_mean is None and bn.grad_gamma is None
    assert "uninitialized" in repr(bn)
    bn.__init__(C)
    assert bn(data((8, C))).shape == (8, C)


# --- the constructor -----------------------------------------------------------------

CONSTRUCTOR_CASES = {
    # num_features
    "num_features-zero": (dict(num_features=0), ValueError, "num_features"),
    "num_features-negative": (dict(num_features=-3), ValueError, "num_features"),
    "num_features-float": (dict(num_features=3.0), TypeError, "num_features"),
    "num_features-np-float": (dict(num_features=np.float64(3)), TypeError, "num_features"),
    "num_features-str": (dict(num_features="3"), TypeError, "num_features"),
    "num_features-None": (dict(num_features=None), TypeError, "num_features"),
    "num_features-bool": (dict(num_features=True), TypeError, "num_features"),
    "num_features-complex": (dict(num_features=3 + 0j), TypeError, "num_features"),
    "num_features-list": (dict(num_features=[3]), TypeError, "num_features"),
    "num_features-huge": (dict(num_features=2**70), ValueError, "num_features"),
    "num_features-too-large": (dict(num_features=2**62), ValueError, "num_features"),
    "num_features-index-raises": (dict(num_features=IndexRaises()), RuntimeError, "no index"),
    # eps
    "eps-zero": (dict(eps=0), ValueError, "eps"),
    "eps-negative": (dict(eps=-1e-5), ValueError, "eps"),
    "eps-nan": (dict(eps=float("nan")), ValueError, "eps"),
    "eps-inf": (dict(eps=float("inf")), ValueError, "eps"),
    "eps-str": (dict(eps="1e-5"), TypeError, "eps"),
    "eps-None": (dict(eps=None), TypeError, "eps"),
    "eps-bool": (dict(eps=True), TypeError, "eps"),
    "eps-complex": (dict(eps=1e-5 + 0j), TypeError, "eps"),
    "eps-np-complex": (dict(eps=np.complex128(1e-5)), TypeError, "eps"),
    "eps-vector": (dict(eps=np.array([1e-5])), TypeError, "eps"),
    # momentum
    "momentum-negative": (dict(momentum=-0.1), ValueError, "momentum"),
    "momentum-above-one": (dict(momentum=1.0000001), ValueError, "momentum"),
    "momentum-nan": (dict(momentum=float("nan")), ValueError, "momentum"),
    "momentum-inf": (dict(momentum=float("inf")), ValueError, "momentum"),
    "momentum-str": (dict(momentum="0.1"), TypeError, "momentum"),
    "momentum-bool": (dict(momentum=False), TypeError, "momentum"),
    "momentum-complex": (dict(momentum=0.1j), TypeError, "momentum"),
    # affine, track_running_stats, training
    **{
        f"{name}-{key}": ({name: value}, TypeError, name)
        for name in ("affine", "track_running_stats", "training")
        for key, value in {"str": "False", "None": None, "int": 1, "zero": 0, "float": 1.0}.items()
    },
    # axis
    "axis-float": (dict(axis=1.0), TypeError, "axis"),
    "axis-str": (dict(axis="1"), TypeError, "axis"),
    "axis-None": (dict(axis=None), TypeError, "axis"),
    "axis-bool": (dict(axis=True), TypeError, "axis"),
    "axis-tuple": (dict(axis=(0, 1)), TypeError, "axis"),
    "axis-too-large": (dict(axis=64), ValueError, "axis"),
    "axis-too-small": (dict(axis=-65), ValueError, "axis"),
    "axis-huge": (dict(axis=2**70), ValueError, "axis"),
    # dtype
    "dtype-float16": (dict(dtype=np.float16), (TypeError, ValueError), "dtype"),
    "dtype-int32": (dict(dtype=np.int32), (TypeError, ValueError), "dtype"),
    "dtype-name": (dict(dtype="foo"), (TypeError, ValueError), "dtype"),
    "dtype-int64-name": (dict(dtype="int64"), (TypeError, ValueError), "dtype"),
    "dtype-complex": (dict(dtype=np.complex64), (TypeError, ValueError), "dtype"),
    "dtype-longdouble": (dict(dtype=np.longdouble), (TypeError, ValueError), "dtype"),
    "dtype-object": (dict(dtype=object), (TypeError, ValueError), "dtype"),
    "dtype-big-endian": (dict(dtype=">f4"), (TypeError, ValueError), "dtype"),
    "dtype-swapped-descr": (
        dict(dtype=np.dtype(np.float64).newbyteorder()),
        (TypeError, ValueError),
        "dtype",
    ),
    "dtype-None": (dict(dtype=None), TypeError, "dtype"),
    "dtype-int": (dict(dtype=32), TypeError, "dtype"),
    "dtype-array": (dict(dtype=np.ones(3, np.float32)), TypeError, "dtype"),
    # the call itself
    "no-arguments": (dict(), TypeError, None),
    "unknown-keyword": (dict(bias=True), TypeError, None),
    "training-positional": ("positional-training", TypeError, None),
}


@pytest.mark.parametrize("name", list(CONSTRUCTOR_CASES))
def test_constructor_bad_input(name):
    kwargs, exc, match = CONSTRUCTOR_CASES[name]
    other = _trained()
    before, threads = snapshot(other), bnpy.get_num_threads()
    with pytest.raises(exc, match=match):
        if kwargs == "positional-training":
            bnpy.BatchNorm(C, 1e-5, 0.1, True, True, 1, np.float32, True)
        elif name in ("no-arguments",):
            bnpy.BatchNorm()
        else:
            bnpy.BatchNorm(**{"num_features": C, **kwargs})
    # a failed construction touches nothing else
    assert snapshot(other) == before and bnpy.get_num_threads() == threads


# --- the functional API ---------------------------------------------------------------


def _x():
    return data((8, C), 1)


def _dy():
    return data((8, C), 2)


def _stats():
    return np.linspace(-0.5, 0.5, C), np.linspace(1.0, 2.0, C)


FUNCTIONS = {
    # name: (function, the valid arguments (a fresh tuple each call), valid keywords)
    "forward": (bnpy.batch_norm_forward, lambda: [_x(), np.ones(C), np.zeros(C)], {}),
    "inference": (
        bnpy.batch_norm_inference,
        lambda: [_x(), np.ones(C), np.zeros(C), *_stats()],
        {},
    ),
    "backward": (bnpy.batch_norm_backward, lambda: [_dy(), _x(), np.ones(C), *_stats()], {}),
}
ARGUMENT_NAMES = {
    "forward": ["x", "gamma", "beta"],
    "inference": ["x", "gamma", "beta", "mean", "var"],
    "backward": ["dy", "x", "gamma", "mean", "invstd"],
}

FUNCTIONAL_CASES = {}


def fcase(function, name, change, exc, match=None):
    """change(args, kwargs) breaks one thing of a valid call."""
    FUNCTIONAL_CASES[f"{function}-{name}"] = (function, change, exc, match)


def _set_arg(index, value):
    def change(args, kwargs):
        args[index] = value

    return change


def _set_kw(key, value):
    def change(args, kwargs):
        kwargs[key] = value

    return change


for function, names in ARGUMENT_NAMES.items():
    for index, arg in enumerate(names):
        if arg in ("x", "dy"):
            for key, (value, exc) in NOT_REAL.items():
                fcase(
                    function,
                    f"{arg}-{key}",
                    _set_arg(index, value),
                    exc,
                    arg if exc is TypeError and key not in ("array-raises",) else None,
                )
            fcase(
                function, f"{arg}-1d", _set_arg(index, np.ones(C)), ValueError, re.escape(f"({C},)")
            )
            fcase(function, f"{arg}-0d", _set_arg(index, 1.0), ValueError, r"\(\)")
        else:
            for key, (value, exc) in BAD_VECTORS.items():
                if value is None and arg in ("gamma", "beta"):
                    continue  # None is valid: no affine transform
                fcase(
                    function,
                    f"{arg}-{key}",
                    _set_arg(index, value),
                    exc,
                    arg if key not in ("array-raises", "ragged") else None,
                )
    fcase(function, "missing-argument", lambda args, kwargs: args.pop(), TypeError)
    fcase(function, "extra-positional", lambda args, kwargs: args.append(1e-5), TypeError)
    fcase(function, "unknown-keyword", _set_kw("momentum", 0.1), TypeError)
    fcase(function, "axis-float", _set_kw("axis", 1.0), TypeError, "axis")
    fcase(function, "axis-None", _set_kw("axis", None), TypeError, "axis")
    fcase(function, "axis-str", _set_kw("axis", "1"), TypeError, "axis")
    fcase(function, "axis-out-of-range", _set_kw("axis", 2), ValueError, "axis")
    fcase(function, "axis-negative-out-of-range", _set_kw("axis", -3), ValueError, "axis")
    fcase(function, "axis-huge", _set_kw("axis", 2**70), ValueError, "axis")
    fcase(function, "out-list", _set_kw("out", [[0.0] * C] * 8), TypeError, "out")
    if function != "backward":
        for key, (value, exc) in {
            "zero": (0.0, ValueError),
            "negative": (-1.0, ValueError),
            "nan": (np.nan, ValueError),
            "inf": (np.inf, ValueError),
            "str": ("1e-5", TypeError),
            "None": (None, TypeError),
            "bool": (True, TypeError),
        }.items():
            fcase(function, f"eps-{key}", _set_kw("eps", value), exc, "eps")
    else:
        fcase(function, "eps-keyword", _set_kw("eps", 1e-5), TypeError)
        for key, value in {"str": "yes", "None": None, "int": 1, "float": 0.0}.items():
            fcase(function, f"training-{key}", _set_kw("training", value), TypeError, "training")
        fcase(function, "dy-x-shapes", _set_arg(0, np.ones((8, C + 1))), ValueError)
        fcase(function, "dy-x-transposed", _set_arg(0, np.ones((C, 8))), ValueError)
        fcase(function, "x-dy-shapes", _set_arg(1, np.ones((7, C))), ValueError)
fcase(
    "forward",
    "one-value-per-feature",
    _set_arg(0, np.ones((1, C))),
    ValueError,
    "more than 1 value",
)
fcase(
    "forward",
    "one-value-per-feature-3d",
    _set_arg(0, np.ones((1, C, 1))),
    ValueError,
    "more than 1 value",
)


@pytest.mark.parametrize("name", list(FUNCTIONAL_CASES))
def test_functional_bad_input_changes_nothing(name):
    function, change, exc, match = FUNCTIONAL_CASES[name]
    fn, make_args, kwargs = FUNCTIONS[function]
    args, kwargs = make_args(), dict(kwargs)
    change(args, kwargs)
    before = [bits(a) if isinstance(a, np.ndarray) and a.dtype != object else None for a in args]
    kw_before = {k: bits(v) for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert [
        bits(a) if isinstance(a, np.ndarray) and a.dtype != object else None for a in args
    ] == before
    assert {k: bits(v) for k, v in kwargs.items() if isinstance(v, np.ndarray)} == kw_before


@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_functional_valid_calls_are_deterministic_after_failures(function):
    """The valid base call of the cases above works, and gives the same bits
    before and after every failing call (no state hides anywhere)."""
    fn, make_args, kwargs = FUNCTIONS[function]

    def result():
        r = fn(*make_args(), **kwargs)
        return [bits(a) for a in (r if isinstance(r, tuple) else (r,))]

    first = result()
    for f, change, exc, _match in FUNCTIONAL_CASES.values():
        if f == function:
            args, kw = make_args(), dict(kwargs)
            change(args, kw)
            with pytest.raises(exc):
                fn(*args, **kw)
    assert result() == first


# --- threads ----------------------------------------------------------------------

THREAD_CASES = {
    "zero": (0, ValueError),
    "negative": (-1, ValueError),
    "too-many": (4097, ValueError),
    "huge": (2**100, (ValueError, OverflowError)),
    "float": (1.5, TypeError),
    "integral-float": (2.0, TypeError),
    "str": ("2", TypeError),
    "None": (None, TypeError),
    "bool": (True, TypeError),
    "list": ([2], TypeError),
}


@pytest.fixture
def restore_threads():
    before = bnpy.get_num_threads()
    yield before
    bnpy.set_num_threads(before)


@pytest.mark.parametrize("name", list(THREAD_CASES))
def test_set_num_threads_bad_input_changes_nothing(restore_threads, name):
    value, exc = THREAD_CASES[name]
    bnpy.set_num_threads(2)
    with pytest.raises(exc):
        bnpy.set_num_threads(value)
    assert bnpy.get_num_threads() == (2 if bnpy.has_openmp() else 1)


def test_thread_functions_signatures(restore_threads):
    with pytest.raises(TypeError):
        bnpy.set_num_threads()
    with pytest.raises(TypeError):
        bnpy.set_num_threads(2, 3)
    with pytest.raises(TypeError):
        bnpy.set_num_threads(n=2)  # positional-only, as the stub says
    with pytest.raises(TypeError):
        bnpy.get_num_threads(1)
    with pytest.raises(TypeError):
        bnpy.has_openmp(1)
    assert bnpy.get_num_threads() == restore_threads
    bnpy.set_num_threads(4096)  # the largest accepted
    assert bnpy.get_num_threads() == (4096 if bnpy.has_openmp() else 1)


def test_set_num_threads_takes_numpy_integers(restore_threads):
    bnpy.set_num_threads(np.int64(2))
    assert bnpy.get_num_threads() == (2 if bnpy.has_openmp() else 1)


def test_ordered_dict_is_a_dict():
    # the state dict check is isinstance(dict): subclasses such as OrderedDict
    # (what torch's state_dict() returns) are accepted
    bn = _trained()
    sd = collections.OrderedDict(_good_state(bn))
    bn.load_state_dict(sd)
    assert bn.num_batches_tracked == 123
