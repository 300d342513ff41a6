"""bnpy.nn: the small NumPy network toolkit the notebooks are built on.

Every layer's backward is checked with bnpy.gradcheck; the deep-network tests
pin what the notebooks and the demo claim: a 20-layer sigmoid network's
gradient vanishes without BatchNorm and stays within a factor of ten with it,
and BatchNorm trains it where the plain network cannot.
"""

import copy
import functools

import numpy as np
import pytest

import bnpy
from bnpy import nn
from bnpy.data import spirals
from bnpy.gradcheck import gradcheck


def model_gradcheck(model, x, **options):
    """gradcheck of model's dx and of the gradient of every parameter it lists.

    The layers are float64, whose gradients agree with finite differences to
    about 1e-9: the tolerances are tighter than gradcheck's defaults, so that
    a gradient wrong by 0.1 % fails.
    """
    options = {"atol": 1e-7, "rtol": 1e-5, **options}
    params = [param for param, _ in model.parameters()]

    def load(values):
        for param, value in zip(params, values):
            param[...] = value

    def forward(x_, *values):
        load(values)
        return model.forward(x_)

    def backward(dy, x_, *values):
        load(values)
        model.forward(x_)
        dx = model.backward(dy)
        return (dx, *[grad for _, grad in model.parameters()])

    return gradcheck(forward, backward, [x, *params], **options)


def data(shape, seed=0):
    return np.random.default_rng(seed).normal(0.5, 1.5, size=shape)


# ---- every layer's backward passes gradcheck --------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 4)])
def test_linear_gradients_pass_gradcheck(bias, shape):
    layer = nn.Linear(4, 3, bias=bias, dtype=np.float64, rng=1)
    report = model_gradcheck(layer, data(shape))
    assert report.passed, report
    assert len(report.inputs) == (3 if bias else 2)  # x, weight[, bias]: all checked
    assert all(r.checked for r in report.inputs)


@pytest.mark.parametrize("make", [nn.ReLU, nn.Tanh, nn.Sigmoid])
def test_activation_gradients_pass_gradcheck(make):
    x = data((6, 5))
    x = np.sign(x) * (0.1 + np.abs(x))  # away from ReLU's kink at 0
    report = model_gradcheck(make(), x)
    assert report.passed, report


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_sequential_with_batchnorm_passes_gradcheck(training, affine):
    model = nn.Sequential(
        nn.Linear(3, 5, dtype=np.float64, rng=0),
        bnpy.BatchNorm(5, affine=affine, dtype=np.float64),
        nn.Tanh(),
        nn.Linear(5, 4, dtype=np.float64, rng=1),
        nn.Sigmoid(),
        nn.Linear(4, 2, dtype=np.float64, rng=2),
    )
    model.forward(data((8, 3), seed=3))  # running statistics away from (0, 1)
    model.train(training)
    model[1].momentum = 0.0  # forward calls during the check leave them alone
    report = model_gradcheck(model, data((8, 3), seed=4))
    assert report.passed, report
    # x, 3 weights, 3 biases, and gamma and beta when affine
    assert len(report.inputs) == 7 + 2 * affine


def test_deep_mlp_gradients_pass_gradcheck_in_fast_mode():
    model = nn.mlp(2, 3, width=6, depth=6, batch_norm=True, dtype=np.float64, rng=0)
    report = model_gradcheck(model, data((10, 2)), mode="fast")
    assert report.passed, report


def test_softmax_cross_entropy_gradient_passes_gradcheck():
    labels = np.array([0, 2, 1, 2, 0])

    def forward(logits):
        return np.array(nn.softmax_cross_entropy(logits, labels)[0])

    def backward(dy, logits):
        return dy * nn.softmax_cross_entropy(logits, labels)[1]

    report = gradcheck(forward, backward, [data((5, 3))])
    assert report.passed, report


def test_a_wrong_layer_backward_is_caught():
    """The checks above can fail: a Tanh whose backward forgets the square."""

    class WrongTanh(nn.Tanh):
        def backward(self, dy):
            return dy * (1 - self._y)

    report = model_gradcheck(WrongTanh(), data((4, 3)))
    assert not report.passed


# ---- the deep-network claims of the issue, the notebooks and the demo -------


def deep_sigmoid(batch_norm, seed):
    """A 20-layer sigmoid network of width 64 and one forward/backward on spirals."""
    x, labels = spirals(200, rng=seed)
    model = nn.mlp(2, 3, width=64, depth=20, activation="sigmoid", batch_norm=batch_norm, rng=seed)
    _, dlogits = nn.softmax_cross_entropy(model.forward(x), labels)
    model.backward(dlogits)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_vanishes_without_batchnorm_and_not_with_it(seed):
    plain = nn.weight_gradient_norms(deep_sigmoid(False, seed))
    normalized = nn.weight_gradient_norms(deep_sigmoid(True, seed))
    assert len(plain) == len(normalized) == 20
    assert plain[0] / plain[-1] < 1e-6
    assert 0.1 <= normalized[0] / normalized[-1] <= 10


def test_batchnorm_preactivations_have_mean_0_and_std_1_on_the_training_batch():
    model = deep_sigmoid(True, seed=0)
    preactivations = nn.preactivations(model)
    assert len(preactivations) == 19
    for values in preactivations:
        assert values.shape == (600, 64)
        np.testing.assert_allclose(values.mean(axis=0), 0, atol=1e-4)
        assert np.median(values.std(axis=0)) > 0.999
    # exactly: eps makes each unit's std sqrt(var / (var + eps)), var its input's variance
    inputs = [
        model.outputs[i - 1]
        for i, layer in enumerate(model.layers)
        if isinstance(layer, bnpy.BatchNorm)
    ]
    for before, after in zip(inputs, preactivations):
        var = before.astype(np.float64).var(axis=0)
        np.testing.assert_allclose(after.std(axis=0), np.sqrt(var / (var + 1e-5)), atol=1e-4)
    # without BatchNorm the deep layers' units barely vary over the batch
    plain = [nn.batch_std(v) for v in nn.preactivations(deep_sigmoid(False, seed=0))]
    assert plain[-1] < 1e-4 * plain[0]


