"""bnpy.BatchNorm against torch.nn.BatchNorm1d/2d/3d.

128 seeded configurations, one test id each. The seed fixes the layout kind,
the dtype, the kind of momentum (None, 0, 1, random in (0, 1)) and the
(affine, track_running_stats) pair so that every combination of those appears
exactly once; the seed's generator draws the shape, C, eps, the momentum value,
gamma, beta, the data and the upstream gradients. Each configuration runs
several training steps (forward, random dy, backward), then eval steps, then
one more training step, and compares after every step: y, dx, dgamma, dbeta
(torch's autograd), running_mean, running_var and num_batches_tracked.

Tolerances: float64 1e-10, float32 1e-5, relative to the magnitude that
rounding errors scale with. bnpy computes in double and rounds once; torch
computes float32 batch norm in float32, so the two differ by torch's float32
rounding, which is proportional to the size of the terms it adds, not of the
result. Where the result is a cancellation that magnitude is larger than the
result, and a plain max|a - b| / max|b| would charge torch's rounding to bnpy:
- dx in training = gamma*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)): with few
  values per feature (n = 2 makes xhat = ±1 and dx nearly 0) the result can be
  100x smaller than gamma*invstd*dy. Measured: seed 3, (2, 5, 1, 1, 1) float32,
  torch is 2.5e-5 away from the float64 reference, bnpy 3.5e-8. The scale for dx
  is therefore max(|dx|, |gamma * invstd * dy|).
- dgamma, dbeta, the batch mean: sums of terms of both signs; their scales are
  the sums of the absolute values, max over features.
The errors are all still measured against torch; the scales only say what
"relative" is relative to. In float64 the same scales apply and 1e-10 holds.
"""

import numpy as np
import pytest

import bnpy

TOL = {np.float32: 1e-5, np.float64: 1e-10}
N_CONFIGS = 128
KINDS = ["NC", "NCL", "NCHW", "NCDHW"]
MOMENTA = ["none", "zero", "one", "random"]
FLAGS = [(True, True), (True, False), (False, True), (False, False)]  # affine, track


def assert_close(actual, expected, dtype, what, scale=0.0):
    """max|actual - expected| <= tol * max(max|expected|, scale)."""
    assert actual is not None, f"{what}: bnpy gave None"
    assert np.shape(actual) == np.shape(expected), (
        f"{what}: shape {np.shape(actual)} != torch's {np.shape(expected)}"
    )
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), scale, 1e-300)
    err = float(np.max(np.abs(actual - expected), initial=0.0)) / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g}"


