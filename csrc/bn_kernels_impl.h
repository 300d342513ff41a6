/* bn_kernels_impl.h -- the kernels of bn_kernels.h for one element type.
 *
 * Included by bn_kernels_isa.h once per type in each instruction-set build,
 * with
 *   T      the element type (float or double)
 *   NAME   a macro that appends the type's and the build's suffixes:
 *          NAME(bn_forward) is bn_forward_f32_avx2, bn_forward_f64_avx512, ...
 * and bn_simd.h's vectors. bn_kernels.c calls the entry points
 * (NAME(bn_stats), ...) through the build's table.
 *
 * Two layouts of x[outer][C][inner], two strategies:
 *   planar (inner > 1): a feature's values are rows of `inner` contiguous
 *       elements. One thread takes a whole feature: its statistics, then its
 *       normalization (or both backward reductions, then dx) while its rows are
 *       still in cache, so memory sees one read of x. Row sums use BN_LANES
 *       independent accumulators, which the compiler vectorizes.
 *   interleaved (inner == 1): row o holds one value of every feature. Rows go
 *       in fixed groups (one task each); statistics are sums of deviations
 *       from a center, lane by lane along "wide rows" (vectorized across
 *       features), and the groups' results are merged in order. Elementwise
 *       passes take the values as one long sequence with per-feature
 *       coefficients from `work`.
 * Every sum has an order fixed by the shape: results do not depend on the
 * number of threads, nor on the instruction set of the build that runs.
 */

/* the row x[o][c][:] */
#define ROW(ptr, o, c, s) ((ptr) + ((o) * (s).channels + (c)) * (s).inner)

/* ---- sixteen elements at a time: one bn_lanes -------------------------- */

/* p[0 .. 16) as doubles (element loops: GCC turns them into whole-register
 * conversions in every build, where __builtin_convertvector of 8 floats
 * went through shuffles) */
BN_INLINE bn_lanes NAME(load16)(const T *p)
{
    bn_lanes v;
    for (int k = 0; k < BN_K; k++) {
        for (int j = 0; j < BN_W; j++) {
            v.v[k][j] = (double)p[k * BN_W + j];
        }
    }
    return v;
}

/* p[0 .. 16) <- v rounded to T */
BN_INLINE void NAME(store16)(T *p, const bn_lanes *v)
{
    for (int k = 0; k < BN_K; k++) {
        for (int j = 0; j < BN_W; j++) {
            p[k * BN_W + j] = (T)v->v[k][j];
        }
    }
}

/* Ask for the lines `ahead` bytes past p[i0 .. i1) (one request a line),
 * as far as p[0 .. n) has them: no pointer past the array is formed */
BN_INLINE void NAME(prefetch_span)(const T *p, size_t i0, size_t i1, size_t n, size_t ahead)
{
    size_t skip = ahead / sizeof(T);
    for (size_t i = i0; i < i1 && i + skip < n; i += 64 / sizeof(T)) {
        __builtin_prefetch(p + i + skip, 0, 3);
    }
}

/* Ask for the lines BN_AHEAD_BYTES past row[i .. i + 16), while the row (n
 * values) has them. The pipelined passes read one row from memory while they
 * read another back from cache and write a third, and the hardware
 * prefetcher alone fell behind. From memory they now ask through a
 * bn_rows_ahead instead; this serves them in cache, and a feature's first
 * tile's rough pass (what they read back is asked for through
 * read_back_asking). On the Xeon CI ran
 * on before, with this, float32 at 1 thread (medians of 7
 * runs, each against a copy in the same run), the backward in place of
 * 32x256x28x28 went from 1.38 to 1.15 times a copy, 8x64x112x112 from 1.40
 * to 1.24, and the training forward of 32x256x28x28 from 1.16 to 1.07. The
 * backward also asks for the rows it reads back: 128x64x56x56 in place went
 * from 1.68 to 1.62 times a copy at 1 thread and from 1.01 to 0.94 at 2 (C
 * harness, medians of 22). */
BN_INLINE void NAME(prefetch_ahead)(const T *row, size_t i, size_t n)
{
    NAME(prefetch_span)(row, i, i + BN_LANES, n, BN_AHEAD_BYTES);
}

/* prefetch_ahead for a vector that leaves BN_AHEAD_BYTES of its row after it
 * (vectors_ahead_within counts them): the same requests, with no test */
BN_INLINE void NAME(prefetch_ahead_within)(const T *row, size_t i)
{
    for (size_t j = 0; j < BN_LANES; j += 64 / sizeof(T)) {
        __builtin_prefetch(row + i + j + BN_AHEAD_BYTES / sizeof(T), 0, 3);
    }
}

/* how many vectors from i on, up to i1, prefetch_ahead_within may take in a
 * row of n values */
BN_INLINE size_t NAME(vectors_ahead_within)(size_t i, size_t i1, size_t n)
{
    size_t skip = BN_AHEAD_BYTES / sizeof(T), end = n > skip ? n - skip : 0;
    end = end < i1 ? end : i1;
    return end > i ? (end - i) / BN_LANES : 0;
}

/* The asks r (bn_rows_ahead_take) for the vector at byte j of the reader's
 * piece: the lines of x (and of `other`, when not NULL) that many bytes into
 * the walk's */
BN_INLINE void NAME(ask_ahead_of)(const char *x, const char *other, const bn_row_asks *r,
                                  size_t j)
{
    for (size_t b = j; b < j + BN_LANES * sizeof(T); b += 64) {
        int first = b < r->split;
        if (first ? r->has_first : r->has_second) {
            size_t at = first ? r->first + b : r->second + (b - r->split);
            __builtin_prefetch(x + at, 0, 3);
            if (other != NULL) {
                __builtin_prefetch(other + at, 0, 3);
            }
        }
    }
}

/* The end (an i to stay below, at most `limit`) of the vectors from i on
 * whose asks all lie on the same side of r's split, with *ask the bytes to
 * add to a vector's own (i * sizeof(T), i its place in the reader's piece)
 * for them; i when the vector at i has none, or straddles the split */
BN_INLINE size_t NAME(asks_run_end)(const bn_row_asks *r, size_t i, size_t limit, size_t *ask)
{
    size_t b = i * sizeof(T), last_line = BN_LANES * sizeof(T) - 64;
    if (b + last_line < r->split) {
        size_t end = (r->split - last_line + sizeof(T) - 1) / sizeof(T);
        *ask = r->first;
        return !r->has_first ? i : end < limit ? end : limit;
    }
    *ask = r->second - r->split; /* may wrap: added to b as a size_t, second + (b - split) */
    return b >= r->split && r->has_second ? limit : i;
}

/* Ask for the lines of one vector's asks at base + at (`at` summed as a
 * size_t first: an ask's offset may wrap, asks_run_end) */
BN_INLINE void NAME(ask_lines)(const char *base, size_t at)
{
    for (size_t b = 0; b < BN_LANES * sizeof(T); b += 64) {
        __builtin_prefetch(base + (at + b), 0, 3);
    }
}

/* The end (at most `limit`) of the vectors from i on whose asks of both r
 * and back lie on one side of each split (asks_run_end), with the bytes to
 * add to a vector's own for each */
BN_INLINE size_t NAME(plain_run_end)(const bn_row_asks *r, const bn_row_asks *back, size_t i,
                                     size_t limit, size_t *ask, size_t *back_ask)
{
    limit = NAME(asks_run_end)(r, i, limit, ask);
    return NAME(asks_run_end)(back, i, limit, back_ask);
}

/* *walk set to ask for features c0 .. c1 - 1 of x (and of `other`, NULL for
 * none) ahead of a reader, and returned, when x comes from memory; NULL (no
 * walk: the passes' own requests) when it stays in cache */
BN_INLINE bn_rows_ahead *NAME(rows_ahead_from_memory)(bn_rows_ahead *walk, const T *x,
                                                      const T *other, bn_shape s, size_t c0,
                                                      size_t c1)
{
    if (bn_in_cache(s, sizeof(T))) {
        return NULL;
    }
    *walk = bn_rows_ahead_from(x, other, s, sizeof(T), c0, c1, BN_STREAM_AHEAD_BYTES);
    return walk;
}

/* Ask for the start of row[0 .. n) before it is needed: a feature's rows lie
 * far apart, and the hardware prefetcher only ramps up within a row, so
 * every row would otherwise begin with a full miss. The
 * loops then ask for the rest BN_AHEAD_BYTES ahead (prefetch_ahead); asking
 * for 2 KB of a row of 3 KB at its start was slower (on the Xeon). For rows
 * in cache, and the rough pass; from memory the walk (bn_rows_ahead) asks. */
BN_INLINE void NAME(prefetch_head)(const T *row, size_t n)
{
    NAME(prefetch_span)(row, 0, BN_AHEAD_BYTES / sizeof(T), n, 0);
}

/* Ask for the lines BN_FAR_AHEAD_BYTES past p[i0 .. i1) in a pass's stream
 * of short rows, p[0 .. n): see bn_far_ahead */
BN_INLINE void NAME(prefetch_far)(const T *p, size_t i0, size_t i1, size_t n)
{
    NAME(prefetch_span)(p, i0, i1, n, BN_FAR_AHEAD_BYTES);
}

/* The first pass's running sum of 16 lanes of x - about, kept in T: for
 * floats it needs no conversion to double, and its rounding does not matter
 * (the second pass corrects the mean it gives). About a value of the data,
 * a constant feature sums to exactly 0. */
#if BN_ELEMENT_IS_FLOAT
typedef bn_lanes_f32 NAME(bn_rough);
typedef bn_vec_f32 NAME(bn_rough_vec);
#define ROUGH_K BN_K_F32
#define ROUGH_W BN_W_F32
#define ROUGH_TOTAL bn_lanes_f32_total
#else
typedef bn_lanes NAME(bn_rough);
typedef bn_vec NAME(bn_rough_vec);
#define ROUGH_K BN_K
#define ROUGH_W BN_W
#define ROUGH_TOTAL bn_lanes_total
#endif

BN_INLINE void NAME(rough_add)(NAME(bn_rough) *sum, const T *p, T about)
{
    for (int k = 0; k < ROUGH_K; k++) {
        NAME(bn_rough_vec) v;
        memcpy(&v, p + k * ROUGH_W, sizeof v);
        sum->v[k] += v - about;
    }
}

BN_INLINE double NAME(rough_total)(const NAME(bn_rough) *sum)
{
    return ROUGH_TOTAL(sum);
}

#undef ROUGH_K
#undef ROUGH_W
#undef ROUGH_TOTAL

/* ---- rows of an elementwise pass ------------------------------------------
 * One row of output, out[0 .. n), from in (and x) with one feature's
 * coefficients k, as bn_row_op says. A streamed row (large outputs, see
 * bn_stream_output) goes past the caches in vectors that must start on cache
 * lines. A row of BN_ALIGN_ROW_BYTES or more, streamed or not, also starts
 * its vectors on a line: NumPy's large arrays start 16 bytes into one, where
 * every AVX-512 store (every other AVX2 one) would straddle two lines, and
 * float64 inference ran 1.3-1.5x slower so. The values before the first line
 * go one by one. The rounding is the same whichever way a value is written. */

