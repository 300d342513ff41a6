/* bn_kernels_internal.h -- what bn_kernels.c and the instruction-set
 * builds of the kernels (bn_kernels_isa.h) share: sizes, the shape helpers,
 * the table of hot kernels one build provides.
 *
 * Not part of the kernels' interface: bn_kernels.h is.
 */
#ifndef BNPY_BN_KERNELS_INTERNAL_H
#define BNPY_BN_KERNELS_INTERNAL_H

#include "bn_kernels.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if !defined(__GNUC__)
#error "bnpy's kernels need the GCC or Clang vector extensions"
#endif

#ifdef _OPENMP
#include <omp.h>
/* the loop that follows runs on `team` threads (a local int) when team > 1 */
#define BN_PARALLEL_FOR _Pragma("omp parallel for schedule(static) num_threads(team) if(team > 1)")
#else
#define BN_PARALLEL_FOR (void)team;
#endif

/* Helpers of the hot loops: always inlined, so that each instruction-set
 * build compiles them for its own registers. */
#define BN_INLINE static inline __attribute__((always_inline))

enum {
    BN_LANES = 16,           /* independent accumulators of a row sum (bn_lanes) */
    BN_GROUP_ROWS = 4096,    /* interleaved rows per reduction task: fixed by the shape */
    BN_CENTER_ROWS = 16,     /* interleaved: wide rows of a group's first statistics block */
    BN_LANE_BLOCK_ROWS = 256, /* ... and the most of any later one (bn_next_lane_block) */
    BN_LANE_VECTORS = 5,     /* lane vectors a row group's reductions use (bn_lane_stats) */
    BN_LANE_BLOCK_MIN = 256, /* interleaved: the fewest lanes a reduction task takes */
    BN_SHORT_ROW = 320,      /* planar rows shorter than this: passes in memory order
                                (measured: the backward of rows of 49 values 1.7x faster
                                so, of 196 values as fast at 1 thread and 1.4x faster at
                                2; rows of 400 and 784 are faster pipelined feature by
                                feature) */
    BN_GROUP_VALUES = 1 << 18, /* values per planar reduction task in memory order (a
                                  task's first row of each feature takes an extra pass:
                                  with 1 << 16, 14x14 and 7x7 training forwards ran
                                  1.25-1.55x slower) */
    BN_TILE = 2048,          /* elements of a planar tile: small enough for L1 */
    BN_SHORT_TILE = 256,     /* values of a short-row statistics tile (bn_short_tile_rows) */
    BN_SPREAD_ROW = 128,     /* planar rows shorter than this spread over wide rows ... */
    BN_SPREAD_VALUES = 16384, /* ... when a row of every feature is no longer (bn_spreads) */
    BN_SPREAD_SUMS_ROW = 32, /* ... and the reductions, rows shorter than this */
    BN_CHUNK = 16384,        /* elements an elementwise pass hands a thread at a time */
    BN_PARALLEL_MIN = 65536, /* fewer elements than this run on one thread */
    BN_AHEAD_BYTES = 512,    /* how far ahead in a row a pass asks for rows in cache (and,
                                from memory, a feature's first tile's rough pass) */
    BN_FAR_AHEAD_BYTES = 2048, /* ... and a pass down a stream of short rows (bn_far_ahead) */
    BN_STREAM_AHEAD_BYTES = 8192, /* ... and a pass over long rows from memory: the
                                     pipelined ones (bn_rows_ahead), the elementwise
                                     ones (out_row_ahead) */
    BN_ROWS_AT_ONCE = 4,     /* interleaved statistics and their first block's center:
                                wide rows a pass (each lane's sums loaded and stored
                                once for them). C harness, 1 thread,
                                statistics pass: 256x1024 float32 in cache 0.37 -> 0.29
                                ns a value; from memory, with prefetch_far for each row,
                                401408x3 0.69 -> 0.53 ms, 200704x64 5.6 -> 5.3 ms */
    BN_READBACK_AHEAD_BYTES = 2048, /* how far ahead the pipelined passes ask for what
                                       they read back (readback_walk) ... */
    BN_READBACK_WALK_BYTES = 512 << 10, /* ... across rows, when what they read back
                                           of a feature is this large: it comes
                                           back from L3 */
    BN_IN_CACHE_BYTES = 4 << 20, /* an x this small stays in cache between passes */
    BN_STREAM_BYTES = 16 << 20, /* an output this large is written past the caches */
    BN_STREAM_FEATURE_BYTES = 1 << 20, /* ... in the pipelined training forward on Intel,
                                          if features are this large (bn_stream_y) */
    BN_ALIGN_ROW_BYTES = 256, /* an output row this long starts its vectors on a cache line */
};

