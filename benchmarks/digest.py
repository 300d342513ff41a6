"""Print a SHA-256 over every result bnpy computes, to show bits kept.

A kernel change that keeps the digest left every result bitwise as it was.

    python benchmarks/digest.py [--quick] [REV_OR_DIR ...]

With no version named, it digests the bnpy this Python imports, once for
every build the CPU runs (`bnpy.cpu_capabilities()`) and for 1 and 2
threads. The results must not depend on either (README.md: threads, and
the builds), so the digests must agree: the script prints the one digest,
or, if they differ, which settings gave what, and exits with 1.

Each named version (a git revision, built in a temporary directory, or a
directory holding a bnpy built in place, as compare_builds.py takes them)
runs the same in a process of its own, which must import that version's
compiled core, not an installed one; the script prints each version's
digest and whether they agree:

    python setup.py build_ext --inplace && python benchmarks/digest.py HEAD~1 .

A second line, `family <sha-256>`, digests layer, RMS, group and instance
norm (their y, dx and parameter gradients, and instance norm's running
statistics) on shapes of their own; it is left out for a bnpy without them.

What goes in, for each shape and both dtypes: the training forward's y and
running statistics; dx of the backward, fresh, into `out=` and in place over
dy; dgamma and dbeta; the inference forward and backward, and the dgamma
and dbeta of the latter. The shapes reach every path of the kernels: long
planar rows (pipelined, and from memory), short rows in tiles (from memory
too) and spread over wide rows, interleaved (channels-last) rows, and
outputs large enough to stream, of planar rows and of wide rows a multiple
of 16 values. `--quick` takes a few small shapes (for the tests).
"""

import argparse
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

SHAPES = [
    (4, 6, 300, 301),
    (3, 5, 1000, 7),
    (2, 3, 2049),
    (130, 4, 3137),
    (64, 8, 56, 56),
    (32, 16, 28, 28),
    (8, 4, 112, 112),
    (2, 3, 200000),
    (2000, 3, 300),
    (30000, 3, 20),
    (400000, 3, 1),
    (256, 1024),
    (64, 40, 7, 7),
    (16, 3, 64, 64),
    (5, 7),
    (1, 3, 5),
    (300, 2, 4097),
    (20, 5, 16384),
    (17, 64, 64, 64),
    (2, 4, 600000),
    (262144, 16),
    (65536, 64),  # wide rows of 32 and 64 values, 16 MiB
    (64, 512, 7, 7),
]  # short rows from memory, too many features to spread
QUICK_SHAPES = [(4, 6, 30, 31), (3, 5, 1000, 7), (2000, 3), (64, 40, 7, 7), (5, 7)]
# the family (layer, RMS, group and instance norm) on shapes with rows of a
# few values, of tails, of several tiles, and large enough to stream
FAMILY_SHAPES = [
    (32, 64, 300),
    (8, 16, 28, 28),
    (2, 4, 5000),
    (4, 64, 128, 128),
    (64, 8, 7, 7),
    (6, 4, 3),
]
QUICK_FAMILY_SHAPES = [(8, 16, 28, 28), (6, 4, 3)]
THREADS = (1, 2)


def results_of(shape, dtype, seed):
    """Every array bnpy computes for one x of `shape`, in a fixed order"""
    import bnpy

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    bn = bnpy.BatchNorm(shape[1], dtype=dtype)
    bn.gamma[...] = rng.standard_normal(shape[1])
    bn.beta[...] = rng.standard_normal(shape[1])
    y = bn.forward(x)
    dx = bn.backward(dy)
    dx_out = np.empty_like(dy)
    bn.backward(dy, out=dx_out)
    dx_over_dy = dy.copy()
    bn.backward(dx_over_dy, out=dx_over_dy)
    yield from (
        y,
        dx,
        dx_out,
        dx_over_dy,
        bn.grad_gamma,
        bn.grad_beta,
        bn.running_mean,
        bn.running_var,
    )
    bn.eval()
    yield bn.forward(x)
    yield bn.backward(dy)
    yield from (bn.grad_gamma, bn.grad_beta)


def family_results_of(shape, dtype, seed):
    """Every array layer, RMS, group and instance norm compute for one x of
    `shape`, in a fixed order: each layer's y, dx, dgamma and dbeta"""
    import bnpy

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[1]
    layers = [
        bnpy.LayerNorm(shape[-1], dtype=dtype),
        bnpy.RMSNorm(shape[-1], dtype=dtype),
        bnpy.GroupNorm(2 if channels % 2 == 0 else 1, channels, dtype=dtype),
        bnpy.GroupNorm(1, shape[-1], axis=-1, dtype=dtype),
        bnpy.InstanceNorm(channels, affine=True, track_running_stats=True, dtype=dtype),
    ]
    for layer in layers:
        layer.gamma = rng.standard_normal(layer.gamma.shape)
        if layer.beta is not None:
            layer.beta = rng.standard_normal(layer.beta.shape)
        yield layer.forward(x)
        yield layer.backward(dy)
        yield from (layer.grad_gamma, layer.grad_beta if layer.beta is not None else dy[:0])
    yield from (layers[-1].running_mean, layers[-1].running_var)


