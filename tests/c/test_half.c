/* test_half.c -- float16 and bfloat16 against plain reference functions: every
 * half's double and its way back (a NaN comes back quiet, as from an IEEE
 * conversion: the same half but for a signaling one), and the rounding of
 * doubles at, just above and just below every halfway point between neighbouring
 * halves (so the subnormal boundaries, the overflow threshold and the largest
 * finite half too), at the halves themselves and between them, with both signs,
 * and zeros, inf and NaNs.
 * First vec.h's conversions themselves (the baseline build's vector width, or
 * plain C when built portable), then through the _f16 and _bf16 kernels in every
 * instruction-set build the CPU runs: every build must round exactly as the
 * reference does, so all builds agree. Last, every kernel on halves against the
 * same kernel in double on the same values: its statistics and sums the same, its
 * outputs the double ones rounded once. Build and run: bash tests/c/run.sh [mode] */
#include "core.h"
#define BN_VECTOR_BYTES 16
#include "vec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

static const struct {
    const char *name;
    int m; /* mantissa bits */
} formats[] = {{"float16", 10}, {"bfloat16", 7}};

/* ---- references, written plainly -------------------------------------------- */

static unsigned inf_of(int m)
{
    return 0x7fffu >> m << m;
}

/* the value of half h: (1 + f / 2^m) * 2^(e - bias), or f * 2^(1 - bias - m) for
 * e = 0; for the largest e the value it would have (inf: 2^(emax - bias)) */
static double ref_value(unsigned h, int m)
{
    int bias = (1 << (14 - m)) - 1, e = (int)((h & 0x7fff) >> m);
    double f = h & ((1u << m) - 1);
    double v = e == 0 ? ldexp(f, 1 - bias - m) : ldexp(f + ldexp(1.0, m), e - bias - m);
    return h & 0x8000 ? -v : v;
}

/* half h, quiet if a NaN */
static unsigned quiet(unsigned h, int m)
{
    return h | ((h & 0x7fff) > inf_of(m) ? 1u << (m - 1) : 0);
}

/* the bits of half h's double: inf and NaN keep the mantissa as the payload's top */
static uint64_t ref_bits(unsigned h, int m)
{
    double v = ref_value(h, m);
    uint64_t bits, top = (uint64_t)(h & 0x8000) << 48 | 0x7ff0000000000000;
    uint64_t payload = (uint64_t)(quiet(h, m) & ~inf_of(m) & 0x7fff) << (52 - m);
    memcpy(&bits, &v, sizeof bits);
    return (h & 0x7fff) >= inf_of(m) ? top | payload : bits;
}

/* The half nearest v, ties to the one with an even last bit, by bisection over the
 * positive halves up to inf, which stands for 2^(emax - bias) (IEEE rounds as if
 * the exponent went on, then overflows to inf). A NaN keeps its payload's top bits,
 * and is quiet. */
static unsigned ref_round(double v, int m)
{
    unsigned sign = signbit(v) ? 0x8000 : 0, inf = inf_of(m), lo = 0, hi = inf;
    double a = fabs(v);
    if (isnan(v)) {
        uint64_t bits;
        memcpy(&bits, &v, sizeof bits);
        unsigned payload = (unsigned)(bits >> (52 - m)) & ~inf & 0x7fff;
        return sign | inf | payload | 1u << (m - 1);
    }
    if (a >= ref_value(inf, m)) {
        return sign | inf;
    }
    while (hi - lo > 1) { /* value(lo) <= a < value(hi) */
        unsigned mid = (lo + hi) / 2;
        *(ref_value(mid, m) <= a ? &lo : &hi) = mid;
    }
    double below = a - ref_value(lo, m), above = ref_value(hi, m) - a; /* exact */
    return sign | (below < above || (below == above && lo % 2 == 0) ? lo : hi);
}

/* ---- the doubles to round ------------------------------------------------------ */

