/* core.c -- what is done once per call, not per value: the plan, the
 * workspace, merging partial statistics, the per-feature functions, the
 * thread count, and the choice of the build that runs the hot kernels
 * (kernels.h, compiled once per instruction set by build_*.c).
 */
#include "core.h"

#include <math.h>
#include <stdatomic.h>
#if BN_X86_BUILDS
#include <cpuid.h>
#endif
#include <stdio.h>
#include <string.h>

/* ---- threads ---------------------------------------------------------------- */

static atomic_int bn_num_threads = 0; /* 0 until set: OpenMP's default */

void bn_set_num_threads(int n)
{
    atomic_store(&bn_num_threads, n > 0 ? n : 1);
}

int bn_get_num_threads(void)
{
#ifdef _OPENMP
    int n = atomic_load(&bn_num_threads);
    return n > 0 ? n : omp_get_max_threads();
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

/* ---- the plan ------------------------------------------------------------------- */

size_t bn_count(bn_shape s)
{
    return s.outer * s.inner;
}

/* The size of the last-level cache in bytes, read from Linux's sysfs once
 * (virtual machines report it there more truly than the CPU's own answer,
 * which sysconf gives: 256 MiB for 32 here): cpu0's cache index3, else
 * index2; elsewhere a guess of 8 MiB */
static size_t bn_cache_bytes(void)
{
    static atomic_size_t bytes = 0;
    size_t b = atomic_load(&bytes);
    for (int index = 3; b == 0 && index >= 2; index--) {
        char path[64], unit = 'B';
        unsigned long size = 0;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
        FILE *f = fopen(path, "r");
        if (f != NULL && fscanf(f, "%lu%c", &size, &unit) >= 1) {
            b = size << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0);
        }
        if (f != NULL) {
            fclose(f);
        }
    }
    b = b > 0 ? b : (size_t)8 << 20;
    atomic_store(&bytes, b);
    return b;
}

/* The order of summation (strategy, fold, groups, tiles) follows from the
 * shape and core.h's first constants alone; the thread count and the cache
 * size set only who computes what and how outputs are stored. */
bn_plan bn_make_plan(bn_shape s, size_t elem_size, int in_place)
{
    bn_plan p = {.s = s, .team = 1, .lane_blocks = 1};
    size_t width = s.channels * s.inner;
    p.lanes = s.inner == 1 || (s.inner < BN_SHORT_ROW && width <= BN_MAX_LANES);
    p.spread = p.lanes && s.inner < BN_SPREAD_ROW;
    if (p.lanes && width > 0) {
        size_t fold = width >= BN_MIN_LANES ? 1 : (BN_MIN_LANES + width - 1) / width;
        p.width = width;
        p.wide = fold * width;
        p.wide_rows = s.outer / fold;
        p.tail = s.outer % fold * width;
        p.groups = (p.wide_rows + BN_GROUP_ROWS - 1) / BN_GROUP_ROWS;
        p.groups += p.groups == 0 && p.tail > 0;
    }
    else if (!p.lanes) {
        size_t rows = BN_TILE / s.inner;
        p.tiles = s.inner >= BN_TILE ? s.outer * ((s.inner + BN_TILE - 1) / BN_TILE)
                                     : (s.outer + rows - 1) / rows;
        p.pipeline = s.inner >= BN_PIPELINE_ROW;
    }
    p.large = bn_count(s) * s.channels * elem_size > bn_cache_bytes() / 2;
    /* not halves, which store16 never streams: their rows then skip a streamed head */
    p.stream = BN_STREAMS && elem_size >= sizeof(float) && p.large
               && (p.spread || s.inner * elem_size >= BN_STREAM_ROW_BYTES) && !in_place;
    if (bn_count(s) * s.channels >= BN_PARALLEL_MIN) {
        p.team = bn_get_num_threads();
    }
    if (p.lanes && p.groups > 0 && p.groups < (size_t)p.team) {
        /* few groups: cut each group's lanes, so that every thread has work */
        size_t want = ((size_t)p.team + p.groups - 1) / p.groups;
        size_t most = p.wide / BN_LANE_BLOCK_MIN > 0 ? p.wide / BN_LANE_BLOCK_MIN : 1;
        p.lane_blocks = want < most ? want : most;
    }
    return p;
}

int bn_rows_team(bn_rows s)
{
    return s.rows > 1 && s.rows * s.n >= BN_PARALLEL_MIN ? bn_get_num_threads() : 1;
}

int bn_rows_stream(bn_rows s, size_t elem_size, int in_place)
{
    bn_plan p = bn_make_plan((bn_shape){1, s.rows, s.n}, elem_size, in_place);
    return p.stream && bn_row_run(s) * elem_size >= BN_STREAM_ROW_BYTES;
}

