"""Side-by-side timing of bnpy against PyTorch, the NumPy reference and a copy.

Run it as ``python -m bnpy bench`` or ``python benchmarks/bench.py``. For every
case it times, in the same run and interleaved repeat by repeat (every thread
count in the same repeats, so the speedup from threads compares like moments):

- bnpy (the layer, writing into a preallocated ``out=``; the op
  ``backward-inplace`` writes dx over dy with ``out=dy``, as a training loop
  can when nothing else needs dy),
- PyTorch's ``torch.nn.functional.batch_norm`` forward and its autograd
  backward (``torch.autograd.grad``), when torch is installed,
- ``bnpy.reference`` (float64 NumPy, one thread),
- for 4-D cases, when torch is installed, the op ``module``: a training
  forward plus autograd backward of ``bnpy.torch.BatchNorm2d`` (the bnpy
  column) against ``torch.nn.BatchNorm2d`` (the torch column), module level,
  on tensors sharing x's and dy's memory (channels_last for NHWC),
- for the normalization family (``--norms``: layer, group, instance and
  rms), bnpy's ``LayerNorm``, ``GroupNorm(32)``, ``InstanceNorm(affine=True)``
  and ``RMSNorm`` (a training forward into ``out=``; a backward after one,
  into ``out=``) against ``torch.nn.functional``'s ``layer_norm``,
  ``group_norm``, ``instance_norm`` and ``rms_norm`` with a weight and bias
  of their own (RMS: a weight), so that both sides compute the same
  gradients: instance norm is affine on both sides, which neither bnpy's
  ``InstanceNorm`` nor torch's ``InstanceNorm2d`` is by default,
- for ``HALF_CASES``, when float32 is timed (unless ``--no-half``), the same
  batch norm in float16 and bfloat16 (ml_dtypes') x with a float32 layer,
  against torch with float32 parameters: half precision's target is its
  time against float32's,
- ``np.copyto`` of the same bytes: the floor for a pass that reads x and
  writes y once; for the large cases also split in halves over two threads
  (NumPy copies without the GIL), the memory system's own speedup from a
  second thread, which no pass that moves as many bytes can exceed,

and prints medians in milliseconds (with ``--rounds K``, the whole run K
times and the median of each time over the rounds, so that a minute of load
from elsewhere on a shared machine sways one round, not the result), bnpy's GB/s (bytes it must move: x and y
forward; x, dy and dx backward), and the ratios bnpy/copy, torch/copy and
torch/bnpy. torch's forward runs under ``torch.no_grad()``; its backward is
``torch.autograd.grad`` on a graph made once and retained.

``--steady-heap`` times torch at its fastest: see ``steady_heap``.
"""

import argparse
import ctypes
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

import bnpy
from bnpy import reference
from bnpy._progress import Progress
from bnpy.family import _is_half

# name, shape, feature axis
CASES = [
    ("NCHW 64x64x56x56", (64, 64, 56, 56), 1),
    ("NHWC 64x56x56x64", (64, 56, 56, 64), -1),
    ("NCHW 32x256x28x28", (32, 256, 28, 28), 1),
    ("NC 256x1024", (256, 1024), 1),
    ("NCHW 8x64x112x112", (8, 64, 112, 112), 1),
    ("NCHW 128x64x56x56 (> L3)", (128, 64, 56, 56), 1),
    ("NCHW 256x512x7x7", (256, 512, 7, 7), 1),
    ("NCL 64x128x1000", (64, 128, 1000), 1),
]
QUICK_CASES = [
    ("NCHW 8x16x14x14", (8, 16, 14, 14), 1),
    ("NHWC 8x14x14x16", (8, 14, 14, 16), -1),
    ("NC 64x32", (64, 32), 1),
]
# The normalization family (bnpy/family.py), each case's name, norm and
# shape: layer and RMS norm over the last axis, group and instance norm over
# axis 1's channels (GroupNorm with GROUPS groups); the issue's shapes.
FAMILY_CASES = [
    ("LayerNorm 32x128x768", "layer", (32, 128, 768)),
    ("LayerNorm 8x512x4096", "layer", (8, 512, 4096)),
    ("GroupNorm(32) 32x256x28x28", "group", (32, 256, 28, 28)),
    ("InstanceNorm 32x64x56x56", "instance", (32, 64, 56, 56)),
    ("RMSNorm 32x128x768", "rms", (32, 128, 768)),
]
QUICK_FAMILY_CASES = [
    ("LayerNorm 8x16x32", "layer", (8, 16, 32)),
    ("GroupNorm(32) 2x64x7x7", "group", (2, 64, 7, 7)),
    ("InstanceNorm 4x8x7x7", "instance", (4, 8, 7, 7)),
    ("RMSNorm 8x16x32", "rms", (8, 16, 32)),
]
# Batch norm's cases also timed with float16 and bfloat16 x (the layer in
# float32: mixed precision), when float32 is timed: the half-precision target
# is a ratio to float32's time. The second is --quick's.
HALF_CASES = ("NCHW 64x64x56x56", "NCHW 8x16x14x14")
GROUPS = 32
FAMILY = ("layer", "group", "instance", "rms")
NORMS = ("batch", *FAMILY)  # what --norms picks from: "batch" is CASES
OPS = ("forward-train", "forward-eval", "backward", "backward-inplace")
FAMILY_OPS = ("forward", "backward")  # forward in training mode, the same as eval's here
BACKWARDS = ("backward", "backward-inplace")
MODULE = "module"  # bnpy.torch.BatchNorm2d against torch.nn.BatchNorm2d, forward + backward


