"""Time two or more versions of bnpy side by side, in the benchmark's setting.

    python benchmarks/compare_builds.py [--rounds 5] [--shapes "[(32,256,28,28)]"]
                                        [--axis 1] [--dtype float32] REV_OR_DIR ...

Each argument is a git revision of this repository (exported with
`git archive` and built in a temporary directory) or a directory holding a
built bnpy. Every round runs one Python process per version, in turn, and
each process times bnpy's passes at 1 thread (by default on NCHW float32
shapes; `--axis -1` makes them channels-last, as the benchmark's NHWC case;
`--dtype float16` or `bfloat16` times half x with a float32 layer, as the
benchmark does)
with that version's own benchmark runners (`bnpy.bench`), interleaved repeat by
repeat with a copy of the same bytes (`np.copyto`). The table gives, per
version, the median time and the median ratio to the copy of the same
process: on a shared, noisy machine the ratio is what compares.

It exists because a C harness that runs one pass back to back on warm data
can miss what the benchmark sees: a change the harness found neutral took
the in-place backward of 32x256x28x28 from 1.15 to 1.47 times a copy here.

With --one-process, one process loads every version's extension
(bnpy/_core*.so, under a name of its own) and times them call by call in
turn, each call just after a copy of x: the versions then share every
moment of the machine's load, which separates differences of a few percent
on a busy machine where separate processes cannot. Each table cell is then
the median over the repeats.

BNPY_CPU_CAPABILITY (avx2, avx512, default) chooses the kernels' build in
every version, in either mode, as it does for bnpy.
"""

import argparse
import ast
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSES = ("forward-train", "forward-eval", "backward", "backward-inplace")  # bench.OPS

# Run in each version's own process, with that version's benchmark runners
# (bnpy.bench); prints {shape: {pass: median seconds}}, the copy's too.
CHILD = r"""
import json, sys
import numpy as np
import bnpy
from bnpy import bench

bnpy.set_num_threads(1)
shapes, passes, repeats = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
axis, dtype = int(sys.argv[4]), bench._dtype(sys.argv[5])
out = {}
for shape in shapes:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    copied = np.empty_like(x)
    runners = {name: bench._bnpy_runner(x, dy, axis, name) for name in passes}
    runners["copy"] = lambda: np.copyto(copied, x)
    out["x".join(map(str, shape))] = bench._medians(runners, repeats)
print(json.dumps(out))
"""


def load_core(directory, name):
    """The extension module bnpy._core built in directory, loaded as `name`"""
    import glob
    import importlib.machinery
    import importlib.util

    path = glob.glob(os.path.join(directory, "bnpy", "_core*.so"))[0]
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def core_runner(core, x, dy, axis, name, out):
    """A call of `core`'s BatchNorm doing pass `name` into out, as
    bench._bnpy_runner does with bnpy's"""
    import numpy as np

    from bnpy.bench import _is_half

    layer_dtype = np.float32 if _is_half(x.dtype) else x.dtype
    bn = core.BatchNorm(x.shape[axis], axis=axis, dtype=layer_dtype)
    if name == "forward-train":
        return lambda: bn.forward(x, out=out)
    if name == "forward-eval":
        bn.eval()
        return lambda: bn.forward(x, out=out)
    bn.forward(x)
    if name == "backward-inplace":
        np.copyto(out, dy)
        return lambda: bn.backward(out, out=out)
    return lambda: bn.backward(dy, out=out)


