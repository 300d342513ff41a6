/* core.h -- what the core's files share: the tuning constants, the plan, the
 * helpers both strategies use, and the table of kernels one build provides.
 * Not part of the interface: bn.h is.
 *
 * Two strategies, chosen by bn_make_plan from the shape alone (x viewed as
 * x[outer][C][inner]):
 *   planar  features one by one: a feature's values are `outer` rows of
 *           `inner` contiguous values. A pipeline writes feature c's output
 *           while it sums feature c + 1, so memory sees one read of x.
 *           Short rows, of which a pipeline would fetch a few lines from
 *           each page, instead take two passes over x in memory order (the
 *           sums, then the output), with the same sums in the same order.
 *   lanes   channels-last and short rows: each outer row of C * inner values
 *           is a row of lanes (lane l belongs to feature (l % (C*inner)) /
 *           inner), folded with the next rows into a wide row of at least
 *           BN_MIN_LANES lanes. Sums run down each lane; the elementwise
 *           passes run over x as one long sequence, the coefficients spread
 *           over a wide row (rows of BN_SPREAD_ROW values or more: row by
 *           row, as planar ones).
 */
#ifndef BNPY_CORE_H
#define BNPY_CORE_H

#include "bn.h"

#include <stddef.h>

/* Constants that fix the order of summation: changing one changes the last
 * bits of results (and benchmarks/digest.py's digest). */
enum {
    BN_LANES = 16,        /* accumulators of a sum along a row: value i goes to
                             lane i % 16, whatever the build's vector width */
    BN_TILE = 2048,       /* planar: values a tile of a feature sums before
                             merging; smaller is slightly more accurate, slower */
    BN_SHORT_ROW = 64,    /* rows shorter than this run as lanes ... */
    BN_MAX_LANES = 65536, /* ... when an outer row has at most this many values */
    BN_MIN_LANES = 32,    /* a wide row folds outer rows until it has this many */
    BN_GROUP_ROWS = 4096, /* lanes: wide rows of a group; groups merge in order */
    BN_BLOCK_ROWS = 64,   /* lanes: wide rows summed about one center, then merged;
                             smaller is slightly more accurate, slower */
    BN_ROW_BLOCKS = 32,   /* rows: blocks of rows whose parameter gradients are
                             summed apart, then added in order */
};

/* Constants that change only speed */
enum {
    BN_PARALLEL_MIN = 1 << 16, /* fewer values than this run on one thread */
    BN_CHUNK = 1 << 14,        /* values an elementwise task takes at least */
    BN_LANE_BLOCK_MIN = 256,   /* lanes: the fewest lanes a reduction task takes */
    BN_STREAM_ROW_BYTES = 1024, /* rows shorter than this are not streamed (but spread
                                   lanes): their ends' partial lines cost more than it saves */
    BN_PREFETCH_BYTES = 8192,  /* how far ahead the pipeline asks for the next feature's
                                  rows: further hides more latency, holds more lines */
    BN_READBACK_BYTES = 2048,  /* ... and for what it reads back of the feature it writes
                                  (from L2 or L3, when the feature outgrows L1) */
    BN_LANES_PREFETCH_BYTES = 2048, /* ... and the lanes' elementwise passes ask for x's
                                       values from memory (x larger than the cache) */
    BN_LANE_ROWS = 4,          /* lanes: rows a reduction takes at once: more saves loads
                                  and stores of the sums, and needs more streams */
    BN_PIPELINE_ROW = 512,     /* planar rows shorter than this take two passes in memory
                                  order instead of the pipeline's one pass feature by feature */
    BN_WALK_FEATURES = 32,     /* ... and their sums walk up to this many features at once,
                                  whose accumulators (256 bytes each) stay in the L1 cache */
    BN_SPREAD_ROW = 32,        /* lanes: rows of this many values or more take the
                                  elementwise passes row by row, not spread coefficients */
};

#ifdef _OPENMP
#include <omp.h>
/* the loop that follows runs on `team` threads (a local int) when team > 1 */
#define BN_PARALLEL_FOR _Pragma("omp parallel for schedule(static) num_threads(team) if(team > 1)")
#else
#define BN_PARALLEL_FOR (void)team;
#endif

#if defined(__GNUC__)
#define BN_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define BN_INLINE static __forceinline
#else
#define BN_INLINE static inline
#endif

