"""The benchmark script runs and reports (speed itself is never asserted here)."""

import importlib.util
import platform
import subprocess
import sys

import numpy as np
import pytest

from bnpy import bench


def test_quick_benchmark_writes_a_results_table(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    assert (
        bench.main(
            [
                "--quick",
                "--no-reference",
                "--threads",
                "1",
                "--dtypes",
                "float64",
                "--repeats",
                "1",
                "--results",
                str(results),
            ]
        )
        == 0
    )
    text = results.read_text()
    assert "## Against the targets" in text and bench.HEADER in text
    table = text.split(bench.HEADER, 1)[1]
    rows = [line for line in table.splitlines() if " float64 " in line]
    with_torch = importlib.util.find_spec("torch") is not None  # then 4-D cases add "module"
    # by default batch norm's cases, then the family's
    assert len(rows) == sum(
        len(bench.OPS) + (with_torch and len(shape) == 4) for _, shape, _ in bench.QUICK_CASES
    ) + len(bench.FAMILY_OPS) * len(bench.QUICK_FAMILY_CASES)
    assert (" module " in table) == with_torch
    assert rows[-1].startswith(bench.QUICK_FAMILY_CASES[-1][0])
    assert "bnpy/copy" in capsys.readouterr().out


def test_norms_family_times_the_family_alone_against_torch(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    args = ["--quick", "--norms", "family", "--threads", "1", "--dtypes", "float32"]
    assert bench.main([*args, "--repeats", "1", "--results", str(results)]) == 0
    table = results.read_text().split(bench.HEADER, 1)[1]
    rows = [line.split() for line in table.splitlines() if " float32 " in line]
    names = [name for name, _, _ in bench.QUICK_FAMILY_CASES]
    # every family case forward then backward, and nothing of batch norm's
    assert [(" ".join(row[:2]), row[3]) for row in rows] == [
        (name, op) for name in names for op in bench.FAMILY_OPS
    ]
    assert "torch/copy" in bench.HEADER
    out = capsys.readouterr().out
    with_torch = importlib.util.find_spec("torch") is not None
    assert ("LayerNorm, GroupNorm, InstanceNorm and RMSNorm" in out) == with_torch
    assert "batch norm, every case" not in out


@pytest.mark.parametrize(
    "text, norms",
    [
        ("family", bench.FAMILY),
        ("rms,batch", ("batch", "rms")),
        ("layer,family", bench.FAMILY),
        ("batch,layer,group,instance,rms", bench.NORMS),
    ],
)
def test_norms_lists_what_it_picks_in_one_order(text, norms):
    assert bench.build_parser().parse_args(["--norms", text]).norms == norms
    assert bench.build_parser().parse_args([]).norms == bench.NORMS  # the default: all


@pytest.mark.parametrize("name, norm, shape", bench.QUICK_FAMILY_CASES)
def test_family_rows_time_bnpy_and_torch_doing_the_same(torch, name, norm, shape):
    import numpy as np

    case = bench._make_case(name, shape, 1, np.float64, norm)
    out = np.empty_like(case.x)
    y = bench._family_torch_runner(torch, case, "forward")()
    assert y.grad_fn is None  # under no_grad
    assert bench._family_bnpy_runner(case, "forward", out)() is out
    np.testing.assert_allclose(out, y.numpy(), rtol=1e-10, atol=1e-10)
    dx = bench._family_torch_runner(torch, case, "backward")()[0]
    assert bench._family_bnpy_runner(case, "backward", out)() is out
    np.testing.assert_allclose(out, dx.numpy(), rtol=1e-10, atol=1e-10)
    # the same parameters, whose gradients both compute
    layer = bench._family_layer(norm, shape, np.float64)
    function, parameters = bench._family_torch_function(torch, norm, shape, torch.float64)
    xt = torch.from_numpy(case.x).requires_grad_(True)
    _, *grads = torch.autograd.grad(function(xt), (xt, *parameters), torch.from_numpy(case.dy))
    layer.forward(case.x)
    layer.backward(case.dy)
    ours = [g for g in (layer.grad_gamma, layer.grad_beta) if g is not None]
    assert len(ours) == len(grads) == (1 if norm == "rms" else 2)
    for mine, theirs in zip(ours, grads):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-10, atol=1e-10)


def test_targets_are_judged_from_the_measurements():
    def row(case, op, threads, bnpy, torch, copy2=None):
        return dict(
            case=case,
            norm="batch",
            dtype="float32",
            op=op,
            threads=threads,
            bnpy=bnpy,
            torch=torch,
            copy=1.0,
            copy2=copy2,
            reference=None,
            bytes=1,
        )

    rows = [
        row("NCHW 64x64x56x56", "module", 1, 1.0, 1.4),  # judged apart: below
        row("NCHW 64x64x56x56", "forward-train", 1, 1.2, 2.0),
        row("NCHW 64x64x56x56", "forward-train", 2, 0.8, 0.9, copy2=0.625),
        row("NCHW 64x64x56x56", "backward", 1, 2.5, 3.0),
        row("NCHW 64x64x56x56", "backward", 2, 2.0, 2.2, copy2=0.5),
    ]
    lines = "\n".join(bench.targets(rows))
    # 1 thread: torch 2.0 / 1.2 and 3.0 / 2.5; the worst is the backward
    assert (
        "every case, dtype and op, 1 thread: torch/bnpy: worst 1.20 (NOT met; "
        "target >= 1.5), NCHW 64x64x56x56 float32 backward, 1 thread"
    ) in lines
    assert (
        "bnpy.torch.BatchNorm2d against torch.nn.BatchNorm2d, forward + backward, NCHW "
        "float32, 1 thread: torch/bnpy: worst 1.40 (NOT met; target >= 1.5)"
    ) in lines
    # 2 threads: 0.9 / 0.8 and 2.2 / 2.0
    assert (
        "every case, dtype and op, 2 threads: torch/bnpy: worst 1.10 (met; "
        "target >= 1.0), NCHW 64x64x56x56 float32 backward, 2 threads"
    ) in lines
    # forward: 1.2 / 0.8 = 1.5 against the copy's 1.6; backward 1.25 against 2.0
    assert (
        "large cases: bnpy's speedup from a second thread / the copy's: worst 0.62 "
        "(NOT met; target >= 0.9), NCHW 64x64x56x56 float32 backward, 2 threads"
    ) in lines


def test_the_family_is_judged_apart_from_batch_norm_in_float32_at_1_thread():
    def row(case, norm, dtype, op, threads, bnpy, torch):
        return dict(
            case=case,
            norm=norm,
            dtype=dtype,
            op=op,
            threads=threads,
            bnpy=bnpy,
            torch=torch,
            copy=1.0,
            copy2=None,
            reference=None,
            bytes=1,
        )

    rows = [
        row("NCHW 64x64x56x56", "batch", "float32", "forward-train", 1, 1.0, 1.8),
        row("LayerNorm 32x128x768", "layer", "float32", "forward", 1, 1.0, 2.0),
        row("RMSNorm 32x128x768", "rms", "float32", "backward", 1, 1.0, 1.6),
        row("RMSNorm 32x128x768", "rms", "float64", "backward", 1, 1.0, 1.1),  # no target
        row("RMSNorm 32x128x768", "rms", "float32", "backward", 2, 1.0, 0.5),  # no target
    ]
    lines = "\n".join(bench.targets(rows))
    assert (
        "batch norm, every case, dtype and op, 1 thread: torch/bnpy: worst 1.80 (met; "
        "target >= 1.5), NCHW 64x64x56x56 float32 forward-train, 1 thread"
    ) in lines
    assert (
        "LayerNorm, GroupNorm, InstanceNorm and RMSNorm, every case, float32, forward and "
        "backward, 1 thread: torch/bnpy: worst 1.60 (met; target >= 1.5), "
        "RMSNorm 32x128x768 float32 backward, 1 thread"
    ) in lines
    assert "2 threads" not in lines  # batch norm's 2-thread target has no rows here
    rows[2]["torch"] = 1.2
    assert "worst 1.20 (NOT met; target >= 1.5), RMSNorm" in "\n".join(bench.targets(rows))


def test_targets_give_the_worst_case_over_the_rounds():
    def row(case, threads, bnpy, torch):
        return dict(
            case=case,
            norm="batch",
            dtype="float32",
            op="forward-train",
            threads=threads,
            bnpy=bnpy,
            torch=torch,
            copy=1.0,
            copy2=0.5,
            reference=None,
            bytes=1,
        )

    def measured(small, large, large_on_two, torch):
        return [
            row("NCHW 8x64x112x112", 1, small, torch),
            row("NCHW 64x64x56x56", 1, large, torch),
            row("NCHW 64x64x56x56", 2, large_on_two, torch),
        ]

    rounds = [
        measured(1.1, 1.25, 0.5, 2.0),
        measured(1.4, 1.2, 0.8, 2.4),
        measured(1.2, 1.3, 0.6, 2.2),
    ]
    lines = "\n".join(bench.targets(bench.median_over_rounds(rounds), rounds))
    # the worst median (not the first case), then that case in each round:
    # torch 2.2 / 1.25; each round 2.0 / 1.25, 2.4 / 1.2, 2.2 / 1.3
    assert (
        "1 thread: torch/bnpy: worst 1.76 (met; target >= 1.5), NCHW 64x64x56x56 "
        "float32 forward-train, 1 thread; in the 3 rounds 1.60 to 2.00"
    ) in lines
    # threads: 1.25 / 0.6 over the copy's 2; each round 1.25 / 0.5, 1.2 / 0.8, 1.3 / 0.6
    assert (
        "the copy's: worst 1.04 (met; target >= 0.9), NCHW 64x64x56x56 "
        "float32 forward-train, 2 threads; in the 3 rounds 0.75 to 1.25"
    ) in lines
    # one round: nothing to range over
    assert "rounds" not in "\n".join(bench.targets(rounds[0], rounds[:1]))


def test_targets_give_the_copys_own_speedup_from_a_second_thread():
    def row(case, op, threads, copy2):
        return dict(
            case=case,
            norm="batch",
            dtype="float32",
            op=op,
            threads=threads,
            bnpy=1.0,
            torch=None,
            copy=1.0,
            copy2=copy2,
            reference=None,
            bytes=1,
        )

    rows = [
        row("NCHW 64x64x56x56", "forward-eval", 2, 0.9),
        row("NCHW 128x64x56x56 (> L3)", "forward-eval", 2, 0.8),
        row("NCHW 32x256x28x28", "forward-eval", 2, None),
    ]
    lines = "\n".join(bench.targets(rows))
    assert "split over 2 threads ran at best 1.25 times as fast as on 1" in lines
    # not measured (no second thread timed): no line
    assert "split over" not in "\n".join(bench.targets([rows[2]]))


def test_the_copy_on_two_threads_copies_every_value():
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    x = np.arange(7 * 3 * 5, dtype=np.float32).reshape(7, 3, 5)
    out = np.zeros_like(x)
    with ThreadPoolExecutor(2) as pool:
        bench._copy_on_two_threads(pool, out, x)
    assert np.array_equal(out, x)


def test_runs_on_different_thread_counts_alternate_each_on_its_own_count():
    import bnpy

    seen = []

    def record(label):
        return lambda: seen.append((label, bnpy.get_num_threads()))

    before = bnpy.get_num_threads()
    try:
        bench._medians(
            {
                "one": bench._OnThreads(1, record("one"), bnpy.set_num_threads),
                "two": bench._OnThreads(2, record("two"), bnpy.set_num_threads),
                "plain": record("plain"),
            },
            repeats=2,
        )
    finally:
        bnpy.set_num_threads(before)
    # a warm-up call each, then the repeats in turn; a plain runner keeps the last count
    assert seen == [("one", 1), ("two", 2), ("plain", 2)] * 3


def test_rounds_combine_into_the_median_of_each_time():
    def row(bnpy, torch):
        return dict(
            case="NC 2x3",
            dtype="float32",
            op="backward",
            threads=1,
            bnpy=bnpy,
            torch=torch,
            copy=1.0,
            reference=None,
            bytes=1,
        )

    rounds = [[row(3.0, None)], [row(1.0, 5.0)], [row(2.0, 4.0)]]
    rounds[1][0]["copy2"] = 0.5
    (combined,) = bench.median_over_rounds(rounds)
    assert (combined["bnpy"], combined["torch"], combined["copy"]) == (2.0, 4.5, 1.0)
    assert combined["reference"] is None and combined["copy2"] == 0.5


@pytest.mark.parametrize("op", ["forward-train", "forward-eval"])
def test_torch_s_forward_records_no_graph(torch, op):
    import numpy as np

    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    y = bench._torch_runners(torch, x, x.copy(), 1, op)()
    # under no_grad when called, not only when made: its weight requires grad
    assert y.grad_fn is None and not y.requires_grad


# In a child process: steady_heap changes the allocator of the whole process.
FAULTS_OF_A_FRESH_ARRAY = """
import resource
import numpy as np
from bnpy import bench

def faults_of_a_fresh_64_mib_array():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(8 << 20)  # every page written
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del a
    return faults

default = faults_of_a_fresh_64_mib_array()
assert bench.steady_heap()
faults_of_a_fresh_64_mib_array()  # the first one grows the heap
print(default, faults_of_a_fresh_64_mib_array())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="steady_heap sets glibc's malloc")
def test_steady_heap_reuses_freed_pages_instead_of_faulting_in_new_ones():
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_A_FRESH_ARRAY], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    default, steady = map(int, done.stdout.split())
    assert steady * 10 < default, (default, steady)


def _compare_builds():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "compare_builds.py"
    spec = importlib.util.spec_from_file_location("compare_builds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_builds_reports_the_median_time_and_ratio_of_the_rounds():
    compare = _compare_builds()
    rounds = [(1.0, 2.0), (3.0, 1.0), (2.0, 3.0)]  # (seconds, ratio to the copy) per round
    results = {"main": {"1x2x3x4": dict.fromkeys(compare.PASSES, rounds)}}
    lines = compare.table(["main"], results).splitlines()
    assert lines[0].split() == ["1x2x3x4", "main"]
    assert len(lines) == 1 + len(compare.PASSES)
    assert all(line.split()[1:] == ["2000.00", "ms", "(2.00x)"] for line in lines[1:])


def test_half_rows_join_float32_for_the_half_cases_only():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    halves = bench.half_dtypes()
    assert halves[0] == np.float16
    assert bench._case_dtypes("NCHW 64x64x56x56", "batch", [f32, f64], True) == [f32, f64, *halves]
    assert bench._case_dtypes("NCHW 64x64x56x56", "batch", [f64], True) == [f64]  # no ratio
    assert bench._case_dtypes("NCHW 64x64x56x56", "batch", [f32], False) == [f32]  # --no-half
    assert bench._case_dtypes("NC 256x1024", "batch", [f32], True) == [f32]
    given = [f32, *halves]  # --dtypes float32,float16,...: the family keeps float32
    assert bench._case_dtypes("LayerNorm 32x128x768", "layer", given, True) == [f32]


def _row(**fields):
    """one measurement as bench.run gives it: batch norm's NCHW 64x64x56x56,
    float32, 1 thread, times of 1 s, but for fields"""
    row = dict(case="NCHW 64x64x56x56", norm="batch", dtype="float32", op="forward-train")
    row.update(threads=1, bnpy=1.0, torch=None, copy=1.0, copy2=None, reference=None, bytes=1)
    return {**row, **fields}


def test_half_precision_is_judged_by_its_time_against_float32s():
    def row(dtype, op, bnpy, threads=1):
        return _row(dtype=dtype, op=op, bnpy=bnpy, threads=threads)

    rows = [
        row("float32", "forward-train", 5.0),
        row("float32", "backward", 8.0),
        row("float16", "forward-train", 2.5),  # 2.0: met
        row("float16", "backward", 6.4),  # 1.25: not met, the worst
        row("float16", "backward", 1.0, threads=2),  # no target
    ]
    lines = "\n".join(bench.targets(rows))
    assert (
        "float16 batch norm at most 0.6x float32's time, every op, 1 thread: float32's time / "
        "float16's (target >= 1/0.6): worst 1.25 (NOT met; target >= 1.67), "
        "NCHW 64x64x56x56 float16 backward, 1 thread"
    ) in lines
    assert "bfloat16" not in lines  # no rows, no line
    rows[3]["bnpy"] = 4.0
    assert "worst 2.00 (met; target >= 1.67)" in "\n".join(bench.targets(rows))


def test_torch_runs_half_batch_norm_with_float32_parameters(torch):
    x = np.random.default_rng(0).standard_normal((4, 3, 5), np.float32)
    for dtype in bench.half_dtypes():
        xh = x.astype(dtype)
        tensor = bench._tensor(torch, xh)
        assert tensor.dtype in (torch.float16, torch.bfloat16)
        assert np.array_equal(tensor.float().numpy(), xh.astype(np.float32))  # same values
        y = bench._torch_runners(torch, xh, xh, 1, "forward-train")()
        assert y.dtype == tensor.dtype


def test_quick_benchmark_times_its_half_case_in_the_halves(capsys):
    argv = ["--quick", "--no-reference", "--threads", "1", "--dtypes", "float32"]
    assert bench.main([*argv, "--norms", "batch", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    half_case = next(name for name, _, _ in bench.QUICK_CASES if name in bench.HALF_CASES)
    for dtype in bench.half_dtypes():
        rows = [line for line in out.splitlines() if line.startswith(half_case)]
        timed = {line[len(half_case) :].split()[1] for line in rows if f" {dtype.name} " in line}
        assert timed == set(bench.OPS)  # every op but the module's
        assert f"{dtype.name} batch norm at most 0.6x float32's time" in out
    assert bench.main([*argv, "--norms", "batch", "--repeats", "1", "--no-half"]) == 0
    assert " float16 " not in capsys.readouterr().out
