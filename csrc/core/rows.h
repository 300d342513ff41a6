/* rows.h -- layer, group, instance and RMS normalization for one element type,
 * in one build: included by build.h after kernels.h, whose helpers it uses
 * (with the same T and NAME). x is rows x[rows][n] (bn_rows in bn.h), each
 * normalized over its own values. A row is runs of `spread` values, each
 * run a channel with its own gamma and beta: y = (x - mean) * (invstd *
 * gamma) + beta, computed alike per value or per run. */

/* ---- statistics ------------------------------------------------------------- */

/* sums[0] <- sum d, sums[1] <- sum d * d over x[0 .. n), d = x - center */
static void NAME(sums_about)(double sums[2], const T *x, size_t n, double center)
{
    bn_vec acc[BN_K] = {0}, acc2[BN_K] = {0};
    NAME(add_sums)(acc, acc2, NULL, x, n, center);
    sums[0] = bn_total(acc);
    sums[1] = bn_total(acc2);
}

/* A row's statistics: tiles of BN_TILE values absorbed in order (as a planar
 * feature's), each summed in one pass about a center: the mean of the first
 * BN_LANES values, then the mean so far. A tile whose mean proves far from
 * its center, so that the squares would cancel more than half their bits,
 * is summed again about its mean. */
static bn_partial NAME(row_stats)(const T *x, size_t n)
{
    bn_partial stats = {0.0, 0.0, 0.0};
    double first = 0.0, sums[2];
    size_t few = n < BN_LANES ? n : BN_LANES;
    for (size_t j = 0; j < few; j++) {
        first += NAME(get)(x[j]);
    }
    for (size_t i = 0; i < n; i += BN_TILE) {
        double len = (double)(n - i < BN_TILE ? n - i : BN_TILE);
        double center = i == 0 ? first / (double)few : stats.mean;
        NAME(sums_about)(sums, x + i, (size_t)len, center);
        if (sums[0] * sums[0] > sums[1] * len / 2) {
            center += sums[0] / len;
            NAME(sums_about)(sums, x + i, (size_t)len, center);
        }
        bn_absorb(&stats, len, center, sums[0], sums[1]);
    }
    return stats;
}

/* ---- elementwise: per value (spread 1) or per run ---------------------------------- */

/* (x[i] - mean) * (invstd * gamma[i]) + beta[i] */
BN_INLINE T NAME(affine_value)(const T *x, size_t i, double mean, double invstd, const P *gamma,
                               const P *beta)
{
    return NAME(put)((NAME(get)(x[i]) - mean) * (invstd * (double)gamma[i]) + (double)beta[i]);
}

/* y[0 .. n) <- affine_value for each (a gamma and a beta per value),
 * BN_LANES values at a time, streamed past the caches when `stream`. Runs
 * with one gamma and beta are batch norm's rows: row_out. */
BN_INLINE void NAME(affine_out)(T *y, const T *x, size_t n, double mean, double invstd,
                                const P *gamma, const P *beta, int stream)
{
    size_t i = 0, head = stream ? NAME(stream_head)(y, n) : 0;
    bn_vec m = bn_splat(mean), s = bn_splat(invstd), v[BN_K];
    for (; i < head; i++) {
        y[i] = NAME(affine_value)(x, i, mean, invstd, gamma, beta);
    }
    for (; i + BN_LANES <= n; i += BN_LANES) {
        for (int k = 0; k < BN_K; k++) {
            size_t at = i + (size_t)k * BN_W;
            bn_vec scale_at = s * NAME(load_p)(gamma + at);
            v[k] = (NAME(load)(x + at) - m) * scale_at + NAME(load_p)(beta + at);
        }
        NAME(store16)(y + i, v, stream);
    }
    for (; i < n; i++) {
        y[i] = NAME(affine_value)(x, i, mean, invstd, gamma, beta);
    }
}

/* invstd * ((gamma[c] * dy[i] - a) - xhat * b), xhat = (x[i] - mean) *
 * invstd, c = i (or 0 when `one`) */
BN_INLINE T NAME(dx_value)(const T *dy, const T *x, size_t i, double mean, double invstd,
                           const P *gamma, double a, double b, int one)
{
    double g = (double)gamma[one ? 0 : i], xhat = (NAME(get)(x[i]) - mean) * invstd;
    return NAME(put)(invstd * ((g * NAME(get)(dy[i]) - a) - xhat * b));
}

