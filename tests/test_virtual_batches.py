"""BatchNorm(virtual_batch_size=k): consecutive groups of k samples along axis 0,
each normalized with its own statistics, equal to a BatchNorm applied to each group."""

import copy
import pickle

import numpy as np
import pytest

import bnpy


def _per_group(x, dy, k, **kwargs):
    """y, dx, grad_gamma, grad_beta of a fresh BatchNorm run on each group in turn."""
    ys, dxs, dgamma, dbeta = [], [], 0.0, 0.0
    for start in range(0, len(x), k):
        bn = bnpy.BatchNorm(dtype=np.float64, **kwargs)
        bn.gamma = np.linspace(0.5, 2.0, bn.num_features)
        bn.beta = np.linspace(-1.0, 1.0, bn.num_features)
        ys.append(bn(x[start : start + k]))
        dxs.append(bn.backward(dy[start : start + k]))
        dgamma, dbeta = dgamma + bn.grad_gamma, dbeta + bn.grad_beta
    return np.concatenate(ys), np.concatenate(dxs), dgamma, dbeta


@pytest.mark.parametrize(
    "shape,axis,k",
    [((12, 3), 1, 4), ((8, 3, 5), 1, 2), ((6, 4, 4, 3), -1, 3), ((9, 2, 3, 3), 1, 9)],
)
def test_equals_batch_norm_applied_to_each_group(shape, axis, k):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, shape)
    x += np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))  # groups differ
    dy = rng.normal(size=shape)
    bn = bnpy.BatchNorm(shape[axis], axis=axis, dtype=np.float64, virtual_batch_size=k)
    bn.gamma = np.linspace(0.5, 2.0, bn.num_features)
    bn.beta = np.linspace(-1.0, 1.0, bn.num_features)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = _per_group(x, dy, k, num_features=shape[axis], axis=axis)
    np.testing.assert_allclose(bn(x), y_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(bn.backward(dy), dx_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(bn.grad_gamma, dgamma_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(bn.grad_beta, dbeta_ref, rtol=1e-12, atol=1e-13)


def test_channels_last_memory_layout_runs_as_it_lies():
    rng = np.random.default_rng(1)
    nhwc = rng.normal(size=(6, 4, 4, 3))
    bn = bnpy.BatchNorm(3, dtype=np.float64, virtual_batch_size=2)
    plain = bnpy.BatchNorm(3, dtype=np.float64, virtual_batch_size=2)
    np.testing.assert_allclose(
        bn(nhwc.transpose(0, 3, 1, 2)),
        plain(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))),
        rtol=1e-13,
        atol=1e-13,
    )


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_take_the_mean_over_groups_once_per_call(momentum):
    rng = np.random.default_rng(2)
    bn = bnpy.BatchNorm(3, momentum=momentum, dtype=np.float64, virtual_batch_size=4)
    x = rng.normal(2.0, 3.0, (12, 3, 5)) + np.arange(12).reshape(-1, 1, 1)
    groups = x.reshape(3, 4, 3, 5)
    means = groups.mean(axis=(1, 3))  # (3 groups, C)
    variances = groups.var(axis=(1, 3), ddof=1)
    bn(x)
    weight = 0.1 if momentum is not None else 1.0
    np.testing.assert_allclose(bn.running_mean, weight * means.mean(0), rtol=1e-14)
    np.testing.assert_allclose(
        bn.running_var, (1 - weight) + weight * variances.mean(0), rtol=1e-14
    )
    assert bn.num_batches_tracked == 1


def test_eval_mode_uses_the_running_statistics_whatever_the_batch():
    rng = np.random.default_rng(3)
    bn = bnpy.BatchNorm(3, dtype=np.float64, virtual_batch_size=4)
    bn(rng.normal(size=(8, 3)))
    plain = bnpy.BatchNorm(3, dtype=np.float64)
    plain.load_state_dict(bn.state_dict())
    x = rng.normal(size=(5, 3))  # 5 does not split into groups of 4: fine in eval mode
    np.testing.assert_array_equal(bn.eval()(x), plain.eval()(x))


def test_without_running_statistics_groups_apply_in_eval_mode_too():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 3)) + np.arange(8).reshape(-1, 1)
    bn = bnpy.BatchNorm(3, dtype=np.float64, track_running_stats=False, virtual_batch_size=4)
    bn.gamma = np.linspace(0.5, 2.0, 3)
    bn.beta = np.linspace(-1.0, 1.0, 3)
    y_ref = _per_group(x, x, 4, num_features=3)[0]
    np.testing.assert_allclose(bn.eval()(x), y_ref, rtol=1e-13, atol=1e-13)


def test_errors_are_clear_and_change_nothing():
    rng = np.random.default_rng(5)
    bn = bnpy.BatchNorm(3, dtype=np.float64, virtual_batch_size=4)
    x = rng.normal(size=(8, 3))
    bn(x)
    dx = bn.backward(x)
    state = bn.state_dict()
    with pytest.raises(
        ValueError,
        match=r"a batch of 10 samples on axis 0 does not split into "
        r"virtual batches of 4, got input of shape \(10, 3\)",
    ):
        bn(rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="outermost in memory"):
        bn(np.asfortranarray(rng.normal(size=(8, 3, 2))))
    with pytest.raises(ValueError, match="features lie on axis 0"):
        bnpy.BatchNorm(8, axis=0, virtual_batch_size=2)(rng.normal(size=(8, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel in each virtual batch"):
        bnpy.BatchNorm(3, virtual_batch_size=1)(rng.normal(size=(8, 3)))
    for key, value in state.items():
        np.testing.assert_array_equal(bn.state_dict()[key], value)
    np.testing.assert_array_equal(bn.backward(x), dx)
    with pytest.raises(
        ValueError, match="virtual_batch_size must be None or an integer >= 1, got 0"
    ):
        bnpy.BatchNorm(3, virtual_batch_size=0)
    with pytest.raises(TypeError, match="virtual_batch_size must be an integer"):
        bnpy.BatchNorm(3, virtual_batch_size=2.0)


def test_attribute_repr_pickle_and_copy():
    bn = bnpy.BatchNorm(3, virtual_batch_size=4)
    assert bn.virtual_batch_size == 4 and bnpy.BatchNorm(3).virtual_batch_size is None
    assert repr(bn).endswith("training=True, virtual_batch_size=4)")
    assert "virtual_batch_size" not in repr(bnpy.BatchNorm(3))
    with pytest.raises(AttributeError):
        bn.virtual_batch_size = 2
    for other in (pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)):
        assert other.virtual_batch_size == 4
    assert pickle.loads(pickle.dumps(bnpy.BatchNorm(3))).virtual_batch_size is None
