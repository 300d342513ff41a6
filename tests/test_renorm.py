"""bnpy.BatchRenorm against a direct float64 NumPy implementation of Batch
Renormalization (Ioffe, 2017), and against BatchNorm at rmax=1, dmax=0."""

import copy
import pickle

import numpy as np
import pytest

import bnpy


def _axes(x, axis):
    return tuple(a for a in range(x.ndim) if a != axis % x.ndim)


def _per_feature(v, x, axis):
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return np.reshape(v, shape)


def renorm_reference(
    x, gamma, beta, running_mean, running_var, *, rmax, dmax, eps, momentum, axis=1
):
    """y, the new running statistics and backward(dy) -> (dx, dgamma, dbeta), in float64."""
    x = np.asarray(x, np.float64)
    axes = _axes(x, axis)
    n = x.size // x.shape[axis]
    f = lambda v: _per_feature(v, x, axis)  # noqa: E731
    mu = x.mean(axis=axes)
    var = x.var(axis=axes)
    sigma_b = np.sqrt(var + eps)
    sigma = np.sqrt(running_var + eps)
    r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
    d = np.clip((mu - running_mean) / sigma, -dmax, dmax)
    xhat = (x - f(mu)) / f(sigma_b)
    y = f(gamma) * (xhat * f(r) + f(d)) + f(beta)
    new_mean = (1 - momentum) * running_mean + momentum * mu
    new_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)

    def backward(dy):
        dy = np.asarray(dy, np.float64)
        dgamma = (dy * (xhat * f(r) + f(d))).sum(axis=axes)
        dbeta = dy.sum(axis=axes)
        g = dy * f(gamma * r)  # dL/dxhat, r and d constants
        dx = (n * g - f(g.sum(axis=axes)) - xhat * f((g * xhat).sum(axis=axes))) / (n * f(sigma_b))
        return dx, dgamma, dbeta

    return y, new_mean, new_var, backward


def _layer(channels, rng, dtype=np.float64, **kwargs):
    """A BatchRenorm with parameters and running statistics away from their defaults."""
    bn = bnpy.BatchRenorm(channels, dtype=dtype, **kwargs)
    bn.gamma = rng.normal(1.0, 0.5, channels)
    bn.beta = rng.normal(0.0, 0.5, channels)
    # from far below to far above the data's variance 9 and mean 4: r and d
    # are clipped for some features and not for others (checked below)
    bn.running_mean = rng.permutation(np.linspace(-60.0, 20.0, channels))
    bn.running_var = rng.permutation(np.geomspace(0.05, 500.0, channels))
    return bn


