"""bnpy.nn: just enough neural network, in plain NumPy, to experiment with batch norm.

Every layer has ``forward(x)`` (also ``layer(x)``), ``backward(dy)`` returning
dx for the last forward, ``train()``/``eval()`` and ``parameters()``, a list of
``(param, grad)`` array pairs. A :class:`bnpy.BatchNorm` has the same methods
(its gamma and beta are its parameters) and goes into a :class:`Sequential` as
it is; so do bnpy.LayerNorm, GroupNorm, InstanceNorm and RMSNorm::

    import numpy as np, bnpy
    from bnpy import nn
    from bnpy.data import spirals

    x, labels = spirals(300, rng=0)
    model = nn.Sequential(nn.Linear(2, 64, rng=0), bnpy.BatchNorm(64), nn.Tanh(),
                          nn.Linear(64, 3, rng=1))
    optimizer = nn.SGD(model, lr=0.5)
    for step in range(200):
        loss, dlogits = nn.softmax_cross_entropy(model(x), labels)
        model.backward(dlogits)
        optimizer.step()

Gradients are overwritten by each backward, never accumulated (as in
bnpy.BatchNorm), so there is no ``zero_grad``. :func:`mlp` builds the deep
networks of the notebooks; :func:`fit` is the loop above with random
mini-batches; :func:`preactivations`, :func:`batch_std` and
:func:`weight_gradient_norms` measure what the notebooks plot;
:func:`recalibrate` gives every BatchNorm of a trained model the exact
statistics of a data set. :class:`RNN` and :class:`LastStep` make a small
recurrent network of (N, T, features) sequences, with a normalization layer
at every step.
"""

import copy
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from ._core import BatchNorm
from .fold import fold

Array = npt.NDArray[Any]  # a float32 or float64 array
# (param, grad) pairs: grad is None before the first backward
Parameters = list[tuple[Array, Array | None]]

__all__ = [
    "Layer",
    "Linear",
    "ReLU",
    "Tanh",
    "Sigmoid",
    "Conv2d",
    "MaxPool2d",
    "Flatten",
    "RNN",
    "LastStep",
    "Sequential",
    "SGD",
    "fold_model",
    "softmax_cross_entropy",
    "accuracy",
    "mlp",
    "fit",
    "linear_layers",
    "preactivations",
    "batch_std",
    "weight_gradient_norms",
    "recalibrate",
]


def _as_float_array(x: npt.ArrayLike) -> Array:
    """x as a floating-point array: float inputs keep their dtype, others become float64."""
    array = np.asarray(x)
    if array.dtype.kind == "f":
        return array
    if array.dtype.kind in "biu":  # booleans, signed and unsigned integers
        return array.astype(np.float64)
    raise TypeError(f"expected an array of real numbers, got dtype {array.dtype}")


def _float_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    """np.dtype for float32 or float64 (as a type, a string or a dtype); ValueError otherwise."""
    try:
        result = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if result not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {result}")
    return result


