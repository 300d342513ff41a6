/* kernels.h -- the kernels of bn.h for one element type, in one build:
 * included by build.h once per type, with T the element type (float, double,
 * or uint16_t holding halves of BN_HALF mantissa bits: vec.h), P that of the
 * parameters gamma and beta, BN_HALF (0 but for halves), NAME a macro that
 * appends the type's and the build's suffixes (NAME(bn_forward) is
 * bn_forward_f32_avx2, ...), and vec.h's vectors. Every value is computed in
 * double and rounded to T once. The strategies (planar, lanes) are described
 * in core.h. */

/* ---- values of T as vectors of doubles ------------------------------------- */

/* parameters p[0 .. BN_W) */
BN_INLINE bn_vec NAME(load_p)(const P *p)
{
#if BN_W == 1
    return (double)p[0];
#else
    bn_vec v = {0};
    for (int j = 0; j < BN_W; j++) {
        v[j] = (double)p[j];
    }
    return v;
#endif
}

BN_INLINE bn_vec NAME(load)(const T *p)
{
#if BN_HALF == 10
    return bn_load_f16(p);
#elif BN_HALF == 7
    return bn_load_bf16(p);
#else
    return NAME(load_p)(p);
#endif
}

BN_INLINE void NAME(store)(T *p, bn_vec v)
{
#if BN_HALF == 10
    bn_store_f16(p, v);
#elif BN_HALF == 7
    bn_store_bf16(p, v);
#elif BN_W == 1
    p[0] = (T)v;
#else
    for (int j = 0; j < BN_W; j++) {
        p[j] = (T)v[j];
    }
#endif
}

/* one value x as a double, and v rounded to T: halves as load and store do, but float16
 * by vec.h's integer code, not F16C (Clang makes F16C's conversion of one value a call to
 * a function that libgcc lacks) */
BN_INLINE double NAME(get)(T x)
{
#if BN_HALF
    T all[BN_W] = {x};
    bn_bits h = {0};
    double first[BN_W];
    bn_store_wide(first, BN_HALF == 10 ? bn_from_f16(h + x) : NAME(load)(all));
    return first[0];
#else
    return (double)x;
#endif
}

BN_INLINE T NAME(put)(double v)
{
#if BN_HALF == 10
    bn_halves h = BN_CONVERT(bn_to_f16(bn_splat(v)), bn_halves);
    T all[BN_W];
    memcpy(all, &h, sizeof all);
    return all[0];
#elif BN_HALF == 7
    T all[BN_W];
    NAME(store)(all, bn_splat(v));
    return all[0];
#else
    return (T)v;
#endif
}

/* asks the caches for the lines of p[0 .. BN_LANES): for long rows read from
 * memory, one feature's rows C * inner apart, where the hardware does not
 * fetch far enough ahead */
BN_INLINE void NAME(prefetch16)(const T *p)
{
#if defined(__GNUC__)
    for (size_t b = 0; b < BN_LANES * sizeof(T); b += 64) {
        __builtin_prefetch((const char *)p + b);
    }
#else
    (void)p;
#endif
}

/* p[0 .. BN_LANES) <- v[BN_K] rounded to T: past the caches where the build
 * can when `stream` (p then on a cache line: stream_head), but for halves */
BN_INLINE void NAME(store16)(T *p, const bn_vec v[BN_K], int stream)
{
#if BN_CAN_STREAM && !BN_HALF
    if (stream && sizeof(T) == sizeof(float)) {
        bn_stream_f32((float *)p, v);
        return;
    }
    if (stream) {
        bn_stream_f64((double *)p, v);
        return;
    }
#else
    (void)stream;
#endif
    for (int k = 0; k < BN_K; k++) {
        NAME(store)(p + k * BN_W, v[k]);
    }
}

/* the values of out[0 .. n) to write before out + head is on a cache line,
 * for streamed stores (n if it never is) */
BN_INLINE size_t NAME(stream_head)(const T *out, size_t n)
{
    size_t off = (uintptr_t)out % 64;
    size_t head = off % sizeof(T) != 0 ? n : (64 - off) % 64 / sizeof(T);
    return head < n ? head : n;
}

/* out[0 .. BN_LANES) <- op(in, x), vector q with the coefficients k[q * step]
 * (step 0: one feature's for all) */
BN_INLINE void NAME(out16)(T *out, const T *in, const T *x, const bn_vcoef *k, size_t step,
                           bn_op op, int stream)
{
    bn_vec v[BN_K];
    for (int q = 0; q < BN_K; q++) {
        size_t at = (size_t)q * BN_W;
        bn_vec xv = op == BN_DX_TRAIN ? NAME(load)(x + at) : bn_splat(0.0);
        v[q] = bn_apply(op, NAME(load)(in + at), xv, &k[(size_t)q * step]);
    }
    NAME(store16)(out, v, stream);
}

/* ---- sums along a row, in BN_LANES lanes: value i goes to lane i % 16 ---------- */

/* With d = x[0 .. BN_LANES) - mid: acc += d, acc2 += d * d (the statistics;
 * dy unread), or with_dy: acc += dy, acc2 += dy * d (the gradient sums; mid
 * is the mean) */
BN_INLINE void NAME(add16)(bn_vec acc[BN_K], bn_vec acc2[BN_K], const T *dy, const T *x,
                           bn_vec mid, int with_dy)
{
    for (int k = 0; k < BN_K; k++) {
        bn_vec d = NAME(load)(x + k * BN_W) - mid;
        bn_vec g = with_dy ? NAME(load)(dy + k * BN_W) : d;
        acc[k] += g;
        acc2[k] += g * d;
    }
}

/* add16 over x[0 .. n) (dy NULL: the statistics), about center. The values
 * after the last 16 go to the first lanes; the other lanes add 0, which
 * changes no sum. */
