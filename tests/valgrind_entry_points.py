"""Every public entry point of bnpy once, for a run under valgrind.

    PYTHONMALLOC=malloc valgrind --error-exitcode=1 python tests/valgrind_entry_points.py

(.ci/run does this.) Small shapes, both layouts families and dtypes, the
error paths too: valgrind checks each call for invalid reads and writes, and
for memory bnpy loses.
"""

import copy
import pickle

import numpy as np

import bnpy


def expect_error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError, RuntimeError, FloatingPointError):
        return
    raise AssertionError(f"{fn} did not raise")


def exercise_layer(shape, axis, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    channels = shape[axis]
    bn = bnpy.BatchNorm(channels, axis=axis, dtype=dtype, momentum=None)
    expect_error(bn.backward, dy)
    bn.gamma = rng.normal(size=channels)
    bn.beta = np.arange(channels)
    y = bn(x)
    bn.backward(dy, out=np.empty_like(y))
    bn.forward(x, out=np.empty_like(y))
    bn.forward(x.copy(), out=None)
    bn.eval()
    bn(x)
    bn.backward(dy)
    bn.train()
    state = bn.state_dict()
    bn.load_state_dict(state)
    expect_error(bn.load_state_dict, {**state, "bogus": 1})
    single = [1] * len(shape)
    single[axis] = channels
    expect_error(bn.forward, np.zeros(single, dtype))  # one value per feature
    bad = x.copy()
    bad.flat[0] = np.nan
    expect_error(bn.forward, bad)
    expect_error(bn.forward, x.astype(np.complex64))
    expect_error(bn.backward, dy[:1])
    pickle.loads(pickle.dumps(bn))
    copy.deepcopy(bn)
    repr(bn)
    bn.eps, bn.momentum = 1e-3, 0.5
    _ = (
        bn.grad_gamma,
        bn.grad_beta,
        bn.running_mean,
        bn.running_var,
        bn.num_batches_tracked,
        bn.dtype,
        bn.axis,
        bn.affine,
        bn.track_running_stats,
        bn.training,
    )
    plain = bnpy.BatchNorm(
        channels, affine=False, track_running_stats=False, axis=axis, dtype=dtype
    )
    plain(x)
    plain.eval()(x)
    plain.backward(dy)


def exercise_functional(shape, axis, dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    channels = shape[axis]
    gamma, beta = np.ones(channels, dtype), np.zeros(channels, dtype)
    y, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta, axis=axis)
    bnpy.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis)
    bnpy.batch_norm_backward(dy, x, None, mean, invstd, axis=axis, training=False)
    bnpy.batch_norm_inference(x, gamma, beta, mean, invstd, axis=axis, out=np.empty_like(y))
    expect_error(bnpy.batch_norm_forward, x, gamma[:1], beta, axis=axis)


def exercise_streamed_outputs(dtype):
    """A y (features of 1 MiB or more) or dx of 16 MiB or more goes past the
    caches (non-temporal stores), row by row from each row's first cache
    line: rows of odd length start at different places within a line."""
    itemsize = np.dtype(dtype).itemsize
    shape = (2, 3, (16 << 20) // (6 * itemsize) + 3)
    rng = np.random.default_rng(2)
    x = rng.normal(size=shape).astype(dtype)
    bn = bnpy.BatchNorm(3, dtype=dtype)
    bn.forward(x)
    bn.backward(x[::-1].copy(), out=np.empty_like(x))


def main():
    bnpy.set_num_threads(1)
    # the baseline build: valgrind (3.19) does not decode every AVX instruction
    # compilers emit (the register form of vmovq, for one, which GCC writes in
    # the AVX2 build); the AVX2 and AVX-512 builds run under AddressSanitizer
    # and UndefinedBehaviorSanitizer in the C tests (tests/c/run.sh sanitize)
    builds = bnpy.cpu_capabilities()[:1]
    for capability in builds:
        bnpy.set_cpu_capability(capability)
        for shape, axis in [
            ((6, 3, 5), 1),
            ((40, 3), 1),
            ((2, 4, 4, 5), -1),
            ((0, 3, 2), 1),
            ((3, 2, 40), 1),
        ]:
            for dtype in (np.float32, np.float64):
                if shape[0] > 0:
                    exercise_layer(shape, axis, dtype)
                exercise_functional(shape, axis, dtype) if shape[0] > 1 else None
        for dtype in (np.float32, np.float64):
            exercise_streamed_outputs(dtype)
    print("valgrind entry points: ran the builds", builds, "last", bnpy.get_cpu_capability())
    expect_error(bnpy.set_cpu_capability, "sse2")
    bnpy.get_num_threads()
    expect_error(bnpy.set_num_threads, 0)
    empty = bnpy.BatchNorm(2)
    empty(np.zeros((0, 2)))
    print("valgrind entry points: done")


if __name__ == "__main__":
    main()
