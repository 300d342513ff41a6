"""out=: a training loop that allocates nothing the size of its data, and
inference in place."""

import tracemalloc

import numpy as np
import pytest

import bnpy

SHAPE = (16, 32, 20, 20)


def _data(dtype=np.float32):
    rng = np.random.default_rng(0)
    return rng.normal(3, 2, SHAPE).astype(dtype), rng.normal(size=SHAPE).astype(dtype)


def _peak_bytes(step, repeats=3):
    step()  # warm up
    tracemalloc.start()
    try:
        for _ in range(repeats):
            step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("axis", [1, -1])
def test_a_training_step_with_out_allocates_nothing_the_size_of_x(axis):
    x, dy = _data()
    if axis == -1:
        x, dy = (
            np.ascontiguousarray(np.moveaxis(x, 1, -1)),
            np.ascontiguousarray(np.moveaxis(dy, 1, -1)),
        )
    bn = bnpy.BatchNorm(x.shape[axis], axis=axis)
    y, dx = np.empty_like(x), np.empty_like(x)

    def step():
        bn.forward(x, out=y)
        bn.backward(dy, out=dx)

    assert _peak_bytes(step) < x.nbytes / 50  # O(C) scratch only


def test_the_functional_api_writes_into_out():
    x, dy = _data(np.float64)
    gamma, beta = np.ones(SHAPE[1]), np.zeros(SHAPE[1])
    y, dx = np.empty_like(x), np.empty_like(x)
    _, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta, out=y)

    def step():
        bnpy.batch_norm_forward(x, gamma, beta, out=y)
        bnpy.batch_norm_backward(dy, x, gamma, mean, invstd, out=dx)
        bnpy.batch_norm_inference(x, gamma, beta, mean, 1 / invstd**2, out=y)

    assert _peak_bytes(step) < x.nbytes / 50


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inference_in_place_matches_out_of_place_and_copies_nothing(dtype):
    x, _ = _data(dtype)
    bn = bnpy.BatchNorm(SHAPE[1], dtype=dtype)
    bn(x)
    bn.eval()
    want = bn(x)
    before = bn.state_dict()
    buffer = x.copy()
    assert bn.forward(buffer, out=buffer) is buffer
    assert np.array_equal(buffer, want)
    assert all(np.array_equal(before[k], bn.state_dict()[k]) for k in before)
    assert _peak_bytes(lambda: bn.forward(buffer, out=buffer)) < x.nbytes / 50
    with pytest.raises(RuntimeError, match="over its input"):
        bn.backward(np.ones_like(x))
    bn(x)  # a forward into a new array makes backward possible again
    assert bn.backward(np.ones_like(x)).shape == x.shape


def test_training_in_place_keeps_a_copy_for_backward():
    x, dy = _data(np.float64)
    reference = bnpy.BatchNorm(SHAPE[1], dtype=np.float64)
    want_y, want_dx = reference(x), reference.backward(dy)
    bn = bnpy.BatchNorm(SHAPE[1], dtype=np.float64)
    buffer = x.copy()
    bn.forward(buffer, out=buffer)
    assert np.array_equal(buffer, want_y)
    assert np.array_equal(bn.backward(dy), want_dx)
