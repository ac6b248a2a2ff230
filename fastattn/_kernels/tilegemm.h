/*
 * tilegemm.h -- float32 AVX-512 micro-kernels for the two products of an attention tile:
 *
 *     s   = scale * q @ k.T     (rows x cols, reduction over e)
 *     acc = acc + p @ v         (rows x ev,   reduction over cols)
 *
 * Why not BLAS: a tile is small (256 x 256 x 64), so a BLAS call spends a large share
 * packing both operands and splitting the work, and every call made from our OpenMP
 * threads has to run with BLAS limited to one thread, a switch that wakes BLAS's own
 * worker threads. Measured on a Zen 4 core (single-threaded, thread CPU time):
 * OpenBLAS 0.3.30 reaches about 95 GFLOP/s on each product, these kernels 108 (scores,
 * including the transposition of k) and 116 (p @ v).
 * The key-major float32 tile of dense attention (one 256-query block against 2048 keys,
 * data in cache, best of 40 runs, wall time): score block 115 GFLOP/s, p @ v 117, the
 * whole tile with its softmax 108 at E = 64 and 112 at E = 128 (4 L S E counted), against
 * 115.5 for a loop of nothing but independent 512-bit FMAs: the exps' own FMAs are most
 * of what is left (6.6% of the tile at E = 64, 3.4% at E = 128).
 *
 * The kernels keep a block of output rows in registers and stream the other operand:
 *   scores: 8 query rows x 32 keys; q elements are broadcast, k is first transposed
 *           into a (e, cols rounded up to 32) panel so that 16 keys load as one vector
 *           (for fewer than 16 rows, dot products reduced by one 16 x 16 transpose);
 *   p @ v : 4 rows x 64 value columns; p elements are broadcast, v rows load as is.
 * They are compiled for x86-64-v4 only and used when the CPU has AVX-512 and the value
 * width is a multiple of 16 (fa_tile_products_ok); everything else goes to BLAS.
 * The build never uses -ffast-math: the sums run in the same order as a plain loop.
 */
#ifndef FASTATTN_TILEGEMM_H
#define FASTATTN_TILEGEMM_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "vecmath.h"      /* the vector exp (FA_EXPNEG_VECS) */
#include "scoremods.h"    /* fa_score_mods, FA_TANH_VEC */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) \
    && !defined(FASTATTN_NO_CLONES)
#define FA_TILE_KERNELS 1
#define FA_V4 __attribute__((target("arch=x86-64-v4")))
#else
#define FA_TILE_KERNELS 0
#endif

#if FA_TILE_KERNELS

typedef float fa_v16 __attribute__((vector_size(64)));
typedef int fa_i16 __attribute__((vector_size(64)));
/* unaligned, may-alias view for loads and stores */
typedef float fa_v16u __attribute__((vector_size(64), aligned(4), may_alias));

#define FA_LOAD(p) (*(const fa_v16u *)(p))
#define FA_STORE(p, x) (*(fa_v16u *)(p) = (x))

/* Key panel width: two vectors of keys per register block. */
#define FA_PANEL 32
#define FA_SCORE_ROWS 8
/* Below this many query rows, transposing the keys costs more than it saves. */
#define FA_PACK_MIN_ROWS 16
/* With few rows the products are bound by reading k and v: software prefetch this many
 * key rows ahead (k) and twice as many (v) matched OpenBLAS's small-matrix kernels on
 * decoding shapes (Zen 4, 1 query x 256-key tiles); without it they were 15% slower.
 * Prefetches past the end of a block are harmless hints. */
#define FA_PREFETCH_ROWS 16

/* In-register transpose of 16 vectors (a 16 x 16 block): swap the off-diagonal
 * b x b sub-blocks of every 2b x 2b block, for b = 8, 4, 2, 1. Unrolled with
 * constant shuffle masks so the block stays in registers (one vpermt2ps each). */
#define FA_T_LO8 ((fa_i16){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23})
#define FA_T_HI8 ((fa_i16){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31})
#define FA_T_LO4 ((fa_i16){0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27})
#define FA_T_HI4 ((fa_i16){4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31})
#define FA_T_LO2 ((fa_i16){0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29})
#define FA_T_HI2 ((fa_i16){2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31})
#define FA_T_LO1 ((fa_i16){0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30})
#define FA_T_HI1 ((fa_i16){1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31})
#define FA_T_SWAP(i, j, b)                                                          \
    do {                                                                            \
        fa_v16 a_ = x##i, c_ = x##j;                                                \
        x##i = __builtin_shuffle(a_, c_, FA_T_LO##b);                               \
        x##j = __builtin_shuffle(a_, c_, FA_T_HI##b);                               \
    } while (0)
FA_V4 static inline void fa_transpose16(fa_v16 *r)
{
    fa_v16 x0 = r[0], x1 = r[1], x2 = r[2], x3 = r[3], x4 = r[4], x5 = r[5], x6 = r[6],
           x7 = r[7], x8 = r[8], x9 = r[9], x10 = r[10], x11 = r[11], x12 = r[12],
           x13 = r[13], x14 = r[14], x15 = r[15];
    FA_T_SWAP(0, 8, 8); FA_T_SWAP(1, 9, 8); FA_T_SWAP(2, 10, 8); FA_T_SWAP(3, 11, 8);
    FA_T_SWAP(4, 12, 8); FA_T_SWAP(5, 13, 8); FA_T_SWAP(6, 14, 8); FA_T_SWAP(7, 15, 8);
    FA_T_SWAP(0, 4, 4); FA_T_SWAP(1, 5, 4); FA_T_SWAP(2, 6, 4); FA_T_SWAP(3, 7, 4);
    FA_T_SWAP(8, 12, 4); FA_T_SWAP(9, 13, 4); FA_T_SWAP(10, 14, 4); FA_T_SWAP(11, 15, 4);
    FA_T_SWAP(0, 2, 2); FA_T_SWAP(1, 3, 2); FA_T_SWAP(4, 6, 2); FA_T_SWAP(5, 7, 2);
    FA_T_SWAP(8, 10, 2); FA_T_SWAP(9, 11, 2); FA_T_SWAP(12, 14, 2); FA_T_SWAP(13, 15, 2);
    FA_T_SWAP(0, 1, 1); FA_T_SWAP(2, 3, 1); FA_T_SWAP(4, 5, 1); FA_T_SWAP(6, 7, 1);
    FA_T_SWAP(8, 9, 1); FA_T_SWAP(10, 11, 1); FA_T_SWAP(12, 13, 1); FA_T_SWAP(14, 15, 1);
    r[0] = x0; r[1] = x1; r[2] = x2; r[3] = x3; r[4] = x4; r[5] = x5; r[6] = x6;
    r[7] = x7; r[8] = x8; r[9] = x9; r[10] = x10; r[11] = x11; r[12] = x12;
    r[13] = x13; r[14] = x14; r[15] = x15;
}

