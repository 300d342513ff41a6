/* rows.h -- layer, group, instance and RMS normalization for one element type,
 * in one build: included by build.h after kernels.h, whose helpers it uses
 * (with the same T and NAME). x is rows x[rows][n] (bn_rows in bn.h), each
 * row normalized over its own n values, its statistics summed as a planar
 * feature's are; row r's value i takes gamma[(r % period) * n + i] and beta. */

/* y[0 .. BN_LANES) <- (x - mean) * invstd * gamma + beta (gamma 1 and beta 0
 * when NULL) */
BN_INLINE void NAME(normalize16)(T *y, const T *x, const T *gamma, const T *beta, bn_vec mean,
                                 bn_vec invstd)
{
    for (int k = 0; k < BN_K; k++) {
        size_t at = (size_t)k * BN_W;
        bn_vec v = (NAME(load)(x + at) - mean) * invstd;
        v = gamma ? v * NAME(load)(gamma + at) : v;
        NAME(store)(y + at, beta ? v + NAME(load)(beta + at) : v);
    }
}

/* For BN_LANES values, with g = gamma * dy and xhat = (x - mean) * invstd:
 * acc += g, acc2 += g * xhat and, unless dgamma is NULL, dgamma += dy * xhat
 * and dbeta += dy */
BN_INLINE void NAME(grads16)(bn_vec acc[BN_K], bn_vec acc2[BN_K], double *dgamma, double *dbeta,
                             const T *dy, const T *x, const T *gamma, bn_vec mean, bn_vec invstd)
{
    for (int k = 0; k < BN_K; k++) {
        size_t at = (size_t)k * BN_W;
        bn_vec d = NAME(load)(dy + at), xhat = (NAME(load)(x + at) - mean) * invstd;
        bn_vec g = gamma ? d * NAME(load)(gamma + at) : d;
        acc[k] += g;
        acc2[k] += g * xhat;
        if (dgamma) {
            bn_store_wide(dgamma + at, bn_load_wide(dgamma + at) + d * xhat);
            bn_store_wide(dbeta + at, bn_load_wide(dbeta + at) + d);
        }
    }
}

/* dx[0 .. BN_LANES) <- invstd * ((gamma * dy - a) - xhat * b) */
BN_INLINE void NAME(dx16)(T *dx, const T *dy, const T *x, const T *gamma, bn_vec mean,
                          bn_vec invstd, bn_vec a, bn_vec b)
{
    for (int k = 0; k < BN_K; k++) {
        size_t at = (size_t)k * BN_W;
        bn_vec d = NAME(load)(dy + at), xhat = (NAME(load)(x + at) - mean) * invstd;
        bn_vec g = gamma ? d * NAME(load)(gamma + at) : d;
        NAME(store)(dx + at, invstd * ((g - a) - xhat * b));
    }
}

/* The last n % BN_LANES values of a row of n, copied into BN_LANES zeros, so
 * that the functions above can run on them as on the others */
typedef struct {
    T y[BN_LANES], x[BN_LANES], dy[BN_LANES], gamma[BN_LANES], beta[BN_LANES];
    double dgamma[BN_LANES], dbeta[BN_LANES];
} NAME(row_end);

BN_INLINE size_t NAME(copy_end)(T *to, const T *row, size_t n)
{
    size_t whole = n / BN_LANES * BN_LANES;
    if (row != NULL) {
        memcpy(to, row + whole, (n - whole) * sizeof(T));
    }
    return n - whole;
}

/* Row r of x: mean[r], invstd[r] <- its moments (the mean 0 and the root mean
 * square when not centered), y's row <- it normalized */
static void NAME(row_forward)(T *y, double *mean, double *invstd, const T *x, const T *gamma,
                              const T *beta, double eps, const bn_plan *p, size_t r,
                              int centered)
{
    size_t n = p->s.inner, at = r * n, i = 0;
    bn_partial stats = NAME(feature_stats)(x, p, r, (double)x[at]);
    stats.mean += (double)x[at];
    bn_batch_moments(mean + r, invstd + r, &stats, 1, eps);
    if (!centered) {
        mean[r] = 0.0;
        invstd[r] = 1.0 / sqrt(stats.m2 / stats.count + stats.mean * stats.mean + eps);
    }
    bn_vec m = bn_splat(mean[r]), s = bn_splat(invstd[r]);
    for (; i + BN_LANES <= n; i += BN_LANES) {
        NAME(normalize16)(y + at + i, x + at + i, gamma ? gamma + i : NULL,
                          beta ? beta + i : NULL, m, s);
    }
    NAME(row_end) end = {{0}};
    size_t rest = NAME(copy_end)(end.x, x + at, n);
    NAME(copy_end)(end.gamma, gamma, n);
    NAME(copy_end)(end.beta, beta, n);
    NAME(normalize16)(end.y, end.x, gamma ? end.gamma : NULL, beta ? end.beta : NULL, m, s);
    memcpy(y + at + i, end.y, rest * sizeof(T));
}

