"""Regressions from the fuzz campaign of issue 25 ("Nothing changes on
failure, even through aliases"): one test (or a few) per reproducer.

1. a failed training forward whose out is the input the last forward saved
   for backward leaves that input, and so the next backward, as it was;
2. a failed training forward whose out is the memory x was converted from
   (x a reversed or strided view of out) leaves x as it was;
3. load_state_dict of views of the layer's own buffers loads what they held;
4. num_batches_tracked at its largest value: a training forward raises
   OverflowError instead of wrapping, and changes nothing;
5. the setters, the running statistics a forward or calibrate computes, and
   load_state_dict follow one rule, so a layer always reloads its own state;
6. an input with no values returns at once, however many empty rows it has;
7. a MemoryError says how much was asked for.
"""

import copy
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from bitwise import bits

import bnpy

C = 3
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


def data(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(1.0, 2.0, size=shape).astype(dtype)


def state(bn):
    """Everything a failed call must leave as it was, bitwise."""
    snap = {k: bits(v) for k, v in bn.state_dict().items()}
    snap["grads"] = (bits(bn.grad_gamma), bits(bn.grad_beta))
    return snap


def assert_round_trips(bn):
    """The layer saves and reloads its own state, and copies."""
    before = state(bn)
    bn.load_state_dict(bn.state_dict())
    assert state(bn) == before
    assert state(copy.deepcopy(bn)) == before
    assert state(pickle.loads(pickle.dumps(bn))) == before


# --- 1. out = the input saved for backward ------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, C), (4, C, 5)], ids=["interleaved", "planar"])
def test_failed_forward_into_saved_input_keeps_backward(dtype, shape):
    bn = bnpy.BatchNorm(C, dtype=dtype)
    x1, dy = data(shape, 1, dtype), data(shape, 2, dtype)
    bn(x1)  # x1 is the layer's dtype and contiguous: backward uses x1 itself
    x1_bits, dx, before = bits(x1), bits(bn.backward(dy)), state(bn)
    x2 = data(shape, 3, dtype)
    x2.flat[0] = np.inf
    with pytest.raises(FloatingPointError):
        bn(x2, out=x1)
    assert bits(x1) == x1_bits
    assert bits(bn.backward(dy)) == dx
    assert state(bn) == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_into_saved_input_writes_out_when_it_succeeds(dtype):
    # the private buffer is copied to out: y is what any other out receives
    x1, x2, dy = data((8, C), 1, dtype), data((8, C), 2, dtype), data((8, C), 3, dtype)
    bn, twin = bnpy.BatchNorm(C, dtype=dtype), bnpy.BatchNorm(C, dtype=dtype)
    bn(x1)
    twin(x1.copy())
    want = twin(x2)
    got = bn(x2, out=x1)
    assert got is x1
    assert bits(x1) == bits(want)
    assert bits(bn.backward(dy)) == bits(twin.backward(dy))
    assert bits(bn.running_var) == bits(twin.running_var)


# --- 2. out = the memory x was converted from ------------------------------------


def _aliases(big):
    """(x, out): out is 8 contiguous rows of big, x a view of big overlapping it
    that the layer must copy (not contiguous, or reversed)."""
    out = big[:8]
    return {
        "reversed": (out[::-1], out),
        "columns-reversed": (out[:, ::-1], out),
        "every-other-row": (big[::2], out),
    }


@pytest.mark.parametrize("alias", ["reversed", "columns-reversed", "every-other-row"])
def test_failed_forward_keeps_the_input_out_aliases(alias):
    bn = bnpy.BatchNorm(C)
    big = data((16, C))
    big[2, 1] = np.nan  # in out, and in x
    x, out = _aliases(big)[alias]
    big_bits, before = bits(big), state(bn)
    with pytest.raises(FloatingPointError):
        bn(x, out=out)
    assert bits(big) == big_bits
    assert state(bn) == before


def test_forward_into_memory_of_its_input_succeeds():
    buf = data((8, C))
    x = buf[::-1]
    want = bnpy.BatchNorm(C)(x.copy())
    assert bits(bnpy.BatchNorm(C)(x, out=buf)) == bits(want)


# --- 3. load_state_dict of the layer's own views -------------------------------


def test_load_state_dict_of_own_views_swapped():
    bn = bnpy.BatchNorm(C, dtype=np.float64)
    bn.gamma, bn.beta = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    bn.running_mean, bn.running_var = [7.0, 8.0, 9.0], [10.0, 11.0, 12.0]
    bn.load_state_dict(
        {
            "gamma": bn.beta,
            "beta": bn.gamma,
            "running_mean": bn.running_var,
            "running_var": bn.running_mean,
            "num_batches_tracked": 2,
        }
    )
    assert bn.gamma.tolist() == [4.0, 5.0, 6.0]
    assert bn.beta.tolist() == [1.0, 2.0, 3.0]
    assert bn.running_mean.tolist() == [10.0, 11.0, 12.0]
    assert bn.running_var.tolist() == [7.0, 8.0, 9.0]


def test_setter_of_own_view():
    bn = bnpy.BatchNorm(C)
    bn.beta = [4.0, 5.0, 6.0]
    bn.gamma = bn.beta
    bn.beta = bn.gamma[::-1]
    assert bn.gamma.tolist() == [4.0, 5.0, 6.0]
    assert bn.beta.tolist() == [6.0, 5.0, 4.0]


# --- 4. num_batches_tracked at its largest value -------------------------------

LARGEST = 2**63 - 1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_count_does_not_wrap(momentum):
    bn = bnpy.BatchNorm(C, momentum=momentum)
    bn(data((8, C)))
    sd = bn.state_dict()
    sd["num_batches_tracked"] = LARGEST - 1
    bn.load_state_dict(sd)
    bn(data((8, C), 1))  # counts up to the largest value
    assert bn.num_batches_tracked == LARGEST
    assert_round_trips(bn)
    before, out = state(bn), np.zeros((8, C), np.float32)
    with pytest.raises(OverflowError, match=str(LARGEST)):
        bn(data((8, C), 2), out=out)
    assert state(bn) == before
    assert not out.any()  # checked before anything is written
    bn.eval()
    bn(data((8, C), 2))  # inference counts nothing: still fine
    assert bn.num_batches_tracked == LARGEST


# --- 5. one rule for the state: the layer reloads whatever it holds -------------


def test_forward_refuses_running_var_beyond_float32():
    bn = bnpy.BatchNorm(C)
    bn(data((8, C)))
    before = state(bn)
    x = data((8, C), 1) * np.float32(1e20)  # finite, but its variance is not in float32
    with pytest.raises(FloatingPointError, match=r"running statistics of feature\(s\) \[0, 1, 2\]"):
        bn(x)
    assert state(bn) == before
    assert_round_trips(bn)


def test_forward_in_place_refusing_running_var_puts_x_back():
    bn = bnpy.BatchNorm(C)
    x = data((8, C), 1) * np.float32(1e20)
    x_bits = bits(x)
    with pytest.raises(FloatingPointError):
        bn(x, out=x)
    assert bits(x) == x_bits


def test_calibrate_refuses_running_var_beyond_float32():
    bn = bnpy.BatchNorm(C)
    before = state(bn)
    with pytest.raises(FloatingPointError, match="float32"):
        bn.calibrate([data((8, C), 1) * np.float32(1e20)])
    assert state(bn) == before
    assert_round_trips(bn)


def test_float64_layer_keeps_what_float32_cannot():
    bn = bnpy.BatchNorm(C, dtype=np.float64)
    bn(data((8, C), 1, np.float64) * 1e20)
    assert np.isfinite(bn.running_var).all()
    assert_round_trips(bn)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("gamma", [np.nan, 1.0, 1.0], r"gamma must be finite, got nan at index 0"),
        ("beta", [0.0, 0.0, np.inf], r"beta must be finite, got inf at index 2"),
        ("running_mean", [0.0, -np.inf, 0.0], r"running_mean must be finite, got -inf at index 1"),
        (
            "running_var",
            [1.0, -1.0, 1.0],
            r"running_var must be finite and non-negative, got -1.0 at index 1",
        ),
    ],
)
def test_setters_follow_load_state_dict_rule(name, value, message):
    bn = bnpy.BatchNorm(C)
    before = state(bn)
    with pytest.raises(ValueError, match=message):
        setattr(bn, name, value)
    assert state(bn) == before
    sd = bn.state_dict()
    sd[name] = np.array(value, np.float32)
    with pytest.raises(ValueError, match=name):
        bn.load_state_dict(sd)
    assert_round_trips(bn)


