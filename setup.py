"""Build bnpy's C extension, bnpy._core (metadata lives in pyproject.toml).

The kernels use OpenMP threads when the compiler has OpenMP (the build still
works without it). Their hot loops are built three times, for any CPU of the
target, and on x86-64 for AVX2 and for AVX-512 (GCC's or Clang's target
pragma in csrc/core/build_avx2.c and build_avx512.c), and the fastest the CPU
runs is chosen at run time: nothing here compiles for the build machine's CPU.

Environment:
  CC=clang            Clang builds it too; its OpenMP needs libomp (Debian: libomp-dev).
  BNPY_NO_OPENMP=1    build without OpenMP (one thread).
  BNPY_PORTABLE=1     define BN_PORTABLE=1 in every source: the kernels in plain C,
                      without compiler vector extensions.
  CFLAGS              come after the project's flags, so they win (e.g. -O2 over -O3).
"""

import contextlib
import glob
import os
import shlex
import sys
import tempfile

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = [
    "csrc/core/core.c",  # the mathematics: pure C11, no Python
    "csrc/core/build_baseline.c",  # its hot kernels, once per instruction set
    "csrc/core/build_avx2.c",
    "csrc/core/build_avx512.c",
    "csrc/bn_convert.c",  # the binding: argument checks and conversions
    "csrc/bn_dispatch.c",
    "csrc/bn_layer.c",
    "csrc/bn_layer_stats.c",
    "csrc/bn_layer_groups.c",
    "csrc/bn_family.c",
    "csrc/bn_functional.c",
    "csrc/bn_module.c",
]

# -ffp-contract=off: no fused multiply-adds, so every instruction-set build
# rounds exactly alike and results do not depend on the CPU. -fno-math-errno:
# sqrt sets no errno (nothing here reads it), so that loops of roots vectorize;
# each root is still IEEE's, correctly rounded.
COMPILE_ARGS = [
    "-std=c11",
    "-O3",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-Wall",
    "-Wextra",
    "-Wno-missing-field-initializers",
]
# MSVC (the Windows wheels; not yet built once, see .github/workflows/wheels.yml): C11,
# optimized; it contracts no multiply-add unless told (/fp:contract); the kernels are
# the portable ones (core.h picks them for a compiler without GCC's vector extensions);
# no OpenMP (MSVC's /openmp is OpenMP 2.0): one thread; 4068: the omp pragmas it skips.
MSVC_COMPILE_ARGS = ["/std:c11", "/O2", "/fp:precise", "/wd4068"]


@contextlib.contextmanager
def quiet():
    """Nothing the compiler prints (to file descriptors 1 and 2) shows."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    try:
        with open(os.devnull, "w") as devnull:
            for fd in (1, 2):
                os.dup2(devnull.fileno(), fd)
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def compiler_has_openmp(compiler):
    """True when the compiler builds and links a program with -fopenmp."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "omp.c")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
        try:
            with quiet():  # a failure is an answer here, not an error to show
                objects = compiler.compile([source], output_dir=tmp, extra_postargs=["-fopenmp"])
                compiler.link_executable(
                    objects, "omp", output_dir=tmp, extra_postargs=["-fopenmp"]
                )
        except Exception:  # any compile or link error means: no OpenMP here
            return False
    return True


def flags_before_user_cflags(command, flags):
    """command (a compiler's argument list) with flags inserted just before the
    user's $CFLAGS, so that those override them (a later -O wins); where the user's
    flags cannot be found in it, flags and then $CFLAGS again at its end."""
    user = shlex.split(os.environ.get("CFLAGS", ""))
    if not user:
        return command + flags
    for start in range(len(command) - len(user), -1, -1):
        if command[start : start + len(user)] == user:
            return command[:start] + flags + command[start:]
    return command + flags + user


class BuildExt(build_ext):
    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        if os.environ.get("BNPY_NO_OPENMP") == "1":
            use_openmp, why = False, "BNPY_NO_OPENMP=1"
        elif msvc:
            use_openmp, why = False, "MSVC's OpenMP has not been tried"
        else:
            use_openmp = compiler_has_openmp(self.compiler)
            why = "the compiler cannot build with -fopenmp; Clang's OpenMP is libomp (libomp-dev)"
        if not use_openmp:
            print(
                f"warning: bnpy: building without OpenMP: kernels run on one thread ({why})",
                file=sys.stderr,
                flush=True,
            )
        flags = COMPILE_ARGS + (["-fopenmp"] if use_openmp else ["-Wno-unknown-pragmas"])
        if msvc:
            flags = MSVC_COMPILE_ARGS
        # The project's flags go before the user's CFLAGS in the compiler's command
        # (setuptools puts extra_compile_args after them), so the user's win.
        if hasattr(self.compiler, "compiler_so"):
            self.compiler.compiler_so = flags_before_user_cflags(self.compiler.compiler_so, flags)
            flags = []
        portable = os.environ.get("BNPY_PORTABLE") == "1"
        for ext in self.extensions:
            ext.extra_compile_args = flags
            ext.extra_link_args = ["-fopenmp"] if use_openmp else []
            if portable:
                ext.define_macros.append(("BN_PORTABLE", "1"))
        # setuptools rebuilds only when a source is newer than the built extension:
        # after a change of compiler or switch (CC=clang, BNPY_PORTABLE=1) it would
        # silently keep the old build. The build's settings are kept beside its objects.
        settings = repr(
            (
                self.compiler.__dict__.get("compiler_so"),
                self.compiler.__dict__.get("linker_so"),
                [
                    (ext.define_macros, ext.extra_compile_args, ext.extra_link_args)
                    for ext in self.extensions
                ],
            )
        )
        record = os.path.join(self.build_temp, "bnpy-build-settings.txt")
        try:
            with open(record) as f:
                self.force = self.force or f.read() != settings
        except OSError:
            self.force = True
        super().build_extensions()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(record, "w") as f:
            f.write(settings)


core = Extension(
    "bnpy._core",
    sources=SOURCES,
    depends=glob.glob("csrc/core/*.h") + ["csrc/bn_module.h", "csrc/bn_layer.h"],
    include_dirs=["csrc", "csrc/core", numpy.get_include()],
)

setup(ext_modules=[core], cmdclass={"build_ext": BuildExt})
