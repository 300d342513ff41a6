/* test_shapes.c -- every kernel of the C core, on shapes that reach every
 * code path (planar rows cut into tiles, tiles of several short rows,
 * interleaved wide rows and row groups, empty and one-feature inputs),
 * against a naive long double reference, for both element types, and bitwise
 * the same on 1 and 3 threads and in every instruction-set build the CPU
 * runs. Build and run: bash tests/c/run.sh [sanitize] */
#include "bn.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

static void fail(const char *what, bn_shape s, size_t i, double got, double want)
{
    fprintf(stderr, "shape (%zu, %zu, %zu): %s[%zu] = %.17g, want %.17g\n", s.outer,
            s.channels, s.inner, what, i, got, want);
    failures++;
}

/* |got - want| <= tol * scale for every element; reports the first miss */
static void check_all(const char *what, bn_shape s, const double *got, const long double *want,
                      size_t n, double tol, double scale)
{
    for (size_t i = 0; i < n; i++) {
        if (!(fabsl((long double)got[i] - want[i]) <= tol * scale)) {
            fail(what, s, i, got[i], (double)want[i]);
            return;
        }
    }
}

/* ---- the naive reference: per feature, two passes in long double ---------- */

typedef struct {
    long double *mean, *var, *y, *dx, *dgamma, *dbeta;
} reference;

static size_t index_of(bn_shape s, size_t o, size_t c, size_t i)
{
    return (o * s.channels + c) * s.inner + i;
}

/* training mode, gamma and beta given, dy given */
static reference naive(bn_shape s, const double *x, const double *dy, const double *gamma,
                       const double *beta, double eps, int training, const double *run_mean,
                       const double *run_var)
{
    size_t C = s.channels, n = bn_count(s), total = n * C;
    reference r = {calloc(C, sizeof(long double)), calloc(C, sizeof(long double)),
                   calloc(total + 1, sizeof(long double)), calloc(total + 1, sizeof(long double)),
                   calloc(C, sizeof(long double)), calloc(C, sizeof(long double))};
    for (size_t c = 0; c < C; c++) {
        long double sum = 0, dev2 = 0;
        for (size_t o = 0; o < s.outer; o++)
            for (size_t i = 0; i < s.inner; i++) sum += x[index_of(s, o, c, i)];
        r.mean[c] = n ? sum / n : 0;
        for (size_t o = 0; o < s.outer; o++)
            for (size_t i = 0; i < s.inner; i++) {
                long double d = x[index_of(s, o, c, i)] - r.mean[c];
                dev2 += d * d;
            }
        r.var[c] = n ? dev2 / n : 0;
        long double m = training ? r.mean[c] : run_mean[c];
        long double invstd = 1.0L / sqrtl((training ? r.var[c] : run_var[c]) + eps);
        long double sum_dy = 0, sum_dy_xhat = 0;
        for (size_t o = 0; o < s.outer; o++)
            for (size_t i = 0; i < s.inner; i++) {
                size_t k = index_of(s, o, c, i);
                long double xhat = (x[k] - m) * invstd;
                r.y[k] = gamma[c] * xhat + beta[c];
                sum_dy += dy[k];
                sum_dy_xhat += dy[k] * xhat;
            }
        r.dbeta[c] = sum_dy;
        r.dgamma[c] = sum_dy_xhat;
        for (size_t o = 0; o < s.outer; o++)
            for (size_t i = 0; i < s.inner; i++) {
                size_t k = index_of(s, o, c, i);
                long double xhat = (x[k] - m) * invstd;
                r.dx[k] = training ? gamma[c] * invstd / n * (n * dy[k] - sum_dy - xhat * sum_dy_xhat)
                                   : dy[k] * gamma[c] * invstd;
            }
    }
    return r;
}

static void free_reference(reference *r)
{
    free(r->mean);
    free(r->var);
    free(r->y);
    free(r->dx);
    free(r->dgamma);
    free(r->dbeta);
}

/* ---- one shape, one type: the kernels against the reference -------------- */

/* a deterministic pseudo-random value in [-1, 1) */
static double noise(size_t *state)
{
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(*state >> 11) / (double)(1ULL << 52) - 1.0;
}