BN_INLINE void NAME(add_sums)(bn_vec acc[BN_K], bn_vec acc2[BN_K], const T *dy, const T *x,
                              size_t n, double center)
{
    size_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES) {
        NAME(add16)(acc, acc2, dy ? dy + i : NULL, x + i, bn_splat(center), dy != NULL);
    }
    if (i < n) {
        double g[BN_LANES] = {0}, d[BN_LANES] = {0};
        for (size_t j = 0; i + j < n; j++) {
            d[j] = NAME(get)(x[i + j]) - center;
            g[j] = dy ? NAME(get)(dy[i + j]) : d[j];
        }
        for (int k = 0; k < BN_K; k++) {
            acc[k] += bn_load_wide(g + k * BN_W);
            acc2[k] += bn_load_wide(g + k * BN_W) * bn_load_wide(d + k * BN_W);
        }
    }
}

/* ---- elementwise passes ------------------------------------------------------ */

/* out[0] <- op(in, x) with the coefficients in lane 0 of k, in doubles: the
 * operations of a vector's (bn_apply), in the same order */
BN_INLINE void NAME(value_out)(T *out, const T *in, const T *x, const bn_vcoef *k, bn_op op)
{
    double xv = op == BN_DX_TRAIN ? NAME(get)(*x) : 0.0;
    *out = NAME(put)(BN_APPLY(op, NAME(get)(*in), xv, bn_first(k->mean), bn_first(k->scale),
                              bn_first(k->shift), bn_first(k->dev)));
}

/* out[from .. to) <- op(in, x) with one feature's coefficients k, value by
 * value: the ends of a row around its whole vectors */
BN_INLINE void NAME(values_out)(T *out, const T *in, const T *x, size_t from, size_t to,
                                const bn_vcoef *k, bn_op op)
{
    for (size_t h = from; h < to; h++) {
        NAME(value_out)(out + h, in + h, x ? x + h : NULL, k, op);
    }
}

/* the same for the row ends of the pipeline (pipeline_row) and of halves
 * (row_out), of a row of n values: from whole vectors of the row when it has
 * them, rounded to T aside and copied; value by value proved slower in the
 * pipeline, which computes as much as it moves, and for halves
 * (benchmarks/NOTES.md) */
BN_INLINE void NAME(some_out)(T *out, const T *in, const T *x, size_t n, size_t from,
                              size_t to, const bn_vcoef *k, bn_op op)
{
    if (n < BN_LANES) {
        NAME(values_out)(out, in, x, from, to, k, op);
        return;
    }
    for (size_t h = from; h < to; h += BN_LANES) {
        size_t at = h + BN_LANES <= n ? h : n - BN_LANES, end = h + BN_LANES < to ? h + BN_LANES
                                                                                 : to;
        bn_vec all[BN_K];
        T part[BN_LANES];
        for (int q = 0; q < BN_K; q++) {
            size_t v = at + (size_t)q * BN_W;
            bn_vec xv = op == BN_DX_TRAIN ? NAME(load)(x + v) : bn_splat(0.0);
            all[q] = bn_apply(op, NAME(load)(in + v), xv, k);
        }
        NAME(store16)(part, all, 0);
        /* values h .. end in pieces of fixed sizes: copies the compiler inlines */
        for (size_t piece = BN_LANES, j = h; piece > 0; piece /= 2) {
            if ((end - h) & piece) {
                memcpy(out + j, part + (j - at), piece * sizeof(T));
                j += piece;
            }
        }
    }
}

/* out[0 .. n) <- op(in, x) with one feature's coefficients k, BN_LANES
 * values at a time; streamed past the caches when `stream`. in (and x) have
 * `room` values from here: it asks for those BN_PREFETCH_BYTES ahead (0:
 * none; the data is in cache, or short rows, read in memory order) */
BN_INLINE void NAME(row_out)(T *out, const T *in, const T *x, size_t n, bn_vcoef k, bn_op op,
                             int stream, size_t room)
{
    size_t i = stream ? NAME(stream_head)(out, n) : 0;
    NAME(values_out)(out, in, x, 0, i, &k, op);
    size_t ahead = BN_PREFETCH_BYTES / sizeof(T);
    for (; i + BN_LANES <= n; i += BN_LANES) {
        if (i + ahead + BN_LANES <= room) {
            NAME(prefetch16)(in + i + ahead);
        }
        if (op == BN_DX_TRAIN && i + ahead + BN_LANES <= room) {
            NAME(prefetch16)(x + i + ahead);
        }
        NAME(out16)(out + i, in + i, x ? x + i : NULL, &k, 0, op, stream);
    }
    if (BN_HALF) { /* a half's one-value conversions cost as much as a vector's */
        NAME(some_out)(out, in, x, n, i, n, &k, op);
    }
    else {
        NAME(values_out)(out, in, x, i, n, &k, op);
    }
}

/* out[j0 .. j1) <- op(in, x) for x seen as one sequence of wide rows: value j
 * is in lane j % wide, with the coefficients spread in w */
BN_INLINE void NAME(lanes_out)(T *out, const T *in, const T *x, size_t j0, size_t j1,
                               const bn_work *work, const bn_plan *p, bn_op op)
{
    /* locals: a streamed store may alias anything, and would make the loop
       load these again after every store */
    bn_work w = *work;
    size_t wide = p->wide, l = j0 % wide, j = j0;
    int stream = p->stream;
    /* vectors from out's first cache line on: streamed stores need it, and
       their coefficients then lie on lines too (bn_work_of) */
    size_t head = j0 + NAME(stream_head)(out + j0, j1 - j0);
    for (; j < head; j++, l = l + 1 == wide ? 0 : l + 1) {
        bn_vcoef k = bn_lane_coef(&w, l);
        NAME(value_out)(out + j, in + j, x ? x + j : NULL, &k, op);
    }
    /* from memory, x is read BN_LANES_PREFETCH_BYTES ahead */
    size_t ahead = BN_LANES_PREFETCH_BYTES / sizeof(T), n = p->large ? p->s.outer * p->width : 0;
    for (; j + BN_LANES <= j1; j += BN_LANES) {
        if (j + ahead + BN_LANES <= n) {
            NAME(prefetch16)(in + j + ahead);
        }
        if (op == BN_DX_TRAIN && j + ahead + BN_LANES <= n) {
            NAME(prefetch16)(x + j + ahead);
        }
        bn_vcoef k[BN_K];
        for (int q = 0; q < BN_K; q++) {
            k[q] = bn_lane_coef(&w, l + (size_t)q * BN_W);
        }
        NAME(out16)(out + j, in + j, x ? x + j : NULL, k, 1, op, stream);
        l += BN_LANES;
        l = l >= wide ? l - wide : l;
    }
    for (; j < j1; j++, l = l + 1 == wide ? 0 : l + 1) {
        bn_vcoef k = bn_lane_coef(&w, l);
        NAME(value_out)(out + j, in + j, x ? x + j : NULL, &k, op);
    }
}