/* Lane i of the result = the sum of the lanes of x[i]: the transpose above, but adding
 * the two halves at each step (30 shuffles and 15 adds instead of 64 and 15). At step b,
 * lanes with bit b clear keep sums for x[i], lanes with it set those for x[i + b]. */
#define FA_T_FOLD(i, j, b) \
    x##i = __builtin_shuffle(x##i, x##j, FA_T_LO##b) + __builtin_shuffle(x##i, x##j, FA_T_HI##b)
FA_V4 static inline fa_v16 fa_lane_sums16(const fa_v16 *r)
{
    fa_v16 x0 = r[0], x1 = r[1], x2 = r[2], x3 = r[3], x4 = r[4], x5 = r[5], x6 = r[6],
           x7 = r[7], x8 = r[8], x9 = r[9], x10 = r[10], x11 = r[11], x12 = r[12],
           x13 = r[13], x14 = r[14], x15 = r[15];
    FA_T_FOLD(0, 8, 8); FA_T_FOLD(1, 9, 8); FA_T_FOLD(2, 10, 8); FA_T_FOLD(3, 11, 8);
    FA_T_FOLD(4, 12, 8); FA_T_FOLD(5, 13, 8); FA_T_FOLD(6, 14, 8); FA_T_FOLD(7, 15, 8);
    FA_T_FOLD(0, 4, 4); FA_T_FOLD(1, 5, 4); FA_T_FOLD(2, 6, 4); FA_T_FOLD(3, 7, 4);
    FA_T_FOLD(0, 2, 2); FA_T_FOLD(1, 3, 2);
    FA_T_FOLD(0, 1, 1);
    return x0;
}

/* kt[t * ldkt + j] = k[j * ldk + t] for t < e, j < cols; zero for cols <= j < ldkt.
 * (Packs keys for the row-major scores, queries for the key-major ones.) */
FA_V4 static inline __attribute__((always_inline))
void fa_pack_transposed_body(int cols, int e, const float *k, ptrdiff_t ldk, float *kt,
                             ptrdiff_t ldkt, float scale)
{
    fa_v16 r[16];
    for (int j0 = 0; j0 < ldkt; j0 += 16) {
        int nj = cols - j0 < 16 ? cols - j0 : 16;      /* may be <= 0: padding only */
        for (int t0 = 0; t0 < e; t0 += 16) {
            int nt = e - t0 < 16 ? e - t0 : 16;
            for (int i = 0; i < 16; i++) {
                if (i < nj && nt == 16) {
                    r[i] = FA_LOAD(k + (j0 + i) * ldk + t0);
                } else {
                    r[i] = (fa_v16){0};
                    if (i < nj)
                        memcpy(&r[i], k + (j0 + i) * ldk + t0, nt * sizeof(float));
                }
            }
            fa_transpose16(r);
            if (scale != 1.0f)
                for (int t = 0; t < nt; t++)
                    r[t] *= scale;
            for (int t = 0; t < nt; t++)
                FA_STORE(kt + (t0 + t) * ldkt + j0, r[t]);
        }
    }
}

FA_V4 static void fa_pack_transposed(int cols, int e, const float *k, ptrdiff_t ldk,
                                     float *kt, ptrdiff_t ldkt)
{
    fa_pack_transposed_body(cols, e, k, ldk, kt, ldkt, 1.0f);
}

/* The same times scale: the key-major tiles' query blocks, so that their scores need no
 * multiply of their own (at E = 64, 16 multiplies per 1024 FMAs of the score block). */
FA_V4 static void fa_pack_transposed_scaled(int cols, int e, const float *k, ptrdiff_t ldk,
                                            float *kt, ptrdiff_t ldkt, float scale)
{
    fa_pack_transposed_body(cols, e, k, ldk, kt, ldkt, scale);
}

/* Store the first n (1..16) lanes of x at p (a masked store: nothing past them is
 * touched). */
FA_V4 static inline void fa_store_part(float *p, fa_v16 x, int n)
{
    if (n == 16)
        FA_STORE(p, x);
    else
        _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)x);
}

/* s[rows, cols] (row stride lds) = scale * q[rows, e] @ kt[e, 0:cols]; kt has row
 * stride ldkt, a multiple of FA_PANEL, zero-padded past cols. With colmax (whole panels
 * only: ncols == FA_PANEL), colmax[0:32] also becomes the larger of itself and the
 * block's column maxima (a NaN score is left out of them). The block's 16 accumulators
 * are named variables, not an array: an array was zeroed on the stack (rep stos) and
 * spilled before the stores, 12% of the block's time at e = 64. Not inlined: inlined in
 * the loops over blocks, its row offsets were spilled and reloaded at every step. */