/* interleaved layouts: rows per wide row, so that a wide row holds at least
 * 32 values */
static inline size_t bn_fold(size_t channels)
{
    return channels >= 32 || channels == 0 ? 1 : (32 + channels - 1) / channels;
}

/* interleaved rows o0 .. o1 as wide rows: `whole` full ones, then `rest`
 * lanes of a last, partial one */
typedef struct {
    size_t whole, rest;
} bn_wide_rows;

static inline bn_wide_rows bn_wide_rows_of(bn_shape s, size_t o0, size_t o1)
{
    size_t fold = bn_fold(s.channels);
    return (bn_wide_rows){(o1 - o0) / fold, ((o1 - o0) % fold) * s.channels};
}

/* interleaved reductions: the blocks a row group's R lanes are cut into, one
 * task each, so that a team has work for every thread even when the rows make
 * fewer groups than threads. Each lane's sums are the same however the lanes
 * are cut, so the results do not depend on the team. */
static inline size_t bn_lane_blocks(size_t R, size_t groups, int team)
{
    if (groups == 0 || groups >= (size_t)team) {
        return 1;
    }
    size_t want = ((size_t)team + groups - 1) / groups, most = R / BN_LANE_BLOCK_MIN;
    return want < most ? want : most > 0 ? most : 1;
}

typedef struct {
    size_t l0, l1;
} bn_lane_range;

/* lanes l0 .. l1 of block b of `blocks`: whole cache lines of doubles */
static inline bn_lane_range bn_lane_block(size_t R, size_t blocks, size_t b)
{
    size_t width = ((R + blocks - 1) / blocks + 7) / 8 * 8;
    size_t l0 = b * width < R ? b * width : R;
    return (bn_lane_range){l0, l0 + width < R ? l0 + width : R};
}

/* wide[C .. R) <- repeats of wide[0 .. C), for R a multiple of C */
static inline void bn_repeat(double *wide, size_t C, size_t R)
{
    for (size_t l = C; l < R; l++) {
        wide[l] = wide[l - C];
    }
}

/* Whether the elementwise passes over short planar rows (inference,
 * normalizing, dx) run as the interleaved ones do: each outer row's C * inner
 * values a wide row whose lane l has feature (l % (C * inner)) / inner, its
 * coefficients spread so (bn_spread). Row by row, a row of fewer than 16
 * values had no vector at all, and one of 49 had a scalar tail. Only while
 * four wide rows of coefficients (512 KB) stay in L2 beside the data: with
 * 128x1800x3x3 (16200 lanes) inference went 2.72 -> 1.25 times a copy and the
 * backward 6.12 -> 3.54, 128x640x5x5's backward lost a little (3.20 -> 3.45),
 * and 128x512x7x7 (25088 lanes) lost everywhere (inference 0.85 -> 1.21). The
 * values are the same either way. Measured (compare_builds, float32, 1
 * thread, times a copy): inference of 256x512x3x3 3.45 -> 1.28, 256x512x2x2
 * 7.47 -> 1.15, 1024x64x5x5 2.11 -> 1.19, 128x128x7x7 1.28 -> 1.11, dx
 * and the training forward's normalizing alike; 32x64x10x10 gained a little
 * (1.33 -> 1.26), and rows of 196 values lost (0.92 -> 1.20). */
static inline int bn_spreads(bn_shape s)
{
    return s.inner > 1 && s.inner < BN_SPREAD_ROW && s.channels * s.inner <= BN_SPREAD_VALUES;
}

/* the values of a wide row's pattern: the features (interleaved), or a row
 * of each feature when spread */
static inline size_t bn_wide_width(bn_shape s)
{
    return bn_spreads(s) ? s.channels * s.inner : s.channels;
}

/* the values of a wide row, R: its pattern folded to at least 32 values */
static inline size_t bn_wide_len(bn_shape s)
{
    size_t width = bn_wide_width(s);
    return bn_fold(width) * width;
}

/* wide[0 .. R) <- the per-feature values wide[0 .. C), spread: lane l holds
 * that of feature (l % (C * inner)) / inner (inner == 1: bn_repeat) */
static inline void bn_spread(double *wide, size_t C, size_t inner, size_t R)
{
    /* inner == 1: each value is in its place already. Copying each onto
       itself, the three spreads of an inference of 16x1024 float32 took 13
       of its 23 us (C harness, median of 400 calls: 22.9 -> 9.5 us). */
    if (inner > 1) {
        for (size_t c = C; c-- > 0;) { /* back to front: no wide[c] is overwritten before it is read */
            for (size_t i = inner; i-- > 0;) {
                wide[c * inner + i] = wide[c];
            }
        }
    }
    bn_repeat(wide, C * inner, R);
}