size_t bn_row_blocks(bn_rows s)
{
    return s.rows < BN_ROW_BLOCKS ? s.rows : BN_ROW_BLOCKS;
}

size_t bn_rows_channels(bn_rows s)
{
    return s.period * (s.n / s.spread);
}

size_t bn_rows_workspace_size(bn_rows s)
{
    return bn_row_blocks(s) * 2 * bn_rows_channels(s);
}

void bn_add_row_blocks(double *dgamma, double *dbeta, const double *work, size_t blocks,
                       size_t width)
{
    int team = blocks * width >= BN_PARALLEL_MIN ? bn_get_num_threads() : 1;
    BN_PARALLEL_FOR
    for (ptrdiff_t j = 0; j < (ptrdiff_t)width; j++) {
        double g = 0.0, b = 0.0;
        for (size_t k = 0; k < blocks; k++) {
            g += work[2 * k * width + (size_t)j];
            b += work[(2 * k + 1) * width + (size_t)j];
        }
        dgamma[j] = g;
        dbeta[j] = b;
    }
}

enum { BN_LINE_DOUBLES = 8 }; /* doubles of a 64-byte cache line */

bn_work bn_work_of(double *work, const bn_plan *p, const void *out, size_t elem_size)
{
    /* each part from a line, with a line to spare for the coefficients' phase */
    size_t len = bn_coef_len(p) + BN_LINE_DOUBLES, phase = 0;
    double *line = work + (64 - (uintptr_t)work % 64) % 64 / sizeof(double);
    if (p->spread && out != NULL && (uintptr_t)out % elem_size == 0) {
        phase = (uintptr_t)out % 64 / elem_size % BN_LINE_DOUBLES;
    }
    return (bn_work){line + phase, line + len + phase, line + 2 * len + phase,
                     line + 3 * len + phase, line + 4 * len};
}

size_t bn_workspace_size(bn_shape s)
{
    bn_plan p = bn_make_plan(s, sizeof(double), 0);
    size_t coefficients = 4 * (bn_coef_len(&p) + BN_LINE_DOUBLES);
    return BN_LINE_DOUBLES + coefficients + (p.lanes ? p.groups * BN_LANE_STATE * p.wide : 0);
}

void bn_spread(double *wide, const double *values, const bn_plan *p)
{
    size_t inner = p->s.inner;
    /* back to front: in place (wide == values), no value is overwritten before
       it is read; in place with one lane a feature, every value is in its lane */
    for (size_t c = p->s.channels; c-- > 0 && (inner > 1 || wide != values);) {
        double v = values[c];
        for (size_t i = inner; i-- > 0;) {
            wide[c * inner + i] = v;
        }
    }
    for (size_t l = p->width; l < bn_spread_len(p); l++) {
        wide[l] = wide[l - p->width];
    }
}

/* ---- partial statistics ---------------------------------------------------------- */

/* bn_partial_merge, inlined where merges of several features interleave */
static inline void bn_merge(bn_partial *a, const bn_partial *b)
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

void bn_partial_merge(bn_partial *a, const bn_partial *b)
{
    bn_merge(a, b);
}

/* The lanes of feature c in a wide row, in order: for each of the fold outer
 * rows, the feature's inner values */
#define FOR_FEATURE_LANE(p, c, l)                                                     \
    for (size_t r_ = 0; r_ < (p)->wide; r_ += (p)->width)                             \
        for (size_t l = r_ + (c) * (p)->s.inner; l < r_ + ((c) + 1) * (p)->s.inner; l++)

/* Each feature's lanes merged in order (FOR_FEATURE_LANE's), four features
 * side by side: each feature's merges are a chain of divisions, and four
 * chains overlap */
void bn_merge_lanes(bn_partial *stats, const double *groups, const bn_plan *p)
{
    size_t channels = p->s.channels, inner = p->s.inner;
    for (size_t c = 0; c < channels; c++) {
        stats[c] = (bn_partial){0.0, 0.0, 0.0};
    }
    for (size_t c0 = 0; c0 < channels; c0 += 4) {
        size_t c1 = c0 + 4 < channels ? c0 + 4 : channels;
        for (size_t g = 0; g < p->groups; g++) {
            const double *count = groups + g * BN_LANE_STATE * p->wide;
            const double *mean = count + p->wide, *m2 = mean + p->wide;
            for (size_t r = 0; r < p->wide; r += p->width) {
                for (size_t i = 0; i < inner; i++) {
                    for (size_t c = c0; c < c1; c++) {
                        size_t l = r + c * inner + i;
                        bn_merge(&stats[c], &(bn_partial){count[l], mean[l], m2[l]});
                    }
                }
            }
        }
    }
}