/* out[i .. n), one value at a time */
BN_INLINE void NAME(row_values)(T *out, const T *in, const T *x, size_t i, size_t n,
                                const bn_row_coefficients *k, bn_row_op op)
{
    for (; i < n; i++) {
        double v = (double)in[i];
        if (op == BN_ROW_DX_TRAIN) {
            out[i] = (T)(k->scale * (v - k->mean_dy - ((double)x[i] - k->mean) * k->dev_coef));
        }
        else if (op == BN_ROW_NORMALIZE) {
            out[i] = (T)((v - k->mean) * k->scale + k->beta);
        }
        else {
            out[i] = (T)(v * k->scale);
        }
    }
}

/* p[0 .. 16) <- v rounded to T, as store16, but past the caches where the
 * build can (non-temporal stores; p on a cache line) */
BN_INLINE void NAME(stream16)(T *p, const bn_lanes *v)
{
#if BN_CAN_STREAM && BN_ELEMENT_IS_FLOAT
    bn_stream16_f32(p, v);
#elif BN_CAN_STREAM
    bn_stream16_f64(p, v);
#else
    NAME(store16)(p, v);
#endif
}

/* out[i .. i + 16), exactly as row_values rounds it; streamed when `stream`
 * (out + i then on a cache line) */
BN_INLINE void NAME(row_vec)(T *out, const T *in, const T *x, size_t i,
                             const bn_row_coefficients *k, bn_row_op op, int stream)
{
    bn_lanes v = NAME(load16)(in + i);
    if (op == BN_ROW_DX_TRAIN) {
        bn_lanes xv = NAME(load16)(x + i);
        for (int q = 0; q < BN_K; q++) {
            v.v[q] = k->scale * (v.v[q] - k->mean_dy - (xv.v[q] - k->mean) * k->dev_coef);
        }
    }
    else if (op == BN_ROW_NORMALIZE) {
        for (int q = 0; q < BN_K; q++) {
            v.v[q] = (v.v[q] - k->mean) * k->scale + k->beta;
        }
    }
    else {
        for (int q = 0; q < BN_K; q++) {
            v.v[q] = v.v[q] * k->scale;
        }
    }
    if (stream) {
        NAME(stream16)(out + i, &v);
    }
    else {
        NAME(store16)(out + i, &v);
    }
}

/* A row to write; its vectors start at `head` (0 unless aligned: out_row_of) */
typedef struct {
    T *out;
    const T *in, *x;
    size_t n, head;
    const bn_row_coefficients *k;
    bn_row_op op;
    int stream;
} NAME(bn_out_row);

BN_INLINE NAME(bn_out_row) NAME(out_row_of)(T *out, const T *in, const T *x, size_t n,
                                            const bn_row_coefficients *k, bn_row_op op,
                                            int stream)
{
    size_t head = 0;
    int can_align = (uintptr_t)out % sizeof(T) == 0; /* else no value starts a line */
    stream = stream && can_align;
    if (can_align && (stream || n * sizeof(T) >= BN_ALIGN_ROW_BYTES)) {
        size_t to_line = (64 - (uintptr_t)out % 64) % 64 / sizeof(T);
        head = to_line < n ? to_line : n;
    }
    return (NAME(bn_out_row)){out, in, x, n, head, k, op, stream};
}

/* the values of row r before its vectors: 0 .. head */
BN_INLINE void NAME(out_head)(const NAME(bn_out_row) *r)
{
    NAME(row_values)(r->out, r->in, r->x, 0, r->head, r->k, r->op);
}

/* the vector of row r at i, which the row has (out_vecs_left); returns the
 * next i */
BN_INLINE size_t NAME(out_vec)(const NAME(bn_out_row) *r, size_t i)
{
    NAME(row_vec)(r->out, r->in, r->x, i, r->k, r->op, r->stream);
    return i + BN_LANES;
}

/* the vector of row r at i, if the row has one there; returns the next i */
BN_INLINE size_t NAME(out_next_vec)(const NAME(bn_out_row) *r, size_t i)
{
    return i + BN_LANES > r->n ? i : NAME(out_vec)(r, i);
}

/* how many whole vectors row r has from i on */
BN_INLINE size_t NAME(out_vecs_left)(const NAME(bn_out_row) *r, size_t i)
{
    return (r->n - i) / BN_LANES;
}

/* the rest of row r from i on */
BN_INLINE void NAME(out_rest)(const NAME(bn_out_row) *r, size_t i)
{
    for (; i + BN_LANES <= r->n; i += BN_LANES) {
        NAME(row_vec)(r->out, r->in, r->x, i, r->k, r->op, r->stream);
    }
    NAME(row_values)(r->out, r->in, r->x, i, r->n, r->k, r->op);
}

/* one whole row */
BN_INLINE void NAME(out_row)(const NAME(bn_out_row) *r)
{
    NAME(out_head)(r);
    NAME(out_rest)(r, r->head);
}

/* one whole row whose inputs come from memory (bn_ask_ahead), asked for
 * BN_STREAM_AHEAD_BYTES ahead, past the row's end into the rows after it, as
 * far as the `left` values from the row's start have them: the elementwise
 * passes take rows in memory order. With the hardware prefetchers alone,
 * rows of 784 to 12544 values took longer: on the Xeon CI ran on before,
 * inference 2-10% and dx 2-14% (asking 512 bytes ahead within rows); on the
 * EPYC (Zen 5) it runs on now, inference of 64x64x56x56 float32 1.08 -> 0.94
 * times a copy, 32x256x28x28 1.12 -> 0.99 (ab_kernels, AVX-512, 1 thread).
 * Counting the rows' vectors that need no test, as tile_stats_normalizing
 * does, made GCC order AVX2 float64 stores so that inference took 20% longer
 * (on the Xeon). */
BN_INLINE void NAME(out_row_ahead)(const NAME(bn_out_row) *r, size_t left)
{
    NAME(out_head)(r);
    size_t i = r->head;
    while (i + BN_LANES <= r->n) {
        NAME(prefetch_span)(r->in, i, i + BN_LANES, left, BN_STREAM_AHEAD_BYTES);
        if (r->op == BN_ROW_DX_TRAIN) {
            NAME(prefetch_span)(r->x, i, i + BN_LANES, left, BN_STREAM_AHEAD_BYTES);
        }
        i = NAME(out_vec)(r, i);
    }
    NAME(row_values)(r->out, r->in, r->x, i, r->n, r->k, r->op);
}

/* one whole row of an elementwise pass over rows in memory order: with
 * `ahead` (bn_ask_ahead), its inputs asked for as out_row_ahead does, as far
 * as the `left` values from its start go */
BN_INLINE void NAME(out_row_asking)(const NAME(bn_out_row) *r, int ahead, size_t left)
{
    if (ahead) {
        NAME(out_row_ahead)(r, left);
    }
    else {
        NAME(out_row)(r);
    }
}

/* *walk set to ask, BN_READBACK_AHEAD_BYTES ahead across the rows, for the
 * values a pipelined pass over features c0 .. c1 - 1 reads back from cache
 * (to normalize, or write dx): features of `a` (and of `b`, when not NULL),
 * and returned, when x comes `from_memory` and those features outgrow L2, so
 * that they come back from L3; NULL when they do not (read_back_asking asks
 * BN_AHEAD_BYTES ahead within each row then). Set up after feature c0's
 * first pass, whose reads brought its first rows in. Measured in the
 * backward, times a copy (ab_kernels, medians of 15-21 calls, 1 thread, on
 * the EPYC), AVX-512 float32: 64x64x3136 1.63 -> 1.46, 128x64x3136 1.88 ->
 * 1.48, 8x64x12544 1.53 -> 1.48; float64 128x64x3136 2.04 -> 1.80; AVX2
 * float32 64x64x3136 2.15 -> 1.93. Features that fit in L2 (32x256x784:
 * 200 KB) were as fast either way; with the walk for every feature, 1, 2
 * and 4 KB ahead gave 64x64x3136 1.34, 1.40 and 1.44, 128x64x3136 1.62, 1.48
 * and 1.45. In the training forward, which had asked for nothing it reads
 * back, float32 AVX-512: 64x64x3136 1.14 -> 0.97, 128x64x3136 1.09 -> 0.97,
 * 32x256x784 (in-row asks) 1.10 -> 1.04; float64, and AVX2, as before within
 * noise (31 calls each). */
BN_INLINE bn_rows_ahead *NAME(readback_walk)(bn_rows_ahead *walk, const T *a, const T *b,
                                             bn_shape s, int from_memory, size_t c0,
                                             size_t c1)
{
    size_t bytes = (b ? 2 : 1) * bn_count(s) * sizeof(T);
    if (!from_memory || bytes < BN_READBACK_WALK_BYTES) {
        return NULL;
    }
    *walk = bn_rows_ahead_from(a, b, s, sizeof(T), c0, c1, BN_READBACK_AHEAD_BYTES);
    return walk;
}

/* What a pass asks for of the next `bytes` it reads back from `row` (and
 * from `other_row`, when not NULL, the walk's `other`): from the walk `back`
 * when given, else BN_AHEAD_BYTES ahead within the rows */
BN_INLINE bn_asking NAME(read_back_asking)(bn_rows_ahead *back, const T *row,
                                           const T *other_row, size_t bytes)
{
    if (back) {
        return (bn_asking){back->x, back->other, bn_rows_ahead_take(back, bytes)};
    }
    return (bn_asking){(const char *)row, (const char *)other_row, bn_row_asks_within(bytes)};
}

/* ---- planar tiles ---------------------------------------------------------
 * A feature's statistics come tile by tile (bn_tile_at): each tile is small
 * enough for L1 (so that the first tile's two passes cost one read from
 * memory) and holds either several whole rows or a piece of one long row.
 * Lanes run along each row from the tile's first column; each row's last
 * values (fewer than BN_LANES) go to a scalar tail. f points at the
 * feature's first row; rows are s.channels * s.inner apart. */

#define TILE_ROW(f, o, s) ((f) + (o) * (s).channels * (s).inner)

/* the value of T the first pass takes x about: the shift, or 0 when the
 * shift is beyond T's range (converting it would be undefined) */
BN_INLINE T NAME(rough_about)(double shift)
{
#if BN_ELEMENT_IS_FLOAT
    return shift >= -FLT_MAX && shift <= FLT_MAX ? (T)shift : (T)0;
#else
    return isfinite(shift) ? shift : 0.0;
#endif
}

/* the sum of x - about over tile t, in double: the first pass's fallback when
 * its sums in T overflow (floats near FLT_MAX) */
static double NAME(tile_sum_wide)(const T *f, bn_shape s, bn_tile t, T about)
{
    double sum = 0.0;
    for (size_t o = t.o0; o < t.o1; o++) {
        const T *row = TILE_ROW(f, o, s);
        for (size_t i = t.i0; i < t.i1; i++) {
            sum += (double)row[i] - (double)about;
        }
    }
    return sum;
}

/* the sum of x - about over tile t (the first pass: its rounding does not
 * matter, the second pass corrects the mean it gives) */
BN_INLINE double NAME(tile_sum)(const T *f, bn_shape s, bn_tile t, T about)
{
    NAME(bn_rough) sum = {0};
    double tail = 0.0;
    for (size_t o = t.o0; o < t.o1; o++) {
        const T *row = TILE_ROW(f, o, s);
        if (t.i0 == 0 && o + 1 < s.outer) {
            NAME(prefetch_head)(TILE_ROW(f, o + 1, s), s.inner);
        }
        size_t i = t.i0;
        for (; i + BN_LANES <= t.i1; i += BN_LANES) {
            NAME(prefetch_ahead)(row, i, s.inner);
            NAME(rough_add)(&sum, row + i, about);
        }
        for (; i < t.i1; i++) {
            tail += (double)(row[i] - about);
        }
    }
    double total = NAME(rough_total)(&sum) + tail;
    return isfinite(total) ? total : NAME(tile_sum_wide)(f, s, t, about);
}

