"""A slow, obvious float64 NumPy implementation of batch normalization.

This is DESIGN.md section 1 written to be read, not to be fast: the tests
compare the C core against it. Every function takes the feature axis
``axis`` like NumPy does and returns float64 arrays.
"""

from typing import Any

import numpy as np
import numpy.typing as npt

_Array = npt.NDArray[np.float64]


def _other_axes(x: npt.NDArray[Any], axis: int) -> tuple[int, ...]:
    """The axes statistics are taken over: every axis but the feature axis."""
    axis = axis % x.ndim
    return tuple(a for a in range(x.ndim) if a != axis)


def _per_feature(values: npt.ArrayLike, x: npt.NDArray[Any], axis: int) -> _Array:
    """Reshape a (C,) vector so that it broadcasts along x's feature axis."""
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return np.asarray(values, dtype=np.float64).reshape(shape)


def batch_stats(x: npt.ArrayLike, axis: int = 1) -> tuple[_Array, _Array]:
    """Mean and biased variance of each feature, shape (C,) each."""
    x = np.asarray(x, dtype=np.float64)
    axes = _other_axes(x, axis)
    mean = x.mean(axis=axes)
    var = ((x - _per_feature(mean, x, axis)) ** 2).mean(axis=axes)
    return mean, var


def normalize(
    x: npt.ArrayLike,
    mean: npt.ArrayLike,
    var: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> _Array:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per feature."""
    x = np.asarray(x, dtype=np.float64)
    x_hat = (x - _per_feature(mean, x, axis)) / np.sqrt(_per_feature(var, x, axis) + eps)
    if gamma is not None:
        x_hat = x_hat * _per_feature(gamma, x, axis)
    if beta is not None:
        x_hat = x_hat + _per_feature(beta, x, axis)
    return x_hat


def forward_train(
    x: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[_Array, _Array, _Array]:
    """Training-mode forward: returns (y, mean, var) with the batch statistics."""
    mean, var = batch_stats(x, axis)
    return normalize(x, mean, var, gamma, beta, eps, axis), mean, var


def forward_eval(
    x: npt.ArrayLike,
    running_mean: npt.ArrayLike,
    running_var: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    beta: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> _Array:
    """Inference-mode forward: normalizes with the running statistics."""
    return normalize(x, running_mean, running_var, gamma, beta, eps, axis)


def update_running(
    running_mean: npt.ArrayLike,
    running_var: npt.ArrayLike,
    mean: _Array,
    var: _Array,
    n: int,
    momentum: float,
) -> tuple[_Array, _Array]:
    """PyTorch's running-statistics update; var is biased, n values per feature.

    Returns the new (running_mean, running_var); the variance stored is the
    unbiased one, var * n / (n - 1).
    """
    new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
    new_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * var * n / (n - 1)
    return new_mean, new_var


def backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    mean: npt.ArrayLike,
    var: npt.ArrayLike,
    gamma: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    training: bool = True,
) -> tuple[_Array, _Array, _Array]:
    """Gradients (dx, dgamma, dbeta) of y = forward(x) for upstream gradient dy.

    In training mode mean and var are the batch statistics of x and depend on
    it; in eval mode they are constants (the running statistics).
    """
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    axes = _other_axes(x, axis)
    n = x.size // x.shape[axis % x.ndim]
    invstd = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    x_hat = (x - _per_feature(mean, x, axis)) * _per_feature(invstd, x, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    g = np.ones_like(invstd) if gamma is None else np.asarray(gamma, np.float64)
    scale = _per_feature(g * invstd, x, axis)
    if training:
        dx = (
            scale
            / n
            * (n * dy - _per_feature(dbeta, x, axis) - x_hat * _per_feature(dgamma, x, axis))
        )
    else:
        dx = dy * scale
    return dx, dgamma, dbeta
