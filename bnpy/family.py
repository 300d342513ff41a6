"""BatchNorm's siblings: layer, group, instance and RMS normalization.

    ln = bnpy.LayerNorm(768)                  # each sample over its last axis
    gn = bnpy.GroupNorm(32, 256)              # each sample over groups of 8 channels
    inorm = bnpy.InstanceNorm(64)             # each sample and channel over its pixels
    rms = bnpy.RMSNorm(768)                   # divides by the root mean square only
    y = ln(x); dx = ln.backward(dy)           # and ln.grad_gamma, ln.grad_beta

Where BatchNorm averages each feature over the batch, these average each
sample on its own: over its last axes (layer), over a group of channels and
every position (group), over one channel's positions (instance). The batch
plays no part, so they behave the same at any batch size and in eval mode.

All run on the core's row kernels (bn_rows_* in csrc/core/bn.h): x is laid
out as rows of the values that share statistics, each row's mean and
variance summed in double about a shift (exact on data offset by 1e8), and
results are bitwise the same at any thread count and in every build. A row
is runs of values that share a gamma and a beta: one value each for layer
norm, a channel's positions for group and instance norm.

The functional forms (layer_norm_forward, ...) keep no state: x decides the
dtype (float32 and float64 stay, any other real dtype computes in float64).
The layers convert x to their dtype and keep what backward needs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import IncompatibleKeys

__all__ = [
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "RMSNorm",
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
    "group_norm_forward",
    "group_norm_backward",
    "instance_norm_forward",
    "instance_norm_backward",
]

_Array = npt.NDArray[Any]

# ---- checks -----------------------------------------------------------------


def _is_half(dtype: np.dtype[Any]) -> bool:
    """float16, or ml_dtypes' bfloat16: read and written in their own format,
    with parameters in float32"""
    return dtype == np.float16 or (dtype.name == "bfloat16" and dtype.itemsize == 2)


def _param_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """the dtype of gamma, beta and their gradients for data of dtype"""
    return np.dtype(np.float32) if _is_half(dtype) else dtype


def _real_array(value: Any, name: str, dtype: Any = None) -> _Array:
    """value as an ndarray of real numbers (in dtype when given, else float32,
    float64 or a half as its own dtype decides), or TypeError naming it."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name} must not be a masked array: its mask would be ignored")
    array = np.asarray(value)
    if array.dtype.kind not in "biuf" and not _is_half(array.dtype):
        raise TypeError(f"{name} must hold real numbers, got an array of dtype {array.dtype!r}")
    if dtype is None:
        kept = array.dtype == np.float32 or _is_half(array.dtype)
        dtype = array.dtype if kept else np.float64
    return np.asarray(array, dtype=dtype)


def _layer_dtype(dtype: Any) -> np.dtype[Any]:
    try:
        resolved: np.dtype[Any] | None = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return resolved


def _eps(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(value).__name__}")
    eps = float(value)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {value!r}")
    return eps


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _normalized_shape(value: Any) -> tuple[int, ...]:
    """An int or a sequence of positive ints, as a tuple."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(
            f"normalized_shape must be a positive int or a non-empty tuple of them, got {value!r}"
        )
    return tuple(_count(v, "normalized_shape's every entry") for v in value)


def _channel_axis(axis: Any, ndim: int) -> int:
    """axis resolved for x of ndim >= 2 dimensions; axis 0 is the batch."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if ndim < 2:
        raise ValueError(f"x must have a batch axis and a channel axis, got {ndim} dimensions")
    resolved = int(axis) + ndim if axis < 0 else int(axis)
    if not 1 <= resolved < ndim:
        raise ValueError(
            f"axis {axis} is not a channel axis of x with {ndim} dimensions (axis 0 is the batch)"
        )
    return resolved


def _vector(value: Any, shape: tuple[int, ...], dtype: Any, name: str) -> _Array | None:
    """None, or value as a C-contiguous array of shape in dtype."""
    if value is None:
        return None
    array = _real_array(value, name, dtype)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got shape {array.shape}")
    return np.ascontiguousarray(array)


def _state_vector(value: Any, shape: tuple[int, ...], dtype: Any, name: str) -> _Array:
    """value as a new array of shape in dtype for the layer's state, or
    ValueError unless every value is finite in dtype (and, for a variance,
    non-negative), as bnpy.BatchNorm checks its own"""
    array = _vector(value, shape, dtype, name)
    assert array is not None
    with np.errstate(over="ignore", invalid="ignore"):
        array = array.astype(dtype, copy=True)
    variance = name == "running_var"
    bad = ~np.isfinite(array) | ((array < 0) if variance else False)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        what = "finite and non-negative" if variance else "finite"
        raise ValueError(f"{name} must be {what}, got {array.reshape(-1)[index]} at index {index}")
    return array


