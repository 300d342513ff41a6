"""bnpy.gradcheck: it passes correct gradients and catches wrong ones."""

import subprocess
import sys

import numpy as np
import pytest

import bnpy
from bnpy import reference
from bnpy.__main__ import sweep_gradcheck
from bnpy.gradcheck import (
    GradcheckError,
    assert_gradients,
    check_layer,
    gradcheck,
    numerical_vjp,
)

MODES = ["full", "fast"]


# ---- batch normalization through the functional API, right and wrong ------


def bn_forward(x, gamma, beta):
    return bnpy.batch_norm_forward(x, gamma, beta)[0]


def bn_backward(dy, x, gamma, beta):
    _, mean, invstd = bnpy.batch_norm_forward(x, gamma, beta)
    return bnpy.batch_norm_backward(dy, x, gamma, mean, invstd)


def _parts(dy, x, gamma, eps=1e-5):
    """x-hat, invstd, dgamma, dbeta and n of training-mode batch norm over axis 0."""
    mean, var = x.mean(axis=0), x.var(axis=0)
    invstd = 1 / np.sqrt(var + eps)
    x_hat = (x - mean) * invstd
    return x_hat, invstd, (dy * x_hat).sum(axis=0), dy.sum(axis=0), x.shape[0]


def backward_dx_scaled(dy, x, gamma, beta):
    dx, dgamma, dbeta = bn_backward(dy, x, gamma, beta)
    return dx * 1.01, dgamma, dbeta


def backward_mean_term_dropped(dy, x, gamma, beta):
    x_hat, invstd, dgamma, dbeta, n = _parts(dy, x, gamma)
    dx = gamma * invstd / n * (n * dy - x_hat * dgamma)  # "- dbeta" forgotten
    return dx, dgamma, dbeta


def backward_variance_term_dropped(dy, x, gamma, beta):
    """A bug that an all-ones dy hides: with dy = 1, dgamma = sum x-hat = 0."""
    _x_hat, invstd, dgamma, dbeta, n = _parts(dy, x, gamma)
    dx = gamma * invstd / n * (n * dy - dbeta)  # "- x_hat * dgamma" forgotten
    return dx, dgamma, dbeta


def backward_swapped(dy, x, gamma, beta):
    dx, dgamma, dbeta = bn_backward(dy, x, gamma, beta)
    return dx, dbeta, dgamma


def backward_gamma_sign(dy, x, gamma, beta):
    dx, dgamma, dbeta = bn_backward(dy, x, gamma, beta)
    return dx, -dgamma, dbeta


@pytest.fixture
def bn_inputs():
    rng = np.random.default_rng(42)
    x = rng.normal(3.0, 2.0, size=(7, 4))
    return [x, rng.normal(size=4), rng.normal(size=4)]


@pytest.mark.parametrize("mode", MODES)
def test_correct_batch_norm_gradients_pass(bn_inputs, mode):
    report = gradcheck(bn_forward, bn_backward, bn_inputs, mode=mode)
    assert report.passed, str(report)
    assert report.max_rel_error < 1e-7


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "wrong_backward",
    [
        backward_dx_scaled,
        backward_mean_term_dropped,
        backward_variance_term_dropped,
        backward_swapped,
        backward_gamma_sign,
    ],
)
def test_wrong_gradients_are_caught(bn_inputs, wrong_backward, mode):
    report = gradcheck(bn_forward, wrong_backward, bn_inputs, mode=mode)
    assert not report.passed, f"{wrong_backward.__name__} passed:\n{report}"
    with pytest.raises(GradcheckError):
        assert_gradients(bn_forward, wrong_backward, bn_inputs, mode=mode)