/* The rows r0 .. r1 of the outer * C (or, with the coefficients spread,
 * values r0 .. r1 of x as one sequence) <- op(in, x) */
BN_INLINE void NAME(span_out)(T *out, const T *in, const T *x, const bn_work *w,
                              const bn_plan *p, size_t r0, size_t r1, bn_op op)
{
    if (p->spread) {
        NAME(lanes_out)(out, in, x, r0, r1, w, p, op);
        return;
    }
    for (size_t r = r0; r < r1; r++) {
        bn_vcoef k = bn_feature_coef(w, r % p->s.channels);
        size_t at = r * p->s.inner;
        size_t room = p->pipeline ? p->s.outer * p->s.channels * p->s.inner - at : 0;
        NAME(row_out)(out + at, in + at, x ? x + at : NULL, p->s.inner, k, op, p->stream, room);
    }
}

/* span_out, one inlined loop per op, which each knows; a function of its own
 * (Clang 14 fails to compile the loops inlined in an OpenMP region) */
static void NAME(span_out_any)(T *out, const T *in, const T *x, const bn_work *w,
                               const bn_plan *p, size_t r0, size_t r1, bn_op op)
{
    if (op == BN_NORMALIZE) {
        NAME(span_out)(out, in, x, w, p, r0, r1, BN_NORMALIZE);
    }
    else if (op == BN_DX_TRAIN) {
        NAME(span_out)(out, in, x, w, p, r0, r1, BN_DX_TRAIN);
    }
    else {
        NAME(span_out)(out, in, x, w, p, r0, r1, BN_DX_EVAL);
    }
    if (p->stream) { /* by each thread, for its own streamed stores */
        bn_stream_fence();
    }
}

/* w's coefficients of op (bn_op) for feature c */
static void NAME(coefficient)(const bn_work *w, bn_op op, size_t c, const double *mean,
                              const double *invstd, const P *gamma, const P *beta,
                              const double *dgamma, const double *dbeta, double count)
{
    w->mean[c] = mean[c];
    w->scale[c] = invstd[c] * (gamma ? (double)gamma[c] : 1.0);
    w->shift[c] = op == BN_NORMALIZE ? (beta ? (double)beta[c] : 0.0)
                  : op == BN_DX_TRAIN ? dbeta[c] / count : 0.0;
    /* xhat * dgamma / n = (x - mean) * dev */
    w->dev[c] = op == BN_DX_TRAIN ? dgamma[c] * invstd[c] / count : 0.0;
}

/* w's four arrays [C] <- the coefficients of op for each feature, spread
 * over a wide row when p->spread */
static void NAME(coefficients)(const bn_work *w, bn_op op, const double *mean,
                               const double *invstd, const P *gamma, const P *beta,
                               const double *dgamma, const double *dbeta, double count,
                               const bn_plan *p)
{
    for (size_t c = 0; c < p->s.channels; c++) {
        NAME(coefficient)(w, op, c, mean, invstd, gamma, beta, dgamma, dbeta, count);
    }
    double *arrays[] = {w->mean, w->scale, w->shift, w->dev};
    for (int a = 0; p->spread && a < 4; a++) {
        bn_spread(arrays[a], arrays[a], p);
    }
}

/* out <- op(in, x) over all of x (the coefficients in w), on p->team threads;
 * its tasks from the end of x back when `from_end`: after a pass that read x,
 * whose last reads are still in cache */
static void NAME(pass)(T *out, const T *in, const T *x, const bn_work *w, const bn_plan *p,
                       bn_op op, int from_end)
{
    /* x's values (spread coefficients), or its rows, in tasks of about BN_CHUNK values */
    size_t n = p->spread ? p->s.outer * p->width : p->s.outer * p->s.channels;
    size_t chunk = p->spread ? BN_CHUNK : BN_CHUNK / p->s.inner + 1;
    size_t tasks = (n + chunk - 1) / chunk;
    int team = p->team;
    BN_PARALLEL_FOR
    for (ptrdiff_t t = 0; t < (ptrdiff_t)tasks; t++) {
        size_t r0 = (from_end ? tasks - 1 - (size_t)t : (size_t)t) * chunk;
        NAME(span_out_any)(out, in, x, w, p, r0, r0 + chunk < n ? r0 + chunk : n, op);
    }
}

/* ---- planar: one feature at a time ----------------------------------------- */

/* sums[0] += sum d, sums[1] += sum d * d over feature c's values in tile k,
 * d = x - center (dy NULL: the statistics); or with dy, sums[0] += sum dy,
 * sums[1] += sum dy * d (the gradient sums; center is the mean). Returns the
 * tile's count of values. */
static double NAME(tile_sums)(double sums[2], const T *dy, const T *x, double center,
                              const bn_plan *p, size_t c, size_t k)
{
    bn_tile t = bn_tile_at(p->s, k);
    bn_vec acc[BN_K] = {0}, acc2[BN_K] = {0};
    for (size_t o = t.o0; o < t.o1; o++) {
        size_t at = bn_row_at(p->s, o, c) + t.i0;
        NAME(add_sums)(acc, acc2, dy ? dy + at : NULL, x + at, t.i1 - t.i0, center);
    }
    sums[0] += bn_total(acc);
    sums[1] += bn_total(acc2);
    return (double)((t.o1 - t.o0) * (t.i1 - t.i0));
}

/* The center (less shift) that tile k of feature c is summed about: the
 * first tile's own rough mean, then the mean of the tiles before it */
