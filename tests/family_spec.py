"""What tests/test_family.py needs to drive bnpy's LayerNorm, RMSNorm,
GroupNorm and InstanceNorm alike: a Spec names a layer and an input shape,
makes the bnpy layer, its functional form and the PyTorch module, and lays an
array out as the rows of values that share statistics (how the exact and the
NumPy references see the data). exact_rows is the reference in rationals."""

import math
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

import numpy as np

import bnpy


@dataclass(frozen=True)
class Spec:
    """A layer and the shape of its input x.

    kind: "layer", "rms", "group" or "instance"; size: normalized_shape (layer,
    rms) or num_groups (group); affine: gamma (and beta) present; bias:
    LayerNorm's beta; track, momentum: InstanceNorm's running statistics."""

    kind: str
    shape: tuple[int, ...]
    size: Any = None
    axis: int = 1
    affine: bool = True
    bias: bool = True
    track: bool = False
    momentum: float | None = 0.1

    def __str__(self) -> str:
        parts = [self.kind, "x".join(map(str, self.shape))]
        if self.kind in ("layer", "rms", "group"):
            parts.append(f"s{self.size}".replace(" ", ""))
        if self.kind in ("group", "instance") and self.axis != 1:
            parts.append(f"axis{self.axis}")
        parts += [] if self.affine else ["noaffine"]
        parts += [] if self.bias or self.kind != "layer" else ["nobias"]
        parts += ["track", f"m{self.momentum}"] if self.track else []
        return "-".join(parts)

    @property
    def centered(self) -> bool:
        return self.kind != "rms"

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def normalized(self) -> tuple[int, ...]:
        return (self.size,) if isinstance(self.size, int) else tuple(self.size)

    @property
    def groups(self) -> int:
        return self.size if self.kind == "group" else self.channels

    @property
    def has_beta(self) -> bool:
        return self.affine and self.kind != "rms" and (self.bias or self.kind != "layer")

    def layer(self, dtype: Any, eps: Any = 1e-5) -> Any:
        if self.kind == "layer":
            return bnpy.LayerNorm(
                self.size, eps=eps, elementwise_affine=self.affine, bias=self.bias, dtype=dtype
            )
        if self.kind == "rms":
            return bnpy.RMSNorm(self.size, eps=eps, elementwise_affine=self.affine, dtype=dtype)
        if self.kind == "group":
            return bnpy.GroupNorm(
                self.size, self.channels, eps=eps, affine=self.affine, axis=self.axis, dtype=dtype
            )
        return bnpy.InstanceNorm(
            self.channels,
            eps=eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track,
            axis=self.axis,
            dtype=dtype,
        )

    # -- layouts --

    def to_torch(self, a: Any) -> Any:
        """a in PyTorch's layout: channels on axis 1"""
        return a if self.kind in ("layer", "rms") else np.moveaxis(a, self.axis, 1)

    def from_torch(self, a: Any) -> Any:
        return a if self.kind in ("layer", "rms") else np.moveaxis(a, 1, self.axis)

    def rows(self, a: Any) -> tuple[Any, Any]:
        """a (x's shape) in float64 as (rows, n), the rows of values that share
        statistics (in the order of the functional forms' mean and invstd),
        and each value's index into gamma and beta flattened"""
        a = np.asarray(a, np.float64)
        if self.kind in ("layer", "rms"):
            n = math.prod(self.normalized)
            rows = a.reshape(-1, n)
            return rows, np.broadcast_to(np.arange(n), rows.shape)
        moved = np.moveaxis(a, self.axis, 1)
        c = moved.shape[1]
        index = np.broadcast_to(np.arange(c).reshape((1, c) + (1,) * (moved.ndim - 2)), moved.shape)
        count = moved.shape[0] * self.groups
        return moved.reshape(count, -1), index.reshape(count, -1)

    def from_rows(self, rows: Any) -> Any:
        """the inverse of rows(): (rows, n) back to x's shape and layout"""
        if self.kind in ("layer", "rms"):
            return rows.reshape(self.shape)
        moved = list(self.shape)
        moved.insert(1, moved.pop(self.axis % len(moved)))
        return np.moveaxis(rows.reshape(moved), 1, self.axis)

    # -- the functional forms --

    def forward(self, x: Any, gamma: Any, beta: Any, eps: Any = 1e-5, out: Any = None) -> Any:
        """(y, mean or None, invstd), mean and invstd flat in the order of rows()"""
        if self.kind == "layer":
            y, mean, invstd = bnpy.layer_norm_forward(x, self.size, gamma, beta, eps=eps, out=out)
        elif self.kind == "rms":
            y, invstd = bnpy.rms_norm_forward(x, self.size, gamma, eps=eps, out=out)
            mean = None
        elif self.kind == "group":
            y, mean, invstd = bnpy.group_norm_forward(
                x, self.size, gamma, beta, eps=eps, axis=self.axis, out=out
            )
        else:
            y, mean, invstd = bnpy.instance_norm_forward(
                x, gamma, beta, eps=eps, axis=self.axis, out=out
            )
        return y, None if mean is None else mean.reshape(-1), invstd.reshape(-1)

    def backward(self, dy: Any, x: Any, gamma: Any, mean: Any, invstd: Any, out: Any = None) -> Any:
        """(dx, dgamma, dbeta or None) from forward()'s flat mean and invstd"""
        if self.kind in ("layer", "rms"):
            lead = np.shape(x)[: np.ndim(x) - len(self.normalized)]
        else:
            lead = (np.shape(x)[0], self.groups)
        invstd = np.reshape(invstd, lead)
        if self.kind == "rms":
            dx, dgamma = bnpy.rms_norm_backward(dy, x, self.size, gamma, invstd, out=out)
            return dx, dgamma, None
        mean = np.reshape(mean, lead)
        if self.kind == "layer":
            return bnpy.layer_norm_backward(dy, x, self.size, gamma, mean, invstd, out=out)
        if self.kind == "group":
            return bnpy.group_norm_backward(
                dy, x, self.size, gamma, mean, invstd, axis=self.axis, out=out
            )
        return bnpy.instance_norm_backward(dy, x, gamma, mean, invstd, axis=self.axis, out=out)

    # -- PyTorch --

    def torch_module(self, torch: Any, eps: Any) -> Any:
        """the float64 PyTorch module, for data in to_torch()'s layout"""
        f64 = torch.float64
        if self.kind == "layer":
            return torch.nn.LayerNorm(
                self.normalized, eps=eps, elementwise_affine=self.affine, bias=self.bias, dtype=f64
            )
        if self.kind == "rms":
            return torch.nn.RMSNorm(
                self.normalized, eps=eps, elementwise_affine=self.affine, dtype=f64
            )
        if self.kind == "group":
            return torch.nn.GroupNorm(
                self.size, self.channels, eps=eps, affine=self.affine, dtype=f64
            )
        cls = {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d, 5: torch.nn.InstanceNorm3d}
        return cls[len(self.shape)](
            self.channels,
            eps=eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track,
            dtype=f64,
        )