static double from_bits(uint64_t bits)
{
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* v[] <- for each positive finite half h and the next one up: h, just above h,
 * their halfway point and the doubles on each side of it, a value between, all
 * with both signs; then zeros, infs, NaNs and doubles far out of range. Returns
 * the count, a multiple of BN_LANES (the last few repeated). */
static size_t doubles_to_round(double *v, int m)
{
    static const uint64_t specials[] = {
        0x7ff8000000000000, /* quiet NaN */
        0x7ff0000000000001, /* signaling, payload below a half's */
        0x7ff4000000000000, /* signaling */
        0xfffc000000000123, /* negative, quiet */
        0x7ff0000000000000, /* inf */
        0x0000000000000001, /* the least subnormal double */
        0x000fffffffffffff, /* the largest subnormal double */
        0x0010000000000000, /* the least normal double */
        0x7fefffffffffffff, /* the largest double */
        0x0000000000000000, /* zero */
    };
    size_t n = 0;
    uint64_t state = 0x853c49e6748fea9bULL;
    for (unsigned h = 0; h < inf_of(m); h++) {
        double t = ref_value(h, m), next = ref_value(h + 1, m), mid = (t + next) / 2;
        state = state * 6364136223846793005ULL + 1442695040888963407ULL;
        double between = t + (next - t) * ((double)(state >> 11) * 0x1p-53);
        double each[] = {t, nextafter(t, INFINITY), mid, nextafter(mid, 0.0),
                         nextafter(mid, INFINITY), between};
        for (size_t k = 0; k < sizeof each / sizeof each[0]; k++) {
            v[n++] = each[k];
            v[n++] = -each[k];
        }
    }
    for (size_t k = 0; k < sizeof specials / sizeof specials[0]; k++) {
        v[n++] = from_bits(specials[k]);
        v[n++] = -from_bits(specials[k]);
    }
    for (; n % BN_LANES != 0; n++) {
        v[n] = v[n - 1];
    }
    return n;
}

/* got for case k of what, against want: a NaN needs only to be a NaN when `any_nan` */
static void check(const char *what, const char *name, size_t k, unsigned got, unsigned want,
                  int m, int any_nan)
{
    int nan = (want & 0x7fff) > inf_of(m);
    if (got == want || (any_nan && nan && (got & 0x7fff) > inf_of(m))) {
        return;
    }
    if (failures++ < 10) {
        fprintf(stderr, "%s %s, case %zu: got 0x%04x, want 0x%04x\n", name, what, k, got, want);
    }
}

/* ---- vec.h's conversions --------------------------------------------------------- */

static bn_vec load(const uint16_t *p, int m)
{
    return m == 10 ? bn_load_f16(p) : bn_load_bf16(p);
}

static void store(uint16_t *p, bn_vec v, int m)
{
    if (m == 10) {
        bn_store_f16(p, v);
    }
    else {
        bn_store_bf16(p, v);
    }
}

static void test_conversions(const double *v, size_t n, int m, const char *name)
{
    for (unsigned h = 0; h < 0x10000; h += BN_W) {
        uint16_t in[BN_W], back[BN_W];
        uint64_t bits[BN_W];
        for (int j = 0; j < BN_W; j++) {
            in[j] = (uint16_t)(h + (unsigned)j);
        }
        bn_vec d = load(in, m);
        memcpy(bits, &d, sizeof bits);
        store(back, d, m);
        for (int j = 0; j < BN_W; j++) {
            if (bits[j] != ref_bits(in[j], m) && failures++ < 10) {
                fprintf(stderr, "%s 0x%04x loads as 0x%016llx, want 0x%016llx\n", name, in[j],
                        (unsigned long long)bits[j], (unsigned long long)ref_bits(in[j], m));
            }
            check("back", name, in[j], back[j], quiet(in[j], m), m, 0);
        }
    }
    for (size_t k = 0; k < n; k += BN_W) {
        uint16_t out[BN_W];
        store(out, bn_load_wide(v + k), m);
        for (int j = 0; j < BN_W; j++) {
            check("rounding", name, k + (size_t)j, out[j], ref_round(v[k + (size_t)j], m), m, 0);
        }
    }
}

/* ---- the same through the kernels ------------------------------------------------ */

/* y <- (x - mean) * 1 + (-0) feature by feature: with x = -0 and mean = -v it is v
 * exactly, signed zeros too, and with mean = 0 it is x */
static void forward(uint16_t *y, const uint16_t *x, const double *mean, size_t n, int m)
{
    bn_shape s = {1, n, 1};
    double *invstd = malloc(n * sizeof(double)), *work = malloc(bn_workspace_size(s) * 8);
    float *beta = malloc(n * sizeof(float));
    for (size_t c = 0; c < n; c++) {
        invstd[c] = 1.0;
        beta[c] = -0.0f;
    }
    (m == 10 ? bn_forward_f16 : bn_forward_bf16)(y, work, x, mean, invstd, NULL, beta, s);
    free(invstd);
    free(work);
    free(beta);
}

static void test_kernels(const double *v, size_t n, int m, const char *name)
{
    size_t most = n > 0x10000 ? n : 0x10000;
    uint16_t *x = malloc(most * 2), *y = malloc(most * 2);
    double *mean = malloc(most * sizeof(double));
    for (unsigned h = 0; h < 0x10000; h++) {
        x[h] = (uint16_t)h;
        mean[h] = 0.0;
    }
    forward(y, x, mean, 0x10000, m);
    for (unsigned h = 0; h < 0x10000; h++) {
        check("through a kernel and back", name, h, y[h], quiet(h, m), m, 0);
    }
    for (size_t k = 0; k < n - 3; k++) { /* n - 3: the lanes' last vector in parts */
        x[k] = 0x8000;
        mean[k] = -v[k];
    }
    forward(y, x, mean, n - 3, m);
    for (size_t k = 0; k < n - 3; k++) {
        check("rounding in a kernel", name, k, y[k], ref_round(v[k], m), m, 1);
    }
    free(x);
    free(y);
    free(mean);
}

/* ---- every kernel: the double kernel's results, rounded once -------------------------- */

static void same_doubles(const char *what, const char *name, const void *got, const void *want,
                         size_t bytes)
{
    if (memcmp(got, want, bytes) != 0 && failures++ < 10) {
        fprintf(stderr, "%s %s: not the double kernel's\n", name, what);
    }
}

static void rounded(const char *what, const char *name, const uint16_t *got, const double *want,
                    size_t n, int m)
{
    for (size_t k = 0; k < n; k++) {
        check(what, name, k, got[k], ref_round(want[k], m), m, 0);
    }
}

/* The batch-norm kernels and the row kernels (a group norm of each outer row) on shape s:
 * halves h*, and the same values in double d* */
static void test_against_double(bn_shape s, int m, const char *name)
{
    size_t C = s.channels, n = bn_count(s) * C, rows = s.outer * C, ws = bn_workspace_size(s);
    bn_rows r = {s.outer, C * s.inner, s.inner, 1, 1};
    size_t rw = bn_rows_workspace_size(r), w = (ws > rw ? ws : rw) + 1;
    uint16_t *hx = malloc(2 * n + 2), *hdy = malloc(2 * n + 2), *hy = malloc(2 * n + 2);
    double *dx = malloc(8 * n + 8), *ddy = malloc(8 * n + 8), *dy = malloc(8 * n + 8);
    double *sums = malloc(8 * (8 * C + 4 * rows + 2 * w)), *dsums = sums + 4 * C + 2 * rows + w;
    float *gamma = malloc(4 * C + 4), *beta = malloc(4 * C + 4);
    double *dgamma = malloc(8 * C + 8), *dbeta = malloc(8 * C + 8), shift[64];
    bn_partial *hstats = malloc(sizeof(bn_partial) * (2 * C + 2)), *dstats = hstats + C + 1;
    for (size_t k = 0; k < n; k++) {
        hx[k] = (uint16_t)ref_round(3.0 + sin((double)k), m);
        hdy[k] = (uint16_t)ref_round(cos((double)k * 0.7), m);
        dx[k] = ref_value(hx[k], m);
        ddy[k] = ref_value(hdy[k], m);
    }
    for (size_t c = 0; c < C; c++) {
        gamma[c] = (float)(1.0 + 0.25 * sin((double)c));
        beta[c] = (float)(0.5 * cos((double)c));
        dgamma[c] = gamma[c];
        dbeta[c] = beta[c];
        shift[c % 64] = 3.0;
    }
    /* each: mean, invstd [C], then dgamma, dbeta [C], row moments [2 rows], work; the row
     * kernels' three moments [3 outer] from dgamma on */
    double *hm = sums, *hi = hm + C, *hg = hi + C, *hb = hg + C, *hw = hb + C + 2 * rows;
    double *dm = dsums, *di = dm + C, *dg = di + C, *db = dg + C, *dw = db + C + 2 * rows;
    int f16 = m == 10;
    (f16 ? bn_stats_f16 : bn_stats_bf16)(hstats, hw, hx, C <= 64 ? shift : NULL, s);
    bn_stats_f64(dstats, dw, dx, C <= 64 ? shift : NULL, s);
    same_doubles("stats", name, hstats, dstats, C * sizeof(bn_partial));
    (f16 ? bn_forward_train_f16 : bn_forward_train_bf16)(hy, hstats, hm, hi, hw, hx, gamma, beta,
                                                        1e-5, s);
    bn_forward_train_f64(dy, dstats, dm, di, dw, dx, dgamma, dbeta, 1e-5, s);
    same_doubles("forward_train moments", name, hm, dm, 2 * C * sizeof(double));
    rounded("forward_train", name, hy, dy, n, m);
    (f16 ? bn_forward_f16 : bn_forward_bf16)(hy, hw, hx, hm, hi, gamma, NULL, s);
    bn_forward_f64(dy, dw, dx, dm, di, dgamma, NULL, s);
    rounded("forward", name, hy, dy, n, m);
    for (int training = 0; training < 2; training++) {
        (f16 ? bn_backward_f16 : bn_backward_bf16)(hy, hg, hb, hw, hdy, hx, hm, hi, gamma, s,
                                                   training);
        bn_backward_f64(dy, dg, db, dw, ddy, dx, dm, di, dgamma, s, training);
        same_doubles("backward sums", name, hg, dg, 2 * C * sizeof(double));
        rounded("backward", name, hy, dy, n, m);
        (f16 ? bn_grad_sums_f16 : bn_grad_sums_bf16)(hg, hb, hw, hdy, hx, hm, hi, s);
        (f16 ? bn_backward_dx_f16 : bn_backward_dx_bf16)(hy, hw, hdy, hx, hm, hi, gamma, hg, hb,
                                                         (double)bn_count(s), s, training);
        rounded("backward_dx", name, hy, dy, n, m);
    }
    (f16 ? bn_rows_forward_f16 : bn_rows_forward_bf16)(hy, hg, hg + r.rows, hg + 2 * r.rows, hx,
                                                       gamma, beta, 1e-5, r);
    bn_rows_forward_f64(dy, dg, dg + r.rows, dg + 2 * r.rows, dx, dgamma, dbeta, 1e-5, r);
    same_doubles("rows_forward moments", name, hg, dg, 3 * r.rows * sizeof(double));
    rounded("rows_forward", name, hy, dy, n, m);
    (f16 ? bn_rows_backward_f16 : bn_rows_backward_bf16)(hy, hm, hi, hw, hdy, hx, hg,
                                                         hg + r.rows, gamma, r);
    bn_rows_backward_f64(dy, dm, di, dw, ddy, dx, dg, dg + r.rows, dgamma, r);
    same_doubles("rows_backward sums", name, hm, dm, 2 * C * sizeof(double));
    rounded("rows_backward", name, hy, dy, n, m);
    free(hx);
    free(hdy);
    free(hy);
    free(dx);
    free(ddy);
    free(dy);
    free(sums);
    free(gamma);
    free(beta);
    free(dgamma);
    free(dbeta);
    free(hstats);
}

int main(void)
{
    /* lanes; rows shorter than a vector; lanes of 49; planar tiles; long rows */
    static const bn_shape shapes[] = {{300, 40, 1}, {5, 4, 3}, {64, 16, 49}, {37, 2, 400},
                                      {4, 3, 3000}, {2, 5, 1}};
    double *v = malloc(sizeof(double) * (12 * 0x8000 + 20 + BN_LANES));
    for (size_t f = 0; f < sizeof formats / sizeof formats[0]; f++) {
        size_t n = doubles_to_round(v, formats[f].m);
        test_conversions(v, n, formats[f].m, formats[f].name);
        for (int isa = BN_ISA_DEFAULT; isa <= BN_ISA_AVX512; isa++) {
            char label[64];
            snprintf(label, sizeof label, "%s (%s)", formats[f].name, bn_isa_name((bn_isa)isa));
            if (bn_set_isa((bn_isa)isa) == 0) {
                test_kernels(v, n, formats[f].m, label);
                for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
                    test_against_double(shapes[k], formats[f].m, label);
                }
            }
        }
        printf("%s: every half and back, %zu doubles rounded, in vec.h and the kernels; "
               "every kernel gives the double kernel's results rounded once\n",
               formats[f].name, n);
    }
    free(v);
    if (failures) {
        fprintf(stderr, "half conversions: %d failures\n", failures);
        return 1;
    }
    printf("half conversions and kernels: all checks passed\n");
    return 0;
}