def _check_out(
    out: Any, shape: tuple[int, ...], dtype: np.dtype[Any], inputs: list[_Array]
) -> None:
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(
            f"out must have shape {shape} and dtype {dtype}, got shape "
            f"{out.shape} and dtype {out.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    for array in inputs:
        if np.shares_memory(out, array) and not (
            out.__array_interface__["data"][0] == array.__array_interface__["data"][0]
            and out.strides == array.strides
        ):
            raise ValueError("out partly overlaps an input; it may be x itself or separate memory")


# ---- rows: how x lies for the kernels ------------------------------------------


class _Rows:
    """x laid out as rows of n values that share statistics, in a working
    layout: x itself for layer and RMS norm; for group and instance norm,
    channels-first (the channel axis `move` moved to 1, when it is not
    there), where a sample's group of channels is contiguous. A row is runs
    of `spread` values, each a channel with its own gamma and beta; row r's
    channels start at (r % period) * n / spread. gamma and beta have the
    shape `params`; the statistics, one per row, the shape `lead`."""

    def __init__(
        self,
        shape: tuple[int, ...],
        n: int,
        spread: int,
        period: int,
        move: int | None,
        params: tuple[int, ...],
        lead: tuple[int, ...],
    ):
        self.n, self.spread, self.period, self.move = n, spread, period, move
        self.params, self.lead = params, lead
        self.rows = math.prod(shape) // n if n else 0
        self.channels = period * n // spread if n else 0

    def parameters(self, dtype: Any, *values: Any) -> list[_Array | None]:
        """gamma (and beta) given to a functional form, checked and converted"""
        dtype = _param_dtype(np.dtype(dtype))
        return [_vector(v, self.params, dtype, name) for v, name in zip(values, ("gamma", "beta"))]

    def statistics(self, moments: _Array) -> tuple[_Array, _Array]:
        """the kernels' moments (3, rows) as mean and invstd of shape lead"""
        return moments[0].reshape(self.lead), moments[1].reshape(self.lead)

    def to_work(self, array: _Array) -> _Array:
        """array (of x's shape) in the working layout, C-contiguous"""
        return np.ascontiguousarray(
            array if self.move is None else np.moveaxis(array, self.move, 1)
        )

    def from_work(self, array: _Array) -> _Array:
        return array if self.move is None else np.moveaxis(array, 1, self.move)

    def target(self, out: _Array | None) -> _Array | None:
        """out in the working layout, when the kernels can write it there"""
        if out is None:
            return None
        view = out if self.move is None else np.moveaxis(out, self.move, 1)
        return view if view.flags.c_contiguous else None

    def kernel_args(self) -> tuple[int, int, int]:
        return self.n, self.spread, self.period


def _layer_rows(shape: tuple[int, ...], normalized: tuple[int, ...]) -> _Rows:
    k = len(normalized)
    if len(shape) < k or tuple(shape[len(shape) - k :]) != normalized:
        raise ValueError(
            f"x's last axes must have the normalized shape {normalized}, got x of shape {shape}"
        )
    lead = shape[: len(shape) - k]
    return _Rows(shape, math.prod(normalized), 1, 1, None, normalized, lead)


def _group_rows(shape: tuple[int, ...], groups: int, axis: Any) -> _Rows:
    axis = _channel_axis(axis, len(shape))
    channels = shape[axis]
    if channels % groups != 0:
        raise ValueError(
            f"x has {channels} channels on axis {axis}, which {groups} groups do not divide"
        )
    positions = math.prod(d for i, d in enumerate(shape) if i not in (0, axis))
    if positions == 0 or channels == 0:
        raise ValueError(f"x of shape {shape} has no values to normalize over")
    move = None if axis == 1 else axis
    n = channels // groups * positions
    return _Rows(shape, n, positions, groups, move, (channels,), (shape[0], groups))


def _finish(result: _Array, rows: _Rows, out: _Array | None, target: _Array | None) -> _Array:
    """the kernel's result in x's layout: out when given (written by the
    kernel when it was the target, else copied there)"""
    if out is None:
        return rows.from_work(result)
    if target is None:
        np.copyto(out, rows.from_work(result))
    return out


# ---- the kernels on rows ---------------------------------------------------------


def _forward(
    x: _Array,
    rows: _Rows,
    gamma: _Array | None,
    beta: _Array | None,
    eps: float,
    centered: bool,
    out: _Array | None,
) -> tuple[_Array, _Array]:
    """(y in x's layout, moments (3, rows): the rows' means, invstds and
    biased variances)"""
    _check_out(out, x.shape, x.dtype, [x])
    xw, target = rows.to_work(x), rows.target(out)
    if rows.rows == 0:
        return _finish(np.empty_like(xw), rows, out, None), np.empty((3, 0))
    gamma = np.ones(rows.channels, _param_dtype(x.dtype)) if gamma is None else gamma
    beta = np.zeros(rows.channels, _param_dtype(x.dtype)) if beta is None else beta
    y, moments = _core._rows_forward(xw, gamma, beta, *rows.kernel_args(), eps, centered, target)
    return _finish(y, rows, out, target), moments


def _backward(
    dy: _Array,
    x: _Array,
    rows: _Rows,
    gamma: _Array | None,
    moments: _Array,
    centered: bool,
    out: _Array | None,
) -> tuple[_Array, _Array]:
    """(dx in x's layout, (2, channels): the sums of dy * xhat and of dy over
    each channel's values)"""
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {x.shape}, got shape {dy.shape}")
    _check_out(out, x.shape, x.dtype, [x, dy])
    xw, dyw, target = rows.to_work(x), rows.to_work(dy), rows.target(out)
    if rows.rows == 0:
        return _finish(np.empty_like(xw), rows, out, None), np.zeros((2, rows.channels))
    moments = np.ascontiguousarray(moments[:2], dtype=np.float64)  # mean, invstd
    gamma = np.ones(rows.channels, _param_dtype(x.dtype)) if gamma is None else gamma
    dx, grads = _core._rows_backward(dyw, xw, gamma, moments, *rows.kernel_args(), centered, target)
    return _finish(dx, rows, out, target), grads


def _moments_of(mean: Any, invstd: Any, lead: tuple[int, ...]) -> _Array:
    """(2, rows) float64 from user-given mean and invstd of shape lead"""
    arrays = []
    for value, name in ((mean, "mean"), (invstd, "invstd")):
        array = _real_array(value, name, np.float64)
        if array.shape != lead:
            raise ValueError(f"{name} must have shape {lead}, got shape {array.shape}")
        arrays.append(array.reshape(-1))
    return np.stack(arrays)


# ---- functional forms ------------------------------------------------------------


def layer_norm_forward(
    x: npt.ArrayLike,
    normalized_shape: int | Sequence[int],
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    out: _Array | None = None,
) -> tuple[_Array, _Array, _Array]:
    """(y, mean, invstd): x normalized over its last len(normalized_shape) axes,
    y = gamma * (x - mean) * invstd + beta, invstd = 1 / sqrt(var + eps) with
    the biased variance. mean and invstd (float64) have x's leading shape."""
    xa = _real_array(x, "x")
    rows = _layer_rows(xa.shape, _normalized_shape(normalized_shape))
    g, b = rows.parameters(xa.dtype, gamma, beta)
    y, moments = _forward(xa, rows, g, b, _eps(eps), True, out)
    return (y, *rows.statistics(moments))


def layer_norm_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    normalized_shape: int | Sequence[int],
    gamma: npt.ArrayLike | None,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    *,
    out: _Array | None = None,
) -> tuple[_Array, _Array, _Array]:
    """(dx, dgamma, dbeta) for upstream gradient dy, with the mean and invstd
    layer_norm_forward gave; dgamma and dbeta have the normalized shape."""
    xa = _real_array(x, "x")
    rows = _layer_rows(xa.shape, _normalized_shape(normalized_shape))
    return _functional_backward(dy, xa, rows, gamma, mean, invstd, True, out)