def _positive_int(name: str, value: Any, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


def _normal_weights(
    shape: tuple[int, ...], fan_in: int, weight_scale: float, dtype: np.dtype[Any], rng: Any
) -> Array:
    """Weights drawn from N(0, weight_scale**2 / fan_in), in dtype."""
    if not (np.isfinite(weight_scale) and weight_scale >= 0):
        raise ValueError(f"weight_scale must be a finite number >= 0, got {weight_scale!r}")
    std = weight_scale / np.sqrt(fan_in)
    weights: Array = (np.random.default_rng(rng).standard_normal(shape) * std).astype(dtype)
    return weights


class Layer:
    """What every bnpy.nn layer has: a mode, ``layer(x)``, no parameters by default."""

    training = True

    def forward(self, x: npt.ArrayLike) -> Array:
        raise NotImplementedError

    def backward(self, dy: npt.ArrayLike) -> Array:
        raise NotImplementedError

    def __call__(self, x: npt.ArrayLike) -> Array:
        return self.forward(x)

    def train(self, mode: bool = True) -> "Layer":
        """Set training mode (eval mode when mode is False); return the layer."""
        self.training = bool(mode)
        return self

    def eval(self) -> "Layer":
        """Set eval (inference) mode; return the layer."""
        return self.train(False)

    def parameters(self) -> Parameters:
        """A list of (param, grad) pairs; grad is None before the first backward."""
        return []

    def _saved(self, saved: Array | None, dy: npt.ArrayLike) -> tuple[Array, Array]:
        """The array forward saved, and dy checked against its shape."""
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before any forward")
        grad = _as_float_array(dy)
        if grad.shape != saved.shape:
            raise ValueError(
                f"dy has shape {grad.shape}, but the last forward's output has shape {saved.shape}"
            )
        return saved, grad

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Weighted(Layer):
    """A layer with a weight and an optional bias (None), and their gradients."""

    weight: Array
    bias: Array | None
    grad_weight: Array | None
    grad_bias: Array | None
    dtype: np.dtype[Any]

    def parameters(self) -> Parameters:
        pairs: Parameters = [(self.weight, self.grad_weight)]
        if self.bias is not None:
            pairs.append((self.bias, self.grad_bias))
        return pairs

    def fold_batch_norm(self, bn: BatchNorm) -> "_Weighted":
        """Fold bn, an eval-mode BatchNorm of this layer's output, into weight and
        bias (bnpy.fold), in place: the layer alone then computes what the pair did.
        A layer without bias gets one; the gradients are reset. Returns the layer."""
        weight, bias = fold(bn, self.weight, self.bias, out_axis=0)
        self.weight = weight.astype(self.dtype, copy=False)
        self.bias = bias.astype(self.dtype, copy=False)
        self.grad_weight = self.grad_bias = None
        return self


class Linear(_Weighted):
    """y = x @ weight.T + bias, over the last axis of x.

    weight has shape (out_features, in_features) and is drawn from
    N(0, weight_scale**2 / in_features): weight_scale=1 keeps the variance of
    a unit-variance input, larger values make the network's signal grow with
    depth, smaller ones make it shrink. bias starts at zero (None when
    bias=False). rng is a seed or a numpy Generator. Inputs are converted to
    the layer's dtype and kept, without a copy, for backward (as BatchNorm
    does: do not modify it in place in between). grad_weight and grad_bias are
    None until a backward, then hold the gradients of the last backward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        weight_scale: float = 1.0,
        dtype: npt.DTypeLike = np.float32,
        rng: Any = None,
    ) -> None:
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.dtype = _float_dtype(dtype)
        self.weight = _normal_weights(
            (out_features, in_features), in_features, weight_scale, self.dtype, rng
        )
        self.bias = np.zeros(out_features, self.dtype) if bias else None
        self.grad_weight = None
        self.grad_bias = None
        self._x: Array | None = None

    def forward(self, x: npt.ArrayLike) -> Array:
        inputs = np.asarray(_as_float_array(x), dtype=self.dtype)
        if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"expected {self.in_features} features on the last axis, "
                f"got input of shape {inputs.shape}"
            )
        y: Array = inputs @ self.weight.T
        if self.bias is not None:
            y += self.bias
        self._x = inputs
        return y

    def backward(self, dy: npt.ArrayLike) -> Array:
        if self._x is None:
            raise RuntimeError("Linear.backward called before any forward")
        grad = np.asarray(_as_float_array(dy), dtype=self.dtype)
        expected = self._x.shape[:-1] + (self.out_features,)
        if grad.shape != expected:
            raise ValueError(f"dy has shape {grad.shape}, expected {expected}")
        rows = grad.reshape(-1, self.out_features)
        self.grad_weight = rows.T @ self._x.reshape(-1, self.in_features)
        if self.bias is not None:
            self.grad_bias = rows.sum(axis=0)
        return grad @ self.weight

    def __repr__(self) -> str:
        return (
            f"Linear({self.in_features}, {self.out_features}, "
            f"bias={self.bias is not None}, dtype='{self.dtype}')"
        )


class ReLU(Layer):
    """y = max(x, 0); the gradient at 0 is taken as 0."""

    _x: Array | None = None

    def forward(self, x: npt.ArrayLike) -> Array:
        self._x = _as_float_array(x)
        return np.maximum(self._x, 0)

    def backward(self, dy: npt.ArrayLike) -> Array:
        x, grad = self._saved(self._x, dy)
        return grad * (x > 0)


class Tanh(Layer):
    """y = tanh(x); dy/dx = 1 - y**2."""

    _y: Array | None = None

    def forward(self, x: npt.ArrayLike) -> Array:
        self._y = np.tanh(_as_float_array(x))
        return self._y

    def backward(self, dy: npt.ArrayLike) -> Array:
        y, grad = self._saved(self._y, dy)
        dx: Array = grad * (1 - y * y)
        return dx


class Sigmoid(Layer):
    """y = 1 / (1 + exp(-x)); dy/dx = y * (1 - y). Never overflows."""

    _y: Array | None = None

    def forward(self, x: npt.ArrayLike) -> Array:
        # the same function as 1 / (1 + exp(-x)), without exp's overflow
        self._y = 0.5 * (1 + np.tanh(0.5 * _as_float_array(x)))
        return self._y

    def backward(self, dy: npt.ArrayLike) -> Array:
        y, grad = self._saved(self._y, dy)
        dx: Array = grad * y * (1 - y)
        return dx


ACTIVATIONS: dict[str, type[Layer]] = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}


# ---- images: (N, C, H, W) ----------------------------------------------------


def _image_input(layer: Layer, x: npt.ArrayLike, channels: int) -> Array:
    """x as an (N, C, H, W) float array with C == channels; ValueError otherwise."""
    images = _as_float_array(x)
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(
            f"{type(layer).__name__} expected input of shape (N, {channels}, H, W), "
            f"got {images.shape}"
        )
    return images


def _output_size(layer: Layer, size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Windows that fit along one side of `size` values (after padding); ValueError if none."""
    out = (size + 2 * padding - kernel_size) // stride + 1
    if out < 1:
        raise ValueError(
            f"{type(layer).__name__}: a kernel of {kernel_size} with padding "
            f"{padding} does not fit an image side of {size}"
        )
    return out


def _windows(x: Array, kernel_size: int, stride: int, out_h: int, out_w: int) -> Array:
    """Every kernel_size x kernel_size window of x, read without a copy.

    x (N, C, H, W) -> (N, C, out_h, out_w, k, k): [n, c, i, j] is the window
    whose top-left corner is x[n, c, i * stride, j * stride].
    """
    view = np.lib.stride_tricks.sliding_window_view(x, (kernel_size, kernel_size), axis=(2, 3))
    return view[:, :, ::stride, ::stride][:, :, :out_h, :out_w]


def _sum_windows(pieces: Array, shape: tuple[int, ...], stride: int) -> Array:
    """The adjoint of _windows: add each window's values back where they were read.

    pieces (N, C, out_h, out_w, k, k) -> an array of `shape` (N, C, H, W).
    Overlapping windows add up.
    """
    _, _, out_h, out_w, k, _ = pieces.shape
    total = np.zeros(shape, dtype=pieces.dtype)
    for i in range(k):
        for j in range(k):
            total[:, :, i : i + stride * out_h : stride, j : j + stride * out_w : stride] += pieces[
                :, :, :, :, i, j
            ]
    return total


class Conv2d(_Weighted):
    """A 2-D convolution (cross-correlation, as PyTorch's) of (N, C, H, W) images.

    weight has shape (out_channels, in_channels, k, k) and is drawn from
    N(0, weight_scale**2 / (in_channels * k * k)); bias starts at zero (None
    when bias=False). The output has shape (N, out_channels, H', W') with
    H' = (H + 2 * padding - k) // stride + 1. Computed as im2col and one
    matrix product: every window becomes a row of in_channels * k * k values
    (kept for backward), multiplied by the weight as a matrix. rng is a seed
    or a numpy Generator; inputs are converted to the layer's dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        weight_scale: float = 1.0,
        dtype: npt.DTypeLike = np.float32,
        rng: Any = None,
    ) -> None:
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.stride = _positive_int("stride", stride)
        self.padding = _positive_int("padding", padding, least=0)
        self.dtype = _float_dtype(dtype)
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = _normal_weights(
            (out_channels, in_channels, kernel_size, kernel_size),
            fan_in,
            weight_scale,
            self.dtype,
            rng,
        )
        self.bias = np.zeros(out_channels, self.dtype) if bias else None
        self.grad_weight = None
        self.grad_bias = None
        self._rows: Array | None = None  # the last forward's windows, one per row
        # (padded input shape, output shape)
        self._shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def forward(self, x: npt.ArrayLike) -> Array:
        images = np.asarray(_image_input(self, x, self.in_channels), dtype=self.dtype)
        n, _, h, w = images.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        out_h, out_w = (_output_size(self, side, k, s, p) for side in (h, w))
        padded = np.pad(images, ((0, 0), (0, 0), (p, p), (p, p))) if p else images
        windows = _windows(padded, k, s, out_h, out_w)  # (N, C, H', W', k, k)
        rows = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * out_h * out_w, -1)
        y = rows @ self.weight.reshape(self.out_channels, -1).T  # (N*H'*W', out_channels)
        if self.bias is not None:
            y += self.bias
        self._rows = rows
        self._shapes = (padded.shape, (n, self.out_channels, out_h, out_w))
        return np.ascontiguousarray(y.reshape(n, out_h, out_w, -1).transpose(0, 3, 1, 2))

    def backward(self, dy: npt.ArrayLike) -> Array:
        if self._rows is None or self._shapes is None:
            raise RuntimeError("Conv2d.backward called before any forward")
        padded_shape, out_shape = self._shapes
        grad = np.asarray(_as_float_array(dy), dtype=self.dtype)
        if grad.shape != out_shape:
            raise ValueError(f"dy has shape {grad.shape}, expected {out_shape}")
        n, _, out_h, out_w = out_shape
        k, p = self.kernel_size, self.padding
        dy_rows = grad.transpose(0, 2, 3, 1).reshape(-1, self.out_channels)  # (N*H'*W', out)
        self.grad_weight = (dy_rows.T @ self._rows).reshape(self.weight.shape)
        if self.bias is not None:
            self.grad_bias = dy_rows.sum(axis=0)
        drows = dy_rows @ self.weight.reshape(self.out_channels, -1)  # (N*H'*W', C*k*k)
        pieces = drows.reshape(n, out_h, out_w, self.in_channels, k, k).transpose(0, 3, 1, 2, 4, 5)
        dpadded = _sum_windows(pieces, padded_shape, self.stride)
        h, w = padded_shape[2] - 2 * p, padded_shape[3] - 2 * p
        return dpadded[:, :, p : p + h, p : p + w]

    def __repr__(self) -> str:
        return (
            f"Conv2d({self.in_channels}, {self.out_channels}, {self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"dtype='{self.dtype}')"
        )


class MaxPool2d(Layer):
    """The largest value of each kernel_size x kernel_size window of (N, C, H, W) images.

    stride defaults to kernel_size (windows side by side). backward sends each
    window's gradient to the position of its maximum (the first one on a tie).
    """

    def __init__(self, kernel_size: int, stride: int | None = None) -> None:
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.stride = self.kernel_size if stride is None else _positive_int("stride", stride)
        self._argmax: Array | None = None  # (N, C, H', W'): where in its window each maximum was
        self._x_shape: tuple[int, ...] | None = None

    def forward(self, x: npt.ArrayLike) -> Array:
        images = _as_float_array(x)
        if images.ndim != 4:
            raise ValueError(f"MaxPool2d expected input of shape (N, C, H, W), got {images.shape}")
        k, s = self.kernel_size, self.stride
        out_h, out_w = (_output_size(self, side, k, s, 0) for side in images.shape[2:])
        windows = _windows(images, k, s, out_h, out_w).reshape(
            *images.shape[:2], out_h, out_w, k * k
        )
        argmax = windows.argmax(axis=-1)
        self._argmax, self._x_shape = argmax, images.shape
        return np.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]

    def backward(self, dy: npt.ArrayLike) -> Array:
        if self._argmax is None or self._x_shape is None:
            raise RuntimeError("MaxPool2d.backward called before any forward")
        grad = _as_float_array(dy)
        if grad.shape != self._argmax.shape:
            raise ValueError(f"dy has shape {grad.shape}, expected {self._argmax.shape}")
        k = self.kernel_size
        winners = np.arange(k * k) == self._argmax[..., None]  # (N, C, H', W', k*k)
        pieces = (winners * grad[..., None]).reshape(*grad.shape, k, k)
        return _sum_windows(pieces, self._x_shape, self.stride)

    def __repr__(self) -> str:
        return f"MaxPool2d({self.kernel_size}, stride={self.stride})"


class Flatten(Layer):
    """(N, ...) -> (N, everything else): images into rows for a Linear layer."""

    _x_shape: tuple[int, ...] | None = None

    def forward(self, x: npt.ArrayLike) -> Array:
        inputs = _as_float_array(x)
        if inputs.ndim < 1:
            raise ValueError("Flatten expected an input with a batch axis, got a scalar")
        self._x_shape = inputs.shape
        return inputs.reshape(len(inputs), -1)

    def backward(self, dy: npt.ArrayLike) -> Array:
        if self._x_shape is None:
            raise RuntimeError("Flatten.backward called before any forward")
        grad = _as_float_array(dy)
        expected = (self._x_shape[0], int(np.prod(self._x_shape[1:])))
        if grad.shape != expected:
            raise ValueError(f"dy has shape {grad.shape}, expected {expected}")
        return grad.reshape(self._x_shape)


# ---- sequences: (N, T, features) ---------------------------------------------


class RNN(Layer):
    """A simple (Elman) recurrent layer over (N, T, input_size) sequences, unrolled over
    the T steps, with an optional normalization layer at every step:

        h_t = tanh(norm_t(x_t @ W.T + b + h_{t-1} @ U.T)),   h_{-1} = 0

    (without norm: tanh(x_t @ W.T + h_{t-1} @ U.T + b)). forward returns every
    step's h, shape (N, T, hidden_size): put LastStep after it to classify
    whole sequences. backward runs back through time and sums the gradient of
    each shared parameter over the steps.

    Made of bnpy.nn layers: ``input`` is a Linear(input_size, hidden_size) (W
    and b) applied to every step at once; ``recurrent`` a Linear(hidden_size,
    hidden_size, bias=False) (U) applied step after step through copies that
    share its weight, each keeping its step's input for backward; every step
    has a Tanh of its own. Both weights are drawn as Linear's, with
    weight_scale; rng draws W, then U.

    norm makes a normalization layer, called as norm(hidden_size, dtype=dtype):
    bnpy.LayerNorm, bnpy.BatchNorm, bnpy.RMSNorm, functools.partial(bnpy.GroupNorm, 4).
    Every step t has a layer of its own, ``norms[t]``, all sharing norms[0]'s
    gamma and beta (the parameters; copied into the others at every forward),
    so that each keeps its step's forward for backward. A layer with running
    statistics keeps them per step: a BatchNorm normalizes step t with the
    batch statistics of step t in training and with step t's running averages
    in eval mode (recurrent batch normalization, Cooijmans et al., 2017). In
    eval mode, steps beyond the last one trained use a copy of the last
    trained step's layer, as that paper does. LayerNorm, GroupNorm and RMSNorm
    normalize each sample on its own: their steps differ only in what they keep
    for backward. The input Linear has no bias when the norm layer has a beta,
    which plays its part.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        norm: Callable[..., Any] | None = None,
        weight_scale: float = 1.0,
        dtype: npt.DTypeLike = np.float32,
        rng: Any = None,
    ) -> None:
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.dtype = _float_dtype(dtype)
        if norm is not None and not callable(norm):
            raise TypeError(f"norm must be a callable making a layer, got {norm!r}")
        self.norm = norm
        self.norms: list[Any] = []  # one per step seen in training
        if norm is not None:
            self.norms.append(self._new_norm())
        has_beta = bool(self.norms) and getattr(self.norms[0], "beta", None) is not None
        rng = np.random.default_rng(rng)
        self.input = Linear(
            input_size,
            hidden_size,
            bias=not has_beta,
            weight_scale=weight_scale,
            dtype=self.dtype,
            rng=rng,
        )
        self.recurrent = Linear(
            hidden_size,
            hidden_size,
            bias=False,
            weight_scale=weight_scale,
            dtype=self.dtype,
            rng=rng,
        )
        # the sums over the steps of the norm layers' gradients
        self.grad_gamma: Array | None = None
        self.grad_beta: Array | None = None
        self._steps: list[tuple[Linear, Any, Tanh]] = []  # the last forward's, step by step
        self._shape = (0, 0, self.hidden_size)  # the last forward's output

    def _new_norm(self) -> Any:
        """A new step's norm layer, in the RNN's mode, with norms[0]'s gamma and beta."""
        assert self.norm is not None
        layer = self.norm(self.hidden_size, dtype=self.dtype)
        missing = [
            m
            for m in ("forward", "backward", "train", "eval")
            if not callable(getattr(layer, m, None))
        ]
        if missing:
            raise TypeError(
                f"norm made a {type(layer).__name__}, which has no {', '.join(missing)}"
            )
        if any(layer is other for other in self.norms):
            raise ValueError(
                "norm returned a layer it had made before: every step needs its own "
                "(pass the class, bnpy.LayerNorm, or a function making a new layer)"
            )
        layer.train(self.training)
        if self.norms:
            self._copy_norm_parameters(layer)
        return layer

    def _copy_norm_parameters(self, layer: Any) -> None:
        for name in ("gamma", "beta"):
            value = getattr(self.norms[0], name, None)
            if value is not None:
                setattr(layer, name, value)

    def _step_norm(self, t: int) -> Any:
        """Step t's norm layer (None without norm)."""
        if not self.norms:
            return None
        if t < len(self.norms):
            return self.norms[t]
        if self.training:
            self.norms.append(self._new_norm())
            return self.norms[-1]
        return copy.deepcopy(self.norms[-1])  # longer than in training: the last step's

    def forward(self, x: npt.ArrayLike) -> Array:
        inputs = np.asarray(_as_float_array(x), dtype=self.dtype)
        if inputs.ndim != 3 or inputs.shape[1] == 0 or inputs.shape[2] != self.input_size:
            raise ValueError(
                f"RNN expected input of shape (N, T, {self.input_size}) with T >= 1, "
                f"got {inputs.shape}"
            )
        n, steps, _ = inputs.shape
        for layer in self.norms[1:]:
            self._copy_norm_parameters(layer)  # SGD updated norms[0]'s
        projected = self.input.forward(inputs)  # x_t @ W.T + b, every step at once
        h = np.zeros((n, self.hidden_size), self.dtype)
        outputs = np.empty((n, steps, self.hidden_size), self.dtype)
        self._steps, self._shape = [], outputs.shape
        for t in range(steps):
            recurrent, normalize, tanh = copy.copy(self.recurrent), self._step_norm(t), Tanh()
            summed = projected[:, t] + recurrent.forward(h)
            h = tanh.forward(summed if normalize is None else normalize.forward(summed))
            outputs[:, t] = h
            self._steps.append((recurrent, normalize, tanh))
        return outputs

    def backward(self, dy: npt.ArrayLike) -> Array:
        if not self._steps:
            raise RuntimeError("RNN.backward called before any forward")
        grad = np.asarray(_as_float_array(dy), dtype=self.dtype)
        n, steps, _ = expected = self._shape
        if grad.shape != expected:
            raise ValueError(f"dy has shape {grad.shape}, expected {expected}")
        dprojected = np.empty(expected, self.dtype)
        dh = np.zeros((n, self.hidden_size), self.dtype)  # dL/dh_t through h_{t+1}
        grad_recurrent = np.zeros_like(self.recurrent.weight)
        sums: dict[str, Array] = {}
        for t in reversed(range(steps)):
            recurrent, normalize, tanh = self._steps[t]
            dsummed = tanh.backward(grad[:, t] + dh)
            if normalize is not None:
                dsummed = normalize.backward(dsummed)
                for name in ("gamma", "beta"):
                    if getattr(normalize, name, None) is not None:
                        step_grad = np.asarray(getattr(normalize, "grad_" + name))
                        if name in sums:
                            sums[name] += step_grad
                        else:
                            sums[name] = step_grad.astype(self.dtype, copy=True)
            dprojected[:, t] = dsummed
            dh = recurrent.backward(dsummed)
            assert recurrent.grad_weight is not None
            grad_recurrent += recurrent.grad_weight
        self.recurrent.grad_weight = grad_recurrent
        self.grad_gamma, self.grad_beta = sums.get("gamma"), sums.get("beta")
        return self.input.backward(dprojected)

    def parameters(self) -> Parameters:
        """W, b (when there is one), U, then the norm's gamma and beta (norms[0]'s)."""
        pairs = self.input.parameters() + self.recurrent.parameters()
        if self.norms:
            for name, grad in (("gamma", self.grad_gamma), ("beta", self.grad_beta)):
                param = getattr(self.norms[0], name, None)
                if param is not None:
                    pairs.append((param, grad))
        return pairs

    def train(self, mode: bool = True) -> "RNN":
        for layer in self.norms:
            layer.train(mode)
        self.training = bool(mode)
        return self

    def eval(self) -> "RNN":
        return self.train(False)

    def __repr__(self) -> str:
        norm = getattr(self.norm, "__name__", None) or repr(self.norm)
        return f"RNN({self.input_size}, {self.hidden_size}, norm={norm}, dtype='{self.dtype}')"