def test_batchnorm_trains_where_the_plain_network_does_not():
    x, labels = spirals(200, rng=0)
    final = {}
    for batch_norm in (False, True):
        model = nn.mlp(2, 3, batch_norm=batch_norm, rng=0)  # 20 sigmoid layers of 64
        losses = nn.fit(model, x, labels, lr=0.3, steps=300, batch_size=64, rng=1)
        assert losses.shape == (300,) and np.all(np.isfinite(losses))
        final[batch_norm] = losses[-50:].mean()
    assert final[False] > 1.0  # chance level is log(3) = 1.0986
    assert final[True] < final[False] - 0.3


# ---- Linear, activations -----------------------------------------------------


def test_linear_forward_is_x_weight_transposed_plus_bias():
    layer = nn.Linear(4, 3, rng=0)
    layer.bias[:] = [1.0, -2.0, 0.5]
    x = data((5, 4))
    y = layer(x)
    assert y.dtype == np.float32 and y.shape == (5, 3)
    np.testing.assert_allclose(y, x @ layer.weight.T.astype(np.float64) + layer.bias, rtol=1e-5)


def test_linear_weights_have_the_documented_scale_and_are_reproducible():
    layer = nn.Linear(400, 300, weight_scale=2.0, rng=7)
    assert layer.weight.shape == (300, 400) and layer.weight.dtype == np.float32
    assert layer.weight.std() == pytest.approx(2.0 / np.sqrt(400), rel=0.02)
    assert abs(layer.weight.mean()) < 0.01
    np.testing.assert_array_equal(layer.weight, nn.Linear(400, 300, weight_scale=2.0, rng=7).weight)
    np.testing.assert_array_equal(layer.bias, 0)
    assert nn.Linear(3, 2, bias=False).bias is None


def test_linear_gradients_are_none_until_backward_then_overwritten():
    layer = nn.Linear(3, 2, rng=0)
    assert layer.grad_weight is None and layer.grad_bias is None
    x = data((4, 3))
    layer(x)
    layer.backward(np.ones((4, 2)))
    first = layer.grad_weight.copy()
    layer.backward(np.ones((4, 2)))
    np.testing.assert_allclose(layer.grad_weight, first)  # not accumulated
    np.testing.assert_allclose(layer.grad_bias, [4, 4])


def test_linear_errors():
    layer = nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(np.ones((4, 2)))
    with pytest.raises(ValueError, match="expected 3 features"):
        layer(np.ones((4, 5)))
    layer(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"dy has shape \(4, 3\)"):
        layer.backward(np.ones((4, 3)))
    with pytest.raises(ValueError, match="in_features"):
        nn.Linear(0, 2)
    with pytest.raises(TypeError, match="out_features"):
        nn.Linear(2, 2.5)
    with pytest.raises(ValueError, match="dtype"):
        nn.Linear(2, 2, dtype=np.int32)
    with pytest.raises(TypeError, match="real numbers"):
        layer(np.ones((4, 3), dtype=complex))


def test_activations_compute_their_functions():
    x = np.linspace(-5, 5, 11)
    np.testing.assert_allclose(nn.ReLU()(x), np.maximum(x, 0))
    np.testing.assert_allclose(nn.Tanh()(x), np.tanh(x))
    np.testing.assert_allclose(nn.Sigmoid()(x), 1 / (1 + np.exp(-x)), rtol=1e-14)


def test_relu_gradient_at_zero_is_zero():
    relu = nn.ReLU()
    relu(np.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(relu.backward(np.ones(3)), [0, 0, 1])


def test_activations_keep_float_dtypes_and_convert_integers():
    for layer in (nn.ReLU(), nn.Tanh(), nn.Sigmoid()):
        assert layer(np.ones(3, dtype=np.float32)).dtype == np.float32
        assert layer(np.arange(3)).dtype == np.float64


def test_sigmoid_does_not_overflow_on_large_inputs():
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = nn.Sigmoid()(np.array([-1e4, 0.0, 1e4], dtype=np.float32))
    np.testing.assert_array_equal(y, [0, 0.5, 1])


def test_activation_backward_errors():
    layer = nn.Sigmoid()
    with pytest.raises(RuntimeError, match=r"Sigmoid\.backward called before any forward"):
        layer.backward(np.ones(3))
    layer(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"dy has shape \(3, 2\)"):
        layer.backward(np.ones((3, 2)))


# ---- Sequential --------------------------------------------------------------


def small_model(batch_norm=True):
    layers = [nn.Linear(2, 4, rng=0)]
    layers += [bnpy.BatchNorm(4)] if batch_norm else []
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(4, 3, rng=1))