def rms_norm_forward(
    x: npt.ArrayLike,
    normalized_shape: int | Sequence[int],
    gamma: npt.ArrayLike | None = None,
    *,
    eps: float | None = None,
    out: _Array | None = None,
) -> tuple[_Array, _Array]:
    """(y, invstd): y = gamma * x * invstd, invstd = 1 / sqrt(mean(x**2) + eps)
    over the last len(normalized_shape) axes; eps None is the machine epsilon
    of x's dtype, or of float32 for half x (as PyTorch's)."""
    xa = _real_array(x, "x")
    rows = _layer_rows(xa.shape, _normalized_shape(normalized_shape))
    (g,) = rows.parameters(xa.dtype, gamma)
    eps = float(np.finfo(_param_dtype(xa.dtype)).eps) if eps is None else _eps(eps)
    y, moments = _forward(xa, rows, g, None, eps, False, out)
    return y, rows.statistics(moments)[1]


def rms_norm_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    normalized_shape: int | Sequence[int],
    gamma: npt.ArrayLike | None,
    invstd: npt.ArrayLike,
    *,
    out: _Array | None = None,
) -> tuple[_Array, _Array]:
    """(dx, dgamma) for upstream gradient dy, with rms_norm_forward's invstd."""
    xa = _real_array(x, "x")
    rows = _layer_rows(xa.shape, _normalized_shape(normalized_shape))
    mean = np.zeros(rows.lead)  # RMS norm subtracts nothing
    dx, dgamma, _ = _functional_backward(dy, xa, rows, gamma, mean, invstd, False, out)
    return dx, dgamma


