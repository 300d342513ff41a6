/* bn_kernels_impl.h -- the kernels of bn_kernels.h for one element type.
 *
 * Included by bn_kernels.c once per type, with
 *   T      the element type (float or double)
 *   NAME   a macro that appends the type's suffix: NAME(bn_forward) is
 *          bn_forward_f32 or bn_forward_f64.
 *
 * Two layouts of x[outer][C][inner], two strategies:
 *   planar (inner > 1): a feature's values are rows of `inner` contiguous
 *       elements. One thread takes a whole feature: its statistics, then its
 *       normalization (or both backward reductions, then dx) while its rows are
 *       still in cache, so memory sees one read of x. Row sums use BN_LANES
 *       independent accumulators, which the compiler vectorizes.
 *   interleaved (inner == 1): row o holds one value of every feature. Sums run
 *       down the rows for a block of BN_BLOCK features at once (vectorized
 *       across features); elementwise passes go row by row with per-feature
 *       coefficients from `work`.
 * Every sum has an order fixed by the shape: results do not depend on the
 * number of threads, nor on the instruction set a clone was built for.
 */

/* the row x[o][c][:] */
#define ROW(ptr, o, c, s) ((ptr) + ((o) * (s).channels + (c)) * (s).inner)

/* ---- vectors of 8 elements, as doubles ----------------------------------- */

/* p[0 .. 8) as doubles */
BN_INLINE bn_vec NAME(load_vec)(const T *p)
{
#if BN_ELEMENT_IS_FLOAT
    bn_vec_f32 v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, bn_vec);
#else
    bn_vec v;
    memcpy(&v, p, sizeof v);
    return v;
#endif
}

/* p[0 .. 8) <- v rounded to T */
BN_INLINE void NAME(store_vec)(T *p, const bn_vec *v)
{
#if BN_ELEMENT_IS_FLOAT
    bn_vec_f32 rounded = __builtin_convertvector(*v, bn_vec_f32);
    memcpy(p, &rounded, sizeof rounded);
#else
    memcpy(p, v, sizeof *v);
#endif
}

/* ---- planar rows: two 8-lane accumulators, then the scalar tail ------------ */

BN_INLINE double NAME(row_sum)(const T *row, size_t n)
{
    bn_vec a = {0}, b = {0};
    size_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        a += NAME(load_vec)(row + i);
        b += NAME(load_vec)(row + i + 8);
    }
    double tail = 0.0; /* the last n % BN_LANES values */
    for (; i < n; i++) {
        tail += (double)row[i];
    }
    return bn_lanes_total(&a, &b) + tail;
}

/* *sum_dev += sum (row - mean), *sum_dev2 += sum (row - mean)^2 */
BN_INLINE void NAME(row_dev_sums)(double *sum_dev, double *sum_dev2, const T *row,
                                  size_t n, double mean)
{
    bn_vec a = {0}, b = {0}, a2 = {0}, b2 = {0};
    size_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        bn_vec da = NAME(load_vec)(row + i) - mean, db = NAME(load_vec)(row + i + 8) - mean;
        a += da;
        b += db;
        a2 += da * da;
        b2 += db * db;
    }
    double tail = 0.0, tail2 = 0.0;
    for (; i < n; i++) {
        double d = (double)row[i] - mean;
        tail += d;
        tail2 += d * d;
    }
    *sum_dev += bn_lanes_total(&a, &b) + tail;
    *sum_dev2 += bn_lanes_total(&a2, &b2) + tail2;
}

