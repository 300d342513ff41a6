"""A structured fuzzer of bnpy's calls (issue 25): programs of calls on one
layer and the functional API, with inputs drawn as an attacker would draw them
(NaN, infinities, values near the float32 limit, empty and strided arrays,
outputs that alias the inputs, the layer's own views, huge counts).

After every call it checks the promise "a failed call changes nothing":
when a call raises, the layer's state (parameters, running statistics,
num_batches_tracked, gradients, mode), its saved forward (what backward
would use, probed with _grad_sums, which changes nothing) and every array
the caller passed in are bitwise as before. Whatever happened, the layer
must reload its own state_dict. An exception of another type than the
documented ones, or a crash, is a finding too.

Two phases:
- derandomized: the same BNPY_FUZZ_EXAMPLES programs (default 40) on every
  run, so a failure reproduces;
- random: fresh programs until BNPY_FUZZ_SECONDS (default 0: skipped) run out.
.ci/run sets both; the suite runs only the first, briefly.
"""

import contextlib
import os
import time

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bnpy  # noqa: E402

# converting 1e300 to float32 is part of the game: NumPy's warning is not a finding
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

EXAMPLES = int(os.environ.get("BNPY_FUZZ_EXAMPLES", "40"))
SECONDS = float(os.environ.get("BNPY_FUZZ_SECONDS", "0"))
STEPS = 12  # calls per program

# the exceptions bnpy documents for bad input; anything else is a finding
EXPECTED = (ValueError, TypeError, FloatingPointError, OverflowError, RuntimeError)

SPECIAL = [np.nan, np.inf, -np.inf, 1e20, -1e20, 3e38, 1e300, -0.0, 0.0, 1e-40]


def bits(a):
    if a is None:
        return None
    a = np.asarray(a)
    return a.dtype.str, a.shape, a.tobytes()


# --- drawing inputs -------------------------------------------------------------


@st.composite
def shapes(draw, channels, axis):
    """A shape with `channels` features on `axis`: 2 to 4 dimensions, some of
    them 0 or 1."""
    ndim = draw(st.integers(2, 4))
    shape = [draw(st.sampled_from([0, 1, 2, 3, 5])) for _ in range(ndim)]
    shape[axis % ndim] = channels
    return tuple(shape)


@st.composite
def arrays(draw, shape_choices, dtype=None):
    """An input of one of the program's shapes (so that outputs can alias
    earlier inputs), any real dtype, often with special values, and often a
    strided or reversed view of a larger buffer."""
    shape = draw(st.sampled_from(shape_choices))
    dtype = dtype or draw(st.sampled_from([np.float32, np.float64, np.float32, np.int32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 1e3, 1e19]))
    with np.errstate(all="ignore"):
        base = rng.normal(0.0, scale, size=[2 * n for n in shape]).astype(dtype)
    view = draw(st.sampled_from(["contiguous", "contiguous", "strided", "reversed"]))
    if view == "strided":
        x = base[tuple(slice(0, 2 * n, 2) for n in shape)]
    elif view == "reversed":
        x = base[tuple(slice(n - 1 if n else None, None, -1) for n in shape)]
    else:
        x = base.reshape(-1)[: int(np.prod(shape))].reshape(shape)
    if x.size and dtype != np.int32:
        for _ in range(draw(st.integers(0, 2))):
            with np.errstate(all="ignore"):
                x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from(SPECIAL))
    return x


def vector(draw, channels):
    values = np.ones(channels)
    for c in range(channels):
        values[c] = draw(st.sampled_from([1.0, 0.5, -2.0, 0.0] + SPECIAL[:3]))
    return values


def out_for(draw, bn, x, pool):
    """None, a fresh array, x itself, or memory of an earlier array: the last
    forward's input or the buffer x is a view of."""
    kind = draw(st.sampled_from(["none", "fresh", "x", "pool", "base"]))
    dtype = np.dtype(bn.dtype)
    if kind == "fresh":
        return np.zeros(x.shape, dtype)
    if kind == "x":
        return x
    if kind == "pool":
        same = [
            a
            for a in pool
            if a.shape == x.shape
            and a.dtype == dtype
            and a.flags.c_contiguous
            and a.flags.writeable
        ]
        if same:
            return draw(st.sampled_from(same))
    if kind == "base" and x.base is not None and x.base.dtype == dtype and x.size:
        flat = x.base.reshape(-1)  # the buffer x is a view of, from its start
        return flat[: x.size].reshape(x.shape)
    return None


# --- what a failed call must leave as it was ---------------------------------------


def layer_state(bn, probe):
    snap = {k: bits(v) for k, v in bn.state_dict().items()}
    snap.update(
        training=bn.training,
        eps=bn.eps,
        momentum=bn.momentum,
        grads=(bits(bn.grad_gamma), bits(bn.grad_beta)),
    )
    if probe is not None:
        try:
            snap["saved"] = bits(bn._grad_sums(probe))
        except RuntimeError as exc:  # no forward, or inference in place
            snap["saved"] = str(exc)
    return snap


