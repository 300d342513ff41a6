"""Batch Renormalization (Ioffe, 2017): BatchNorm that stays correct for small batches.

    bn = bnpy.BatchRenorm(64, rmax=3.0, dmax=5.0)
    y = bn(x)                      # training: batch statistics corrected towards the running ones
    dx = bn.backward(dy)           # r and d are constants of the backward pass
    bn.rmax, bn.dmax = 1.5, 2.0    # settable: the paper's warm-up schedule

In training mode, with the batch's mean mu_B and biased variance var_B,

    sigma_B = sqrt(var_B + eps)                sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/rmax, rmax)    d = clip((mu_B - running_mean) / sigma, -dmax, dmax)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

so that y is what the running statistics would give, as long as r and d stay
within their bounds. The running statistics are updated exactly as
BatchNorm's, after r and d are computed from them. In eval mode the layer is
a BatchNorm. With rmax=1 and dmax=0 it is a BatchNorm in training mode too.

No new kernel: y = gamma * (x - m) * s + beta is BatchNorm's normalization
with the corrected moments s = r / sigma_B and m = mu_B - d / s, computed in
double; backward is BatchNorm's with gradient sums rewritten for r and d.
"""

import math
import numbers
from typing import Any

import numpy as np
import numpy.typing as npt

from ._core import BatchNorm

__all__ = ["BatchRenorm"]


def _bound(name: str, value: object, least: float) -> float:
    """value as a finite float >= least, or an error naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if not (math.isfinite(number) and number >= least):
        raise ValueError(f"{name} must be a finite number >= {least:g}, got {number!r}")
    return number


def _bounded(name: str, least: float, doc: str) -> Any:
    """A settable attribute kept in self._<name>, checked by _bound."""

    def get(self: object) -> float:
        value: float = getattr(self, "_" + name)
        return value

    def set(self: object, value: float) -> None:
        setattr(self, "_" + name, _bound(name, value, least))

    return property(get, set, doc=doc)


def _corrections(
    stats: npt.NDArray[Any],
    shift: npt.NDArray[np.float64],
    running_var: npt.NDArray[np.float64],
    rmax: float,
    dmax: float,
    eps: float,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """r, d (C,) and the (2, C) moments that normalize with them, in float64.

    stats: (C, 3) count, mean - shift, m2 of the batch; shift: the running mean.
    """
    count, offset, m2 = stats[:, 0], stats[:, 1], stats[:, 2]
    sigma_batch = np.sqrt(m2 / count + eps)
    sigma = np.sqrt(running_var + eps)
    r = np.clip(sigma_batch / sigma, 1.0 / rmax, rmax)
    d = np.clip(offset / sigma, -dmax, dmax)
    invstd = r / sigma_batch
    mean = shift + (offset - d / invstd)
    return r, d, np.stack([mean, invstd])


class BatchRenorm(BatchNorm):
    """BatchNorm with Batch Renormalization's correction r, d in training mode.

    BatchRenorm(num_features, rmax=3.0, dmax=5.0, eps=1e-5, momentum=0.1,
    affine=True, axis=1, dtype=np.float32, *, training=True). Everything else
    (parameters, running statistics, state_dict, eval mode, calibrate, pickle)
    is BatchNorm's; the running statistics are always tracked.
    """

    def __init__(
        self,
        num_features: int,
        rmax: float = 3.0,
        dmax: float = 5.0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        axis: int = 1,
        dtype: Any = np.float32,
        *,
        training: bool = True,
    ) -> None:
        r_bound = _bound("rmax", rmax, 1.0)
        d_bound = _bound("dmax", dmax, 0.0)
        super().__init__(num_features, eps, momentum, affine, True, axis, dtype, training=training)
        self._rmax, self._dmax = r_bound, d_bound
        self._rd: tuple[npt.NDArray[Any], npt.NDArray[Any]] | None = (
            None  # (r, d) of the last forward when it renormalized
        )

    rmax = _bounded("rmax", 1.0, "The bound of r: 1/rmax <= r <= rmax (>= 1; 1 makes r = 1).")
    dmax = _bounded("dmax", 0.0, "The bound of d: |d| <= dmax (>= 0; 0 makes d = 0).")

    def forward(
        self, x: npt.ArrayLike, *, out: npt.NDArray[np.floating[Any]] | None = None
    ) -> npt.NDArray[np.floating[Any]]:
        """y for x: renormalized in training mode, BatchNorm's in eval mode."""
        if not self.training:
            y = super().forward(x, out=out)
            self._rd = None
            return y
        shift = np.array(self.running_mean, dtype=np.float64)
        stats = self._stats_of([x], shift=shift, name="x")  # (C, 3)
        if stats[0, 0] == 0:  # an empty batch: BatchNorm's empty output, nothing changes
            y = super().forward(x, out=out)
            self._rd = None
            return y
        with np.errstate(invalid="ignore", divide="ignore"):  # non-finite x: raised below
            r, d, moments = _corrections(
                stats,
                shift,
                np.array(self.running_var, np.float64),
                self._rmax,
                self._dmax,
                self.eps,
            )
        y = self._forward_from_stats(x, stats, shift=shift, moments=moments, out=out)
        self._rd = (r, d)
        return y

    def backward(
        self, dy: npt.ArrayLike, *, out: npt.NDArray[np.floating[Any]] | None = None
    ) -> npt.NDArray[np.floating[Any]]:
        """dx for the last forward, with r and d held constant; sets grad_gamma, grad_beta."""
        if self._rd is None:
            return super().backward(dy, out=out)
        r, d = self._rd
        # sums over the batch: dy * x_hat' (x_hat' = x_hat * r + d, what gamma scaled) and dy
        local = self._grad_sums(dy)  # (2, C)
        dy_xhat = (local[0] - d * local[1]) / r  # sum of dy * x_hat, x_hat the batch-normalized x
        # dx = gamma * r / sigma_B / n * (n dy - sum dy - x_hat * sum dy x_hat), written in
        # x_hat' as the kernel computes it: x_hat * t = x_hat' * t / r - d * t / r
        sums = np.concatenate([dy_xhat / r, local[1] - d * dy_xhat / r])
        return self._backward_from_sums(dy, sums, local.ravel(), out=out)

    def __repr__(self) -> str:
        momentum = self.momentum
        return (
            f"{type(self).__name__}({self.num_features}, rmax={self._rmax!r}, "
            f"dmax={self._dmax!r}, eps={self.eps!r}, momentum={momentum!r}, "
            f"affine={self.affine}, axis={self.axis}, dtype='{self.dtype.name}', "
            f"training={self.training})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles the configuration, state and mode, not the last forward's input."""
        reduced = super().__reduce__()
        assert isinstance(reduced, tuple)  # BatchNorm's: (constructor, args, state)
        _, args, state = reduced
        num_features, eps, momentum, affine, _, axis, dtype = args
        config = dict(
            rmax=self._rmax,
            dmax=self._dmax,
            eps=eps,
            momentum=momentum,
            affine=affine,
            axis=axis,
            dtype=dtype,
        )
        state = dict(state)
        state["__dict__"] = {k: v for k, v in state.get("__dict__", {}).items() if k != "_rd"}
        return (_rebuild, (type(self), num_features, config), state)


def _rebuild(cls: type[BatchRenorm], num_features: int, config: dict[str, Any]) -> BatchRenorm:
    return cls(num_features, **config)
