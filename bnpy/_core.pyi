"""Type stubs of bnpy._core, the C extension (see DESIGN.md section 3)."""

from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

_DType = type[np.float32] | type[np.float64] | np.dtype[Any] | Literal["float32", "float64"]
_Array = npt.NDArray[np.floating[Any]]

class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]

@disjoint_base  # a C type: a class cannot derive from it and another such type
class BatchNorm:
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-05,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int = 1,
        dtype: _DType = ...,
        *,
        training: bool = True,
        virtual_batch_size: int | None = None,
    ) -> None: ...
    # parameters and buffers: views that share the layer's memory; assigning copies in
    gamma: _Array | None
    beta: _Array | None
    weight: _Array | None  # gamma under PyTorch's name: the same memory
    bias: _Array | None  # beta under PyTorch's name
    running_mean: _Array | None
    running_var: _Array | None
    @property
    def grad_gamma(self) -> _Array | None: ...
    @property
    def grad_beta(self) -> _Array | None: ...
    @property
    def num_batches_tracked(self) -> int: ...
    @property
    def num_features(self) -> int: ...
    @property
    def affine(self) -> bool: ...
    @property
    def track_running_stats(self) -> bool: ...
    @property
    def axis(self) -> int: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...
    @property
    def virtual_batch_size(self) -> int | None: ...
    eps: float
    momentum: float | None
    training: bool
    def forward(self, x: npt.ArrayLike, *, out: _Array | None = None) -> _Array: ...
    def __call__(self, x: npt.ArrayLike, *, out: _Array | None = None) -> _Array: ...
    def backward(self, dy: npt.ArrayLike, *, out: _Array | None = None) -> _Array: ...
    def train(self, mode: bool = True) -> BatchNorm: ...
    def eval(self) -> BatchNorm: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(
        self, state: dict[str, Any], /, strict: bool = True
    ) -> IncompatibleKeys: ...
    def reset_running_stats(self) -> None: ...
    def reset_parameters(self) -> None: ...
    def calibrate(self, batches: Iterable[npt.ArrayLike], /) -> BatchNorm: ...
    # bnpy.distributed's steps: statistics as (C, 3) partials (count, mean, m2), shifted
    def _stats_of(
        self,
        batches: Iterable[npt.ArrayLike],
        *,
        shift: npt.ArrayLike | None = None,
        name: str = "batch",  # what its error messages call a batch
    ) -> _Array: ...
    def _forward_from_stats(
        self,
        x: npt.ArrayLike,
        stats: npt.ArrayLike,
        *,
        shift: npt.ArrayLike | None = None,
        moments: npt.ArrayLike | None = None,  # (2, C) mean and invstd to normalize with
        out: _Array | None = None,
    ) -> _Array: ...
    def _grad_sums(self, dy: npt.ArrayLike, /) -> _Array: ...
    def _backward_from_sums(
        self,
        dy: npt.ArrayLike,
        sums: npt.ArrayLike,
        local_sums: npt.ArrayLike,
        *,
        out: _Array | None = None,
    ) -> _Array: ...
    def _set_running_from_stats(
        self, stats: npt.ArrayLike, *, shift: npt.ArrayLike | None = None
    ) -> None: ...

def batch_norm_forward(
    x: npt.ArrayLike,
    gamma: npt.ArrayLike | None,
    beta: npt.ArrayLike | None,
    *,
    eps: float = 1e-05,
    axis: int = 1,
    out: _Array | None = None,
) -> tuple[_Array, _Array, _Array]: ...
def batch_norm_inference(
    x: npt.ArrayLike,
    gamma: npt.ArrayLike | None,
    beta: npt.ArrayLike | None,
    mean: npt.ArrayLike,
    var: npt.ArrayLike,
    *,
    eps: float = 1e-05,
    axis: int = 1,
    out: _Array | None = None,
) -> _Array: ...
def batch_norm_backward(
    dy: npt.ArrayLike,
    x: npt.ArrayLike,
    gamma: npt.ArrayLike | None,
    mean: npt.ArrayLike,
    invstd: npt.ArrayLike,
    *,
    axis: int = 1,
    training: bool = True,
    out: _Array | None = None,
) -> tuple[_Array, _Array | None, _Array | None]: ...
def set_num_threads(n: int, /) -> None: ...
def get_num_threads() -> int: ...

_Capability = Literal["default", "portable", "avx2", "avx512"]  # "portable": BNPY_PORTABLE=1 builds

def set_cpu_capability(name: _Capability, /) -> None: ...
def get_cpu_capability() -> _Capability: ...
def cpu_capabilities() -> tuple[str, ...]: ...
def has_openmp() -> bool: ...
def _merge_partials(parts: npt.ArrayLike, /) -> _Array: ...  # (P, C, 3) -> (C, 3)

# the row kernels of bnpy.family (bn_family.c): C-contiguous float32 or float64 arrays only
def _rows_forward(
    x: _Array,
    gamma: _Array | None,
    beta: _Array | None,
    n: int,
    spread: int,
    period: int,
    eps: float,
    centered: bool,
    out: _Array | None,
    /,
) -> tuple[_Array, _Array]: ...  # (y, moments (3, rows): mean, invstd, var)
def _rows_backward(
    dy: _Array,
    x: _Array,
    gamma: _Array | None,
    moments: _Array,
    n: int,
    spread: int,
    period: int,
    centered: bool,
    out: _Array | None,
    /,
) -> tuple[_Array, _Array]: ...  # (dx, (2, channels): dgamma, dbeta)