class LastStep(Layer):
    """(N, T, features) -> (N, features): each sequence's last step, to classify
    whole sequences with a Linear after an RNN. backward sends dy to the last
    step and zeros to the others."""

    _x_shape: tuple[int, ...] | None = None

    def forward(self, x: npt.ArrayLike) -> Array:
        inputs = _as_float_array(x)
        if inputs.ndim != 3 or inputs.shape[1] == 0:
            raise ValueError(
                f"LastStep expected input of shape (N, T, F) with T >= 1, got {inputs.shape}"
            )
        self._x_shape = inputs.shape
        return np.ascontiguousarray(inputs[:, -1])

    def backward(self, dy: npt.ArrayLike) -> Array:
        if self._x_shape is None:
            raise RuntimeError("LastStep.backward called before any forward")
        grad = _as_float_array(dy)
        expected = (self._x_shape[0], self._x_shape[2])
        if grad.shape != expected:
            raise ValueError(f"dy has shape {grad.shape}, expected {expected}")
        dx = np.zeros(self._x_shape, grad.dtype)
        dx[:, -1] = grad
        return dx


def _layer_parameters(layer: Any) -> Parameters:
    """(param, grad) pairs of a bnpy.nn layer, or the gamma and beta a normalization
    layer has: BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm. Either may be
    None (affine=False; RMSNorm and LayerNorm(bias=False) have no beta): left out."""
    if hasattr(layer, "parameters"):
        return list(layer.parameters())
    return [
        (param, getattr(layer, "grad_" + name))
        for name in ("gamma", "beta")
        if (param := getattr(layer, name, None)) is not None
    ]