/* dx[0 .. n) <- dx_value for each, as affine_out */
BN_INLINE void NAME(affine_dx)(T *dx, const T *dy, const T *x, size_t n, double mean,
                               double invstd, const P *gamma, double a, double b, int one,
                               int stream)
{
    size_t i = 0, head = stream ? NAME(stream_head)(dx, n) : 0;
    bn_vec m = bn_splat(mean), s = bn_splat(invstd), va = bn_splat(a), vb = bn_splat(b);
    bn_vec g = bn_splat((double)*gamma), v[BN_K];
    for (; i < head; i++) {
        dx[i] = NAME(dx_value)(dy, x, i, mean, invstd, gamma, a, b, one);
    }
    for (; one && i + BN_LANES <= n; i += BN_LANES) {
        for (int k = 0; k < BN_K; k++) {
            size_t at = i + (size_t)k * BN_W;
            bn_vec xhat = (NAME(load)(x + at) - m) * s;
            v[k] = s * ((g * NAME(load)(dy + at) - va) - xhat * vb);
        }
        NAME(store16)(dx + i, v, stream);
    }
    for (; !one && i + BN_LANES <= n; i += BN_LANES) {
        for (int k = 0; k < BN_K; k++) {
            size_t at = i + (size_t)k * BN_W;
            bn_vec xhat = (NAME(load)(x + at) - m) * s;
            v[k] = s * ((NAME(load_p)(gamma + at) * NAME(load)(dy + at) - va) - xhat * vb);
        }
        NAME(store16)(dx + i, v, stream);
    }
    for (; i < n; i++) {
        dx[i] = NAME(dx_value)(dy, x, i, mean, invstd, gamma, a, b, one);
    }
}

/* For values v .. v + BN_LANES of a row, g = gamma * dy: acc += g, acc2 += g *
 * xhat in lanes, and dgamma[v + i] += dy * xhat, dbeta[v + i] += dy */
BN_INLINE void NAME(value_grads)(bn_vec acc[BN_K], bn_vec acc2[BN_K], double *dgamma,
                                 double *dbeta, const T *dy, const T *x, const P *gamma,
                                 double mean, double invstd)
{
    for (int k = 0; k < BN_K; k++) {
        size_t at = (size_t)k * BN_W;
        bn_vec d = NAME(load)(dy + at), xhat = (NAME(load)(x + at) - bn_splat(mean)) * invstd;
        bn_vec g = d * NAME(load_p)(gamma + at);
        acc[k] += g;
        acc2[k] += g * xhat;
        bn_store_wide(dgamma + at, bn_load_wide(dgamma + at) + d * xhat);
        bn_store_wide(dbeta + at, bn_load_wide(dbeta + at) + d);
    }
}

/* sums[0] <- the row's sum of gamma * dy, sums[1] <- of gamma * dy * xhat,
 * per value; dgamma[n] += dy * xhat, dbeta[n] += dy. The last n % BN_LANES
 * values run from copies padded with zeros, which add nothing. */
static void NAME(value_sums)(double sums[2], double *dgamma, double *dbeta, const T *dy,
                             const T *x, const P *gamma, double mean, double invstd, size_t n)
{
    bn_vec acc[BN_K] = {0}, acc2[BN_K] = {0};
    size_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        NAME(value_grads)(acc, acc2, dgamma + i, dbeta + i, dy + i, x + i, gamma + i, mean,
                          invstd);
    }
    if (i < n) {
        T end_dy[BN_LANES] = {0}, end_x[BN_LANES] = {0};
        P end_gamma[BN_LANES] = {0};
        double end_dgamma[BN_LANES] = {0}, end_dbeta[BN_LANES] = {0};
        memcpy(end_dy, dy + i, (n - i) * sizeof(T));
        memcpy(end_x, x + i, (n - i) * sizeof(T));
        memcpy(end_gamma, gamma + i, (n - i) * sizeof(P));
        NAME(value_grads)(acc, acc2, end_dgamma, end_dbeta, end_dy, end_x, end_gamma, mean,
                          invstd);
        for (size_t j = 0; i + j < n; j++) {
            dgamma[i + j] += end_dgamma[j];
            dbeta[i + j] += end_dbeta[j];
        }
    }
    sums[0] = bn_total(acc);
    sums[1] = bn_total(acc2);
}

/* The same per run of `spread` values: dgamma[j] += sum dy * xhat and
 * dbeta[j] += sum dy over run j, added into sums times gamma[j] */
static void NAME(run_sums)(double sums[2], double *dgamma, double *dbeta, const T *dy,
                           const T *x, const P *gamma, double mean, double invstd, bn_rows s)
{
    sums[0] = sums[1] = 0.0;
    for (size_t j = 0; j < s.n / s.spread; j++) {
        bn_vec acc[BN_K] = {0}, acc2[BN_K] = {0};
        size_t at = j * s.spread;
        NAME(add_sums)(acc, acc2, dy + at, x + at, s.spread, mean);
        double sum_dy = bn_total(acc), sum_dy_xhat = bn_total(acc2) * invstd;
        double g = (double)gamma[j];
        dgamma[j] += sum_dy_xhat;
        dbeta[j] += sum_dy;
        sums[0] += g * sum_dy;
        sums[1] += g * sum_dy_xhat;
    }
}