/* the first value of feature c: the shift its statistics are taken about,
 * so that the means merged tile by tile stay small and keep their last bits
 * (0 for an empty feature) */
BN_INLINE double NAME(first_value)(const T *x, bn_shape s, size_t c)
{
    return bn_count(s) > 0 ? (double)x[c * s.inner] : 0.0;
}

/* The center tile t's deviations are summed about: a value near the tile's
 * mean. For a feature's first tile (so_far empty), a first pass finds it; for
 * the others, the mean of the feature's values so far (so_far, less shift)
 * is near enough and costs no pass: a tile whose mean lies far from it adds
 * as much to the feature's m2 (between the tiles) as its sums can lose. */
BN_INLINE double NAME(tile_center)(const T *f, bn_shape s, bn_tile t, double shift,
                                   const bn_partial *so_far)
{
    double center = shift + so_far->mean;
    if (so_far->count == 0.0 || !isfinite(center)) {
        double count = (double)((t.o1 - t.o0) * (t.i1 - t.i0));
        T about = NAME(rough_about)(shift);
        center = (double)about + NAME(tile_sum)(f, s, t, about) / count;
    }
    return center;
}

/* a, a2 += the 16 values at p less center, and their squares */
BN_INLINE void NAME(lanes_add_deviations)(bn_lanes *a, bn_lanes *a2, const T *p,
                                          double center)
{
    bn_lanes v = NAME(load16)(p);
    for (int k = 0; k < BN_K; k++) {
        bn_vec d = v.v[k] - center;
        a->v[k] += d;
        a2->v[k] += d * d;
    }
}

/* A feature to normalize tile by tile: y <- (x - k.mean) * k.scale + k.beta,
 * streamed when `stream` */
typedef struct {
    T *y;
    const T *x;
    const bn_row_coefficients *k;
    int stream;
    bn_rows_ahead *back; /* asks for the x it reads back, or NULL (readback_walk) */
} NAME(bn_normalizing);

/* The vectors at i, i + 16, ... below `end` of a row of tile_stats_normalizing
 * from memory that need no test: each has a y vector (at y_at, y_at + 16,
 * ...), and its asks, of the statistics' walk and of the x that y reads back,
 * at `ask` and `back_ask` bytes past its own (its place from the tile's
 * first column). `stream` is a constant at each call; returns y's next i.
 * The same sums in the same order as the tested loop. Times a copy
 * (ab_kernels, medians of 15 calls, 1 thread, on the EPYC): float32 AVX-512
 * 64x64x3136 1.26 -> 1.06, 128x64x3136 1.30 -> 1.09, 32x256x784 1.24 ->
 * 1.04, 8x64x12544 1.20 -> 1.12; float32 AVX2 64x64x3136 1.58 -> 1.47. */
BN_INLINE size_t NAME(deviation_vecs_plain)(bn_lanes *a, bn_lanes *a2, const T *row,
                                            double center, size_t i, size_t end, bn_tile t,
                                            const NAME(bn_out_row) *y, size_t y_at,
                                            const char *ask_x, size_t ask, const char *back_x,
                                            size_t back_ask, int stream)
{
    for (; i < end; i += BN_LANES, y_at += BN_LANES) {
        NAME(ask_lines)(ask_x, ask + (i - t.i0) * sizeof(T));
        NAME(ask_lines)(back_x, back_ask + (i - t.i0) * sizeof(T));
        NAME(lanes_add_deviations)(a, a2, row + i, center);
        NAME(row_vec)(y->out, y->in, NULL, y_at, y->k, BN_ROW_NORMALIZE, stream);
    }
    return y_at;
}

/* deviation_vecs_plain over the vectors of tile t's row from i on that need
 * no test, with `stream` made a constant; returns the i after them, and *y_at
 * y's */
BN_INLINE size_t NAME(deviation_vecs_run)(bn_lanes *a, bn_lanes *a2, const T *row,
                                          double center, size_t i, bn_tile t,
                                          const NAME(bn_out_row) *y, size_t *y_at,
                                          const bn_asking *ahead, const bn_asking *back)
{
    size_t ask, back_ask, with_y = NAME(out_vecs_left)(y, *y_at) * BN_LANES;
    size_t end = t.i0 + NAME(plain_run_end)(&ahead->r, &back->r, i - t.i0, i - t.i0 + with_y,
                                            &ask, &back_ask);
    if (end <= i) {
        return i;
    }
    size_t vecs = (end - i + BN_LANES - 1) / BN_LANES;
    *y_at = y->stream ? NAME(deviation_vecs_plain)(a, a2, row, center, i, end, t, y, *y_at,
                                                   ahead->x, ask, back->x, back_ask, 1)
                      : NAME(deviation_vecs_plain)(a, a2, row, center, i, end, t, y, *y_at,
                                                   ahead->x, ask, back->x, back_ask, 0);
    return i + vecs * BN_LANES;
}

/* *total <- *total merged with the statistics of tile t, less `shift`: one
 * pass of the deviations from tile_center and their squares, corrected
 * (bn_corrected), while the tile streams in. With `norm` given, the same loop
 * normalizes the tile's places in the feature it names, so that the reads of
 * its x (from cache) and the stores overlap the reads from memory. With
 * `ahead` (x from memory), that walk asks for x ahead of the loop, and the
 * vectors that need no test run in deviation_vecs_plain; without, the loop
 * asks BN_AHEAD_BYTES ahead within rows. */
BN_INLINE void NAME(tile_stats_normalizing)(bn_partial *total, const T *f, bn_shape s,
                                            bn_tile t, double shift,
                                            const NAME(bn_normalizing) *norm,
                                            bn_rows_ahead *ahead)
{
    double count = (double)((t.o1 - t.o0) * (t.i1 - t.i0));
    double center = NAME(tile_center)(f, s, t, shift, total);
    bn_lanes a = {0}, a2 = {0};
    double tail = 0.0, tail2 = 0.0;
    for (size_t o = t.o0; o < t.o1; o++) {
        const T *row = TILE_ROW(f, o, s);
        NAME(bn_out_row) y = {0};
        size_t y_at = 0;
        if (norm) { /* the places t.i0 .. t.i1 of its row o */
            y = NAME(out_row_of)(TILE_ROW(norm->y, o, s) + t.i0, TILE_ROW(norm->x, o, s) + t.i0,
                                 NULL, t.i1 - t.i0, norm->k, BN_ROW_NORMALIZE, norm->stream);
            NAME(out_head)(&y);
            y_at = y.head;
        }
        size_t i = t.i0;
        if (ahead) {
            bn_asking asks = {ahead->x, NULL,
                              bn_rows_ahead_take(ahead, (t.i1 - t.i0) * sizeof(T))};
            bn_asking back = {0};
            if (norm) {
                back = NAME(read_back_asking)(norm->back, y.in, NULL, (t.i1 - t.i0) * sizeof(T));
            }
            while (i + BN_LANES <= t.i1) {
                size_t next = norm ? NAME(deviation_vecs_run)(&a, &a2, row, center, i, t,
                                                               &y, &y_at, &asks, &back)
                                   : i;
                if (next == i) {
                    NAME(ask_ahead_of)(asks.x, NULL, &asks.r, (i - t.i0) * sizeof(T));
                    if (norm) {
                        NAME(ask_ahead_of)(back.x, NULL, &back.r, (i - t.i0) * sizeof(T));
                    }
                    NAME(lanes_add_deviations)(&a, &a2, row + i, center);
                    if (norm) {
                        y_at = NAME(out_next_vec)(&y, y_at);
                    }
                    next = i + BN_LANES;
                }
                i = next;
            }
        }
        else if (t.i0 == 0 && o + 1 < s.outer) {
            NAME(prefetch_head)(TILE_ROW(f, o + 1, s), s.inner);
        }
        /* first the vectors that need no tests (statistics, and training
           forwards): in training forwards whose data fit in cache, the tests
           took 6-9% of the time with AVX-512 and 8-11% with AVX2 (float32, C
           harness, builds interleaved) */
        size_t plain = NAME(vectors_ahead_within)(i, t.i1, s.inner);
        if (norm && NAME(out_vecs_left)(&y, y_at) < plain) {
            plain = NAME(out_vecs_left)(&y, y_at);
        }
        for (size_t q = 0; q < plain; q++, i += BN_LANES) {
            NAME(prefetch_ahead_within)(row, i);
            NAME(lanes_add_deviations)(&a, &a2, row + i, center);
            if (norm) {
                y_at = NAME(out_vec)(&y, y_at);
            }
        }
        for (; i + BN_LANES <= t.i1; i += BN_LANES) {
            NAME(prefetch_ahead)(row, i, s.inner);
            NAME(lanes_add_deviations)(&a, &a2, row + i, center);
            if (norm) {
                y_at = NAME(out_next_vec)(&y, y_at);
            }
        }
        for (; i < t.i1; i++) {
            double d = (double)row[i] - center;
            tail += d;
            tail2 += d * d;
        }
        if (norm) {
            NAME(out_rest)(&y, y_at);
        }
    }
    /* center - shift: exact when both are near the data (Sterbenz), which is
       where it matters */
    bn_partial tile = bn_corrected(count, center - shift, bn_lanes_total(&a) + tail,
                                   bn_lanes_total(&a2) + tail2);
    bn_partial_merge(total, &tile);
}

/* the statistics of feature c less `shift`, its tiles merged in order (with
 * shift 0, exactly the statistics of the values); x asked for by `ahead`
 * when given */
BN_INLINE bn_partial NAME(planar_feature_stats)(const T *x, bn_shape s, size_t c, double shift,
                                                bn_rows_ahead *ahead)
{
    const T *f = x + c * s.inner;
    bn_partial total = {0.0, 0.0, 0.0};
    for (size_t k = 0, tiles = bn_tiles(s); k < tiles; k++) {
        NAME(tile_stats_normalizing)(&total, f, s, bn_tile_at(s, k), shift, NULL, ahead);
    }
    return total;
}

/* Training forward of features c0 .. c1 - 1, software-pipelined: feature c
 * is normalized (its data comes back from cache) in the same loops that
 * stream feature c + 1 in from memory for its statistics, tile by tile.
 * Those come out exactly as planar_feature_stats computes them. With
 * `stream`, y goes past the caches. From memory, one walk asks for the
 * statistics' rows ahead of them through all the features (bn_rows_ahead),
 * and for large features a second for the x that y reads back
 * (readback_walk). */