/* *sum_dy += sum dy, *sum_dy_dev += sum dy * (x - mean) */
BN_INLINE void NAME(row_grad_sums)(double *sum_dy, double *sum_dy_dev, const T *dy,
                                   const T *x, size_t n, double mean)
{
    bn_vec a = {0}, b = {0}, a2 = {0}, b2 = {0};
    size_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        bn_vec ga = NAME(load_vec)(dy + i), gb = NAME(load_vec)(dy + i + 8);
        a += ga;
        b += gb;
        a2 += ga * (NAME(load_vec)(x + i) - mean);
        b2 += gb * (NAME(load_vec)(x + i + 8) - mean);
    }
    double tail = 0.0, tail2 = 0.0;
    for (; i < n; i++) {
        double g = (double)dy[i];
        tail += g;
        tail2 += g * ((double)x[i] - mean);
    }
    *sum_dy += bn_lanes_total(&a, &b) + tail;
    *sum_dy_dev += bn_lanes_total(&a2, &b2) + tail2;
}

/* the statistics of n contiguous values, two-pass while they are in L1 */
BN_INLINE bn_partial NAME(tile_stats)(const T *p, size_t n)
{
    double count = (double)n, sum_dev = 0.0, sum_dev2 = 0.0;
    double mean = NAME(row_sum)(p, n) / count;
    NAME(row_dev_sums)(&sum_dev, &sum_dev2, p, n, mean);
    return bn_corrected(count, mean, sum_dev, sum_dev2);
}

/* total <- total merged with the statistics of one row, tile by tile */
BN_INLINE void NAME(merge_row_stats)(bn_partial *total, const T *row, size_t n)
{
    for (size_t i = 0; i < n; i += BN_TILE) {
        bn_partial tile = NAME(tile_stats)(row + i, n - i < BN_TILE ? n - i : BN_TILE);
        bn_partial_merge(total, &tile);
    }
}

/* the statistics of feature c: its rows cut into tiles of at most BN_TILE
 * values, merged in order */
BN_INLINE bn_partial NAME(planar_feature_stats)(const T *x, bn_shape s, size_t c)
{
    bn_partial total = {0.0, 0.0, 0.0};
    for (size_t o = 0; o < s.outer; o++) {
        NAME(merge_row_stats)(&total, ROW(x, o, c, s), s.inner);
    }
    return total;
}

/* y[0 .. n) <- (x - mean) * scale + shift */
BN_INLINE void NAME(normalize_row)(T *y, const T *x, size_t n, double mean, double scale,
                                   double shift)
{
    for (size_t i = 0; i < n; i++) {
        y[i] = (T)(((double)x[i] - mean) * scale + shift);
    }
}

/* The statistics of next[0 .. n) (a tile, as tile_stats computes them) while
 * y[0 .. n) <- (x - mean) * scale + shift: the first pass over `next` and the
 * normalization share one loop, so reads from memory and writes overlap. */
BN_INLINE bn_partial NAME(tile_stats_normalizing)(const T *next, T *y, const T *x, size_t n,
                                                  double mean, double scale, double shift)
{
    bn_vec a = {0}, b = {0};
    size_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        a += NAME(load_vec)(next + i);
        b += NAME(load_vec)(next + i + 8);
        bn_vec ya = (NAME(load_vec)(x + i) - mean) * scale + shift;
        bn_vec yb = (NAME(load_vec)(x + i + 8) - mean) * scale + shift;
        NAME(store_vec)(y + i, &ya);
        NAME(store_vec)(y + i + 8, &yb);
    }
    double tail = 0.0;
    for (; i < n; i++) {
        tail += (double)next[i];
        y[i] = (T)(((double)x[i] - mean) * scale + shift);
    }
    double count = (double)n, sum_dev = 0.0, sum_dev2 = 0.0;
    double next_mean = (bn_lanes_total(&a, &b) + tail) / count;
    NAME(row_dev_sums)(&sum_dev, &sum_dev2, next, n, next_mean);
    return bn_corrected(count, next_mean, sum_dev, sum_dev2);
}

/* Training forward of features c0 .. c1 - 1, software-pipelined: row o of
 * feature c is normalized (its data comes back from cache) in the same loop
 * that streams row o of feature c + 1 in from memory for its statistics.
 * Those come out exactly as planar_feature_stats computes them. */
