/*
 * tanhscores.h -- the scores of additive (Bahdanau) attention, additive.pyx:
 * sum_c w[c] * tanh(a[c] + b[c, j]) for one projected query against a block of keys,
 * with a rational tanh, one version per ISA (the dispatch machinery of vecmath.h).
 */
#ifndef FASTATTN_TANHSCORES_H
#define FASTATTN_TANHSCORES_H

#include "vecmath.h"      /* FA_DEFINE_BY_ISA */

/* tanh(x) = x P(x^2) / Q(x^2) for |x| <= c, exactly +-1 beyond c and at +-inf; NaN stays
 * NaN, -0 stays -0. P/Q is the minimax rational approximation of tanh(x)/x in relative
 * error on [0, r] (a rational Remez exchange in 50-digit arithmetic); all coefficients are
 * positive, so the Horner sums never cancel; P(0) = Q(0) = 1, so tanh(x) = x for tiny x.
 * c < r where the rounded quotient would pass 1 (with FMA; without, a double can still
 * come out 1 ulp above 1 between 17.6 and 17.9).
 * One division and no exp: the exp-based formula costs an exp and two divisions.
 *   float  [4/4], r = 9, c = 8 (1 - tanh 8 = 2.3e-7 = 3.8 ulp): approximation error
 *          2.1e-8; over every float at most 5 ulp with FMA, 6.3 without (the rounding of
 *          the Horner steps and the division, not the approximation).
 *   double [9/9], r = 19.1, c = 17.9 (1 - tanh 17.9 = 5.7e-16 = 5 ulp): approximation
 *          error 7.1e-17; against tanhl at 4e7 points at most 8 ulp with FMA, 9 without
 *          (absolute error at most 1e-15). */
#define FA_TANH_C_f32 8.0f
#define FA_TANH_P_f32(z) ((((1.335465427e-08f * (z) + 2.060907536e-05f) * (z) \
    + 3.495587735e-03f) * (z) + 1.338102520e-01f) * (z) + 1.0f)
#define FA_TANH_Q_f32(z) ((((7.776554867e-07f * (z) + 3.285634157e-04f) * (z) \
    + 2.587698027e-02f) * (z) + 4.671434164e-01f) * (z) + 1.0f)
#define FA_TANH_C_f64 17.9
#define FA_TANH_P_f64(z) (((((((((2.49253667590070978e-23 * (z) + 7.39533910468194157e-19) \
    * (z) + 3.05867963710775499e-15) * (z) + 4.16683250094880823e-12) * (z) \
    + 2.43914065999291102e-09) * (z) + 6.82846669615807607e-07) * (z) \
    + 9.35896501016260840e-05) * (z) + 5.97436168427638303e-03) * (z) \
    + 1.51803012210423777e-01) * (z) + 1.0)
#define FA_TANH_Q_f64(z) (((((((((6.20466978273676082e-21 * (z) + 5.62020757302280071e-17) \
    * (z) + 1.26877890550281447e-13) * (z) + 1.11031007882528970e-10) * (z) \
    + 4.46139313586382029e-08) * (z) + 8.75180839807571201e-06) * (z) \
    + 8.28045389918737940e-04) * (z) + 3.43531435321969975e-02) * (z) \
    + 4.85136345543756231e-01) * (z) + 1.0)

/* tanh of a vector x of the enclosing scope's types vec / ivec (IT lanes). Selects are bit
 * masks made by a shift, not comparisons: gcc turns a vector comparison wider than the
 * ISA's registers into scalar code. big = all ones where c - |x| < 0 (|x| > c or inf); for
 * NaN, c - |x| is a NaN with the sign of |x|, i.e. clear, and the NaN goes through. */
#define FA_TANH_VEC(IT, SFX, x) ({                                                         \
    const ivec sign_ = (ivec){0} + ((IT)1 << (8 * sizeof(IT) - 1));                        \
    vec ax_ = (vec)((ivec)(x) & ~sign_);                                                   \
    ivec big_ = (ivec)(FA_TANH_C_##SFX - ax_) >> (8 * sizeof(IT) - 1);                     \
    vec xc_ = (vec)((ivec)ax_ & ~big_);                                                    \
    vec z_ = xc_ * xc_;                                                                    \
    vec t_ = xc_ * FA_TANH_P_##SFX(z_) / FA_TANH_Q_##SFX(z_);                              \
    (vec)((ivec)t_ | ((ivec)((vec){0} + 1) & big_) | ((ivec)(x) & sign_));                 \
})

/* Callers pad the key axis to a multiple of this many elements (64 bytes of float). */
#define FA_TANH_KEY_PAD 16

