/* test_values.c -- what the C core computes, as hashes to compare across builds.
 *
 * Runs every public entry point over shapes that reach each of the core's layouts,
 * in float32, float64, float16 and bfloat16, on deterministic pseudo-random input,
 * and prints one line per (shape, dtype, op):
 *     <outer>x<C>x<inner> <f32|f64|f16|bf16> <op> <FNV-1a 64 of the output's bits>
 * The results are meant to be bitwise identical on every build, compiler, machine
 * and thread count (-ffp-contract=off, and every sum has an order fixed by the
 * shape), so two runs' lines must be equal: run.sh compares a native run against
 * one on the baseline kernels and one thread, and `run.sh aarch64` the native x86
 * run against the aarch64 one. Lines starting with '#' describe the run.
 *
 * Usage: test_values [--threads N] [--isa default|avx2|avx512]
 */
#include "bn.h"

#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- input: a 64-bit linear congruential generator (Knuth's MMIX constants) ---- */

static uint64_t lcg_state;

/* a value in [-1, 1) from the top 53 bits of the next state */
static double lcg_next(void)
{
    lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(lcg_state >> 11) * 0x1p-52 - 1.0;
}

/* ---- output: FNV-1a 64 over each value's bits, least significant byte first ---- */

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static uint64_t fnv_bits(uint64_t h, uint64_t bits, int bytes)
{
    for (int b = 0; b < bytes; b++) {
        h ^= (bits >> (8 * b)) & 0xffu;
        h *= FNV_PRIME;
    }
    return h;
}

static uint64_t hash_f32(uint64_t h, const float *p, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        uint32_t bits;
        memcpy(&bits, &p[k], sizeof bits);
        h = fnv_bits(h, bits, 4);
    }
    return h;
}

/* float16 and bfloat16 alike: two bytes a value */
static uint64_t hash_f16(uint64_t h, const uint16_t *p, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        h = fnv_bits(h, p[k], 2);
    }
    return h;
}
#define hash_bf16 hash_f16

static uint64_t hash_f64(uint64_t h, const double *p, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        uint64_t bits;
        memcpy(&bits, &p[k], sizeof bits);
        h = fnv_bits(h, bits, 8);
    }
    return h;
}

/* count, mean and m2 of each feature, in that order */
static uint64_t hash_partials(uint64_t h, const bn_partial *p, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        const double fields[3] = {p[k].count, p[k].mean, p[k].m2};
        h = hash_f64(h, fields, 3);
    }
    return h;
}

static char shape_label[64];

static void emit(const char *dtype, const char *op, uint64_t h)
{
    printf("%s %s %s %016" PRIx64 "\n", shape_label, dtype, op, h);
}

static void *alloc(size_t n, size_t size)
{
    void *p = calloc(n + 1, size); /* + 1: never a zero-byte allocation */
    if (p == NULL) {
        fprintf(stderr, "test_values: out of memory\n");
        exit(2);
    }
    return p;
}

/* ---- one shape, one element type: every entry point, each output hashed ---- */

/* v cut to a half of m mantissa bits (float16: 10, bfloat16: 7), toward zero, and 0
 * below the least normal half: the halves' inputs, made plainly (|v| < 65504) */
static uint16_t half_of(double v, int m)
{
    int e, bias = (1 << (14 - m)) - 1;
    double f = frexp(fabs(v), &e); /* |v| = f * 2^e, f in [0.5, 1) */
    unsigned sign = v < 0 ? 0x8000u : 0u, mantissa = (unsigned)ldexp(f, m + 1) & ((1u << m) - 1);
    int normal = f != 0.0 && e - 1 + bias > 0;
    return (uint16_t)(normal ? sign | (unsigned)(e - 1 + bias) << m | mantissa : sign);
}
#define TO_f32(v) ((float)(v))
#define TO_f64(v) ((double)(v))
#define TO_f16(v) half_of(v, 10)
#define TO_bf16(v) half_of(v, 7)

