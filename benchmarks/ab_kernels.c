/* ab_kernels.c -- builds of the C core timed call by call in one process.
 *
 * The shared machine has fast and slow phases: the same binary's training
 * forward ran 1.17 times a copy in one run and 1.41 in the next. Builds
 * timed in separate runs (compare_builds.py) compare phases as much as code.
 * Here each build of csrc/ is a shared library; the builds take turns call
 * by call, and each call is timed against a memcpy of x just before it, so
 * every build sees the same phases. Prints, per build, the median (and the
 * quartiles) of time / memcpy time. ab_kernels.sh builds git revisions and
 * runs this; by hand:
 *
 *   gcc -std=c11 -O3 -ffp-contract=off -fopenmp -fPIC -shared -Icsrc \
 *       csrc/bn_kernels*.c -lm -o a.so
 *   gcc -std=c11 -O2 -Icsrc benchmarks/ab_kernels.c -ldl -o ab_kernels
 *   ./ab_kernels 64x64x3136 train float32 avx512 21 ./a.so ./b.so
 *
 * Shape: OUTERxCxINNER (x[outer][C][inner]; NCHW 64x64x56x56 is 64x64x3136,
 * channels-last 64x56x56x64 is 200704x64x1). Ops: train (training forward),
 * eval (inference), backward (training, dx into a separate array). One
 * thread; the instruction set as bnpy.set_cpu_capability names it. */
#define _POSIX_C_SOURCE 200809L
#include "bn_kernels.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { MAX_BUILDS = 8 };

/* the ops, and the entry point each times, by element type */
enum { OP_TRAIN, OP_EVAL, OP_BACKWARD, OPS };
static const char *const OP_NAMES[OPS] = {"train", "eval", "backward"};
static const char *const ENTRY[2][OPS] = {
    {"bn_forward_train_f32", "bn_forward_f32", "bn_backward_f32"},
    {"bn_forward_train_f64", "bn_forward_f64", "bn_backward_f64"},
};

