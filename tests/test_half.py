"""Half precision: float16 and bfloat16 (ml_dtypes) data, read and written in
their own format by the kernels, with parameters and statistics in float32.

Every kernel computes in double the same way for every element type, so a
half result must be the float64 kernels' result on the same values, rounded
once to the half format to nearest, ties to even: the tests compare bits."""

import copy

import numpy as np
import pytest

import bnpy

ml_dtypes = pytest.importorskip("ml_dtypes")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
HALVES = [np.dtype(np.float16), BFLOAT16]


def round_to(values, dtype):
    """float64 values rounded once to dtype, to nearest with ties to even.
    NumPy rounds float64 to float16 directly; bfloat16 goes through float32
    rounded to odd (truncated, its last bit set when inexact), which keeps the
    one rounding to bfloat16 correct."""
    values = np.asarray(values, np.float64)
    if dtype == np.float16:
        return values.astype(np.float16)
    single = values.astype(np.float32)
    back = single.astype(np.float64)
    too_far = np.abs(back) > np.abs(values)
    single = np.where(too_far, np.nextafter(single, np.float32(0)), single)
    bits = single.view(np.uint32) | (back != values).astype(np.uint32)
    odd = np.where(np.isfinite(values), bits.view(np.float32), values.astype(np.float32))
    return odd.astype(dtype)