/* wide[0 .. R) rotated by head (< 16) lanes: wide[j] <- wide[(j + head) % R]
 * (streamed_lanes_head, for interleaved_streamed) */
static inline void bn_rotate_lanes(double *wide, size_t R, size_t head)
{
    double first[16];
    memcpy(first, wide, head * sizeof *wide);
    memmove(wide, wide + head, (R - head) * sizeof *wide);
    memcpy(wide + R - head, first, head * sizeof *wide);
}

/* wide[0 .. R) <- values[C] spread over a wide row of shape s (bn_wide_len) */
static inline void bn_spread_copy(double *wide, const double *values, bn_shape s)
{
    memcpy(wide, values, s.channels * sizeof *values);
    bn_spread(wide, s.channels, s.inner, bn_wide_len(s));
}

/* the interleaved shape the passes over wide rows see: x[outer][C] itself,
 * or short planar rows spread (bn_spreads) as outer rows of C * inner
 * values */
static inline bn_shape bn_wide_shape(bn_shape s)
{
    return (bn_shape){s.outer, bn_wide_width(s), 1};
}

/* Whether the reductions over short planar rows (statistics and gradient
 * sums) run as the interleaved ones do, over wide rows (bn_spreads): only
 * rows of fewer than BN_SPREAD_SUMS_ROW values, which have at most one vector
 * and a scalar tail that adds one value at a time. Measured (compare_builds,
 * float32, 1 thread, times a copy, two runs each): backward of 256x512x3x3
 * 4.79 -> 3.25 and 6.81 -> 3.64, 1024x64x5x5 4.26 -> 3.27 and 4.55 -> 3.52
 * (128x128x7x7 lost, 2.36 -> 2.81, and keeps the blocks); training forward,
 * once the statistics blocks kept their precision, of 256x512x3x3 6.55 ->
 * 2.12 and 6.49 -> 2.14, 256x512x2x2 7.22 -> 1.84, 1024x64x5x5 3.08 -> 1.98,
 * 128x256x4x4 2.40 -> 2.01. */
static inline int bn_spread_sums(bn_shape s)
{
    return bn_spreads(s) && s.inner < BN_SPREAD_SUMS_ROW;
}

/* Whether the passes run over wide rows (bn_wide_shape): the elementwise
 * ones of interleaved layouts and of spread short rows (bn_spreads) ... */
static inline int bn_wide_passes(bn_shape s)
{
    return s.inner == 1 || bn_spreads(s);
}

/* ... and the reductions, lane by lane (bn_spread_sums) */
static inline int bn_lane_reductions(bn_shape s)
{
    return s.inner == 1 || bn_spread_sums(s);
}

/* reductions over lanes: the number of BN_GROUP_ROWS groups of rows */
static inline size_t bn_row_groups(bn_shape s)
{
    return bn_lane_reductions(s) ? (s.outer + BN_GROUP_ROWS - 1) / BN_GROUP_ROWS : 0;
}

/* planar layouts with short rows: outer rows per reduction task in memory
 * order, and the number of such groups (fixed by the shape) */
static inline size_t bn_planar_group_rows(bn_shape s)
{
    size_t row_values = s.channels * s.inner;
    return row_values >= BN_GROUP_VALUES || row_values == 0 ? 1
                                                            : BN_GROUP_VALUES / row_values;
}

static inline size_t bn_planar_groups(bn_shape s)
{
    if (s.inner <= 1 || s.inner >= BN_SHORT_ROW) {
        return 0;
    }
    size_t rows = bn_planar_group_rows(s);
    return (s.outer + rows - 1) / rows;
}

/* row groups of a reduction in memory order (interleaved or short planar rows) */
static inline size_t bn_reduction_groups(bn_shape s)
{
    return bn_row_groups(s) + bn_planar_groups(s);
}

/* n doubles rounded up to whole 64-byte cache lines */
static inline size_t bn_whole_lines(size_t n)
{
    return (n + 7) / 8 * 8;
}

/* The parts of a kernel's workspace (bn_workspace_size doubles), each on a
 * cache line of its own, so that vectors of doubles in them never straddle
 * two lines (a workspace only 16-byte aligned made the interleaved passes
 * about 30% slower):
 *   wide    4 vectors of `stride` (>= R) doubles: coefficients over a wide
 *           row, or bn_row_coefficients[C]
 *   groups  per reduction row group: C partials (3 doubles each) or 2C sums
 *   lanes   per interleaved row group: BN_LANE_VECTORS vectors of `stride`
 *           lanes
 * The parts depend only on `work` and the shape: two calls that share a
 * workspace (bn_grad_sums, then bn_backward_dx) find the same parts. */
typedef struct {
    double *wide, *groups, *lanes;
    size_t stride;
} bn_work;