static double NAME(tile_center)(const bn_partial *stats, const T *x, const bn_plan *p,
                                size_t c, size_t k, double shift)
{
    if (k > 0) {
        return stats->mean;
    }
    double sums[2] = {0.0, 0.0}, count = NAME(tile_sums)(sums, NULL, x, shift, p, c, k);
    return sums[0] / count;
}

/* Feature c's statistics less shift: its tiles absorbed in order, each
 * summed about its center */
static bn_partial NAME(feature_stats)(const T *x, const bn_plan *p, size_t c, double shift)
{
    bn_partial stats = {0.0, 0.0, 0.0};
    for (size_t k = 0; k < p->tiles; k++) {
        double center = shift + NAME(tile_center)(&stats, x, p, c, k, shift), sums[2] = {0, 0};
        double count = NAME(tile_sums)(sums, NULL, x, center, p, c, k);
        bn_absorb(&stats, count, center - shift, sums[0], sums[1]);
    }
    return stats;
}

/* dbeta[c] <- sum dy, dgamma[c] <- sum dy * (x - mean) * invstd over feature c */
static void NAME(feature_grads)(double *dgamma, double *dbeta, const T *dy, const T *x,
                                const double *mean, const double *invstd, const bn_plan *p,
                                size_t c)
{
    double sums[2] = {0.0, 0.0};
    for (size_t k = 0; k < p->tiles; k++) {
        NAME(tile_sums)(sums, dy, x, mean[c], p, c, k);
    }
    dbeta[c] = sums[0];
    dgamma[c] = sums[1] * invstd[c];
}

/* The vectors of one row of the pipeline from i and o on, `vectors` of them:
 * out <- op(in, x) a vector at o at a time while acc, acc2 add the vector at
 * i of the next feature (next_x, and next_dy but in the forward). It asks
 * for the lines `ahead` values past each vector of the next feature, and
 * `back` values past what it reads of this one (0: the line it reads). One
 * loop, so that memory reads the next feature while this one is written; op
 * and stream are constants at each call (pipeline_tile), so that it has no
 * other test. */
BN_INLINE void NAME(pipeline_vectors)(T *out, const T *in, const T *x, bn_vcoef k, bn_op op,
                                      int stream, bn_vec acc[BN_K], bn_vec acc2[BN_K],
                                      const T *next_dy, const T *next_x, double center,
                                      size_t *pi, size_t *po, size_t vectors, size_t ahead,
                                      size_t back)
{
    /* locals, which the compiler keeps in registers more readily */
    bn_vec sum[BN_K], sum2[BN_K], mid = bn_splat(center);
    memcpy(sum, acc, sizeof sum);
    memcpy(sum2, acc2, sizeof sum2);
    size_t i = *pi, o = *po;
    int grads = op != BN_NORMALIZE;
    for (size_t v = 0; v < vectors; v++, i += BN_LANES, o += BN_LANES) {
        NAME(prefetch16)(next_x + ahead + i);
        NAME(prefetch16)(in + back + i);
        if (grads) {
            NAME(prefetch16)(next_dy + ahead + i);
        }
        if (op == BN_DX_TRAIN) {
            NAME(prefetch16)(x + back + i);
        }
        NAME(add16)(sum, sum2, grads ? next_dy + i : NULL, next_x + i, mid, grads);
        NAME(out16)(out + o, in + o, op == BN_DX_TRAIN ? x + o : NULL, &k, 0, op, stream);
    }
    memcpy(acc, sum, sizeof sum);
    memcpy(acc2, sum2, sizeof sum2);
    *pi = i;
    *po = o;
}

/* Values i0 .. i1 of row o of the pipeline (the pointers at the rows'
 * starts): out <- op(in, x) for feature c with its coefficients k, while
 * acc, acc2 sum the same values of feature c + 1 as add_sums does, about
 * center (pipeline_vectors). With next_x NULL (the last feature), only out.
 * Streamed, out's vectors start on a cache line, `head` values on from the
 * sums' in every piece of the row: only the row's ends are written in parts.
 * The vectors run in up to three parts, where the values BN_PREFETCH_BYTES
 * past them (for the next feature; BN_READBACK_BYTES for this one) move to
 * a later row. */
BN_INLINE void NAME(pipeline_row)(T *out, const T *in, const T *x, bn_vcoef k, bn_op op,
                                  int stream, bn_vec acc[BN_K], bn_vec acc2[BN_K],
                                  const T *next_dy, const T *next_x, double center,
                                  const bn_plan *p, size_t o, size_t i0, size_t i1)
{
    size_t n = p->s.inner, head = stream ? NAME(stream_head)(out, n) : 0;
    size_t o_at = i0 + head < n ? i0 + head : n, i = i0;
    size_t o_end = i1 + head < n && i1 < n ? i1 + head : n;
    if (i0 == 0) {
        NAME(some_out)(out, in, x, n, 0, head, &k, op);
    }
    if (next_x == NULL) {
        NAME(row_out)(out + o_at, in + o_at, x ? x + o_at : NULL, o_end - o_at, k, op, stream,
                      0);
        return;
    }
    bn_reach ahead = bn_reach_of(p->s, o, BN_PREFETCH_BYTES / sizeof(T));
    bn_reach back = bn_reach_of(p->s, o, BN_READBACK_BYTES / sizeof(T));
    size_t first = ahead.split < back.split ? ahead.split : back.split;
    size_t last = ahead.split < back.split ? back.split : ahead.split;
    size_t cuts[3] = {first, last, n}, end = i0 + (o_end - o_at) / BN_LANES * BN_LANES;
    for (int part = 0; part < 3; part++) {
        size_t cut = cuts[part] / BN_LANES * BN_LANES, stop = cut < end ? cut : end;
        NAME(pipeline_vectors)(out, in, x, k, op, stream, acc, acc2, next_dy, next_x, center,
                               &i, &o_at, stop > i ? (stop - i) / BN_LANES : 0,
                               i + BN_LANES <= ahead.split ? ahead.before : ahead.after,
                               i + BN_LANES <= back.split ? back.before : back.after);
    }
    NAME(add_sums)(acc, acc2, next_dy ? next_dy + i : NULL, next_x + i, i1 - i, center);
    NAME(some_out)(out, in, x, n, o_at, o_end, &k, op);
}

