"""Build bnpy's C extension, bnpy._core (metadata lives in pyproject.toml)."""
import numpy
from setuptools import Extension, setup

SOURCES = [
    "csrc/bn_kernels.c",  # the mathematics: pure C11, no Python
    "csrc/bn_convert.c",  # the binding: argument checks and conversions
    "csrc/bn_dispatch.c",
    "csrc/bn_layer.c",
    "csrc/bn_functional.c",
    "csrc/bn_module.c",
]

core = Extension(
    "bnpy._core",
    sources=SOURCES,
    depends=["csrc/bn_kernels.h", "csrc/bn_kernels_impl.h", "csrc/bn_module.h"],
    include_dirs=["csrc", numpy.get_include()],
    extra_compile_args=["-std=c11", "-O3", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
)

setup(ext_modules=[core])