def group_norm_forward(
    x: npt.ArrayLike,
    num_groups: int,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    out: _Array | None = None,
) -> tuple[_Array, _Array, _Array]:
    """(y, mean, invstd): each sample's channels (along axis; axis 0 is the
    batch) cut into num_groups groups of consecutive channels, each group
    normalized over its channels and every position; gamma and beta are per
    channel. mean and invstd (float64) have shape (N, num_groups)."""
    xa = _real_array(x, "x")
    rows = _group_rows(xa.shape, _count(num_groups, "num_groups"), axis)
    g, b = rows.parameters(xa.dtype, gamma, beta)
    y, moments = _forward(xa, rows, g, b, _eps(eps), True, out)
    return (y, *rows.statistics(moments))


def group_norm_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    num_groups: int,
    gamma: npt.ArrayLike | None,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    *,
    axis: int = 1,
    out: _Array | None = None,
) -> tuple[_Array, _Array, _Array]:
    """(dx, dgamma, dbeta) for upstream gradient dy, with group_norm_forward's
    mean and invstd; dgamma and dbeta are per channel."""
    xa = _real_array(x, "x")
    rows = _group_rows(xa.shape, _count(num_groups, "num_groups"), axis)
    return _functional_backward(dy, xa, rows, gamma, mean, invstd, True, out)


def _functional_backward(
    dy: npt.ArrayLike,
    x: _Array,
    rows: _Rows,
    gamma: npt.ArrayLike | None,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    centered: bool,
    out: _Array | None,
) -> tuple[_Array, _Array, _Array]:
    """(dx, dgamma, dbeta) of a functional form, the gradients in gamma's
    dtype (x's, or float32 for half x) and shape"""
    (g,) = rows.parameters(x.dtype, gamma)
    moments = _moments_of(mean, invstd, rows.lead)
    dx, grads = _backward(_real_array(dy, "dy", x.dtype), x, rows, g, moments, centered, out)
    grads = grads.reshape(2, *rows.params).astype(_param_dtype(x.dtype))
    return dx, grads[0], grads[1]


def instance_norm_forward(
    x: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    out: _Array | None = None,
) -> tuple[_Array, _Array, _Array]:
    """(y, mean, invstd): each sample's every channel normalized over its
    positions (group norm with a group per channel); mean and invstd have
    shape (N, C)."""
    xa = _real_array(x, "x")
    channels = xa.shape[_channel_axis(axis, xa.ndim)]
    return group_norm_forward(xa, channels, gamma, beta, eps=eps, axis=axis, out=out)


def instance_norm_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    gamma: npt.ArrayLike | None,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    *,
    axis: int = 1,
    out: _Array | None = None,
) -> tuple[_Array, _Array, _Array]:
    """(dx, dgamma, dbeta) for upstream gradient dy, with
    instance_norm_forward's mean and invstd."""
    xa = _real_array(x, "x")
    channels = xa.shape[_channel_axis(axis, xa.ndim)]
    return group_norm_backward(dy, xa, channels, gamma, mean, invstd, axis=axis, out=out)


# ---- layers ------------------------------------------------------------------------


def _parameter(name: str, doc: str) -> Any:
    """gamma or beta: the layer's own array (None without one); setting copies
    the values in, checked as load_state_dict checks them"""

    def get(self: _Normalization) -> _Array | None:
        value: _Array | None = getattr(self, "_" + name)
        return value

    def set(self: _Normalization, value: npt.ArrayLike) -> None:
        current = getattr(self, "_" + name)
        if current is None:
            raise ValueError(f"cannot set {name}: the layer has none ({self._no_params})")
        np.copyto(current, _state_vector(value, current.shape, self.dtype, name))

    return property(get, set, doc=doc)