/* the place of `name` in names[count], or -1 */
static int index_of(const char *name, const char *const *names, int count)
{
    for (int k = 0; k < count; k++) {
        if (!strcmp(name, names[k])) {
            return k;
        }
    }
    return -1;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* one build: its library, the entry point of the op timed (looked up once,
 * outside the timed calls) and its workspace */
typedef struct {
    const char *path;
    void *lib, *op;
    double *work;
} build;

static void *entry(const build *b, const char *name)
{
    void *f = dlsym(b->lib, name);
    if (!f) {
        fprintf(stderr, "%s: no %s\n", b->path, name);
        exit(2);
    }
    return f;
}

static build open_build(const char *path, bn_shape s, const char *op_entry, bn_isa isa,
                        const char *isa_name)
{
    build b = {path, dlopen(path, RTLD_NOW | RTLD_LOCAL), NULL, NULL};
    if (!b.lib) {
        fprintf(stderr, "%s\n", dlerror());
        exit(2);
    }
    b.op = entry(&b, op_entry);
    ((void (*)(int))entry(&b, "bn_set_num_threads"))(1);
    if (((int (*)(bn_isa))entry(&b, "bn_set_isa"))(isa) < 0) {
        fprintf(stderr, "%s: this CPU does not run %s\n", path, isa_name);
        exit(2);
    }
    size_t words = ((size_t (*)(bn_shape))entry(&b, "bn_workspace_size"))(s);
    b.work = malloc((words + 1) * sizeof(double));
    return b;
}

/* One call of op (the entry point f, ENTRY's for op and T) with build b's
 * workspace, on arrays of element type T (suffix SUFFIX) */
#define DEFINE_CALL(T, SUFFIX)                                                                 \
    typedef struct {                                                                           \
        T *x, *y, *dy, *gamma, *beta;                                                          \
        bn_partial *stats;                                                                     \
        double *mean, *invstd, *dgamma, *dbeta;                                                \
    } arrays_##SUFFIX;                                                                         \
                                                                                               \
    static void call_##SUFFIX(void *f, int op, const build *b, arrays_##SUFFIX *a, bn_shape s) \
    {                                                                                          \
        if (op == OP_TRAIN) {                                                                  \
            ((void (*)(T *, bn_partial *, double *, double *, double *, const T *, const T *,  \
                       const T *, double, bn_shape))f)(a->y, a->stats, a->mean, a->invstd,     \
                                                       b->work, a->x, a->gamma, a->beta, 1e-5, \
                                                       s);                                     \
        }                                                                                      \
        else if (op == OP_EVAL) {                                                              \
            ((void (*)(T *, double *, const T *, const double *, const double *, const T *,    \
                       const T *, bn_shape))f)(a->y, b->work, a->x, a->mean, a->invstd,        \
                                               a->gamma, a->beta, s);                          \
        }                                                                                      \
        else {                                                                                 \
            ((void (*)(T *, double *, double *, double *, const T *, const T *,                \
                       const double *, const double *, const T *, bn_shape, int))f)(           \
                a->y, a->dgamma, a->dbeta, b->work, a->dy, a->x, a->mean, a->invstd,           \
                a->gamma, s, 1);                                                               \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* ratios[k * reps + r]: build k's r-th call over the memcpy before it */                 \
    static void time_##SUFFIX(double *ratios, const build *builds, int count, int op,          \
                              const char *train_entry, bn_shape s, int reps)                   \
    {                                                                                          \
        size_t C = s.channels, n = s.outer * C * s.inner;                                      \
        arrays_##SUFFIX a = {malloc(n * sizeof(T)), malloc(n * sizeof(T)),                     \
                             malloc(n * sizeof(T)), malloc(C * sizeof(T)),                     \
                             malloc(C * sizeof(T)), malloc(C * sizeof(bn_partial)),            \
                             malloc(C * 8), malloc(C * 8), malloc(C * 8), malloc(C * 8)};      \
        for (size_t i = 0; i < n; i++) {                                                       \
            a.x[i] = (T)((double)((i * 2654435761u) % 1000) / 100.0);                          \
            a.dy[i] = (T)((double)((i * 40503u) % 777) / 300.0 - 1.0);                         \
            a.y[i] = 0;                                                                        \
        }                                                                                      \
        for (size_t c = 0; c < C; c++) {                                                       \
            a.gamma[c] = (T)1.5;                                                               \
            a.beta[c] = (T)0.25;                                                               \
        }                                                                                      \
        /* mean and invstd for eval and backward, outside the timed calls */                   \
        call_##SUFFIX(entry(&builds[0], train_entry), OP_TRAIN, &builds[0], &a, s);            \
        for (int r = 0; r < reps; r++) {                                                       \
            for (int j = 0; j < count; j++) {                                                  \
                int k = (j + r) % count; /* each build in each place of the turn */          \
                double t0 = now();                                                             \
                memcpy(a.y, a.x, n * sizeof(T));                                               \
                double t1 = now();                                                             \
                call_##SUFFIX(builds[k].op, op, &builds[k], &a, s);                            \
                ratios[k * reps + r] = (now() - t1) / (t1 - t0);                               \
            }                                                                                  \
        }                                                                                      \
        free(a.x); free(a.y); free(a.dy); free(a.gamma); free(a.beta); free(a.stats);          \
        free(a.mean); free(a.invstd); free(a.dgamma); free(a.dbeta);                           \
    }
DEFINE_CALL(float, f32)
DEFINE_CALL(double, f64)

static int usage(void)
{
    fprintf(stderr, "usage: ab_kernels OUTERxCxINNER train|eval|backward float32|float64 "
                    "default|avx2|avx512 REPS LIB.so... (at most %d)\n", MAX_BUILDS);
    return 2;
}

int main(int argc, char **argv)
{
    bn_shape s;
    if (argc < 7 || argc - 6 > MAX_BUILDS
        || sscanf(argv[1], "%zux%zux%zu", &s.outer, &s.channels, &s.inner) != 3
        || s.outer * s.channels * s.inner == 0) {
        return usage();
    }
    static const char *const DTYPES[2] = {"float32", "float64"};
    static const char *const ISAS[] = {"default", "avx2", "avx512"}; /* bn_isa's order */
    const char *dtype = argv[3], *isa_name = argv[4];
    int op = index_of(argv[2], OP_NAMES, OPS), f64 = index_of(dtype, DTYPES, 2);
    int isa = index_of(isa_name, ISAS, 3), reps = atoi(argv[5]), count = argc - 6;
    if (op < 0 || f64 < 0 || isa < 0 || reps < 1) {
        return usage();
    }
    build builds[MAX_BUILDS];
    for (int k = 0; k < count; k++) {
        builds[k] = open_build(argv[6 + k], s, ENTRY[f64][op], (bn_isa)isa, isa_name);
    }
    double *ratios = malloc((size_t)count * (size_t)reps * sizeof(double));
    if (f64) {
        time_f64(ratios, builds, count, op, ENTRY[1][OP_TRAIN], s, reps);
    }
    else {
        time_f32(ratios, builds, count, op, ENTRY[0][OP_TRAIN], s, reps);
    }
    printf("%s %s %s %s, %d calls each; time / memcpy of x, median [quartiles]:\n", argv[1],
           OP_NAMES[op], dtype, isa_name, reps);
    for (int k = 0; k < count; k++) {
        double *r = ratios + (size_t)k * (size_t)reps;
        qsort(r, (size_t)reps, sizeof(double), by_value);
        const char *name = strrchr(builds[k].path, '/');
        printf("  %-24s %.3f [%.3f %.3f]\n", name ? name + 1 : builds[k].path, r[reps / 2],
               r[reps / 4], r[3 * reps / 4]);
        free(builds[k].work);
    }
    free(ratios);
    return 0;
}
