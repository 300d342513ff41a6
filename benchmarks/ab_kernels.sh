#!/usr/bin/env bash
# ab_kernels.sh SHAPE OP DTYPE ISA REPS REV...
# Builds the C core (csrc/) of each git revision, or of the working tree for
# ".", as a shared library and times the builds call by call in one process:
# ab_kernels.c says how and why. The harness takes the working tree's
# bn_kernels.h, so the revisions must share its entry points. Example:
#   bash benchmarks/ab_kernels.sh 64x64x3136 train float32 avx512 21 HEAD~1 .
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
if [ $# -lt 6 ]; then
    echo "usage: ab_kernels.sh OUTERxCxINNER train|eval|backward float32|float64" \
         "default|avx2|avx512 REPS REV..." >&2
    exit 2
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
args=("$1" "$2" "$3" "$4" "$5")
shift 5
libs=()
k=0
for rev in "$@"; do
    k=$((k + 1))
    src="$out/src$k"
    mkdir -p "$src"
    if [ "$rev" = "." ]; then
        cp "$root"/csrc/*.c "$root"/csrc/*.h "$src"
    else
        git -C "$root" archive "$rev" csrc | tar -x -C "$src" --strip-components=1
    fi
    name="$rev"
    if [ "$rev" = "." ]; then
        name="working-tree"
    fi
    lib="$out/$k-${name//[^A-Za-z0-9._~-]/_}.so"
    "${CC:-cc}" -std=c11 -O3 -ffp-contract=off -fopenmp -fPIC -shared -I"$src" \
        "$src"/bn_kernels*.c -lm -o "$lib"
    libs+=("$lib")
done
"${CC:-cc}" -std=c11 -O2 -Wall -Wextra -I"$root/csrc" "$here/ab_kernels.c" -ldl \
    -o "$out/ab_kernels"
"$out/ab_kernels" "${args[@]}" "${libs[@]}"