/* Tile t of feature c: out <- op(in, x) with its coefficients k, while
 * (when has_next) sums[0 .. 2) <- the two sums of tile t of feature c + 1
 * about center: of in (x) when op normalizes, else of dy (in) and x.
 * Returns the tile's count of values. */
BN_INLINE double NAME(pipeline_tile)(T *out, const T *in, const T *x, bn_vcoef k, bn_op op,
                                     int has_next, double center, double sums[2],
                                     const bn_plan *p, size_t c, size_t t)
{
    bn_tile tile = bn_tile_at(p->s, t);
    bn_vec acc[BN_K] = {0}, acc2[BN_K] = {0};
    for (size_t o = tile.o0; o < tile.o1; o++) {
        size_t at = bn_row_at(p->s, o, c), next = at + p->s.inner;
        const T *next_dy = has_next && op != BN_NORMALIZE ? in + next : NULL;
        const T *next_x = !has_next ? NULL : op == BN_NORMALIZE ? in + next : x + next;
        if (p->stream) {
            NAME(pipeline_row)(out + at, in + at, x ? x + at : NULL, k, op, 1, acc, acc2,
                               next_dy, next_x, center, p, o, tile.i0, tile.i1);
        }
        else {
            NAME(pipeline_row)(out + at, in + at, x ? x + at : NULL, k, op, 0, acc, acc2,
                               next_dy, next_x, center, p, o, tile.i0, tile.i1);
        }
    }
    sums[0] = bn_total(acc);
    sums[1] = bn_total(acc2);
    return (double)((tile.o1 - tile.o0) * (tile.i1 - tile.i0));
}

/* Training forward of features c0 .. c1, in a pipeline: feature c, still in
 * cache, is normalized while the statistics of feature c + 1 are summed, so
 * that memory streams the next feature in while the last one is written out */
static void NAME(train_range)(T *y, bn_partial *stats, double *mean, double *invstd,
                              const bn_work *w, const T *x, const P *gamma, const P *beta,
                              double eps, const bn_plan *p, size_t c0, size_t c1)
{
    bn_shape s = p->s;
    bn_partial next = {0.0, 0.0, 0.0};
    if (c0 < c1) {
        next = NAME(feature_stats)(x, p, c0, NAME(get)(x[c0 * s.inner]));
    }
    for (size_t c = c0; c < c1; c++) {
        stats[c] = next;
        stats[c].mean += NAME(get)(x[c * s.inner]); /* before y (maybe x) is written */
        bn_batch_moments(mean + c, invstd + c, stats + c, 1, eps);
        NAME(coefficient)(w, BN_NORMALIZE, c, mean, invstd, gamma, beta, NULL, NULL, 0.0);
        bn_vcoef k = bn_feature_coef(w, c);
        next = (bn_partial){0.0, 0.0, 0.0};
        double shift = c + 1 < c1 ? NAME(get)(x[(c + 1) * s.inner]) : 0.0, sums[2];
        for (size_t t = 0; t < p->tiles; t++) {
            double center = c + 1 < c1 ? shift + NAME(tile_center)(&next, x, p, c + 1, t, shift)
                                       : 0.0;
            double count = NAME(pipeline_tile)(y, x, NULL, k, BN_NORMALIZE, c + 1 < c1, center,
                                               sums, p, c, t);
            if (c + 1 < c1) {
                bn_absorb(&next, count, center - shift, sums[0], sums[1]);
            }
        }
    }
    if (p->stream) {
        bn_stream_fence();
    }
}

/* Backward of features c0 .. c1, in the same pipeline: the gradient sums of
 * feature c + 1 while dx of feature c is written */
static void NAME(backward_range)(T *dx, double *dgamma, double *dbeta, const bn_work *w,
                                 const T *dy, const T *x, const double *mean,
                                 const double *invstd, const P *gamma, const bn_plan *p,
                                 int training, size_t c0, size_t c1)
{
    double count = (double)bn_count(p->s), next[2] = {0.0, 0.0};
    for (size_t k = 0; c0 < c1 && k < p->tiles; k++) {
        NAME(tile_sums)(next, dy, x, mean[c0], p, c0, k);
    }
    for (size_t c = c0; c < c1; c++) {
        dbeta[c] = next[0];
        dgamma[c] = next[1] * invstd[c];
        NAME(coefficient)(w, training ? BN_DX_TRAIN : BN_DX_EVAL, c, mean, invstd, gamma, NULL,
                          dgamma, dbeta, count);
        bn_vcoef k = bn_feature_coef(w, c);
        next[0] = next[1] = 0.0;
        double next_mean = c + 1 < c1 ? mean[c + 1] : 0.0, sums[2];
        for (size_t t = 0; t < p->tiles; t++) {
            if (training) {
                NAME(pipeline_tile)(dx, dy, x, k, BN_DX_TRAIN, c + 1 < c1, next_mean, sums, p, c,
                                    t);
            }
            else {
                NAME(pipeline_tile)(dx, dy, x, k, BN_DX_EVAL, c + 1 < c1, next_mean, sums, p, c, t);
            }
            next[0] += sums[0];
            next[1] += sums[1];
        }
    }
    if (p->stream) {
        bn_stream_fence();
    }
}

/* ---- planar, short rows: sums in memory order ---------------------------------- */

/* tile_sums of tile k for each of features c0 .. c1 (at most
 * BN_WALK_FEATURES) into sums[c - c0], about center[c - c0]: the same lanes
 * and order, the tile's rows walked in memory order. Returns its count. */