#define FA_SB_ROWS8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
FA_V4 static __attribute__((noinline))
void fa_score_block_8(int e, float scale, const float *q, ptrdiff_t ldq, const float *kt,
                      ptrdiff_t ldkt, float *s, ptrdiff_t lds, int ncols, float *colmax)
{
#define FA_SB_DECL(r) fa_v16 c##r##0 = (fa_v16){0}, c##r##1 = (fa_v16){0};
    FA_SB_ROWS8(FA_SB_DECL)
#undef FA_SB_DECL
    for (int t = 0; t < e; t++) {
        fa_v16 b0 = FA_LOAD(kt + t * ldkt), b1 = FA_LOAD(kt + t * ldkt + 16);
#define FA_SB_FMA(r) { float a = q[(r) * ldq + t]; c##r##0 += a * b0; c##r##1 += a * b1; }
        FA_SB_ROWS8(FA_SB_FMA)
#undef FA_SB_FMA
    }
    if (ncols == FA_PANEL) {
        if (scale != 1.0f) {
#define FA_SB_SCALE(r) c##r##0 *= scale; c##r##1 *= scale;
            FA_SB_ROWS8(FA_SB_SCALE)
#undef FA_SB_SCALE
        }
#define FA_SB_STORE(r) FA_STORE(s + (r) * lds, c##r##0); FA_STORE(s + (r) * lds + 16, c##r##1);
        FA_SB_ROWS8(FA_SB_STORE)
#undef FA_SB_STORE
        if (colmax != NULL) {
#define FA_MAXV(a, b) (fa_v16)_mm512_max_ps((__m512)(a), (__m512)(b))
            fa_v16 m0 = FA_MAXV(FA_MAXV(FA_MAXV(c00, c10), FA_MAXV(c20, c30)),
                                FA_MAXV(FA_MAXV(c40, c50), FA_MAXV(c60, c70)));
            fa_v16 m1 = FA_MAXV(FA_MAXV(FA_MAXV(c01, c11), FA_MAXV(c21, c31)),
                                FA_MAXV(FA_MAXV(c41, c51), FA_MAXV(c61, c71)));
            FA_STORE(colmax, FA_MAXV(m0, FA_LOAD(colmax)));
            FA_STORE(colmax + 16, FA_MAXV(m1, FA_LOAD(colmax + 16)));
#undef FA_MAXV
        }
        return;
    }
#define FA_SB_PART(r)                                                                      \
    if (ncols >= 16) {                                                                     \
        FA_STORE(s + (r) * lds, c##r##0 * scale);                                          \
        if (ncols > 16)                                                                    \
            fa_store_part(s + (r) * lds + 16, c##r##1 * scale, ncols - 16);                \
    } else {                                                                               \
        fa_store_part(s + (r) * lds, c##r##0 * scale, ncols);                              \
    }
    FA_SB_ROWS8(FA_SB_PART)
#undef FA_SB_PART
}

FA_V4 static inline __attribute__((always_inline))
void fa_score_block_1(int e, float scale, const float *q, const float *kt, ptrdiff_t ldkt,
                      float *s, int ncols, float *colmax)
{
    fa_v16 c0 = (fa_v16){0}, c1 = (fa_v16){0};
    for (int t = 0; t < e; t++) {
        float a = q[t];
        c0 += a * FA_LOAD(kt + t * ldkt);
        c1 += a * FA_LOAD(kt + t * ldkt + 16);
    }
    if (scale != 1.0f) {
        c0 *= scale;
        c1 *= scale;
    }
    if (ncols >= 16) {
        FA_STORE(s, c0);
        if (ncols > 16)
            fa_store_part(s + 16, c1, ncols - 16);
    } else {
        fa_store_part(s, c0, ncols);
    }
    if (colmax != NULL) {
        FA_STORE(colmax, (fa_v16)_mm512_max_ps((__m512)c0, (__m512)FA_LOAD(colmax)));
        FA_STORE(colmax + 16, (fa_v16)_mm512_max_ps((__m512)c1, (__m512)FA_LOAD(colmax + 16)));
    }
}

/* fa_scores_from_panel, and with colmax (cols a multiple of FA_PANEL) the maxima of its
 * columns over the rows into colmax[0:cols] (-inf for no rows). */
FA_V4 static inline __attribute__((always_inline))
void fa_scores_panel_body(int rows, int cols, int e, float scale, const float *q,
                          ptrdiff_t ldq, const float *kt, ptrdiff_t ldkt, float *s,
                          ptrdiff_t lds, float *colmax)
{
    if (colmax != NULL)
        for (int j = 0; j < cols; j += 16)
            FA_STORE(colmax + j, (fa_v16){0} - __builtin_inff());
    int r0 = 0;
    for (; r0 + FA_SCORE_ROWS <= rows; r0 += FA_SCORE_ROWS)
        for (int j0 = 0; j0 < cols; j0 += FA_PANEL)
            fa_score_block_8(e, scale, q + r0 * ldq, ldq, kt + j0, ldkt, s + r0 * lds + j0,
                             lds, cols - j0 < FA_PANEL ? cols - j0 : FA_PANEL,
                             colmax != NULL ? colmax + j0 : NULL);
    for (; r0 < rows; r0++)
        for (int j0 = 0; j0 < cols; j0 += FA_PANEL)
            fa_score_block_1(e, scale, q + r0 * ldq, kt + j0, ldkt, s + r0 * lds + j0,
                             cols - j0 < FA_PANEL ? cols - j0 : FA_PANEL,
                             colmax != NULL ? colmax + j0 : NULL);
}

FA_V4 static void fa_scores_from_panel(int rows, int cols, int e, float scale,
                                       const float *q, ptrdiff_t ldq,
                                       const float *kt, ptrdiff_t ldkt, float *s, ptrdiff_t lds)
{
    fa_scores_panel_body(rows, cols, e, scale, q, ldq, kt, ldkt, s, lds, NULL);
}

FA_V4 static void fa_scores_panel_max(int rows, int cols, int e, float scale,
                                      const float *q, ptrdiff_t ldq, const float *kt,
                                      ptrdiff_t ldkt, float *s, ptrdiff_t lds, float *colmax)
{
    fa_scores_panel_body(rows, cols, e, scale, q, ldq, kt, ldkt, s, lds, colmax);
}

/* acc[rows, W*16 columns] += p[rows, cols] @ v[cols, W*16 columns]; element (r, j) of p
 * at p[r * prs + j * pcs]. Always inlined so that each caller's strides are constants
 * where they are known (row-major p: pcs = 1; key-major: prs = 1). */
#define FA_DEFINE_PV_BLOCK(R, W)                                                           \
FA_V4 static inline __attribute__((always_inline))                                         \
void fa_pv_block_##R##_##W(int cols, const float *p, ptrdiff_t prs, ptrdiff_t pcs,         \
                           const float *v, ptrdiff_t ldv, float *acc, ptrdiff_t ldacc)     \
{                                                                                          \
    fa_v16 c[R][W];                                                                        \
    for (int r = 0; r < R; r++)                                                            \
        for (int w = 0; w < W; w++)                                                        \
            c[r][w] = FA_LOAD(acc + r * ldacc + 16 * w);                                   \
    for (int j = 0; j < cols; j++) {                                                       \
        fa_v16 b[W];                                                                       \
        if (R == 1)     /* one row: bound by reading v, so fetch ahead */                  \
            for (int w = 0; w < W; w++)                                                    \
                __builtin_prefetch(v + (j + 2 * FA_PREFETCH_ROWS) * ldv + 16 * w);         \
        for (int w = 0; w < W; w++)                                                        \
            b[w] = FA_LOAD(v + j * ldv + 16 * w);                                          \
        for (int r = 0; r < R; r++) {                                                      \
            float a = p[r * prs + j * pcs];                                                \
            for (int w = 0; w < W; w++)                                                    \
                c[r][w] += a * b[w];                                                       \
        }                                                                                  \
    }                                                                                      \
    for (int r = 0; r < R; r++)                                                            \
        for (int w = 0; w < W; w++)                                                        \
            FA_STORE(acc + r * ldacc + 16 * w, c[r][w]);                                   \
}
FA_DEFINE_PV_BLOCK(4, 4)
FA_DEFINE_PV_BLOCK(1, 4)
FA_DEFINE_PV_BLOCK(8, 2)
FA_DEFINE_PV_BLOCK(1, 2)
FA_DEFINE_PV_BLOCK(8, 1)
FA_DEFINE_PV_BLOCK(1, 1)

/* Run one of the blocks above over all rows: R-row blocks, then single rows. */
#define FA_PV_ROWS_LOOP(R, W)                                                              \
    do {                                                                                   \
        int r0 = 0;                                                                        \
        for (; r0 + R <= rows; r0 += R)                                                    \
            fa_pv_block_##R##_##W(cols, p + r0 * prs, prs, pcs, v + c0, ldv,               \
                                  acc + r0 * ldacc + c0, ldacc);                           \
        for (; r0 < rows; r0++)                                                            \
            fa_pv_block_1_##W(cols, p + r0 * prs, prs, pcs, v + c0, ldv,                   \
                              acc + r0 * ldacc + c0, ldacc);                               \
    } while (0)

