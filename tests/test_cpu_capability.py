"""Instruction-set builds: every build of the kernels this CPU runs ('default',
'avx2', 'avx512') gives bitwise the same results, and the choice can be made
(and is checked) from Python and from the environment."""

import numpy as np
import pytest

import bnpy

# (shape, axis): each kernel path with vector tails of every length
SHAPES = [
    ((3, 5, 5000), 1),  # planar, rows of 5000: tiles within a row, a tail of 8
    ((4, 7, 47, 43), 1),  # planar, rows of 2021 (one tile and a tail of 5)
    ((5, 3, 337), 1),  # planar, rows just above the short-row limit
    ((1200, 4, 60), 1),  # short rows as lanes: wide rows of 240 values
    ((700, 3, 150), 1),  # planar: tiles of 13 rows, a pipeline of 3 features
    ((30, 200, 100), 1),  # planar: tiles of 20 rows, one of 10
    ((16, 6, 15), 1),  # rows shorter than 16 values, as lanes
    ((9000, 3), 1),  # interleaved, three features folded into wide rows
    ((2, 21, 23, 37), -1),  # channels-last, 37 features
    ((5, 3, 17, 2, 19), 2),  # a middle feature axis
]


def _everything(x, axis, dtype):
    """What the layer and the functional API compute for x, as bytes."""
    rng = np.random.default_rng(11)
    channels = x.shape[axis]
    bn = bnpy.BatchNorm(channels, axis=axis, dtype=dtype)
    bn.gamma, bn.beta = rng.normal(size=channels), rng.normal(size=channels)
    dy = rng.normal(100.0, 1.0, size=x.shape)  # an offset: dbeta sums large values
    results = [bn(x), bn.backward(dy), bn.grad_gamma, bn.grad_beta, bn(x[::-1])]
    bn.eval()
    results += [bn(x), bn.backward(dy), bn.running_mean, bn.running_var]
    bn.calibrate([x, x[::-1] * 2.0])
    results += [bn.running_mean, bn.running_var]
    x, dy, gamma = x.astype(dtype), dy.astype(dtype), bn.gamma
    y, mean, invstd = bnpy.batch_norm_forward(x, gamma, None, axis=axis)
    results += [y, mean, invstd]
    results += bnpy.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis)
    results += bnpy.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis, training=False)
    return [np.asarray(r).tobytes() for r in results]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_every_build_gives_bitwise_identical_results(capability, shape, axis, dtype):
    x = np.random.default_rng(3).normal(1e3, 3.0, size=shape)
    results = {}
    for name in bnpy.cpu_capabilities():
        capability(name)
        results[name] = _everything(x, axis, dtype)
    first, *others = results.values()
    for name, other in zip(list(results)[1:], others):
        assert other == first, f"{name} differs from default"


# the build of the kernels every CPU runs: 'portable' when bnpy was built
# without vector extensions (BNPY_PORTABLE=1), which is then the only one
BASELINE = bnpy.cpu_capabilities()[0]


def test_default_build_is_always_there_and_best_is_chosen(run_python):
    runs = bnpy.cpu_capabilities()
    assert runs[0] in ("default", "portable")
    assert tuple(runs) == ("portable",) or set(runs) <= {"default", "avx2", "avx512"}
    code = "import bnpy; print(bnpy.get_cpu_capability(), bnpy.cpu_capabilities()[-1])"
    run = run_python(code, BNPY_CPU_CAPABILITY=None)
    chosen, best = run.stdout.split()
    assert chosen == best, run.stderr


def test_set_cpu_capability_checks_its_argument(capability):
    before = bnpy.get_cpu_capability()
    with pytest.raises(ValueError, match=f"'{BASELINE}', 'avx2' or 'avx512', got 'sse4'"):
        bnpy.set_cpu_capability("sse4")
    with pytest.raises(TypeError, match="must be a str, got int"):
        bnpy.set_cpu_capability(2)
    assert bnpy.get_cpu_capability() == before
    for name in {"avx2", "avx512"} - set(bnpy.cpu_capabilities()):
        with pytest.raises(ValueError, match=f"cannot run '{name}'"):
            bnpy.set_cpu_capability(name)
        assert bnpy.get_cpu_capability() == before
    capability(BASELINE)
    assert bnpy.get_cpu_capability() == BASELINE


def test_environment_variable_chooses_the_build(run_python):
    code = "import bnpy; print(bnpy.get_cpu_capability())"
    run = run_python(code, BNPY_CPU_CAPABILITY=BASELINE)
    assert run.stdout.strip() == BASELINE, run.stderr
    run = run_python(code, BNPY_CPU_CAPABILITY="neon")
    assert "BNPY_CPU_CAPABILITY" in run.stderr and "got 'neon'" in run.stderr
    assert run.stdout.strip() == bnpy.cpu_capabilities()[-1]