static double NAME(walk_tile_sums)(double (*sums)[2], const T *dy, const T *x,
                                   const double *center, const bn_plan *p, size_t c0, size_t c1,
                                   size_t k)
{
    bn_tile t = bn_tile_at(p->s, k);
    bn_vec acc[BN_WALK_FEATURES][2][BN_K];
    memset(acc, 0, sizeof acc);
    for (size_t o = t.o0; o < t.o1; o++) {
        for (size_t c = c0; c < c1; c++) {
            size_t at = bn_row_at(p->s, o, c) + t.i0;
            NAME(add_sums)(acc[c - c0][0], acc[c - c0][1], dy ? dy + at : NULL, x + at,
                           t.i1 - t.i0, center[c - c0]);
        }
    }
    for (size_t c = c0; c < c1; c++) {
        sums[c - c0][0] += bn_total(acc[c - c0][0]);
        sums[c - c0][1] += bn_total(acc[c - c0][1]);
    }
    return (double)((t.o1 - t.o0) * (t.i1 - t.i0));
}

/* stats[c] <- feature_stats(x, p, c, shift[c - c0]) for features c0 .. c1
 * (at most BN_WALK_FEATURES): the same tiles, centers and sums */
static void NAME(walk_stats)(bn_partial *stats, const T *x, const double *shift,
                             const bn_plan *p, size_t c0, size_t c1)
{
    double center[BN_WALK_FEATURES], sums[BN_WALK_FEATURES][2];
    size_t n = c1 - c0;
    for (size_t j = 0; j < n; j++) {
        stats[c0 + j] = (bn_partial){0.0, 0.0, 0.0};
    }
    for (size_t k = 0; k < p->tiles; k++) {
        memset(sums, 0, sizeof sums);
        if (k == 0) { /* the first tile's own rough mean */
            memcpy(center, shift, n * sizeof *shift);
            double count = NAME(walk_tile_sums)(sums, NULL, x, center, p, c0, c1, k);
            for (size_t j = 0; j < n; j++) {
                center[j] = shift[j] + sums[j][0] / count;
            }
            memset(sums, 0, sizeof sums);
        }
        for (size_t j = 0; k > 0 && j < n; j++) {
            center[j] = shift[j] + stats[c0 + j].mean;
        }
        double count = NAME(walk_tile_sums)(sums, NULL, x, center, p, c0, c1, k);
        for (size_t j = 0; j < n; j++) {
            bn_absorb(&stats[c0 + j], count, center[j] - shift[j], sums[j][0], sums[j][1]);
        }
    }
}

/* feature_grads for features c0 .. c1 (at most BN_WALK_FEATURES) */
static void NAME(walk_grads)(double *dgamma, double *dbeta, const T *dy, const T *x,
                             const double *mean, const double *invstd, const bn_plan *p,
                             size_t c0, size_t c1)
{
    double sums[BN_WALK_FEATURES][2];
    memset(sums, 0, sizeof sums);
    for (size_t k = 0; k < p->tiles; k++) {
        NAME(walk_tile_sums)(sums, dy, x, mean + c0, p, c0, c1, k);
    }
    for (size_t c = c0; c < c1; c++) {
        dbeta[c] = sums[c - c0][0];
        dgamma[c] = sums[c - c0][1] * invstd[c];
    }
}

/* ---- lanes: sums down each lane of wide rows --------------------------------- */

/* For lanes l0 .. l1 of wide rows r0 .. r1, one row after the other down
 * each lane, with d = x - center[l]: sum[l] += d, sum2[l] += d * d (dy NULL),
 * or sum[l] += dy, sum2[l] += dy * d (center: the means). BN_LANE_ROWS rows
 * at a time, so that the sums are loaded and stored once for them. */
/* lane_sums over `rows` wide rows from `at`: a constant at most calls, so
 * that the loop down the rows unrolls */
BN_INLINE void NAME(lane_rows)(double *restrict sum, double *restrict sum2, const T *dy,
                               const T *x, const double *restrict center, size_t wide,
                               size_t at, size_t rows, size_t l0, size_t l1)
{
    size_t l = l0;
    for (; l + BN_W <= l1; l += BN_W) {
        bn_vec s = bn_load_wide(sum + l), s2 = bn_load_wide(sum2 + l);
        bn_vec mid = bn_load_wide(center + l);
        for (size_t q = 0; q < rows; q++) {
            bn_vec d = NAME(load)(x + at + q * wide + l) - mid;
            bn_vec g = dy ? NAME(load)(dy + at + q * wide + l) : d;
            s += g;
            s2 += g * d;
        }
        bn_store_wide(sum + l, s);
        bn_store_wide(sum2 + l, s2);
    }
    for (; l < l1; l++) {
        for (size_t q = 0; q < rows; q++) {
            double d = NAME(get)(x[at + q * wide + l]) - center[l];
            double g = dy ? NAME(get)(dy[at + q * wide + l]) : d;
            sum[l] += g;
            sum2[l] += g * d;
        }
    }
}

static void NAME(lane_sums)(double *restrict sum, double *restrict sum2, const T *dy,
                            const T *x, const double *restrict center, size_t wide, size_t r0,
                            size_t r1, size_t l0, size_t l1)
{
    for (size_t r = r0; r < r1; r += BN_LANE_ROWS) {
        size_t rows = r1 - r < BN_LANE_ROWS ? r1 - r : BN_LANE_ROWS;
        if (rows == BN_LANE_ROWS) {
            NAME(lane_rows)(sum, sum2, dy, x, center, wide, r * wide, BN_LANE_ROWS, l0, l1);
        }
        else {
            NAME(lane_rows)(sum, sum2, dy, x, center, wide, r * wide, rows, l0, l1);
        }
    }
}

/* The statistics (less shift[l]) of lanes l0 .. l1 in group g, into its
 * state: blocks of BN_BLOCK_ROWS wide rows absorbed in order, the first
 * about its own rough mean, the others about the mean so far; the values
 * after the last whole wide row (in the last group) one by one. */
