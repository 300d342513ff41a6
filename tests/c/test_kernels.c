/* test_kernels.c -- the C core alone, against values worked out by hand.
 * Build and run: bash tests/c/run.sh [sanitize] */
#include "bn.h"
#include "core.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int failures = 0;

/* workspace for the small shapes below; test_workspace checks it suffices */
#define WORK 1024

#define CHECK_CLOSE(got, want, tol)                                                   \
    do {                                                                              \
        double got_ = (got), want_ = (want);                                          \
        if (!(fabs(got_ - want_) <= (tol))) {                                         \
            fprintf(stderr, "%s:%d: %s = %.17g, want %.17g (tol %g)\n", __FILE__,     \
                    __LINE__, #got, got_, want_, (double)(tol));                      \
            failures++;                                                               \
        }                                                                             \
    } while (0)

/* The course notes' batch [2, 0, 2, 4]: mean 2, biased variance 2. */
static void test_worked_example(void)
{
    const double x[4] = {2, 0, 2, 4}, scaled[4] = {200, 0, 200, 400};
    const double gamma[1] = {1.5}, beta[1] = {0.5};
    bn_shape s = {4, 1, 1}; /* (N=4, C=1) */
    bn_partial stats[1];
    double work[WORK], mean[1], invstd[1], y[4], y_scaled[4];

    bn_stats_f64(stats, work, x, NULL, s);
    CHECK_CLOSE(stats[0].count, 4, 0);
    CHECK_CLOSE(stats[0].mean, 2, 0);
    CHECK_CLOSE(stats[0].m2, 8, 0);
    bn_batch_moments(mean, invstd, stats, 1, 1e-12);
    bn_forward_f64(y, work, x, mean, invstd, gamma, beta, s);
    const double want[4] = {0.5, 0.5 - sqrt(2.0) * 1.5, 0.5, 0.5 + sqrt(2.0) * 1.5};
    for (int i = 0; i < 4; i++) {
        CHECK_CLOSE(y[i], want[i], 1e-9);
    }
    /* scaling the input by 100 leaves y unchanged: the next layer sees the same */
    bn_forward_train_f64(y_scaled, stats, mean, invstd, work, scaled, gamma, beta, 1e-12, s);
    CHECK_CLOSE(stats[0].mean, 200, 0);
    for (int i = 0; i < 4; i++) {
        CHECK_CLOSE(y_scaled[i], y[i], 1e-9);
    }
}

/* (outer=2, C=3, inner=2): each feature's values are interleaved in memory. */
static void test_layout_and_float32(void)
{
    /* feature c holds {c, c+1} in row 0 and {c+2, c+3} in row 1 */
    float x[12];
    for (int o = 0; o < 2; o++) {
        for (int c = 0; c < 3; c++) {
            for (int i = 0; i < 2; i++) {
                x[(o * 3 + c) * 2 + i] = (float)(c + 2 * o + i);
            }
        }
    }
    bn_shape s = {2, 3, 2};
    bn_partial stats[3];
    double work[WORK];
    bn_stats_f32(stats, work, x, NULL, s);
    for (int c = 0; c < 3; c++) {
        CHECK_CLOSE(stats[c].mean, c + 1.5, 0);
        CHECK_CLOSE(stats[c].m2, 5.0, 0); /* deviations -1.5, -0.5, 0.5, 1.5 */
    }
}

/* A constant feature normalizes to exactly beta; a large offset keeps its variance. */
static void test_constant_and_offset(void)
{
    double x[6] = {0.1, 0.1, 0.1, 1e8 + 1, 1e8 - 1, 1e8};
    bn_shape constant = {3, 1, 1}, offset = {3, 1, 1};
    bn_partial stats[1];
    double work[WORK], mean[1], invstd[1], y[3];
    const double beta[1] = {0.25};
    bn_forward_train_f64(y, stats, mean, invstd, work, x, NULL, beta, 1e-5, constant);
    CHECK_CLOSE(stats[0].mean, 0.1, 0);
    CHECK_CLOSE(stats[0].m2, 0, 0);
    for (int i = 0; i < 3; i++) {
        CHECK_CLOSE(y[i], 0.25, 0);
    }
    bn_stats_f64(stats, work, x + 3, NULL, offset);
    CHECK_CLOSE(stats[0].mean, 1e8, 0);
    CHECK_CLOSE(stats[0].m2, 2.0, 1e-9);
}

/* Merging two blocks' partials gives the statistics of the whole. */
static void test_merge(void)
{
    const double x[5] = {1, 2, 3, 4, 10};
    bn_partial a[1], b[1], whole[1];
    double work[WORK];
    bn_stats_f64(a, work, x, NULL, (bn_shape){2, 1, 1});
    bn_stats_f64(b, work, x + 2, NULL, (bn_shape){3, 1, 1});
    bn_stats_f64(whole, work, x, NULL, (bn_shape){5, 1, 1});
    bn_partial_merge(a, b);
    CHECK_CLOSE(a[0].count, whole[0].count, 0);
    CHECK_CLOSE(a[0].mean, whole[0].mean, 1e-15);
    CHECK_CLOSE(a[0].m2, whole[0].m2, 1e-12);
    bn_partial empty = {0, 0, 0};
    bn_partial_merge(a, &empty);
    CHECK_CLOSE(a[0].count, 5, 0);
}

/* Training backward: sum dx = 0 per feature, and sum dx * xhat = 0 too when
 * eps = 0 (with eps > 0 it is eps / (var + eps) of sum dy * xhat times gamma * invstd). */
static void test_backward(void)
{
    const double x[4] = {2, 0, 2, 4}, dy[4] = {0.3, -1.0, 0.7, 0.2}, gamma[1] = {2.0};
    bn_shape s = {4, 1, 1};
    bn_partial stats[1];
    double work[WORK], mean[1], invstd[1], dgamma[1], dbeta[1], dx[4];
    bn_stats_f64(stats, work, x, NULL, s);
    bn_batch_moments(mean, invstd, stats, 1, 0.0);
    bn_backward_f64(dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s, 1);
    CHECK_CLOSE(dbeta[0], 0.2, 1e-15);
    /* xhat = [0, -a, 0, a] with a = 2 * invstd: dgamma = (1.0 + 0.2) * a */
    CHECK_CLOSE(dgamma[0], 1.2 * 2 * invstd[0], 1e-15);
    double sum = 0, sum_xhat = 0;
    for (int i = 0; i < 4; i++) {
        sum += dx[i];
        sum_xhat += dx[i] * (x[i] - mean[0]);
    }
    CHECK_CLOSE(sum, 0, 1e-14);
    CHECK_CLOSE(sum_xhat, 0, 1e-14);
    bn_backward_f64(dx, dgamma, dbeta, work, dy, x, mean, invstd, gamma, s, 0);
    CHECK_CLOSE(dx[1], -1.0 * 2.0 * invstd[0], 1e-15);
    CHECK_CLOSE(dbeta[0], 0.2, 1e-15);
}

/* Running statistics: momentum weights the new batch; the variance is unbiased. */
static void test_running_update(void)
{
    float running_mean[1] = {1.0f}, running_var[1] = {1.0f};
    bn_partial stats[1] = {{4, 2.0, 8.0}}; /* the worked example: unbiased var 8/3 */
    bn_update_running_f32(running_mean, running_var, stats, 1, 0.25);
    CHECK_CLOSE(running_mean[0], 0.75 * 1.0 + 0.25 * 2.0, 1e-7);
    CHECK_CLOSE(running_var[0], 0.75 * 1.0 + 0.25 * 8.0 / 3.0, 1e-7);
    double moments_mean[1], moments_invstd[1];
    bn_running_moments_f32(moments_mean, moments_invstd, running_mean, running_var, 1, 0.0);
    CHECK_CLOSE(moments_invstd[0], 1.0 / sqrt((double)running_var[0]), 1e-15);
}

/* The shapes these tests use fit in WORK doubles of workspace. */
static void test_workspace(void)
{
    const bn_shape shapes[] = {{4, 1, 1}, {2, 3, 2}, {3, 1, 1}, {5, 1, 1}, {2, 1, 1}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        CHECK_CLOSE((double)(bn_workspace_size(shapes[i]) <= WORK), 1, 0);
    }
}

/* The plan's strategy and summation blocks follow from the shape alone:
 * channels-last and short rows run as lanes, folded into wide rows of at
 * least BN_MIN_LANES; longer rows (or too many features) run planar, in
 * tiles of at most BN_TILE values. */
static void test_plan(void)
{
    bn_plan p = bn_make_plan((bn_shape){4, 1, 1}, sizeof(float), 0); /* 4 values of one feature */
    CHECK_CLOSE(p.lanes, 1, 0);
    CHECK_CLOSE((double)p.wide, 32, 0);
    CHECK_CLOSE((double)p.wide_rows, 0, 0);
    CHECK_CLOSE((double)p.tail, 4, 0);
    CHECK_CLOSE((double)p.groups, 1, 0);
    p = bn_make_plan((bn_shape){10, 3, 5}, sizeof(float), 0); /* rows of 5: 15 lanes a row, 3 rows folded */
    CHECK_CLOSE(p.lanes, 1, 0);
    CHECK_CLOSE((double)p.wide, 45, 0);
    CHECK_CLOSE((double)p.wide_rows, 3, 0);
    CHECK_CLOSE((double)p.tail, 15, 0);
    p = bn_make_plan((bn_shape){2 * BN_GROUP_ROWS + 1, 64, 1}, sizeof(float), 0);
    CHECK_CLOSE((double)p.groups, 3, 0);
    p = bn_make_plan((bn_shape){8, 2048, 49}, sizeof(float), 0); /* short rows, too many lanes */
    CHECK_CLOSE(p.lanes, 0, 0);
    CHECK_CLOSE((double)p.tiles, 1, 0);
    bn_tile t = bn_tile_at((bn_shape){8, 2048, 49}, 0);
    CHECK_CLOSE((double)(t.o1 - t.o0), 8, 0); /* 41 rows fit a tile; there are 8 */
    p = bn_make_plan((bn_shape){3, 2, BN_TILE + 5}, sizeof(float), 0); /* long rows cut in pieces */
    CHECK_CLOSE((double)p.tiles, 6, 0);
    t = bn_tile_at((bn_shape){3, 2, BN_TILE + 5}, 3);
    CHECK_CLOSE((double)t.o0, 1, 0);
    CHECK_CLOSE((double)t.i0, BN_TILE, 0);
    CHECK_CLOSE((double)t.i1, BN_TILE + 5, 0);
}

int main(void)
{
    test_plan();
    test_workspace();
    test_worked_example();
    test_layout_and_float32();
    test_constant_and_offset();
    test_merge();
    test_backward();
    test_running_update();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("C core: all checks passed\n");
    return 0;
}
