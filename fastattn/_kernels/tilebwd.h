/*
 * tilebwd.h -- the element-wise step of the attention backward (backward.pyx); its float32
 * tile products are the forward's (tilegemm.h: fa_pack_transposed, fa_scores_from_panel,
 * fa_tile_pv_f32, fa_tile_pv_t_f32, declared in tile.pxd).
 *
 * For one row of a (query block, key block) tile, with s the scaled, masked scores and
 * dp = dO V^T:
 *     p  = exp(s - lse)             (the forward's probabilities, recomputed)
 *     ds = a * p * (dp - d)         (d = rowsum(dO * O); a = the softmax scale, or 1)
 * written over s and dp in one pass. s - lse <= 0 up to rounding when lse belongs to
 * these scores (the contract of the backward); -inf scores give p = 0; NaN propagates.
 * The AVX-512 version uses the vector exp of vecmath.h (FA_EXPNEG_VECS, the forward's
 * exp); other CPUs run the same operations one element at a time (fa_expneg_*).
 * The build never uses -ffast-math.
 */
#ifndef FASTATTN_TILEBWD_H
#define FASTATTN_TILEBWD_H

#include <stddef.h>
#include <stdint.h>

#include "vecmath.h"
#include "tilegemm.h"
#include "tilehalf.h"

#define FA_DEFINE_BWD_PROBS_SCALAR(T, SFX)                                                 \
static void fa_bwd_probs_scalar_##SFX(T *s, T *dp, ptrdiff_t n, T lse, T d, T a)          \
{                                                                                          \
    for (ptrdiff_t j = 0; j < n; j++) {                                                    \
        T p = fa_expneg_##SFX(s[j] - lse);                                                 \
        s[j] = p;                                                                          \
        dp[j] = a * (p * (dp[j] - d));                                                     \
    }                                                                                      \
}
FA_DEFINE_BWD_PROBS_SCALAR(float, f32)
FA_DEFINE_BWD_PROBS_SCALAR(double, f64)

#if FA_TILE_KERNELS

/* The vector version: four vectors at a time (independent exps for the out-of-order
 * core), then one, then the scalar tail; fa_bwd_probs_* picks it on CPUs with AVX-512. */
#define FA_DEFINE_BWD_PROBS(T, IT, SFX, LANES)                                             \
FA_V4 static void fa_bwd_probs_v4_##SFX(T *s, T *dp, ptrdiff_t n, T lse, T d, T a)        \
{                                                                                          \
    typedef T vec __attribute__((vector_size(64)));                                        \
    typedef IT ivec __attribute__((vector_size(64)));                                      \
    typedef T vecu __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));        \
    ptrdiff_t j = 0;                                                                       \
    {                                                                                      \
        enum { R = 4 };                                                                    \
        for (; j + R * LANES <= n; j += R * LANES) {                                       \
            vec z[R], p[R];                                                                \
            FA_ALL(z[u_] = *(const vecu *)(s + j + u_ * LANES) - lse)                      \
            FA_EXPNEG_VECS(SFX, z, p);                                                     \
            FA_ALL(*(vecu *)(s + j + u_ * LANES) = p[u_])                                  \
            FA_ALL(*(vecu *)(dp + j + u_ * LANES) =                                        \
                   a * (p[u_] * (*(const vecu *)(dp + j + u_ * LANES) - d)))               \
        }                                                                                  \
    }                                                                                      \
    {                                                                                      \
        enum { R = 1 };                                                                    \
        for (; j + LANES <= n; j += LANES) {                                               \
            vec z[1], p[1];                                                                \
            z[0] = *(const vecu *)(s + j) - lse;                                           \
            FA_EXPNEG_VECS(SFX, z, p);                                                     \
            *(vecu *)(s + j) = p[0];                                                       \
            *(vecu *)(dp + j) = a * (p[0] * (*(const vecu *)(dp + j) - d));                \
        }                                                                                  \
    }                                                                                      \
    fa_bwd_probs_scalar_##SFX(s + j, dp + j, n - j, lse, d, a);                            \
}                                                                                          \
static void fa_bwd_probs_##SFX(T *s, T *dp, ptrdiff_t n, T lse, T d, T a)                 \
{                                                                                          \
    if (fa_tile_products_ok(16))    /* the CPU has AVX-512 (F, VL, BW, DQ) */              \
        fa_bwd_probs_v4_##SFX(s, dp, n, lse, d, a);                                        \
    else                                                                                   \
        fa_bwd_probs_scalar_##SFX(s, dp, n, lse, d, a);                                    \
}

#else   /* no AVX-512 kernels in this build: the scalar exp */

#define FA_DEFINE_BWD_PROBS(T, IT, SFX, LANES)                                             \
static void fa_bwd_probs_##SFX(T *s, T *dp, ptrdiff_t n, T lse, T d, T a)                 \
{                                                                                          \
    fa_bwd_probs_scalar_##SFX(s, dp, n, lse, d, a);                                        \
}

#endif

FA_DEFINE_BWD_PROBS(float, int32_t, f32, 16)
FA_DEFINE_BWD_PROBS(double, int64_t, f64, 8)

/* ---- bfloat16 products (CPUs with AVX512_BF16, tilehalf.h's way 2) ---------------------
 * The products whose reduction runs over the query rows (dV += P^T dO, dK += dS^T Q)
 * take P and dS rounded to bfloat16 as pairs of rows: */

#if FA_HALF_KERNELS
/* pt[u * ldpt + c] = (bf16(x[2u, c]), bf16(x[2u + 1, c])) for u < (rows + 1) / 2, c < cols
 * (x row-major, row stride ldx), rounded to nearest even; a missing row 2u + 1 reads 0. */
FA_BF16 static void fa_bwd_row_pairs(int rows, int cols, const float *x, ptrdiff_t ldx,
                                     uint32_t *pt, ptrdiff_t ldpt)
{
    for (int u = 0; u < (rows + 1) / 2; u++) {
        const float *a = x + 2 * u * ldx;
        const float *b = 2 * u + 1 < rows ? a + ldx : NULL;
        uint32_t *out = pt + u * ldpt;
        int c = 0;
        for (; c + 16 <= cols; c += 16) {
            __m512 va = _mm512_loadu_ps(a + c);
            __m512 vb = b ? _mm512_loadu_ps(b + c) : _mm512_setzero_ps();
            __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(va));
            __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(vb));
            _mm512_storeu_si512(out + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
        for (; c < cols; c++)
            out[c] = (uint32_t)fa_f32_to_bf16(a[c])
                     | ((uint32_t)(b ? fa_f32_to_bf16(b[c]) : 0) << 16);
    }
}
#else
static void fa_bwd_row_pairs(int rows, int cols, const float *x, ptrdiff_t ldx,
                             uint32_t *pt, ptrdiff_t ldpt)
{ (void)rows; (void)cols; (void)x; (void)ldx; (void)pt; (void)ldpt; }
#endif

#endif  /* FASTATTN_TILEBWD_H */