class _Normalization:
    """What the four layers share with bnpy.BatchNorm: forward(x, *, out=None)
    and layer(x), backward(dy, *, out=None) setting grad_gamma and grad_beta,
    train()/eval(), gamma and beta (weight and bias), state_dict and
    load_state_dict, pickle and repr."""

    _no_params = "affine=False"

    def __init__(self, shape: tuple[int, ...], eps: Any, dtype: Any, gamma: bool, beta: bool):
        self.dtype = _layer_dtype(dtype)
        self.eps = eps
        self.training = True
        self._gamma = np.ones(shape, self.dtype) if gamma else None
        self._beta = np.zeros(shape, self.dtype) if beta else None
        # None until the first backward, as bnpy.BatchNorm's
        self.grad_gamma: _Array | None = None
        self.grad_beta: _Array | None = None
        self._saved: tuple[Any, ...] | None = None  # what backward needs of the last forward

    @property
    def eps(self) -> float:
        """Added to the variance (or the mean square) before its root."""
        return self._eps

    @eps.setter
    def eps(self, value: Any) -> None:
        self._eps = _eps(value)

    gamma = _parameter("gamma", "The scale, one value per normalized feature (None without).")
    beta = _parameter("beta", "The offset, one value per normalized feature (None without).")
    weight = gamma  # PyTorch's names
    bias = beta

    def train(self, mode: bool = True) -> _Normalization:
        self.training = bool(mode)
        return self

    def eval(self) -> _Normalization:
        return self.train(False)

    def reset_parameters(self) -> None:
        """gamma to ones and beta to zeros"""
        for value, fill in ((self._gamma, 1), (self._beta, 0)):
            if value is not None:
                value.fill(fill)

    def __call__(self, x: npt.ArrayLike, *, out: _Array | None = None) -> _Array:
        return self.forward(x, out=out)

    def forward(self, x: npt.ArrayLike, *, out: _Array | None = None) -> _Array:
        """y for x, in the layer's dtype (a float32 layer keeps half x's);
        keeps what backward needs. out, when given, is a writable array of
        y's shape and dtype (it may be x)."""
        given = x if isinstance(x, np.ma.MaskedArray) else np.asarray(x)
        mixed = self.dtype == np.float32 and _is_half(given.dtype)  # halves stay halves
        xa = _real_array(given, "x", None if mixed else self.dtype)  # one conversion
        _check_out(out, xa.shape, xa.dtype, [xa])
        if out is not None and np.shares_memory(out, xa):
            xa = xa.copy()  # backward needs x after y overwrites it
        y, saved = self._forward(xa, out)
        self._saved = saved
        return y

    def backward(self, dy: npt.ArrayLike, *, out: _Array | None = None) -> _Array:
        """dx for the last forward and upstream gradient dy (of its input's
        shape); sets grad_gamma and grad_beta (overwritten, not accumulated)."""
        if self._saved is None:
            raise RuntimeError(
                "backward called before any forward: there is nothing to differentiate"
            )
        dya = _real_array(dy, "dy", self._saved[0].dtype)  # the saved x's
        dx, grads = self._backward(dya, out)
        if grads is not None and self._gamma is not None:
            self.grad_gamma = grads[0].reshape(self._gamma.shape).astype(self.dtype)
        if grads is not None and self._beta is not None:
            self.grad_beta = grads[1].reshape(self._beta.shape).astype(self.dtype)
        return dx

    # -- state --

    def _forward(self, x: _Array, out: _Array | None) -> tuple[_Array, tuple[Any, ...]]:
        """(y, what backward needs) for x in the layer's dtype"""
        raise NotImplementedError

    def _backward(self, dy: _Array, out: _Array | None) -> tuple[_Array, _Array | None]:
        """(dx, (2, ...) gradients of gamma and beta or None) for the saved forward"""
        raise NotImplementedError

    def _state_names(self) -> list[str]:
        return [name for name in ("gamma", "beta") if getattr(self, "_" + name) is not None]

    def state_dict(self) -> dict[str, Any]:
        """Copies of the parameters (and running statistics), by name."""
        return {name: self._state_value(name) for name in self._state_names()}

    def _state_value(self, name: str) -> Any:
        return np.array(getattr(self, "_" + name))

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:
        """Load what state_dict gave (PyTorch's weight and bias are read as
        gamma and beta). Every value is checked before any is written.
        Returns IncompatibleKeys(missing_keys, unexpected_keys); with strict,
        a missing or unexpected key raises ValueError and loads nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        aliases = {"weight": "gamma", "bias": "beta"}
        given = {aliases.get(k, k): v for k, v in state.items()}
        names = self._state_names()
        missing = [n for n in names if n not in given]
        unexpected = [k for k in state if aliases.get(k, k) not in names]
        if strict and (missing or unexpected):
            what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
            raise ValueError(f"state dict has {what} (strict=False loads the keys there are)")
        checked = {n: self._checked_state(n, given[n]) for n in names if n in given}
        for name, value in checked.items():
            self._load_checked(name, value)
        return IncompatibleKeys(missing, unexpected)

    def _checked_state(self, name: str, value: Any) -> Any:
        return _state_vector(value, getattr(self, "_" + name).shape, self.dtype, name)

    def _load_checked(self, name: str, value: Any) -> None:
        np.copyto(getattr(self, "_" + name), value)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles the configuration, state and mode, not the last forward."""
        state = dict(self.__dict__)
        state["_saved"] = None
        return state

    def _arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The constructor's arguments that make this layer again: (positional,
        by keyword), dtype last"""
        raise NotImplementedError

    def __repr__(self) -> str:
        positional, keywords = self._arguments()
        shown = [
            repr(a[0]) if isinstance(a, tuple) and len(a) == 1 else repr(a) for a in positional
        ]
        shown += [f"{k}={v!r}" for k, v in keywords.items()]
        return f"{type(self).__name__}({', '.join(shown)}, training={self.training})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles the configuration, state and mode, not the last forward."""
        positional, keywords = self._arguments()
        return (_rebuild, (type(self), positional, keywords), self.__getstate__())