def test_sequential_records_outputs_and_output_gradients():
    model = small_model()
    x, dy = data((6, 2)), data((6, 3), seed=1)
    y = model(x)
    assert len(model.outputs) == len(model) == 4
    linear, _, _, last = model.layers
    np.testing.assert_allclose(model.outputs[0], x @ linear.weight.T + linear.bias, rtol=1e-5)
    np.testing.assert_allclose(model.outputs[1].mean(axis=0), 0, atol=1e-6)
    np.testing.assert_array_equal(model.outputs[2], np.maximum(model.outputs[1], 0))
    np.testing.assert_allclose(
        model.outputs[3], model.outputs[2] @ last.weight.T + last.bias, rtol=1e-5
    )
    assert y is model.outputs[3]
    dx = model.backward(dy)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(model.grads[-1], dy)
    relu_grad = model.grads[2]
    np.testing.assert_allclose(relu_grad, dy @ model[3].weight, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(model.grads[1], relu_grad * (model.outputs[1] > 0))


def test_sequential_train_and_eval_reach_every_layer():
    model = small_model()
    assert model.eval() is model
    assert not model.training and not model[1].training and not model[2].training
    model.train()
    assert model.training and model[1].training and model[3].training


def test_sequential_parameters_share_memory_with_the_layers():
    model = small_model()
    params = model.parameters()
    # Linear weight and bias, BatchNorm gamma and beta, Linear weight and bias
    assert [p.shape for p, _ in params] == [(4, 2), (4,), (4,), (4,), (3, 4), (3,)]
    assert all(g is None for _, g in params)
    params[2][0][:] = 3.0
    np.testing.assert_array_equal(model[1].gamma, 3.0)
    model(data((6, 2)))
    model.backward(data((6, 3)))
    grads = [g for _, g in model.parameters()]
    np.testing.assert_array_equal(grads[2], model[1].grad_gamma)
    np.testing.assert_array_equal(grads[4], model[3].grad_weight)
    no_affine = nn.Sequential(bnpy.BatchNorm(4, affine=False))
    assert no_affine.parameters() == []


def test_sequential_errors():
    with pytest.raises(TypeError, match=r"layer 1 .* has no forward, backward"):
        nn.Sequential(nn.ReLU(), object())
    with pytest.raises(RuntimeError, match="before any forward"):
        small_model().backward(np.ones((2, 3)))


# ---- SGD, loss, accuracy -----------------------------------------------------


def one_linear_step(optimizer_options, steps):
    """weight after `steps` SGD steps on one Linear layer, and the gradients seen."""
    layer = nn.Linear(2, 1, bias=False, dtype=np.float64, rng=0)
    model = nn.Sequential(layer)
    optimizer = nn.SGD(model, **optimizer_options)
    start, grads = layer.weight.copy(), []
    for step in range(steps):
        model(data((3, 2), seed=step))
        model.backward(np.ones((3, 1)))
        grads.append(layer.grad_weight.copy())
        optimizer.step()
    return start, grads, layer.weight


def test_sgd_step_without_momentum():
    start, grads, weight = one_linear_step(dict(lr=0.1), steps=1)
    np.testing.assert_allclose(weight, start - 0.1 * grads[0])


def test_sgd_step_with_momentum_is_pytorchs_heavy_ball():
    start, (g1, g2), weight = one_linear_step(dict(lr=0.1, momentum=0.9), steps=2)
    velocity = 0.9 * g1 + g2
    np.testing.assert_allclose(weight, start - 0.1 * g1 - 0.1 * velocity)


def test_sgd_updates_batchnorm_parameters_in_place():
    model = small_model()
    model(data((6, 2)))
    model.backward(data((6, 3)))
    expected = model[1].gamma - 0.5 * model[1].grad_gamma
    nn.SGD(model, lr=0.5).step()
    np.testing.assert_allclose(model[1].gamma, expected, rtol=1e-6)


def test_sgd_errors():
    with pytest.raises(RuntimeError, match="before the model's first backward"):
        nn.SGD(small_model(), lr=0.1).step()
    with pytest.raises(ValueError, match="lr"):
        nn.SGD(small_model(), lr=0)
    with pytest.raises(ValueError, match="momentum"):
        nn.SGD(small_model(), lr=0.1, momentum=1.0)


def test_softmax_cross_entropy_values():
    logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]])
    labels = np.array([0, 1])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss, dlogits = nn.softmax_cross_entropy(logits, labels)
    assert loss == pytest.approx(-np.log(probs[[0, 1], labels]).mean())
    np.testing.assert_allclose(dlogits, (probs - np.eye(3)[labels]) / 2)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0], [0.0, 1e4]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, dlogits = nn.softmax_cross_entropy(logits, np.array([1, 1]))
    assert loss == pytest.approx(5e3)
    assert dlogits.dtype == np.float32
    np.testing.assert_allclose(dlogits, [[0.5, -0.5], [0, 0]])


def test_softmax_cross_entropy_errors():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels must be 2 integers"):
        nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        nn.softmax_cross_entropy(np.zeros(3), np.array([0]))


def test_accuracy():
    logits = np.array([[1, 0], [0, 1], [1, 0], [1, 0]])
    assert nn.accuracy(logits, [0, 1, 1, 0]) == 0.75


# ---- mlp, fit, measurements, data ---------------------------------------------


def test_mlp_structure():
    model = nn.mlp(2, 3, width=8, depth=4, activation="tanh", batch_norm=True)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Linear", "BatchNorm", "Tanh"] * 3 + ["Linear"]
    linears = nn.linear_layers(model)
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (2, 8),
        (8, 8),
        (8, 8),
        (8, 3),
    ]
    assert [lin.bias is None for lin in linears] == [True, True, True, False]
    plain = nn.mlp(2, 3, width=8, depth=2, activation=nn.ReLU)
    assert [type(layer).__name__ for layer in plain.layers] == ["Linear", "ReLU", "Linear"]
    assert all(lin.bias is not None for lin in nn.linear_layers(plain))
    with pytest.raises(ValueError, match="activation"):
        nn.mlp(2, 3, activation="swish")