_Array = npt.NDArray[Any]
Row = dict[str, Any]  # one measurement: case, norm, dtype, op, threads, times in seconds, bytes
_Runner = Callable[[], object]
_Key = str | tuple[str, int]  # "copy", or ("bnpy" or "torch", threads)
# torch is an optional dependency: the module, or None, passed around as Any

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def steady_heap() -> bool:
    """Make glibc's malloc keep freed memory for reuse: nothing mapped per
    allocation, nothing handed back to the system. torch allocates its output
    on every call. With glibc's defaults, outputs over 32 MiB are mapped
    afresh each time, so every call pays a page fault per 4 KiB; smaller ones
    do so in some runs and not in others. torch's backward of 32x256x28x28
    took 10 or 20 ms from run to run. With this, torch runs as it does under
    an allocator that keeps memory (jemalloc, tcmalloc): at its fastest.
    bnpy allocates nothing per call (out=), so it is not affected. This
    changes the whole process. Returns whether the C library took the
    settings (False when it is not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1)


def _time_once(fn: _Runner) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _OnThreads:
    """fn, timed on `threads` threads: set_threads(threads) runs before each
    call, outside the timing, so that runs on different thread counts can be
    interleaved repeat by repeat."""

    def __init__(self, threads: int, fn: _Runner, set_threads: Callable[[int], object]) -> None:
        self.threads, self.fn, self.set_threads = threads, fn, set_threads

    def prepare(self) -> None:
        self.set_threads(self.threads)

    def __call__(self) -> object:
        return self.fn()


def _prepare(fn: _Runner) -> None:
    if isinstance(fn, _OnThreads):
        fn.prepare()


def _medians(runners: Mapping[_Key, _Runner], repeats: int) -> dict[_Key, float]:
    """Median seconds of each runner, timed in turn within every repeat so that
    a noisy moment on a shared machine hits all of them alike."""
    for fn in runners.values():  # warm up: page faults, caches, lazy setup
        _prepare(fn)
        fn()
    times: dict[_Key, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            _prepare(fn)
            times[name].append(_time_once(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def _no_grad(torch: Any, fn: _Runner) -> _Runner:
    """fn, called under torch.no_grad(): a forward that records no graph for
    autograd, although its weight and bias require gradients"""

    def call() -> object:
        with torch.no_grad():
            return fn()

    return call


def _torch_runners(
    torch: Any, x: _Array, dy: _Array, axis: int, op: str, momentum: float = 0.1, eps: float = 1e-5
) -> _Runner:
    """torch's functional batch norm on the same data (channels-last stays
    channels-last: a permuted view, the layout torch's NHWC kernels use); for
    half x, float32 parameters and statistics, as bnpy's."""
    xt, dyt = _tensor(torch, x), _tensor(torch, dy)
    if axis != 1:
        xt, dyt = (
            xt.permute(0, x.ndim - 1, *range(1, x.ndim - 1)),
            dyt.permute(0, x.ndim - 1, *range(1, x.ndim - 1)),
        )
    channels = x.shape[axis]
    params = torch.float32 if _is_half(x.dtype) else xt.dtype
    weight = torch.ones(channels, dtype=params, requires_grad=True)
    bias = torch.zeros(channels, dtype=params, requires_grad=True)
    running_mean = torch.zeros(channels, dtype=params)
    running_var = torch.ones(channels, dtype=params)
    F = torch.nn.functional
    if op not in BACKWARDS:  # torch has no in-place batch norm backward: both time autograd
        training = op == "forward-train"
        return _no_grad(
            torch,
            lambda: F.batch_norm(
                xt, running_mean, running_var, weight, bias, training, momentum, eps
            ),
        )
    xg = xt.detach().requires_grad_(True)
    y = F.batch_norm(xg, running_mean, running_var, weight, bias, True, momentum, eps)
    return lambda: torch.autograd.grad(y, (xg, weight, bias), dyt, retain_graph=True)