/* what one run of the kernels produced, in double */
typedef struct {
    double *y, *dx, *mean, *var, *dgamma, *dbeta, *y_eval, *dx_eval;
} outputs;

#define DEFINE_RUN(T, SUFFIX)                                                                  \
    static outputs run_##SUFFIX(bn_shape s, const double *xd, const double *dyd,               \
                                const double *gd, const double *bd, const double *rmd,         \
                                const double *rvd, double eps)                                 \
    {                                                                                          \
        size_t C = s.channels, total = bn_count(s) * C;                                        \
        T *x = malloc((total + 1) * sizeof(T)), *dy = malloc((total + 1) * sizeof(T));        \
        T *y = malloc((total + 1) * sizeof(T)), *dx = malloc((total + 1) * sizeof(T));        \
        T *g = malloc(C * sizeof(T)), *b = malloc(C * sizeof(T));                              \
        T *rm = malloc(C * sizeof(T)), *rv = malloc(C * sizeof(T));                            \
        for (size_t k = 0; k < total; k++) {                                                   \
            x[k] = (T)xd[k];                                                                   \
            dy[k] = (T)dyd[k];                                                                 \
        }                                                                                      \
        for (size_t c = 0; c < C; c++) {                                                       \
            g[c] = (T)gd[c];                                                                   \
            b[c] = (T)bd[c];                                                                   \
            rm[c] = (T)rmd[c];                                                                 \
            rv[c] = (T)rvd[c];                                                                 \
        }                                                                                      \
        double *work = malloc((bn_workspace_size(s) + 1) * sizeof(double));                   \
        bn_partial *stats = malloc(C * sizeof(bn_partial));                                    \
        double *mean = malloc(C * sizeof(double)), *invstd = malloc(C * sizeof(double));      \
        outputs out = {calloc(total + 1, 8), calloc(total + 1, 8), calloc(C, 8), calloc(C, 8),   \
                       calloc(C, 8), calloc(C, 8), calloc(total + 1, 8), calloc(total + 1, 8)}; \
        bn_forward_train_##SUFFIX(y, stats, mean, invstd, work, x, g, b, eps, s);              \
        for (size_t c = 0; c < C; c++) {                                                       \
            out.mean[c] = stats[c].mean;                                                       \
            out.var[c] = stats[c].count > 0 ? stats[c].m2 / stats[c].count : 0.0;              \
        }                                                                                      \
        for (size_t k = 0; k < total; k++) out.y[k] = (double)y[k];                            \
        bn_partial *again = malloc(C * sizeof(bn_partial));                                    \
        bn_stats_##SUFFIX(again, work, x, NULL, s);                                                  \
        for (size_t c = 0; c < C; c++) {                                                       \
            if (memcmp(&again[c], &stats[c], sizeof again[c]) != 0) {                          \
                fail("bn_stats == bn_forward_train's stats", s, c, again[c].mean,              \
                     stats[c].mean);                                                           \
            }                                                                                  \
        }                                                                                      \
        bn_backward_##SUFFIX(dx, out.dgamma, out.dbeta, work, dy, x, mean, invstd, g, s, 1);   \
        for (size_t k = 0; k < total; k++) out.dx[k] = (double)dx[k];                          \
        {   /* the two halves give what the fused backward gives */                            \
            double *dg = malloc(C * 8 + 8), *db = malloc(C * 8 + 8);                           \
            bn_grad_sums_##SUFFIX(dg, db, work, dy, x, mean, invstd, s);                       \
            bn_backward_dx_##SUFFIX(dx, work, dy, x, mean, invstd, g, dg, db,                  \
                                    (double)bn_count(s), s, 1);                                \
            for (size_t c = 0; c < C; c++)                                                     \
                if (dg[c] != out.dgamma[c] || db[c] != out.dbeta[c])                           \
                    fail("bn_grad_sums == bn_backward's sums", s, c, dg[c], out.dgamma[c]);   \
            for (size_t k = 0; k < total; k++)                                                 \
                if ((double)dx[k] != out.dx[k]) {                                              \
                    fail("bn_backward_dx == bn_backward's dx", s, k, dx[k], out.dx[k]);        \
                    break;                                                                     \
                }                                                                              \
            free(dg); free(db);                                                                \
        }                                                                                      \
        double *ev_dgamma = malloc(C * 8), *ev_dbeta = malloc(C * 8);                          \
        bn_running_moments_##SUFFIX(mean, invstd, rm, rv, C, eps);                             \
        bn_forward_##SUFFIX(y, work, x, mean, invstd, g, b, s);                                \
        for (size_t k = 0; k < total; k++) out.y_eval[k] = (double)y[k];                       \
        bn_backward_##SUFFIX(dx, ev_dgamma, ev_dbeta, work, dy, x, mean, invstd, g, s, 0);     \
        for (size_t k = 0; k < total; k++) out.dx_eval[k] = (double)dx[k];                     \
        memset(dx, 0xff, total * sizeof(T)); /* NaN: a value left unwritten shows */           \
        bn_backward_dx_##SUFFIX(dx, work, dy, x, mean, invstd, g, ev_dgamma, ev_dbeta,         \
                                (double)bn_count(s), s, 0);                                    \
        for (size_t k = 0; k < total; k++)                                                     \
            if ((double)dx[k] != out.dx_eval[k]) {                                             \
                fail("bn_backward_dx == bn_backward's dx (eval)", s, k, dx[k], out.dx_eval[k]); \
                break;                                                                         \
            }                                                                                  \
        free(ev_dgamma); free(ev_dbeta); free(again);                                          \
        free(x); free(dy); free(y); free(dx); free(g); free(b); free(rm); free(rv);            \
        free(work); free(stats); free(mean); free(invstd);                                     \
        return out;                                                                            \
    }