def test_mlp_with_the_same_seed_has_the_same_weights_with_and_without_batchnorm():
    plain, normalized = (nn.mlp(2, 3, batch_norm=b, rng=4) for b in (False, True))
    for a, b in zip(nn.linear_layers(plain), nn.linear_layers(normalized)):
        np.testing.assert_array_equal(a.weight, b.weight)


def test_fit_stops_at_the_first_non_finite_loss():
    x, labels = spirals(20, rng=0)
    model = nn.mlp(2, 3, width=8, depth=3, activation="relu", weight_scale=10.0, rng=0)
    forward_calls = []
    forward = model.forward
    model.forward = lambda x_: forward_calls.append(1) or forward(x_)
    with np.errstate(
        over="raise", invalid="raise", divide="raise"
    ):  # no floating-point warnings escape fit
        losses = nn.fit(model, x, labels, lr=1e30, steps=20, batch_size=16, rng=0)
    assert np.isfinite(losses[0])
    assert np.isnan(losses[-1])
    first_nan = np.argmax(np.isnan(losses))
    assert np.all(np.isnan(losses[first_nan:])) and np.all(np.isfinite(losses[:first_nan]))
    assert len(forward_calls) == first_nan + 1  # it stopped at the first non-finite loss


def test_measurements_need_a_forward_or_backward_first():
    model = small_model()
    with pytest.raises(RuntimeError, match="forward"):
        nn.preactivations(model)
    model(data((4, 2)))
    assert len(nn.preactivations(model)) == 1  # the BatchNorm's output, before the ReLU
    with pytest.raises(RuntimeError, match="backward"):
        nn.weight_gradient_norms(model)


def test_batch_std_is_the_mean_of_per_unit_stds():
    values = np.array([[0.0, 10.0], [2.0, 10.0]])  # unit 0 varies (std 1), unit 1 is constant
    assert nn.batch_std(values) == pytest.approx(0.5)


def test_spirals_without_noise_lie_on_the_documented_arms():
    x, labels = spirals(5, n_classes=3, noise=0.0)
    radius = np.tile(np.linspace(0, 1, 5), 3)
    angle = 2 * np.pi * (radius + labels / 3)  # one turn, arms a third of a turn apart
    expected = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    np.testing.assert_allclose(x, expected / expected.std(), atol=1e-6)


def test_spirals():
    x, labels = spirals(50, n_classes=4, rng=3)
    assert x.shape == (200, 2) and x.dtype == np.float32
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [50] * 4
    assert x.std() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_array_equal(x, spirals(50, n_classes=4, rng=3)[0])
    assert not np.array_equal(x, spirals(50, n_classes=4, rng=4)[0])
    with pytest.raises(ValueError, match="n_classes"):
        spirals(10, n_classes=1)


# ---- placement: BatchNorm before or after the activation ---------------------


def test_mlp_placement_after_puts_batchnorm_after_the_activation():
    model = nn.mlp(
        2, 3, width=8, depth=3, activation="relu", batch_norm=True, placement="after", rng=4
    )
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Linear", "ReLU", "BatchNorm"] * 2 + ["Linear"]
    # the activation sits between Linear and BatchNorm: the bias is no longer redundant
    assert all(layer.bias is not None for layer in nn.linear_layers(model))
    before = nn.mlp(2, 3, width=8, depth=3, activation="relu", batch_norm=True, rng=4)
    assert [type(layer).__name__ for layer in before.layers] == [
        "Linear",
        "BatchNorm",
        "ReLU",
    ] * 2 + ["Linear"]
    for a, b in zip(nn.linear_layers(model), nn.linear_layers(before)):  # same seed, same weights
        np.testing.assert_array_equal(a.weight, b.weight)


def test_mlp_placement_after_normalizes_the_activations():
    model = nn.mlp(
        2, 3, width=16, depth=4, activation="sigmoid", batch_norm=True, placement="after", rng=0
    )
    model(spirals(50, rng=0)[0])
    for i, layer in enumerate(model.layers):
        if isinstance(layer, bnpy.BatchNorm):
            assert isinstance(model.layers[i - 1], nn.Sigmoid)
            np.testing.assert_allclose(model.outputs[i].mean(axis=0), 0, atol=1e-5)


def test_mlp_placement_errors():
    with pytest.raises(ValueError, match=r"placement must be \"before\" or \"after\".*'middle'"):
        nn.mlp(2, 3, batch_norm=True, placement="middle")


# ---- Conv2d, MaxPool2d, Flatten ------------------------------------------------


def direct_convolution(x, weight, bias, stride, padding):
    """The definition, one output value at a time."""
    n, _, h, w = x.shape
    out_channels, _, k, _ = weight.shape
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_h, out_w = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    y = np.zeros((n, out_channels, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            window = padded[:, :, i * stride : i * stride + k, j * stride : j * stride + k]
            y[:, :, i, j] = np.einsum("nchw,ochw->no", window, weight)
    return y + (0 if bias is None else bias[:, None, None])


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1), (3, 2)])
def test_conv2d_forward_is_the_direct_convolution(stride, padding):
    layer = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dtype=np.float64, rng=0)
    layer.bias[:] = [0.5, -1.0, 2.0, 0.0]
    x = data((2, 3, 7, 6))
    y = layer(x)
    expected = direct_convolution(x, layer.weight, layer.bias, stride, padding)
    assert y.shape == expected.shape and y.flags.c_contiguous
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "stride, padding, bias", [(1, 0, True), (1, 1, False), (2, 1, True), (2, 0, True)]
)
def test_conv2d_gradients_pass_gradcheck(stride, padding, bias):
    layer = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, bias=bias, dtype=np.float64, rng=1)
    report = model_gradcheck(layer, data((2, 2, 6, 5)))
    assert report.passed, report
    assert len(report.inputs) == (3 if bias else 2) and all(r.checked for r in report.inputs)