class Sequential(Layer):
    """Layers applied one after the other; backward runs them in reverse.

    After a forward, ``outputs[i]`` is layer i's output; after a backward,
    ``grads[i]`` is the gradient of the loss with respect to ``outputs[i]``
    (so ``grads[-1]`` is the dy given to backward). Any object with
    forward, backward, train and eval works as a layer: bnpy.BatchNorm,
    LayerNorm, GroupNorm, InstanceNorm and RMSNorm included.
    """

    def __init__(self, *layers: Any) -> None:
        for i, layer in enumerate(layers):
            missing = [
                m
                for m in ("forward", "backward", "train", "eval")
                if not callable(getattr(layer, m, None))
            ]
            if missing:
                raise TypeError(f"layer {i} ({type(layer).__name__}) has no {', '.join(missing)}")
        self.layers: list[Any] = list(layers)  # bnpy.nn layers, BatchNorms or look-alikes
        self.outputs: list[Array] = []
        self.grads: list[Array] = []

    def forward(self, x: npt.ArrayLike) -> Array:
        outputs: list[Array] = []
        out = x
        for layer in self.layers:
            out = np.asarray(layer.forward(out))
            outputs.append(out)
        self.outputs = outputs
        return np.asarray(out)

    def backward(self, dy: npt.ArrayLike) -> Array:
        if len(self.outputs) != len(self.layers):
            raise RuntimeError("Sequential.backward called before any forward")
        grads: list[Array] = []
        grad = np.asarray(dy)
        for layer in reversed(self.layers):
            grads.append(grad)
            grad = np.asarray(layer.backward(grad))
        self.grads = grads[::-1]
        return grad

    def train(self, mode: bool = True) -> "Sequential":
        for layer in self.layers:
            layer.train(mode)
        self.training = bool(mode)
        return self

    def eval(self) -> "Sequential":
        return self.train(False)

    def parameters(self) -> Parameters:
        return [pair for layer in self.layers for pair in _layer_parameters(layer)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Any:
        return self.layers[index]

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"


class SGD:
    """Stochastic gradient descent with optional (heavy-ball) momentum, as PyTorch's.

    step() updates every parameter of model.parameters() in place:
    velocity = momentum * velocity + grad; param -= lr * velocity
    (param -= lr * grad when momentum is 0).
    """

    def __init__(self, model: Any, lr: float, momentum: float = 0.0) -> None:
        if not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.model = model
        self.lr = lr
        self.momentum = momentum
        self._velocities: list[Array] | None = None

    def step(self) -> None:
        """One update with the gradients of the last backward."""
        parameters: Parameters = self.model.parameters()
        pairs = [(param, grad) for param, grad in parameters if grad is not None]
        if len(pairs) != len(parameters):
            raise RuntimeError("SGD.step called before the model's first backward")
        if self.momentum == 0:
            for param, grad in pairs:
                param -= self.lr * grad
            return
        if self._velocities is None:
            self._velocities = [np.zeros_like(param) for param, _ in pairs]
        for (param, grad), velocity in zip(pairs, self._velocities):
            velocity *= self.momentum
            velocity += grad
            param -= self.lr * velocity


def softmax_cross_entropy(logits: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[float, Array]:
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient.

    logits has shape (N, K), labels N integers in [0, K). Returns (loss, dlogits):
    loss a float, dlogits = (softmax(logits) - one_hot(labels)) / N with the
    dtype of logits (float64 for non-float logits).
    """
    logits = _as_float_array(logits)
    labels = np.asarray(labels)
    assert isinstance(logits, np.ndarray) and isinstance(labels, np.ndarray)  # for mypy
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {logits.shape}")
    n, k = logits.shape
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {n} integers, got shape {labels.shape} and dtype {labels.dtype}"
        )
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(
            f"labels must lie in [0, {k}), got values from {labels.min()} to {labels.max()}"
        )
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(n)
    loss = -log_probs[rows, labels].mean()
    dlogits = np.exp(log_probs)
    dlogits[rows, labels] -= 1
    return float(loss), (dlogits / n).astype(logits.dtype)


def accuracy(logits: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """The fraction of rows whose largest logit is at the label."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def mlp(
    in_features: int,
    out_features: int,
    *,
    width: int = 64,
    depth: int = 20,
    activation: str | Callable[[], Any] = "sigmoid",
    batch_norm: bool = False,
    norm: Callable[..., Any] | None = None,
    placement: str = "before",
    weight_scale: float = 1.0,
    dtype: npt.DTypeLike = np.float32,
    rng: Any = None,
) -> Sequential:
    """A deep fully connected network of `depth` Linear layers.

    Every hidden block is Linear -> [norm] -> activation with
    placement="before" (the normalization before the activation, as in the
    original BatchNorm paper), or Linear -> activation -> [norm] with
    placement="after"; the last Linear gives the logits. activation is
    "sigmoid", "tanh", "relu" or a callable returning a layer.

    norm makes each hidden block's normalization layer, called as
    norm(width, dtype=dtype): bnpy.BatchNorm, bnpy.LayerNorm, bnpy.RMSNorm,
    functools.partial(bnpy.GroupNorm, 8), ...; batch_norm=True is
    norm=bnpy.BatchNorm. With a BatchNorm (or a subclass) before the
    activation the hidden Linear layers have no bias: BatchNorm subtracts each
    feature's mean over the batch, and its beta plays the bias's part. The
    others normalize each sample over its features, which does not remove a
    per-feature bias: those Linear layers keep theirs. rng (a seed or a
    Generator) draws every weight, in the same order whatever the placement
    and the normalization.
    """
    depth = _positive_int("depth", depth)
    make_activation = (
        ACTIVATIONS.get(activation, activation) if isinstance(activation, str) else activation
    )
    if not callable(make_activation):
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}"
        )
    if placement not in ("before", "after"):
        raise ValueError(
            f'placement must be "before" or "after" (the activation), got {placement!r}'
        )
    if batch_norm and norm is not None:
        raise ValueError("give batch_norm=True or norm, not both")
    make_norm = BatchNorm if batch_norm else norm
    if make_norm is not None and not callable(make_norm):
        raise TypeError(f"norm must be a callable making a layer, got {norm!r}")
    rng = np.random.default_rng(rng)
    sizes = [in_features] + [width] * (depth - 1) + [out_features]
    layers: list[Any] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        last = i == depth - 1
        normalization = (
            None if last or make_norm is None else make_norm(n_out, dtype=_float_dtype(dtype))
        )
        bias_is_redundant = placement == "before" and isinstance(normalization, BatchNorm)
        layers.append(
            Linear(
                n_in,
                n_out,
                bias=not bias_is_redundant,
                weight_scale=weight_scale,
                dtype=dtype,
                rng=rng,
            )
        )
        if last:
            break
        block = [make_activation()]
        if normalization is not None:
            block.insert(0 if placement == "before" else 1, normalization)
        layers += block
    return Sequential(*layers)