DEFINE_RUN(float, f32)
DEFINE_RUN(double, f64)

static void free_outputs(outputs *o)
{
    free(o->y); free(o->dx); free(o->mean); free(o->var); free(o->dgamma); free(o->dbeta);
    free(o->y_eval); free(o->dx_eval);
}

static int same_bits(const double *a, const double *b, size_t n)
{
    return n == 0 || memcmp(a, b, n * sizeof(double)) == 0;
}

/* every output of a and b bitwise the same */
static int same_outputs(const outputs *a, const outputs *b, bn_shape s)
{
    size_t C = s.channels, total = bn_count(s) * C;
    return same_bits(a->y, b->y, total) && same_bits(a->dx, b->dx, total)
           && same_bits(a->mean, b->mean, C) && same_bits(a->var, b->var, C)
           && same_bits(a->dgamma, b->dgamma, C) && same_bits(a->dbeta, b->dbeta, C)
           && same_bits(a->y_eval, b->y_eval, total) && same_bits(a->dx_eval, b->dx_eval, total);
}

/* The kernels on shape s (data with an offset), both types, against naive();
 * the results also bitwise equal in every other instruction-set build, and
 * (float64) on 1 and 3 threads. */
static void check_shape(bn_shape s, double offset)
{
    size_t C = s.channels, total = bn_count(s) * C, state = 42 + total;
    double *x = malloc((total + 1) * 8), *dy = malloc((total + 1) * 8);
    double *g = malloc(C * 8), *b = malloc(C * 8), *rm = malloc(C * 8), *rv = malloc(C * 8);
    for (size_t k = 0; k < total; k++) {
        x[k] = offset + 3.0 * noise(&state);
        dy[k] = noise(&state);
    }
    for (size_t c = 0; c < C; c++) {
        g[c] = 1.0 + noise(&state);
        b[c] = noise(&state);
        rm[c] = offset + noise(&state);
        rv[c] = 2.0 + noise(&state);
    }
    /* float32 gets its input rounded to float first, so both see the same values */
    double *x32 = malloc((total + 1) * 8), *dy32 = malloc((total + 1) * 8);
    double *g32 = malloc(C * 8), *b32 = malloc(C * 8), *rm32 = malloc(C * 8), *rv32 = malloc(C * 8);
    for (size_t k = 0; k < total; k++) {
        x32[k] = (float)x[k];
        dy32[k] = (float)dy[k];
    }
    for (size_t c = 0; c < C; c++) {
        g32[c] = (float)g[c]; b32[c] = (float)b[c]; rm32[c] = (float)rm[c]; rv32[c] = (float)rv[c];
    }
    double eps = 1e-3;
    for (int type = 0; type < 2; type++) {
        const double *xs = type ? x : x32, *dys = type ? dy : dy32, *gs = type ? g : g32;
        const double *bs = type ? b : b32, *rms = type ? rm : rm32, *rvs = type ? rv : rv32;
        double tol = type ? 1e-11 : 3e-6, grad_scale = sqrt((double)bn_count(s) + 1.0);
        bn_set_num_threads(1);
        outputs got = type ? run_f64(s, xs, dys, gs, bs, rms, rvs, eps)
                           : run_f32(s, xs, dys, gs, bs, rms, rvs, eps);
        reference want = naive(s, xs, dys, gs, bs, eps, 1, rms, rvs);
        reference want_eval = naive(s, xs, dys, gs, bs, eps, 0, rms, rvs);
        const char *name = type ? "f64" : "f32";
        char label[64];
        snprintf(label, sizeof label, "%s mean", name);
        check_all(label, s, got.mean, want.mean, C, tol, fabs(offset) + 3.0);
        snprintf(label, sizeof label, "%s var", name);
        check_all(label, s, got.var, want.var, C, type ? 1e-11 : 1e-6, 3.0);
        snprintf(label, sizeof label, "%s y", name);
        check_all(label, s, got.y, want.y, total, tol, 4.0);
        snprintf(label, sizeof label, "%s dx", name);
        check_all(label, s, got.dx, want.dx, total, tol, 4.0);
        snprintf(label, sizeof label, "%s dgamma", name);
        check_all(label, s, got.dgamma, want.dgamma, C, tol, grad_scale);
        snprintf(label, sizeof label, "%s dbeta", name);
        check_all(label, s, got.dbeta, want.dbeta, C, tol, grad_scale);
        snprintf(label, sizeof label, "%s y (eval)", name);
        check_all(label, s, got.y_eval, want_eval.y, total, tol, 4.0);
        snprintf(label, sizeof label, "%s dx (eval)", name);
        check_all(label, s, got.dx_eval, want_eval.dx, total, tol, 4.0);
        bn_isa best = bn_get_isa();
        for (int isa = BN_ISA_DEFAULT; isa < (int)best; isa++) {
            if (bn_set_isa((bn_isa)isa) < 0) {
                continue;
            }
            outputs other = type ? run_f64(s, xs, dys, gs, bs, rms, rvs, eps)
                                 : run_f32(s, xs, dys, gs, bs, rms, rvs, eps);
            bn_set_isa(best);
            if (!same_outputs(&got, &other, s)) {
                snprintf(label, sizeof label, "%s: %s == %s", name, bn_isa_name((bn_isa)isa),
                         bn_isa_name(best));
                fail(label, s, 0, 0, 0);
            }
            free_outputs(&other);
        }
        if (type == 1) {
            bn_set_num_threads(3);
            outputs three = run_f64(s, xs, dys, gs, bs, rms, rvs, eps);
            bn_set_num_threads(1);
            if (!same_outputs(&got, &three, s)) {
                fail("1 thread == 3 threads", s, 0, 0, 0);
            }
            free_outputs(&three);
        }
        free_outputs(&got);
        free_reference(&want);
        free_reference(&want_eval);
    }
    free(x); free(dy); free(g); free(b); free(rm); free(rv);
    free(x32); free(dy32); free(g32); free(b32); free(rm32); free(rv32);
}

