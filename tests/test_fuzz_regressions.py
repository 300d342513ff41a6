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

import bnpy
from bitwise import bits

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
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- 7. a MemoryError says how much was asked for -------------------------------

def test_memory_error_names_the_amount():
    with pytest.raises(MemoryError) as caught:
        bnpy.batch_norm_forward(np.empty((0, 2**40, 3)), None, None, axis=1)
    message = str(caught.value)
    assert "allocate" in message and "TiB" in message, message