/* One row of n values: dx <- invstd * ((gamma * dy - a) - xhat * b), with a
 * the mean of gamma * dy over the row (0 when not centered) and b that of
 * gamma * dy * xhat; unless dgamma is NULL, dgamma[n] += dy * xhat and
 * dbeta[n] += dy */
static void NAME(row_backward)(T *dx, double *dgamma, double *dbeta, const T *dy, const T *x,
                               const T *gamma, double mean, double invstd, size_t n,
                               int centered)
{
    bn_vec acc[BN_K] = {0}, acc2[BN_K] = {0}, m = bn_splat(mean), s = bn_splat(invstd);
    size_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        NAME(grads16)(acc, acc2, dgamma ? dgamma + i : NULL, dbeta ? dbeta + i : NULL, dy + i,
                      x + i, gamma ? gamma + i : NULL, m, s);
    }
    NAME(row_end) end = {{0}};
    size_t rest = NAME(copy_end)(end.dy, dy, n);
    NAME(copy_end)(end.x, x, n);
    NAME(copy_end)(end.gamma, gamma, n);
    NAME(grads16)(acc, acc2, dgamma ? end.dgamma : NULL, end.dbeta, end.dy, end.x,
                  gamma ? end.gamma : NULL, m, s);
    for (size_t j = 0; dgamma && j < rest; j++) {
        dgamma[i + j] += end.dgamma[j];
        dbeta[i + j] += end.dbeta[j];
    }
    bn_vec a = bn_splat(centered ? bn_total(acc) / (double)n : 0.0);
    bn_vec b = bn_splat(bn_total(acc2) / (double)n);
    for (i = 0; i + BN_LANES <= n; i += BN_LANES) {
        NAME(dx16)(dx + i, dy + i, x + i, gamma ? gamma + i : NULL, m, s, a, b);
    }
    NAME(dx16)(end.y, end.dy, end.x, gamma ? end.gamma : NULL, m, s, a, b);
    memcpy(dx + i, end.y, rest * sizeof(T));
}

static void NAME(bn_rows_forward)(T *y, double *mean, double *invstd, const T *x,
                                  const T *gamma, const T *beta, double eps, bn_rows s)
{
    bn_plan p = bn_rows_plan(s);
    int team = p.team;
    BN_PARALLEL_FOR
    for (ptrdiff_t r = 0; r < (ptrdiff_t)s.rows; r++) {
        size_t at = (size_t)r % s.period * s.n;
        NAME(row_forward)(y, mean, invstd, x, gamma ? gamma + at : NULL, beta ? beta + at : NULL,
                          eps, &p, (size_t)r, s.centered);
    }
}

static void NAME(bn_rows_backward)(T *dx, double *dgamma, double *dbeta, double *work,
                                   const T *dy, const T *x, const double *mean,
                                   const double *invstd, const T *gamma, bn_rows s)
{
    bn_plan p = bn_rows_plan(s);
    size_t blocks = bn_row_blocks(s), per = (s.rows + blocks - 1) / blocks;
    size_t width = s.period * s.n;
    int team = p.team;
    BN_PARALLEL_FOR
    for (ptrdiff_t b = 0; b < (ptrdiff_t)blocks; b++) {
        double *sums = dgamma ? work + (size_t)b * 2 * width : NULL;
        if (sums) {
            memset(sums, 0, 2 * width * sizeof(double));
        }
        for (size_t r = (size_t)b * per; r < s.rows && r < ((size_t)b + 1) * per; r++) {
            size_t at = r % s.period * s.n, row = r * s.n;
            NAME(row_backward)(dx + row, sums ? sums + at : NULL, sums ? sums + width + at : NULL,
                               dy + row, x + row, gamma ? gamma + at : NULL, mean[r], invstd[r],
                               s.n, s.centered);
        }
    }
    if (dgamma) {
        bn_add_row_blocks(dgamma, dbeta, work, blocks, width);
    }
}
