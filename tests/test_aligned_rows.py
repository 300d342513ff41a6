"""An output row of 256 bytes or more is written in vectors that start on a
cache line, its first values one by one (a vector straddling two lines costs
float64 inference 30-50%, and NumPy's large arrays start 16 bytes into a
line). Where the output lies must not change its bits: every op, into a
separate output or in place, writes the same bits at every start within a
line, in every instruction-set build, on 1 and 2 threads, for rows just short
of, at and past that length, rows long enough for the pipelined passes, and
rows cut into tiles (pieces that start inside a row)."""

import numpy as np
import pytest
from bitwise import assert_same_bits_at_line_offsets, at_line_offset

import bnpy

ROW_VALUES = {np.float32: [63, 64, 65, 321, 2100], np.float64: [31, 32, 33, 321, 2100]}
CASES = [(dtype, n) for dtype, lengths in ROW_VALUES.items() for n in lengths]
PARALLEL_MIN = 65536  # fewer values than this run on one thread


def _shape(n):
    """4 features of rows of n, enough of them for two threads"""
    return (-(-PARALLEL_MIN // (4 * n)), 4, n)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = bnpy.get_num_threads()
    bnpy.set_num_threads(request.param)
    yield request.param
    bnpy.set_num_threads(before)


def _inputs(dtype, n):
    """x, dy, gamma, beta, running mean and variance for rows of n"""
    rng = np.random.default_rng(n)
    x = rng.normal(3.0, 2.0, size=_shape(n)).astype(dtype)
    dy = rng.normal(size=_shape(n)).astype(dtype)
    gamma, beta = rng.normal(size=4).astype(dtype), rng.normal(size=4).astype(dtype)
    running_mean = rng.normal(size=4).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, size=4).astype(dtype)
    return x, dy, gamma, beta, running_mean, running_var


def _in_place(op, start):
    """op over its own input: out <- start, then op(out) writes into out"""

    def write(out):
        out[...] = start
        op(out)

    return write


def _ops(dtype, n):
    """name -> f(out) that writes one op's output into out"""
    x, dy, gamma, beta, running_mean, running_var = _inputs(dtype, n)
    _, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta, axis=1)
    return {
        "inference": lambda out: bnpy.batch_norm_inference(
            x, gamma, beta, running_mean, running_var, axis=1, out=out
        ),
        "inference-in-place": _in_place(
            lambda out: bnpy.batch_norm_inference(
                out, gamma, beta, running_mean, running_var, axis=1, out=out
            ),
            x,
        ),
        "training-forward": lambda out: bnpy.batch_norm_forward(x, gamma, beta, axis=1, out=out),
        "backward": lambda out: bnpy.batch_norm_backward(
            dy, x, gamma, mean, invstd, axis=1, out=out
        ),
        "backward-in-place": _in_place(
            lambda out: bnpy.batch_norm_backward(out, x, gamma, mean, invstd, axis=1, out=out), dy
        ),
        "backward-inference": lambda out: bnpy.batch_norm_backward(
            dy, x, gamma, mean, invstd, axis=1, training=False, out=out
        ),
    }


@pytest.mark.parametrize(
    "op",
    [
        "inference",
        "inference-in-place",
        "training-forward",
        "backward",
        "backward-in-place",
        "backward-inference",
    ],
)
@pytest.mark.parametrize("dtype,n", CASES, ids=[f"{d.__name__}-{n}" for d, n in CASES])
@pytest.mark.parametrize("build", bnpy.cpu_capabilities())
def test_every_start_within_a_line_gives_the_same_bits(capability, threads, build, dtype, n, op):
    capability(build)
    write = _ops(dtype, n)[op]
    want = at_line_offset(_shape(n), dtype, 0)
    write(want)
    assert np.isfinite(want).all(), "offset 0: values left unwritten"
    assert_same_bits_at_line_offsets(write, want, range(1, 64 // np.dtype(dtype).itemsize))