/* How the kernels run on a shape: bn_make_plan's answer */
typedef struct {
    bn_shape s;
    int lanes;          /* 1: the lanes strategy; 0: planar */
    int team;           /* threads */
    size_t width;       /* lanes: values of an outer row, C * inner */
    size_t wide;        /* lanes: values of a wide row (fold outer rows) */
    size_t wide_rows;   /* lanes: whole wide rows in x */
    size_t tail;        /* lanes: values after the last whole wide row */
    size_t groups;      /* lanes: groups of BN_GROUP_ROWS wide rows */
    size_t lane_blocks; /* lanes: reduction tasks a group's lanes are cut into */
    size_t tiles;       /* planar: statistics tiles of a feature */
    int pipeline;       /* planar: in a pipeline (long rows), else in memory order */
    int spread;         /* lanes: the elementwise passes take the coefficients spread
                           over a wide row; else row by row, as planar ones do */
    int large;          /* x is larger than half the last-level cache: it comes from memory */
    int stream;         /* outputs go past the caches: floats or doubles, large, in
                           runs of BN_STREAM_ROW_BYTES or more, not in place */
} bn_plan;

/* the plan for x of shape s and elements of elem_size bytes, its output
 * written over an input when in_place */
bn_plan bn_make_plan(bn_shape s, size_t elem_size, int in_place);

/* threads for bn_rows s */
int bn_rows_team(bn_rows s);

/* whether bn_rows s streams its outputs of elem_size bytes each past the
 * caches (by bn_plan's rule, a run for a row) */
int bn_rows_stream(bn_rows s, size_t elem_size, int in_place);

/* values of a row that the elementwise passes take at once: a run, or all
 * of the row when every value is a channel */
static inline size_t bn_row_run(bn_rows s)
{
    return s.spread > 1 ? s.spread : s.n;
}

/* blocks of rows that bn_rows_backward sums parameter gradients in */
size_t bn_row_blocks(bn_rows s);

/* dgamma[width], dbeta[width] <- the blocks' sums in work (each block: its
 * dgamma's width values, then its dbeta's), added in order */
void bn_add_row_blocks(double *dgamma, double *dbeta, const double *work, size_t blocks,
                       size_t width);

/* A statistics tile of a planar feature: rows o0 .. o1, values i0 .. i1 of
 * each. A row of BN_TILE values or more is cut into pieces of BN_TILE;
 * shorter rows go BN_TILE / inner to a tile. */
typedef struct {
    size_t o0, o1, i0, i1;
} bn_tile;

static inline bn_tile bn_tile_at(bn_shape s, size_t k)
{
    if (s.inner >= BN_TILE) {
        size_t pieces = (s.inner + BN_TILE - 1) / BN_TILE, i0 = (k % pieces) * BN_TILE;
        size_t i1 = i0 + BN_TILE < s.inner ? i0 + BN_TILE : s.inner;
        return (bn_tile){k / pieces, k / pieces + 1, i0, i1};
    }
    size_t rows = BN_TILE / s.inner, o0 = k * rows;
    return (bn_tile){o0, o0 + rows < s.outer ? o0 + rows : s.outer, 0, s.inner};
}

/* Where a pass over the rows of a planar feature asks for the value
 * `distance` past its vector at i of row o: `before` values past it while
 * i + BN_LANES <= split, `after` from there (a later row); 0, the vector's
 * own place, past the feature's last row. */
typedef struct {
    size_t split, before, after;
} bn_reach;

static inline bn_reach bn_reach_of(bn_shape s, size_t o, size_t distance)
{
    size_t rows = distance / s.inner, rest = distance % s.inner, stride = s.channels * s.inner;
    bn_reach r = {s.inner - rest, 0, 0}; /* from column inner - rest: a row further */
    r.before = o + rows < s.outer ? rows * stride + rest : 0;
    r.after = o + rows + 1 < s.outer ? (rows + 1) * stride + rest - s.inner : 0;
    return r;
}

/* where the row x[o][c][:] starts */
static inline size_t bn_row_at(bn_shape s, size_t o, size_t c)
{
    return (o * s.channels + c) * s.inner;
}

/* features a task of a planar reduction takes: one in the pipeline; in
 * memory order up to BN_WALK_FEATURES, but few enough that every thread
 * has a task */
static inline size_t bn_sum_task_features(const bn_plan *p)
{
    size_t share = (p->s.channels + (size_t)p->team - 1) / (size_t)p->team;
    return p->pipeline || share == 0 ? 1 : share < BN_WALK_FEATURES ? share : BN_WALK_FEATURES;
}

/* The lanes strategy's per-lane values (its shifts and means, and when
 * p->spread its coefficients), spread over a wide row and repeated for
 * BN_LANES more lanes, so that a vector starting at any lane of a wide row
 * reads them without wrapping: bn_spread */
static inline size_t bn_spread_len(const bn_plan *p)
{
    return p->wide + BN_LANES;
}

/* wide[0 .. bn_spread_len) <- values[C], lane l taking that of its feature */
void bn_spread(double *wide, const double *values, const bn_plan *p);