static void NAME(planar_forward_train_range)(T *y, bn_partial *stats, double *mean,
                                             double *invstd, const T *x,
                                             const T *gamma, const T *beta,
                                             double eps, bn_shape s, int stream, size_t c0,
                                             size_t c1)
{
    bn_rows_ahead walk, *ahead = NAME(rows_ahead_from_memory)(&walk, x, NULL, s, c0, c1);
    if (c0 < c1) {
        double first = NAME(first_value)(x, s, c0);
        stats[c0] = NAME(planar_feature_stats)(x, s, c0, first, ahead);
        bn_partial_unshift(stats + c0, &first, 1);
    }
    bn_rows_ahead back_walk, *back = NAME(readback_walk)(&back_walk, x, NULL, s, ahead != NULL,
                                                         c0, c1);
    for (size_t c = c0; c < c1; c++) {
        bn_batch_moments(mean + c, invstd + c, stats + c, 1, eps);
        bn_row_coefficients k = {.mean = mean[c],
                                 .scale = invstd[c] * (gamma ? (double)gamma[c] : 1.0),
                                 .beta = beta ? (double)beta[c] : 0.0};
        if (c + 1 == c1) { /* the last: no statistics left to overlap with */
            for (size_t o = 0; o < s.outer; o++) {
                NAME(bn_out_row) row = NAME(out_row_of)(ROW(y, o, c, s), ROW(x, o, c, s), NULL,
                                                        s.inner, &k, BN_ROW_NORMALIZE, stream);
                NAME(out_row)(&row);
            }
            break;
        }
        NAME(bn_normalizing) norm = {y + c * s.inner, x + c * s.inner, &k, stream, back};
        const T *next = x + (c + 1) * s.inner;
        double next_first = NAME(first_value)(x, s, c + 1);
        bn_partial total = {0.0, 0.0, 0.0};
        for (size_t t = 0, tiles = bn_tiles(s); t < tiles; t++) {
            NAME(tile_stats_normalizing)(&total, next, s, bn_tile_at(s, t), next_first, &norm,
                                         ahead);
        }
        bn_partial_unshift(&total, &next_first, 1);
        stats[c + 1] = total;
    }
    if (stream) {
        bn_stream_fence();
    }
}

static void NAME(planar_stats_feature)(bn_partial *stats, const T *x,
                                       const double *shift, bn_shape s, size_t c)
{
    /* no shift given: the feature's first value, and the mean made absolute */
    double about = shift ? shift[c] : NAME(first_value)(x, s, c);
    bn_rows_ahead walk, *ahead = NAME(rows_ahead_from_memory)(&walk, x, NULL, s, c, c + 1);
    stats[c] = NAME(planar_feature_stats)(x, s, c, about, ahead);
    if (!shift) {
        bn_partial_unshift(stats + c, &about, 1);
    }
}

/* rows r0..r1 of the [outer * C] rows: y <- (x - mean) * scale + shift; x
 * asked for far ahead when `far`, or as the rows go (bn_ask_ahead); y
 * streamed when large (bn_stream_output) */
static void NAME(planar_forward_rows)(T *y, const T *x, const double *mean,
                                      const double *scale, const double *shift,
                                      bn_shape s, size_t r0, size_t r1, int far)
{
    size_t n = s.outer * s.channels * s.inner;
    int ahead = bn_ask_ahead(s, sizeof(T)), stream = bn_stream_output(y, x, n * sizeof(T));
    for (size_t r = r0; r < r1; r++) {
        size_t c = r % s.channels;
        if (far) {
            NAME(prefetch_far)(x, r * s.inner, (r + 1) * s.inner, n);
        }
        bn_row_coefficients k = {.mean = mean[c], .scale = scale[c], .beta = shift[c]};
        NAME(bn_out_row) row = NAME(out_row_of)(y + r * s.inner, x + r * s.inner, NULL,
                                                s.inner, &k, BN_ROW_NORMALIZE, stream);
        NAME(out_row_asking)(&row, ahead, n - r * s.inner);
    }
    if (stream) {
        bn_stream_fence();
    }
}

/* The coefficients of dx for feature c (bn_row_op's formulas) from its dgamma
 * and dbeta, sums over `count` values: the pipelined backward and
 * bn_backward_dx both take them from here, so that they agree bitwise */
BN_INLINE bn_row_coefficients NAME(dx_row_coefficients)(const double *mean,
                                                        const double *invstd, const T *gamma,
                                                        double dgamma, double dbeta,
                                                        double count, int training, size_t c)
{
    bn_row_coefficients k = {.mean = mean[c],
                             .scale = invstd[c] * (gamma ? (double)gamma[c] : 1.0)};
    if (training) {
        k.mean_dy = dbeta / count;
        k.dev_coef = dgamma * invstd[c] / count; /* xhat * dgamma / n = (x - m) * dev_coef */
    }
    return k;
}

/* The coefficients of dx for feature c from its two sums; sets dgamma[c], dbeta[c] */
BN_INLINE bn_row_coefficients NAME(dx_coefficients)(double *dgamma, double *dbeta,
                                                    double sum_dy, double sum_dy_dev,
                                                    const double *mean, const double *invstd,
                                                    const T *gamma, bn_shape s, int training,
                                                    size_t c)
{
    dbeta[c] = sum_dy;
    dgamma[c] = sum_dy_dev * invstd[c];
    return NAME(dx_row_coefficients)(mean, invstd, gamma, dgamma[c], dbeta[c],
                                     (double)bn_count(s), training, c);
}

/* a += dy[0 .. 16), a2 += dy * (x - mean) over them, lane by lane */
BN_INLINE void NAME(lanes_add_grads)(bn_lanes *a, bn_lanes *a2, const T *dy, const T *x,
                                     double mean)
{
    bn_lanes g = NAME(load16)(dy), xv = NAME(load16)(x);
    for (int q = 0; q < BN_K; q++) {
        a->v[q] += g.v[q];
        a2->v[q] += g.v[q] * (xv.v[q] - mean);
    }
}

/* One vector of row_grad_lanes_writing_dx at i, with all of its tests: the
 * sums of feature `next` at i and, when the dx row has a vector there, dx's
 * (with its asks `back`); returns dx's next i */
BN_INLINE size_t NAME(grad_vec_testing)(bn_lanes *a, bn_lanes *a2, const T *next_dy,
                                        const T *next_x, double next_mean, size_t i, size_t n,
                                        const NAME(bn_out_row) *dx, size_t dx_at,
                                        const bn_asking *ahead, const bn_asking *back)
{
    if (ahead) {
        NAME(ask_ahead_of)(ahead->x, ahead->other, &ahead->r, i * sizeof(T));
    }
    else {
        NAME(prefetch_ahead)(next_dy, i, n);
        NAME(prefetch_ahead)(next_x, i, n);
    }
    if (dx) {
        NAME(ask_ahead_of)(back->x, back->other, &back->r, i * sizeof(T));
    }
    NAME(lanes_add_grads)(a, a2, next_dy + i, next_x + i, next_mean);
    return dx ? NAME(out_next_vec)(dx, dx_at) : dx_at;
}

/* The vectors at i, i + 16, ... below `end` of row_grad_lanes_writing_dx
 * from memory, none of which needs a test: each has a dx vector (at dx_at,
 * dx_at + 16, ...), and its asks, of the sums' walk and of the dy and x dx
 * reads back, at `ask` and `back_ask` bytes past its own (one side of each
 * asks' split). op and stream are constants at each call, so that the loop
 * has no branch but its own; returns dx's next i. The same sums in the same
 * order as grad_vec_testing. The tested loop took about 75 instructions a
 * vector, this one 46; times a copy (ab_kernels, medians of 15-21 calls, 1
 * thread, on the EPYC): float32 AVX-512 64x64x3136 1.80 -> 1.62, 32x256x784
 * 2.15 -> 1.80, 8x64x12544 1.65 -> 1.58, 128x64x3136 2.08 -> 1.91; float64
 * AVX-512 64x64x3136 2.01 -> 1.90; float32 AVX2 2.01 -> 1.87. */
BN_INLINE size_t NAME(grad_vecs_plain)(bn_lanes *a, bn_lanes *a2, const T *next_dy,
                                       const T *next_x, double next_mean, size_t i,
                                       size_t end, const NAME(bn_out_row) *dx, size_t dx_at,
                                       const bn_asking *ahead, size_t ask,
                                       const bn_asking *back, size_t back_ask, bn_row_op op,
                                       int stream)
{
    const char *ask_x = ahead->x, *ask_dy = ahead->other;
    const char *back_dy = back->x, *back_x = back->other;
    for (; i < end; i += BN_LANES, dx_at += BN_LANES) {
        NAME(ask_lines)(ask_x, ask + i * sizeof(T));
        NAME(ask_lines)(ask_dy, ask + i * sizeof(T));
        NAME(ask_lines)(back_dy, back_ask + i * sizeof(T));
        if (op == BN_ROW_DX_TRAIN) {
            NAME(ask_lines)(back_x, back_ask + i * sizeof(T));
        }
        NAME(lanes_add_grads)(a, a2, next_dy + i, next_x + i, next_mean);
        NAME(row_vec)(dx->out, dx->in, dx->x, dx_at, dx->k, op, stream);
    }
    return dx_at;
}

/* grad_vecs_plain over the vectors from i on (below `end`) that need no
 * test, with op and stream made constants; returns the i after them, and
 * *dx_at dx's */
BN_INLINE size_t NAME(grad_vecs_run)(bn_lanes *a, bn_lanes *a2, const T *next_dy,
                                     const T *next_x, double next_mean, size_t i,
                                     size_t end, const NAME(bn_out_row) *dx, size_t *dx_at,
                                     const bn_asking *ahead, const bn_asking *back)
{
    size_t ask, back_ask;
    end = NAME(plain_run_end)(&ahead->r, &back->r, i, end, &ask, &back_ask);
    if (end <= i) {
        return i;
    }
    size_t vecs = (end - i + BN_LANES - 1) / BN_LANES;
#define BN_GRAD_RUN(op, stream)                                                             \
    NAME(grad_vecs_plain)(a, a2, next_dy, next_x, next_mean, i, end, dx, *dx_at, ahead, ask, \
                          back, back_ask, op, stream)
    if (dx->op == BN_ROW_DX_TRAIN) {
        *dx_at = dx->stream ? BN_GRAD_RUN(BN_ROW_DX_TRAIN, 1) : BN_GRAD_RUN(BN_ROW_DX_TRAIN, 0);
    }
    else {
        *dx_at = dx->stream ? BN_GRAD_RUN(BN_ROW_DX_EVAL, 1) : BN_GRAD_RUN(BN_ROW_DX_EVAL, 0);
    }
#undef BN_GRAD_RUN
    return i + vecs * BN_LANES;
}

/* One row of feature `next` added to 16 lanes (from the row's first value)
 * and a scalar tail: a, tail += dy; a2, tail2 += dy * (x - next_mean). With a
 * dx row given, the same loop writes it (the current feature's), so the reads
 * from memory and the writes overlap; either way the sums add in the same
 * order. The row's dy and x asked for by `ahead` when given (from memory),
 * else BN_AHEAD_BYTES ahead within the row. dx's dy and x read back are
 * asked for by `back` when given (readback_walk), else within the row. From
 * memory with a dx row, the vectors that need no test run in
 * grad_vecs_plain. */