static void NAME(group_stats)(double *state, const T *x, const double *shift,
                              const bn_plan *p, size_t g, size_t l0, size_t l1)
{
    size_t R = p->wide, r0 = g * BN_GROUP_ROWS;
    size_t r1 = r0 + BN_GROUP_ROWS < p->wide_rows ? r0 + BN_GROUP_ROWS : p->wide_rows;
    double *count = state, *mean = count + R, *m2 = mean + R;
    double *center = state + 3 * R, *sum = center + R, *sum2 = sum + R;
    for (size_t l = l0; l < l1; l++) {
        count[l] = mean[l] = m2[l] = sum[l] = sum2[l] = 0.0;
        center[l] = shift[l];
    }
    for (size_t b0 = r0; b0 < r1; b0 += BN_BLOCK_ROWS) {
        size_t b1 = b0 + BN_BLOCK_ROWS < r1 ? b0 + BN_BLOCK_ROWS : r1;
        double added = (double)(b1 - b0);
        if (b0 == r0) {
            NAME(lane_sums)(sum, sum2, NULL, x, center, R, b0, b1, l0, l1);
            for (size_t l = l0; l < l1; l++) {
                center[l] = shift[l] + sum[l] / added;
                sum[l] = sum2[l] = 0.0;
            }
        }
        NAME(lane_sums)(sum, sum2, NULL, x, center, R, b0, b1, l0, l1);
        bn_absorb_lanes(count, mean, m2, center, shift, sum, sum2, added, l0, l1);
        for (size_t l = l0; l < l1; l++) {
            center[l] = shift[l] + mean[l];
            sum[l] = sum2[l] = 0.0;
        }
    }
    size_t tail = g + 1 == p->groups ? (l1 < p->tail ? l1 : p->tail) : l0; /* lanes with one more */
    for (size_t l = l0; l < tail; l++) {
        double d = NAME(get)(x[p->wide_rows * R + l]) - center[l];
        sum[l] = d;
        sum2[l] = d * d;
    }
    bn_absorb_lanes(count, mean, m2, center, shift, sum, sum2, 1.0, l0, tail > l0 ? tail : l0);
}

/* the two gradient sums of lanes l0 .. l1 in group g, into its state */
static void NAME(group_grads)(double *state, const T *dy, const T *x, const double *mean,
                              const bn_plan *p, size_t g, size_t l0, size_t l1)
{
    size_t R = p->wide, r0 = g * BN_GROUP_ROWS;
    size_t r1 = r0 + BN_GROUP_ROWS < p->wide_rows ? r0 + BN_GROUP_ROWS : p->wide_rows;
    double *sum = state, *sum_dev = state + R;
    for (size_t l = l0; l < l1; l++) {
        sum[l] = sum_dev[l] = 0.0;
    }
    NAME(lane_sums)(sum, sum_dev, dy, x, mean, R, r0, r1, l0, l1);
    if (g + 1 == p->groups) {
        size_t at = p->wide_rows * R, end = l1 < p->tail ? l1 : p->tail;
        NAME(lane_sums)(sum, sum_dev, dy + at, x + at, mean, R, 0, 1, l0, end);
    }
}

/* Runs task(state of group g, g, lanes l0 .. l1) for every group and block of
 * lanes, on p->team threads */
#define NAME_FOR_LANE_TASKS(p, w, g, l0, l1, task)                                       \
    do {                                                                                 \
        int team = (p)->team;                                                            \
        size_t blocks_ = (p)->lane_blocks, tasks_ = (p)->groups * blocks_;               \
        size_t width_ = ((p)->wide + blocks_ - 1) / blocks_;                             \
        BN_PARALLEL_FOR                                                                  \
        for (ptrdiff_t t_ = 0; t_ < (ptrdiff_t)tasks_; t_++) {                           \
            size_t g = (size_t)t_ / blocks_, b_ = (size_t)t_ % blocks_;                  \
            size_t l0 = b_ * width_, l1 = l0 + width_ < (p)->wide ? l0 + width_ : (p)->wide; \
            double *state = (w).groups + g * BN_LANE_STATE * (p)->wide;                  \
            task;                                                                        \
        }                                                                                \
    } while (0)

static void NAME(lanes_stats)(bn_partial *stats, const bn_work *w, const T *x,
                              const double *shift, const bn_plan *p)
{
    for (size_t c = 0; c < p->s.channels; c++) { /* each lane's shift, spread */
        w->mean[c] = shift ? shift[c] : NAME(get)(x[c * p->s.inner]);
    }
    bn_spread(w->mean, w->mean, p);
    NAME_FOR_LANE_TASKS(p, *w, g, l0, l1, NAME(group_stats)(state, x, w->mean, p, g, l0, l1));
    bn_merge_lanes(stats, w->groups, p);
    for (size_t c = 0; !shift && c < p->s.channels; c++) {
        stats[c].mean += NAME(get)(x[c * p->s.inner]);
    }
}

static void NAME(lanes_grads)(double *dgamma, double *dbeta, const bn_work *w, const T *dy,
                              const T *x, const double *mean, const double *invstd,
                              const bn_plan *p)
{
    memcpy(w->mean, mean, p->s.channels * sizeof *mean);
    bn_spread(w->mean, w->mean, p);
    NAME_FOR_LANE_TASKS(p, *w, g, l0, l1,
                        NAME(group_grads)(state, dy, x, w->mean, p, g, l0, l1));
    bn_add_lane_grads(dgamma, dbeta, w->groups, invstd, p);
}

#undef NAME_FOR_LANE_TASKS

/* ---- entry points -------------------------------------------------------------- */

static void NAME(bn_stats)(bn_partial *stats, double *work, const T *x, const double *shift,
                           bn_shape s)
{
    /* stats[C]; x[outer][C][inner]; shift[C] or NULL */
    bn_plan p = bn_make_plan(s, sizeof(T), 0);
    bn_work w = bn_work_of(work, &p, NULL, sizeof(T));
    if (bn_count(s) == 0) {
        memset(stats, 0, s.channels * sizeof *stats);
        return;
    }
    if (p.lanes) {
        NAME(lanes_stats)(stats, &w, x, shift, &p);
        return;
    }
    int team = p.team;
    size_t step = bn_sum_task_features(&p);
    BN_PARALLEL_FOR
    for (ptrdiff_t task = 0; task < (ptrdiff_t)((s.channels + step - 1) / step); task++) {
        size_t c0 = (size_t)task * step, c1 = c0 + step < s.channels ? c0 + step : s.channels;
        double first[BN_WALK_FEATURES];
        for (size_t c = c0; c < c1; c++) {
            first[c - c0] = shift ? shift[c] : NAME(get)(x[c * s.inner]);
        }
        if (p.pipeline) {
            stats[c0] = NAME(feature_stats)(x, &p, c0, first[0]);
        }
        else {
            NAME(walk_stats)(stats, x, first, &p, c0, c1);
        }
        for (size_t c = c0; !shift && c < c1; c++) {
            stats[c].mean += first[c - c0];
        }
    }
}