/* The column blocks of acc: 64, then 32, then 16 values wide. */
#define FA_PV_ALL_COLUMNS()                                                                \
    do {                                                                                   \
        int c0 = 0;                                                                        \
        for (; c0 + 64 <= ev; c0 += 64)                                                    \
            FA_PV_ROWS_LOOP(4, 4);                                                         \
        for (; c0 + 32 <= ev; c0 += 32)                                                    \
            FA_PV_ROWS_LOOP(8, 2);                                                         \
        for (; c0 + 16 <= ev; c0 += 16)                                                    \
            FA_PV_ROWS_LOOP(8, 1);                                                         \
    } while (0)

/* acc[rows, ev] += p[rows, cols] @ v[cols, ev], ev a multiple of 16. */
FA_V4 static void fa_tile_pv_f32(int rows, int ev, int cols, const float *p, ptrdiff_t ldp,
                                 const float *v, ptrdiff_t ldv, float *acc, ptrdiff_t ldacc)
{
    const ptrdiff_t prs = ldp, pcs = 1;
    FA_PV_ALL_COLUMNS();
}

/* The same with p stored key-major: element (r, j) at pt[j * ldpt + r]. */
FA_V4 static void fa_tile_pv_t_f32(int rows, int ev, int cols, const float *pt,
                                   ptrdiff_t ldpt, const float *v, ptrdiff_t ldv, float *acc,
                                   ptrdiff_t ldacc)
{
    const float *p = pt;
    const ptrdiff_t prs = 1, pcs = ldpt;
    FA_PV_ALL_COLUMNS();
}

/* out[i] = the lane-wise partial products of q[0:e] and key i (of 16), e a multiple of
 * 16. Key rows are read one after the other, one sequential stream fetched ahead; the 16
 * partial vectors stay in registers. */
#define FA_DOT_KEY(i)                                                                      \
    for (int t0 = 0; t0 < e; t0 += 16) {                                                   \
        __builtin_prefetch(k + ((i) + FA_PREFETCH_ROWS) * ldk + t0);                       \
        x##i += FA_LOAD(q + t0) * FA_LOAD(k + (i) * ldk + t0);                             \
    }
FA_V4 static inline __attribute__((always_inline)) void fa_dots16(const float *q, const float *k, ptrdiff_t ldk, int e,
                                   fa_v16 *out)
{
    fa_v16 x0 = {0}, x1 = {0}, x2 = {0}, x3 = {0}, x4 = {0}, x5 = {0}, x6 = {0}, x7 = {0},
           x8 = {0}, x9 = {0}, x10 = {0}, x11 = {0}, x12 = {0}, x13 = {0}, x14 = {0},
           x15 = {0};
    FA_DOT_KEY(0); FA_DOT_KEY(1); FA_DOT_KEY(2); FA_DOT_KEY(3);
    FA_DOT_KEY(4); FA_DOT_KEY(5); FA_DOT_KEY(6); FA_DOT_KEY(7);
    FA_DOT_KEY(8); FA_DOT_KEY(9); FA_DOT_KEY(10); FA_DOT_KEY(11);
    FA_DOT_KEY(12); FA_DOT_KEY(13); FA_DOT_KEY(14); FA_DOT_KEY(15);
    out[0] = x0; out[1] = x1; out[2] = x2; out[3] = x3; out[4] = x4; out[5] = x5;
    out[6] = x6; out[7] = x7; out[8] = x8; out[9] = x9; out[10] = x10; out[11] = x11;
    out[12] = x12; out[13] = x13; out[14] = x14; out[15] = x15;
}

/* The same for the edges: nk < 16 keys (the rest zero) or e not a multiple of 16. */
FA_V4 static void fa_dots_partial(const float *q, const float *k, ptrdiff_t ldk, int e, int nk,
                                  fa_v16 *out)
{
    for (int i = 0; i < 16; i++)
        out[i] = (fa_v16){0};
    for (int t0 = 0; t0 < e; t0 += 16) {
        int nt = e - t0 < 16 ? e - t0 : 16;
        fa_v16 a = (fa_v16){0}, b;
        memcpy(&a, q + t0, nt * sizeof(float));
        for (int i = 0; i < nk; i++) {
            b = (fa_v16){0};
            memcpy(&b, k + i * ldk + t0, nt * sizeof(float));
            out[i] += a * b;
        }
    }
}