def test_a_wrong_conv2d_backward_is_caught():
    """A convolution whose backward forgets the padding's border: gradcheck fails."""

    class WrongConv(nn.Conv2d):
        def backward(self, dy):
            dx = super().backward(dy)
            dx[:, :, 0, :] = 0
            return dx

    report = model_gradcheck(
        WrongConv(1, 2, 3, padding=1, dtype=np.float64, rng=0), data((2, 1, 5, 5))
    )
    assert not report.passed


def test_conv2d_weights_have_the_documented_scale():
    layer = nn.Conv2d(8, 64, 3, weight_scale=2.0, rng=0)
    assert layer.weight.shape == (64, 8, 3, 3) and layer.weight.dtype == np.float32
    assert layer.weight.std() == pytest.approx(2.0 / np.sqrt(8 * 9), rel=0.05)
    np.testing.assert_array_equal(layer.weight, nn.Conv2d(8, 64, 3, weight_scale=2.0, rng=0).weight)
    assert nn.Conv2d(1, 2, 3, bias=False).bias is None


def test_conv2d_errors():
    layer = nn.Conv2d(3, 4, 5)
    with pytest.raises(
        ValueError, match=r"expected input of shape \(N, 3, H, W\), got \(2, 1, 8, 8\)"
    ):
        layer(np.ones((2, 1, 8, 8)))
    with pytest.raises(
        ValueError, match="kernel of 5 with padding 0 does not fit an image side of 4"
    ):
        layer(np.ones((2, 3, 4, 8)))
    with pytest.raises(RuntimeError, match="before any forward"):
        layer.backward(np.ones((2, 4, 4, 4)))
    layer(np.ones((2, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"dy has shape \(2, 4, 3, 3\), expected \(2, 4, 4, 4\)"):
        layer.backward(np.ones((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="padding must be >= 0, got -1"):
        nn.Conv2d(1, 1, 3, padding=-1)
    with pytest.raises(ValueError, match="kernel_size must be >= 1, got 0"):
        nn.Conv2d(1, 1, 0)
    with pytest.raises(TypeError, match="stride must be an int"):
        nn.Conv2d(1, 1, 3, stride=1.5)


def test_maxpool2d_takes_the_largest_value_of_each_window():
    x = np.arange(32.0).reshape(1, 2, 4, 4)
    x[0, 0, 0, 0] = 100.0
    y = nn.MaxPool2d(2)(x)
    np.testing.assert_array_equal(y[0, 0], [[100, 7], [13, 15]])
    np.testing.assert_array_equal(y[0, 1], [[21, 23], [29, 31]])
    assert nn.MaxPool2d(3, stride=1)(x).shape == (1, 2, 2, 2)


@pytest.mark.parametrize("kernel_size, stride", [(2, None), (3, 1), (3, 2)])
def test_maxpool2d_and_flatten_gradients_pass_gradcheck(kernel_size, stride):
    # distinct values: finite differences of a max need a clear winner in every window
    x = np.random.default_rng(0).permutation(2 * 3 * 7 * 7).reshape(2, 3, 7, 7) / 10.0
    report = model_gradcheck(nn.Sequential(nn.MaxPool2d(kernel_size, stride), nn.Flatten()), x)
    assert report.passed, report


def test_maxpool2d_and_flatten_errors():
    pool = nn.MaxPool2d(2)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, C, H, W\), got \(4, 4\)"):
        pool(np.ones((4, 4)))
    with pytest.raises(RuntimeError, match="before any forward"):
        pool.backward(np.ones((1, 1, 2, 2)))
    flatten = nn.Flatten()
    assert flatten(np.ones((3, 2, 4, 5))).shape == (3, 40)
    with pytest.raises(ValueError, match=r"dy has shape \(3, 39\), expected \(3, 40\)"):
        flatten.backward(np.ones((3, 39)))


def test_digits_are_scikit_learns_images_scaled_to_0_1():
    images, labels = bnpy.data.digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert images.min() == 0 and images.max() == 1
    assert labels.dtype == np.int64 and sorted(set(labels.tolist())) == list(range(10))


def test_a_cnn_with_spatial_batchnorm_learns_the_digits():
    images, labels = bnpy.data.digits()
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, rng=0),
        bnpy.BatchNorm(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10, rng=1),
    )
    losses = nn.fit(model, images, labels, lr=0.1, steps=60, batch_size=64, rng=2)
    assert losses[0] > 2.0  # about log(10) = 2.3 at the start
    assert losses[-10:].mean() < 0.35 * losses[0]  # well under half
    # the BatchNorm normalized each channel over (N, H, W): 8 gammas, spatial statistics
    assert model[1].gamma.shape == (8,) and model[1].num_batches_tracked == 60
    assert nn.accuracy(model.eval()(images), labels) > 0.85


# ---- layer, group, instance and RMS normalization in bnpy.nn ------------------

FAMILY = {
    "LayerNorm": lambda c: bnpy.LayerNorm(c, dtype=np.float64),
    "LayerNorm(bias=False)": lambda c: bnpy.LayerNorm(c, bias=False, dtype=np.float64),
    "GroupNorm": lambda c: bnpy.GroupNorm(2, c, dtype=np.float64),
    "InstanceNorm(affine)": lambda c: bnpy.InstanceNorm(c, affine=True, dtype=np.float64),
    "RMSNorm": lambda c: bnpy.RMSNorm(c, dtype=np.float64),
}


@pytest.mark.parametrize("name", FAMILY)
def test_sequential_lists_the_gamma_and_beta_each_normalization_has(name):
    norm = FAMILY[name](4)
    model = nn.Sequential(nn.Linear(2, 4, dtype=np.float64, rng=0), norm, nn.Tanh())
    params = model.parameters()[2:]  # after the Linear's weight and bias
    has_beta = name not in ("LayerNorm(bias=False)", "RMSNorm")
    assert len(params) == 1 + has_beta
    assert params[0][0] is norm.gamma or np.shares_memory(params[0][0], norm.gamma)
    if has_beta:
        assert np.shares_memory(params[1][0], norm.beta)
    assert nn.Sequential(bnpy.LayerNorm(4, elementwise_affine=False)).parameters() == []
    assert nn.Sequential(bnpy.GroupNorm(2, 4, affine=False)).parameters() == []


@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "RMSNorm", "LayerNorm(bias=False)"])
@pytest.mark.parametrize("training", [True, False])
def test_sequential_with_each_normalization_passes_gradcheck(name, training):
    model = nn.Sequential(
        nn.Linear(3, 4, dtype=np.float64, rng=0),
        FAMILY[name](4),
        nn.Tanh(),
        nn.Linear(4, 2, dtype=np.float64, rng=1),
    )
    model.train(training)
    report = model_gradcheck(model, data((5, 3), seed=3))
    assert report.passed, report
    assert all(r.checked for r in report.inputs)