def torch_step(torch: Any, spec: Spec, module: Any, x: Any, dy: Any) -> tuple[Any, ...]:
    """(y, dx, dgamma, dbeta) of the float64 module for x and dy, in x's layout
    (None for a parameter the module lacks)"""
    module.zero_grad(set_to_none=True)
    xt = torch.tensor(spec.to_torch(np.asarray(x, np.float64)), requires_grad=True)
    yt = module(xt)
    yt.backward(torch.tensor(spec.to_torch(np.asarray(dy, np.float64))))
    grads = []
    for name in ("weight", "bias"):
        param = getattr(module, name, None)
        grads.append(None if param is None else param.grad.numpy().copy())
    return (spec.from_torch(yt.detach().numpy()), spec.from_torch(xt.grad.numpy()), *grads)


def exact_rows(x: Any, dy: Any, gamma: Any, beta: Any, eps: float, centered: bool) -> dict:
    """The reference in rationals for rows (rows, n) of float64 x and dy, with
    gamma and beta given per value (rows, n): mean and variance as Fractions,
    the square root in 60-digit decimals, each result rounded once to float64.

    Returns y, dx and xhat (rows, n), and mean and invstd per row; dx is that
    of centered (layer, group, instance) or RMS normalization."""
    rows, n = x.shape
    result = {k: np.empty(x.shape) for k in ("y", "dx", "xhat")}
    result["mean"], result["invstd"] = np.empty(rows), np.empty(rows)
    with localcontext() as ctx:
        ctx.prec = 60

        def dec(f: Fraction) -> Decimal:
            return Decimal(f.numerator) / Decimal(f.denominator)

        for r in range(rows):
            values = [Fraction(float(v)) for v in x[r]]
            mean = sum(values, Fraction(0)) / n if centered else Fraction(0)
            var = sum(((v - mean) ** 2 for v in values), Fraction(0)) / n  # RMS: mean square
            invstd = 1 / dec(var + Fraction(eps)).sqrt()
            xhat = [dec(v - mean) * invstd for v in values]
            g_dy = [Decimal(float(gamma[r, i])) * Decimal(float(dy[r, i])) for i in range(n)]
            a = sum(g_dy) / n if centered else Decimal(0)
            b = sum(p * q for p, q in zip(g_dy, xhat)) / n
            for i in range(n):
                result["y"][r, i] = float(
                    Decimal(float(gamma[r, i])) * xhat[i] + Decimal(float(beta[r, i]))
                )
                result["dx"][r, i] = float(invstd * (g_dy[i] - a - xhat[i] * b))
                result["xhat"][r, i] = float(xhat[i])
            result["mean"][r], result["invstd"][r] = float(mean), float(invstd)
    return result
