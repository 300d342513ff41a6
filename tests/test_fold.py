"""bnpy.fold, nn.Linear.fold_batch_norm and nn.fold_model: an eval-mode BatchNorm
folded into the layer before it gives that pair's outputs (to 1e-12 in float64)."""

import numpy as np
import pytest

import bnpy
from bnpy import nn


def _trained_bn(channels, rng, *, affine=True, axis=1):
    """An eval-mode float64 BatchNorm with parameters and statistics far from the defaults."""
    bn = bnpy.BatchNorm(channels, affine=affine, axis=axis, dtype=np.float64)
    if affine:
        bn.gamma = rng.normal(1.0, 0.7, channels)
        bn.beta = rng.normal(0.0, 2.0, channels)
    bn.running_mean = rng.normal(0.0, 3.0, channels)
    bn.running_var = rng.uniform(0.01, 20.0, channels)
    return bn.eval()


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_weight_out_axis_0(affine, with_bias):
    rng = np.random.default_rng(0)
    bn = _trained_bn(5, rng, affine=affine)
    weight, bias = rng.normal(size=(5, 7)), (rng.normal(size=5) if with_bias else None)
    x = rng.normal(size=(11, 7))
    z = x @ weight.T + (bias if with_bias else 0.0)
    folded_weight, folded_bias = bnpy.fold(bn, weight, bias)
    assert folded_weight.shape == (5, 7) and folded_bias.shape == (5,)
    assert folded_weight.dtype == folded_bias.dtype == np.float64
    np.testing.assert_allclose(x @ folded_weight.T + folded_bias, bn(z), rtol=1e-12, atol=1e-12)


def test_matrix_used_as_x_at_w_out_axis_1():
    rng = np.random.default_rng(1)
    bn = _trained_bn(4, rng)
    weight, bias = rng.normal(size=(6, 4)), rng.normal(size=4)
    x = rng.normal(size=(9, 6))
    folded_weight, folded_bias = bnpy.fold(bn, weight, bias, out_axis=1)
    np.testing.assert_allclose(
        x @ folded_weight + folded_bias, bn(x @ weight + bias), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_array_equal(bnpy.fold(bn, weight, bias, out_axis=-1)[0], folded_weight)


def test_conv_weight_checked_with_torch_conv2d(torch):
    rng = np.random.default_rng(2)
    bn = _trained_bn(6, rng)
    weight, bias = rng.normal(size=(6, 3, 3, 3)), rng.normal(size=6)
    x = rng.normal(size=(2, 3, 8, 8))
    conv = torch.nn.functional.conv2d
    z = conv(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias), padding=1)
    folded_weight, folded_bias = bnpy.fold(bn, weight, bias)
    assert folded_weight.shape == weight.shape
    y = conv(
        torch.from_numpy(x),
        torch.from_numpy(folded_weight),
        torch.from_numpy(folded_bias),
        padding=1,
    )
    np.testing.assert_allclose(y.numpy(), bn(z.numpy()), rtol=1e-12, atol=1e-12)


def test_conv_weight_against_bnpy_conv2d_without_bias():
    rng = np.random.default_rng(3)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=np.float64, rng=0)
    bn = _trained_bn(4, rng)
    x = rng.normal(size=(2, 3, 5, 5))
    expected = bn(conv(x))
    conv.fold_batch_norm(bn)
    assert conv.bias is not None and conv.bias.shape == (4,)
    np.testing.assert_allclose(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_arguments_are_left_alone_and_dtypes_follow_them():
    rng = np.random.default_rng(4)
    bn = _trained_bn(3, rng)
    weight, bias = rng.normal(size=(3, 2)), rng.normal(size=3)
    before = weight.copy(), bias.copy(), bn.state_dict()
    bnpy.fold(bn, weight, bias)
    np.testing.assert_array_equal(weight, before[0])
    np.testing.assert_array_equal(bias, before[1])
    for key, value in before[2].items():
        np.testing.assert_array_equal(bn.state_dict()[key], value)
    bn32 = bnpy.BatchNorm(3).eval()
    w32, b32 = bnpy.fold(bn32, weight.astype(np.float32))
    assert w32.dtype == b32.dtype == np.float32


def test_errors_say_what_is_wrong():
    rng = np.random.default_rng(5)
    bn = _trained_bn(3, rng)
    weight = rng.normal(size=(3, 2))
    with pytest.raises(ValueError, match="eval mode"):
        bnpy.fold(bnpy.BatchNorm(3), weight)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bnpy.fold(bnpy.BatchNorm(3, track_running_stats=False).eval(), weight)
    with pytest.raises(
        ValueError,
        match=r"weight of shape \(2, 3\) has 2 output features "
        r"along out_axis=0, but the BatchNorm normalizes 3",
    ):
        bnpy.fold(bn, weight.T)
    with pytest.raises(ValueError, match="out_axis 2 is out of bounds"):
        bnpy.fold(bn, weight, out_axis=2)
    with pytest.raises(ValueError, match=r"bias must be a real array of shape \(3,\)"):
        bnpy.fold(bn, weight, np.zeros(4))
    with pytest.raises(TypeError, match=r"bnpy\.BatchNorm"):
        bnpy.fold(object(), weight)
    with pytest.raises(TypeError, match="real numbers"):
        bnpy.fold(bn, weight.astype(complex))


def test_linear_fold_batch_norm_in_place():
    rng = np.random.default_rng(6)
    linear = nn.Linear(4, 3, bias=False, dtype=np.float64, rng=1)
    bn = _trained_bn(3, rng)
    x = rng.normal(size=(8, 4))
    expected = bn(linear(x))
    assert linear.fold_batch_norm(bn) is linear
    np.testing.assert_allclose(linear(x), expected, rtol=1e-12, atol=1e-12)
    assert linear.grad_weight is None and linear.weight.dtype == np.float64


def _trained_model(rng):
    model = nn.Sequential(
        nn.Linear(2, 16, rng=0, dtype=np.float64),
        bnpy.BatchNorm(16, dtype=np.float64),
        nn.Tanh(),
        nn.Sequential(
            nn.Linear(16, 8, bias=False, rng=1, dtype=np.float64),
            bnpy.BatchRenorm(8, dtype=np.float64),
            nn.ReLU(),
        ),
        nn.Linear(8, 3, rng=2, dtype=np.float64),
    )
    x = rng.normal(size=(64, 2))
    for _ in range(5):  # running statistics away from their initial values
        model(x)
    return model, x


def test_fold_model_predicts_the_same_and_drops_the_batch_norms():
    rng = np.random.default_rng(7)
    model, x = _trained_model(rng)
    folded = nn.fold_model(model)
    assert model.training  # left as it was
    expected = model.eval()(x)
    np.testing.assert_allclose(folded(x), expected, rtol=1e-12, atol=1e-12)
    kinds = [type(layer).__name__ for layer in folded.layers]
    assert kinds == ["Linear", "Tanh", "Sequential", "Linear"]
    assert [type(layer).__name__ for layer in folded.layers[2].layers] == ["Linear", "ReLU"]
    assert not folded.training
    np.testing.assert_array_equal(model(x), expected)  # the model itself is unchanged