def _tensor(torch: Any, array: _Array) -> Any:
    """array as a tensor sharing its memory (bfloat16 through its bits)"""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _module_runner(torch: Any, cls: Any, x: _Array, dy: _Array, axis: int) -> _Runner:
    """A training forward and autograd backward of the module cls(C) on x
    (NCHW; NHWC data as a channels_last tensor), returning the gradients
    rather than accumulating them."""
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    if axis != 1:
        xt, dyt = xt.permute(0, 3, 1, 2), dyt.permute(0, 3, 1, 2)
    xt.requires_grad_(True)
    module = cls(x.shape[axis], dtype=xt.dtype)
    wanted = (xt, module.weight, module.bias)
    return lambda: torch.autograd.grad(module(xt), wanted, dyt)


def _bnpy_runner(x: _Array, dy: _Array, axis: int, op: str, out: _Array | None = None) -> _Runner:
    """bnpy's layer doing `op`, writing into out (a new array when None); a
    float32 layer for half x"""
    layer_dtype = np.float32 if _is_half(x.dtype) else x.dtype
    bn = bnpy.BatchNorm(x.shape[axis], axis=axis, dtype=layer_dtype)
    y = np.empty_like(x) if out is None else out
    if op == "forward-train":
        return lambda: bn.forward(x, out=y)
    if op == "forward-eval":
        bn.eval()
        return lambda: bn.forward(x, out=y)
    bn.forward(x)
    if op == "backward-inplace":
        # dx over dy, round after round: dx is dy less its projections on 1
        # and xhat, so repeating it keeps the values where they are
        np.copyto(y, dy)
        return lambda: bn.backward(y, out=y)
    return lambda: bn.backward(dy, out=y)


def _reference_runner(x: _Array, dy: _Array, axis: int, op: str) -> _Runner:
    if op == "forward-train":
        return lambda: reference.forward_train(x, axis=axis)
    if op == "forward-eval":
        channels = x.shape[axis]
        return lambda: reference.forward_eval(x, np.zeros(channels), np.ones(channels), axis=axis)
    mean, var = reference.batch_stats(x, axis)
    return lambda: reference.backward(dy, x, mean, var, axis=axis)


def _copy_on_two_threads(pool: ThreadPoolExecutor, out: _Array, x: _Array) -> None:
    """np.copyto(out, x) as two halves copied at once on the two threads of
    `pool` (NumPy releases the GIL while it copies); x and out contiguous"""
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    half = flat_x.size // 2
    parts = [
        pool.submit(np.copyto, flat_out[:half], flat_x[:half]),
        pool.submit(np.copyto, flat_out[half:], flat_x[half:]),
    ]
    for part in parts:
        part.result()


class _Case(NamedTuple):
    """One case's data in one dtype; copy_out is the copy's output; norm is
    "batch" or one of FAMILY (axis then unused)"""

    name: str
    x: _Array
    dy: _Array
    axis: int
    copy_out: _Array
    norm: str = "batch"


def _dtype(name: str) -> np.dtype[Any]:
    """the NumPy dtype called name; bfloat16 is ml_dtypes' (ValueError naming
    what is missing when ml_dtypes is not installed)"""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError("bfloat16 needs ml_dtypes: pip install ml_dtypes") from None
        bfloat16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bfloat16
    return np.dtype(name)


def half_dtypes() -> list[np.dtype[Any]]:
    """float16, and bfloat16 when ml_dtypes is installed"""
    return [np.dtype(np.float16)] + (
        [_dtype("bfloat16")] if importlib.util.find_spec("ml_dtypes") else []
    )


def _case_dtypes(
    name: str, norm: str, dtypes: Sequence[np.dtype[Any]], half: bool
) -> list[np.dtype[Any]]:
    """the dtypes a case is timed in: dtypes, and the halves for HALF_CASES
    when float32 is among them and `half`; the family's cases only in float32
    and float64 (their layers' dtypes)"""
    if norm != "batch":
        return [d for d in dtypes if not _is_half(d)]
    wanted = list(dtypes)
    if half and name in HALF_CASES and np.dtype(np.float32) in wanted:
        wanted += [d for d in half_dtypes() if d not in wanted]
    return wanted


