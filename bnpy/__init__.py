"""bnpy: batch normalization with its numerical core in C, for NumPy.

>>> import numpy as np, bnpy
>>> bn = bnpy.BatchNorm(3)
>>> y = bn(np.random.default_rng(0).normal(5, 2, size=(16, 3)))
>>> dx = bn.backward(np.ones_like(y))
"""

try:
    from . import _core
except ImportError:  # pragma: no cover - only when run from a source checkout
    # Importing from a source checkout (python -m bnpy in the repository) finds
    # this directory, which holds no compiled core unless built in place; look
    # for the installed package's core as well before giving up.
    from pkgutil import extend_path

    __path__ = extend_path(__path__, __name__)
    try:
        from . import _core  # noqa: F401 - only to see whether it is built
    except ImportError as error:
        raise ImportError(
            "bnpy's C extension (bnpy._core) is not built: run `pip install .` "
            "in the repository, or `python setup.py build_ext --inplace`"
        ) from error

from ._core import (
    BatchNorm,
    IncompatibleKeys,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    cpu_capabilities,
    get_cpu_capability,
    get_num_threads,
    has_openmp,
    set_cpu_capability,
    set_num_threads,
)
from .family import (
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    RMSNorm,
    group_norm_backward,
    group_norm_forward,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
)
from .fold import fold
from .renorm import BatchRenorm

__version__ = "0.1.0"


def _threads_from_environment() -> None:
    """Apply BNPY_NUM_THREADS (a positive integer) if it is set."""
    import os
    import warnings

    value = os.environ.get("BNPY_NUM_THREADS", "").strip()
    if not value:
        return
    try:
        set_num_threads(int(value))
    except ValueError:
        warnings.warn(
            f"BNPY_NUM_THREADS must be a positive integer, got {value!r}; "
            f"using {get_num_threads()} threads",
            RuntimeWarning,
            stacklevel=3,
        )


def _cpu_capability_from_environment() -> None:
    """Apply BNPY_CPU_CAPABILITY ('default' or 'portable', 'avx2', 'avx512') if it is set."""
    import os
    import warnings

    value = os.environ.get("BNPY_CPU_CAPABILITY", "").strip().lower()
    if not value:
        return
    try:
        set_cpu_capability(value)  # type: ignore[arg-type]  # checked here: ValueError
    except ValueError as error:
        warnings.warn(
            f"BNPY_CPU_CAPABILITY: {error}; using {get_cpu_capability()!r}",
            RuntimeWarning,
            stacklevel=3,
        )


_threads_from_environment()
_cpu_capability_from_environment()

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "RMSNorm",
    "IncompatibleKeys",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_norm_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "rms_norm_forward",
    "rms_norm_backward",
    "group_norm_forward",
    "group_norm_backward",
    "instance_norm_forward",
    "instance_norm_backward",
    "fold",
    "set_num_threads",
    "get_num_threads",
    "has_openmp",
    "set_cpu_capability",
    "get_cpu_capability",
    "cpu_capabilities",
    "__version__",
]
