#!/usr/bin/env bash
# Build the C core with each test program in tests/c/ and run them.
#   run.sh           with ${CC:-cc}
#   run.sh sanitize  the same with AddressSanitizer and UndefinedBehaviorSanitizer
#   run.sh aarch64   cross-compiled with aarch64-linux-gnu-gcc and run under
#                    qemu-aarch64 (Debian's gcc-aarch64-linux-gnu and qemu-user,
#                    installed when missing and run as root); test_values' hashes
#                    must equal a native build's, or those in $VALUES_REFERENCE
#   run.sh portable  with ${CC:-cc} and -DBN_PORTABLE=1 (the kernels in plain C);
#                    test_values' hashes compared in the same way
# In the other modes too, $VALUES_REFERENCE (a values.txt of another run: another
# compiler, machine or revision) is compared with this run's.
# The binaries go to $OUT_DIR (default: a temporary directory); the aarch64 ones
# run elsewhere with `qemu-aarch64 -L /usr/aarch64-linux-gnu $OUT_DIR/test_...`.
# test_values writes its hashes to $OUT_DIR/values.txt (values-native.txt: the
# plain native build's in an aarch64 or portable run).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

# The C core: its sources. Their directories are the include path.
core_sources=("$root"/csrc/core/*.c)

mode="${1:-native}"
out="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$out"
[ -e "${core_sources[0]}" ] || { echo "run.sh: no C core sources at ${core_sources[0]}" >&2; exit 1; }
includes=()
while IFS= read -r dir; do
    includes+=(-I"$dir")
done < <(for source in "${core_sources[@]}"; do dirname "$source"; done | sort -u)
flags=(-std=c11 -O2 -g -ffp-contract=off -fno-math-errno -Wall -Wextra -Werror -pedantic -fopenmp)

cc="${CC:-cc}"
runner=() # what runs a test binary: nothing natively, qemu for aarch64
case "$mode" in
native) ;;
sanitize)
    flags+=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
    ;;
portable) ;; # -DBN_PORTABLE=1 below, after the native reference
aarch64)
    cc="${AARCH64_CC:-aarch64-linux-gnu-gcc}"
    sysroot="${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}"
    if ! command -v "$cc" >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "run.sh aarch64 needs $cc and qemu-aarch64:" \
                "apt-get install gcc-aarch64-linux-gnu qemu-user" >&2
            exit 1
        fi
        echo "run.sh: installing gcc-aarch64-linux-gnu and qemu-user"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user \
            >/dev/null
    fi
    runner=(qemu-aarch64 -L "$sysroot")
    ;;
*)
    echo "usage: run.sh [sanitize|aarch64|portable]" >&2
    exit 2
    ;;
esac

# compare_values WANT GOT WHAT: the same hash on every (shape, dtype, op) line, or
# fail naming the first that differs (in WANT's order) and how many do.
compare_values() {
    awk -v want_file="$1" -v got_file="$2" -v what="$3" '
        /^#/ { next }
        FILENAME == want_file { key = $1 " " $2 " " $3; want[key] = $4; order[++n] = key; next }
        { got[$1 " " $2 " " $3] = $4 }
        END {
            for (i = 1; i <= n; i++) {
                key = order[i]
                if (!(key in got) || got[key] != want[key]) {
                    if (!first) first = key
                    differ++
                }
            }
            if (n == 0) { print "run.sh: no values in " want_file > "/dev/stderr"; exit 1 }
            if (differ) {
                printf "run.sh: %s: results differ, first at (shape, dtype, op) = (%s);" \
                       " %d of %d differ or are missing\n  want: %s\n  got:  %s\n",
                       what, first, differ, n, want_file, got_file > "/dev/stderr"
                exit 1
            }
            printf "%s: all %d (shape, dtype, op) results bitwise the same\n", what, n
        }' "$1" "$2"
}

# build_core CC DIR: the C core's objects, compiled once for every test program
build_core() {
    mkdir -p "$2"
    core_objects=()
    for source in "${core_sources[@]}"; do
        local object
        object="$2/$(basename "$source" .c).o"
        "$1" "${flags[@]}" "${includes[@]}" -c "$source" -o "$object"
        core_objects+=("$object")
    done
}

# The values to compare with: $VALUES_REFERENCE, or in an aarch64 or portable
# run the plain native build's, made first.
reference="${VALUES_REFERENCE:-}"
if [ "$mode" = aarch64 ] || [ "$mode" = portable ]; then
    if [ -z "$reference" ]; then
        echo "run.sh: test_values built natively with ${CC:-cc}, for the reference values"
        build_core "${CC:-cc}" "$out/native/core"
        "${CC:-cc}" "${flags[@]}" "${includes[@]}" "${core_objects[@]}" "$here/test_values.c" \
            -lm -o "$out/native/test_values"
        reference="$out/values-native.txt"
        "$out/native/test_values" >"$reference"
    fi
fi
if [ "$mode" = portable ]; then flags+=(-DBN_PORTABLE=1); fi

build_core "$cc" "$out/core"
for test in "$here"/test_*.c; do
    name="$(basename "$test" .c)"
    "$cc" "${flags[@]}" "${includes[@]}" "${core_objects[@]}" "$test" -lm -o "$out/$name"
    if [ "$name" = test_values ]; then
        ${runner[@]+"${runner[@]}"} "$out/$name" >"$out/values.txt"
        echo "test_values: $(grep -vc '^#' "$out/values.txt") hashes in $out/values.txt"
    else
        ${runner[@]+"${runner[@]}"} "$out/$name"
    fi
done

if [ -n "$reference" ]; then
    compare_values "$reference" "$out/values.txt" \
        "$mode build against ${VALUES_REFERENCE:-the native build}"
fi
if [ "$mode" != aarch64 ]; then
    # the baseline kernels on one thread give what the best ones give on several
    baseline=$([ "$mode" = portable ] && echo portable || echo default)
    "$out/test_values" --isa "$baseline" --threads 1 >"$out/values-baseline.txt"
    compare_values "$out/values.txt" "$out/values-baseline.txt" \
        "baseline kernels, 1 thread, against the best"
fi