/* s[rows, cols] (row stride cols) = scale * q @ k.T for a few rows, without packing:
 * 16 keys at a time, one vector of partial dot products per key, the 16 partial
 * vectors transposed and added so that lane j holds the dot product with key j. */
FA_V4 static void fa_scores_by_dots(int rows, int cols, int e, float scale,
                                    const float *q, ptrdiff_t ldq,
                                    const float *k, ptrdiff_t ldk, float *s)
{
    fa_v16 acc[16];
    for (int r = 0; r < rows; r++) {
        const float *qr = q + r * ldq;
        for (int j0 = 0; j0 < cols; j0 += 16) {
            int nj = cols - j0 < 16 ? cols - j0 : 16;
            /* the usual head sizes get a copy with e known, fully unrolled */
            if (nj == 16 && e == 64) {
                fa_dots16(qr, k + j0 * ldk, ldk, 64, acc);
            } else if (nj == 16 && e == 128) {
                fa_dots16(qr, k + j0 * ldk, ldk, 128, acc);
            } else if (nj == 16 && e % 16 == 0) {
                fa_dots16(qr, k + j0 * ldk, ldk, e, acc);
            } else {
                fa_dots_partial(qr, k + j0 * ldk, ldk, e, nj, acc);
            }
            fa_store_part(s + r * cols + j0, fa_lane_sums16(acc) * scale, nj);
        }
    }
}

/* s[rows, cols] (row stride cols) = scale * q @ k.T. Returns 0 when the transposed-key
 * panel cannot be allocated (the caller then uses BLAS). */
FA_V4 static int fa_tile_scores_f32(int rows, int cols, int e, float scale,
                                    const float *q, ptrdiff_t ldq,
                                    const float *k, ptrdiff_t ldk, float *s)
{
    if (rows < FA_PACK_MIN_ROWS) {
        fa_scores_by_dots(rows, cols, e, scale, q, ldq, k, ldk, s);
        return 1;
    }
    ptrdiff_t ldkt = (cols + FA_PANEL - 1) / FA_PANEL * FA_PANEL;
    float *kt = (float *)malloc((size_t)(e > 0 ? e : 1) * ldkt * sizeof(float));
    if (kt == NULL)
        return 0;
    fa_pack_transposed(cols, e, k, ldk, kt, ldkt);
    fa_scores_from_panel(rows, cols, e, scale, q, ldq, kt, ldkt, s, cols);
    free(kt);
    return 1;
}

/* ---- key-major tiles -----------------------------------------------------------------
 * A tile with no mask can be computed with the keys along the rows instead: st = k @ q.T
 * (cols x rows). The packed, transposed operand is then the query block, packed once per
 * query block (fa_pack_transposed) and reused by all its tiles, where the row-major
 * scores transpose every tile's keys; and the online softmax runs down the columns, one
 * vector of 16 queries at a time, with no per-row calls or horizontal reductions. With
 * small tiles (the block-sparse layouts' 64 x 64) both costs are a large share of a tile.
 */

/* Row stride of a packed block of `rows` queries and of its key-major scores: whole
 * score panels, so that the score kernel stores whole vectors. */
static inline ptrdiff_t fa_kmajor_ld(int rows)
{
    return (rows + FA_PANEL - 1) / FA_PANEL * FA_PANEL;
}

/* Load / store the first n (0..16) lanes; missing lanes read as `fill`. */
FA_V4 static inline fa_v16 fa_load_part(const float *p, int n, float fill)
{
    if (n == 16)
        return FA_LOAD(p);
    fa_v16 x = (fa_v16){0} + fill;
    memcpy(&x, p, n * sizeof(float));
    return x;
}

/* The online-softmax step of a key-major tile whose scores are in st (cols x ldqt,
 * scaled), in three parts shared by the float32 step below and the bfloat16 one
 * (tilehalf.h), which differ only in how they store the probabilities:
 *   fa_kmajor_tile_max:   the score modifiers (mods, or NULL) applied and the scores
 *                         outside the band (query r sees key c only if band_lo <= c - r
 *                         <= band_hi) set to -inf, then each query's maximum over the
 *                         tile, into st[cols * ldqt + j]; 0 when a score is not finite
 *                         (inf or NaN inputs): the caller then takes the tile the
 *                         row-major way, which defines those cases;
 *   fa_kmajor_group_start: for queries g .. g + 15, the new maxima, the reference the
 *                         exponents subtract (the maxima, 0 for a row that has seen no
 *                         key yet, so that masked scores give exp(-inf) = 0) and
 *                         alpha = exp(m_old - m_new) (0 for a row's first keys);
 *   fa_kmajor_group_end:  l <- l * alpha + sum, m <- m_new, and the rows of acc whose
 *                         maximum grew rescaled by alpha. */
typedef float fa_kv16 __attribute__((vector_size(64)));

/* Soft-capping of 16 floats, cap * tanh(x / cap), by the rational function of
 * FA_TANH_VEC (tanhscores.h): with y = x / cap clamped to [-9, 9] (the fit range; tanh(9)
 * is 1 to within 3e-8, under half an ulp), cap * y P(y^2) / Q(y^2) = xc P(y^2) / Q(y^2)
 * for xc = x clamped to [-9 cap, 9 cap] (one vrangeps: the smaller magnitude of x and
 * 9 cap, with x's sign; it turns NaN into +-9 cap, so the caller sends tiles with a score
 * that is not finite the row way, fa_kmajor_tile_max). The division is a reciprocal
 * estimate refined once on the quotient (n = xc P, t = n r, t += r (n - Q t)); Q >= 1,
 * so the estimate is safe. 14 operations instead of 26 with FA_TANH_VEC's sign and
 * saturation masks and its division, which made soft-capping a dense float32 tile cost
 * 13% instead of 9% (L = S = 2048, E = 64, one thread). Within 2 ulp of FA_TANH_VEC's
 * results. */