BN_INLINE void NAME(row_grad_lanes_writing_dx)(bn_lanes *a, bn_lanes *a2, double *tail,
                                               double *tail2, const T *next_dy,
                                               const T *next_x, double next_mean, size_t n,
                                               const NAME(bn_out_row) *dx,
                                               bn_rows_ahead *ahead, bn_rows_ahead *back)
{
    size_t i = 0, dx_at = dx ? dx->head : 0;
    bn_asking sums = {0}, *asking = NULL, dx_asks = {0};
    if (ahead) {
        sums = (bn_asking){ahead->x, ahead->other, bn_rows_ahead_take(ahead, n * sizeof(T))};
        asking = &sums;
    }
    if (dx) {
        NAME(out_head)(dx);
        const T *dx_x = dx->op == BN_ROW_DX_TRAIN ? dx->x : NULL; /* eval reads no x */
        dx_asks = NAME(read_back_asking)(back, dx->in, dx_x, n * sizeof(T));
    }
    /* below plain_end, every vector has a dx vector */
    size_t plain_end = ahead && ahead->other && dx ? NAME(out_vecs_left)(dx, dx->head) * BN_LANES
                                                   : 0;
    while (i + BN_LANES <= n) {
        size_t next = i < plain_end ? NAME(grad_vecs_run)(a, a2, next_dy, next_x, next_mean, i,
                                                          plain_end, dx, &dx_at, asking,
                                                          &dx_asks)
                                    : i;
        if (next == i) {
            dx_at = NAME(grad_vec_testing)(a, a2, next_dy, next_x, next_mean, i, n, dx, dx_at,
                                           asking, &dx_asks);
            next = i + BN_LANES;
        }
        i = next;
    }
    for (size_t j = i; j < n; j++) {
        double g = (double)next_dy[j];
        *tail += g;
        *tail2 += g * ((double)next_x[j] - next_mean);
    }
    if (dx) {
        NAME(out_rest)(dx, dx_at);
    }
}

/* The sums of feature `next` over one row: *sum_dy += sum dy,
 * *sum_dy_dev += sum dy * (x - next_mean), with the dx row written in the same
 * loop when given (row_grad_lanes_writing_dx) */
BN_INLINE void NAME(row_grad_sums_writing_dx)(double *sum_dy, double *sum_dy_dev,
                                              const T *next_dy, const T *next_x,
                                              double next_mean, size_t n,
                                              const NAME(bn_out_row) *dx,
                                              bn_rows_ahead *ahead, bn_rows_ahead *back)
{
    bn_lanes a = {0}, a2 = {0};
    double tail = 0.0, tail2 = 0.0;
    NAME(row_grad_lanes_writing_dx)(&a, &a2, &tail, &tail2, next_dy, next_x, next_mean, n, dx,
                                    ahead, back);
    *sum_dy += bn_lanes_total(&a) + tail;
    *sum_dy_dev += bn_lanes_total(&a2) + tail2;
}

/* *sum_dy += sum dy, *sum_dy_dev += sum dy * (x - mean) over one row, asked
 * for by `ahead` when given */
BN_INLINE void NAME(row_grad_sums)(double *sum_dy, double *sum_dy_dev, const T *dy,
                                   const T *x, size_t n, double mean, bn_rows_ahead *ahead)
{
    NAME(row_grad_sums_writing_dx)(sum_dy, sum_dy_dev, dy, x, mean, n, NULL, ahead, NULL);
}

/* Backward of features c0 .. c1 - 1, pipelined like the training forward:
 * dx of feature c is written (its dy and x come back from cache) in the loop
 * that streams feature c + 1's dy and x in for its two sums. With `stream`,
 * dx goes past the caches. From memory, one walk asks for the sums' rows ahead
 * of them through all the features (bn_rows_ahead), and for large features a
 * second asks for the rows read back (readback_walk). */
static void NAME(planar_backward_range)(T *dx, double *dgamma, double *dbeta,
                                        const T *dy, const T *x, const double *mean,
                                        const double *invstd, const T *gamma,
                                        bn_shape s, int training, int stream, size_t c0,
                                        size_t c1)
{
    double sum_dy = 0.0, sum_dy_dev = 0.0;
    bn_rows_ahead walk, *ahead = NAME(rows_ahead_from_memory)(&walk, x, dy, s, c0, c1);
    for (size_t o = 0; o < s.outer && c0 < c1; o++) {
        NAME(row_grad_sums)(&sum_dy, &sum_dy_dev, ROW(dy, o, c0, s), ROW(x, o, c0, s), s.inner,
                            mean[c0], ahead);
    }
    bn_rows_ahead back_walk, *back = NAME(readback_walk)(&back_walk, dy, training ? x : NULL,
                                                         s, ahead != NULL, c0, c1);
    for (size_t c = c0; c < c1; c++) {
        bn_row_coefficients k = NAME(dx_coefficients)(dgamma, dbeta, sum_dy, sum_dy_dev, mean,
                                                      invstd, gamma, s, training, c);
        sum_dy = sum_dy_dev = 0.0;
        for (size_t o = 0; o < s.outer; o++) {
            NAME(bn_out_row) row = NAME(out_row_of)(ROW(dx, o, c, s), ROW(dy, o, c, s),
                                                    ROW(x, o, c, s), s.inner, &k,
                                                    bn_dx_op(training), stream);
            if (c + 1 < c1) {
                if (!ahead && o + 1 < s.outer) {
                    NAME(prefetch_head)(ROW(dy, o + 1, c + 1, s), s.inner);
                    NAME(prefetch_head)(ROW(x, o + 1, c + 1, s), s.inner);
                }
                NAME(row_grad_sums_writing_dx)(&sum_dy, &sum_dy_dev, ROW(dy, o, c + 1, s),
                                               ROW(x, o, c + 1, s), mean[c + 1], s.inner,
                                               &row, ahead, back);
            }
            else {
                NAME(out_row)(&row);
            }
        }
    }
    if (stream) {
        bn_stream_fence();
    }
}

/* ---- interleaved rows (inner == 1) ------------------------------------- *
 * Rows go in "wide rows" of `fold` rows, R = fold * C values, so that even a
 * few features give a loop long enough to vectorize: lane l of a wide row
 * holds feature l % C, and per-feature coefficients are repeated fold times.
 * Short planar rows spread (bn_spreads) take the same passes, each outer row
 * of C * inner values a row of pseudo-features (bn_wide_shape). */

/* sum, sum2 += lanes l0 .. l1 of the BN_ROWS_AT_ONCE wide rows from `row` (R
 * apart) less center, and their squares: each lane loaded and stored once for
 * the rows, its additions in the order of one row at a time. `restrict`: for
 * float64, GCC could not rule out that x overlaps the sums, and left the loop
 * scalar (2.6x slower than one row a pass). */
BN_INLINE void NAME(lane_stats_rows)(double *restrict sum, double *restrict sum2,
                                     const double *restrict center, const T *restrict row,
                                     size_t R, size_t l0, size_t l1)
{
    for (size_t l = l0; l < l1; l++) {
        double c = center[l], a = sum[l], a2 = sum2[l];
        for (size_t k = 0; k < BN_ROWS_AT_ONCE; k++) {
            double d = (double)row[k * R + l] - c;
            a += d;
            a2 += d * d;
        }
        sum[l] = a;
        sum2[l] = a2;
    }
}

/* lanes l0 .. l1 of wide rows j0 .. j1 from base (R apart): each value less
 * its lane's center added to the lane's sum, its square to sum2, one row
 * after another, BN_ROWS_AT_ONCE rows a pass while there are as many; x
 * asked for far ahead when `far` (prefetch_far; `at` is base's place in
 * x[n]). Each lane adds in the same order however the rows are passed. */
BN_INLINE void NAME(lane_stats_span)(bn_lane_stats v, const T *base, size_t R, size_t j0,
                                     size_t j1, size_t l0, size_t l1, int far,
                                     const T *x, size_t at, size_t n)
{
    size_t j = j0;
    for (; j + BN_ROWS_AT_ONCE <= j1; j += BN_ROWS_AT_ONCE) {
        for (size_t k = 0; far && k < BN_ROWS_AT_ONCE; k++) {
            NAME(prefetch_far)(x, at + (j + k) * R + l0, at + (j + k) * R + l1, n);
        }
        NAME(lane_stats_rows)(v.sum, v.sum2, v.center, base + j * R, R, l0, l1);
    }
    for (; j < j1; j++) {
        const T *row = base + j * R;
        if (far) {
            NAME(prefetch_far)(x, at + j * R + l0, at + j * R + l1, n);
        }
        for (size_t l = l0; l < l1; l++) {
            double d = (double)row[l] - v.center[l];
            v.sum[l] += d;
            v.sum2[l] += d * d;
        }
    }
}

/* center[l0 .. l1) += the first `rows` wide rows from base (R apart) less
 * shift_wide, one row after another, BN_ROWS_AT_ONCE rows a pass while there
 * are as many: each lane loaded and stored once for them (C harness,
 * statistics of 16x1024 float32: 14.7 -> 13.8 us) */
BN_INLINE void NAME(lane_center_sums)(double *restrict center,
                                      const double *restrict shift_wide,
                                      const T *restrict base, size_t R, size_t rows, size_t l0,
                                      size_t l1)
{
    size_t j = 0;
    for (; j + BN_ROWS_AT_ONCE <= rows; j += BN_ROWS_AT_ONCE) {
        const T *row = base + j * R;
        for (size_t l = l0; l < l1; l++) {
            double a = center[l];
            for (size_t k = 0; k < BN_ROWS_AT_ONCE; k++) {
                a += (double)row[k * R + l] - shift_wide[l];
            }
            center[l] = a;
        }
    }
    for (; j < rows; j++) {
        for (size_t l = l0; l < l1; l++) {
            center[l] += (double)base[j * R + l] - shift_wide[l];
        }
    }
}

/* Lanes l0 .. l1 of the wide rows o0 .. o1, in one pass down the rows, into
 * each lane's mean (less shift_wide[R]) and m2 (bn_lane_stats). The rows go in
 * blocks, each summed as deviations from a center, corrected and merged as in
 * Chan, Golub and LeVeque: the first block (BN_CENTER_ROWS rows) about its own
 * mean, found by a first pass; each later one about the mean of the rows
 * before it, and no longer than they are (bn_next_lane_block), so that
 * however far those rows lie from the block's, the block's squares exceed
 * the m2 they add by at most a factor of two, and its BN_LANE_BLOCK_ROWS
 * additions at most round away what the planar tiles' do. The partial wide
 * row at the end is a block of one value for lanes below w.rest. A lane's
 * results are the same however the lanes are cut into blocks. */
static void NAME(interleaved_lane_stats)(bn_lane_stats v, const T *x,
                                         const double *shift_wide, bn_shape s, size_t o0,
                                         size_t o1, size_t l0, size_t l1, int far)
{
    size_t C = s.channels, R = bn_fold(C) * C, n = s.outer * C, at = o0 * C;
    bn_wide_rows w = bn_wide_rows_of(s, o0, o1);
    size_t first = w.whole < BN_CENTER_ROWS ? w.whole : BN_CENTER_ROWS;
    const T *base = x + at;
    bn_lane_stats_clear(v, l0, l1);
    NAME(lane_center_sums)(v.center, shift_wide, base, R, first, l0, l1);
    for (size_t l = l0; l < l1; l++) { /* the first block's center: its mean */
        v.center[l] = (first > 0 ? v.center[l] / (double)first : 0.0) + shift_wide[l];
    }
    for (size_t j0 = 0; j0 < w.whole;) {
        size_t j1 = bn_next_lane_block(j0, w.whole);
        NAME(lane_stats_span)(v, base, R, j0, j1, l0, l1, far, x, at, n);
        bn_lane_stats_merge(v, shift_wide, (double)j0, (double)(j1 - j0), l0, l1);
        j0 = j1;
    }
    size_t rest_end = w.rest < l1 ? w.rest : l1; /* lanes with one more value */
    if (l0 < rest_end) {
        NAME(lane_stats_span)(v, base, R, w.whole, w.whole + 1, l0, rest_end, far, x, at, n);
        bn_lane_stats_merge(v, shift_wide, (double)w.whole, 1.0, l0, rest_end);
    }
}