def time_in_one_process(directories, shapes, repeats, axis, dtype, passes):
    """results[spec][shape][pass]: (seconds, ratio to the copy just before) per repeat,
    every version's call in turn within each repeat"""
    import time

    import numpy as np

    from bnpy.bench import _dtype

    dtype = _dtype(dtype)
    cores = {
        spec: load_core(d, f"bnpy_version_{k}._core")
        for k, (spec, d) in enumerate(directories.items())
    }
    capability = os.environ.get("BNPY_CPU_CAPABILITY")  # as bnpy's import applies it
    for core in cores.values():
        core.set_num_threads(1)
        if capability:
            core.set_cpu_capability(capability)
    results = {
        spec: collections.defaultdict(lambda: collections.defaultdict(list)) for spec in directories
    }
    for shape in shapes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        copied = np.empty_like(x)
        # one output for every version, so that all write the same pages (arrays
        # of their own could differ in how they lie on pages, huge or not)
        out = np.empty_like(x)
        key = "x".join(map(str, shape))
        for name in passes:
            runners = {
                spec: core_runner(core, x, dy, axis, name, out) for spec, core in cores.items()
            }
            for _ in range(repeats):
                for spec, run in runners.items():
                    start = time.perf_counter()
                    np.copyto(copied, x)
                    middle = time.perf_counter()
                    run()
                    end = time.perf_counter()
                    results[spec][key][name].append(
                        (end - middle, (end - middle) / (middle - start))
                    )
    return results


def built_version(spec, workdir):
    """A directory with a built bnpy: spec itself, or git revision spec built in workdir."""
    if os.path.isdir(spec):
        return os.path.realpath(spec)  # the same from the version's own directory
    target = os.path.join(workdir, spec.replace("/", "_"))
    os.makedirs(target)
    archive = subprocess.run(["git", "-C", REPO, "archive", spec], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    built = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=target,
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        raise RuntimeError(f"building {spec} failed:\n{built.stderr}")
    return target


def time_version(directory, shapes, repeats, axis=1, dtype="float32", passes=PASSES):
    env = dict(os.environ, PYTHONPATH=directory, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            json.dumps(shapes),
            json.dumps(passes),
            str(repeats),
            str(axis),
            dtype,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=directory,
    )
    if done.returncode != 0:
        raise RuntimeError(f"timing {directory} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def table(specs, results, passes=PASSES):
    """results[spec][shape][pass]: per round, the median seconds and ratio to the copy"""
    lines = []
    for shape in results[specs[0]]:
        lines.append(shape + "".join(f"  {spec[:24]:>24}" for spec in specs))
        for name in passes:
            cells = []
            for spec in specs:
                rounds = results[spec][shape][name]
                ms = statistics.median(t for t, _ in rounds) * 1e3
                ratio = statistics.median(r for _, r in rounds)
                cells.append(f"{ms:9.2f} ms ({ratio:4.2f}x)")
            lines.append(f"  {name:<16}" + "".join(f"  {c:>24}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "versions", nargs="+", help="git revisions or directories with a built bnpy"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15, help="repeats per process")
    parser.add_argument(
        "--shapes",
        default="[(32,256,28,28),(8,64,112,112),(128,64,56,56)]",
        help="a Python list of shapes of x",
    )
    parser.add_argument("--axis", type=int, default=1, help="the feature axis (-1: channels-last)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16")
    )
    parser.add_argument(
        "--passes",
        default=",".join(PASSES),
        help="the passes to time, comma-separated (default: all four)",
    )
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="time every version in one process, call by call (see above)",
    )
    args = parser.parse_args(argv)
    shapes = [list(shape) for shape in ast.literal_eval(args.shapes)]
    passes = tuple(args.passes.split(","))
    unknown = sorted(set(passes) - set(PASSES))
    if unknown:
        parser.error(
            f"--passes: unknown {', '.join(unknown)}; expected some of {', '.join(PASSES)}"
        )
    results = {
        spec: collections.defaultdict(lambda: collections.defaultdict(list))
        for spec in args.versions
    }
    with tempfile.TemporaryDirectory() as workdir:
        directories = {spec: built_version(spec, workdir) for spec in args.versions}
        if args.one_process:
            results = time_in_one_process(
                directories, shapes, args.rounds * args.repeats, args.axis, args.dtype, passes
            )
            print(table(args.versions, results, passes))
            return 0
        for _ in range(args.rounds):
            for spec, directory in directories.items():
                for shape, times in time_version(
                    directory, shapes, args.repeats, args.axis, args.dtype, passes
                ).items():
                    for name in passes:
                        results[spec][shape][name].append(
                            (times[name], times[name] / times["copy"])
                        )
    print(table(args.versions, results, passes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