def make_config(seed):
    rng = np.random.default_rng(20240 + seed)
    kind = KINDS[seed % 4]
    dtype = (np.float32, np.float64)[(seed // 4) % 2]
    momentum_kind = MOMENTA[(seed // 8) % 4]
    affine, track = FLAGS[(seed // 32) % 4]
    c = int(rng.integers(1, 6))
    while True:
        if kind == "NC":
            spatial = ()
            n = int(rng.integers(2, 9))
        elif kind == "NCL":
            spatial = (int(rng.integers(1, 6)),)
            n = int(rng.integers(1, 5))
        elif kind == "NCHW":
            spatial = tuple(int(v) for v in rng.integers(1, 5, size=2))
            n = int(rng.integers(1, 4))
        else:
            spatial = tuple(int(v) for v in rng.integers(1, 4, size=3))
            n = int(rng.integers(1, 3))
        if n * int(np.prod(spatial, dtype=np.int64)) >= 2:  # training needs 2 values
            break
    momentum = {"none": None, "zero": 0.0, "one": 1.0, "random": float(rng.uniform(0.01, 0.99))}[
        momentum_kind
    ]
    eps = 1e-5 if rng.random() < 0.3 else float(10.0 ** rng.uniform(-6, -1))
    return dict(
        rng=rng,
        kind=kind,
        dtype=dtype,
        shape=(n, c) + spatial,
        c=c,
        momentum=momentum,
        eps=eps,
        affine=affine,
        track=track,
        train_steps=int(rng.integers(2, 5)),
    )


def make_data(rng, shape, dtype):
    """x with per-feature non-zero mean and non-unit std, and a random dy."""
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    loc = rng.uniform(-3.0, 3.0, c).reshape(bshape)
    scale = rng.uniform(0.5, 3.0, c).reshape(bshape)
    x = (rng.standard_normal(shape) * scale + loc).astype(dtype)
    dy = (rng.standard_normal(shape) * 1.5 + 0.3).astype(dtype)
    return x, dy


class TorchLayer:
    """A torch BatchNorm module driven with NumPy arrays."""

    def __init__(self, torch, dims, c, eps, momentum, affine, track, dtype, permute=None):
        cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims]
        self.torch = torch
        self.permute = permute
        self.module = cls(
            c,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track,
            dtype=torch.float32 if dtype is np.float32 else torch.float64,
        )

    def set_affine(self, gamma, beta):
        with self.torch.no_grad():
            self.module.weight.copy_(self.torch.from_numpy(gamma))
            self.module.bias.copy_(self.torch.from_numpy(beta))

    def step(self, x, dy):
        """Forward and backward: (y, dx, dgamma, dbeta) as NumPy arrays."""
        torch = self.torch
        self.module.zero_grad(set_to_none=True)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        dyt = torch.from_numpy(dy.copy())
        if self.permute is not None:  # channels-last data, channels-first module
            inverse = np.argsort(self.permute).tolist()
            yt = self.module(xt.permute(*self.permute)).permute(*inverse)
        else:
            yt = self.module(xt)
        yt.backward(dyt)
        grads = (None, None)
        if self.module.affine:
            grads = (self.module.weight.grad.numpy().copy(), self.module.bias.grad.numpy().copy())
        return (yt.detach().numpy().copy(), xt.grad.numpy().copy()) + grads

    def buffers(self):
        m = self.module
        rm = None if m.running_mean is None else m.running_mean.numpy().copy()
        rv = None if m.running_var is None else m.running_var.numpy().copy()
        nbt = 0 if m.num_batches_tracked is None else int(m.num_batches_tracked)
        return rm, rv, nbt


def rounding_scales(bn, x, dy):
    """The magnitudes that float32 rounding errors of each result scale with
    (see the module docstring): dx's terms, and sums of absolute values."""
    axes = tuple(a for a in range(x.ndim) if a != bn.axis % x.ndim)
    bshape = [1] * x.ndim
    bshape[bn.axis % x.ndim] = -1
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    if bn.training or not bn.track_running_stats:
        mean, var = x64.mean(axis=axes), x64.var(axis=axes)
    else:
        mean, var = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
    invstd = 1.0 / np.sqrt(var + bn.eps)
    gamma = np.ones_like(invstd) if not bn.affine else np.abs(bn.gamma.astype(np.float64))
    xhat = (x64 - mean.reshape(bshape)) * invstd.reshape(bshape)
    return dict(
        dx=float(np.max(np.abs(dy64 * (gamma * invstd).reshape(bshape)))),
        dgamma=float(np.max(np.abs(dy64 * xhat).sum(axis=axes))),
        dbeta=float(np.max(np.abs(dy64).sum(axis=axes))),
        mean=float(np.max(np.abs(x64).mean(axis=axes))),
    )


def compare_step(bn, tl, x, dy, dtype, when):
    scales = rounding_scales(bn, x, dy)  # before the forward changes running stats
    y = bn(x)
    dx = bn.backward(dy)
    ty, tdx, tdg, tdb = tl.step(x, dy)
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, ty, dtype, f"y ({when})")
    assert_close(dx, tdx, dtype, f"dx ({when})", scales["dx"])
    if tl.module.affine:
        assert_close(bn.grad_gamma, tdg, dtype, f"dgamma ({when})", scales["dgamma"])
        assert_close(bn.grad_beta, tdb, dtype, f"dbeta ({when})", scales["dbeta"])
    rm, rv, nbt = tl.buffers()
    if rm is None:
        assert bn.running_mean is None and bn.running_var is None, when
    else:
        assert_close(bn.running_mean, rm, dtype, f"running_mean ({when})", scales["mean"])
        assert_close(bn.running_var, rv, dtype, f"running_var ({when})")
    assert bn.num_batches_tracked == nbt, (
        f"num_batches_tracked ({when}): {bn.num_batches_tracked} != torch's {nbt}"
    )


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_matches_torch(torch, seed):
    cfg = make_config(seed)
    rng, dtype, shape, c = cfg["rng"], cfg["dtype"], cfg["shape"], cfg["c"]
    dims = max(len(shape) - 2, 1)
    bn = bnpy.BatchNorm(
        c,
        eps=cfg["eps"],
        momentum=cfg["momentum"],
        affine=cfg["affine"],
        track_running_stats=cfg["track"],
        dtype=dtype,
    )
    tl = TorchLayer(torch, dims, c, cfg["eps"], cfg["momentum"], cfg["affine"], cfg["track"], dtype)
    if cfg["affine"]:
        gamma = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
        beta = rng.uniform(-1.0, 1.0, c).astype(dtype)
        bn.gamma[:] = gamma
        tl.set_affine(gamma, beta)
        bn.beta[:] = beta

    label = (
        f"{cfg['kind']} {shape} {np.dtype(dtype).name} momentum={cfg['momentum']} "
        f"eps={cfg['eps']:.3g} affine={cfg['affine']} track={cfg['track']}"
    )
    for step in range(cfg["train_steps"]):
        x, dy = make_data(rng, shape, dtype)
        compare_step(bn, tl, x, dy, dtype, f"{label}, train step {step}")
    bn.eval()
    tl.module.eval()
    for step in range(2):
        x, dy = make_data(rng, shape, dtype)
        compare_step(bn, tl, x, dy, dtype, f"{label}, eval step {step}")
    bn.train()
    tl.module.train()
    x, dy = make_data(rng, shape, dtype)
    compare_step(bn, tl, x, dy, dtype, f"{label}, train again")


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_channels_last_matches_torch_batchnorm2d(torch, dtype, momentum):
    """(N, H, W, C) with axis=-1 against BatchNorm2d on the (N, C, H, W) permutation."""
    rng = np.random.default_rng(7 if dtype is np.float32 else 8)
    n, h, w, c = 3, 4, 2, 5
    bn = bnpy.BatchNorm(c, eps=1e-4, momentum=momentum, axis=-1, dtype=dtype)
    tl = TorchLayer(torch, 2, c, 1e-4, momentum, True, True, dtype, permute=(0, 3, 1, 2))
    gamma = (rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dtype)
    beta = rng.uniform(-1.0, 1.0, c).astype(dtype)
    bn.gamma[:] = gamma
    bn.beta[:] = beta
    tl.set_affine(gamma, beta)

    def data():
        x, dy = make_data(rng, (n, c, h, w), dtype)  # per-feature statistics on axis 1 ...
        return (
            np.ascontiguousarray(x.transpose(0, 2, 3, 1)),  # ... moved to the last axis
            np.ascontiguousarray(dy.transpose(0, 2, 3, 1)),
        )

    for step in range(3):
        compare_step(bn, tl, *data(), dtype, f"channels-last train step {step}")
    bn.eval()
    tl.module.eval()
    for step in range(2):
        compare_step(bn, tl, *data(), dtype, f"channels-last eval step {step}")