def test_variance_term_bug_is_invisible_to_an_all_ones_dy(bn_inputs):
    """Why gradcheck draws a random dy: with dy = 1 this bug gives the right dx."""
    x, _gamma, _ = bn_inputs
    dy = np.ones_like(x)
    right = bn_backward(dy, *bn_inputs)[0]
    wrong = backward_variance_term_dropped(dy, *bn_inputs)[0]
    np.testing.assert_allclose(wrong, right, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_wrong_gradients_of_a_layer_are_caught_in_train_and_eval(mode, training):
    """A layer whose backward scales dx by 1.01 fails check_layer in both modes."""

    class ScaledGradient(bnpy.BatchNorm):
        def backward(self, dy, *, out=None):
            return super().backward(dy) * 1.01

    rng = np.random.default_rng(3)
    layer = ScaledGradient(3, dtype=np.float64).train(training)
    layer.running_var = [0.5, 1.0, 2.0]
    report = check_layer(layer, rng.normal(size=(5, 3, 2)), mode=mode)
    assert not report.passed
    assert [r.passed for r in report.inputs] == [False, True, True]


# ---- the sweep --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_sweep_passes_in_float64_below_1e_7(mode):
    cases = list(sweep_gradcheck(dtypes=(np.float64,), mode=mode))
    assert len(cases) == 5 * 2 * 2  # layouts x train/eval x affine
    for description, report in cases:
        assert report.passed, f"{description}\n{report}"
        assert report.max_rel_error < 1e-7, f"{description}\n{report}"


def test_sweep_passes_in_float32_with_float32_tolerances():
    for description, report in sweep_gradcheck(dtypes=(np.float32,)):
        assert report.passed, f"{description}\n{report}"


def test_command_line_sweep_prints_one_line_per_case():
    run = subprocess.run(
        [sys.executable, "-m", "bnpy", "gradcheck"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    case_lines = [line for line in run.stdout.splitlines() if "max_rel_error" in line]
    assert len(case_lines) == 5 * 2 * 2 * 2  # layouts x dtypes x train/eval x affine
    assert all(line.endswith("ok") for line in case_lines)
    assert "all cases passed" in run.stdout


# ---- properties of the analytic gradients -----------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_upstream_gradient_gives_exactly_zero(training, dtype):
    rng = np.random.default_rng(0)
    bn = bnpy.BatchNorm(4, dtype=dtype).train(training)
    bn.gamma = rng.normal(size=4)
    x = rng.normal(size=(6, 4, 3))
    bn(x)
    dx = bn.backward(np.zeros_like(x))
    assert np.all(dx == 0) and np.all(bn.grad_gamma == 0) and np.all(bn.grad_beta == 0)


@pytest.mark.parametrize("training", [True, False])
def test_backward_twice_is_bitwise_identical(training):
    rng = np.random.default_rng(1)
    bn = bnpy.BatchNorm(4, dtype=np.float64).train(training)
    x, dy = rng.normal(size=(6, 4, 3)), rng.normal(size=(6, 4, 3))
    bn(x)
    first = (bn.backward(dy), bn.grad_gamma, bn.grad_beta)
    second = (bn.backward(dy), bn.grad_gamma, bn.grad_beta)
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("shape, axis", [((8, 3), 1), ((4, 3, 5), 1), ((2, 4, 4, 3), -1)])
def test_training_backward_invariants(shape, axis):
    """Sum dx = 0 and sum dx * x-hat = 0 over each feature.

    The second holds exactly only for eps = 0 (with eps it is eps / (var + eps)
    of gamma * invstd * dgamma), so this uses eps = 1e-12.
    """
    rng = np.random.default_rng(2)
    x, dy = rng.normal(2.0, 3.0, size=shape), rng.normal(size=shape)
    channels = shape[axis]
    bn = bnpy.BatchNorm(channels, eps=1e-12, axis=axis, dtype=np.float64)
    bn.gamma = rng.normal(size=channels)
    bn(x)
    dx = bn.backward(dy)
    mean, var = reference.batch_stats(x, axis)
    x_hat = reference.normalize(x, mean, var, eps=1e-12, axis=axis)
    others = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    scale = np.abs(dx).sum(axis=others)
    assert np.all(np.abs(dx.sum(axis=others)) <= 1e-13 * scale)
    assert np.all(np.abs((dx * x_hat).sum(axis=others)) <= 1e-12 * scale)


# ---- the checker itself ---------------------------------------------------


def test_numerical_vjp_of_a_known_function():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    w = np.array([2.0, -1.0])
    dy = np.array([[1.0, 2.0], [-1.0, 0.5]])
    gx, gw = numerical_vjp(lambda x_, w_: x_**2 * w_, [x, w], dy)
    np.testing.assert_allclose(gx, 2 * x * w * dy, rtol=1e-8)
    np.testing.assert_allclose(gw, (x**2 * dy).sum(axis=0), rtol=1e-8)
    assert x[0, 0] == 1.0  # the caller's inputs are not moved


def test_report_names_the_worst_element_and_both_values(bn_inputs):
    report = gradcheck(bn_forward, backward_dx_scaled, bn_inputs, names=["x", "g", "b"])
    x_row, g_row, b_row = report.inputs
    assert (x_row.name, x_row.passed, g_row.passed, b_row.passed) == ("x", False, True, True)
    assert x_row.analytic == pytest.approx(1.01 * x_row.numerical, rel=1e-6)
    assert len(x_row.index) == 2 and all(0 <= i < s for i, s in zip(x_row.index, (7, 4)))
    assert report.max_rel_error == pytest.approx(0.01 / 1.01, rel=1e-3)
    text = str(report)
    assert "FAILED" in text and "x" in text and "NO" in text
    assert f"{x_row.analytic:.7g}" in text and f"{x_row.numerical:.7g}" in text


def test_assert_gradients_returns_the_report_and_raises_an_assertion_error(bn_inputs):
    report = assert_gradients(bn_forward, bn_backward, bn_inputs)
    assert report.passed and bool(report)
    with pytest.raises(AssertionError, match="gradcheck FAILED") as info:
        assert_gradients(bn_forward, backward_swapped, bn_inputs)
    assert info.value.report.inputs[1].passed is False


def test_inputs_without_gradient_are_reported_not_checked():
    def forward(x, labels):
        return x * 2.0

    def backward(dy, x, labels):
        return dy * 2.0, None

    report = gradcheck(forward, backward, [np.ones((2, 3)), np.arange(2)])
    assert report.passed
    assert [r.checked for r in report.inputs] == [True, False]
    assert "not checked" in str(report)


def test_bad_options_and_bad_backward_raise_clear_errors(bn_inputs):
    with pytest.raises(ValueError, match="mode"):
        gradcheck(bn_forward, bn_backward, bn_inputs, mode="quick")
    with pytest.raises(ValueError, match="eps"):
        gradcheck(bn_forward, bn_backward, bn_inputs, eps=0)
    with pytest.raises(ValueError, match="returned 2 gradients for 3 inputs"):
        gradcheck(bn_forward, lambda dy, *a: bn_backward(dy, *a)[:2], bn_inputs)
    with pytest.raises(ValueError, match="shape"):
        gradcheck(bn_forward, lambda dy, *a: (dy[:1],) + bn_backward(dy, *a)[1:], bn_inputs)


def test_fast_mode_costs_a_few_forward_calls():
    calls = []

    def forward(x):
        calls.append(1)
        return np.sin(x)

    gradcheck(
        forward, lambda dy, x: dy * np.cos(x), [np.zeros((50, 40))], mode="fast", directions=3
    )
    assert len(calls) == 1 + 2 * 3


@pytest.mark.parametrize("training", [True, False])
def test_check_layer_leaves_parameters_and_running_stats_alone(training):
    rng = np.random.default_rng(4)
    bn = bnpy.BatchNorm(3, momentum=0.3, dtype=np.float64).train(training)
    bn.gamma, bn.beta = rng.normal(size=3), rng.normal(size=3)
    bn(rng.normal(size=(5, 3)))
    before = bn.state_dict()
    report = check_layer(bn, rng.normal(size=(5, 3)))
    assert report.passed and report.max_rel_error < 1e-7, str(report)
    after = bn.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(before[key], after[key]), key
    assert bn.training is training


def test_check_layer_without_affine_and_for_a_user_layer():
    rng = np.random.default_rng(5)
    report = check_layer(bnpy.BatchNorm(3, affine=False, dtype=np.float64), rng.normal(size=(6, 3)))
    assert report.passed and [r.name for r in report.inputs] == ["x"]

    class NumpyBatchNorm:
        """A user's own layer, written with bnpy.reference."""

        def __init__(self, c):
            self.gamma, self.beta = rng.normal(size=c), rng.normal(size=c)
            self.grad_gamma = self.grad_beta = None

        def forward(self, x):
            self.x = x
            return reference.forward_train(x, self.gamma, self.beta)[0]

        def backward(self, dy):
            mean, var = reference.batch_stats(self.x)
            dx, self.grad_gamma, self.grad_beta = reference.backward(
                dy, self.x, mean, var, self.gamma
            )
            return dx

    layer = NumpyBatchNorm(3)
    gamma = layer.gamma.copy()
    report = check_layer(layer, rng.normal(size=(6, 3)))
    assert report.passed and report.max_rel_error < 1e-7, str(report)
    assert np.array_equal(layer.gamma, gamma)


def test_data_drawn_with_the_same_seed_does_not_hide_a_wrong_gradient():
    """dy comes from a stream of its own: were it default_rng(seed), data drawn
    from default_rng(seed) too would make dy affine in x-hat, dx exactly 0, and
    this 50% error invisible."""
    x = np.random.default_rng(0).normal(3, 2, (16, 3))

    def wrong(dy, x, gamma, beta):
        dx, dgamma, dbeta = bn_backward(dy, x, gamma, beta)
        return 1.5 * dx, dgamma, dbeta

    assert not gradcheck(bn_forward, wrong, [x, np.ones(3), np.zeros(3)], seed=0).passed