/* A constant feature normalizes to exactly beta on every path. */
enum { MAX_FEATURES = 256 }; /* of the shapes main checks */

static void check_constant(bn_shape s)
{
    size_t C = s.channels, total = bn_count(s) * C;
    float *x = malloc(total * sizeof(float)), *y = malloc(total * sizeof(float));
    float beta[MAX_FEATURES];
    for (size_t k = 0; k < total; k++) x[k] = 0.1f + (float)((k / s.inner) % C);
    for (size_t c = 0; c < C; c++) beta[c] = 0.25f * (float)c - 3.0f;
    double *work = malloc(bn_workspace_size(s) * sizeof(double));
    bn_partial stats[MAX_FEATURES];
    double mean[MAX_FEATURES], invstd[MAX_FEATURES];
    bn_forward_train_f32(y, stats, mean, invstd, work, x, NULL, beta, 1e-5, s);
    for (size_t k = 0; k < total; k++) {
        size_t c = (k / s.inner) % C;
        if (y[k] != beta[c] || stats[c].m2 != 0.0) {
            fail("constant feature -> beta", s, k, y[k], beta[c]);
            break;
        }
    }
    free(x); free(y); free(work);
}

/* float32 values near 1e30: squares would overflow float, not double */
static void check_huge_float32(void)
{
    bn_shape s = {4, 1, 1};
    float x[4] = {1e30f, 3e30f, 1e30f, 3e30f}, y[4];
    bn_partial stats[1];
    double mean[1], invstd[1], *work = malloc(bn_workspace_size(s) * sizeof(double));
    bn_forward_train_f32(y, stats, mean, invstd, work, x, NULL, NULL, 1e-5, s);
    for (int k = 0; k < 4; k++) {
        double want = k % 2 ? 1.0 : -1.0;
        if (!(fabs(y[k] - want) < 1e-6)) fail("huge float32", s, (size_t)k, y[k], want);
    }
    free(work);
}

