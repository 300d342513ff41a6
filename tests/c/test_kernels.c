/* test_kernels.c -- the C core alone, against values worked out by hand.
 * Build and run: bash tests/c/run.sh [sanitize] */
#include "bn_kernels.h"
#include "bn_kernels_internal.h"

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

/* The walk that asks for a pipelined pass's rows ahead (bn_rows_ahead) takes
 * the rows of features c0 .. c1 - 1 in the order the pass reads them: each
 * feature's rows, C * inner apart, then the next feature's, and it stops
 * after the last. Shape (outer 3, C 4, inner 40) float32, features 1 and 2. */
static void test_rows_ahead(void)
{
    bn_shape s = {3, 4, 40};
    static float x[3 * 4 * 40];
    bn_rows_ahead a = bn_rows_ahead_at(x, NULL, s, sizeof(float), 1, 3);
    size_t visits = 0;
    for (size_t c = 1; c < 3; c++) {
        for (size_t o = 0; o < s.outer; o++) {
            for (size_t b = 0; b < s.inner * sizeof(float); b += 16) {
                size_t want = (o * s.channels + c) * s.inner * sizeof(float) + b;
                CHECK_CLOSE((double)a.at, (double)want, 0);
                CHECK_CLOSE((double)a.done, 0, 0);
                bn_rows_ahead_move(&a, 16);
                visits++;
            }
        }
    }
    CHECK_CLOSE((double)visits, 2 * 3 * 10, 0);
    CHECK_CLOSE((double)a.done, 1, 0);
    /* a step across a row's end lands as far into the next row: 160 bytes a
       row, three steps of 48 leave 16, the fourth lands 32 into row 1 */
    a = bn_rows_ahead_at(x, NULL, s, sizeof(float), 1, 3);
    for (int k = 0; k < 4; k++) {
        bn_rows_ahead_move(&a, 48);
    }
    CHECK_CLOSE((double)a.at, (double)((1 * 4 + 1) * 160 + 32), 0);
    /* a reader's piece of 48 bytes asks for the walk's next 48: within row 0
       of feature 1 (bytes 160 .. 320), then split across its end, the rest
       from the start of row 1 (byte 800) */
    a = bn_rows_ahead_at(x, NULL, s, sizeof(float), 1, 3);
    for (int k = 0; k < 3; k++) {
        bn_row_asks r = bn_rows_ahead_take(&a, 48);
        CHECK_CLOSE((double)r.first, 160.0 + 48 * k, 0);
        CHECK_CLOSE((double)r.split, 48, 0);
        CHECK_CLOSE((double)(r.has_first && !r.has_second), 1, 0);
    }
    bn_row_asks split = bn_rows_ahead_take(&a, 48);
    CHECK_CLOSE((double)split.first, 304, 0);
    CHECK_CLOSE((double)split.split, 16, 0);
    CHECK_CLOSE((double)split.second, 800, 0);
    CHECK_CLOSE((double)(split.has_first && split.has_second), 1, 0);
    CHECK_CLOSE((double)a.at, 832, 0);
    /* the last piece of the last row: nothing after it to ask for */
    a = bn_rows_ahead_at(x, NULL, s, sizeof(float), 3, 4);
    bn_rows_ahead_move(&a, 2 * 160 + 150);
    bn_row_asks last = bn_rows_ahead_take(&a, 40);
    CHECK_CLOSE((double)last.split, 10, 0);
    CHECK_CLOSE((double)(last.has_first && !last.has_second), 1, 0);
    CHECK_CLOSE((double)a.done, 1, 0);
    /* a walk set to go 192 bytes ahead has moved so far, across the end of
       feature 1's row 0 (bytes 160 .. 320) to 32 into its row 1 (800) */
    a = bn_rows_ahead_from(x, NULL, s, sizeof(float), 1, 3, 192);
    CHECK_CLOSE((double)a.at, 832, 0);
    /* asks within a row: BN_AHEAD_BYTES ahead, as far as the row goes */
    bn_row_asks within = bn_row_asks_within(3000);
    CHECK_CLOSE((double)within.first, BN_AHEAD_BYTES, 0);
    CHECK_CLOSE((double)within.split, 3000 - BN_AHEAD_BYTES, 0);
    CHECK_CLOSE((double)(within.has_first && !within.has_second), 1, 0);
    CHECK_CLOSE((double)bn_row_asks_within(BN_AHEAD_BYTES).split, 0, 0);
    /* no features, no rows: done from the start */
    CHECK_CLOSE((double)bn_rows_ahead_at(x, NULL, s, sizeof(float), 2, 2).done, 1, 0);
    bn_shape empty = {0, 4, 40};
    CHECK_CLOSE((double)bn_rows_ahead_at(x, NULL, empty, sizeof(float), 0, 4).done, 1, 0);
}

int main(void)
{
    test_rows_ahead();
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
