"""An output row of 256 bytes or more is written in vectors that start on a
cache line, its first values one by one (a vector straddling two lines costs
float64 inference 30-50%, and NumPy's large arrays start 16 bytes into a
line). Where the output lies must not change its bits: every op writes the
same bits at every start within a line, in every instruction-set build, for
rows just short of, at and past that length, and rows long enough for the
pipelined passes."""
import numpy as np
import pytest

import bnpy
from bitwise import at_line_offset

ROW_VALUES = {np.float32: [63, 64, 65, 321], np.float64: [31, 32, 33, 321]}
CASES = [(dtype, n) for dtype, lengths in ROW_VALUES.items() for n in lengths]


def _inputs(dtype, n):
    """x, dy, gamma, beta, running mean and variance for 3 x 4 rows of n"""
    rng = np.random.default_rng(n)
    x = rng.normal(3.0, 2.0, size=(3, 4, n)).astype(dtype)
    dy = rng.normal(size=(3, 4, n)).astype(dtype)
    gamma, beta = rng.normal(size=4).astype(dtype), rng.normal(size=4).astype(dtype)
    running_mean = rng.normal(size=4).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, size=4).astype(dtype)
    return x, dy, gamma, beta, running_mean, running_var


def _ops(dtype, n):
    """name -> f(out) that writes one op's output into out"""
    x, dy, gamma, beta, running_mean, running_var = _inputs(dtype, n)
    _, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta, axis=1)
    return {
        "inference": lambda out: bnpy.batch_norm_inference(
            x, gamma, beta, running_mean, running_var, axis=1, out=out),
        "training-forward": lambda out: bnpy.batch_norm_forward(
            x, gamma, beta, axis=1, out=out),
        "backward": lambda out: bnpy.batch_norm_backward(
            dy, x, gamma, mean, invstd, axis=1, out=out),
        "backward-inference": lambda out: bnpy.batch_norm_backward(
            dy, x, gamma, mean, invstd, axis=1, training=False, out=out),
    }


@pytest.mark.parametrize("op", ["inference", "training-forward", "backward",
                                "backward-inference"])
@pytest.mark.parametrize("dtype,n", CASES, ids=[f"{d.__name__}-{n}" for d, n in CASES])
@pytest.mark.parametrize("build", bnpy.cpu_capabilities())
def test_every_start_within_a_line_gives_the_same_bits(capability, build, dtype, n, op):
    capability(build)
    write = _ops(dtype, n)[op]
    values_a_line = 64 // np.dtype(dtype).itemsize
    want = None
    for offset in range(values_a_line):
        out = at_line_offset((3, 4, n), dtype, offset)
        write(out)
        assert np.isfinite(out).all(), f"offset {offset}: values left unwritten"
        if want is None:
            want = out.tobytes()
        assert out.tobytes() == want, f"offset {offset}"