/* ---- rows ---------------------------------------------------------------------- */

/* Row r: mean[r], invstd[r] <- its moments (mean 0 and the root mean square
 * when not centered), var[r] <- its biased variance, y's row <- it normalized */
static void NAME(row_forward)(T *y, double *mean, double *invstd, double *var, const T *x,
                              const P *gamma, const P *beta, double eps, bn_rows s, size_t r,
                              int stream)
{
    size_t at = r * s.n, c = r % s.period * (s.n / s.spread);
    bn_partial stats = NAME(row_stats)(x + at, s.n);
    bn_batch_moments(mean + r, invstd + r, &stats, 1, eps);
    var[r] = stats.m2 / stats.count;
    if (!s.centered) {
        mean[r] = 0.0;
        invstd[r] = 1.0 / sqrt(stats.m2 / stats.count + stats.mean * stats.mean + eps);
    }
    if (s.spread == 1) {
        NAME(affine_out)(y + at, x + at, s.n, mean[r], invstd[r], gamma + c, beta + c, stream);
        return;
    }
    for (size_t j = 0; j < s.n / s.spread; j++) { /* a run per channel: a planar row */
        bn_vcoef k = {bn_splat(mean[r]), bn_splat(invstd[r] * (double)gamma[c + j]),
                      bn_splat((double)beta[c + j]), bn_splat(0.0)};
        size_t from = at + j * s.spread;
        NAME(row_out)(y + from, x + from, NULL, s.spread, k, BN_NORMALIZE, stream,
                      s.rows * s.n - from);
    }
}

/* Row r: dx's row, and its parameters' gradients added into dgamma, dbeta
 * (one per channel) */
static void NAME(row_backward)(T *dx, double *dgamma, double *dbeta, const T *dy, const T *x,
                               const P *gamma, double mean, double invstd, bn_rows s, size_t r,
                               int stream)
{
    size_t at = r * s.n, c = r % s.period * (s.n / s.spread);
    double sums[2];
    gamma += c;
    if (s.spread > 1) {
        NAME(run_sums)(sums, dgamma + c, dbeta + c, dy + at, x + at, gamma, mean, invstd, s);
    }
    else {
        NAME(value_sums)(sums, dgamma + c, dbeta + c, dy + at, x + at, gamma, mean, invstd, s.n);
    }
    double a = s.centered ? sums[0] / (double)s.n : 0.0, b = sums[1] / (double)s.n;
    for (size_t j = 0; j < s.n; j += bn_row_run(s)) {
        NAME(affine_dx)(dx + at + j, dy + at + j, x + at + j, bn_row_run(s), mean, invstd,
                        gamma + j / s.spread, a, b, s.spread > 1, stream);
    }
}

static void NAME(bn_rows_forward)(T *y, double *mean, double *invstd, double *var, const T *x,
                                  const P *gamma, const P *beta, double eps, bn_rows s)
{
    int team = bn_rows_team(s), stream = bn_rows_stream(s, sizeof(T), y == x);
    BN_PARALLEL_FOR
    for (ptrdiff_t r = 0; r < (ptrdiff_t)s.rows; r++) {
        NAME(row_forward)(y, mean, invstd, var, x, gamma, beta, eps, s, (size_t)r, stream);
        if (stream) { /* by each thread, for its own streamed stores */
            bn_stream_fence();
        }
    }
}

/* Blocks of rows (bn_row_blocks) in parallel, each adding its rows'
 * parameter gradients into sums of its own in work, then added in order */
static void NAME(bn_rows_backward)(T *dx, double *dgamma, double *dbeta, double *work,
                                   const T *dy, const T *x, const double *mean,
                                   const double *invstd, const P *gamma, bn_rows s)
{
    size_t blocks = bn_row_blocks(s), per = (s.rows + blocks - 1) / blocks;
    size_t width = bn_rows_channels(s);
    int team = bn_rows_team(s), stream = bn_rows_stream(s, sizeof(T), dx == dy || dx == x);
    BN_PARALLEL_FOR
    for (ptrdiff_t b = 0; b < (ptrdiff_t)blocks; b++) {
        double *sums = work + (size_t)b * 2 * width;
        memset(sums, 0, 2 * width * sizeof(double));
        for (size_t r = (size_t)b * per; r < s.rows && r < ((size_t)b + 1) * per; r++) {
            NAME(row_backward)(dx, sums, sums + width, dy, x, gamma, mean[r], invstd[r], s, r,
                               stream);
        }
        if (stream) {
            bn_stream_fence();
        }
    }
    bn_add_row_blocks(dgamma, dbeta, work, blocks, width);
}