def _make_case(
    name: str, shape: tuple[int, ...], axis: int, dtype: npt.DTypeLike, norm: str = "batch"
) -> _Case:
    """x and dy of `shape` drawn from the same seed for every case"""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, np.float32).astype(dtype)
    dy = rng.standard_normal(shape, np.float32).astype(dtype)
    return _Case(name, x, dy, axis, np.empty_like(x), norm)


def _family_layer(
    norm: str, shape: tuple[int, ...], dtype: npt.DTypeLike
) -> bnpy.LayerNorm | bnpy.GroupNorm:
    """bnpy's layer for a family case, with gamma and beta (RMS: gamma)"""
    if norm == "layer":
        return bnpy.LayerNorm(shape[-1], dtype=dtype)
    if norm == "rms":
        return bnpy.RMSNorm(shape[-1], dtype=dtype)
    if norm == "group":
        return bnpy.GroupNorm(GROUPS, shape[1], dtype=dtype)
    return bnpy.InstanceNorm(shape[1], affine=True, dtype=dtype)


def _family_bnpy_runner(case: _Case, op: str, out: _Array) -> _Runner:
    """bnpy's layer doing op: a training forward, or a backward after one,
    writing into out"""
    layer = _family_layer(case.norm, case.x.shape, case.x.dtype)
    if op == "forward":
        return lambda: layer.forward(case.x, out=out)
    layer.forward(case.x)
    return lambda: layer.backward(case.dy, out=out)


def _family_torch_function(
    torch: Any, norm: str, shape: tuple[int, ...], dtype: Any
) -> tuple[Callable[[Any], Any], tuple[Any, ...]]:
    """torch.nn.functional's counterpart of _family_layer, as a function of
    x, and the parameters it takes the gradients of"""
    F = torch.nn.functional
    features = shape[-1] if norm in ("layer", "rms") else shape[1]
    weight = torch.ones(features, dtype=dtype, requires_grad=True)
    bias = torch.zeros(features, dtype=dtype, requires_grad=True)
    if norm == "layer":
        return (lambda x: F.layer_norm(x, (features,), weight, bias, 1e-5)), (weight, bias)
    if norm == "rms":  # eps None on both sides: the dtype's machine epsilon
        return (lambda x: F.rms_norm(x, (features,), weight)), (weight,)
    if norm == "group":
        return (lambda x: F.group_norm(x, GROUPS, weight, bias, 1e-5)), (weight, bias)
    return (lambda x: F.instance_norm(x, weight=weight, bias=bias, eps=1e-5)), (weight, bias)


def _family_torch_runner(torch: Any, case: _Case, op: str) -> _Runner:
    """torch on the same data: the forward under no_grad, the backward as
    autograd.grad of x and the parameters on a graph made once and retained"""
    xt, dyt = torch.from_numpy(case.x), torch.from_numpy(case.dy)
    norm, parameters = _family_torch_function(torch, case.norm, case.x.shape, xt.dtype)
    if op == "forward":
        return _no_grad(torch, lambda: norm(xt))
    xg = xt.detach().requires_grad_(True)
    y = norm(xg)
    return lambda: torch.autograd.grad(y, (xg, *parameters), dyt, retain_graph=True)