/* Lanes l0 .. l1 of rows o0 .. o1: sum dy and sum dy * (x - mean) into the
 * lanes' sum_dy and sum_dy_dev (`stride` apart); dy and x asked for far
 * ahead when `far`. mean_wide[R]: each lane's mean. */
static void NAME(interleaved_lane_grads)(double *lanes, size_t stride, const T *dy, const T *x,
                                         const double *mean_wide, bn_shape s, size_t o0,
                                         size_t o1, size_t l0, size_t l1, int far)
{
    size_t C = s.channels, R = bn_fold(C) * C, n = s.outer * C;
    bn_wide_rows w = bn_wide_rows_of(s, o0, o1);
    double *sum_dy = lanes, *sum_dy_dev = lanes + stride;
    for (size_t l = l0; l < l1; l++) {
        sum_dy[l] = sum_dy_dev[l] = 0.0;
    }
    for (size_t j = 0; j <= w.whole; j++) {
        size_t at = o0 * C + j * R; /* the row's place in dy and x */
        const T *dy_row = dy + at, *x_row = x + at;
        size_t end = j < w.whole ? l1 : (w.rest < l1 ? w.rest : l1);
        if (far) {
            NAME(prefetch_far)(dy, at + l0, at + end, n);
            NAME(prefetch_far)(x, at + l0, at + end, n);
        }
        for (size_t l = l0; l < end; l++) {
            double g = (double)dy_row[l];
            sum_dy[l] += g;
            sum_dy_dev[l] += g * ((double)x_row[l] - mean_wide[l]);
        }
    }
}

/* values i0 .. i1 of x[n] (i0 a multiple of R): y <- (x - mean) * scale +
 * shift, with the coefficients of the wide row; x asked for far ahead when
 * `far` */
static void NAME(interleaved_forward_span)(T *y, const T *x, const double *mean,
                                           const double *scale, const double *shift,
                                           size_t R, size_t i0, size_t i1, size_t n, int far)
{
    for (size_t w = i0; w < i1; w += R) {
        size_t width = i1 - w < R ? i1 - w : R;
        if (far) {
            NAME(prefetch_far)(x, w, w + width, n);
        }
        for (size_t l = 0; l < width; l++) {
            y[w + l] = (T)(((double)x[w + l] - mean[l]) * scale[l] + shift[l]);
        }
    }
}

/* Whether an interleaved elementwise pass streams its output `out` (n
 * values, wide rows of R; `in` its input): the values from a wide row's
 * start to out's first cache line, when it does (bn_stream_output, and R a
 * multiple of 16, so that every wide row starts as far from a line), its
 * `count` coefficient tables then rotated by as many lanes for
 * interleaved_streamed (bn_rotate_lanes); R when it does not. Inference of
 * 200704x64 (ab_kernels, medians of 11 calls, 1 thread, times a copy, on the
 * EPYC): AVX-512 float32 1.07 -> 0.81, float64 1.01 -> 0.73; AVX2 1.12 ->
 * 0.81 and 1.08 -> 0.85. The backward (its dx): AVX-512 float32 2.73 ->
 * 2.34, float64 2.72 -> 2.36; AVX2 float32 3.01 -> 2.76. Not in the
 * baseline build (2 doubles a register), whose float32 inference took
 * longer so (1.33 -> 1.47). */
static size_t NAME(streamed_lanes_head)(const T *out, const T *in, size_t R, size_t n,
                                        double *const *tables, size_t count)
{
    if (!BN_CAN_STREAM || BN_W < 4 || R % BN_LANES != 0 || (uintptr_t)out % sizeof(T) != 0 ||
        !bn_stream_output(out, in, n * sizeof(T))) {
        return R;
    }
    size_t head = (64 - (uintptr_t)out % 64) % 64 / sizeof(T);
    for (size_t t = 0; t < count; t++) {
        bn_rotate_lanes(tables[t], R, head);
    }
    return head;
}

/* the lanes at wide[0 .. 16) as a bn_lanes; wide on a cache line (the
 * workspace's wide vectors start on one, and a vector's lanes 16 apart).
 * Unaligned loads went through the stack in 16-byte pieces in the AVX2
 * build (its streamed inference ran 5-11 times slower so); an element loop
 * made the AVX-512 float32 one 1.6 times slower. */
BN_INLINE bn_lanes NAME(wide16)(const double *wide)
{
    bn_lanes v;
    for (int k = 0; k < BN_K; k++) {
        v.v[k] = *(const bn_vec *)(wide + k * BN_W);
    }
    return v;
}

/* out[p .. p + 16) from in and x there, with lanes l .. l + 16 of k: the
 * rounding of interleaved_forward_span and interleaved_dx_span; streamed */
BN_INLINE void NAME(lanes_out_streamed)(T *out, const T *in, const T *x, size_t p, size_t l,
                                        const bn_lane_coefficients *k)
{
    bn_lanes v = NAME(load16)(in + p), scale = NAME(wide16)(k->scale + l);
    if (k->op == BN_ROW_NORMALIZE) {
        bn_lanes m = NAME(wide16)(k->mean + l), b = NAME(wide16)(k->shift + l);
        for (int q = 0; q < BN_K; q++) {
            v.v[q] = (v.v[q] - m.v[q]) * scale.v[q] + b.v[q];
        }
    }
    else if (k->op == BN_ROW_DX_TRAIN) {
        bn_lanes xv = NAME(load16)(x + p), m = NAME(wide16)(k->mean + l);
        bn_lanes mean_dy = NAME(wide16)(k->mean_dy + l), coef = NAME(wide16)(k->dev_coef + l);
        for (int q = 0; q < BN_K; q++) {
            bn_vec dev = xv.v[q] - m.v[q];
            v.v[q] = scale.v[q] * (v.v[q] - mean_dy.v[q] - dev * coef.v[q]);
        }
    }
    else {
        for (int q = 0; q < BN_K; q++) {
            v.v[q] = v.v[q] * scale.v[q];
        }
    }
    NAME(stream16)(out + p, &v);
}

/* out[p] from in[p] and x[p], with lane l of k, as lanes_out_streamed */
BN_INLINE void NAME(lane_out)(T *out, const T *in, const T *x, size_t p, size_t l,
                              const bn_lane_coefficients *k)
{
    double v = (double)in[p];
    if (k->op == BN_ROW_NORMALIZE) {
        out[p] = (T)((v - k->mean[l]) * k->scale[l] + k->shift[l]);
    }
    else if (k->op == BN_ROW_DX_TRAIN) {
        double dev = (double)x[p] - k->mean[l];
        out[p] = (T)(k->scale[l] * (v - k->mean_dy[l] - dev * k->dev_coef[l]));
    }
    else {
        out[p] = (T)(v * k->scale[l]);
    }
}

/* An interleaved elementwise pass over places i0 .. i1 with out streamed
 * (bn_stream_output): the values before out's first cache line one by one,
 * then 16 at a time, each vector on a line. The coefficients are rotated
 * (bn_rotate_lanes) by `head`, the values from a span's start (R apart, so
 * the same for every span) to that line, so that with R a multiple of 16
 * each vector's lanes lie together. in (and x, for dx in training) asked
 * for far ahead when `far`. */
BN_INLINE void NAME(interleaved_streamed)(T *out, const T *in, const T *x,
                                          const bn_lane_coefficients *k, size_t R, size_t head,
                                          size_t i0, size_t i1, size_t n, int far)
{
    size_t p = i0, l = R - head; /* l: the rotated lane of place p */
    for (; p < i1; p++) {
        if (l == R) {
            l = 0;
        }
        if (l % BN_LANES == 0 && p + BN_LANES <= i1) {
            if (far) {
                NAME(prefetch_far)(in, p, p + BN_LANES, n);
            }
            if (far && k->op == BN_ROW_DX_TRAIN) {
                NAME(prefetch_far)(x, p, p + BN_LANES, n);
            }
            NAME(lanes_out_streamed)(out, in, x, p, l, k);
            p += BN_LANES - 1;
            l += BN_LANES;
            continue;
        }
        NAME(lane_out)(out, in, x, p, l, k);
        l++;
    }
}

/* interleaved_streamed with k's op made a constant */
static void NAME(interleaved_streamed_span)(T *out, const T *in, const T *x,
                                            const bn_lane_coefficients *k, size_t R,
                                            size_t head, size_t i0, size_t i1, size_t n, int far)
{
    bn_lane_coefficients c = *k;
    if (k->op == BN_ROW_NORMALIZE) {
        c.op = BN_ROW_NORMALIZE;
        NAME(interleaved_streamed)(out, in, x, &c, R, head, i0, i1, n, far);
    }
    else if (k->op == BN_ROW_DX_TRAIN) {
        c.op = BN_ROW_DX_TRAIN;
        NAME(interleaved_streamed)(out, in, x, &c, R, head, i0, i1, n, far);
    }
    else {
        c.op = BN_ROW_DX_EVAL;
        NAME(interleaved_streamed)(out, in, x, &c, R, head, i0, i1, n, far);
    }
}

/* values i0 .. i1 of dx[n]; training: scale * (dy - mean_dy - (x - mean) *
 * dev_coef); dy (and x) asked for far ahead when `far` */
static void NAME(interleaved_dx_span)(T *dx, const T *dy, const T *x,
                                      const double *mean, const double *scale,
                                      const double *mean_dy, const double *dev_coef,
                                      int training, size_t R, size_t i0, size_t i1, size_t n,
                                      int far)
{
    for (size_t w = i0; w < i1; w += R) {
        size_t width = i1 - w < R ? i1 - w : R;
        if (far) {
            NAME(prefetch_far)(dy, w, w + width, n);
        }
        if (far && training) {
            NAME(prefetch_far)(x, w, w + width, n);
        }
        if (training) {
            for (size_t l = 0; l < width; l++) {
                double dev = (double)x[w + l] - mean[l];
                dx[w + l] = (T)(scale[l] * ((double)dy[w + l] - mean_dy[l] - dev * dev_coef[l]));
            }
        }
        else {
            for (size_t l = 0; l < width; l++) {
                dx[w + l] = (T)((double)dy[w + l] * scale[l]);
            }
        }
    }
}

/* ---- the kernels of bn_kernels.h ---------------------------------------- */

/* scale[R], shift[R] <- invstd * gamma and beta of the features, spread
 * (bn_spread) over a wide row of R values; R = C, inner = 1 for planar rows */
static void NAME(affine_coefficients)(double *scale, double *shift, const double *invstd,
                                      const T *gamma, const T *beta, size_t C, size_t inner,
                                      size_t R)
{
    for (size_t c = 0; c < C; c++) {
        scale[c] = invstd[c] * (gamma ? (double)gamma[c] : 1.0);
        shift[c] = beta ? (double)beta[c] : 0.0;
    }
    bn_spread(scale, C, inner, R);
    bn_spread(shift, C, inner, R);
}