/* Inputs are drawn in double and rounded to T (parameters to P, suffix PS), so all
 * types see the same data up to rounding: x = offset + 3 * noise, dy = noise, gamma
 * in [0, 2), beta, running mean and variance near the data's. */
#define DEFINE_RUN(T, P, SUF, PS)                                                              \
    static void run_##SUF(bn_shape s, double offset)                                          \
    {                                                                                          \
        const char *dt = #SUF;                                                                 \
        size_t C = s.channels, total = bn_count(s) * C;                                        \
        T *x = alloc(total, sizeof(T)), *dy = alloc(total, sizeof(T));                         \
        T *y = alloc(total, sizeof(T)), *dx = alloc(total, sizeof(T));                         \
        P *gamma = alloc(C, sizeof(P)), *beta = alloc(C, sizeof(P));                           \
        P *run_mean = alloc(C, sizeof(P)), *run_var = alloc(C, sizeof(P));                     \
        double *shift = alloc(C, sizeof(double)), *mean = alloc(C, sizeof(double));            \
        double *invstd = alloc(C, sizeof(double)), *dgamma = alloc(C, sizeof(double));         \
        double *dbeta = alloc(C, sizeof(double)), *work = alloc(bn_workspace_size(s), 8);      \
        bn_partial *stats = alloc(C, sizeof(bn_partial));                                      \
        const double eps = 1e-5, momentum = 0.1;                                               \
        lcg_state = 0x9e3779b97f4a7c15ULL ^ (uint64_t)total;                                   \
        for (size_t k = 0; k < total; k++) {                                                   \
            x[k] = TO_##SUF(offset + 3.0 * lcg_next());                                        \
            dy[k] = TO_##SUF(lcg_next());                                                      \
        }                                                                                      \
        for (size_t c = 0; c < C; c++) {                                                       \
            gamma[c] = (P)(1.0 + lcg_next());                                                  \
            beta[c] = (P)lcg_next();                                                           \
            run_mean[c] = (P)(offset + lcg_next());                                            \
            run_var[c] = (P)(2.0 + lcg_next());                                                \
            shift[c] = offset + 0.5 * lcg_next();                                              \
        }                                                                                      \
                                                                                               \
        bn_stats_##SUF(stats, work, x, NULL, s);                                               \
        emit(dt, "stats", hash_partials(FNV_OFFSET, stats, C));                                \
        bn_stats_##SUF(stats, work, x, shift, s);                                              \
        emit(dt, "stats_shifted", hash_partials(FNV_OFFSET, stats, C));                        \
                                                                                               \
        bn_forward_train_##SUF(y, stats, mean, invstd, work, x, NULL, NULL, eps, s);           \
        emit(dt, "forward_train_plain.y", hash_##SUF(FNV_OFFSET, y, total));                   \
        memcpy(y, x, total * sizeof(T));                                                       \
        bn_forward_train_##SUF(y, stats, mean, invstd, work, y, gamma, beta, eps, s);          \
        emit(dt, "forward_train_inplace.y", hash_##SUF(FNV_OFFSET, y, total));                 \
        bn_forward_train_##SUF(y, stats, mean, invstd, work, x, gamma, beta, eps, s);          \
        emit(dt, "forward_train.y", hash_##SUF(FNV_OFFSET, y, total));                         \
        emit(dt, "forward_train.stats", hash_partials(FNV_OFFSET, stats, C));                  \
        emit(dt, "forward_train.moments",                                                      \
             hash_f64(hash_f64(FNV_OFFSET, mean, C), invstd, C));                              \
                                                                                               \
        /* the training backward, fused and in two halves, with the batch moments */          \
        bn_backward_##SUF(dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s, 1);          \
        emit(dt, "backward_train.dx", hash_##SUF(FNV_OFFSET, dx, total));                      \
        emit(dt, "backward_train.sums", hash_f64(hash_f64(FNV_OFFSET, dgamma, C), dbeta, C));  \
        bn_grad_sums_##SUF(dgamma, dbeta, work, dy, x, mean, invstd, s);                       \
        emit(dt, "grad_sums", hash_f64(hash_f64(FNV_OFFSET, dgamma, C), dbeta, C));            \
        bn_backward_dx_##SUF(dx, work, dy, x, mean, invstd, gamma, dgamma, dbeta,              \
                             (double)bn_count(s), s, 1);                                       \
        emit(dt, "backward_dx_train.dx", hash_##SUF(FNV_OFFSET, dx, total));                   \
        memcpy(dx, dy, total * sizeof(T));                                                      \
        bn_backward_##SUF(dx, dgamma, dbeta, work, dx, x, mean, invstd, gamma, s, 1);          \
        emit(dt, "backward_train_inplace.dx", hash_##SUF(FNV_OFFSET, dx, total));              \
                                                                                               \
        /* the running statistics, from the batch's */                                         \
        if (bn_count(s) > 1) {                                                                 \
            P *new_mean = alloc(C, sizeof(P)), *new_var = alloc(C, sizeof(P));                 \
            memcpy(new_mean, run_mean, C * sizeof(P));                                          \
            memcpy(new_var, run_var, C * sizeof(P));                                            \
            bn_update_running_##SUF(new_mean, new_var, stats, C, momentum);                    \
            emit(dt, "update_running",                                                         \
                 hash_##PS(hash_##PS(FNV_OFFSET, new_mean, C), new_var, C));                   \
            bn_set_running_##SUF(new_mean, new_var, stats, C);                                 \
            emit(dt, "set_running", hash_##PS(hash_##PS(FNV_OFFSET, new_mean, C), new_var, C)); \
            free(new_mean);                                                                    \
            free(new_var);                                                                     \
        }                                                                                      \
                                                                                               \
        /* inference: the running moments, forward and backward with them */                   \
        bn_running_moments_##SUF(mean, invstd, run_mean, run_var, C, eps);                     \
        emit(dt, "running_moments", hash_f64(hash_f64(FNV_OFFSET, mean, C), invstd, C));       \
        bn_forward_##SUF(y, work, x, mean, invstd, gamma, beta, s);                            \
        emit(dt, "forward.y", hash_##SUF(FNV_OFFSET, y, total));                               \
        bn_forward_##SUF(y, work, x, mean, invstd, NULL, NULL, s);                             \
        emit(dt, "forward_plain.y", hash_##SUF(FNV_OFFSET, y, total));                         \
        bn_backward_##SUF(dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s, 0);          \
        emit(dt, "backward_eval.dx", hash_##SUF(FNV_OFFSET, dx, total));                       \
        emit(dt, "backward_eval.sums", hash_f64(hash_f64(FNV_OFFSET, dgamma, C), dbeta, C));   \
        bn_backward_dx_##SUF(dx, work, dy, x, mean, invstd, gamma, dgamma, dbeta,              \
                             (double)bn_count(s), s, 0);                                       \
        emit(dt, "backward_dx_eval.dx", hash_##SUF(FNV_OFFSET, dx, total));                    \
                                                                                               \
        free(x); free(dy); free(y); free(dx); free(gamma); free(beta); free(run_mean);         \
        free(run_var); free(shift); free(mean); free(invstd); free(dgamma); free(dbeta);       \
        free(work); free(stats);                                                               \
    }
DEFINE_RUN(float, float, f32, f32)
DEFINE_RUN(double, double, f64, f64)
DEFINE_RUN(uint16_t, float, f16, f32)
DEFINE_RUN(uint16_t, float, bf16, f32)

/* The row kernels on the same data seen as rows: a layer norm over inner (a
 * gamma per value), its RMS form, a group norm of all C features of an outer
 * row (a gamma per run of inner), and an instance norm (a row per feature) */
#define DEFINE_ROWS(T, P, SUF)                                                                 \
    static void rows_##SUF(bn_shape s, double offset)                                         \
    {                                                                                          \
        const char *dt = #SUF;                                                                 \
        size_t C = s.channels, total = bn_count(s) * C;                                        \
        const bn_rows cases[4] = {{s.outer * C, s.inner, 1, 1, 1},                             \
                                  {s.outer * C, s.inner, 1, 1, 0},                             \
                                  {s.outer, C * s.inner, s.inner, 1, 1},                       \
                                  {s.outer * C, s.inner, s.inner, C, 1}};                      \
        const char *names[4] = {"rows_layer", "rows_rms", "rows_group", "rows_instance"};     \
        size_t most = s.inner > C ? s.inner : C, rows = s.outer * C;                           \
        T *x = alloc(total, sizeof(T)), *dy = alloc(total, sizeof(T));                         \
        T *y = alloc(total, sizeof(T)), *dx = alloc(total, sizeof(T));                         \
        P *gamma = alloc(most, sizeof(P)), *beta = alloc(most, sizeof(P));                     \
        double *mean = alloc(rows, 8), *invstd = alloc(rows, 8), *var = alloc(rows, 8);        \
        double *dgamma = alloc(most, 8), *dbeta = alloc(most, 8);                              \
        lcg_state = 0x2545f4914f6cdd1dULL ^ (uint64_t)total;                                   \
        for (size_t k = 0; k < total; k++) {                                                   \
            x[k] = TO_##SUF(offset + 3.0 * lcg_next());                                        \
            dy[k] = TO_##SUF(lcg_next());                                                      \
        }                                                                                      \
        for (size_t c = 0; c < most; c++) {                                                    \
            gamma[c] = (P)(1.0 + lcg_next());                                                  \
            beta[c] = (P)lcg_next();                                                           \
        }                                                                                      \
        for (int k = 0; k < 4; k++) {                                                          \
            bn_rows r = cases[k];                                                              \
            size_t channels = bn_rows_channels(r);                                             \
            double *work = alloc(bn_rows_workspace_size(r), 8);                                \
            char op[64];                                                                       \
            bn_rows_forward_##SUF(y, mean, invstd, var, x, gamma, beta, 1e-5, r);              \
            snprintf(op, sizeof op, "%s.y", names[k]);                                         \
            emit(dt, op, hash_##SUF(FNV_OFFSET, y, total));                                    \
            snprintf(op, sizeof op, "%s.moments", names[k]);                                   \
            emit(dt, op, hash_f64(hash_f64(FNV_OFFSET, mean, r.rows), invstd, r.rows));        \
            snprintf(op, sizeof op, "%s.var", names[k]);                                       \
            emit(dt, op, hash_f64(FNV_OFFSET, var, r.rows));                                   \
            bn_rows_backward_##SUF(dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, r);    \
            snprintf(op, sizeof op, "%s.dx", names[k]);                                        \
            emit(dt, op, hash_##SUF(FNV_OFFSET, dx, total));                                   \
            snprintf(op, sizeof op, "%s.sums", names[k]);                                      \
            emit(dt, op, hash_f64(hash_f64(FNV_OFFSET, dgamma, channels), dbeta, channels));  \
            memcpy(y, x, total * sizeof(T));                                                    \
            bn_rows_forward_##SUF(y, mean, invstd, var, y, gamma, beta, 1e-5, r);              \
            memcpy(dx, dy, total * sizeof(T));                                                  \
            bn_rows_backward_##SUF(dx, dgamma, dbeta, work, dx, y, mean, invstd, gamma, r);    \
            snprintf(op, sizeof op, "%s_inplace.dx", names[k]);                                \
            emit(dt, op, hash_##SUF(hash_##SUF(FNV_OFFSET, y, total), dx, total));             \
            free(work);                                                                        \
        }                                                                                      \
        free(x); free(dy); free(y); free(dx); free(gamma); free(beta); free(mean);             \
        free(invstd); free(var); free(dgamma); free(dbeta);                                    \
    }
DEFINE_ROWS(float, float, f32)
DEFINE_ROWS(double, double, f64)
DEFINE_ROWS(uint16_t, float, f16)
DEFINE_ROWS(uint16_t, float, bf16)

/* The shapes: together they reach every layout of the current core (and of any
 * plan that chooses by inner, C * inner, outer and the bytes involved). */
static const struct {
    bn_shape s;
    double offset; /* of the data from zero */
} cases[] = {
    {{9000, 3, 1}, 0.5},      /* interleaved (inner == 1), few features, several row groups */
    {{300, 40, 1}, 0.5},      /* interleaved, a wide row of features */
    {{256, 1024, 1}, 0.5},    /* interleaved, many features: (256, 1024) */
    {{1100000, 4, 1}, 0.5},   /* interleaved from memory: outputs past the caches */
    {{5, 4, 3}, 0.5},         /* rows shorter than a vector, as lanes */
    {{5000, 2, 7}, 0.5},      /* planar rows of 7 (7x7 maps of few features), row groups */
    {{64, 16, 49}, 0.5},      /* rows of 49 (7x7), features that fit one wide row */
    {{20, 512, 49}, 0.5},     /* rows of 49, written row by row: 256x512x7x7 */
    {{3, 20000, 7}, 0.5},     /* planar rows of 7 (too wide for lanes), in memory order */
    {{2000, 3, 50}, 1e4},     /* short rows, several row groups; a large common offset */
    {{700, 3, 150}, 0.5},     /* short rows of 150 */
    {{2000, 3, 300}, 0.5},    /* short rows from memory */
    {{37, 2, 400}, 0.5},      /* rows of a few tiles, summed in memory order */
    {{60, 70, 100}, 0.5},     /* the same, features in three walks of up to 32 */
    {{33, 40, 600}, 0.5},     /* rows of 600, a few tiles, pipelined feature by feature */
    {{8, 4, 3000}, 0.5},      /* long rows, cut into tiles */
    {{4, 3, 3000}, 1e4},      /* the same with a large common offset */
    {{2, 3, 720000}, 0.5},    /* long rows from memory: outputs past the caches */
    {{7, 1, 1}, 0.5},         /* one feature */
    {{2, 5, 1}, 0.5},         /* two values per feature */
};

int main(int argc, char **argv)
{
    const char *isa_name = NULL;
    for (int k = 1; k < argc; k++) {
        if (strcmp(argv[k], "--threads") == 0 && k + 1 < argc) {
            bn_set_num_threads(atoi(argv[++k]));
        } else if (strcmp(argv[k], "--isa") == 0 && k + 1 < argc) {
            isa_name = argv[++k];
        } else {
            fprintf(stderr, "usage: test_values [--threads N] [--isa default|avx2|avx512]\n");
            return 2;
        }
    }
    if (isa_name != NULL) {
        int chosen = -1;
        for (int isa = BN_ISA_DEFAULT; isa <= BN_ISA_AVX512; isa++) {
            if (strcmp(isa_name, bn_isa_name((bn_isa)isa)) == 0) {
                chosen = isa;
            }
        }
        if (chosen < 0 || bn_set_isa((bn_isa)chosen) < 0) {
            fprintf(stderr, "test_values: kernels '%s' not in this build or CPU\n", isa_name);
            return 2;
        }
    }
    printf("# bnpy C core values: kernels %s, %d thread(s)\n", bn_isa_name(bn_get_isa()),
           bn_get_num_threads());
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        bn_shape s = cases[k].s;
        snprintf(shape_label, sizeof shape_label, "%zux%zux%zu", s.outer, s.channels, s.inner);
        run_f32(s, cases[k].offset);
        run_f64(s, cases[k].offset);
        run_f16(s, cases[k].offset);
        run_bf16(s, cases[k].offset);
        rows_f32(s, cases[k].offset);
        rows_f64(s, cases[k].offset);
        rows_f16(s, cases[k].offset);
        rows_bf16(s, cases[k].offset);
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