def check_call(bn, probe, inputs, call):
    """Run call(); when it raises, nothing may have changed. Returns the
    result, or None when it raised one of the expected exceptions."""
    before_layer = layer_state(bn, probe)
    before_inputs = [bits(a) for a in inputs]
    try:
        result = call()
    except EXPECTED:
        assert layer_state(bn, probe) == before_layer, "a failed call changed the layer"
        after = [bits(a) for a in inputs]
        assert after == before_inputs, "a failed call changed an input"
        return None
    return result


def check_round_trip(bn):
    before = layer_state(bn, None)
    bn.load_state_dict(bn.state_dict())
    assert layer_state(bn, None) == before


# --- the program ---------------------------------------------------------------------

OPERATIONS = ["forward", "forward", "backward", "set", "load", "mode", "calibrate", "functional"]


def run_program(data):
    draw = data.draw
    channels = draw(st.integers(1, 4))
    axis = draw(st.sampled_from([1, -1, 0]))
    choices = [draw(shapes(channels, axis)) for _ in range(2)]
    bn = bnpy.BatchNorm(
        channels,
        momentum=draw(st.sampled_from([0.1, None, 1.0])),
        affine=draw(st.booleans()),
        track_running_stats=draw(st.booleans()),
        axis=axis,
        dtype=draw(st.sampled_from([np.float32, np.float64])),
    )
    pool = []  # arrays handed to the layer: outputs may alias them later
    probe = None  # a dy of the saved forward's shape, to probe it without changing it
    for _ in range(STEPS):
        op = draw(st.sampled_from(OPERATIONS))
        if op == "forward":
            x = draw(arrays(choices))
            out = out_for(draw, bn, x, pool)
            y = check_call(bn, probe, [x] if out is not x else [], lambda: bn.forward(x, out=out))
            if y is not None:
                assert y.shape == x.shape and y.dtype == bn.dtype
                pool += [x, y]
                probe = np.random.default_rng(0).normal(size=x.shape).astype(bn.dtype)
        elif op == "backward":
            shape = probe.shape if probe is not None else (2, channels)
            dy = (
                draw(arrays(choices))
                if draw(st.booleans())
                else np.random.default_rng(1).normal(size=shape)
            )
            out = out_for(draw, bn, dy, pool)
            check_call(bn, probe, [dy] if out is not dy else [], lambda: bn.backward(dy, out=out))
        elif op == "set":
            name = draw(st.sampled_from(["gamma", "beta", "running_mean", "running_var"]))
            own = [getattr(bn, n) for n in ("gamma", "beta", "running_mean", "running_var")]
            own = [a for a in own if a is not None]
            value = (
                draw(st.sampled_from(own))
                if own and draw(st.booleans())
                else vector(draw, channels)
            )
            check_call(bn, probe, [value], lambda: setattr(bn, name, value))
        elif op == "load":
            sd = bn.state_dict()
            views = {k: getattr(bn, k) for k in sd if k != "num_batches_tracked"}
            for key in list(sd):
                if key == "num_batches_tracked":
                    sd[key] = draw(st.sampled_from([0, 7, 2**63 - 2, 2**63 - 1, -1]))
                elif draw(st.booleans()):
                    sd[key] = draw(st.sampled_from(list(views.values())))
                elif draw(st.booleans()):
                    sd[key] = vector(draw, channels)
            check_call(bn, probe, [], lambda: bn.load_state_dict(sd))
        elif op == "mode":
            bn.train(draw(st.booleans()))
        elif op == "calibrate":
            batches = [draw(arrays(choices)) for _ in range(draw(st.integers(1, 3)))]
            check_call(bn, probe, batches, lambda: bn.calibrate(batches))
        else:
            run_functional(draw, channels)
        check_round_trip(bn)


def run_functional(draw, channels):
    axis = draw(st.sampled_from([1, -1]))
    x = draw(arrays([draw(shapes(channels, axis))]))
    gamma = vector(draw, channels) if draw(st.booleans()) else None
    beta = vector(draw, channels) if draw(st.booleans()) else None
    out = (
        x
        if draw(st.booleans()) and x.dtype in (np.float32, np.float64) and x.flags.c_contiguous
        else None
    )
    inputs = [a for a in (x, gamma, beta) if a is not None and a is not out]
    before = [bits(a) for a in inputs]
    try:
        result = bnpy.batch_norm_forward(x, gamma, beta, axis=axis, out=out)
    except EXPECTED:
        assert [bits(a) for a in inputs] == before, "a failed functional call changed an input"
        return
    y, mean, invstd = result
    dy = np.ones_like(y)
    with contextlib.suppress(EXPECTED):
        bnpy.batch_norm_backward(dy, y if out is x else x, gamma, mean, invstd, axis=axis)


# --- the two phases ----------------------------------------------------------------

COMMON = dict(
    deadline=None, database=None, print_blob=True, suppress_health_check=list(HealthCheck)
)


@settings(max_examples=EXAMPLES, derandomize=True, **COMMON)
@given(st.data())
def test_fuzz_derandomized(data):
    run_program(data)


@settings(max_examples=25, **COMMON)
@given(st.data())
def _random_batch(data):
    run_program(data)


@pytest.mark.skipif(SECONDS <= 0, reason="set BNPY_FUZZ_SECONDS for a random run")
def test_fuzz_random_for_a_while():
    deadline = time.monotonic() + SECONDS
    batches = 0
    while time.monotonic() < deadline:
        _random_batch()
        batches += 1
    assert batches > 0
