/* bn_kernels.c -- the mathematics of batch normalization (DESIGN.md section 1).
 *
 * The per-type kernels live in bn_kernels_impl.h, instantiated here for float
 * and double; the type-free helpers, the thread count and the build's
 * vectorization and threading switches are below.
 */
#include "bn_kernels.h"

#include <float.h>
#include <math.h>
#include <string.h>

/* The vector helpers are always inlined: the ABI notes GCC gives for passing
 * 64-byte vectors between functions do not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

#ifdef _OPENMP
#include <omp.h>
/* the loop that follows runs on `team` threads (a local int) when team > 1 */
#define BN_PARALLEL_FOR _Pragma("omp parallel for schedule(static) num_threads(team) if(team > 1)")
#else
#define BN_PARALLEL_FOR (void)team;
#endif

/* Hot loops get one clone per instruction set, chosen when the library loads
 * (GCC/Clang function multi-versioning), so the installed build is portable
 * and still uses AVX2 or AVX-512 where the CPU has them. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(BN_NO_CLONES) \
    && defined(__has_attribute)
#if __has_attribute(target_clones)
#define BN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef BN_CLONES
#define BN_CLONES
#endif

/* Helpers of the cloned loops: always inlined, so that each clone compiles
 * them for its own instruction set. */
#if defined(__GNUC__)
#define BN_INLINE static inline __attribute__((always_inline))
#else
#define BN_INLINE static inline
#endif

enum {
    BN_LANES = 16,           /* lanes of a bn_lanes vector: independent accumulators */
    BN_GROUP_ROWS = 4096,    /* interleaved rows per reduction task: fixed by the shape */
    BN_CENTER_ROWS = 16,     /* interleaved: wide rows whose mean centers the sums */
    BN_SHORT_ROW = 320,      /* planar rows shorter than this: passes in memory order
                                (measured: rows of 49 and 196 values gain 2-3x, rows of
                                400 and 784 are faster pipelined feature by feature) */
    BN_GROUP_VALUES = 1 << 16, /* values per planar reduction task in memory order */
    BN_TILE = 2048,          /* elements of a tile that the two passes share in L1 */
    BN_CHUNK = 16384,        /* elements an elementwise pass hands a thread at a time */
    BN_PARALLEL_MIN = 65536, /* fewer elements than this run on one thread */
    BN_PREFETCH_BYTES = 2048, /* how much of the next row to ask for ahead */
};

static int bn_num_threads = 0; /* 0 until set: OpenMP's default */

void bn_set_num_threads(int n)
{
    bn_num_threads = n > 0 ? n : 1;
}