def fit(
    model: Sequential,
    x: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    lr: float,
    steps: int,
    batch_size: int = 64,
    momentum: float = 0.0,
    rng: Any = None,
    on_step: Callable[[], object] | None = None,
) -> npt.NDArray[np.float64]:
    """Train model with SGD on random mini-batches; return the loss of every step.

    Each step draws batch_size rows without replacement, runs forward,
    softmax_cross_entropy, backward and one SGD step. Training stops at the
    first non-finite loss (the network diverged): the remaining entries of
    the returned float64 array of length `steps` are NaN. `on_step()`, when
    given, is called after every step (a progress counter, for instance).
    """
    x = np.asarray(x)
    labels = np.asarray(labels)
    steps = _positive_int("steps", steps)
    batch_size = min(_positive_int("batch_size", batch_size), len(x))
    rng = np.random.default_rng(rng)
    optimizer = SGD(model, lr, momentum)
    losses = np.full(steps, np.nan)
    model.train()
    for step in range(steps):
        batch = rng.choice(len(x), size=batch_size, replace=False)
        with np.errstate(over="ignore", invalid="ignore"):
            loss, dlogits = softmax_cross_entropy(model.forward(x[batch]), labels[batch])
            if not np.isfinite(loss):
                break
            losses[step] = loss
            model.backward(dlogits)
            optimizer.step()
        if on_step is not None:
            on_step()
    return losses


