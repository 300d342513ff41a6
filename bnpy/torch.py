"""bnpy.torch: bnpy's kernels as drop-in PyTorch modules (needs torch).

    import bnpy.torch
    model = bnpy.torch.convert(model)      # every torch.nn.BatchNorm1d/2d/3d replaced
    bn = bnpy.torch.BatchNorm2d(64)        # torch's constructor, parameters, buffers

`BatchNorm1d`, `BatchNorm2d` and `BatchNorm3d` subclass torch's classes of the
same names, so they take the same arguments, hold the same parameters
(`weight`, `bias`) and buffers (`running_mean`, `running_var`,
`num_batches_tracked`), save and load the same state dicts and pass
`isinstance(m, torch.nn.BatchNorm2d)`. Only `forward` differs: on float32 and
float64 CPU tensors it runs bnpy's forward and backward through a
`torch.autograd.Function`, reading and writing the tensors' memory without
copies (channels_last inputs stay channels_last). Other devices and dtypes
run torch's own batch norm. Differences from torch's forward: a training batch
with one value per channel raises before `num_batches_tracked` counts it, and
the backward is not differentiable again (no double backward).
"""

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch.autograd.function import once_differentiable

import bnpy

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]

_KERNEL_DTYPES = (torch.float32, torch.float64)

if TYPE_CHECKING:  # what the mixin below is mixed into: torch's modules' attributes
    _ModuleBase = torch.nn.modules.batchnorm._BatchNorm
else:
    _ModuleBase = object


def _array(tensor: torch.Tensor | None) -> Any:
    """The memory of a CPU tensor as an ndarray (no copy), or None."""
    return None if tensor is None else tensor.detach().numpy()


def _update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: npt.NDArray[Any],
    invstd: npt.NDArray[Any],
    eps: float,
    count: int,
    momentum: float,
) -> None:
    """running <- (1 - momentum) * running + momentum * batch, in place, with
    the unbiased batch variance; mean and invstd (C,) as bnpy returns them."""
    biased = np.maximum(1.0 / np.square(invstd.astype(np.float64)) - eps, 0.0)
    for running, batch in ((running_mean, mean), (running_var, biased * count / (count - 1))):
        values = _array(running)
        values *= 1.0 - momentum
        values += momentum * batch


class _BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x) by bnpy; the gradients of x, weight and bias."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        batch_stats: bool,
        momentum: float | None,
        eps: float,
    ) -> torch.Tensor:
        # momentum: the factor for the running statistics, None: do not update them
        x_np, weight_np = _array(x), _array(weight)
        if batch_stats:
            y, mean, invstd = bnpy.batch_norm_forward(x_np, weight_np, _array(bias), eps=eps)
            if momentum is not None:
                assert running_mean is not None and running_var is not None  # for mypy
                count = x_np.size // x_np.shape[1]
                _update_running(running_mean, running_var, mean, invstd, eps, count, momentum)
        else:
            y = bnpy.batch_norm_inference(
                x_np, weight_np, _array(bias), _array(running_mean), _array(running_var), eps=eps
            )
            mean = _array(running_mean).astype(np.float64)
            invstd = 1.0 / np.sqrt(_array(running_var).astype(np.float64) + eps)
        ctx.save_for_backward(x, weight)
        ctx.moments, ctx.batch_stats = (mean, invstd), batch_stats
        return torch.from_numpy(y)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        mean, invstd = ctx.moments
        dx, dweight, dbias = bnpy.batch_norm_backward(
            _array(dy), _array(x), _array(weight), mean, invstd, training=ctx.batch_stats
        )
        grads: list[torch.Tensor | None] = [torch.from_numpy(dx)]
        grads += (
            [None, None] if weight is None else [torch.from_numpy(dweight), torch.from_numpy(dbias)]
        )
        return (*grads, None, None, None, None, None)


class _BnpyForward(_ModuleBase):
    """forward() of a torch BatchNorm module through bnpy's kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)  # type: ignore[no-untyped-call]  # torch does not annotate it
        if x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES or x.numel() == 0:
            return super().forward(x)  # torch's own batch norm
        batch_stats = self.training or self.running_mean is None
        updates = self.training and self.running_mean is not None
        if batch_stats and x.numel() == x.shape[1]:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got "
                f"input size {tuple(x.shape)}"
            )
        momentum = None
        if updates:
            momentum = self.momentum
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if momentum is None:  # a cumulative average
                    momentum = 1.0 / float(self.num_batches_tracked)
        y: torch.Tensor = _BatchNormFunction.apply(  # type: ignore[no-untyped-call]
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            batch_stats,
            momentum,
            self.eps,
        )
        return y


class BatchNorm1d(_BnpyForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by bnpy: (N, C) or (N, C, L) input."""


class BatchNorm2d(_BnpyForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by bnpy: (N, C, H, W) input, any memory format."""


class BatchNorm3d(_BnpyForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by bnpy: (N, C, D, H, W) input."""


_REPLACEMENTS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _replacement(module: torch.nn.Module) -> torch.nn.Module | None:
    """bnpy's module for a torch BatchNorm*d, holding module's very parameters
    and buffers (an optimizer made before still updates them); None for any
    other module."""
    cls = _REPLACEMENTS.get(type(module))
    if cls is None:
        return None
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",
    )
    for name, param in module.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buffer in module.named_buffers(recurse=False):
        new.register_buffer(name, buffer)
    new.train(module.training)
    return new


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """model with every torch.nn.BatchNorm1d, BatchNorm2d and BatchNorm3d (in
    it, or model itself) replaced by bnpy.torch's, which takes over its
    parameters and buffers; everything else is left as it is. Returns the
    model (a new module only when model itself is a BatchNorm)."""
    top = _replacement(model)
    if top is not None:
        return top
    for name, child in model.named_children():
        setattr(model, name, convert(child))
    return model