/* [o0, o1) of group g of BN_GROUP_ROWS rows */
#define GROUP_ROWS(g, s, o0, o1)                                                    \
    size_t o0 = (g) * BN_GROUP_ROWS;                                                \
    size_t o1 = o0 + BN_GROUP_ROWS < (s).outer ? o0 + BN_GROUP_ROWS : (s).outer

/* Interleaved statistics (less shift[C], or each feature's first value when
 * NULL, undone at the end), and those of short planar rows spread over wide
 * rows (bn_spread_sums): rows in fixed groups of BN_GROUP_ROWS, each group's
 * lanes in blocks (one task a block); the groups' partials are merged in
 * order, so the result does not depend on which thread took which task.
 * work: bn_workspace_size doubles. */
static void NAME(interleaved_stats)(bn_partial *stats, double *work, const T *x,
                                    const double *shift, bn_shape s)
{
    size_t C = s.channels, groups = bn_row_groups(s);
    bn_shape wide = bn_wide_shape(s);
    size_t R = bn_wide_len(s);
    bn_work parts = bn_work_parts(work, s);
    double *shift_wide = parts.wide, *first = parts.wide + parts.stride; /* [R], [C] */
    for (size_t c = 0; c < C; c++) {
        first[c] = s.outer > 0 ? (double)x[c * s.inner] : 0.0; /* x[0][c][0] */
    }
    bn_spread_copy(shift_wide, shift ? shift : first, s);
    bn_partial *partials = (bn_partial *)parts.groups; /* [groups][C] */
    size_t lanes_per_group = BN_LANE_VECTORS * parts.stride;
    int team = bn_team(s), far = bn_far_ahead(s, sizeof(T));
    size_t blocks = bn_lane_blocks(R, groups, team), tasks = groups * blocks;
    BN_PARALLEL_FOR
    for (size_t k = 0; k < tasks; k++) {
        GROUP_ROWS(k / blocks, s, o0, o1);
        bn_lane_range b = bn_lane_block(R, blocks, k % blocks);
        bn_lane_stats v = bn_lane_stats_at(parts.lanes + (k / blocks) * lanes_per_group,
                                           parts.stride);
        NAME(interleaved_lane_stats)(v, x, shift_wide, wide, o0, o1, b.l0, b.l1, far);
    }
    for (size_t g = 0; g < groups; g++) {
        GROUP_ROWS(g, s, o0, o1);
        bn_lane_partials(partials + g * C,
                         bn_lane_stats_at(parts.lanes + g * lanes_per_group, parts.stride), s,
                         o0, o1);
    }
    bn_merge_groups(stats, partials, groups, C, shift ? NULL : first);
}

/* planar, short rows: partial[C] <- the statistics of rows o0 .. o1 less
 * about[C], walking memory in blocks of bn_short_tile_rows rows: the block's
 * rows of each feature are a tile, merged into the feature's partial. With
 * `far` (bn_stats_far_ahead), each of the block's rows is asked for far
 * ahead, as planar_group_grads asks: the same rows of the features that
 * follow lie there. */
static void NAME(planar_group_stats)(bn_partial *partial, const T *x,
                                     const double *about, bn_shape s, size_t o0,
                                     size_t o1, int far)
{
    size_t C = s.channels, n = s.outer * C * s.inner, rows = bn_short_tile_rows(s);
    for (size_t c = 0; c < C; c++) {
        partial[c] = (bn_partial){0.0, 0.0, 0.0};
    }
    for (size_t o = o0; o < o1; o += rows) {
        /* rows counted from the feature's first row, so that the tile
           prefetches no row past the last */
        bn_tile block = {o, o + rows < o1 ? o + rows : o1, 0, s.inner};
        for (size_t c = 0; c < C; c++) {
            for (size_t r = block.o0; far && r < block.o1; r++) {
                size_t at = (r * C + c) * s.inner; /* the row's place in x */
                NAME(prefetch_far)(x, at, at + s.inner, n);
            }
            NAME(tile_stats_normalizing)(&partial[c], x + c * s.inner, s, block, about[c],
                                         NULL, NULL);
        }
    }
}

/* planar, short rows: stats[C] by fixed groups of rows in memory order,
 * merged in order; less shift[C] (relative means), or about each feature's
 * first value (absolute means) when shift is NULL */
static void NAME(planar_stats_in_order)(bn_partial *stats, double *work, const T *x,
                                        const double *shift, bn_shape s)
{
    size_t C = s.channels, groups = bn_planar_groups(s), rows = bn_planar_group_rows(s);
    bn_work parts = bn_work_parts(work, s);
    double *about = parts.wide;                        /* [C] */
    bn_partial *partials = (bn_partial *)parts.groups; /* [groups][C] */
    for (size_t c = 0; c < C; c++) {
        about[c] = shift ? shift[c] : NAME(first_value)(x, s, c);
    }
    int team = bn_team(s), far = bn_stats_far_ahead(s, sizeof(T));
    BN_PARALLEL_FOR
    for (size_t g = 0; g < groups; g++) {
        size_t o0 = g * rows, o1 = o0 + rows < s.outer ? o0 + rows : s.outer;
        NAME(planar_group_stats)(partials + g * C, x, about, s, o0, o1, far);
    }
    bn_merge_groups(stats, partials, groups, C, shift ? NULL : about);
}

static void NAME(bn_stats)(bn_partial *stats, double *work, const T *x, const double *shift,
                           bn_shape s)
{
    if (s.channels == 0) { /* no features: nothing to compute */
        return;
    }
    /* stats[C]; x[outer][C][inner]; shift[C] or NULL */
    if (bn_lane_reductions(s)) {
        NAME(interleaved_stats)(stats, work, x, shift, s);
        return;
    }
    if (bn_planar_groups(s) > 0) {
        NAME(planar_stats_in_order)(stats, work, x, shift, s);
        return;
    }
    int team = bn_team(s);
    BN_PARALLEL_FOR
    for (size_t c = 0; c < s.channels; c++) {
        NAME(planar_stats_feature)(stats, x, shift, s, c);
    }
}

static void NAME(bn_forward)(T *y, double *work, const T *x, const double *mean,
                             const double *invstd, const T *gamma, const T *beta, bn_shape s)
{
    if (s.channels == 0) { /* no features: nothing to compute */
        return;
    }
    /* y, x [outer][C][inner]; mean, invstd, gamma, beta [C] */
    size_t C = s.channels;
    int team = bn_team(s);
    if (!bn_wide_passes(s)) {
        bn_work parts = bn_work_parts(work, s);
        double *scale = parts.wide, *shift = parts.wide + parts.stride;
        NAME(affine_coefficients)(scale, shift, invstd, gamma, beta, C, 1, C);
        size_t rows = s.outer * C, chunk = bn_rows_per_chunk(s.inner);
        size_t chunks = (rows + chunk - 1) / chunk;
        int far = bn_far_ahead(s, sizeof(T));
        BN_PARALLEL_FOR
        for (size_t k = 0; k < chunks; k++) {
            size_t r0 = k * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
            NAME(planar_forward_rows)(y, x, mean, scale, shift, s, r0, r1, far);
        }
        return;
    }
    /* interleaved, or short planar rows spread over wide rows (bn_spreads) */
    size_t W = bn_wide_width(s), R = bn_wide_len(s), n = s.outer * W;
    size_t span = bn_rows_per_chunk(R) * R;
    bn_work parts = bn_work_parts(work, s);
    double *mean_wide = parts.wide, *scale = mean_wide + parts.stride;
    double *shift = scale + parts.stride;
    bn_spread_copy(mean_wide, mean, s);
    NAME(affine_coefficients)(scale, shift, invstd, gamma, beta, C, s.inner, R);
    size_t spans = (n + span - 1) / span;
    int far = bn_far_ahead(s, sizeof(T));
    double *tables[] = {mean_wide, scale, shift};
    size_t head = NAME(streamed_lanes_head)(y, x, R, n, tables, 3);
    bn_lane_coefficients lanes = {mean_wide, scale, shift, NULL, NULL, BN_ROW_NORMALIZE};
    BN_PARALLEL_FOR
    for (size_t k = 0; k < spans; k++) {
        size_t i0 = k * span, i1 = i0 + span < n ? i0 + span : n;
        if (head < R) {
            NAME(interleaved_streamed_span)(y, x, NULL, &lanes, R, head, i0, i1, n, far);
        }
        else {
            NAME(interleaved_forward_span)(y, x, mean_wide, scale, shift, R, i0, i1, n, far);
        }
    }
    if (head < R) {
        bn_stream_fence();
    }
}

static void NAME(bn_forward_train)(T *y, bn_partial *stats, double *mean, double *invstd,
                                   double *work, const T *x, const T *gamma, const T *beta,
                                   double eps, bn_shape s)
{
    if (s.channels == 0) { /* no features: nothing to compute */
        return;
    }
    /* y, x [outer][C][inner]; stats, mean, invstd, gamma, beta [C] */
    if (s.inner != 1 && bn_planar_groups(s) == 0) {
        /* one contiguous range of features per thread, for the pipeline */
        int team = bn_team(s), stream = bn_stream_y(y, x, s, sizeof(T));
        size_t parts = (size_t)team;
        BN_PARALLEL_FOR
        for (size_t p = 0; p < parts; p++) {
            NAME(planar_forward_train_range)(y, stats, mean, invstd, x, gamma, beta, eps, s,
                                             stream, s.channels * p / parts,
                                             s.channels * (p + 1) / parts);
        }
        return;
    }
    /* interleaved, or short planar rows: statistics, then normalization, both
       in memory order */
    NAME(bn_stats)(stats, work, x, NULL, s);
    bn_batch_moments(mean, invstd, stats, s.channels, eps);
    NAME(bn_forward)(y, work, x, mean, invstd, gamma, beta, s);
}

/* interleaved (or short planar rows spread, bn_spread_sums): dbeta <- sum dy,
 * dgamma <- sum dy * xhat by fixed row groups, added up in order. Leaves the
 * means spread over a wide row in the workspace's first wide vector. */
static void NAME(interleaved_grad_sums)(double *dgamma, double *dbeta, double *work, const T *dy,
                                        const T *x, const double *mean, const double *invstd,
                                        bn_shape s)
{
    size_t C = s.channels, groups = bn_row_groups(s);
    bn_shape wide = bn_wide_shape(s); /* spread short planar rows: rows of C * inner */
    size_t R = bn_wide_len(s);
    bn_work parts = bn_work_parts(work, s);
    double *mean_wide = parts.wide;
    double *sums = parts.groups; /* [groups][2C] */
    size_t lanes_per_group = BN_LANE_VECTORS * parts.stride;
    bn_spread_copy(mean_wide, mean, s);
    int team = bn_team(s), far = bn_far_ahead(s, sizeof(T));
    size_t blocks = bn_lane_blocks(R, groups, team), tasks = groups * blocks;
    BN_PARALLEL_FOR
    for (size_t k = 0; k < tasks; k++) {
        GROUP_ROWS(k / blocks, s, o0, o1);
        bn_lane_range b = bn_lane_block(R, blocks, k % blocks);
        NAME(interleaved_lane_grads)(parts.lanes + (k / blocks) * lanes_per_group, parts.stride,
                                     dy, x, mean_wide, wide, o0, o1, b.l0, b.l1, far);
    }
    for (size_t g = 0; g < groups; g++) {
        bn_lane_grads(sums + 2 * g * C, parts.lanes + g * lanes_per_group, parts.stride, s);
    }
    bn_add_group_grads(dgamma, dbeta, sums, groups, C, invstd);
}