BN_CLONES static void NAME(planar_forward_train_range)(T *y, bn_partial *stats, double *mean,
                                                     double *invstd, const T *x,
                                                     const T *gamma, const T *beta,
                                                     double eps, bn_shape s, size_t c0,
                                                     size_t c1)
{
    if (c0 < c1) {
        stats[c0] = NAME(planar_feature_stats)(x, s, c0);
    }
    for (size_t c = c0; c < c1; c++) {
        bn_batch_moments(mean + c, invstd + c, stats + c, 1, eps);
        double scale = invstd[c] * (gamma ? (double)gamma[c] : 1.0);
        double shift = beta ? (double)beta[c] : 0.0;
        if (c + 1 == c1) {
            for (size_t o = 0; o < s.outer; o++) {
                NAME(normalize_row)(ROW(y, o, c, s), ROW(x, o, c, s), s.inner, mean[c],
                                    scale, shift);
            }
            break;
        }
        bn_partial next = {0.0, 0.0, 0.0};
        for (size_t o = 0; o < s.outer; o++) {
            const T *next_row = ROW(x, o, c + 1, s), *x_row = ROW(x, o, c, s);
            T *y_row = ROW(y, o, c, s);
            for (size_t i = 0; i < s.inner; i += BN_TILE) {
                size_t n = s.inner - i < BN_TILE ? s.inner - i : BN_TILE;
                bn_partial tile = NAME(tile_stats_normalizing)(next_row + i, y_row + i,
                                                               x_row + i, n, mean[c], scale,
                                                               shift);
                bn_partial_merge(&next, &tile);
            }
        }
        stats[c + 1] = next;
    }
}

BN_CLONES static void NAME(planar_stats_feature)(bn_partial *stats, const T *x, bn_shape s,
                                               size_t c)
{
    stats[c] = NAME(planar_feature_stats)(x, s, c);
}

/* rows r0..r1 of the [outer * C] rows: y <- (x - mean) * scale + shift */
BN_CLONES static void NAME(planar_forward_rows)(T *y, const T *x, const double *mean,
                                              const double *scale, const double *shift,
                                              bn_shape s, size_t r0, size_t r1)
{
    for (size_t r = r0; r < r1; r++) {
        size_t c = r % s.channels;
        NAME(normalize_row)(y + r * s.inner, x + r * s.inner, s.inner, mean[c], scale[c],
                            shift[c]);
    }
}

/* feature c: both reductions, then dx, while its rows are in cache */
BN_CLONES static void NAME(planar_backward_feature)(T *dx, double *dgamma, double *dbeta,
                                                  const T *dy, const T *x, const double *mean,
                                                  const double *invstd, const T *gamma,
                                                  bn_shape s, int training, size_t c)
{
    double m = mean[c], sum_dy = 0.0, sum_dy_dev = 0.0;
    for (size_t o = 0; o < s.outer; o++) {
        NAME(row_grad_sums)(&sum_dy, &sum_dy_dev, ROW(dy, o, c, s), ROW(x, o, c, s), s.inner, m);
    }
    dbeta[c] = sum_dy;
    dgamma[c] = sum_dy_dev * invstd[c];
    double n = (double)bn_count(s);
    double scale = invstd[c] * (gamma ? (double)gamma[c] : 1.0);
    double mean_dy = dbeta[c] / n;
    double dev_coef = dgamma[c] * invstd[c] / n; /* xhat * dgamma / n = (x - m) * dev_coef */
    for (size_t o = 0; o < s.outer; o++) {
        const T *dy_row = ROW(dy, o, c, s), *x_row = ROW(x, o, c, s);
        T *dx_row = ROW(dx, o, c, s);
        if (training) {
            for (size_t i = 0; i < s.inner; i++) {
                double dev = (double)x_row[i] - m;
                dx_row[i] = (T)(scale * ((double)dy_row[i] - mean_dy - dev * dev_coef));
            }
        }
        else {
            for (size_t i = 0; i < s.inner; i++) {
                dx_row[i] = (T)((double)dy_row[i] * scale);
            }
        }
    }
}