@pytest.mark.parametrize("training", [True, False])
def test_convolution_with_group_and_instance_norm_passes_gradcheck(training):
    instance = bnpy.InstanceNorm(4, affine=True, track_running_stats=True, dtype=np.float64)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, dtype=np.float64, rng=0),
        bnpy.GroupNorm(2, 4, dtype=np.float64),
        nn.Tanh(),
        instance,
        nn.Flatten(),
        nn.Linear(4 * 16, 3, dtype=np.float64, rng=1),
    )
    model.forward(data((3, 1, 4, 4), seed=5))  # running statistics away from (0, 1)
    instance.momentum = 0.0  # the check's forward calls leave them alone
    model.train(training)
    report = model_gradcheck(model, data((3, 1, 4, 4), seed=6))
    assert report.passed, report
    assert len(report.inputs) == 9  # x, 2 weights, 2 biases, 2 gammas, 2 betas


def test_sgd_updates_layer_norm_parameters_in_place():
    norm = bnpy.RMSNorm(4)
    model = nn.Sequential(nn.Linear(2, 4, rng=0), norm, nn.Linear(4, 3, rng=1))
    model(data((6, 2)))
    model.backward(data((6, 3)))
    expected = norm.gamma - 0.5 * norm.grad_gamma
    nn.SGD(model, lr=0.5, momentum=0.9).step()  # RMSNorm has no beta: nothing to step there
    np.testing.assert_allclose(norm.gamma, expected, rtol=1e-6)


def test_mlp_with_a_norm_factory():
    model = nn.mlp(2, 3, width=8, depth=3, activation="relu", norm=bnpy.LayerNorm, rng=4)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Linear", "LayerNorm", "ReLU"] * 2 + ["Linear"]
    # LayerNorm normalizes each sample over its features: a per-feature bias stays useful
    assert all(layer.bias is not None for layer in nn.linear_layers(model))
    batch_norm = nn.mlp(2, 3, width=8, depth=3, activation="relu", batch_norm=True, rng=4)
    for a, b in zip(nn.linear_layers(model), nn.linear_layers(batch_norm)):
        np.testing.assert_array_equal(a.weight, b.weight)  # same rng, same weights
    renorm = nn.mlp(2, 3, width=8, depth=3, norm=bnpy.BatchRenorm)  # a BatchNorm: no bias
    assert [layer.bias is None for layer in nn.linear_layers(renorm)] == [True, True, False]
    grouped = nn.mlp(2, 3, width=8, depth=2, norm=functools.partial(bnpy.GroupNorm, 4))
    assert grouped[1].num_groups == 4 and grouped[1].num_channels == 8
    wide = nn.mlp(2, 3, width=8, depth=2, norm=bnpy.LayerNorm, dtype=np.float64)
    assert wide[1].dtype == np.float64  # norm is given the network's dtype
    with pytest.raises(ValueError, match="not both"):
        nn.mlp(2, 3, batch_norm=True, norm=bnpy.LayerNorm)
    with pytest.raises(TypeError, match="norm must be a callable"):
        nn.mlp(2, 3, norm="layer")


def spirals_at_batch_size_2(norm):
    """A tanh network with norm trained on batches of 2, and its eval-mode accuracy."""
    x, labels = spirals(100, rng=0)
    model = nn.mlp(2, 3, width=32, depth=3, activation="tanh", norm=norm, rng=0)
    nn.fit(model, x, labels, lr=0.01, momentum=0.9, steps=800, batch_size=2, rng=1)
    return model, x, nn.accuracy(model.eval()(x), labels)


@pytest.mark.parametrize(
    "norm", [bnpy.LayerNorm, functools.partial(bnpy.GroupNorm, 8)], ids=["layer", "group"]
)
def test_layer_and_group_norm_learn_from_batches_of_2_and_are_the_same_in_eval_mode(norm):
    model, x, accuracy = spirals_at_batch_size_2(norm)
    assert accuracy > 0.7  # chance is 1/3
    in_eval = model(x)
    np.testing.assert_array_equal(model.train()(x), in_eval)  # no batch statistics
    # each sample on its own (up to the rounding of a one-row matrix product)
    np.testing.assert_allclose(model(x[:1])[0], in_eval[0], rtol=1e-5, atol=1e-6)