/* The empty batch: nothing to read, nothing written, zero sums. */
static void check_empty(bn_shape s)
{
    double *work = malloc(bn_workspace_size(s) * sizeof(double));
    double mean[3] = {0}, invstd[3] = {1, 1, 1}, dgamma[3] = {9, 9, 9}, dbeta[3] = {9, 9, 9};
    bn_partial stats[3];
    float dummy[1] = {0};
    bn_stats_f32(stats, work, dummy, NULL, s);
    bn_backward_f32(dummy, dgamma, dbeta, work, dummy, dummy, mean, invstd, NULL, s, 1);
    for (size_t c = 0; c < s.channels; c++) {
        if (stats[c].count != 0 || dgamma[c] != 0 || dbeta[c] != 0) {
            fail("empty batch", s, c, dgamma[c], 0);
        }
    }
    free(work);
}

int main(void)
{
    const bn_shape shapes[] = {
        {2, 3, 5000},  /* planar: rows cut into tiles */
        {37, 2, 400},  /* planar: tiles of five rows, feature by feature */
        {37, 2, 100},  /* planar rows just over the lanes' limit (BN_SHORT_ROW) */
        {2000, 3, 50}, /* lanes: rows of 50, a wide row of 150 lanes */
        {5, 4, 3},     /* lanes: rows shorter than a vector, folded into wide rows */
        {3000, 3, 20}, /* lanes: many blocks of rows */
        {5000, 2, 7},  /* lanes: two groups, and a partial wide row at the end */
        {700, 3, 150}, /* planar short rows: tiles of 13 rows */
        {30, 200, 100}, /* planar: tiles of 20 rows, one of 10 */
        {2, 3, 200000}, /* planar rows from memory: streamed outputs, in float32 too */
        {2000, 3, 300}, /* planar short rows from memory */
        {61, 256, 80},  /* planar: short rows, too many lanes for the lanes strategy */
        {30000, 3, 20}, /* lanes from memory, several groups */
        {400000, 3, 1}, /* channels-last from memory: streamed, many groups */
        {9000, 3, 1},  /* channels-last: wide rows of 11 rows, three groups */
        {300, 40, 1},  /* channels-last: a wide row is one row */
        {7, 1, 1},     /* one feature */
        {2, 5, 1},     /* two values per feature */
    };
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        if (shapes[k].channels > MAX_FEATURES) {
            fail("shape with more features than MAX_FEATURES", shapes[k], 0, 0, 0);
            continue;
        }
        check_shape(shapes[k], 0.0);
        check_shape(shapes[k], 1e4); /* a large common offset */
        check_constant(shapes[k]);
    }
    check_huge_float32();
    check_empty((bn_shape){0, 3, 1});
    check_empty((bn_shape){0, 3, 4});
    check_empty((bn_shape){4, 3, 0});
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("C core, every path, builds up to %s: all checks passed\n",
           bn_isa_name(bn_get_isa()));
    return 0;
}
