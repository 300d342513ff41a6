"""PyTorch's module API on bnpy.BatchNorm (issue 26, item 3): weight and bias
as aliases of gamma and beta, reset_running_stats, reset_parameters,
load_state_dict(d, strict=...) returning IncompatibleKeys, and checkpoints
without num_batches_tracked."""

import numpy as np
import pytest

import bnpy

C = 3


def trained(dtype=np.float32):
    bn = bnpy.BatchNorm(C, dtype=dtype)
    rng = np.random.default_rng(0)
    for _ in range(3):
        bn(rng.normal(2, 3, size=(8, C)))
    bn.gamma, bn.beta = [1.5, 2, 3], [-1, 0.5, 2]
    return bn


def test_weight_and_bias_share_gamma_and_beta_memory():
    bn = bnpy.BatchNorm(C)
    assert np.shares_memory(bn.weight, bn.gamma) and np.shares_memory(bn.bias, bn.beta)
    bn.weight[1] = 7
    assert bn.gamma[1] == 7
    bn.bias = [1, 2, 3]
    np.testing.assert_array_equal(bn.beta, [1, 2, 3])
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        bn.bias = [1, 2]
    np.testing.assert_array_equal(bn.beta, [1, 2, 3])
    plain = bnpy.BatchNorm(C, affine=False)
    assert plain.weight is None and plain.bias is None
    with pytest.raises(ValueError, match=r"weight.*affine=False"):
        plain.weight = np.ones(C)


def test_reset_running_stats_leaves_parameters():
    bn = trained()
    gamma = bn.gamma.copy()
    assert bn.reset_running_stats() is None
    np.testing.assert_array_equal(bn.running_mean, np.zeros(C))
    np.testing.assert_array_equal(bn.running_var, np.ones(C))
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.gamma, gamma)


def test_reset_parameters_resets_everything():
    bn = trained(np.float64)
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.gamma, np.ones(C))
    np.testing.assert_array_equal(bn.beta, np.zeros(C))
    np.testing.assert_array_equal(bn.running_var, np.ones(C))
    assert bn.num_batches_tracked == 0
    fresh = bnpy.BatchNorm(C, dtype=np.float64)
    x = np.random.default_rng(1).normal(size=(8, C))
    np.testing.assert_array_equal(bn(x), fresh(x))


def test_resets_without_state():
    bn = bnpy.BatchNorm(C, affine=False, track_running_stats=False)
    bn.reset_parameters()
    bn.reset_running_stats()
    assert bn.running_mean is None and bn.gamma is None


def test_strict_load_returns_empty_report():
    src, bn = trained(), bnpy.BatchNorm(C)
    result = bn.load_state_dict(src.state_dict())
    assert isinstance(result, bnpy.IncompatibleKeys)
    assert result.missing_keys == [] and result.unexpected_keys == []
    np.testing.assert_array_equal(bn.gamma, src.gamma)
    assert bn.num_batches_tracked == 3


def test_non_strict_load_takes_known_keys_and_reports_the_rest():
    src, bn = trained(), bnpy.BatchNorm(C)
    sd = {
        "weight": src.gamma.copy(),
        "running_var": src.running_var.copy(),
        "num_batches_tracked": 3,
        "layer.extra": np.ones(2),
        "momentum": 0.3,
    }
    result = bn.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["beta", "running_mean"]
    assert sorted(result.unexpected_keys) == ["layer.extra", "momentum"]
    missing, unexpected = result  # a tuple, as PyTorch's
    assert missing == result.missing_keys and unexpected == result.unexpected_keys
    np.testing.assert_array_equal(bn.gamma, src.gamma)
    np.testing.assert_array_equal(bn.running_var, src.running_var)
    np.testing.assert_array_equal(bn.beta, np.zeros(C))  # kept
    np.testing.assert_array_equal(bn.running_mean, np.zeros(C))
    assert bn.num_batches_tracked == 3


def test_strict_load_refuses_what_non_strict_reports():
    bn = trained()
    before = bn.state_dict()
    sd = dict(before, extra=np.ones(C))
    with pytest.raises(ValueError, match="unexpected key 'extra'"):
        bn.load_state_dict(sd, strict=True)
    del sd["extra"], sd["beta"]
    with pytest.raises(ValueError, match="missing key 'beta'"):
        bn.load_state_dict(sd)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_non_strict_load_still_checks_values():
    bn = trained()
    before = bn.state_dict()
    with pytest.raises(ValueError, match="running_var must be finite and non-negative"):
        bn.load_state_dict({"gamma": np.full(C, 9.0), "running_var": [1, -1, 1]}, strict=False)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("strict", [True, False])
def test_checkpoint_without_num_batches_tracked_loads_with_counter_zero(strict):
    src, bn = trained(), trained()
    sd = src.state_dict()
    del sd["num_batches_tracked"]
    result = bn.load_state_dict(sd, strict=strict)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, src.running_mean)


def test_torch_state_dict_loads(torch):
    tm = torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        tm.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        tm.running_mean.copy_(torch.tensor([0.5, 0.25, 0.125]))
    tm.num_batches_tracked.fill_(4)
    bn = bnpy.BatchNorm(C)
    result = bn.load_state_dict(tm.state_dict())
    assert result == ([], [])
    np.testing.assert_array_equal(bn.weight, [1, 2, 3])
    np.testing.assert_array_equal(bn.running_mean, [0.5, 0.25, 0.125])
    assert bn.num_batches_tracked == 4
