"""Threads and cache tiles: results do not depend on the thread count, and
inputs large enough to span many tiles (and to run in parallel) still agree
with the float64 reference."""

import warnings

import numpy as np
import pytest

import bnpy
from bnpy import reference

# (shape, axis): planar rows longer than a tile, many interleaved tiles, a
# feature count that leaves a partial block, and the benchmark's layouts
LARGE = [
    ((3, 5, 5000), 1),  # planar, rows of 5000 values: tiles inside a row
    ((4, 7, 96, 97), 1),  # planar, odd row length
    ((1200, 4, 60), 1),  # short rows as lanes
    ((2000, 8, 9), 1),  # rows of 9 as lanes, wide rows of 72 values
    ((1200, 4, 150), 1),  # planar rows of 150: a pipeline split between threads
    ((30, 200, 100), 1),  # planar: tiles of 20 rows
    ((70000, 3), 1),  # interleaved, hundreds of row tiles
    ((200, 1030), 1),  # interleaved, one row group: its lanes cut between threads
    ((2, 61, 61, 37), -1),  # channels-last, 37 features: a partial block of 16
    ((9, 3, 17, 2, 19), 2),  # a middle feature axis
    # larger, and past the caches where outputs exceed half the last-level cache
    ((150000, 8), 1),  # interleaved
    ((1100, 16, 64), 1),  # planar rows of 64, the shortest that are not lanes
    ((100, 300, 60), 1),  # short rows as lanes, wide rows of 18,000 values
]


@pytest.fixture
def threads():
    """Set the thread count for a test, and put the original back after."""
    before = bnpy.get_num_threads()
    yield bnpy.set_num_threads
    bnpy.set_num_threads(before)


def _run(x, axis, dtype, training_steps=2):
    """Everything a layer computes for x: outputs, gradients, statistics."""
    rng = np.random.default_rng(7)
    channels = x.shape[axis]
    bn = bnpy.BatchNorm(channels, axis=axis, dtype=dtype, momentum=None)
    bn.gamma, bn.beta = rng.normal(size=channels), rng.normal(size=channels)
    dy = rng.normal(size=x.shape)
    results = []
    for _ in range(training_steps):
        results += [bn(x), bn.backward(dy), bn.grad_gamma, bn.grad_beta]
    bn.eval()
    results += [bn(x), bn.backward(dy), bn.running_mean, bn.running_var]
    return results


@pytest.mark.skipif(not bnpy.has_openmp(), reason="built without OpenMP")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LARGE)
def test_one_and_two_threads_give_bitwise_identical_results(threads, shape, axis, dtype):
    x = np.random.default_rng(3).normal(4.0, 3.0, size=shape)
    threads(1)
    one = _run(x, axis, dtype)
    threads(2)
    two = _run(x, axis, dtype)
    threads(3)  # more threads than cores, and an uneven split of the features
    three = _run(x, axis, dtype)
    for a, b, c in zip(one, two, three):
        assert a.tobytes() == b.tobytes() == c.tobytes()


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
@pytest.mark.parametrize("shape, axis", LARGE)
def test_large_inputs_agree_with_the_reference(shape, axis, dtype, tol):
    rng = np.random.default_rng(5)
    x = rng.normal(100.0, 3.0, size=shape).astype(dtype)  # an offset: tiles must merge well
    dy = rng.normal(size=shape).astype(dtype)
    channels = shape[axis]
    bn = bnpy.BatchNorm(channels, axis=axis, dtype=dtype)
    gamma = rng.normal(size=channels)
    bn.gamma = gamma
    y = bn(x)
    dx = bn.backward(dy)
    want_y, mean, var = reference.forward_train(x, bn.gamma, bn.beta, axis=axis)
    want_dx, want_dgamma, want_dbeta = reference.backward(dy, x, mean, var, bn.gamma, axis=axis)
    n = x.size // channels
    _, want_var = reference.update_running(0, 1, mean, var, n, 0.1)
    for got, want in [
        (y, want_y),
        (dx, want_dx),
        (bn.grad_gamma, want_dgamma),
        (bn.grad_beta, want_dbeta),
        (bn.running_var, want_var),
    ]:
        assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want))


def test_set_num_threads_checks_its_argument(threads):
    with pytest.raises(ValueError, match="0"):
        bnpy.set_num_threads(0)
    with pytest.raises(TypeError, match="integer"):
        bnpy.set_num_threads(1.5)
    threads(1)
    assert bnpy.get_num_threads() == 1


@pytest.mark.skipif(not bnpy.has_openmp(), reason="built without OpenMP")
def test_environment_variable_sets_the_thread_count(run_python):
    code = "import bnpy; print(bnpy.get_num_threads())"
    run = run_python(code, BNPY_NUM_THREADS="3")
    assert run.stdout.strip() == "3", run.stderr
    run = run_python(code, BNPY_NUM_THREADS="many")
    assert "BNPY_NUM_THREADS must be a positive integer" in run.stderr
    assert int(run.stdout) >= 1


def test_more_threads_without_openmp_warns_that_it_has_no_effect(threads):
    """A build without OpenMP (Clang without libomp, say) runs on one thread;
    asking for more says so instead of silently doing nothing."""
    if bnpy.has_openmp():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            threads(2)  # a real request: no warning
        assert bnpy.get_num_threads() == 2
    else:
        with pytest.warns(RuntimeWarning, match=r"without OpenMP: set_num_threads\(2\)"):
            threads(2)
        assert bnpy.get_num_threads() == 1