CASES = [((16, 6), 1), ((4, 5, 3, 3), 1), ((4, 3, 3, 5), -1), ((7, 4, 6), 1)]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("rmax,dmax", [(3.0, 5.0), (1.5, 0.5), (1.0, 0.0), (100.0, 100.0)])
def test_matches_the_formulas_in_float64(shape, axis, rmax, dmax):
    rng = np.random.default_rng(len(shape) * 10 + int(rmax))
    channels = shape[axis]
    bn = _layer(channels, rng, rmax=rmax, dmax=dmax, axis=axis, momentum=0.3)
    x = rng.normal(4.0, 3.0, shape)
    dy = rng.normal(size=shape)
    y_ref, mean_ref, var_ref, backward = renorm_reference(
        x,
        bn.gamma,
        bn.beta,
        bn.running_mean.copy(),
        bn.running_var.copy(),
        rmax=rmax,
        dmax=dmax,
        eps=bn.eps,
        momentum=0.3,
        axis=axis,
    )
    y = bn(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, mean_ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(bn.running_var, var_ref, rtol=1e-13)
    assert bn.num_batches_tracked == 1
    dx_ref, dgamma_ref, dbeta_ref = backward(dy)
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.grad_gamma, dgamma_ref, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(bn.grad_beta, dbeta_ref, rtol=1e-12, atol=1e-12)


def test_the_cases_clip_r_and_d_both_ways():
    """The layer of the tests above has features where r and d are clipped and
    others where they are not: otherwise clipping would go untested."""
    for shape, axis in CASES:
        rng = np.random.default_rng(len(shape) * 10 + 3)
        bn = _layer(shape[axis], rng, axis=axis)
        x = rng.normal(4.0, 3.0, shape)
        sigma_b = np.sqrt(x.var(axis=_axes(x, axis)) + bn.eps)
        sigma = np.sqrt(bn.running_var + bn.eps)
        ratio = sigma_b / sigma
        shift = abs(x.mean(axis=_axes(x, axis)) - bn.running_mean) / sigma
        assert (ratio > 3).any() and (ratio < 1 / 3).any() and (abs(np.log(ratio)) < 1).any()
        assert (shift > 5).any() and (shift < 5).any()


def test_float32_layer_is_close_to_the_float64_formulas():
    rng = np.random.default_rng(1)
    bn = _layer(5, rng, dtype=np.float32)
    x = rng.normal(50.0, 3.0, (32, 5, 4)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y_ref, _mean_ref, var_ref, backward = renorm_reference(
        x,
        bn.gamma.astype(np.float64),
        bn.beta.astype(np.float64),
        bn.running_mean.astype(np.float64),
        bn.running_var.astype(np.float64),
        rmax=3.0,
        dmax=5.0,
        eps=bn.eps,
        momentum=0.1,
    )
    y = bn(x)
    dx = bn.backward(dy)
    assert y.dtype == dx.dtype == np.float32
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(bn.running_var, var_ref, rtol=1e-6)
    np.testing.assert_allclose(dx, backward(dy)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_rmax_one_dmax_zero_is_batch_norm(momentum):
    rng = np.random.default_rng(2)
    renorm = bnpy.BatchRenorm(4, rmax=1.0, dmax=0.0, momentum=momentum, dtype=np.float64)
    plain = bnpy.BatchNorm(4, momentum=momentum, dtype=np.float64)
    for step in range(3):
        x = rng.normal(step, 2.0, (8, 4, 3))
        dy = rng.normal(size=x.shape)
        np.testing.assert_allclose(renorm(x), plain(x), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(renorm.backward(dy), plain.backward(dy), rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(renorm.grad_gamma, plain.grad_gamma, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(renorm.grad_beta, plain.grad_beta, rtol=1e-13)
    np.testing.assert_allclose(renorm.running_mean, plain.running_mean, rtol=1e-14)
    np.testing.assert_allclose(renorm.running_var, plain.running_var, rtol=1e-14)
    assert renorm.num_batches_tracked == plain.num_batches_tracked == 3


def test_eval_mode_is_batch_norm_with_the_same_state():
    rng = np.random.default_rng(3)
    renorm = _layer(3, rng)
    plain = bnpy.BatchNorm(3, dtype=np.float64)
    plain.load_state_dict(renorm.state_dict())
    renorm.eval()
    plain.eval()
    x = rng.normal(size=(5, 3))
    dy = rng.normal(size=x.shape)
    np.testing.assert_array_equal(renorm(x), plain(x))
    np.testing.assert_array_equal(renorm.backward(dy), plain.backward(dy))
    np.testing.assert_array_equal(renorm.grad_gamma, plain.grad_gamma)


def test_rmax_and_dmax_are_settable_and_take_effect():
    rng = np.random.default_rng(4)
    bn = _layer(3, rng)
    x = rng.normal(4.0, 3.0, (10, 3))
    before = bn.state_dict()
    bn.rmax, bn.dmax = 1.0, 0.0
    assert (bn.rmax, bn.dmax) == (1.0, 0.0)
    plain = bnpy.BatchNorm(3, dtype=np.float64)
    plain.load_state_dict(before)
    np.testing.assert_allclose(bn(x), plain(x), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "name,value,error,words",
    [
        ("rmax", 0.5, ValueError, ">= 1, got 0.5"),
        ("rmax", float("inf"), ValueError, "got inf"),
        ("dmax", -1, ValueError, ">= 0, got -1.0"),
        ("dmax", float("nan"), ValueError, "got nan"),
        ("rmax", "3", TypeError, "real number, got str"),
        ("dmax", True, TypeError, "got bool"),
    ],
)
def test_bad_bounds_are_rejected_by_name(name, value, error, words):
    with pytest.raises(error, match=f"{name} must be.*{words}"):
        bnpy.BatchRenorm(3, **{name: value})
    bn = bnpy.BatchRenorm(3)
    with pytest.raises(error, match=name):
        setattr(bn, name, value)
    assert (bn.rmax, bn.dmax) == (3.0, 5.0)


def test_constructor_arguments_reach_the_layer():
    bn = bnpy.BatchRenorm(7, 2.0, 1.0, 1e-3, None, False, -1, "float64")
    assert (bn.num_features, bn.rmax, bn.dmax, bn.eps, bn.momentum) == (7, 2.0, 1.0, 1e-3, None)
    assert (bn.affine, bn.axis, bn.dtype, bn.track_running_stats) == (False, -1, np.float64, True)
    assert bn.gamma is None and bn.weight is None
    with pytest.raises(TypeError):
        bnpy.BatchRenorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="num_features"):
        bnpy.BatchRenorm(0)


def test_repr_pickle_deepcopy_and_state_dict():
    rng = np.random.default_rng(5)
    bn = _layer(3, rng, rmax=2.5, dmax=0.25, momentum=0.2, axis=-1)
    x = rng.normal(size=(6, 3))
    bn(x)
    bn.backward(np.ones_like(x))
    bn.eval()
    assert repr(bn) == (
        "BatchRenorm(3, rmax=2.5, dmax=0.25, eps=1e-05, momentum=0.2, "
        "affine=True, axis=-1, dtype='float64', training=False)"
    )
    for other in (pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)):
        assert type(other) is bnpy.BatchRenorm and repr(other) == repr(bn)
        for key, value in bn.state_dict().items():
            np.testing.assert_array_equal(other.state_dict()[key], value)
        np.testing.assert_array_equal(other.grad_gamma, bn.grad_gamma)
        with pytest.raises(RuntimeError, match="before any forward"):
            other.backward(np.ones_like(x))  # a copy has no saved input
    assert set(bn.state_dict()) == {
        "gamma",
        "beta",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    bn.weight = [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(bn.gamma, [1.0, 2.0, 3.0])


def test_out_is_written_and_returned():
    rng = np.random.default_rng(6)
    bn, twin = _layer(4, rng), None
    twin = copy.deepcopy(bn)
    x = rng.normal(size=(5, 4))
    out = np.empty_like(x)
    assert bn(x, out=out) is out
    np.testing.assert_array_equal(out, twin(x))
    dx_out = np.empty_like(x)
    assert bn.backward(x, out=dx_out) is dx_out
    np.testing.assert_array_equal(dx_out, twin.backward(x))


def test_errors_name_the_input_and_change_nothing():
    rng = np.random.default_rng(7)
    bn = _layer(3, rng)
    x = rng.normal(size=(4, 3))
    bn(x)
    dx = bn.backward(np.ones_like(x))
    state = bn.state_dict()
    bad = np.array(x)
    bad[1, 2] = np.nan
    with pytest.raises(FloatingPointError, match="2"):
        bn(bad)
    with pytest.raises(
        ValueError, match=r"expected 3 features on axis 1, got input of shape \(4, 5\)"
    ):
        bn(np.ones((4, 5)))
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(np.ones((1, 3)))
    with pytest.raises(TypeError, match="x must hold real numbers"):
        bn(np.ones((4, 3), complex))
    with pytest.raises(ValueError, match="dy must have the shape"):
        bn.backward(np.ones((5, 3)))
    for key, value in state.items():
        np.testing.assert_array_equal(bn.state_dict()[key], value)
    np.testing.assert_array_equal(bn.backward(np.ones_like(x)), dx)  # the last good forward's


def test_backward_before_forward_and_empty_batch():
    bn = bnpy.BatchRenorm(3)
    with pytest.raises(RuntimeError, match="before any forward"):
        bn.backward(np.ones((4, 3)))
    y = bn(np.ones((0, 3), np.float32))
    assert y.shape == (0, 3) and bn.num_batches_tracked == 0
    assert bn.backward(np.ones((0, 3))).shape == (0, 3)


def test_small_batches_train_towards_the_running_statistics():
    """What renormalization is for: in training mode with r and d unclipped, a
    batch's y is what the running statistics give (the eval-mode output)."""
    rng = np.random.default_rng(8)
    bn = _layer(3, rng, rmax=1e6, dmax=1e6)
    x = rng.normal(3.0, 2.0, (2, 3))
    expected = bn.eval()(x)
    np.testing.assert_allclose(bn.train()(x), expected, rtol=1e-10, atol=1e-10)