def test_batchnorm_does_not_learn_from_batches_of_2():
    """What the test above would not mean without: BatchNorm fails at that batch size."""
    assert spirals_at_batch_size_2(bnpy.BatchNorm)[2] < 0.5


def test_fold_model_and_recalibrate_leave_other_normalizations_alone():
    model = nn.Sequential(
        nn.Linear(2, 4, rng=0),
        bnpy.LayerNorm(4),
        nn.Linear(4, 4, bias=False, rng=1),
        bnpy.BatchNorm(4),
        nn.Linear(4, 3, rng=2),
    )
    x = data((16, 2)).astype(np.float32)
    model(x)
    nn.recalibrate(model, [x])
    folded = nn.fold_model(model)
    assert [type(layer).__name__ for layer in folded.layers] == [
        "Linear",
        "LayerNorm",
        "Linear",
        "Linear",
    ]
    np.testing.assert_allclose(folded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


# ---- sequences: RNN and LastStep ----------------------------------------------

RNN_NORMS = {
    "none": None,
    "LayerNorm": bnpy.LayerNorm,
    "BatchNorm": bnpy.BatchNorm,
    "RMSNorm": bnpy.RMSNorm,
    "GroupNorm": functools.partial(bnpy.GroupNorm, 2),
}


def rnn(norm, seed=0):
    return nn.RNN(3, 4, norm=RNN_NORMS[norm], dtype=np.float64, rng=seed)


def test_rnn_without_norm_computes_the_recurrence():
    layer = rnn("none")
    layer.input.bias[:] = [0.1, -0.2, 0.3, 0.0]
    x = data((5, 6, 3))
    h = np.zeros((5, 4))
    expected = []
    for t in range(6):
        h = np.tanh(
            x[:, t] @ layer.input.weight.T + h @ layer.recurrent.weight.T + layer.input.bias
        )
        expected.append(h)
    y = layer(x)
    assert y.shape == (5, 6, 4) and y.dtype == np.float64
    np.testing.assert_allclose(y, np.stack(expected, axis=1), rtol=1e-13, atol=1e-13)


def test_rnn_with_layer_norm_normalizes_each_sample_at_every_step():
    layer = rnn("LayerNorm")
    assert layer.input.bias is None  # LayerNorm's beta plays its part
    norm = layer.norms[0]
    norm.gamma[:] = [1.0, 2.0, 0.5, 1.5]
    norm.beta[:] = [0.1, 0.0, -0.1, 0.2]
    x = data((5, 6, 3))
    h = np.zeros((5, 4))
    for t in range(6):
        summed = x[:, t] @ layer.input.weight.T + h @ layer.recurrent.weight.T
        mean, var = summed.mean(axis=1, keepdims=True), summed.var(axis=1, keepdims=True)
        h = np.tanh(norm.gamma * (summed - mean) / np.sqrt(var + 1e-5) + norm.beta)
    np.testing.assert_allclose(layer(x)[:, -1], h, rtol=1e-12, atol=1e-12)
    assert len(layer.norms) == 6  # a layer per step, sharing gamma and beta
    for step in layer.norms:
        np.testing.assert_array_equal(step.gamma, norm.gamma)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("norm", RNN_NORMS)
def test_rnn_backward_through_time_passes_gradcheck(norm, training):
    """dy at every step, so each step's gradient reaches x, W, U and gamma, beta."""
    layer = rnn(norm)
    layer(data((6, 5, 3), seed=1))  # every step's BatchNorm statistics away from (0, 1)
    for step in layer.norms:
        if isinstance(step, bnpy.BatchNorm):
            step.momentum = 0.0  # the check's forward calls leave them alone
    layer.train(training)
    report = model_gradcheck(layer, data((6, 5, 3), seed=2))
    assert report.passed, report
    # x, W, [b], U, [gamma, [beta]]
    # x, W, b, U without norm; x, W, U, gamma, beta with; x, W, b, U, gamma with RMSNorm
    assert len(report.inputs) == (4 if norm == "none" else 5)
    assert all(r.checked for r in report.inputs)


def test_rnn_classifier_with_last_step_passes_gradcheck():
    model = nn.Sequential(rnn("LayerNorm"), nn.LastStep(), nn.Linear(4, 3, dtype=np.float64))
    report = model_gradcheck(model, data((4, 7, 3)))
    assert report.passed, report


def test_a_truncated_backward_through_time_is_caught():
    """The checks above can fail: an RNN whose backward stops at each step, its
    recurrent Linear sending no gradient back to h_{t-1}."""

    class NoGradientToTheLastStep(nn.Linear):
        def backward(self, dy):
            super().backward(dy)  # grad_weight as before
            return np.zeros_like(self._x)

    layer = rnn("LayerNorm")
    layer.recurrent = NoGradientToTheLastStep(4, 4, bias=False, dtype=np.float64, rng=1)
    report = model_gradcheck(layer, data((4, 5, 3)))
    assert not report.passed
    assert report.inputs[0].passed is False  # dx misses the paths through later steps


def test_rnn_with_batchnorm_keeps_statistics_per_step():
    layer = nn.RNN(2, 3, norm=bnpy.BatchNorm, dtype=np.float64, rng=0)
    for step in layer.norms:
        step.momentum = 1.0
    layer(data((8, 4, 2)))
    assert len(layer.norms) == 4
    for step in layer.norms[1:]:
        step.momentum = 1.0
    x = data((8, 4, 2), seed=1)
    h = layer(x)
    # step t's running mean is the batch mean of step t's summed inputs
    summed = layer.input(x)
    summed[:, 1:] += layer.recurrent(h[:, :-1])
    for t, step in enumerate(layer.norms):
        np.testing.assert_allclose(step.running_mean, summed[:, t].mean(axis=0), rtol=1e-12)
    means = [step.running_mean.copy() for step in layer.norms]
    assert not np.allclose(means[0], means[-1])  # the steps' statistics differ
    # in eval mode a longer sequence uses the last step's statistics, and adds no layer
    layer.eval()
    long = data((8, 6, 2), seed=2)
    out = layer(long)
    assert len(layer.norms) == 4
    np.testing.assert_allclose(layer(long[:, :4]), out[:, :4])
    h5 = np.tanh(layer.norms[3](layer.input(long[:, 4]) + layer.recurrent(out[:, 3])))
    np.testing.assert_allclose(out[:, 4], h5, rtol=1e-12)


def test_rnn_shares_norm_parameters_and_sums_their_gradients_over_the_steps():
    layer = nn.RNN(2, 3, norm=bnpy.LayerNorm, dtype=np.float64, rng=0)
    model = nn.Sequential(layer)
    x, dy = data((5, 4, 2)), data((5, 4, 3), seed=1)
    model(x)
    model.backward(dy)
    per_step = sum(step.grad_gamma for step in layer.norms)
    np.testing.assert_allclose(layer.grad_gamma, per_step)
    params = model.parameters()
    assert [p.shape for p, _ in params] == [(3, 2), (3, 3), (3,), (3,)]  # W, U, gamma, beta
    assert np.shares_memory(params[2][0], layer.norms[0].gamma)
    nn.SGD(model, lr=0.5).step()
    model(x)  # the other steps take norms[0]'s new gamma and beta
    for step in layer.norms:
        np.testing.assert_array_equal(step.gamma, layer.norms[0].gamma)
        np.testing.assert_array_equal(step.beta, layer.norms[0].beta)
    assert not np.allclose(layer.norms[0].gamma, 1)


def test_rnn_train_and_eval_reach_every_step_and_copies_work():
    layer = nn.RNN(2, 3, norm=bnpy.BatchNorm, rng=0)
    layer(data((4, 3, 2)))
    assert layer.eval() is layer
    assert not any(step.training for step in layer.norms)
    layer.train()
    assert all(step.training for step in layer.norms)
    copied = copy.deepcopy(layer)
    x = data((4, 3, 2), seed=1)
    np.testing.assert_array_equal(copied.eval()(x), layer.eval()(x))
    assert "RNN(2, 3, norm=BatchNorm" in repr(layer)


def test_rnn_and_last_step_errors():
    layer = nn.RNN(2, 3)
    with pytest.raises(RuntimeError, match=r"RNN\.backward called before any forward"):
        layer.backward(np.ones((4, 3, 3)))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, T, 2\)"):
        layer(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, T, 2\)"):
        layer(np.ones((4, 0, 2)))
    layer(np.ones((4, 3, 2)))
    with pytest.raises(ValueError, match=r"dy has shape \(4, 2, 3\), expected \(4, 3, 3\)"):
        layer.backward(np.ones((4, 2, 3)))
    shared = bnpy.LayerNorm(3)
    with pytest.raises(ValueError, match="every step needs its own"):
        nn.RNN(2, 3, norm=lambda c, dtype: shared)(np.ones((4, 2, 2)))
    with pytest.raises(TypeError, match="norm must be a callable"):
        nn.RNN(2, 3, norm="layer")
    with pytest.raises(ValueError, match="hidden_size"):
        nn.RNN(2, 0)
    last = nn.LastStep()
    with pytest.raises(RuntimeError, match="before any forward"):
        last.backward(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"\(N, T, F\)"):
        last(np.ones((4, 3)))
    x = data((4, 5, 3))
    np.testing.assert_array_equal(last(x), x[:, -1])
    dx = last.backward(np.ones((4, 3)))
    np.testing.assert_array_equal(dx[:, -1], 1)
    np.testing.assert_array_equal(dx[:, :-1], 0)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 5\), expected \(4, 3\)"):
        last.backward(np.ones((4, 5)))


