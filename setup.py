"""Build bnpy's C extension, bnpy._core (metadata lives in pyproject.toml).

The kernels use OpenMP threads when the compiler has OpenMP (the build still
works without it). Their hot loops are built three times, for any x86-64 CPU,
for AVX2 and for AVX-512 (`#pragma GCC target` in csrc/bn_kernels_avx2.c and
csrc/bn_kernels_avx512.c), and the fastest the CPU runs is chosen at run
time: nothing here compiles for the build machine's CPU.
"""
import os
import tempfile

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = [
    "csrc/bn_kernels.c",  # the mathematics: pure C11, no Python
    "csrc/bn_kernels_baseline.c",  # its hot kernels, once per instruction set
    "csrc/bn_kernels_avx2.c",
    "csrc/bn_kernels_avx512.c",
    "csrc/bn_convert.c",  # the binding: argument checks and conversions
    "csrc/bn_dispatch.c",
    "csrc/bn_layer.c",
    "csrc/bn_layer_stats.c",
    "csrc/bn_functional.c",
    "csrc/bn_module.c",
]

# -ffp-contract=off: no fused multiply-adds, so every instruction-set build
# rounds exactly alike and results do not depend on the CPU.
COMPILE_ARGS = ["-std=c11", "-O3", "-ffp-contract=off", "-Wall", "-Wextra",
                "-Wno-missing-field-initializers"]


def compiler_has_openmp(compiler):
    """True when the compiler builds and links a program with -fopenmp."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "omp.c")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objects, "omp", output_dir=tmp, extra_postargs=["-fopenmp"])
        except Exception:  # any compile or link error means: no OpenMP here
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self):
        use_openmp = os.environ.get("BNPY_NO_OPENMP") != "1" and compiler_has_openmp(self.compiler)
        for ext in self.extensions:
            ext.extra_compile_args = COMPILE_ARGS + (["-fopenmp"] if use_openmp else
                                                     ["-Wno-unknown-pragmas"])
            ext.extra_link_args = ["-fopenmp"] if use_openmp else []
        super().build_extensions()


core = Extension(
    "bnpy._core",
    sources=SOURCES,
    depends=["csrc/bn_kernels.h", "csrc/bn_kernels_internal.h", "csrc/bn_kernels_isa.h",
             "csrc/bn_kernels_impl.h", "csrc/bn_running_impl.h", "csrc/bn_simd.h",
             "csrc/bn_module.h", "csrc/bn_layer.h"],
    include_dirs=["csrc", numpy.get_include()],
)

setup(ext_modules=[core], cmdclass={"build_ext": BuildExt})