# ---- what the notebooks measure ---------------------------------------------


def linear_layers(model: Sequential) -> list[Linear]:
    """The Linear layers of a Sequential, first to last."""
    return [layer for layer in model.layers if isinstance(layer, Linear)]


def preactivations(model: Sequential) -> list[Array]:
    """After a forward: the inputs of every activation layer, first to last.

    These are the outputs of the layers just before each ReLU, Tanh or
    Sigmoid: of a Linear in a plain network, of the normalization layer
    (BatchNorm, LayerNorm, ...) in a normalized one.
    """
    if len(model.outputs) != len(model.layers):
        raise RuntimeError("preactivations needs a forward through the model first")
    return [
        model.outputs[i - 1]
        for i, layer in enumerate(model.layers)
        if i > 0 and isinstance(layer, (ReLU, Tanh, Sigmoid))
    ]


def batch_std(values: npt.ArrayLike, axis: int = 0) -> float:
    """Each unit's standard deviation over the batch, averaged over units.

    This measures how much a layer's output still depends on the input: a
    unit whose value is the same for every example carries no information,
    however large its value.
    """
    return float(np.asarray(values, dtype=np.float64).std(axis=axis).mean())


def weight_gradient_norms(model: Sequential) -> npt.NDArray[np.float64]:
    """After a backward: the Frobenius norm of each Linear layer's grad_weight."""
    grads = [layer.grad_weight for layer in linear_layers(model)]
    if any(grad is None for grad in grads):
        raise RuntimeError("weight_gradient_norms needs a backward through the model first")
    return np.array([np.linalg.norm(grad) for grad in grads if grad is not None])