int bn_get_num_threads(void)
{
#ifdef _OPENMP
    return bn_num_threads > 0 ? bn_num_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

int bn_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

size_t bn_count(bn_shape s)
{
    return s.outer * s.inner;
}

/* interleaved layouts: the number of BN_GROUP_ROWS groups of rows */
static size_t bn_row_groups(bn_shape s)
{
    return s.inner == 1 ? (s.outer + BN_GROUP_ROWS - 1) / BN_GROUP_ROWS : 0;
}

/* interleaved layouts: rows per wide row, so that a wide row holds at least
 * 32 values */
static size_t bn_fold(size_t channels)
{
    return channels >= 32 || channels == 0 ? 1 : (32 + channels - 1) / channels;
}

/* wide[C .. R) <- repeats of wide[0 .. C), for R a multiple of C */
static void bn_repeat(double *wide, size_t C, size_t R)
{
    for (size_t l = C; l < R; l++) {
        wide[l] = wide[l - C];
    }
}

/* planar layouts with short rows: outer rows per reduction task in memory
 * order, and the number of such groups (fixed by the shape) */
static size_t bn_planar_group_rows(bn_shape s)
{
    size_t row_values = s.channels * s.inner;
    return row_values >= BN_GROUP_VALUES || row_values == 0 ? 1
                                                            : BN_GROUP_VALUES / row_values;
}

static size_t bn_planar_groups(bn_shape s)
{
    if (s.inner <= 1 || s.inner >= BN_SHORT_ROW) {
        return 0;
    }
    size_t rows = bn_planar_group_rows(s);
    return (s.outer + rows - 1) / rows;
}

size_t bn_workspace_size(bn_shape s)
{
    /* four coefficient vectors of a wide row (R >= C); interleaved
     * reductions: per row group, C partials (3 doubles each) and 3R lanes;
     * planar reductions in memory order: per group, C partials or 2C sums */
    size_t R = bn_fold(s.channels) * s.channels;
    return 4 * R + bn_row_groups(s) * (3 * s.channels + 3 * R)
           + bn_planar_groups(s) * 3 * s.channels;
}

/* A tile of a planar feature: rows o0 .. o1, columns i0 .. i1 of each */
typedef struct {
    size_t o0, o1, i0, i1;
} bn_tile;

/* planar layouts: the tiles of a feature. A row of BN_TILE values or more is
 * cut into pieces of BN_TILE; shorter rows go BN_TILE / inner to a tile. */
static size_t bn_tiles(bn_shape s)
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

static bn_tile bn_tile_at(bn_shape s, size_t k)
{
    if (s.inner >= BN_TILE) {
        size_t pieces = (s.inner + BN_TILE - 1) / BN_TILE, i0 = (k % pieces) * BN_TILE;
        return (bn_tile){k / pieces, k / pieces + 1, i0,
                         i0 + BN_TILE < s.inner ? i0 + BN_TILE : s.inner};
    }
    size_t rows = BN_TILE / s.inner, o0 = k * rows;
    return (bn_tile){o0, o0 + rows < s.outer ? o0 + rows : s.outer, 0, s.inner};
}

/* The coefficients of one feature's dx (bn_backward's formula) */
typedef struct {
    double mean, scale, mean_dy, dev_coef;
} bn_dx_coefficients;

/* threads for a call on shape s: one for small inputs */
static int bn_team(bn_shape s)
{
    return bn_count(s) * s.channels >= BN_PARALLEL_MIN ? bn_get_num_threads() : 1;
}

/* rows of row_len elements an elementwise pass takes at a time */
static size_t bn_rows_per_chunk(size_t row_len)
{
    return row_len >= BN_CHUNK ? 1 : BN_CHUNK / (row_len > 0 ? row_len : 1);
}

/* Eight doubles as one vector (GCC/Clang vector extensions): each clone maps
 * it onto its own registers (one zmm, two ymm or four xmm), and every lane
 * does the same operations in the same order on every instruction set. Row
 * sums keep two of them, BN_LANES = 16 independent accumulators. */
#if !defined(__GNUC__)
#error "bnpy's kernels need the GCC or Clang vector extensions"
#endif
typedef double bn_vec __attribute__((vector_size(8 * sizeof(double))));
/* Sixteen values at a time for loads and stores: GCC converts 16 floats to
 * doubles (and back) with whole-register instructions, but 8 floats through
 * a 4 + 4 split and shuffles (measured: about a third of the training
 * forward's time in the AVX-512 clone went to those shuffles). */
typedef double bn_vec16 __attribute__((vector_size(16 * sizeof(double))));
typedef float bn_vec16_f32 __attribute__((vector_size(16 * sizeof(float))));

/* Ask for the start of the row at p (bytes long) before it is needed: a
 * feature's rows lie far apart, and the hardware prefetcher only ramps up
 * within a row, so every row would otherwise begin with a full miss. */
BN_INLINE void bn_prefetch_row(const void *p, size_t bytes)
{
    size_t ahead = bytes < BN_PREFETCH_BYTES ? bytes : BN_PREFETCH_BYTES;
    for (size_t k = 0; k < ahead; k += 64) {
        __builtin_prefetch((const char *)p + k, 0, 3);
    }
}

/* The sum of the 16 lanes of two accumulators, pairwise, in a fixed order */
BN_INLINE double bn_lanes_total(const bn_vec *a, const bn_vec *b)
{
    bn_vec v = *a + *b;
    double lanes[8];
    memcpy(lanes, &v, sizeof lanes);
    return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
           + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

/* Partial statistics of `count` values from their first-pass mean and the sum
 * of deviations from it and of their squares: sum_dev is count times the
 * rounding error of the mean, so it corrects both (the corrected two-pass
 * algorithm of Chan, Golub and LeVeque). */
BN_INLINE bn_partial bn_corrected(double count, double mean, double sum_dev,
                                      double sum_dev2)
{
    double correction = sum_dev / count;
    double m2 = sum_dev2 - sum_dev * correction;
    return (bn_partial){count, mean + correction, m2 > 0.0 ? m2 : 0.0};
}

void bn_partial_merge(bn_partial *a, const bn_partial *b)
{
    if (b->count == 0.0) {
        return;
    }
    if (a->count == 0.0) {
        *a = *b;
        return;
    }
    double count = a->count + b->count;
    double delta = b->mean - a->mean;
    a->mean += delta * (b->count / count);
    a->m2 += b->m2 + delta * delta * (a->count * b->count / count);
    a->count = count;
}

void bn_partial_unshift(bn_partial *stats, const double *shift, size_t channels)
{
    for (size_t c = 0; c < channels; c++) {
        stats[c].mean += shift[c];
    }
}

/* stats[C] <- the partials[groups][C] of row groups merged in order, then
 * made absolute by adding unshift[C] to the means (when not NULL) */
static void bn_merge_groups(bn_partial *stats, const bn_partial *partials, size_t groups,
                            size_t C, const double *unshift)
{
    for (size_t c = 0; c < C; c++) {
        stats[c] = (bn_partial){0.0, 0.0, 0.0};
        for (size_t g = 0; g < groups; g++) {
            bn_partial_merge(&stats[c], &partials[g * C + c]);
        }
    }
    if (unshift) {
        bn_partial_unshift(stats, unshift, C);
    }
}

void bn_batch_moments(double *mean, double *invstd, const bn_partial *stats,
                      size_t channels, double eps)
{
    for (size_t c = 0; c < channels; c++) {
        double var = stats[c].count > 0.0 ? stats[c].m2 / stats[c].count : 0.0;
        mean[c] = stats[c].mean;
        invstd[c] = 1.0 / sqrt(var + eps);
    }
}

#define T float
#define BN_ELEMENT_IS_FLOAT 1
#define NAME(fn) fn##_f32
#include "bn_kernels_impl.h"
#undef T
#undef BN_ELEMENT_IS_FLOAT
#undef NAME

#define T double
#define BN_ELEMENT_IS_FLOAT 0
#define NAME(fn) fn##_f64
#include "bn_kernels_impl.h"
#undef T
#undef BN_ELEMENT_IS_FLOAT
#undef NAME