/* ---- interleaved rows (inner == 1) ------------------------------------- */

/* stats[c0 .. c0 + width) over all rows, tile by tile; width <= BN_BLOCK */
BN_INLINE void NAME(interleaved_block_stats)(bn_partial *stats, const T *x, bn_shape s,
                                                 size_t c0, size_t width)
{
    size_t tile_rows = BN_TILE / BN_BLOCK;
    for (size_t k = 0; k < width; k++) {
        stats[c0 + k] = (bn_partial){0.0, 0.0, 0.0};
    }
    for (size_t o0 = 0; o0 < s.outer; o0 += tile_rows) {
        size_t o1 = o0 + tile_rows < s.outer ? o0 + tile_rows : s.outer;
        double count = (double)(o1 - o0);
        double sum[BN_BLOCK] = {0}, mean[BN_BLOCK], dev[BN_BLOCK] = {0}, dev2[BN_BLOCK] = {0};
        for (size_t o = o0; o < o1; o++) {
            const T *row = x + o * s.channels + c0;
            for (size_t k = 0; k < width; k++) {
                sum[k] += (double)row[k];
            }
        }
        for (size_t k = 0; k < width; k++) {
            mean[k] = sum[k] / count;
        }
        for (size_t o = o0; o < o1; o++) {
            const T *row = x + o * s.channels + c0;
            for (size_t k = 0; k < width; k++) {
                double d = (double)row[k] - mean[k];
                dev[k] += d;
                dev2[k] += d * d;
            }
        }
        for (size_t k = 0; k < width; k++) {
            bn_partial tile = bn_corrected(count, mean[k], dev[k], dev2[k]);
            bn_partial_merge(&stats[c0 + k], &tile);
        }
    }
}

BN_CLONES static void NAME(interleaved_stats_block)(bn_partial *stats, const T *x, bn_shape s,
                                                  size_t c0)
{
    size_t width = s.channels - c0 < BN_BLOCK ? s.channels - c0 : BN_BLOCK;
    if (width == BN_BLOCK) { /* a constant width the compiler can vectorize */
        NAME(interleaved_block_stats)(stats, x, s, c0, BN_BLOCK);
    }
    else {
        NAME(interleaved_block_stats)(stats, x, s, c0, width);
    }
}

/* dbeta, dgamma (before the invstd factor) of features c0 .. c0 + width */
BN_INLINE void NAME(interleaved_block_grads)(double *dgamma, double *dbeta, const T *dy,
                                                 const T *x, const double *mean, bn_shape s,
                                                 size_t c0, size_t width)
{
    double sum_dy[BN_BLOCK] = {0}, sum_dy_dev[BN_BLOCK] = {0};
    for (size_t o = 0; o < s.outer; o++) {
        const T *dy_row = dy + o * s.channels + c0, *x_row = x + o * s.channels + c0;
        for (size_t k = 0; k < width; k++) {
            double g = (double)dy_row[k];
            sum_dy[k] += g;
            sum_dy_dev[k] += g * ((double)x_row[k] - mean[c0 + k]);
        }
    }
    for (size_t k = 0; k < width; k++) {
        dbeta[c0 + k] = sum_dy[k];
        dgamma[c0 + k] = sum_dy_dev[k];
    }
}

BN_CLONES static void NAME(interleaved_grads_block)(double *dgamma, double *dbeta, const T *dy,
                                                  const T *x, const double *mean, bn_shape s,
                                                  size_t c0)
{
    size_t width = s.channels - c0 < BN_BLOCK ? s.channels - c0 : BN_BLOCK;
    if (width == BN_BLOCK) {
        NAME(interleaved_block_grads)(dgamma, dbeta, dy, x, mean, s, c0, BN_BLOCK);
    }
    else {
        NAME(interleaved_block_grads)(dgamma, dbeta, dy, x, mean, s, c0, width);
    }
}