/* The per-feature coefficients of an elementwise pass:
 *   normalize: out = (in - mean) * scale + shift
 *   dx, training: out = scale * ((dy - shift) - (x - mean) * dev)
 *   dx, eval: out = dy * scale */
typedef enum { BN_NORMALIZE, BN_DX_TRAIN, BN_DX_EVAL } bn_op;

/* A kernel's workspace: the coefficients, per feature or spread over a wide
 * row (p->spread; room for that in every lanes plan), and for the lanes'
 * reductions, per group, the state of each lane, BN_LANE_STATE arrays of
 * `wide`: its statistics (count, mean, m2), center and two sums. Each array
 * starts on a cache line; spread coefficients a few values on, so that a
 * vector of the output `out` that starts on a line reads its coefficients
 * from one line each (when `wide` is a multiple of 16). */
typedef struct {
    double *mean, *scale, *shift, *dev; /* bn_coef_len(p) each */
    double *groups;                     /* groups * BN_LANE_STATE * wide */
} bn_work;

enum { BN_LANE_STATE = 6 }; /* doubles of a lane's state */

static inline size_t bn_coef_len(const bn_plan *p)
{
    return p->lanes ? bn_spread_len(p) : p->s.channels;
}

bn_work bn_work_of(double *work, const bn_plan *p, const void *out, size_t elem_size);

/* stats[C] <- the statistics of the lanes of each feature in every group's
 * state (group_stats in kernels.h), merged in order: group by group, and in
 * a group lane by lane */
void bn_merge_lanes(bn_partial *stats, const double *groups, const bn_plan *p);

/* dbeta[C] <- the lanes' sums of dy in every group's state (group_grads),
 * dgamma[C] <- those of dy * (x - mean), times invstd[C]; added in order */
void bn_add_lane_grads(double *dgamma, double *dbeta, const double *groups,
                       const double *invstd, const bn_plan *p);

/* Absorbs, for each lane l0 .. l1, a block of `added` values whose
 * deviations from center[l] (taken less shift[l], as mean[l] is) sum to
 * sum[l], and their squares to sum2[l], into the lane's statistics count[l],
 * mean[l], m2[l]: the block's sums corrected as in Chan, Golub and LeVeque's
 * two-pass algorithm, then merged with their pairwise formula; the
 * difference of the means is taken from the center's offset, so that it
 * keeps its last bits. The lanes have all had the same number of values. A
 * loop the compiler vectorizes. */
static inline void bn_absorb_lanes(double *restrict count, double *restrict mean,
                                   double *restrict m2, const double *restrict center,
                                   const double *restrict shift, const double *restrict sum,
                                   const double *restrict sum2, double added, size_t l0,
                                   size_t l1)
{
    int first = l0 < l1 && count[l0] == 0.0;
    for (size_t l = l0; l < l1; l++) {
        double correction = sum[l] / added, at = center[l] - shift[l];
        double block = sum2[l] - sum[l] * correction;
        block = block < 0.0 ? 0.0 : block; /* rounding; NaN stays */
        double total = count[l] + added, delta = (at - mean[l]) + correction;
        m2[l] = first ? block : m2[l] + (block + delta * delta * (count[l] * added / total));
        mean[l] = first ? at + correction : mean[l] + delta * (added / total);
        count[l] = first ? added : total;
    }
}

/* bn_absorb_lanes for one bn_partial p, its block about center */
static inline void bn_absorb(bn_partial *p, double added, double center, double sum, double sum2)
{
    double no_shift = 0.0;
    bn_absorb_lanes(&p->count, &p->mean, &p->m2, &center, &no_shift, &sum, &sum2, added, 0, 1);
}

/* The hot kernels of bn.h (BN_HOT_KERNELS) as one build provides them
 * (build.h), each field named as the kernel; core.c calls the best build the
 * CPU runs. */
#define BN_FIELD(name, parameters, arguments) void(*name) parameters;
typedef struct {
    BN_HOT_KERNELS(BN_FIELD, float, float, _f32)
    BN_HOT_KERNELS(BN_FIELD, double, double, _f64)
    BN_HOT_KERNELS(BN_FIELD, uint16_t, float, _f16)
    BN_HOT_KERNELS(BN_FIELD, uint16_t, float, _bf16)
} bn_kernel_table;

/* The builds: always one for the compiler's default target; on x86-64 with
 * GCC or Clang, AVX2 and AVX-512 builds too, unless built portable. */
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(BN_PORTABLE)
#define BN_X86_BUILDS 1
extern const bn_kernel_table bn_kernels_avx512;
extern const bn_kernel_table bn_kernels_avx2;
#else
#define BN_X86_BUILDS 0
#endif
#define BN_STREAMS BN_X86_BUILDS /* some build can stream (vec.h) */
extern const bn_kernel_table bn_kernels_baseline;

#endif /* BNPY_CORE_H */