FA_V4 static inline fa_kv16 fa_softcap_v16(fa_kv16 x, float cap, float inv_cap)
{
    typedef fa_kv16 vec;
    /* imm 0x02: the operand of smaller magnitude, the sign of the first */
    vec xc = (vec)_mm512_range_ps((__m512)x, _mm512_set1_ps(9.0f * cap), 0x02);
    vec y = xc * inv_cap;
    vec z = y * y;
    vec qz = FA_TANH_Q_f32(z);
    vec n = xc * FA_TANH_P_f32(z);
    vec r = (vec)_mm512_rcp14_ps((__m512)qz);
    vec t = n * r;
    return t + r * (n - qz * t);
}

/* The score modifiers (scoremods.h) on 16 key-major scores x: key c against queries
 * g .. g + 15, d = diag + g + lane - c; cap, 1 / cap and slope hoisted by the caller. */
FA_V4 static inline __attribute__((always_inline))
fa_kv16 fa_kmajor_mods(fa_kv16 x, float cap, float inv_cap, float slope, ptrdiff_t diag,
                       int c, int g)
{
    typedef fa_kv16 vec;
    typedef int32_t ivec __attribute__((vector_size(64)));
    if (cap > 0)
        x = fa_softcap_v16(x, cap, inv_cap);
    if (slope != 0) {
        const vec iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        vec d = (float)(diag + g - c) + iota;
        x -= slope * (vec)((ivec)d & ~((ivec){0} + (int32_t)0x80000000u));
    }
    return x;
}

/* Whether a key-major call's band leaves out any score of its rows x cols. */
static inline int fa_kmajor_banded(int rows, int cols, ptrdiff_t band_lo, ptrdiff_t band_hi)
{
    return band_lo > 1 - rows || band_hi < cols - 1;
}

FA_V4 static inline __attribute__((always_inline))
int fa_kmajor_tile_max(int rows, int cols, float *st, ptrdiff_t ldqt, float *tile_max,
                       const fa_score_mods *mods, ptrdiff_t band_lo, ptrdiff_t band_hi)
{
    typedef int32_t ivec __attribute__((vector_size(64)));
    const int banded = fa_kmajor_banded(rows, cols, band_lo, band_hi);
    for (int g = 0; g < rows; g += 16) {
        fa_v16 mx = (fa_v16){0} - __builtin_inff(), bad = (fa_v16){0};
        if (mods != NULL || banded) {
            /* the modifiers and the band first, in the same pass (st is read once either
             * way); lane i (query g + i) sees key c iff c - band_hi <= g + i <= c - band_lo,
             * i.e. lo_c <= i <= hi_c, both clamped to [-1, 16] */
            const float cap = mods ? (float)mods->softcap : 0.0f;
            const float slope = mods ? (float)mods->slope : 0.0f;
            const float inv_cap = cap > 0 ? 1.0f / cap : 0.0f;
            const ptrdiff_t diag = mods ? mods->diag : 0;
            const ivec lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
            const fa_v16 ninf = (fa_v16){0} - __builtin_inff();
            for (int c = 0; c < cols; c++) {
                fa_v16 x = FA_LOAD(st + (ptrdiff_t)c * ldqt + g);
                bad += x * 0.0f;      /* the scores as computed: the row way defines the rest */
                if (mods != NULL)
                    x = fa_kmajor_mods(x, cap, inv_cap, slope, diag, c, g);
                if (banded) {
                    ptrdiff_t lo = c - band_hi - g, hi = c - band_lo - g;
                    lo = lo < -1 ? -1 : lo > 16 ? 16 : lo;
                    hi = hi < -1 ? -1 : hi > 16 ? 16 : hi;
                    ivec keep = (lane >= (int32_t)lo) & (lane <= (int32_t)hi);
                    x = (fa_v16)(((ivec)x & keep) | ((ivec)ninf & ~keep));
                }
                FA_STORE(st + (ptrdiff_t)c * ldqt + g, x);
                mx = (fa_v16)_mm512_max_ps((__m512)x, (__m512)mx);
            }
        } else {
            for (int c = 0; c < cols; c++) {
                fa_v16 x = FA_LOAD(st + (ptrdiff_t)c * ldqt + g);
                mx = (fa_v16)_mm512_max_ps((__m512)x, (__m512)mx);
                bad += x * 0.0f;      /* NaN where x is not finite */
            }
        }
        for (int i = 0; i < 16; i++)
            if (bad[i] != bad[i])
                return 0;
        FA_STORE(tile_max + g, mx);
    }
    return 1;
}

FA_V4 static inline __attribute__((always_inline))
void fa_kmajor_group_start(int g, int n, const float *tile_max, const float *m,
                           const float *l, fa_kv16 *m_new, fa_kv16 *m_ref, fa_kv16 *l_old,
                           fa_kv16 *alpha)
{
    typedef fa_kv16 vec;
    typedef int32_t ivec __attribute__((vector_size(64)));
    enum { R = 1 };     /* vectors per FA_EXPNEG_VECS call */
    vec m_old = fa_load_part(m + g, n, 0.0f), d[1], a[1];
    *l_old = fa_load_part(l + g, n, 0.0f);
    *m_new = (vec)_mm512_max_ps((__m512)FA_LOAD(tile_max + g), (__m512)m_old);
    /* a row whose keys so far were all masked out by the band: -inf - -inf would be NaN */
    *m_ref = (vec)_mm512_mask_mov_ps((__m512)*m_new,
                                     _mm512_cmp_ps_mask((__m512)*m_new,
                                                        _mm512_set1_ps(-__builtin_inff()),
                                                        _CMP_EQ_OQ), _mm512_setzero_ps());
    d[0] = m_old - *m_ref;
    FA_EXPNEG_VECS(f32, d, a);
    *alpha = a[0];
}

FA_V4 static inline __attribute__((always_inline))
void fa_kmajor_group_end(int g, int n, int ev, fa_kv16 m_new, fa_kv16 l_old, fa_kv16 alpha,
                         fa_kv16 sum, float *m, float *l, float *acc, ptrdiff_t ldacc)
{
    fa_kv16 l_new = l_old * alpha + sum;
    memcpy(m + g, &m_new, n * sizeof(float));
    memcpy(l + g, &l_new, n * sizeof(float));
    /* acc was accumulated relative to the old maxima: rescale the rows whose grew
     * (a row with l_old == 0 has acc == 0 already) */
    for (int i = 0; i < n; i++) {
        if (alpha[i] != 1.0f && l_old[i] != 0.0f) {
            float *a = acc + (ptrdiff_t)(g + i) * ldacc;
            for (int j = 0; j < ev; j += 16)
                FA_STORE(a + j, FA_LOAD(a + j) * alpha[i]);
        }
    }
}

