#!/usr/bin/env bash
# Build the C core with each test program in tests/c/ and run them.
# `run.sh sanitize` adds AddressSanitizer and UndefinedBehaviorSanitizer. The
# binaries go to $OUT_DIR (default: a temporary directory).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
out="${OUT_DIR:-$(mktemp -d)}"
flags=(-std=c11 -O2 -g -ffp-contract=off -Wall -Wextra -Werror -pedantic -fopenmp)
if [ "${1:-}" = "sanitize" ]; then
    flags+=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
fi
for test in "$here"/test_*.c; do
    name="$(basename "$test" .c)"
    "${CC:-cc}" "${flags[@]}" -I"$root/csrc" "$root"/csrc/bn_kernels*.c "$test" -lm \
        -o "$out/$name"
    "$out/$name"
done
