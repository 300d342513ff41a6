#!/usr/bin/env bash
# Build the C core with its tests and run them. `run.sh sanitize` adds
# AddressSanitizer and UndefinedBehaviorSanitizer. The binary goes to $OUT_DIR
# (default: a temporary directory).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
out="${OUT_DIR:-$(mktemp -d)}"
flags=(-std=c11 -O2 -g -ffp-contract=off -Wall -Wextra -Werror -pedantic -fopenmp)
if [ "${1:-}" = "sanitize" ]; then
    flags+=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
fi
"${CC:-cc}" "${flags[@]}" -I"$root/csrc" "$root/csrc/bn_kernels.c" "$here/test_kernels.c" \
    -lm -o "$out/test_kernels"
"$out/test_kernels"