class LayerNorm(_Normalization):
    """Layer normalization: each sample over its last len(normalized_shape) axes.

    LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    dtype=np.float32), as PyTorch's: gamma and beta have the normalized shape;
    bias=False leaves beta out. Training and eval mode compute the same.
    """

    _no_params = "elementwise_affine=False"

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.elementwise_affine, self._has_bias = bool(elementwise_affine), bool(bias)
        affine = self.elementwise_affine
        super().__init__(self.normalized_shape, eps, dtype, affine, affine and bool(bias))

    _centered = True

    def _forward(self, x: _Array, out: _Array | None) -> tuple[_Array, tuple[Any, ...]]:
        rows = _layer_rows(x.shape, self.normalized_shape)
        y, moments = _forward(x, rows, self._gamma, self._beta, self.eps, self._centered, out)
        return y, (x, rows, moments)

    def _backward(self, dy: _Array, out: _Array | None) -> tuple[_Array, _Array | None]:
        assert self._saved is not None
        x, rows, moments = self._saved
        return _backward(dy, x, rows, self._gamma, moments, self._centered, out)

    def _arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        keywords = dict(eps=self.eps, elementwise_affine=self.elementwise_affine)
        return (self.normalized_shape,), keywords | dict(bias=self._has_bias, dtype=self.dtype.name)


class RMSNorm(LayerNorm):
    """RMS normalization: y = gamma * x / sqrt(mean(x**2) + eps) over the last
    len(normalized_shape) axes; no mean is subtracted and there is no beta.

    RMSNorm(normalized_shape, eps=None, elementwise_affine=True,
    dtype=np.float32), as PyTorch's: eps None is the dtype's machine epsilon.
    """

    _centered = False

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__(normalized_shape, 1.0, elementwise_affine, False, dtype)
        self.eps = eps  # None: the dtype's machine epsilon (the setter resolves it)

    @property
    def eps(self) -> float:
        """Added to the mean square before its root; None (given or set) is the
        dtype's machine epsilon."""
        return self._eps

    @eps.setter
    def eps(self, value: Any) -> None:
        self._eps_given = value
        self._eps = float(np.finfo(self.dtype).eps) if value is None else _eps(value)

    def _arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        keywords = dict(eps=self._eps_given, elementwise_affine=self.elementwise_affine)
        return (self.normalized_shape,), keywords | dict(dtype=self.dtype.name)


