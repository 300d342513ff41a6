"""Folding an eval-mode BatchNorm into the linear map before it, for inference.

In eval mode a BatchNorm is an affine map per feature,

    y = gamma * (z - running_mean) / sqrt(running_var + eps) + beta = scale * z + shift,

so after z = W x + b the pair is one linear map: W' = scale * W (each output
feature's row, or slice, scaled), b' = scale * (b - running_mean) + beta. The
folded layer computes what the two did, one pass over the activations fewer
(PyTorch's torch.nn.utils.fusion.fuse_conv_bn_eval / fuse_linear_bn_eval).
"""

from typing import Any

import numpy as np
import numpy.typing as npt

from ._core import BatchNorm

__all__ = ["fold"]


def _checked_weight(weights: npt.ArrayLike, out_axis: int, channels: int) -> npt.NDArray[Any]:
    weight = np.asarray(weights)
    if weight.dtype.kind not in "fiu":
        raise TypeError(f"weight must hold real numbers, got an array of dtype {weight.dtype}")
    if isinstance(out_axis, bool) or not isinstance(out_axis, (int, np.integer)):
        raise TypeError(f"out_axis must be an integer, got {type(out_axis).__name__}")
    if not -weight.ndim <= out_axis < weight.ndim:
        raise ValueError(f"out_axis {out_axis} is out of bounds for weight of shape {weight.shape}")
    if weight.shape[out_axis] != channels:
        raise ValueError(
            f"weight of shape {weight.shape} has {weight.shape[out_axis]} output "
            f"features along out_axis={out_axis}, but the BatchNorm normalizes "
            f"{channels}"
        )
    return weight


def _checked_bias(given: npt.ArrayLike | None, channels: int) -> npt.NDArray[Any]:
    if given is None:
        return np.zeros(channels)
    bias = np.asarray(given)
    if bias.dtype.kind not in "fiu" or bias.shape != (channels,):
        raise ValueError(
            f"bias must be a real array of shape ({channels},), got "
            f"{bias.dtype} of shape {bias.shape}"
        )
    return bias


def _scale_and_shift(bn: BatchNorm) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(C,) float64 scale and shift of an eval-mode BatchNorm: y = scale * z + shift."""
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a bnpy.BatchNorm, got {type(bn).__name__}")
    if bn.training:
        raise ValueError(
            "fold needs the BatchNorm in eval mode (bn.eval()): in training "
            "mode it normalizes with each batch's statistics, which no fixed "
            "weight holds"
        )
    if not bn.track_running_stats:
        raise ValueError(
            "fold needs running statistics: a BatchNorm with "
            "track_running_stats=False normalizes with each batch's statistics "
            "in eval mode too"
        )
    scale = 1.0 / np.sqrt(np.asarray(bn.running_var, np.float64) + bn.eps)
    if bn.affine:
        scale = np.asarray(bn.gamma, np.float64) * scale
    shift = -np.asarray(bn.running_mean, np.float64) * scale
    if bn.affine:
        shift = shift + np.asarray(bn.beta, np.float64)
    return scale, shift


def fold(
    bn: BatchNorm, weight: npt.ArrayLike, bias: npt.ArrayLike | None = None, *, out_axis: int = 0
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """(weight, bias) of the linear map z = W x + b followed by bn, in eval mode.

    bn: a bnpy.BatchNorm in eval mode, with running statistics. weight: the
    preceding layer's weight, its output features along out_axis (0 for
    PyTorch's Linear (out, in) and Conv (out, in, kh, kw) weights and
    bnpy.nn's, 1 for a matrix used as x @ W); bias: (C,) or None (no bias:
    the folded map has one). Computed in float64 and returned in the result
    dtype of weight, bias and the layer (float64 for float64 inputs). The
    arguments are not modified.
    """
    scale, shift = _scale_and_shift(bn)
    weights = _checked_weight(weight, out_axis, bn.num_features)
    biases = _checked_bias(bias, bn.num_features)
    dtype = np.result_type(weights.dtype, bn.dtype, *(() if bias is None else (biases.dtype,)))
    along = [1] * weights.ndim
    along[out_axis] = -1
    folded_weight = weights.astype(np.float64) * scale.reshape(along)
    folded_bias = biases.astype(np.float64) * scale + shift
    return folded_weight.astype(dtype, copy=False), folded_bias.astype(dtype, copy=False)
