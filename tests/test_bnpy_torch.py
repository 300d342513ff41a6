"""bnpy.torch against torch.nn.BatchNorm1d/2d/3d (issue 26, item 4).

The checks of PyTorch's own BatchNorm tests that apply to a module computed
elsewhere: the running statistics update, eval mode, momentum=None (a
cumulative average), one value per channel, non-contiguous and channels_last
inputs, load_state_dict, pickle; then bnpy.torch.convert, and a small CNN
trained both ways from one seed, whose float64 losses agree to 1e-10 relative
in each of 100 steps.

bnpy computes in double and rounds once; torch's float64 batch norm differs
from it by rounding only, so float64 comparisons use a tolerance of about
1e-12 relative to the values' scale.
"""

import copy
import io
import pickle

import numpy as np
import pytest

CLASSES = {
    1: ("BatchNorm1d", (6, 4, 5)),
    2: ("BatchNorm2d", (6, 4, 3, 5)),
    3: ("BatchNorm3d", (4, 4, 3, 2, 3)),
}


@pytest.fixture(scope="module")
def bt(torch):
    import bnpy.torch

    return bnpy.torch


def pair(torch, bt, dims, **kwargs):
    """torch's module and bnpy's, float64, with the same random parameters."""
    name, shape = CLASSES[dims]
    gen = torch.Generator().manual_seed(dims)
    ref = getattr(torch.nn, name)(shape[1], dtype=torch.float64, **kwargs)
    mine = getattr(bt, name)(shape[1], dtype=torch.float64, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5)
            ref.bias.copy_(torch.randn(shape[1], generator=gen, dtype=torch.float64))
    mine.load_state_dict(ref.state_dict())
    return ref, mine, shape


def batch(torch, shape, seed, dtype=None):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype or torch.float64) * 3 + 2


def close(a, b, rtol=1e-12):
    a, b = a.detach().numpy(), b.detach().numpy()
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(1.0, np.abs(b).max()))


def run_both(torch, ref, mine, x, dy):
    """y and the gradients of x, weight and bias, from each module."""
    out = []
    for module in (ref, mine):
        xg = x.detach().clone().requires_grad_(True)
        y = module(xg)
        params = [xg] + ([module.weight, module.bias] if module.affine else [])
        out.append((y, *torch.autograd.grad(y, params, dy)))
    return out


def test_are_torch_modules_with_torchs_state(torch, bt):
    for name, _ in CLASSES.values():
        mine = getattr(bt, name)(3, eps=1e-3, momentum=0.2)
        assert isinstance(mine, getattr(torch.nn, name)) and isinstance(mine, torch.nn.Module)
        ref = getattr(torch.nn, name)(3, eps=1e-3, momentum=0.2)
        assert list(mine.state_dict()) == list(ref.state_dict())
        assert [n for n, _ in mine.named_parameters()] == ["weight", "bias"]
        assert (mine.eps, mine.momentum) == (1e-3, 0.2)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_training_updates_running_statistics_as_torch(torch, bt, dims, affine):
    ref, mine, shape = pair(torch, bt, dims, affine=affine)
    for step in range(3):
        x, dy = batch(torch, shape, step), batch(torch, shape, 100 + step)
        for got, want in zip(*reversed(run_both(torch, ref, mine, x, dy))):
            close(got, want)
        close(mine.running_mean, ref.running_mean)
        close(mine.running_var, ref.running_var)
    assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked) == 3


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_eval_uses_running_statistics(torch, bt, dims):
    ref, mine, shape = pair(torch, bt, dims)
    for module in (ref, mine):
        module(batch(torch, shape, 1))
        module.eval()
    x, dy = batch(torch, shape, 2), batch(torch, shape, 3)
    before = mine.running_mean.clone()
    for got, want in zip(*reversed(run_both(torch, ref, mine, x, dy))):
        close(got, want)
    assert torch.equal(mine.running_mean, before) and int(mine.num_batches_tracked) == 1


def test_momentum_none_is_a_cumulative_average(torch, bt):
    ref, mine, shape = pair(torch, bt, 2, momentum=None)
    xs = [batch(torch, shape, s) for s in range(4)]
    for x in xs:
        ref(x), mine(x)
    close(mine.running_mean, ref.running_mean)
    close(mine.running_var, ref.running_var)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    close(mine.running_mean, means)


def test_without_running_statistics_eval_uses_batch_statistics(torch, bt):
    ref, mine, shape = pair(torch, bt, 2, track_running_stats=False)
    ref.eval(), mine.eval()
    x, dy = batch(torch, shape, 5), batch(torch, shape, 6)
    for got, want in zip(*reversed(run_both(torch, ref, mine, x, dy))):
        close(got, want)
    assert mine.running_mean is None and mine.num_batches_tracked is None