# --- 6. an input with no values returns at once ---------------------------------


def test_empty_input_with_huge_leading_dimensions_returns_at_once():
    # in a child process with a timeout: before the fix each call walked
    # 2**50 empty rows, for days, with the GIL released
    code = textwrap.dedent("""
        import numpy as np, bnpy
        x = np.empty((2**50, 1, 0))
        one, zero = np.ones(1), np.zeros(1)
        y, mean, invstd = bnpy.batch_norm_forward(x, None, None, axis=1)
        assert y.shape == x.shape and mean[0] == 0.0 and invstd[0] == 1 / np.sqrt(1e-5)
        bnpy.batch_norm_inference(x, one, zero, zero, one, axis=1)
        dx, dg, db = bnpy.batch_norm_backward(x, x, one, zero, one, axis=1)
        assert dx.shape == x.shape and dg[0] == 0.0 and db[0] == 0.0
        x = np.empty((2**50, 3, 0), np.float32)
        bn = bnpy.BatchNorm(3)
        bn(x)
        bn.backward(x)
        assert bn.num_batches_tracked == 0 and not bn.grad_gamma.any()
        bn.calibrate([x, np.ones((4, 3))])
        bn.eval()
        bn(x)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- 7. a MemoryError says how much was asked for -------------------------------


def test_memory_error_names_the_amount():
    with pytest.raises(MemoryError) as caught:
        bnpy.batch_norm_forward(np.empty((0, 2**40, 3)), None, None, axis=1)
    message = str(caught.value)
    assert "allocate" in message and "TiB" in message, message