/* rows o0..o1: y <- (x - mean) * scale + shift, feature by feature */
BN_CLONES static void NAME(interleaved_forward_rows)(T *y, const T *x, const double *mean,
                                                   const double *scale, const double *shift,
                                                   bn_shape s, size_t o0, size_t o1)
{
    for (size_t o = o0; o < o1; o++) {
        const T *x_row = x + o * s.channels;
        T *y_row = y + o * s.channels;
        for (size_t c = 0; c < s.channels; c++) {
            y_row[c] = (T)(((double)x_row[c] - mean[c]) * scale[c] + shift[c]);
        }
    }
}

/* rows o0..o1 of dx; training: scale * (dy - mean_dy - (x - mean) * dev_coef) */
BN_CLONES static void NAME(interleaved_dx_rows)(T *dx, const T *dy, const T *x,
                                              const double *mean, const double *scale,
                                              const double *mean_dy, const double *dev_coef,
                                              bn_shape s, int training, size_t o0, size_t o1)
{
    for (size_t o = o0; o < o1; o++) {
        const T *dy_row = dy + o * s.channels, *x_row = x + o * s.channels;
        T *dx_row = dx + o * s.channels;
        if (training) {
            for (size_t c = 0; c < s.channels; c++) {
                double dev = (double)x_row[c] - mean[c];
                dx_row[c] = (T)(scale[c] * ((double)dy_row[c] - mean_dy[c] - dev * dev_coef[c]));
            }
        }
        else {
            for (size_t c = 0; c < s.channels; c++) {
                dx_row[c] = (T)((double)dy_row[c] * scale[c]);
            }
        }
    }
}

/* ---- the kernels of bn_kernels.h ---------------------------------------- */

/* work[0:C] <- scale = invstd * gamma, work[C:2C] <- shift = beta */
static void NAME(affine_coefficients)(double *scale, double *shift, const double *invstd,
                                      const T *gamma, const T *beta, size_t channels)
{
    for (size_t c = 0; c < channels; c++) {
        scale[c] = invstd[c] * (gamma ? (double)gamma[c] : 1.0);
        shift[c] = beta ? (double)beta[c] : 0.0;
    }
}

void NAME(bn_stats)(bn_partial *stats, const T *x, bn_shape s)
{
    /* stats[C]; x[outer][C][inner] */
    int team = bn_team(s);
    if (s.inner != 1) {
        BN_PARALLEL_FOR
        for (size_t c = 0; c < s.channels; c++) {
            NAME(planar_stats_feature)(stats, x, s, c);
        }
    }
    else {
        size_t blocks = (s.channels + BN_BLOCK - 1) / BN_BLOCK;
        BN_PARALLEL_FOR
        for (size_t b = 0; b < blocks; b++) {
            NAME(interleaved_stats_block)(stats, x, s, b * BN_BLOCK);
        }
    }
}

void NAME(bn_forward)(T *y, double *work, const T *x, const double *mean, const double *invstd,
                      const T *gamma, const T *beta, bn_shape s)
{
    /* y, x [outer][C][inner]; mean, invstd, gamma, beta [C]; work [2C] */
    double *scale = work, *shift = work + s.channels;
    NAME(affine_coefficients)(scale, shift, invstd, gamma, beta, s.channels);
    size_t rows = s.inner != 1 ? s.outer * s.channels : s.outer;
    size_t chunk = bn_rows_per_chunk(s.inner != 1 ? s.inner : s.channels);
    size_t chunks = (rows + chunk - 1) / chunk;
    int team = bn_team(s);
    BN_PARALLEL_FOR
    for (size_t k = 0; k < chunks; k++) {
        size_t r0 = k * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
        if (s.inner != 1) {
            NAME(planar_forward_rows)(y, x, mean, scale, shift, s, r0, r1);
        }
        else {
            NAME(interleaved_forward_rows)(y, x, mean, scale, shift, s, r0, r1);
        }
    }
}