def _reference_time(case: _Case, op: str, repeats: int) -> float | None:
    """The NumPy reference's median seconds for op (None for backward-inplace:
    the reference's backward is the same; None for the modules and the
    family: the reference is batch norm's)"""
    if op in ("backward-inplace", MODULE) or case.norm != "batch" or _is_half(case.x.dtype):
        return None
    runner = _reference_runner(case.x, case.dy, case.axis, op)
    return _medians({"ref": runner}, max(1, repeats // 4))["ref"]


def _bnpy_and_torch(
    case: _Case, op: str, torch: Any, out: _Array
) -> tuple[_Runner, _Runner | None]:
    """bnpy's runner and torch's (None without torch) for one op of a case"""
    x, dy, axis = case.x, case.dy, case.axis
    if op == MODULE:
        from bnpy.torch import BatchNorm2d

        ours = _module_runner(torch, BatchNorm2d, x, dy, axis)
        return ours, _module_runner(torch, torch.nn.BatchNorm2d, x, dy, axis)
    if case.norm != "batch":
        theirs = None if torch is None else _family_torch_runner(torch, case, op)
        return _family_bnpy_runner(case, op, out), theirs
    theirs = None if torch is None else _torch_runners(torch, x, dy, axis, op)
    return _bnpy_runner(x, dy, axis, op, out), theirs


def _runners(
    pool: ThreadPoolExecutor, case: _Case, op: str, threads: Sequence[int], torch: Any
) -> dict[_Key, _Runner]:
    """What is timed together for one op of a case: the copy (for the large
    cases also on the two threads of `pool`), and bnpy and torch at every
    thread count, so that the speedup compares moments alike; the thread
    counts share bnpy's out="""
    x, copy_out = case.x, case.copy_out
    out = np.empty_like(x)
    runners: dict[_Key, _Runner] = {"copy": lambda: np.copyto(copy_out, x)}
    if case.name in LARGE_CASES and 2 in threads:
        runners["copy2"] = lambda: _copy_on_two_threads(pool, copy_out, x)
    for n in threads:
        ours, theirs = _bnpy_and_torch(case, op, torch, out)
        runners["bnpy", n] = _OnThreads(n, ours, bnpy.set_num_threads)
        if theirs is not None:
            runners["torch", n] = _OnThreads(n, theirs, torch.set_num_threads)
    return runners


def _measure(
    pool: ThreadPoolExecutor,
    case: _Case,
    op: str,
    threads: Sequence[int],
    repeats: int,
    with_reference: bool,
    torch: Any,
) -> list[Row]:
    """One result dict per thread count for one op of a case"""
    reference_time = _reference_time(case, op, repeats) if with_reference else None
    t = _medians(_runners(pool, case, op, threads, torch), repeats)
    moved = case.x.nbytes * (5 if op == MODULE else 3 if op in BACKWARDS else 2)
    return [
        dict(
            case=case.name,
            norm=case.norm,
            dtype=case.x.dtype.name,
            op=op,
            threads=n,
            bnpy=t["bnpy", n],
            torch=t.get(("torch", n)),
            copy=t["copy"],
            copy2=t.get("copy2"),
            reference=reference_time,
            bytes=moved,
        )
        for n in threads
    ]


def _ops(
    shape: tuple[int, ...], torch: Any, norm: str = "batch", dtype: npt.DTypeLike = np.float32
) -> tuple[str, ...]:
    """The ops timed for a case of this shape: MODULE too for 4-D batch norm
    cases in float32 and float64 when torch is here; FAMILY_OPS for the
    family's."""
    if norm != "batch":
        return FAMILY_OPS
    module = torch is not None and len(shape) == 4 and not _is_half(np.dtype(dtype))
    return OPS + ((MODULE,) if module else ())


_FamilyCase = tuple[str, str, tuple[int, ...]]  # name, norm, shape: FAMILY_CASES


def _every_case(
    cases: Iterable[tuple[str, tuple[int, ...], int]], family: Iterable[_FamilyCase]
) -> list[tuple[str, tuple[int, ...], int, str]]:
    """(name, shape, axis, norm) of batch norm's cases, then the family's"""
    batch = [(name, shape, axis, "batch") for name, shape, axis in cases]
    return batch + [(name, shape, 1, norm) for name, norm, shape in family]


def run(
    cases: Iterable[tuple[str, tuple[int, ...], int]],
    dtypes: Sequence[npt.DTypeLike],
    threads: Sequence[int],
    repeats: int,
    with_reference: bool,
    torch: Any = None,
    echo: Callable[[str], object] = print,
    family: Iterable[_FamilyCase] = (),
    half: bool = True,
) -> list[Row]:
    """Measure every case, batch norm's and then the family's (HALF_CASES
    also in half precision when `half`: _case_dtypes); returns a list of
    result dicts (times in seconds)."""
    rows = []
    with ThreadPoolExecutor(2) as pool:  # the copy on two threads
        for name, shape, axis, norm in _every_case(cases, family):
            for dtype in _case_dtypes(name, norm, [np.dtype(d) for d in dtypes], half):
                case = _make_case(name, shape, axis, dtype, norm)
                for op in _ops(shape, torch, norm, dtype):
                    for row in _measure(pool, case, op, threads, repeats, with_reference, torch):
                        rows.append(row)
                        echo(format_row(row))
    return rows


def median_over_rounds(rounds: Sequence[Sequence[Row]]) -> list[Row]:
    """One row per measurement: each time the median of its rounds' medians."""

    def median(values: Iterable[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    combined = []
    for same in zip(*rounds):  # every round measures the same rows in the same order
        row = dict(same[0])
        for key in ("bnpy", "torch", "copy", "copy2", "reference"):
            row[key] = median([r.get(key) for r in same])
        combined.append(row)
    return combined


HEADER = (
    f"{'case':<26} {'dtype':<8} {'op':<16} {'thr':>3} {'bnpy ms':>9} {'GB/s':>6} "
    f"{'torch ms':>9} {'numpy ms':>9} {'copy ms':>8} {'bnpy/copy':>9} {'torch/copy':>10} "
    f"{'torch/bnpy':>10}"
)


def format_row(r: Row) -> str:
    def ms(t: float | None) -> str:
        return f"{t * 1e3:9.2f}" if t is not None else f"{'-':>9}"

    def torch_over(t: float) -> str:
        return f"{r['torch'] / t:10.2f}" if r["torch"] is not None else f"{'-':>10}"

    return (
        f"{r['case']:<26} {r['dtype']:<8} {r['op']:<16} {r['threads']:>3} {ms(r['bnpy'])} "
        f"{r['bytes'] / r['bnpy'] / 1e9:6.1f} {ms(r['torch'])} {ms(r['reference'])} "
        f"{r['copy'] * 1e3:8.2f} {r['bnpy'] / r['copy']:9.2f} {torch_over(r['copy'])} "
        f"{torch_over(r['bnpy'])}"
    )


def machine_description(torch: Any = None) -> str:
    """What the numbers were measured on."""
    lines = [
        f"- Python {platform.python_version()}, NumPy {np.__version__}, "
        f"bnpy {bnpy.__version__} (OpenMP: {bnpy.has_openmp()}; kernels built for "
        f"{bnpy.get_cpu_capability()!r}, of {', '.join(bnpy.cpu_capabilities())})"
        + (f", PyTorch {torch.__version__}" if torch is not None else ", no PyTorch")
    ]
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = ("Model name", "CPU(s):", "L1d", "L2", "L3", "Thread(s) per core")
        lines += [
            f"- {line.strip()}" for line in lscpu.splitlines() if line.strip().startswith(keep)
        ]
        lines += _cache_sizes_each()
    except (OSError, subprocess.SubprocessError):
        lines.append(
            f"- {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
        )
    return "\n".join(lines)


def _cache_sizes_each() -> list[str]:
    """lscpu's summary adds up the instances of a cache (2 cores' 1 MiB L2s
    read "2 MiB (2 instances)"): the size of one, from its table."""
    table = subprocess.run(
        ["lscpu", "-C=NAME,ONE-SIZE"], capture_output=True, text=True, timeout=10
    ).stdout.split()
    pairs = list(zip(table[2::2], table[3::2]))  # after the header NAME ONE-SIZE
    return (
        [f"- one of each cache: {', '.join(f'{n} {size}' for n, size in pairs)}"] if pairs else []
    )


LARGE_CASES = ("NCHW 64x64x56x56", "NCHW 128x64x56x56 (> L3)")


def targets(rows: Sequence[Row], rounds: Sequence[Sequence[Row]] = ()) -> list[str]:
    """The kernel-core issue's targets and the family's, each with the worst
    measured value, where it was measured and whether it was met (in the
    build that ran: --cpu-capability); given the rounds that rows
    combines (median_over_rounds), also what that worst value read in each
    round: on a shared machine a miss inside that range says little."""

    def pick(**match: object) -> list[int]:
        return [i for i, r in enumerate(rows) if all(r[k] == v for k, v in match.items())]

    def where(i: int) -> str:
        r = rows[i]
        return (
            f"{r['case']} {r['dtype']} {r['op']}, {r['threads']} "
            f"thread{'s' if r['threads'] != 1 else ''}"
        )

    _Measure = tuple[str, Callable[[Sequence[Row]], float]]  # (where, ratio in rows)

    def torch_over_bnpy(i: int) -> _Measure:
        return where(i), lambda rs: rs[i]["torch"] / rs[i]["bnpy"]

    def float32_over(i: int, single: int) -> _Measure:
        """float32's time over that of row i, the same case and op in a half"""
        return where(i), lambda rs: rs[single]["bnpy"] / rs[i]["bnpy"]

    def speedup_over_copys(i: int, one: int) -> _Measure:
        """bnpy's speedup from a second thread over the copy's own"""
        return where(
            i
        ), lambda rs: (rs[one]["bnpy"] / rs[i]["bnpy"]) / (rs[i]["copy"] / rs[i]["copy2"])

    lines = []

    def check(label: str, measures: Sequence[_Measure], limit: float) -> None:
        """measures: (where, ratio) pairs, ratio(rs) the value in rows rs;
        higher is better"""
        if not measures:
            return
        worst, name, ratio = min(((m[1](rows), *m) for m in measures), key=lambda m: m[0])
        each = [ratio(r) for r in rounds] if len(rounds) > 1 else []
        over = f"; in the {len(each)} rounds {min(each):.2f} to {max(each):.2f}" if each else ""
        lines.append(
            f"- {label}: worst {worst:.2f} ({'met' if worst >= limit else 'NOT met'}; "
            f"target >= {limit}), {name}{over}"
        )

    for threads, limit in ((1, 1.5), (2, 1.0)):
        check(
            f"batch norm, every case, dtype and op, {threads} "
            f"thread{'s' if threads > 1 else ''}: torch/bnpy",
            [
                torch_over_bnpy(i)
                for i in pick(threads=threads, norm="batch")
                if rows[i]["torch"] is not None
                and rows[i]["op"] != MODULE
                and rows[i]["dtype"] in ("float32", "float64")
            ],
            limit,
        )
    for half in ("float16", "bfloat16"):
        check(
            f"{half} batch norm at most 0.6x float32's time, every op, 1 thread: "
            f"float32's time / {half}'s (target >= 1/0.6)",
            [
                float32_over(i, single[0])
                for i in pick(dtype=half, threads=1, norm="batch")
                if (
                    single := pick(
                        case=rows[i]["case"], dtype="float32", op=rows[i]["op"], threads=1
                    )
                )
            ],
            round(1 / 0.6, 2),
        )
    check(
        "LayerNorm, GroupNorm, InstanceNorm and RMSNorm, every case, float32, forward "
        "and backward, 1 thread: torch/bnpy",
        [
            torch_over_bnpy(i)
            for i in pick(dtype="float32", threads=1)
            if rows[i]["norm"] != "batch" and rows[i]["torch"] is not None
        ],
        1.5,
    )
    check(
        "bnpy.torch.BatchNorm2d against torch.nn.BatchNorm2d, forward + backward, NCHW "
        "float32, 1 thread: torch/bnpy",
        [
            torch_over_bnpy(i)
            for i in pick(op=MODULE, dtype="float32", threads=1)
            if rows[i]["case"].startswith("NCHW")
        ],
        1.5,
    )
    speedups = []
    for i, r in enumerate(rows):
        one = pick(case=r["case"], dtype=r["dtype"], op=r["op"], threads=1)
        if r["case"] in LARGE_CASES and r["threads"] == 2 and r.get("copy2") and one:
            speedups.append(speedup_over_copys(i, one[0]))
    check("large cases: bnpy's speedup from a second thread / the copy's", speedups, 0.9)
    copies = [
        r["copy"] / r["copy2"]
        for r in rows
        if r["case"] in LARGE_CASES and r.get("copy2") is not None
    ]
    if copies:  # at best: load from elsewhere only slows one side
        lines.append(
            f"- for scale: np.copyto of the same cases split over 2 threads ran at "
            f"best {max(copies):.2f} times as fast as on 1 (the memory system's own "
            f"speedup: a pass that moves as many bytes cannot exceed it)"
        )
    return lines


def write_results(
    path: str,
    rows: Sequence[Row],
    torch: Any,
    command: str,
    steady: bool = False,
    rounds: Sequence[Sequence[Row]] = (),
) -> None:
    with open(path, "w") as f:
        f.write("# bnpy benchmark results\n\n")
        f.write(f"Measured with `{command}` on:\n\n{machine_description(torch)}\n\n")
        f.write(
            "Medians of interleaved repeats (and of whole rounds, with --rounds); "
            "bnpy writes into a preallocated `out=`. "
            "`backward-inplace` writes dx over dy (`out=dy`); torch's column there is its "
            "usual autograd backward, which has no in-place form. "
            "GB/s counts the bytes bnpy must move (forward: x and y; backward: x, dy, dx). "
            "copy is `np.copyto` of x's bytes. The family's rows (LayerNorm, GroupNorm, "
            "InstanceNorm, RMSNorm) time bnpy's layer, a training forward and a backward, "
            "both into `out=`, against `torch.nn.functional`'s function with a weight and "
            "bias (RMS: a weight); instance norm is affine on both sides. torch's forward "
            "runs under `no_grad`, its backward is `torch.autograd.grad` on a retained "
            "graph. The machine is shared and noisy: compare "
            "the ratios within a row, not times across runs."
        )
        f.write(
            " Freed memory stayed in the process (`--steady-heap`): torch's outputs reuse "
            "their pages instead of faulting new ones in, its fastest mode.\n\n"
            if steady
            else " glibc's malloc ran with its defaults: torch's outputs over 32 MiB fault "
            "in new pages on every call, smaller ones in some runs (see `--steady-heap`)."
            "\n\n"
        )
        f.write("## Against the targets\n\n" + "\n".join(targets(rows, rounds)) + "\n\n")
        f.write("## All measurements\n\n")
        f.write("```\n" + HEADER + "\n")
        for r in rows:
            f.write(format_row(r) + "\n")
        f.write("```\n")


def _norms(text: str) -> tuple[str, ...]:
    """--norms's value: the names in NORMS it lists ("family": all of FAMILY),
    in NORMS's order"""
    names: set[str] = set()
    for name in text.split(","):
        if name not in (*NORMS, "family"):
            raise argparse.ArgumentTypeError(
                f"unknown norm {name!r} (choose from {', '.join(NORMS)}, family)"
            )
        names.update(FAMILY if name == "family" else (name,))
    return tuple(n for n in NORMS if n in names)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """bench's options (python -m bnpy takes them as its bench command's: add_help=False)."""
    parser = argparse.ArgumentParser(
        prog="python -m bnpy bench", add_help=add_help, description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="small shapes, few repeats (a smoke test)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run everything this many times; report the median of the rounds",
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument(
        "--dtypes",
        default="float32,float64",
        help="comma-separated, of float32, float64, float16 and bfloat16 (ml_dtypes's)",
    )
    parser.add_argument(
        "--no-half",
        action="store_true",
        help=f"do not time {', '.join(HALF_CASES)} in float16 and bfloat16 as well "
        "(the default when float32 is timed)",
    )
    parser.add_argument(
        "--norms",
        type=_norms,
        default=NORMS,
        help=f"comma-separated, of {','.join(NORMS)} and family (= {','.join(FAMILY)}): "
        "batch is BatchNorm's cases, the others LayerNorm's, GroupNorm's, "
        "InstanceNorm's and RMSNorm's (default: all)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the slow NumPy reference")
    parser.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    parser.add_argument("--results", default=None, help="write a Markdown table to this file")
    parser.add_argument(
        "--cpu-capability",
        default=None,
        choices=("default", "avx2", "avx512"),
        help="time the kernels built for this instruction set (default: the best this CPU runs)",
    )
    parser.add_argument(
        "--steady-heap",
        action="store_true",
        help="keep freed memory in the process (glibc), so that torch's "
        "per-call outputs reuse pages: torch at its fastest",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv), argv)


def run_command(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the benchmark as parsed into args; argv, the options as given, for the results file."""
    steady = args.steady_heap and steady_heap()
    if args.steady_heap and not steady:
        print(
            "(--steady-heap: this C library's malloc does not take glibc's settings; "
            "timing with its defaults)"
        )
    torch: Any = None
    if not args.no_torch:
        try:
            import torch as torch_module

            torch = torch_module
        except ImportError:
            print("(PyTorch is not installed: timing bnpy, NumPy and the copy only)")
    cases = (QUICK_CASES if args.quick else CASES) if "batch" in args.norms else []
    family = [c for c in (QUICK_FAMILY_CASES if args.quick else FAMILY_CASES) if c[1] in args.norms]
    repeats = args.repeats or (3 if args.quick else 11)
    threads = [int(t) for t in args.threads.split(",")]
    dtypes = [_dtype(d) for d in args.dtypes.split(",")]
    threads_before, capability_before = bnpy.get_num_threads(), bnpy.get_cpu_capability()
    if args.cpu_capability:
        bnpy.set_cpu_capability(args.cpu_capability)
    print(f"bnpy kernels built for {bnpy.get_cpu_capability()!r}")
    print(HEADER)
    rows_per_round = len(threads) * sum(
        len(_ops(shape, torch, norm, dtype))
        for name, shape, _, norm in _every_case(cases, family)
        for dtype in _case_dtypes(name, norm, dtypes, not args.no_half)
    )
    progress = Progress(rows_per_round * args.rounds, "bench: measurement")

    def echo(line: str) -> None:
        progress.advance()
        progress.print(line)

    try:
        rounds = []
        for k in range(args.rounds):
            if args.rounds > 1:
                progress.print(f"round {k + 1} of {args.rounds}")
            rounds.append(
                run(
                    cases,
                    dtypes,
                    threads,
                    repeats,
                    not args.no_reference,
                    torch,
                    echo,
                    family,
                    not args.no_half,
                )
            )
        progress.close()
        rows = median_over_rounds(rounds)
        if args.rounds > 1:
            print(f"\nmedians of {args.rounds} rounds\n{HEADER}")
            for row in rows:
                print(format_row(row))
        print("\nAgainst the targets:\n" + "\n".join(targets(rows, rounds)))
        if args.results:  # while the build that ran is still chosen: the file names it
            write_results(
                args.results,
                rows,
                torch,
                "python -m bnpy bench " + " ".join(argv or sys.argv[1:]),
                steady,
                rounds,
            )
            print(f"\nwrote {args.results}")
    finally:
        progress.close()
        bnpy.set_num_threads(threads_before)
        bnpy.set_cpu_capability(capability_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