def _modes(layer: Any) -> Any:
    """Every layer's training flag, nested Sequentials included, to put back."""
    if isinstance(layer, Sequential):
        return (layer.training, [_modes(inner) for inner in layer.layers])
    return layer.training


def _restore_modes(layer: Any, modes: Any) -> None:
    if isinstance(layer, Sequential):
        own, inner_modes = modes
        for inner, mode in zip(layer.layers, inner_modes):
            _restore_modes(inner, mode)
        layer.training = own
    else:
        layer.train(modes)


def _flatten(layer: Any) -> list[Any]:
    if isinstance(layer, Sequential):
        return [leaf for inner in layer.layers for leaf in _flatten(inner)]
    return [layer]


def recalibrate(model: Sequential, batches: Iterable[npt.ArrayLike]) -> Sequential:
    """Give every BatchNorm of `model` the exact statistics of `batches`.

    Runs the data through the network in eval mode and calibrates each
    BatchNorm in order (BatchNorm.calibrate: the exact mean and unbiased
    variance of every value it sees, not an average of per-batch variances),
    so each one sees inputs normalized by the already calibrated ones before
    it. Like torch.optim.swa_utils.update_bn, but exact. Weights, gamma, beta
    and every layer's mode are left as they were; returns the model. Other
    normalization layers are left alone (LayerNorm and GroupNorm have no
    running statistics), and so are the BatchNorms inside an RNN.
    """
    layers = _flatten(model)
    modes = _modes(model)
    activations = [np.asarray(b) for b in batches]
    try:
        model.eval()
        done = 0  # activations are the inputs of layers[done]
        for i, layer in enumerate(layers):
            if not isinstance(layer, BatchNorm) or not layer.track_running_stats:
                continue
            for before in layers[done:i]:
                activations = [before(a) for a in activations]
            done = i
            layer.calibrate(activations)
    finally:
        _restore_modes(model, modes)
    return model


def fold_model(model: Sequential) -> Sequential:
    """A copy of the Sequential `model` for inference, in eval mode, where every
    Linear or Conv2d directly followed by a BatchNorm has it folded in
    (fold_batch_norm) and the BatchNorm is gone; nested Sequentials too. The
    copy's predictions are the model's in eval mode, one pass fewer per fold.
    Layer, group, instance and RMS normalization stay: their statistics are
    each sample's own, not constants to fold. `model` is left as it was."""
    layers = [
        fold_model(layer) if isinstance(layer, Sequential) else copy.deepcopy(layer)
        for layer in model.layers
    ]
    kept: list[Any] = []
    for layer in layers:
        layer.eval()
        if isinstance(layer, BatchNorm) and kept and isinstance(kept[-1], _Weighted):
            kept[-1].fold_batch_norm(layer)
        else:
            kept.append(layer)
    return Sequential(*kept).eval()