def test_one_value_per_channel_raises_and_counts_nothing(torch, bt):
    mine = bt.BatchNorm1d(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        mine(torch.randn(1, 4, dtype=torch.float64))
    assert int(mine.num_batches_tracked) == 0
    mine.eval()
    assert mine(torch.randn(1, 4, dtype=torch.float64)).shape == (1, 4)


def test_wrong_dimensions_raise_as_torch(torch, bt):
    with pytest.raises(ValueError, match="expected 4D input"):
        bt.BatchNorm2d(4)(torch.randn(3, 4))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_non_contiguous_input(torch, bt, dtype):
    dtype = getattr(torch, dtype)
    ref, mine, _ = pair(torch, bt, 2)
    ref, mine = ref.to(dtype), mine.to(dtype)
    x = batch(torch, (6, 5, 6, 4), 7, dtype).permute(0, 3, 2, 1)[:, :, ::2]  # (6, 4, 3, 5)
    dy = batch(torch, (6, 4, 3, 5), 8, dtype).transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous() and not dy.is_contiguous()
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    for got, want in zip(*reversed(run_both(torch, ref, mine, x, dy))):
        close(got, want, rtol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_channels_last_stays_channels_last_without_copies(torch, bt, dtype):
    dtype = getattr(torch, dtype)
    ref, mine, shape = pair(torch, bt, 2)
    ref, mine = ref.to(dtype), mine.to(dtype)
    x = batch(torch, shape, 9, dtype).contiguous(memory_format=torch.channels_last)
    dy = batch(torch, shape, 10, dtype).contiguous(memory_format=torch.channels_last)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    (y_ref, *g_ref), (y, dx, *g) = run_both(torch, ref, mine, x, dy)
    for got, want in zip([y, dx, *g], [y_ref, *g_ref]):
        close(got, want, rtol)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == x.stride()


@pytest.mark.parametrize("memory_format", ["contiguous_format", "channels_last"])
def test_forward_and_backward_copy_nothing(torch, bt, memory_format):
    """NumPy's allocations are traced: bnpy allocates y and dx (2 x's worth)
    and nothing else the size of the data; a copy of x or dy would be a third."""
    import tracemalloc

    memory_format = getattr(torch, memory_format)
    mine = bt.BatchNorm2d(16, dtype=torch.float64)
    x = batch(torch, (8, 16, 32, 32), 16).contiguous(memory_format=memory_format)
    dy = batch(torch, (8, 16, 32, 32), 17).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    nbytes = x.numel() * 8
    mine(x).backward(dy)  # warm up
    x.grad = None
    tracemalloc.start()
    try:
        y = mine(x)
        torch.autograd.grad(y, [x, mine.weight, mine.bias], dy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * nbytes, peak / nbytes


def test_other_dtypes_run_torchs_batch_norm(torch, bt):
    mine, ref = (
        bt.BatchNorm2d(4, dtype=torch.bfloat16),
        torch.nn.BatchNorm2d(4, dtype=torch.bfloat16),
    )
    x = batch(torch, (6, 4, 3, 5), 13).to(torch.bfloat16)
    assert torch.equal(mine(x), ref(x))


def test_load_state_dict_and_pickle(torch, bt):
    ref, mine, shape = pair(torch, bt, 2)
    ref(batch(torch, shape, 14))
    mine.load_state_dict(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(mine.state_dict()[key], value)
    mine.eval()
    buffer = io.BytesIO()
    torch.save(mine, buffer)
    buffer.seek(0)
    for again in (
        pickle.loads(pickle.dumps(mine)),
        copy.deepcopy(mine),
        torch.load(buffer, weights_only=False),
    ):
        assert type(again) is type(mine)
        assert torch.equal(again.running_var, mine.running_var)
        x = batch(torch, shape, 15)
        close(again(x), mine(x))


def test_convert_replaces_every_batch_norm_and_keeps_its_tensors(torch, bt):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(16, 5),
            torch.nn.BatchNorm1d(5, affine=False, eps=1e-3),
        ),
        torch.nn.Identity(),
    )
    model.eval()
    weight, running_var = model[1].weight, model[1].running_var
    converted = bt.convert(model)
    assert converted is model
    assert type(model[1]) is bt.BatchNorm2d and type(model[2][2]) is bt.BatchNorm1d
    assert model[1].weight is weight and model[1].running_var is running_var
    assert model[1].momentum is None and model[2][2].eps == 1e-3 and not model[2][2].affine
    assert not model[1].training
    alone = bt.convert(torch.nn.BatchNorm3d(2))
    assert type(alone) is bt.BatchNorm3d
    assert type(bt.convert(torch.nn.ReLU())) is torch.nn.ReLU


def _cnn(torch):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2),
        torch.nn.BatchNorm2d(8, momentum=None),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 3 * 3, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    )


def test_cnn_trained_both_ways_has_the_same_losses(torch, bt):
    """Issue 26's floor: float64 losses equal to 1e-10 relative over 100 steps."""
    torch.manual_seed(0)
    ref = _cnn(torch).double()
    mine = bt.convert(copy.deepcopy(ref))
    assert sum(isinstance(m, (bt.BatchNorm1d, bt.BatchNorm2d)) for m in mine.modules()) == 3
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(200, 3, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (200,), generator=gen)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, mine)]
    worst = 0.0
    for step in range(100):
        index = torch.randint(0, 200, (32,), generator=gen)
        losses = []
        for model, optimizer in zip((ref, mine), optimizers):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images[index]), labels[index])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        worst = max(worst, abs(losses[1] - losses[0]) / abs(losses[0]))
        assert abs(losses[1] - losses[0]) <= 1e-10 * abs(losses[0]), (step, losses)
    assert losses[0] < 1.0  # it learned something: the comparison is not of constants
    ref.eval(), mine.eval()
    close(mine(images), ref(images), 1e-9)