/* exp(x - m) for 16 scores x, given c = m * log2(e) (m: the row maxima, so x - m <= 0),
 * in base 2: t = x log2(e) - c in one fused step, t = n + f with n an integer and
 * |f| <= 1/2, 2^f by Cephes' exp2f polynomial (relative error 1.7e-7), and 2^n applied by
 * vscalefps. 9 operations where FA_EXPNEG_VECS takes 17 (Cody-Waite reduction, range
 * masks, 2^n built in the exponent bits): a key-major tile's softmax was 9% of its time
 * at E = 64. t is clamped below at -200 first, where p * 2^n is exactly 0: -inf (masked)
 * gives 0; a NaN score, or inf - inf, stays NaN (vmaxps returns its second operand when
 * either is NaN). The rounding of t costs up to |t| 2^-25 of relative error (4e-7 at
 * x - m = -10), as rounding x - m does for FA_EXPNEG_VECS. */
#define FA_EXP2_P0 1.535336188319500E-4f
#define FA_EXP2_P1 1.339887440266574E-3f
#define FA_EXP2_P2 9.618437357674640E-3f
#define FA_EXP2_P3 5.550332471162809E-2f
#define FA_EXP2_P4 2.402264791363012E-1f
#define FA_EXP2_P5 6.931472028550421E-1f
FA_V4 static inline __attribute__((always_inline)) fa_kv16 fa_exp_shifted16(fa_kv16 x,
                                                                           fa_kv16 c)
{
    typedef fa_kv16 vec;
    vec t = (vec)_mm512_fmsub_ps((__m512)x, _mm512_set1_ps(1.44269504088896341f), (__m512)c);
    t = (vec)_mm512_max_ps(_mm512_set1_ps(-200.0f), (__m512)t);
    vec n = (vec)_mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vec f = t - n;
    vec p = FA_EXP2_P0 * f + FA_EXP2_P1;
    p = p * f + FA_EXP2_P2;
    p = p * f + FA_EXP2_P3;
    p = p * f + FA_EXP2_P4;
    p = p * f + FA_EXP2_P5;
    p = p * f + 1.0f;
    return (vec)_mm512_scalef_ps((__m512)p, (__m512)n);
}

/* exp(st - m_sub) for queries g .. g + 15 of every key of the tile, in place; returns
 * the sums over the keys (added key by key, in order). */
FA_V4 static inline __attribute__((always_inline))
fa_kv16 fa_kmajor_exp_group(int g, int cols, float *st, ptrdiff_t ldqt, fa_kv16 m_sub)
{
    typedef fa_kv16 vec;
    const vec c = m_sub * 1.44269504088896341f;
    vec sum = (vec){0};
    int c0 = 0;
    for (; c0 + 4 <= cols; c0 += 4) {
        vec p[4];
        for (int u = 0; u < 4; u++)
            p[u] = fa_exp_shifted16(FA_LOAD(st + (ptrdiff_t)(c0 + u) * ldqt + g), c);
        for (int u = 0; u < 4; u++) {
            FA_STORE(st + (ptrdiff_t)(c0 + u) * ldqt + g, p[u]);
            sum += p[u];
        }
    }
    for (; c0 < cols; c0++) {
        float *x = st + (ptrdiff_t)c0 * ldqt + g;
        vec p = fa_exp_shifted16(FA_LOAD(x), c);
        FA_STORE(x, p);
        sum += p;
    }
    return sum;
}

/* The float32 step: st <- exp(mods(st) - m_new), st needing (cols + 1) * ldqt floats (the
 * last row holds the maxima). Returns 0 as fa_kmajor_tile_max does, the state untouched.
 * max_ready: no mods and no band, and the last row of st already holds the maxima
 * (fa_scores_panel_max, which leaves NaN scores out of them). A score that is not finite
 * then shows as a NaN sum (NaN - m, or inf - inf for a +inf maximum; a -inf score gives
 * 0, as the row way does), found before the state changes. */
FA_V4 static int fa_kmajor_softmax_f32(int rows, int cols, int ev, float *st, ptrdiff_t ldqt,
                                       const fa_score_mods *mods, ptrdiff_t band_lo,
                                       ptrdiff_t band_hi,
                                       float *acc, ptrdiff_t ldacc, float *m, float *l,
                                       int max_ready)
{
    typedef fa_kv16 vec;
    float *tile_max = st + (ptrdiff_t)cols * ldqt;
    if (max_ready) {
        enum { GROUPS = 512 / 16 };
        if (rows <= 512) {
            vec m_new[GROUPS], m_sub[GROUPS], l_old[GROUPS], alpha[GROUPS], sum[GROUPS];
            int bad = 0;
            for (int g = 0, i = 0; g < rows; g += 16, i++) {
                int n = rows - g < 16 ? rows - g : 16;
                fa_kmajor_group_start(g, n, tile_max, m, l, &m_new[i], &m_sub[i], &l_old[i],
                                      &alpha[i]);
                sum[i] = fa_kmajor_exp_group(g, cols, st, ldqt, m_sub[i]);
                __mmask16 nan = _mm512_cmp_ps_mask((__m512)sum[i], (__m512)sum[i],
                                                   _CMP_UNORD_Q);
                bad |= (nan & (__mmask16)((1u << n) - 1)) != 0;
            }
            if (bad)
                return 0;
            for (int g = 0, i = 0; g < rows; g += 16, i++) {
                int n = rows - g < 16 ? rows - g : 16;
                fa_kmajor_group_end(g, n, ev, m_new[i], l_old[i], alpha[i], sum[i], m, l,
                                    acc, ldacc);
            }
            return 1;
        }
    }
    if (!fa_kmajor_tile_max(rows, cols, st, ldqt, tile_max, mods, band_lo, band_hi))
        return 0;
    for (int g = 0; g < rows; g += 16) {
        int n = rows - g < 16 ? rows - g : 16;
        vec m_new, m_sub, l_old, alpha, sum;
        fa_kmajor_group_start(g, n, tile_max, m, l, &m_new, &m_sub, &l_old, &alpha);
        sum = fa_kmajor_exp_group(g, cols, st, ldqt, m_sub);
        fa_kmajor_group_end(g, n, ev, m_new, l_old, alpha, sum, m, l, acc, ldacc);
    }
    return 1;
}