/* the length of a wide or lane vector: a wide row (R doubles) in whole lines */
static inline size_t bn_work_stride(bn_shape s)
{
    return bn_whole_lines(bn_wide_len(s));
}

static inline bn_work bn_work_parts(double *work, bn_shape s)
{
    size_t stride = bn_work_stride(s);
    double *wide = (double *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    double *groups = wide + 4 * stride;
    double *lanes = groups + bn_whole_lines(3 * s.channels * bn_reduction_groups(s));
    return (bn_work){wide, groups, lanes, stride};
}

/* A tile of a planar feature: rows o0 .. o1, columns i0 .. i1 of each */
typedef struct {
    size_t o0, o1, i0, i1;
} bn_tile;

/* planar layouts: the tiles of a feature. A row of BN_TILE values or more is
 * cut into pieces of BN_TILE; shorter rows go BN_TILE / inner to a tile. */
static inline size_t bn_tiles(bn_shape s)
{
    if (bn_count(s) == 0) {
        return 0;
    }
    if (s.inner >= BN_TILE) {
        return s.outer * ((s.inner + BN_TILE - 1) / BN_TILE);
    }
    size_t rows = BN_TILE / s.inner;
    return (s.outer + rows - 1) / rows;
}

static inline bn_tile bn_tile_at(bn_shape s, size_t k)
{
    if (s.inner >= BN_TILE) {
        size_t pieces = (s.inner + BN_TILE - 1) / BN_TILE, i0 = (k % pieces) * BN_TILE;
        return (bn_tile){k / pieces, k / pieces + 1, i0,
                         i0 + BN_TILE < s.inner ? i0 + BN_TILE : s.inner};
    }
    size_t rows = BN_TILE / s.inner, o0 = k * rows;
    return (bn_tile){o0, o0 + rows < s.outer ? o0 + rows : s.outer, 0, s.inner};
}

/* short planar rows: the rows of one feature a statistics tile takes, while
 * the pass walks memory in blocks of that many rows. Every tile pays a
 * center, two 16-lane totals and a merge; a row of 49 values a tile spent
 * more on those than on its values. Measured (C harness, float32, 1 thread,
 * statistics pass, times a copy; a plain read of x is 0.55): 256x512x7x7
 * 1.67 -> 1.02-1.10 (5 rows a tile; 2-6 rows did about as well), 1024x256x4x4
 * 3.44 -> 1.37 (now spread instead: bn_spread_sums), 512x256x10x10 0.83 ->
 * 0.68; rows of 196 values lost with more than one (0.75 -> 0.82-0.89): each
 * row a tile streams from its own place. The gradient sums walk the same
 * blocks, a block's rows of a feature sharing 16 lanes: 256x512x7x7 1.46 ->
 * 1.27-1.36; compare_builds, backward of 128x512x7x7, 2.21 -> 2.04. */
static inline size_t bn_short_tile_rows(bn_shape s)
{
    return s.inner >= BN_SHORT_TILE || s.inner == 0 ? 1 : BN_SHORT_TILE / s.inner;
}

/* What a row of an elementwise pass writes, from its input `in` (and x):
 *   BN_ROW_NORMALIZE  y = (x - mean) * scale + beta         (in = x)
 *   BN_ROW_DX_EVAL    dx = dy * scale                        (in = dy)
 *   BN_ROW_DX_TRAIN   dx = scale * (dy - mean_dy - (x - mean) * dev_coef)
 * with one feature's coefficients (bn_row_coefficients). */
typedef enum { BN_ROW_NORMALIZE, BN_ROW_DX_EVAL, BN_ROW_DX_TRAIN } bn_row_op;

/* beta and mean_dy share a place: no row needs both, and the backward keeps
 * C of these in the workspace's 4 wide vectors */
typedef struct {
    double mean, scale;
    union {
        double beta, mean_dy;
    };
    double dev_coef;
} bn_row_coefficients;

/* The per-lane coefficients of an interleaved elementwise pass: op's
 * (bn_row_op) formulas, lane l taking mean[l], scale[l], and shift[l] (to
 * normalize) or mean_dy[l] and dev_coef[l] (dx in training) */
typedef struct {
    const double *mean, *scale, *shift, *mean_dy, *dev_coef;
    bn_row_op op;
} bn_lane_coefficients;

static inline bn_row_op bn_dx_op(int training)
{
    return training ? BN_ROW_DX_TRAIN : BN_ROW_DX_EVAL;
}

/* threads for a call on shape s: one for small inputs */
static inline int bn_team(bn_shape s)
{
    return bn_count(s) * s.channels >= BN_PARALLEL_MIN ? bn_get_num_threads() : 1;
}

/* whether the CPU is AMD's: some choices below differ between the memory
 * systems of AMD and Intel (bn_kernels.c; 0 where the x86 builds are not
 * compiled, i.e. compilers other than GCC) */
int bn_cpu_is_amd(void);

/* Whether an output (`bytes` long) is written past the caches: only when it
 * is large, so that its lines would leave the caches before anyone reads
 * them, and not over its input `in` (in place, those lines are in cache
 * already). Measured (C harness, 64x64x56x56 float32, 1 thread): backward
 * 2.07 -> 1.93 times a copy. */
static inline int bn_stream_output(const void *out, const void *in, size_t bytes)
{
    return out != in && bytes >= BN_STREAM_BYTES;
}

/* Whether the planar training forward streams y. On Intel (the Xeon CI ran
 * on before), only for features of BN_STREAM_FEATURE_BYTES or more, where the
 * feature being normalized and the next one no longer fit in L2 together, and
 * y's lines in cache would push out the rows the pipeline reads again; with
 * smaller features streaming cost more than it saved. Measured (C harness,
 * float32, 1 thread, medians of 9): 128x64x56x56 1.30 -> 1.23 times a copy;
 * 32x256x28x28, were it streamed, 1.12 -> 1.36. On AMD (bn_cpu_is_amd), for
 * features of any size: there the ordinary stores' reads of y's lines cost
 * more than streaming saves them (the Xeon, by the numbers above, got
 * those reads cheaper). Measured on the EPYC (Zen 5) CI runs on now
 * (ab_kernels, AVX-512, float32, 1 thread, 15 calls each): 64x64x56x56 1.69 ->
 * 1.11, 32x256x28x28 2.62 -> 1.59, 8x64x112x112 2.07 -> 1.37 times a copy.
 * (The training forward of short rows, statistics then bn_forward, streams
 * as inference does: bn_stream_output.) */
static inline int bn_stream_y(const void *y, const void *x, bn_shape s, size_t elem_size)
{
    size_t feature_bytes = bn_count(s) * elem_size;
    return bn_stream_output(y, x, feature_bytes * s.channels)
           && (feature_bytes >= BN_STREAM_FEATURE_BYTES || bn_cpu_is_amd());
}

/* Whether x (and the arrays of its shape) is small enough to stay in cache
 * from one pass to the next */
static inline int bn_in_cache(bn_shape s, size_t elem_size)
{
    return bn_count(s) * s.channels * elem_size <= BN_IN_CACHE_BYTES;
}

/* Whether the passes that walk memory in order through short rows (inner
 * == 1, or planar rows shorter than BN_SHORT_ROW) ask for their data
 * BN_FAR_AHEAD_BYTES ahead (prefetch_far): only when it comes from memory.
 * Their rows follow one another, a single stream that the hardware
 * prefetcher alone did not keep ahead of. C harness, float32, 1 thread,
 * medians of 5-8 runs, times a copy, on the Xeon CI ran on before:
 *   200704x64 (channels-last 64x56x56x64): statistics 0.77 -> 0.53 (a plain
 *     read of x is 0.51), gradient sums 1.17 -> 0.87, normalizing 1.05 ->
 *     0.97, dx 1.52 -> 1.28; 4 KB ahead gained less;
 *   256x512x7x7: gradient sums 1.22 -> 0.92, normalizing 1.09 -> 0.91, dx
 *     1.48 -> 1.27 (and at 2 threads too); its statistics (then a tile a row)
 *     did not gain, nor did 64x256x14x14's; rows of 3136 values lost 5-10%
 *     (they ask as they go instead: bn_ask_ahead; the statistics of short
 *     rows on the EPYC: bn_stats_far_ahead).
 * In cache the requests only cost: 256x1024's gradient sums took 1.4 times
 * as long. */
static inline int bn_far_ahead(bn_shape s, size_t elem_size)
{
    return s.inner < BN_SHORT_ROW && !bn_in_cache(s, elem_size);
}

/* Whether the statistics of planar short rows (planar_group_stats) ask far
 * ahead too: where a block (bn_short_tile_rows) holds several rows of each
 * feature, and so walks several streams at once, one along each of its rows.
 * On the EPYC (Zen 5) CI runs on now, the training forward (ab_kernels,
 * medians of 15 calls, 1 thread, times a copy) of 128x2048x7x7 went 4.7 ->
 * 3.2 (float32 AVX-512), 4.4 -> 3.3 (AVX2), 2.0 -> 1.9 (float64); 256x512x7x7
 * 3.3 -> 2.6; 128x512x10x10 3.5 -> 2.3 (float64 AVX2 2.1 -> 1.7). Blocks of
 * one row (rows of 196 values: a single stream) gained nothing, and do not
 * ask. */
static inline int bn_stats_far_ahead(bn_shape s, size_t elem_size)
{
    return bn_far_ahead(s, elem_size) && bn_short_tile_rows(s) > 1;
}

/* Whether the planar elementwise passes (inference, dx) ask for the inputs of
 * rows of BN_SHORT_ROW or more BN_STREAM_AHEAD_BYTES ahead as they go, across
 * the ends of rows (out_row_ahead): only when these come from memory. */
static inline int bn_ask_ahead(bn_shape s, size_t elem_size)
{
    return s.inner >= BN_SHORT_ROW && !bn_in_cache(s, elem_size);
}

/* ---- a pipelined pass's rows, asked for ahead -----------------------------
 * The pipelined passes (the training forward's statistics, the backward's
 * two sums) read feature after feature from memory, each feature row by row:
 * rows of inner values, C * inner apart. The hardware prefetcher starts
 * every row anew, and a request only BN_AHEAD_BYTES ahead within the row
 * keeps too few lines in flight for a machine whose one core reads 37 GB/s.
 * A bn_rows_ahead walks the same sequence of rows BN_STREAM_AHEAD_BYTES in
 * front of the reader (BN_READBACK_AHEAD_BYTES for what a pass reads back
 * from cache), across the ends of rows and features, and asks for one line
 * each time the reader takes one. Measured on the AMD EPYC (Zen 5)
 * CI runs on, summing 64x64x56x56 float32 feature by feature (a loop of
 * AVX-512 conversions and additions, medians of 15, times a memcpy of x):
 * 1.09 with the hardware prefetcher alone; 512 bytes ahead within each row
 * 1.12-1.21, 4 KB 0.78-0.80; across rows 4 KB 0.68-0.70, 8 KB 0.53-0.55,
 * 12 KB 0.51-0.53, 16 KB 0.66-0.73 (a contiguous read of x: 0.49). */
typedef struct {
    const char *x, *other; /* the arrays asked for: x, and dy or NULL */
    size_t at;       /* the byte (from their starts) the next request is for */
    size_t row_end;  /* the end of the row `at` lies in */
    size_t row;      /* that row's place in its feature */
    size_t features; /* features left after that row's */
    size_t outer, row_bytes, stride;
    int done;        /* past the last row: no more requests */
} bn_rows_ahead;

/* a->at moves `bytes` on along the rows */
static inline void bn_rows_ahead_move(bn_rows_ahead *a, size_t bytes)
{
    a->at += bytes;
    while (!a->done && a->at >= a->row_end) {
        size_t over = a->at - a->row_end, start = a->row_end - a->row_bytes;
        if (a->row + 1 < a->outer) { /* the feature's next row */
            a->row++;
            start += a->stride;
        }
        else if (a->features > 0) { /* the next feature's first row */
            a->features--;
            start = start - a->row * a->stride + a->row_bytes;
            a->row = 0;
        }
        else {
            a->done = 1;
            return;
        }
        a->at = start + over;
        a->row_end = start + a->row_bytes;
    }
}

/* ask for the line at a->at (of x, and of `other` when there is one), then
 * move one line on */
static inline void bn_rows_ahead_ask(bn_rows_ahead *a)
{
    if (!a->done) {
        __builtin_prefetch(a->x + a->at, 0, 3);
        if (a->other != NULL) {
            __builtin_prefetch(a->other + a->at, 0, 3);
        }
    }
    bn_rows_ahead_move(a, 64);
}

/* What a reader asks for while it reads `bytes` of a row: the walk's next
 * `bytes`, which (no more than a row's) lie in at most two rows: the first
 * `split` from byte `first` on, the rest from byte `second` on; a piece
 * past the walk's last row (has_ 0) is not asked for. */
typedef struct {
    size_t first, second, split;
    int has_first, has_second;
} bn_row_asks;

/* the asks for a reader's next `bytes`, the walk moved past them: `bytes` at
 * most a row's (every caller reads a row, or a piece of one, at a time), or
 * the asks would run past the second row */
static inline bn_row_asks bn_rows_ahead_take(bn_rows_ahead *a, size_t bytes)
{
    bn_row_asks r = {a->at, 0, bytes, !a->done, 0};
    if (!a->done && a->row_end - a->at < bytes) {
        r.split = a->row_end - a->at;
        bn_rows_ahead_move(a, r.split); /* to the next row's start */
        r.second = a->at;
        r.has_second = !a->done;
        bytes -= r.split;
    }
    bn_rows_ahead_move(a, bytes);
    return r;
}

/* The asks of a row BN_AHEAD_BYTES ahead within itself (`bytes` long): the
 * lines of the row that far past a reader's, as long as the row has them */
static inline bn_row_asks bn_row_asks_within(size_t bytes)
{
    size_t split = bytes > BN_AHEAD_BYTES ? bytes - BN_AHEAD_BYTES : 0;
    return (bn_row_asks){BN_AHEAD_BYTES, 0, split, 1, 0};
}

/* What a loop asks for ahead of it: the lines of x (and of `other`, when
 * not NULL) at the places r gives, bytes from x's and other's starts */
typedef struct {
    const char *x, *other;
    bn_row_asks r;
} bn_asking;

/* a walk of features c0 .. c1 - 1 of x (and `other`, an array of x's shape;
 * NULL for none), at the first row of c0 */
static inline bn_rows_ahead bn_rows_ahead_at(const void *x, const void *other, bn_shape s,
                                             size_t elem_size, size_t c0, size_t c1)
{
    size_t row_bytes = s.inner * elem_size;
    return (bn_rows_ahead){x, other, c0 * row_bytes, (c0 + 1) * row_bytes, 0,
                           c1 > c0 ? c1 - c0 - 1 : 0, s.outer, row_bytes,
                           s.channels * row_bytes,
                           c0 >= c1 || row_bytes == 0 || s.outer == 0};
}

/* that walk, having asked for the first `ahead` bytes of the rows: to go
 * that far in front of a reader starting at feature c0's first row */
static inline bn_rows_ahead bn_rows_ahead_from(const void *x, const void *other, bn_shape s,
                                               size_t elem_size, size_t c0, size_t c1,
                                               size_t ahead)
{
    bn_rows_ahead a = bn_rows_ahead_at(x, other, s, elem_size, c0, c1);
    for (size_t b = 0; b < ahead && !a.done; b += 64) {
        bn_rows_ahead_ask(&a);
    }
    return a;
}

/* rows of row_len elements an elementwise pass takes at a time */
static inline size_t bn_rows_per_chunk(size_t row_len)
{
    return row_len >= BN_CHUNK ? 1 : BN_CHUNK / (row_len > 0 ? row_len : 1);
}

/* The sum of BN_LANES accumulators in a fixed order: lane j with lane j + 8,
 * then those eight pairwise */
BN_INLINE double bn_lanes_sum(const double lanes[BN_LANES])
{
    double v[8];
    for (int j = 0; j < 8; j++) {
        v[j] = lanes[j] + lanes[j + 8];
    }
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

/* Partial statistics of `count` values from their first-pass mean and the sum
 * of deviations from it and of their squares: sum_dev is count times the
 * rounding error of the mean, so it corrects both (the corrected two-pass
 * algorithm of Chan, Golub and LeVeque). */
BN_INLINE bn_partial bn_corrected(double count, double mean, double sum_dev, double sum_dev2)
{
    double correction = sum_dev / count;
    double m2 = sum_dev2 - sum_dev * correction;
    return (bn_partial){count, mean + correction, m2 < 0.0 ? 0.0 : m2}; /* NaN stays */
}

/* stats[C] <- the partials[groups][C] of row groups merged in order, then
 * made absolute by adding unshift[C] to the means (when not NULL) */
void bn_merge_groups(bn_partial *stats, const bn_partial *partials, size_t groups, size_t C,
                     const double *unshift);

/* The statistics of each lane of a row group of interleaved rows, in vectors
 * of the group's workspace `stride` apart: the mean (less the shift) and m2 of
 * the blocks merged so far, and the block being summed, as deviations from
 * center (sum, and sum2 of their squares). */
typedef struct {
    double *center, *mean, *m2, *sum, *sum2;
} bn_lane_stats;

static inline bn_lane_stats bn_lane_stats_at(double *lanes, size_t stride)
{
    return (bn_lane_stats){lanes, lanes + stride, lanes + 2 * stride, lanes + 3 * stride,
                           lanes + 4 * stride};
}

static inline void bn_lane_stats_clear(bn_lane_stats v, size_t l0, size_t l1)
{
    for (size_t l = l0; l < l1; l++) {
        v.center[l] = v.mean[l] = v.m2[l] = v.sum[l] = v.sum2[l] = 0.0;
    }
}

/* the end of the statistics block of interleaved wide rows that starts at
 * wide row j0 of a group of `whole`: the first BN_CENTER_ROWS rows, then
 * blocks no longer than the rows before them, nor than BN_LANE_BLOCK_ROWS */
static inline size_t bn_next_lane_block(size_t j0, size_t whole)
{
    size_t rows = j0 == 0 ? BN_CENTER_ROWS : j0 < BN_LANE_BLOCK_ROWS ? j0 : BN_LANE_BLOCK_ROWS;
    return j0 + rows < whole ? j0 + rows : whole;
}

/* lanes l0 .. l1: the block of `added` values summed about center corrected
 * (bn_corrected) and merged into the mean and m2 of the `before` values
 * before it (bn_partial_merge, the means' difference taken from the center's
 * small offset from the mean, so that it keeps its last bits); then the
 * center moves to the new mean, for the next block, and the sums restart.
 * `restrict`: without it GCC left the loop scalar. */
static inline void bn_lane_merge(double *restrict center, double *restrict mean,
                                 double *restrict m2, double *restrict sum,
                                 double *restrict sum2, const double *restrict shift_wide,
                                 double before, double added, size_t l0, size_t l1)
{
    double count = before + added, weight = added / count, cross = before * added / count;
    for (size_t l = l0; l < l1; l++) {
        double correction = sum[l] / added;
        double block_m2 = sum2[l] - sum[l] * correction;
        double delta = ((center[l] - shift_wide[l]) - mean[l]) + correction;
        /* the first block: no spread between blocks (and no inf * 0 when the
           mean is too far from the shift to square) */
        double between = before > 0.0 ? delta * delta * cross : 0.0;
        mean[l] += delta * weight;
        m2[l] += (block_m2 < 0.0 ? 0.0 : block_m2) + between; /* NaN (overflow) stays */
        center[l] = mean[l] + shift_wide[l];
        sum[l] = sum2[l] = 0.0;
    }
}

static inline void bn_lane_stats_merge(bn_lane_stats v, const double *shift_wide,
                                       double before, double added, size_t l0, size_t l1)
{
    bn_lane_merge(v.center, v.mean, v.m2, v.sum, v.sum2, shift_wide, before, added, l0, l1);
}

/* partial[C] <- the lane statistics of interleaved (or spread) rows o0 .. o1
 * (less the shift), the lanes of each feature merged in order
 * (FOR_FEATURE_LANE) */
void bn_lane_partials(bn_partial *partial, bn_lane_stats v, bn_shape s, size_t o0, size_t o1);

/* sums[2C] <- the lanes (sum dy, sum dy * (x - mean); `stride` apart) of a row group,
 * the lanes of each feature added in order (FOR_FEATURE_LANE) */
void bn_lane_grads(double *sums, const double *lanes, size_t stride, bn_shape s);

/* dbeta[C], dgamma[C] <- the sums[groups][2C] of row groups (sum dy, then
 * sum dy * (x - mean)) added in order, dgamma times invstd[C] */
void bn_add_group_grads(double *dgamma, double *dbeta, const double *sums, size_t groups,
                        size_t C, const double *invstd);

/* The hot kernels of bn_kernels.h as one instruction-set build provides them
 * (bn_kernels_isa.h); bn_kernels.c calls the best build the CPU runs. */
typedef struct {
    void (*stats_f32)(bn_partial *, double *, const float *, const double *, bn_shape);
    void (*stats_f64)(bn_partial *, double *, const double *, const double *, bn_shape);
    void (*forward_train_f32)(float *, bn_partial *, double *, double *, double *,
                              const float *, const float *, const float *, double, bn_shape);
    void (*forward_train_f64)(double *, bn_partial *, double *, double *, double *,
                              const double *, const double *, const double *, double,
                              bn_shape);
    void (*forward_f32)(float *, double *, const float *, const double *, const double *,
                        const float *, const float *, bn_shape);
    void (*forward_f64)(double *, double *, const double *, const double *, const double *,
                        const double *, const double *, bn_shape);
    void (*backward_f32)(float *, double *, double *, double *, const float *, const float *,
                         const double *, const double *, const float *, bn_shape, int);
    void (*backward_f64)(double *, double *, double *, double *, const double *,
                         const double *, const double *, const double *, const double *,
                         bn_shape, int);
    void (*grad_sums_f32)(double *, double *, double *, const float *, const float *,
                          const double *, const double *, bn_shape);
    void (*grad_sums_f64)(double *, double *, double *, const double *, const double *,
                          const double *, const double *, bn_shape);
    void (*backward_dx_f32)(float *, double *, const float *, const float *, const double *,
                            const double *, const float *, const double *, const double *,
                            double, bn_shape, int);
    void (*backward_dx_f64)(double *, double *, const double *, const double *,
                            const double *, const double *, const double *, const double *,
                            const double *, double, bn_shape, int);
} bn_kernel_table;

/* The builds: baseline always; AVX2 and AVX-512 where GCC can target them
 * (x86-64), each compiled with `#pragma GCC target` in its own file. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) \
    && !defined(BN_BASELINE_ONLY)
#define BN_HAVE_X86_BUILDS 1
extern const bn_kernel_table bn_kernels_avx512;
extern const bn_kernel_table bn_kernels_avx2;
#endif
extern const bn_kernel_table bn_kernels_baseline;

#endif /* BNPY_BN_KERNELS_INTERNAL_H */