void bn_add_lane_grads(double *dgamma, double *dbeta, const double *groups,
                       const double *invstd, const bn_plan *p)
{
    for (size_t c = 0; c < p->s.channels; c++) {
        double sum_dy = 0.0, sum_dy_dev = 0.0;
        for (size_t g = 0; g < p->groups; g++) {
            const double *sum = groups + g * BN_LANE_STATE * p->wide, *sum_dev = sum + p->wide;
            FOR_FEATURE_LANE(p, c, l) {
                sum_dy += sum[l];
                sum_dy_dev += sum_dev[l];
            }
        }
        dbeta[c] = sum_dy;
        dgamma[c] = sum_dy_dev * invstd[c];
    }
}

void bn_batch_moments(double *mean, double *invstd, const bn_partial *stats,
                      size_t channels, double eps)
{
    for (size_t c = 0; c < channels; c++) {
        double var = stats[c].count > 0.0 ? stats[c].m2 / stats[c].count : 0.0;
        mean[c] = stats[c].mean;
        invstd[c] = var;
    }
    /* the roots in a loop of their own, which the compiler vectorizes */
    for (size_t c = 0; c < channels; c++) {
        invstd[c] = 1.0 / sqrt(invstd[c] + eps);
    }
}

/* ---- builds ------------------------------------------------------------------------ */

/* The builds, indexed by bn_isa: each one's name and kernels (NULL where this
 * build has none) */
static const struct {
    const char *name;
    const bn_kernel_table *kernels;
} bn_builds[] = {
#ifdef BN_PORTABLE
    {"portable", &bn_kernels_baseline},
#else
    {"default", &bn_kernels_baseline},
#endif
#if BN_X86_BUILDS
    {"avx2", &bn_kernels_avx2},
    {"avx512", &bn_kernels_avx512},
#else
    {"avx2", NULL},
    {"avx512", NULL},
#endif
};

int bn_isa_supported(bn_isa isa)
{
    if (isa < BN_ISA_DEFAULT || isa > BN_ISA_AVX512 || bn_builds[isa].kernels == NULL) {
        return 0;
    }
#if BN_X86_BUILDS
    unsigned a, b, c, d; /* and F16C, for float16 (on every CPU with AVX2 so far) */
    int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
    return isa == BN_ISA_AVX512 ? f16c && __builtin_cpu_supports("avx512f")
           : isa == BN_ISA_AVX2 ? f16c && __builtin_cpu_supports("avx2")
                                : 1;
#else
    return 1;
#endif
}

const char *bn_isa_name(bn_isa isa)
{
    return isa >= BN_ISA_DEFAULT && isa <= BN_ISA_AVX512 ? bn_builds[isa].name : NULL;
}

/* the bn_isa in use; -1 until the first call chooses */
static atomic_int bn_chosen_isa = -1;

int bn_set_isa(bn_isa isa)
{
    if (!bn_isa_supported(isa)) {
        return -1;
    }
    atomic_store(&bn_chosen_isa, (int)isa);
    return 0;
}

bn_isa bn_get_isa(void)
{
    int isa = atomic_load(&bn_chosen_isa);
    if (isa < 0) {
        int best = BN_ISA_DEFAULT, unset = -1;
        for (int i = BN_ISA_DEFAULT; i <= BN_ISA_AVX512; i++) {
            best = bn_isa_supported((bn_isa)i) ? i : best;
        }
        /* unless another thread chose first (then unset <- its choice) */
        isa = atomic_compare_exchange_strong(&bn_chosen_isa, &unset, best) ? best : unset;
    }
    return (bn_isa)isa;
}

/* the build the kernels run: the best one unless bn_set_isa chose another */
static const bn_kernel_table *bn_kernels(void)
{
    return bn_builds[bn_get_isa()].kernels;
}

/* ---- entry points ---------------------------------------------------------------- */

/* each hot kernel of bn.h calls the chosen build's */
#define BN_ENTRY(name, parameters, arguments)                                              \
    void name parameters                                                                    \
    {                                                                                       \
        bn_kernels()->name arguments;                                                       \
    }
BN_HOT_KERNELS(BN_ENTRY, float, float, _f32)
BN_HOT_KERNELS(BN_ENTRY, double, double, _f64)
BN_HOT_KERNELS(BN_ENTRY, uint16_t, float, _f16)
BN_HOT_KERNELS(BN_ENTRY, uint16_t, float, _bf16)

/* the per-feature functions, on the parameters' type P */
#define P float
#define NAME(fn) fn##_f32
#include "running.h"
#undef NAME
#define NAME(fn) fn##_f16
#include "running.h"
#undef NAME
#define NAME(fn) fn##_bf16
#include "running.h"
#undef P
#undef NAME

#define P double
#define NAME(fn) fn##_f64
#include "running.h"
#undef P
#undef NAME