/* s[j] = sum_{c < h} w[c] * tanh(a[c] + bt[c * ldb + j])   for j < n, n a multiple of
 * FA_TANH_KEY_PAD: the scores of one projected query a (h) against n keys whose
 * projections are the columns of bt (h x n, row stride ldb). Vectorised over keys, so no
 * lane sums: each step over the hidden axis broadcasts a[c] and w[c] and updates two
 * vectors of keys (then one), as independent FMA chains. The sum over c is blocked (16
 * terms per partial sum): one running sum of all h terms had 3x the float32 rounding
 * error of the pairwise-summed NumPy formula. VB is the vector width in bytes. */
#define FA_TANH_SUM_BLOCK 16
#define FA_TANH_SCORES_BODY(T, IT, SFX, VB)                                                 \
{                                                                                          \
    typedef T vec __attribute__((vector_size(VB)));                                        \
    typedef IT ivec __attribute__((vector_size(VB)));                                      \
    enum { W = VB / sizeof(T) };                                                           \
    ptrdiff_t j = 0;                                                                       \
    for (; j + 2 * W <= n; j += 2 * W) {                                                   \
        vec acc0 = {0}, acc1 = {0};                                                        \
        for (ptrdiff_t c0 = 0; c0 < h; c0 += FA_TANH_SUM_BLOCK) {                          \
            ptrdiff_t c1 = c0 + FA_TANH_SUM_BLOCK < h ? c0 + FA_TANH_SUM_BLOCK : h;        \
            const T *col = bt + c0 * ldb + j;                                              \
            vec part0 = {0}, part1 = {0};                                                  \
            for (ptrdiff_t c = c0; c < c1; c++, col += ldb) {                              \
                vec x0, x1;                                                                \
                memcpy(&x0, col, sizeof x0);                                               \
                memcpy(&x1, col + W, sizeof x1);                                           \
                x0 += a[c];                                                                \
                x1 += a[c];                                                                \
                part0 += w[c] * FA_TANH_VEC(IT, SFX, x0);                                  \
                part1 += w[c] * FA_TANH_VEC(IT, SFX, x1);                                  \
            }                                                                              \
            acc0 += part0;                                                                 \
            acc1 += part1;                                                                 \
        }                                                                                  \
        memcpy(s + j, &acc0, sizeof acc0);                                                 \
        memcpy(s + j + W, &acc1, sizeof acc1);                                             \
    }                                                                                      \
    for (; j < n; j += W) {                                                                \
        vec acc0 = {0};                                                                    \
        for (ptrdiff_t c0 = 0; c0 < h; c0 += FA_TANH_SUM_BLOCK) {                          \
            ptrdiff_t c1 = c0 + FA_TANH_SUM_BLOCK < h ? c0 + FA_TANH_SUM_BLOCK : h;        \
            const T *col = bt + c0 * ldb + j;                                              \
            vec part0 = {0};                                                               \
            for (ptrdiff_t c = c0; c < c1; c++, col += ldb) {                              \
                vec x0;                                                                    \
                memcpy(&x0, col, sizeof x0);                                               \
                x0 += a[c];                                                                \
                part0 += w[c] * FA_TANH_VEC(IT, SFX, x0);                                  \
            }                                                                              \
            acc0 += part0;                                                                 \
        }                                                                                  \
        memcpy(s + j, &acc0, sizeof acc0);                                                 \
    }                                                                                      \
}

/* One version per ISA at its register width (FA_WIDTHS, vecmath.h): a vector wider than the
 * registers that is carried across loop iterations (the accumulators) lives in memory,
 * which made 64-byte vectors half as fast as 32-byte ones with AVX2, while AVX-512 runs
 * 64-byte ones 1.5x faster, and SSE2 runs 16-byte ones 1.8x (float) and 1.5x (double)
 * faster than 32-byte ones (all measured on a Zen 4 core). The width does not change the
 * results: each key has its own lane and its own sums. */
#define FA_TANH_SCORES_ARGS(T) \
    (const T *a, const T *bt, ptrdiff_t ldb, const T *w, ptrdiff_t h, ptrdiff_t n, T *s)

#define FA_DEFINE_TANH_SCORES(T, IT, SFX)                                                   \
FA_DEFINE_BY_ISA(fa_tanh_scores, SFX, FA_TANH_SCORES_ARGS(T), (a, bt, ldb, w, h, n, s),    \
                 FA_TANH_SCORES_BODY, (T, IT, SFX), 64, 32, 16, FA_NATIVE_BYTES)

FA_DEFINE_TANH_SCORES(float, int32_t, f32)
FA_DEFINE_TANH_SCORES(double, int64_t, f64)

#endif /* FASTATTN_TANHSCORES_H */