void NAME(bn_forward_train)(T *y, bn_partial *stats, double *mean, double *invstd, double *work,
                            const T *x, const T *gamma, const T *beta, double eps, bn_shape s)
{
    /* y, x [outer][C][inner]; stats, mean, invstd, gamma, beta [C]; work [2C] */
    if (s.inner != 1) {
        /* one contiguous range of features per thread, for the pipeline */
        int team = bn_team(s);
        size_t parts = (size_t)team;
        BN_PARALLEL_FOR
        for (size_t p = 0; p < parts; p++) {
            NAME(planar_forward_train_range)(y, stats, mean, invstd, x, gamma, beta, eps, s,
                                             s.channels * p / parts,
                                             s.channels * (p + 1) / parts);
        }
        return;
    }
    NAME(bn_stats)(stats, x, s);
    bn_batch_moments(mean, invstd, stats, s.channels, eps);
    NAME(bn_forward)(y, work, x, mean, invstd, gamma, beta, s);
}

void NAME(bn_backward)(T *dx, double *dgamma, double *dbeta, double *work, const T *dy,
                       const T *x, const double *mean, const double *invstd, const T *gamma,
                       bn_shape s, int training)
{
    /* dx, dy, x [outer][C][inner]; dgamma, dbeta, mean, invstd, gamma [C]; work [3C] */
    int team = bn_team(s);
    if (s.inner != 1) {
        BN_PARALLEL_FOR
        for (size_t c = 0; c < s.channels; c++) {
            NAME(planar_backward_feature)(dx, dgamma, dbeta, dy, x, mean, invstd, gamma, s,
                                          training, c);
        }
        return;
    }
    size_t blocks = (s.channels + BN_BLOCK - 1) / BN_BLOCK;
    BN_PARALLEL_FOR
    for (size_t b = 0; b < blocks; b++) {
        NAME(interleaved_grads_block)(dgamma, dbeta, dy, x, mean, s, b * BN_BLOCK);
    }
    double n = (double)bn_count(s);
    double *scale = work, *mean_dy = work + s.channels, *dev_coef = work + 2 * s.channels;
    for (size_t c = 0; c < s.channels; c++) {
        dgamma[c] *= invstd[c];
        scale[c] = invstd[c] * (gamma ? (double)gamma[c] : 1.0);
        mean_dy[c] = dbeta[c] / n;
        dev_coef[c] = dgamma[c] * invstd[c] / n;
    }
    size_t chunk = bn_rows_per_chunk(s.channels);
    size_t chunks = (s.outer + chunk - 1) / chunk;
    BN_PARALLEL_FOR
    for (size_t k = 0; k < chunks; k++) {
        size_t o0 = k * chunk, o1 = o0 + chunk < s.outer ? o0 + chunk : s.outer;
        NAME(interleaved_dx_rows)(dx, dy, x, mean, scale, mean_dy, dev_coef, s, training, o0, o1);
    }
}

void NAME(bn_running_moments)(double *mean, double *invstd, const T *running_mean,
                              const T *running_var, size_t channels, double eps)
{
    for (size_t c = 0; c < channels; c++) {
        mean[c] = (double)running_mean[c];
        invstd[c] = 1.0 / sqrt((double)running_var[c] + eps);
    }
}

void NAME(bn_update_running)(T *running_mean, T *running_var, const bn_partial *stats,
                             size_t channels, double momentum)
{
    for (size_t c = 0; c < channels; c++) {
        double unbiased_var = stats[c].m2 / (stats[c].count - 1.0);
        running_mean[c] = (T)((1.0 - momentum) * (double)running_mean[c]
                              + momentum * stats[c].mean);
        running_var[c] = (T)((1.0 - momentum) * (double)running_var[c]
                             + momentum * unbiased_var);
    }
}

void NAME(bn_from_double)(T *out, const double *in, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        out[i] = (T)in[i];
    }
}

#undef ROW