def family_digest(shapes):
    """The SHA-256 (hex) of family_results_of every shape and both dtypes"""
    h = hashlib.sha256()
    for seed, shape in enumerate(shapes):
        for dtype in (np.float32, np.float64):
            for a in family_results_of(shape, dtype, seed):
                h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def digest(shapes):
    """The SHA-256 (hex) of results_of every shape, both dtypes, under the
    current build and thread count"""
    h = hashlib.sha256()
    for seed, shape in enumerate(shapes):
        for dtype in (np.float32, np.float64):
            for a in results_of(shape, dtype, seed):
                h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def digests(shapes, family_shapes=()):
    """{(build, threads): digest} for every build the CPU runs and THREADS,
    with the family's digest after a space when there are family_shapes; the
    build and thread count are set back as they were (the thread count as a
    number: one that followed OpenMP's default stays fixed at it)"""
    import bnpy

    build, threads = bnpy.get_cpu_capability(), bnpy.get_num_threads()
    out = {}
    try:
        for cap in bnpy.cpu_capabilities():
            bnpy.set_cpu_capability(cap)
            for n in THREADS:
                bnpy.set_num_threads(n)
                out[cap, n] = digest(shapes)
                if family_shapes:
                    out[cap, n] += " " + family_digest(family_shapes)
    finally:
        bnpy.set_cpu_capability(build)
        bnpy.set_num_threads(threads)
    return out


def digest_here(shapes, family_shapes=()):
    """Prints the one digest of this process's bnpy (and of its family on a
    line of its own, when it has one), or the settings that disagree; 0 when
    they agree, else 1"""
    import bnpy

    family_shapes = family_shapes if hasattr(bnpy, "LayerNorm") else ()
    found = digests(shapes, family_shapes)
    if len(set(found.values())) == 1:
        print(
            "digest {}\nfamily {}".format(*next(iter(found.values())).split())
            if family_shapes
            else f"digest {next(iter(found.values()))}"
        )
        return 0
    print("the builds and thread counts disagree:")
    for (cap, threads), hexdigest in found.items():
        print(f"  {cap:<8} {threads} thread{'s' * (threads > 1)}  {hexdigest}")
    return 1


def digest_of_version(directory, quick):
    """The digest of the bnpy built in `directory`, in a process of its own;
    RuntimeError if that process's bnpy core is not the one there (not built
    there, PYTHONPATH falls through to an installed bnpy)"""
    directory = os.path.realpath(directory)
    env = dict(os.environ, PYTHONPATH=directory)
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--origin"] + ["--quick"] * quick,
        capture_output=True,
        text=True,
        env=env,
        cwd=directory,
    )
    if done.returncode != 0:
        raise RuntimeError(f"digest of {directory} failed:\n{done.stdout}{done.stderr}")
    core = re.search(r"^core (.+)$", done.stdout, re.M).group(1)
    if not core.startswith(directory + os.sep):
        raise RuntimeError(f"{directory} holds no built bnpy: its process imported {core}")
    return re.search(r"^digest ([0-9a-f]{64})$", done.stdout, re.M).group(1)


def compare_builds():
    """compare_builds.py, beside this file: it builds the versions"""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_builds.py")
    spec = importlib.util.spec_from_file_location("compare_builds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digest_versions(specs, quick):
    """Prints each version's digest; 0 when they agree, else 1"""
    built_version = compare_builds().built_version
    with tempfile.TemporaryDirectory() as workdir:
        built = {spec: built_version(spec, workdir) for spec in dict.fromkeys(specs)}
        found = [digest_of_version(built[spec], quick) for spec in specs]
    for spec, hexdigest in zip(specs, found):
        print(f"{spec[:24]:<24}  {hexdigest}")
    same = len(set(found)) == 1
    if len(specs) > 1:
        print("the same bits" if same else "DIFFERENT bits")
    return 0 if same else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "versions", nargs="*", help="git revisions or directories with a built bnpy"
    )
    parser.add_argument("--quick", action="store_true", help="a few small shapes")
    parser.add_argument(
        "--origin",
        action="store_true",  # for digest_of_version
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)
    if args.versions:
        return digest_versions(args.versions, args.quick)
    if args.origin:
        import bnpy._core

        print(f"core {os.path.realpath(bnpy._core.__file__)}")
    if args.quick:
        return digest_here(QUICK_SHAPES, QUICK_FAMILY_SHAPES)
    return digest_here(SHAPES, FAMILY_SHAPES)


if __name__ == "__main__":
    sys.exit(main())