def drifting_tracks(n, steps, rng):
    """2-D positions of tracks moving right, heading up, straight or down (labels 2, 1, 0)."""
    rng = np.random.default_rng(rng)
    labels = rng.integers(0, 3, n)
    velocity = np.stack([np.ones(n), 0.3 * (labels - 1)], axis=1)
    moves = velocity[:, None, :] + 0.5 * rng.standard_normal((n, steps, 2))
    return np.cumsum(moves, axis=1).astype(np.float32), labels


def test_rnn_with_layer_norm_learns_sequences_and_generalizes_to_longer_ones():
    x, labels = drifting_tracks(1000, 10, rng=0)
    model = nn.Sequential(
        nn.RNN(2, 16, norm=bnpy.LayerNorm, rng=0), nn.LastStep(), nn.Linear(16, 3, rng=1)
    )
    losses = nn.fit(model, x, labels, lr=0.1, momentum=0.9, steps=300, batch_size=64, rng=1)
    assert losses[:5].mean() > 1.0 and losses[-30:].mean() < 0.7  # log 3 = 1.1 at the start
    model.eval()
    accuracy = {
        steps: nn.accuracy(model(xs), ys)
        for steps in (10, 40)
        for xs, ys in [drifting_tracks(500, steps, rng=5)]
    }
    assert accuracy[10] > 0.6  # chance is 1/3
    assert accuracy[40] > accuracy[10]  # longer tracks tell their heading better