/* interleaved, or short planar rows spread (bn_spreads): dx from the sums
 * over `count` values; the workspace's first wide vector holds the means,
 * spread (interleaved_grad_sums leaves them there) */
static void NAME(interleaved_dx)(T *dx, double *work, const T *dy, const T *x,
                                 const double *invstd, const T *gamma, const double *dgamma,
                                 const double *dbeta, double count, bn_shape s, int training)
{
    size_t C = s.channels, W = bn_wide_width(s), R = bn_wide_len(s);
    bn_work parts = bn_work_parts(work, s);
    double *mean_wide = parts.wide, *scale = mean_wide + parts.stride;
    double *mean_dy = scale + parts.stride, *dev_coef = mean_dy + parts.stride;
    for (size_t c = 0; c < C; c++) {
        scale[c] = invstd[c] * (gamma ? (double)gamma[c] : 1.0);
        mean_dy[c] = dbeta[c] / count;
        dev_coef[c] = dgamma[c] * invstd[c] / count;
    }
    bn_spread(scale, C, s.inner, R);
    bn_spread(mean_dy, C, s.inner, R);
    bn_spread(dev_coef, C, s.inner, R);
    size_t total = s.outer * W, span = bn_rows_per_chunk(R) * R;
    size_t spans = (total + span - 1) / span;
    int team = bn_team(s), far = bn_far_ahead(s, sizeof(T));
    double *tables[] = {mean_wide, scale, mean_dy, dev_coef};
    size_t head = NAME(streamed_lanes_head)(dx, dy, R, total, tables, 4);
    bn_lane_coefficients lanes = {mean_wide, scale, NULL, mean_dy, dev_coef, bn_dx_op(training)};
    BN_PARALLEL_FOR
    for (size_t k = 0; k < spans; k++) {
        size_t i0 = k * span, i1 = i0 + span < total ? i0 + span : total;
        if (head < R) {
            NAME(interleaved_streamed_span)(dx, dy, x, &lanes, R, head, i0, i1, total, far);
        }
        else {
            NAME(interleaved_dx_span)(dx, dy, x, mean_wide, scale, mean_dy, dev_coef, training,
                                      R, i0, i1, total, far);
        }
    }
    if (head < R) {
        bn_stream_fence();
    }
}

/* planar, short rows: sums[2C] <- sum dy and sum dy * (x - mean) of rows
 * o0 .. o1, walking memory in blocks of bn_short_tile_rows rows (those rows
 * of every feature, then the next block's): a feature's short rows lie far
 * apart, and reading them feature by feature would jump through memory. A
 * block's rows of a feature share 16 lanes, added up once. dy and x asked for
 * far ahead when `far`. */
static void NAME(planar_group_grads)(double *sums, const T *dy, const T *x,
                                     const double *mean, bn_shape s, size_t o0,
                                     size_t o1, int far)
{
    size_t C = s.channels, n = s.outer * C * s.inner, rows = bn_short_tile_rows(s);
    for (size_t c = 0; c < 2 * C; c++) {
        sums[c] = 0.0;
    }
    for (size_t b0 = o0; b0 < o1; b0 += rows) {
        size_t b1 = b0 + rows < o1 ? b0 + rows : o1;
        for (size_t c = 0; c < C; c++) {
            bn_lanes a = {0}, a2 = {0};
            double tail = 0.0, tail2 = 0.0;
            for (size_t o = b0; o < b1; o++) {
                size_t at = (o * C + c) * s.inner; /* the row's place in dy and x */
                if (far) {
                    NAME(prefetch_far)(dy, at, at + s.inner, n);
                    NAME(prefetch_far)(x, at, at + s.inner, n);
                }
                NAME(row_grad_lanes_writing_dx)(&a, &a2, &tail, &tail2, dy + at, x + at,
                                                mean[c], s.inner, NULL, NULL, NULL);
            }
            sums[c] += bn_lanes_total(&a) + tail;
            sums[C + c] += bn_lanes_total(&a2) + tail2;
        }
    }
}

/* planar, short rows: dbeta, dgamma by fixed groups of rows, added in order */
static void NAME(planar_grad_sums_in_order)(double *dgamma, double *dbeta, double *work,
                                            const T *dy, const T *x, const double *mean,
                                            const double *invstd, bn_shape s)
{
    size_t C = s.channels, groups = bn_planar_groups(s), rows = bn_planar_group_rows(s);
    double *sums = bn_work_parts(work, s).groups; /* [groups][2C] */
    int team = bn_team(s), far = bn_far_ahead(s, sizeof(T));
    BN_PARALLEL_FOR
    for (size_t g = 0; g < groups; g++) {
        size_t o0 = g * rows, o1 = o0 + rows < s.outer ? o0 + rows : s.outer;
        NAME(planar_group_grads)(sums + 2 * g * C, dy, x, mean, s, o0, o1, far);
    }
    bn_add_group_grads(dgamma, dbeta, sums, groups, C, invstd);
}

static void NAME(bn_backward_dx)(T *dx, double *work, const T *dy, const T *x,
                                 const double *mean, const double *invstd, const T *gamma,
                                 const double *dgamma, const double *dbeta, double count,
                                 bn_shape s, int training);

static void NAME(bn_backward)(T *dx, double *dgamma, double *dbeta, double *work, const T *dy,
                              const T *x, const double *mean, const double *invstd, const T *gamma,
                              bn_shape s, int training)
{
    if (s.channels == 0) { /* no features: nothing to compute */
        return;
    }
    /* dx, dy, x [outer][C][inner]; dgamma, dbeta, mean, invstd, gamma [C] */
    if (bn_lane_reductions(s)) {
        NAME(interleaved_grad_sums)(dgamma, dbeta, work, dy, x, mean, invstd, s);
        NAME(interleaved_dx)(dx, work, dy, x, invstd, gamma, dgamma, dbeta,
                             (double)bn_count(s), s, training);
        return;
    }
    if (bn_planar_groups(s) > 0) { /* short rows: two passes in memory order */
        NAME(planar_grad_sums_in_order)(dgamma, dbeta, work, dy, x, mean, invstd, s);
        NAME(bn_backward_dx)(dx, work, dy, x, mean, invstd, gamma, dgamma, dbeta,
                             (double)bn_count(s), s, training);
        return;
    }
    /* planar: one contiguous range of features per thread, for the pipeline */
    int team = bn_team(s), stream = bn_stream_output(dx, dy, bn_count(s) * s.channels * sizeof(T));
    size_t parts = (size_t)team;
    BN_PARALLEL_FOR
    for (size_t p = 0; p < parts; p++) {
        NAME(planar_backward_range)(dx, dgamma, dbeta, dy, x, mean, invstd, gamma, s, training,
                                    stream, s.channels * p / parts,
                                    s.channels * (p + 1) / parts);
    }
}

/* planar: the two sums of feature c */
static void NAME(planar_grad_sums_feature)(double *dgamma, double *dbeta,
                                           const T *dy, const T *x,
                                           const double *mean, const double *invstd,
                                           bn_shape s, size_t c)
{
    double sum_dy = 0.0, sum_dy_dev = 0.0;
    bn_rows_ahead walk, *ahead = NAME(rows_ahead_from_memory)(&walk, x, dy, s, c, c + 1);
    for (size_t o = 0; o < s.outer; o++) {
        NAME(row_grad_sums)(&sum_dy, &sum_dy_dev, ROW(dy, o, c, s), ROW(x, o, c, s), s.inner,
                            mean[c], ahead);
    }
    dbeta[c] = sum_dy;
    dgamma[c] = sum_dy_dev * invstd[c];
}

/* planar: dx of rows r0 .. r1 (of the outer * C rows) from per-feature
 * coefficients; dy (and x) asked for far ahead when `far`, or as the rows go
 * (bn_ask_ahead); dx streamed when large (bn_stream_output) */
static void NAME(planar_dx_rows)(T *dx, const T *dy, const T *x,
                                 const bn_row_coefficients *k, bn_shape s,
                                 int training, size_t r0, size_t r1, int far)
{
    size_t n = s.outer * s.channels * s.inner;
    int ahead = bn_ask_ahead(s, sizeof(T)), stream = bn_stream_output(dx, dy, n * sizeof(T));
    for (size_t r = r0; r < r1; r++) {
        if (far) {
            NAME(prefetch_far)(dy, r * s.inner, (r + 1) * s.inner, n);
        }
        if (far && training) {
            NAME(prefetch_far)(x, r * s.inner, (r + 1) * s.inner, n);
        }
        NAME(bn_out_row) row = NAME(out_row_of)(dx + r * s.inner, dy + r * s.inner,
                                                x + r * s.inner, s.inner, &k[r % s.channels],
                                                bn_dx_op(training), stream);
        NAME(out_row_asking)(&row, ahead, n - r * s.inner);
    }
    if (stream) {
        bn_stream_fence();
    }
}

static void NAME(bn_grad_sums)(double *dgamma, double *dbeta, double *work, const T *dy, const T *x,
                               const double *mean, const double *invstd, bn_shape s)
{
    if (s.channels == 0) { /* no features: nothing to compute */
        return;
    }
    if (bn_lane_reductions(s)) {
        NAME(interleaved_grad_sums)(dgamma, dbeta, work, dy, x, mean, invstd, s);
        return;
    }
    if (bn_planar_groups(s) > 0) {
        NAME(planar_grad_sums_in_order)(dgamma, dbeta, work, dy, x, mean, invstd, s);
        return;
    }
    int team = bn_team(s);
    BN_PARALLEL_FOR
    for (size_t c = 0; c < s.channels; c++) {
        NAME(planar_grad_sums_feature)(dgamma, dbeta, dy, x, mean, invstd, s, c);
    }
}

static void NAME(bn_backward_dx)(T *dx, double *work, const T *dy, const T *x, const double *mean,
                                 const double *invstd, const T *gamma, const double *dgamma,
                                 const double *dbeta, double count, bn_shape s, int training)
{
    if (s.channels == 0) { /* no features: nothing to compute */
        return;
    }
    size_t C = s.channels;
    if (bn_wide_passes(s)) {
        bn_spread_copy(bn_work_parts(work, s).wide, mean, s);
        NAME(interleaved_dx)(dx, work, dy, x, invstd, gamma, dgamma, dbeta, count, s, training);
        return;
    }
    /* the coefficients as bn_row_coefficients[C], in the 4 wide vectors */
    bn_row_coefficients *k = (bn_row_coefficients *)bn_work_parts(work, s).wide;
    for (size_t c = 0; c < C; c++) {
        k[c] = NAME(dx_row_coefficients)(mean, invstd, gamma, dgamma[c], dbeta[c], count,
                                         training, c);
    }
    size_t rows = s.outer * C, chunk = bn_rows_per_chunk(s.inner);
    size_t chunks = (rows + chunk - 1) / chunk;
    int team = bn_team(s), far = bn_far_ahead(s, sizeof(T));
    BN_PARALLEL_FOR
    for (size_t j = 0; j < chunks; j++) {
        size_t r0 = j * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
        NAME(planar_dx_rows)(dx, dy, x, k, s, training, r0, r1, far);
    }
}

#undef GROUP_ROWS

#undef ROW
#undef TILE_ROW