def same_bits(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    mismatch = a.view(np.uint16) != b.view(np.uint16)
    assert not mismatch.any(), (
        f"{mismatch.sum()} of {a.size} differ, first at {np.argwhere(mismatch)[0]}"
    )


def data(shape, dtype, seed=0, offset=1.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + offset).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


LAYERS = {
    "batch": lambda: bnpy.BatchNorm(6),
    "batch-last": lambda: bnpy.BatchNorm(5, axis=-1),
    "layer": lambda: bnpy.LayerNorm(5),
    "layer-2": lambda: bnpy.LayerNorm((7, 5)),
    "rms": lambda: bnpy.RMSNorm(5, eps=1e-5),
    "group": lambda: bnpy.GroupNorm(3, 6),
    "instance": lambda: bnpy.InstanceNorm(6, affine=True, track_running_stats=True),
}
SHAPE = (4, 6, 7, 5)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_and_backward_are_the_double_results_rounded_once(name, dtype):
    layer = LAYERS[name]()
    rng = np.random.default_rng(1)
    layer.gamma = rng.uniform(0.5, 1.5, layer.gamma.shape).astype(np.float32)
    if layer.beta is not None:
        layer.beta = rng.standard_normal(layer.beta.shape).astype(np.float32)
    reference = copy.deepcopy(layer)
    reference_64 = _as_float64(name, reference)
    x, dy = data(SHAPE, dtype)
    y = layer(x)
    dx = layer.backward(dy)
    want_y = reference_64(x.astype(np.float64))
    want_dx = reference_64.backward(dy.astype(np.float64))
    assert y.dtype == dtype and dx.dtype == dtype
    same_bits(y, round_to(want_y, dtype))
    same_bits(dx, round_to(want_dx, dtype))
    assert layer.grad_gamma.dtype == np.float32
    assert np.array_equal(layer.grad_gamma, reference_64.grad_gamma.astype(np.float32))
    if getattr(layer, "running_mean", None) is not None:
        assert np.array_equal(layer.running_mean, reference_64.running_mean.astype(np.float32))
        assert np.array_equal(layer.running_var, reference_64.running_var.astype(np.float32))


def _as_float64(name, layer):
    """a float64 layer of the same kind with layer's state (its float32 values)"""
    twin = {
        "batch": lambda: bnpy.BatchNorm(6, dtype=np.float64),
        "batch-last": lambda: bnpy.BatchNorm(5, axis=-1, dtype=np.float64),
        "layer": lambda: bnpy.LayerNorm(5, dtype=np.float64),
        "layer-2": lambda: bnpy.LayerNorm((7, 5), dtype=np.float64),
        "rms": lambda: bnpy.RMSNorm(5, eps=1e-5, dtype=np.float64),
        "group": lambda: bnpy.GroupNorm(3, 6, dtype=np.float64),
        "instance": lambda: bnpy.InstanceNorm(
            6, affine=True, track_running_stats=True, dtype=np.float64
        ),
    }[name]()
    twin.load_state_dict(layer.state_dict())
    return twin


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("name", ["batch", "instance"])
def test_eval_mode_with_running_statistics(name, dtype):
    layer = LAYERS[name]()
    x, dy = data(SHAPE, dtype, seed=2)
    layer(x)
    layer.eval()
    reference = _as_float64(name, layer).eval()
    same_bits(layer(x), round_to(reference(x.astype(np.float64)), dtype))
    same_bits(layer.backward(dy), round_to(reference.backward(dy.astype(np.float64)), dtype))


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_functional_forms_keep_the_half_and_give_float32_statistics(dtype):
    x, dy = data((8, 4, 9), dtype, seed=3)
    gamma, beta = np.linspace(0.5, 1.5, 4), np.linspace(-1, 1, 4)
    y, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta)
    assert y.dtype == dtype and mean.dtype == np.float32 and invstd.dtype == np.float32
    y64, _, _ = bnpy.batch_norm_forward(
        x.astype(np.float64),
        gamma.astype(np.float32).astype(np.float64),
        beta.astype(np.float32).astype(np.float64),
    )
    same_bits(y, round_to(y64, dtype))
    dx, dgamma, dbeta = bnpy.batch_norm_backward(dy, x, gamma, mean, invstd)
    assert dx.dtype == dtype and dgamma.dtype == np.float32 and dbeta.dtype == np.float32
    y, mean, invstd = bnpy.layer_norm_forward(x, 9, np.ones(9), np.zeros(9))
    assert y.dtype == dtype and mean.dtype == np.float64
    dx, dgamma, _ = bnpy.layer_norm_backward(dy, x, 9, np.ones(9), mean, invstd)
    assert dx.dtype == dtype and dgamma.dtype == np.float32


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_out_of_range_results_round_to_infinity_and_nan_stays_nan(dtype):
    big = 70000.0 if dtype == np.float16 else 3.4e38  # finite in float32, not in dtype
    x = np.array([[0.0], [1.0]] * 4, dtype)  # y = +-1 before the affine map
    y, _, _ = bnpy.batch_norm_forward(x, np.array([big], np.float32), np.array([0.0]))
    assert np.isinf(y.astype(np.float64)).all()
    x[0, 0] = np.nan
    y, _, _ = bnpy.batch_norm_forward(x, None, None)
    assert np.isnan(y.astype(np.float64)).all()  # NaN in a feature's statistics


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_a_float64_layer_computes_halves_in_float64(dtype):
    x, _ = data(SHAPE, dtype)
    layer = bnpy.LayerNorm(5, dtype=np.float64)
    assert layer(x).dtype == np.float64


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_results_do_not_depend_on_threads_or_build(dtype):
    x, dy = data((16, 32, 33, 17), dtype, seed=4)
    results = []
    build, threads = bnpy.get_cpu_capability(), bnpy.get_num_threads()
    try:
        for capability in bnpy.cpu_capabilities():
            for n in (1, 2):
                bnpy.set_cpu_capability(capability)
                bnpy.set_num_threads(n)
                out = []
                for make in (
                    lambda: bnpy.BatchNorm(32),
                    lambda: bnpy.GroupNorm(4, 32),
                    lambda: bnpy.LayerNorm(17),
                ):
                    layer = make()
                    out += [layer(x).view(np.uint16).copy(), layer.backward(dy).view(np.uint16)]
                results.append(out)
    finally:
        bnpy.set_cpu_capability(build)
        bnpy.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_batch_renorm_backward_from_sums_keeps_the_half(dtype):
    """BatchRenorm (and SyncBatchNorm) take dx from the gradient sums
    (_backward_from_sums): dx in x's half, the float64 twin's rounded once"""
    from bnpy.renorm import BatchRenorm

    x, dy = data(SHAPE, dtype, seed=5)
    layer, twin = BatchRenorm(6), BatchRenorm(6, dtype=np.float64)
    for _ in range(2):  # the second step renormalizes by the running statistics
        y, want_y = layer(x), twin(x.astype(np.float64))
        same_bits(y, round_to(want_y, dtype))
        dx, want_dx = layer.backward(dy), twin.backward(dy.astype(np.float64))
        same_bits(dx, round_to(want_dx, dtype))
    out = np.empty_like(dy)
    assert layer.backward(dy, out=out) is out


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_functional_backward_is_the_double_result_rounded_once(dtype):
    x, dy = data((8, 4, 9), dtype, seed=6)
    gamma = np.linspace(0.5, 1.5, 9).astype(np.float32)
    _, mean, invstd = bnpy.layer_norm_forward(x, 9, gamma, np.zeros(9, np.float32))
    dx, dgamma, dbeta = bnpy.layer_norm_backward(dy, x, 9, gamma, mean, invstd)
    want = bnpy.layer_norm_backward(
        dy.astype(np.float64), x.astype(np.float64), 9, gamma.astype(np.float64), mean, invstd
    )
    same_bits(dx, round_to(want[0], dtype))
    assert np.array_equal(dgamma, want[1].astype(np.float32))
    assert np.array_equal(dbeta, want[2].astype(np.float32))


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_rms_norm_default_eps_of_half_x_is_float32s(dtype):
    """as PyTorch's and the RMSNorm layer's: the parameters' dtype"""
    x, _ = data((3, 8), dtype, seed=7, offset=0.0)
    x[0] = 0.01  # a row whose mean square is near eps: eps shows
    y, invstd = bnpy.rms_norm_forward(x, 8, np.ones(8, np.float32))
    same_bits(y, bnpy.RMSNorm(8)(x))
    want = 1 / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1) + np.finfo(np.float32).eps)
    np.testing.assert_allclose(invstd, want, rtol=1e-12)


def test_torch_rms_norm_of_half_x_uses_float32s_eps(torch):
    x, _ = data((3, 8), np.float16, seed=7, offset=0.0)
    x[0] = 0.01
    y, _ = bnpy.rms_norm_forward(x, 8, np.ones(8, np.float32))
    t = torch.nn.functional.rms_norm(torch.from_numpy(x), (8,)).numpy()
    assert np.max(np.abs(y.astype(np.float64) - t.astype(np.float64))) <= 2**-10  # an ulp near 1