class GroupNorm(_Normalization):
    """Group normalization: each sample's channels in num_groups groups of
    consecutive channels, each group normalized over its channels and every
    position.

    GroupNorm(num_groups, num_channels, eps=1e-5, affine=True, axis=1,
    dtype=np.float32): gamma and beta are per channel; x has the batch on
    axis 0 and the channels on `axis` (PyTorch: 1; -1 for channels-last).
    Training and eval mode compute the same.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        axis: int = 1,
        dtype: Any = np.float32,
    ) -> None:
        self.num_groups = _count(num_groups, "num_groups")
        self.num_channels = _count(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_groups {num_groups} must divide num_channels {num_channels}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or axis == 0:
            raise ValueError(f"axis must be a nonzero int (axis 0 is the batch), got {axis!r}")
        self.axis: int = int(axis)
        self.affine: bool = bool(affine)
        super().__init__((self.num_channels,), eps, dtype, self.affine, self.affine)

    def _rows(self, x: _Array) -> _Rows:
        if x.ndim < 2 or x.shape[_channel_axis(self.axis, x.ndim)] != self.num_channels:
            raise ValueError(
                f"expected {self.num_channels} channels on axis {self.axis}, got input of shape {x.shape}"
            )
        return _group_rows(x.shape, self.num_groups, self.axis)

    def _forward(self, x: _Array, out: _Array | None) -> tuple[_Array, tuple[Any, ...]]:
        rows = self._rows(x)
        y, moments = _forward(x, rows, self._gamma, self._beta, self.eps, True, out)
        return y, (x, rows, moments)

    def _backward(self, dy: _Array, out: _Array | None) -> tuple[_Array, _Array | None]:
        assert self._saved is not None
        x, rows, moments = self._saved
        return _backward(dy, x, rows, self._gamma, moments, True, out)

    def _arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        keywords = dict(eps=self.eps, affine=self.affine, axis=self.axis, dtype=self.dtype.name)
        return (self.num_groups, self.num_channels), keywords


def _rebuild(
    cls: type[_Normalization], positional: tuple[Any, ...], keywords: dict[str, Any]
) -> _Normalization:
    return cls(*positional, **keywords)


def _momentum(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"momentum must be a real number or None, got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {value!r}")
    return float(value)


class InstanceNorm(GroupNorm):
    """Instance normalization: each sample's every channel over its positions.

    InstanceNorm(num_features, eps=1e-5, momentum=0.1, affine=False,
    track_running_stats=False, axis=1, dtype=np.float32), as PyTorch's
    InstanceNorm1d/2d/3d in one. With track_running_stats, training updates
    running_mean and running_var with the mean over the batch of each
    instance's mean and unbiased variance (PyTorch's rule; momentum None: a
    cumulative average over num_batches_tracked forwards), and eval mode
    normalizes with them.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        axis: int = 1,
        dtype: Any = np.float32,
    ) -> None:
        _count(num_features, "num_features")
        super().__init__(num_features, num_features, eps, affine, axis, dtype)
        self.num_features = self.num_channels
        self.momentum = momentum
        self.track_running_stats = bool(track_running_stats)
        tracked = self.track_running_stats
        self._running_mean = np.zeros(num_features, self.dtype) if tracked else None
        self._running_var = np.ones(num_features, self.dtype) if tracked else None
        self.num_batches_tracked = 0

    @property
    def momentum(self) -> float | None:
        """The new batch's weight in the running statistics; None: a cumulative
        average."""
        return self._momentum

    @momentum.setter
    def momentum(self, value: Any) -> None:
        self._momentum = _momentum(value)

    running_mean = _parameter("running_mean", "Running mean per channel (None unless tracked).")
    running_var = _parameter(
        "running_var", "Running unbiased variance per channel (None unless tracked)."
    )

    def reset_running_stats(self) -> None:
        if self._running_mean is not None and self._running_var is not None:
            self._running_mean.fill(0)
            self._running_var.fill(1)
            self.num_batches_tracked = 0

    def _state_names(self) -> list[str]:
        names = super()._state_names()
        return names + (
            ["running_mean", "running_var", "num_batches_tracked"]
            if self.track_running_stats
            else []
        )

    def _state_value(self, name: str) -> Any:
        if name == "num_batches_tracked":
            return self.num_batches_tracked
        return super()._state_value(name)

    def _checked_state(self, name: str, value: Any) -> Any:
        if name != "num_batches_tracked":
            return super()._checked_state(name, value)
        count = np.asarray(value)
        if count.shape != () or count.dtype.kind not in "iu" or int(count) < 0:
            raise ValueError(f"num_batches_tracked must be a non-negative integer, got {value!r}")
        return int(count)

    def _load_checked(self, name: str, value: Any) -> None:
        if name == "num_batches_tracked":
            self.num_batches_tracked = value
        else:
            super()._load_checked(name, value)

    def _forward(self, x: _Array, out: _Array | None) -> tuple[_Array, tuple[Any, ...]]:
        """saves (x, rows, moments), or in eval mode with running statistics
        (x, None, (mean, invstd)) of those"""
        rows = self._rows(x)
        if not self.training and self._running_mean is not None:
            return self._forward_running(x, out), (x, None, self._running_moments())
        if self.training and rows.n == 1 and rows.rows > 0:
            raise ValueError(
                f"expected more than 1 value per channel when training, got input of shape {x.shape}"
            )
        update = self.training and self._running_mean is not None and rows.rows > 0
        y, moments = _forward(
            x, rows, self._gamma, self._beta, self.eps, True, None if update else out
        )
        if update:
            self._update_running(moments, rows.n)  # raises before anything changes
            if out is not None:
                np.copyto(out, y)
                y = out
        return y, (x, rows, moments)

    def _update_running(self, moments: _Array, count: int) -> None:
        """running statistics <- momentum's step towards the batch's mean of
        each instance's mean and unbiased variance"""
        assert self._running_mean is not None and self._running_var is not None
        channels = self.num_channels
        mean = moments[0].reshape(-1, channels).mean(axis=0)
        var = moments[2] * (count / (count - 1))
        var = var.reshape(-1, channels).mean(axis=0)
        tracked = self.num_batches_tracked + 1
        step = 1.0 / tracked if self.momentum is None else self.momentum
        with np.errstate(over="ignore", invalid="ignore"):
            # in double, rounded once to the layer's dtype (a float32 array
            # times a Python float stays float32 in NumPy)
            old_mean = self._running_mean.astype(np.float64)
            old_var = self._running_var.astype(np.float64)
            new_mean = ((1 - step) * old_mean + step * mean).astype(self.dtype)
            new_var = ((1 - step) * old_var + step * var).astype(self.dtype)
        if not (np.isfinite(new_mean).all() and np.isfinite(new_var).all()):
            raise FloatingPointError(
                "the running statistics would not be finite in "
                f"{self.dtype.name}: x has non-finite values or values too large"
            )
        self._running_mean[...] = new_mean
        self._running_var[...] = new_var
        self.num_batches_tracked = tracked

    def _running_moments(self) -> tuple[_Array, _Array]:
        assert self._running_mean is not None and self._running_var is not None
        mean = self._running_mean.astype(np.float64)
        return mean, 1.0 / np.sqrt(self._running_var.astype(np.float64) + self.eps)

    def _forward_running(self, x: _Array, out: _Array | None) -> _Array:
        assert self._running_mean is not None and self._running_var is not None
        if out is not None and not (out.flags.c_contiguous and out.flags.aligned):
            np.copyto(out, self._forward_running(x, None))  # the kernels write dense arrays
            return out
        y: _Array = _core.batch_norm_inference(
            x,
            self._gamma,
            self._beta,
            self._running_mean,
            self._running_var,
            eps=self.eps,
            axis=self.axis,
            out=out,
        )
        return y

    def _backward(self, dy: _Array, out: _Array | None) -> tuple[_Array, _Array | None]:
        assert self._saved is not None
        x, rows, moments = self._saved
        if rows is not None:
            return super()._backward(dy, out)
        mean, invstd = moments  # the running statistics: constants
        if dy.shape != x.shape:
            raise ValueError(f"dy must have the shape of x {x.shape}, got shape {dy.shape}")
        _check_out(out, x.shape, x.dtype, [x, dy])
        dense = out is None or (out.flags.c_contiguous and out.flags.aligned)
        dx, dgamma, dbeta = _core.batch_norm_backward(
            dy,
            x,
            self._gamma,
            mean,
            invstd,
            axis=self.axis,
            training=False,
            out=out if dense else None,
        )
        if out is not None and not dense:
            np.copyto(out, dx)
            dx = out
        return dx, None if dgamma is None or dbeta is None else np.stack([dgamma, dbeta])

    def _arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        keywords = dict(eps=self.eps, momentum=self.momentum, affine=self.affine)
        keywords |= dict(track_running_stats=self.track_running_stats, axis=self.axis)
        return (self.num_features,), keywords | dict(dtype=self.dtype.name)