/* One tile of the online softmax, key-major, with no mask beyond a band:
 *   qt: the query block packed by fa_pack_transposed(rows, e, q, ldq, qt, ldqt),
 *       ldqt = fa_kmajor_ld(rows); or rows r0 .. r0 + rows of a larger packed block
 *       (qt + r0, r0 a multiple of FA_PANEL, its own ldqt); scale multiplies its
 *       products with the keys (1: qt was packed scaled, fa_pack_transposed_scaled);
 *   k: cols x e, v: cols x ev (row strides ldk, ldv), ev a multiple of 16;
 *   st: scratch of (cols + 1) * ldqt floats;
 *   mods: the score modifiers, or NULL;
 *   band_lo, band_hi: query r sees key c iff band_lo <= c - r <= band_hi (as attend_tile's
 *       band; -FA_KMAJOR_NO_BAND, FA_KMAJOR_NO_BAND for all);
 *   acc (rows x ev, row stride ldacc), m and l (rows): the running state, as in
 *   attend_tile (tile.pxd).
 * Returns 0 as fa_kmajor_softmax_f32 does. */
FA_V4 static int fa_attend_tile_kmajor_f32(int rows, int cols, int e, int ev, float scale,
                                           const float *qt, ptrdiff_t ldqt,
                                           const float *k, ptrdiff_t ldk,
                                           const float *v, ptrdiff_t ldv, float *st,
                                           const fa_score_mods *mods, ptrdiff_t band_lo,
                                           ptrdiff_t band_hi,
                                           float *acc, ptrdiff_t ldacc, float *m, float *l)
{
    /* st[c, :] = scale * k[c] . q[:] for the rows queries, rounded up to whole panels
     * (zero-padded, or the next rows of a larger packed block); without modifiers or a
     * band, each query's maximum over the keys with them (st's last row) */
    const int plain = mods == NULL && !fa_kmajor_banded(rows, cols, band_lo, band_hi);
    const int nq = (int)fa_kmajor_ld(rows);
    if (plain)
        fa_scores_panel_max(cols, nq, e, scale, k, ldk, qt, ldqt, st, ldqt,
                            st + (ptrdiff_t)cols * ldqt);
    else
        fa_scores_from_panel(cols, nq, e, scale, k, ldk, qt, ldqt, st, ldqt);
    if (!fa_kmajor_softmax_f32(rows, cols, ev, st, ldqt, mods, band_lo, band_hi, acc, ldacc,
                               m, l, plain))
        return 0;
    fa_tile_pv_t_f32(rows, ev, cols, st, ldqt, v, ldv, acc, ldacc);
    return 1;
}

static int fa_tile_products_ok(int ev)
{
    static int have = -1;
    if (have < 0) {
        __builtin_cpu_init();
        have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
               && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    }
    return have && ev % 16 == 0;
}

#else   /* no AVX-512 kernels in this build: BLAS everywhere */

static int fa_tile_products_ok(int ev) { (void)ev; return 0; }
static int fa_tile_scores_f32(int rows, int cols, int e, float scale, const float *q,
                              ptrdiff_t ldq, const float *k, ptrdiff_t ldk, float *s)
{ (void)rows; (void)cols; (void)e; (void)scale; (void)q; (void)ldq; (void)k; (void)ldk;
  (void)s; return 0; }
static void fa_tile_pv_f32(int rows, int ev, int cols, const float *p, ptrdiff_t ldp,
                           const float *v, ptrdiff_t ldv, float *acc, ptrdiff_t ldacc)
{ (void)rows; (void)ev; (void)cols; (void)p; (void)ldp; (void)v; (void)ldv; (void)acc;
  (void)ldacc; }
static void fa_tile_pv_t_f32(int rows, int ev, int cols, const float *pt, ptrdiff_t ldpt,
                             const float *v, ptrdiff_t ldv, float *acc, ptrdiff_t ldacc)
{ (void)rows; (void)ev; (void)cols; (void)pt; (void)ldpt; (void)v; (void)ldv; (void)acc;
  (void)ldacc; }
static inline ptrdiff_t fa_kmajor_ld(int rows) { return rows; }
static void fa_pack_transposed(int cols, int e, const float *k, ptrdiff_t ldk, float *kt,
                               ptrdiff_t ldkt)
{ (void)cols; (void)e; (void)k; (void)ldk; (void)kt; (void)ldkt; }
static void fa_pack_transposed_scaled(int cols, int e, const float *k, ptrdiff_t ldk,
                                      float *kt, ptrdiff_t ldkt, float scale)
{ (void)cols; (void)e; (void)k; (void)ldk; (void)kt; (void)ldkt; (void)scale; }
static void fa_scores_from_panel(int rows, int cols, int e, float scale, const float *q,
                                 ptrdiff_t ldq, const float *kt, ptrdiff_t ldkt, float *s,
                                 ptrdiff_t lds)
{ (void)rows; (void)cols; (void)e; (void)scale; (void)q; (void)ldq; (void)kt; (void)ldkt;
  (void)s; (void)lds; }
static int fa_attend_tile_kmajor_f32(int rows, int cols, int e, int ev, float scale,
                                     const float *qt, ptrdiff_t ldqt, const float *k,
                                     ptrdiff_t ldk, const float *v, ptrdiff_t ldv, float *st,
                                     const fa_score_mods *mods, ptrdiff_t band_lo,
                                     ptrdiff_t band_hi,
                                     float *acc, ptrdiff_t ldacc, float *m, float *l)
{ (void)rows; (void)cols; (void)e; (void)ev; (void)scale; (void)qt; (void)ldqt; (void)k;
  (void)ldk; (void)v; (void)ldv; (void)st; (void)mods; (void)band_lo; (void)band_hi;
  (void)acc; (void)ldacc; (void)m; (void)l; return 0; }

#endif
#endif  /* FASTATTN_TILEGEMM_H */