static void NAME(bn_forward)(T *y, double *work, const T *x, const double *mean,
                             const double *invstd, const P *gamma, const P *beta, bn_shape s)
{
    /* y, x [outer][C][inner]; mean, invstd, gamma, beta [C] */
    bn_plan p = bn_make_plan(s, sizeof(T), y == x);
    bn_work w = bn_work_of(work, &p, y, sizeof(T));
    if (bn_count(s) == 0) {
        return;
    }
    NAME(coefficients)(&w, BN_NORMALIZE, mean, invstd, gamma, beta, NULL, NULL, 0.0, &p);
    NAME(pass)(y, x, NULL, &w, &p, BN_NORMALIZE, 0);
}

static void NAME(bn_forward_train)(T *y, bn_partial *stats, double *mean, double *invstd,
                                   double *work, const T *x, const P *gamma, const P *beta,
                                   double eps, bn_shape s)
{
    /* y, x [outer][C][inner]; stats, mean, invstd, gamma, beta [C] */
    bn_plan p = bn_make_plan(s, sizeof(T), y == x);
    bn_work w = bn_work_of(work, &p, y, sizeof(T));
    if (!p.pipeline || bn_count(s) == 0) { /* two passes (lanes plans have no pipeline) */
        NAME(bn_stats)(stats, work, x, NULL, s);
        bn_batch_moments(mean, invstd, stats, s.channels, eps);
        NAME(coefficients)(&w, BN_NORMALIZE, mean, invstd, gamma, beta, NULL, NULL, 0.0, &p);
        NAME(pass)(y, x, NULL, &w, &p, BN_NORMALIZE, 1);
        return;
    }
    /* one contiguous range of features per thread, for the pipeline */
    int team = p.team;
    BN_PARALLEL_FOR
    for (ptrdiff_t part = 0; part < (ptrdiff_t)team; part++) {
        NAME(train_range)(y, stats, mean, invstd, &w, x, gamma, beta, eps, &p,
                          s.channels * (size_t)part / (size_t)team,
                          s.channels * (size_t)(part + 1) / (size_t)team);
    }
}

static void NAME(bn_grad_sums)(double *dgamma, double *dbeta, double *work, const T *dy,
                               const T *x, const double *mean, const double *invstd,
                               bn_shape s)
{
    /* dgamma, dbeta, mean, invstd [C]; dy, x [outer][C][inner] */
    bn_plan p = bn_make_plan(s, sizeof(T), 0);
    bn_work w = bn_work_of(work, &p, NULL, sizeof(T));
    if (bn_count(s) == 0) {
        memset(dgamma, 0, s.channels * sizeof *dgamma);
        memset(dbeta, 0, s.channels * sizeof *dbeta);
        return;
    }
    if (p.lanes) {
        NAME(lanes_grads)(dgamma, dbeta, &w, dy, x, mean, invstd, &p);
        return;
    }
    int team = p.team;
    size_t step = bn_sum_task_features(&p);
    BN_PARALLEL_FOR
    for (ptrdiff_t task = 0; task < (ptrdiff_t)((s.channels + step - 1) / step); task++) {
        size_t c0 = (size_t)task * step, c1 = c0 + step < s.channels ? c0 + step : s.channels;
        if (p.pipeline) {
            NAME(feature_grads)(dgamma, dbeta, dy, x, mean, invstd, &p, c0);
        }
        else {
            NAME(walk_grads)(dgamma, dbeta, dy, x, mean, invstd, &p, c0, c1);
        }
    }
}

static void NAME(bn_backward_dx)(T *dx, double *work, const T *dy, const T *x,
                                 const double *mean, const double *invstd, const P *gamma,
                                 const double *dgamma, const double *dbeta, double count,
                                 bn_shape s, int training)
{
    /* dx, dy, x [outer][C][inner]; mean, invstd, gamma, dgamma, dbeta [C] */
    bn_plan p = bn_make_plan(s, sizeof(T), dx == dy || dx == x);
    bn_work w = bn_work_of(work, &p, dx, sizeof(T));
    if (bn_count(s) == 0) {
        return;
    }
    bn_op op = training ? BN_DX_TRAIN : BN_DX_EVAL;
    NAME(coefficients)(&w, op, mean, invstd, gamma, NULL, dgamma, dbeta, count, &p);
    NAME(pass)(dx, dy, x, &w, &p, op, 1); /* its sums were taken just before */
}

static void NAME(bn_backward)(T *dx, double *dgamma, double *dbeta, double *work, const T *dy,
                              const T *x, const double *mean, const double *invstd,
                              const P *gamma, bn_shape s, int training)
{
    /* dx, dy, x [outer][C][inner]; dgamma, dbeta, mean, invstd, gamma [C] */
    bn_plan p = bn_make_plan(s, sizeof(T), dx == dy || dx == x);
    bn_work w = bn_work_of(work, &p, dx, sizeof(T));
    if (!p.pipeline || bn_count(s) == 0) { /* two passes (lanes plans have no pipeline) */
        NAME(bn_grad_sums)(dgamma, dbeta, work, dy, x, mean, invstd, s);
        NAME(bn_backward_dx)(dx, work, dy, x, mean, invstd, gamma, dgamma, dbeta,
                             (double)bn_count(s), s, training);
        return;
    }
    /* one contiguous range of features per thread, for the pipeline */
    int team = p.team;
    BN_PARALLEL_FOR
    for (ptrdiff_t part = 0; part < (ptrdiff_t)team; part++) {
        NAME(backward_range)(dx, dgamma, dbeta, &w, dy, x, mean, invstd, gamma, &p, training,
                             s.channels * (size_t)part / (size_t)team,
                             s.channels * (size_t)(part + 1) / (size_t)team);
    }
}
