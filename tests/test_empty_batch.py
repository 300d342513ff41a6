"""Empty batches (issue 6): a zero-length axis other than the feature axis.

The forward returns an empty output of the right shape and dtype and leaves
the running statistics and num_batches_tracked exactly as they were (README:
an empty batch carries no statistics; counting it would skew momentum=None's
cumulative average). It becomes the last forward: its backward returns an
empty dx and zero dgamma, dbeta. The functional API does the same without
state. A zero-length *feature* axis is not a batch at all: the layer refuses
it (num_features >= 1); the functional API must not crash on it.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from bitwise import bits

import bnpy

C = 3
DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]

# (empty shape, axis, shape of a non-empty batch for the same layer)
EMPTY = {
    "N0": ((0, C), 1, (6, C)),
    "N0-L4": ((0, C, 4), 1, (2, C, 4)),
    "L0": ((4, C, 0), 1, (4, C, 2)),
    "N0-L0": ((0, C, 0), 1, (3, C, 2)),
    "channels-last-N0": ((0, 5, C), -1, (2, 5, C)),
    "channels-last-H0": ((2, 0, C), -1, (2, 3, C)),
    "axis0": ((C, 0), 0, (C, 7)),
    "5d": ((2, C, 0, 3, 1), 1, (2, C, 2, 3, 1)),
}

LAYERS = {
    "default": dict(),
    "momentum-none": dict(momentum=None),
    "untracked": dict(track_running_stats=False),
    "no-affine": dict(affine=False),
}


def data(shape, seed, dtype=np.float64):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)


def state(bn):
    snap = {k: bits(v) for k, v in bn.state_dict().items()}
    snap["num_batches_tracked"] = bn.num_batches_tracked
    return snap


def trained(kind, axis, dtype, shape):
    bn = bnpy.BatchNorm(C, axis=axis, dtype=dtype, **LAYERS[kind])
    if bn.affine:
        bn.gamma[:] = [0.5, -2.0, 1.5]
        bn.beta[:] = [1.0, 0.0, -0.5]
    for seed in range(2):
        bn(data(shape, seed))
    return bn


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_forward_and_backward(dtype, case, layer, mode):
    shape, axis, full = EMPTY[case]
    bn = trained(layer, axis, dtype, full)
    bn.train(mode == "train")
    before = state(bn)

    x = np.zeros(shape, np.float64)  # converted to the layer's dtype, like any input
    y = bn(x)
    assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == dtype
    assert state(bn) == before

    dx = bn.backward(np.zeros(shape, dtype))
    assert isinstance(dx, np.ndarray) and dx.shape == shape and dx.dtype == dtype
    if bn.affine:
        for g in (bn.grad_gamma, bn.grad_beta):
            assert g.shape == (C,) and g.dtype == dtype
            assert bits(g) == bits(np.zeros(C, dtype))  # +0.0, not NaN or -0.0
    else:
        assert bn.grad_gamma is None and bn.grad_beta is None
    # the empty forward is now the last one: a dy of the earlier shape is refused
    with pytest.raises(ValueError):
        bn.backward(np.zeros(full, dtype))
    assert state(bn) == before


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_backward_overwrites_earlier_gradients(dtype):
    shape, axis, full = EMPTY["N0-L4"]
    bn = trained("default", axis, dtype, full)
    bn(data(full, 5))
    bn.backward(data(full, 6))
    assert np.any(bn.grad_gamma != 0) and np.any(bn.grad_beta != 0)
    bn(np.empty(shape, dtype))
    bn.backward(np.empty(shape, dtype))
    assert bits(bn.grad_gamma) == bits(np.zeros(C, dtype))
    assert bits(bn.grad_beta) == bits(np.zeros(C, dtype))


@pytest.mark.parametrize("case", ["N0", "L0", "channels-last-H0"])
@pytest.mark.parametrize("momentum", [0.1, None, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch_leaves_no_trace(dtype, momentum, case):
    """b1, (empty), b2 trains exactly like b1, b2: same outputs, same running
    statistics and count (with momentum=None the cumulative average would
    otherwise shift), same backward."""
    shape, axis, full = EMPTY[case]
    b1, b2, dy = data(full, 1), data(full, 2), data(full, 3, dtype)
    plain = bnpy.BatchNorm(C, axis=axis, dtype=dtype, momentum=momentum)
    with_empty = bnpy.BatchNorm(C, axis=axis, dtype=dtype, momentum=momentum)
    ys = [plain(b1), plain(b2)]
    ys_empty = [with_empty(b1)]
    with_empty(np.empty(shape))
    ys_empty.append(with_empty(b2))
    assert [bits(y) for y in ys_empty] == [bits(y) for y in ys]
    assert state(with_empty) == state(plain)
    assert with_empty.num_batches_tracked == 2
    assert bits(with_empty.backward(dy)) == bits(plain.backward(dy))


def test_empty_batch_first_of_all():
    """An empty first batch: nothing tracked yet, nothing tracked after."""
    bn = bnpy.BatchNorm(C, momentum=None)
    assert bn(np.empty((0, C))).shape == (0, C)
    assert bn.num_batches_tracked == 0
    assert bits(bn.running_mean) == bits(np.zeros(C, np.float32))
    assert bits(bn.running_var) == bits(np.ones(C, np.float32))
    x = data((5, C), 1)
    bn(x)
    assert bn.num_batches_tracked == 1
    np.testing.assert_allclose(bn.running_mean, x.mean(axis=0), rtol=1e-6)  # momentum 1/1


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch_with_out(dtype):
    shape, axis, full = EMPTY["N0-L4"]
    bn = trained("default", axis, dtype, full)
    out = np.empty(shape, dtype)
    assert bn.forward(np.empty(shape, dtype), out=out) is out
    dx_out = np.empty(shape, dtype)
    assert bn.backward(np.empty(shape, dtype), out=dx_out) is dx_out
    # a wrong out is still wrong when it is empty
    with pytest.raises(ValueError):
        bn.forward(np.empty(shape, dtype), out=np.empty((0, C, 5), dtype))
    other = np.float64 if dtype is np.float32 else np.float32
    with pytest.raises(ValueError):
        bn.forward(np.empty(shape, dtype), out=np.empty(shape, other))


def test_empty_batch_still_checks_the_feature_count():
    bn = bnpy.BatchNorm(C)
    with pytest.raises(
        ValueError,
        match=r"expected 3 features on axis 1, got input of shape "
        r"\(0, 4\)",
    ):
        bn(np.empty((0, 4)))
    assert bn.num_batches_tracked == 0


# --- the functional API ---------------------------------------------------------


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_empty_batch(dtype, case):
    shape, axis, _ = EMPTY[case]
    x = np.empty(shape, dtype)
    gamma, beta = np.array([0.5, -2.0, 1.5], dtype), np.array([1.0, 0.0, -0.5], dtype)
    y, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta, axis=axis)
    assert y.shape == shape and y.dtype == dtype
    assert mean.shape == invstd.shape == (C,)
    assert mean.dtype == invstd.dtype == dtype

    y = bnpy.batch_norm_inference(x, gamma, beta, np.zeros(C), np.ones(C), axis=axis)
    assert y.shape == shape and y.dtype == dtype

    for training in (True, False):
        dx, dgamma, dbeta = bnpy.batch_norm_backward(
            np.empty(shape, dtype), x, gamma, np.zeros(C), np.ones(C), axis=axis, training=training
        )
        assert dx.shape == shape and dx.dtype == dtype
        assert bits(dgamma) == bits(np.zeros(C, dtype))
        assert bits(dbeta) == bits(np.zeros(C, dtype))
        dx, dgamma, dbeta = bnpy.batch_norm_backward(
            np.empty(shape, dtype), x, None, np.zeros(C), np.ones(C), axis=axis, training=training
        )
        assert dx.shape == shape and dgamma is None and dbeta is None


# --- a zero-length feature axis -----------------------------------------------------

ZERO_FEATURE_CALLS = {
    "forward-(5,0)": "bnpy.batch_norm_forward(np.zeros((5, 0)), None, None)",
    "forward-(2,0,3)-f32": "bnpy.batch_norm_forward(np.zeros((2, 0, 3), np.float32), None, None)",
    "forward-(5,0)-axis-1": "bnpy.batch_norm_forward(np.zeros((5, 0)), None, None, axis=-1)",
    "inference-(5,0)": "bnpy.batch_norm_inference(np.zeros((5, 0)), None, None, "
    "np.zeros(0), np.ones(0))",
    "backward-(5,0,2)": "bnpy.batch_norm_backward(np.zeros((5, 0, 2)), np.zeros((5, 0, 2)), "
    "None, np.zeros(0), np.ones(0))",
}


@pytest.mark.parametrize("call", list(ZERO_FEATURE_CALLS))
def test_functional_zero_features_does_not_crash(call):
    """No features: either a ValueError or empty results, but never a crash.
    Run in a child process, so that a crash fails this test, not the suite."""
    script = textwrap.dedent(f"""
        import numpy as np, bnpy
        try:
            result = {ZERO_FEATURE_CALLS[call]}
        except ValueError as error:
            print("ValueError", error)
        else:
            arrays = result if isinstance(result, tuple) else (result,)
            assert all(a is None or a.size == 0 for a in arrays), result
            print("empty")
    """)
    # the child imports the bnpy this test imported
    root = os.path.dirname(os.path.dirname(os.path.abspath(bnpy.__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    }
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, f"exit status {run.returncode}; stderr: {run.stderr[-2000:]}"
    assert run.stdout.startswith(("ValueError", "empty")), run.stdout


def test_layer_zero_features_is_refused():
    with pytest.raises(ValueError, match="num_features"):
        bnpy.BatchNorm(0)
    bn = bnpy.BatchNorm(C)
    with pytest.raises(ValueError, match=r"\(5, 0\)"):
        bn(np.zeros((5, 0)))
    assert bn.num_batches_tracked == 0
