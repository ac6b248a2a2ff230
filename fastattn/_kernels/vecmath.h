/*
 * vecmath.h -- the vector loops of the tile/softmax core, shared by every kernel family.
 *
 * Each routine works on one row of a score tile. They are written as plain C loops that
 * gcc auto-vectorises; on x86-64 gcc builds every routine is compiled three times
 * (AVX-512, AVX2+FMA, baseline SSE2) and the best one is picked at load time through an
 * ifunc, so wheels need no -march=native.
 *
 * Reductions (max, sum) keep FA_LANES independent partial results, which lets the
 * compiler vectorise them without -ffast-math (no reassociation of one accumulator).
 * The build never uses -ffast-math: masked scores are -inf and must stay -inf.
 *
 * exp is only ever needed for x - rowmax <= 0, so fa_exp_* handle (-inf, 0] (and NaN,
 * which propagates). Error: float < 2 ulp, double < 1 ulp over that range.
 */
#ifndef FASTATTN_VECMATH_H
#define FASTATTN_VECMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(FASTATTN_NO_CLONES)
#define FA_VECTOR __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_VECTOR
#endif

#define FA_LANES 16
#define FA_VEC_BYTES 64      /* one AVX-512 register; narrower ISAs split it */

/* ---- exp of a non-positive argument, element-wise, branch-free -------------------- */

/* float: n = round(x*log2 e); r = x - n ln2 (two-part Cody-Waite); degree-6 minimax
 * polynomial (Cephes expf); 2^n built in the exponent bits.  n is read off the
 * rounding constant's mantissa so no float->int conversion is needed. */
static inline float fa_expneg_f32(float x)
{
    const float lo = -87.33654f;                 /* ln(FLT_MIN): below it the result is 0 */
    float xc = x < lo ? lo : x;                  /* NaN compares false and passes through */
    float kf = xc * 1.44269504088896341f + 12582912.0f;   /* 0x1.8p23: round to integer */
    int32_t kbits;
    memcpy(&kbits, &kf, 4);
    float n = kf - 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    int32_t ebits = (kbits - 0x4B400000 + 127) << 23;      /* 2^n, n in [-126, 0] */
    float scale;
    memcpy(&scale, &ebits, 4);
    float y = p * scale;
    return x < lo ? 0.0f : y;
}

/* double: same scheme, degree-13 Taylor polynomial on |r| <= ln2/2 (error < 1e-17). */
static inline double fa_expneg_f64(double x)
{
    const double lo = -708.3964185322641;        /* ln(DBL_MIN) */
    double xc = x < lo ? lo : x;
    double kf = xc * 1.4426950408889634 + 6755399441055744.0;   /* 0x1.8p52 */
    int64_t kbits;
    memcpy(&kbits, &kf, 8);
    double n = kf - 6755399441055744.0;
    double r = xc - n * 6.93147180369123816490e-01;
    r = r - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    int64_t ebits = (kbits - 0x4338000000000000LL + 1023) << 52;
    double scale;
    memcpy(&scale, &ebits, 8);
    double y = p * scale;
    return x < lo ? 0.0 : y;
}


/* Constants of the exp above, shared by the scalar and the vector (fa_exp_sum_*) forms. */
#define FA_EXP_LO_f32 (-87.33654f)
#define FA_LOG2E_f32 1.44269504088896341f
#define FA_ROUND_f32 12582912.0f
#define FA_ROUND_BITS_f32 0x4B400000
#define FA_LN2HI_f32 0.693359375f
#define FA_LN2LO_f32 (-2.12194440e-4f)
#define FA_BIAS_f32 127
#define FA_MANT_f32 23
#define FA_EXP_POLY_f32(r) \
    ((((((((1.9875691500E-4f * (r) + 1.3981999507E-3f) * (r) + 8.3334519073E-3f) * (r) \
    + 4.1665795894E-2f) * (r) + 1.6666665459E-1f) * (r) + 5.0000001201E-1f) * (r) * (r)) + (r)) + 1.0f)
#define FA_EXP_LO_f64 (-708.3964185322641)
#define FA_LOG2E_f64 1.4426950408889634
#define FA_ROUND_f64 6755399441055744.0
#define FA_ROUND_BITS_f64 0x4338000000000000LL
#define FA_LN2HI_f64 6.93147180369123816490e-01
#define FA_LN2LO_f64 1.90821492927058770002e-10
#define FA_BIAS_f64 1023
#define FA_MANT_f64 52
#define FA_EXP_POLY_f64(r) \
    (((((((((((((1.0 / 6227020800.0 * (r) + 1.0 / 479001600.0) * (r) + 1.0 / 39916800.0) * (r) \
    + 1.0 / 3628800.0) * (r) + 1.0 / 362880.0) * (r) + 1.0 / 40320.0) * (r) + 1.0 / 5040.0) * (r) \
    + 1.0 / 720.0) * (r) + 1.0 / 120.0) * (r) + 1.0 / 24.0) * (r) + 1.0 / 6.0) * (r) + 0.5) \
    * (r) * (r) + (r)) + 1.0)

/* ---- row routines, instantiated for float and double ------------------------------- */
/* Every routine accepts n == 0. Max of nothing (or of all -inf) is -inf. */

#define FA_DEFINE_ROW_ROUTINES(T, IT, SFX, EXPNEG)                                              \
                                                                                           \
/* max_j x[j]; NaN if any x[j] is NaN (a NaN score must give a NaN row, not a masked one). */ \
/* Written with GCC vector types: gcc does not vectorise a scalar `a > b ? a : b` max        */ \
/* reduction without -ffast-math, but lowers this compare-and-blend to each clone's ISA.    */ \
FA_VECTOR static T fa_max_##SFX(const T *x, ptrdiff_t n)                                   \
{                                                                                          \
    enum { W = FA_VEC_BYTES / sizeof(T) };                                                 \
    typedef T vec __attribute__((vector_size(FA_VEC_BYTES)));                              \
    typedef IT ivec __attribute__((vector_size(FA_VEC_BYTES)));                            \
    vec acc = (vec){0} - (T)INFINITY;                                                      \
    ivec nan = (ivec){0};                                                                  \
    ptrdiff_t j = 0;                                                                       \
    for (; j + W <= n; j += W) {                                                           \
        vec v;                                                                             \
        memcpy(&v, x + j, sizeof v);                                                       \
        ivec greater = (ivec)(v > acc);                                                    \
        acc = (vec)(((ivec)v & greater) | ((ivec)acc & ~greater));                         \
        nan |= (ivec)(v != v);                                                             \
    }                                                                                      \
    T m = -INFINITY;                                                                       \
    int any_nan = 0;                                                                       \
    for (; j < n; j++) { m = x[j] > m ? x[j] : m; any_nan |= x[j] != x[j]; }               \
    for (int k = 0; k < W; k++) { m = acc[k] > m ? acc[k] : m; any_nan |= nan[k] != 0; }   \
    return any_nan ? (T)NAN : m;                                                           \
}                                                                                          \
                                                                                           \
/* x[j] += add[j]; return max_j x[j]   (float mask) */                                     \
FA_VECTOR static T fa_add_max_##SFX(T *x, const T *add, ptrdiff_t n)                       \
{                                                                                          \
    for (ptrdiff_t j = 0; j < n; j++) x[j] += add[j];                                      \
    return fa_max_##SFX(x, n);                                                             \
}                                                                                          \
                                                                                           \
/* x[j] = keep[j] ? x[j] : -inf; return max_j x[j]   (bool mask, True = keep) */           \
FA_VECTOR static T fa_keep_max_##SFX(T *x, const uint8_t *keep, ptrdiff_t n)               \
{                                                                                          \
    for (ptrdiff_t j = 0; j < n; j++) x[j] = keep[j] ? x[j] : (T)-INFINITY;                \
    return fa_max_##SFX(x, n);                                                             \
}                                                                                          \
                                                                                           \
/* x[j] = exp(x[j] - m); return sum_j x[j].  m must be finite.                            */ \
/* The exp of fa_expneg_* on whole vectors (GCC vector types, as for the max).              */ \
FA_VECTOR static T fa_exp_sum_##SFX(T *x, ptrdiff_t n, T m)                                \
{                                                                                          \
    enum { W = FA_VEC_BYTES / sizeof(T) };                                                 \
    typedef T vec __attribute__((vector_size(FA_VEC_BYTES)));                              \
    typedef IT ivec __attribute__((vector_size(FA_VEC_BYTES)));                            \
    const vec zero = (vec){0};                                                             \
    vec acc = zero;                                                                        \
    ptrdiff_t j = 0;                                                                       \
    for (; j + W <= n; j += W) {                                                           \
        vec v;                                                                             \
        memcpy(&v, x + j, sizeof v);                                                       \
        v = v - m;                                                                         \
        ivec below = (ivec)(v < zero + FA_EXP_LO_##SFX);   /* result 0 (and -inf -> 0) */  \
        vec vc = (vec)(((ivec)(zero + FA_EXP_LO_##SFX) & below) | ((ivec)v & ~below));     \
        vec kf = vc * FA_LOG2E_##SFX + FA_ROUND_##SFX;                                     \
        vec nf = kf - FA_ROUND_##SFX;                                                      \
        vec r = vc - nf * FA_LN2HI_##SFX;                                                  \
        r = r - nf * FA_LN2LO_##SFX;                                                       \
        vec p = FA_EXP_POLY_##SFX(r);                                                      \
        ivec ebits = (((ivec)kf - FA_ROUND_BITS_##SFX) + FA_BIAS_##SFX) << FA_MANT_##SFX;  \
        vec e = p * (vec)ebits;                                                            \
        e = (vec)((ivec)e & ~below);                                                       \
        memcpy(x + j, &e, sizeof e);                                                       \
        acc += e;                                                                          \
    }                                                                                      \
    T s = 0;                                                                               \
    for (; j < n; j++) { T e = EXPNEG(x[j] - m); x[j] = e; s += e; }                       \
    for (int k = 0; k < W; k++) s += acc[k];                                               \
    return s;                                                                              \
}                                                                                          \
                                                                                           \
/* x[j] *= a */                                                                            \
FA_VECTOR static void fa_scale_##SFX(T *x, ptrdiff_t n, T a)                               \
{                                                                                          \
    for (ptrdiff_t j = 0; j < n; j++) x[j] *= a;                                           \
}                                                                                          \
                                                                                           \
/* y[j] += a * x[j] */                                                                     \
FA_VECTOR static void fa_axpy_##SFX(T *y, const T *x, ptrdiff_t n, T a)                    \
{                                                                                          \
    for (ptrdiff_t j = 0; j < n; j++) y[j] += a * x[j];                                    \
}                                                                                          \
                                                                                           \
/* sum_j x[j] * y[j] */                                                                    \
FA_VECTOR static T fa_dot_##SFX(const T *x, const T *y, ptrdiff_t n)                       \
{                                                                                          \
    T acc[FA_LANES];                                                                       \
    for (int k = 0; k < FA_LANES; k++) acc[k] = 0;                                         \
    ptrdiff_t j = 0;                                                                       \
    for (; j + FA_LANES <= n; j += FA_LANES)                                               \
        for (int k = 0; k < FA_LANES; k++) acc[k] += x[j + k] * y[j + k];                  \
    T s = 0;                                                                               \
    for (; j < n; j++) s += x[j] * y[j];                                                   \
    for (int k = 0; k < FA_LANES; k++) s += acc[k];                                        \
    return s;                                                                              \
}

FA_DEFINE_ROW_ROUTINES(float, int32_t, f32, fa_expneg_f32)
FA_DEFINE_ROW_ROUTINES(double, int64_t, f64, fa_expneg_f64)

/* ---- softmax helpers (softmax.pyx) ------------------------------------------------- */

#define FA_DEFINE_SOFTMAX_ROUTINES(T, SFX)                                                  \
                                                                                           \
/* y[j] = a * x[j]   (y may be x) */                                                       \
FA_VECTOR static void fa_copy_scale_##SFX(T *y, const T *x, ptrdiff_t n, T a)              \
{                                                                                          \
    for (ptrdiff_t j = 0; j < n; j++) y[j] = a * x[j];                                     \
}                                                                                          \
                                                                                           \
/* x[j] += c */                                                                            \
FA_VECTOR static void fa_add_const_##SFX(T *x, ptrdiff_t n, T c)                           \
{                                                                                          \
    for (ptrdiff_t j = 0; j < n; j++) x[j] += c;                                           \
}

FA_DEFINE_SOFTMAX_ROUTINES(float, f32)
FA_DEFINE_SOFTMAX_ROUTINES(double, f64)

/* ---- additive (Bahdanau) scores (additive.pyx) ------------------------------------- */

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

/* Unlike FA_VECTOR's clones (one vector width for all), each ISA gets its own register
 * width: a vector wider than the registers that is carried across loop iterations (the
 * accumulators) lives in memory, which made 64-byte vectors half as fast as 32-byte ones
 * with AVX2, while AVX-512 runs 64-byte ones 1.5x faster (both measured on a Zen 4 core).
 * The AVX-512 and AVX2 versions are picked at run time from the CPU's features. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) \
    && !defined(FASTATTN_NO_CLONES)
#define FA_TANH_WIDTHS 1
#else
#define FA_TANH_WIDTHS 0
#endif

#define FA_TANH_SCORES_ARGS(T) \
    (const T *a, const T *bt, ptrdiff_t ldb, const T *w, ptrdiff_t h, ptrdiff_t n, T *s)

#if FA_TANH_WIDTHS
#define FA_DEFINE_TANH_SCORES(T, IT, SFX)                                                   \
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma")))                          \
static void fa_tanh_scores_zmm_##SFX FA_TANH_SCORES_ARGS(T)                                \
FA_TANH_SCORES_BODY(T, IT, SFX, 64)                                                        \
__attribute__((target("avx2,fma")))                                                        \
static void fa_tanh_scores_ymm_##SFX FA_TANH_SCORES_ARGS(T)                                \
FA_TANH_SCORES_BODY(T, IT, SFX, 32)                                                        \
static void fa_tanh_scores_any_##SFX FA_TANH_SCORES_ARGS(T)                                \
FA_TANH_SCORES_BODY(T, IT, SFX, 32)                                                        \
static void fa_tanh_scores_##SFX FA_TANH_SCORES_ARGS(T)                                    \
{                                                                                          \
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")            \
        && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")        \
        && __builtin_cpu_supports("fma"))                                                  \
        fa_tanh_scores_zmm_##SFX(a, bt, ldb, w, h, n, s);                                  \
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))              \
        fa_tanh_scores_ymm_##SFX(a, bt, ldb, w, h, n, s);                                  \
    else                                                                                   \
        fa_tanh_scores_any_##SFX(a, bt, ldb, w, h, n, s);                                  \
}
#else
#define FA_DEFINE_TANH_SCORES(T, IT, SFX)                                                   \
static void fa_tanh_scores_##SFX FA_TANH_SCORES_ARGS(T)                                    \
FA_TANH_SCORES_BODY(T, IT, SFX, 32)
#endif

FA_DEFINE_TANH_SCORES(float, int32_t, f32)
FA_DEFINE_TANH_SCORES(double, int64_t, f64)

/* ---- small GEMMs for decoding: a few query rows against one key/value block (paged.pyx) */

/* Hint the caches to load [p, p + nbytes): paged blocks sit at scattered addresses, where
 * the hardware prefetchers start late. Never faults, whatever the address. Locality 2
 * (x86: prefetcht1, into L2) measured faster than 3: L1's few miss buffers fill up and
 * stall the loop. */
static inline void fa_prefetch(const void *p, ptrdiff_t nbytes)
{
#if defined(__GNUC__)
    for (ptrdiff_t o = 0; o < nbytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 2);
#else
    (void)p; (void)nbytes;
#endif
}

/* The small GEMMs below also take a range [pf, pf_end) to prefetch (the key/value piece
 * the caller reads a little later, or NULL) and spread its cache lines over their inner
 * loops, a line or two per iteration: issued in one burst before each call, the hints
 * fill the load queue and stall it. In a C model of the paged decode loop on one Zen 4
 * core: 9 GB/s with bursts, 18 spread (as fast as a plain streaming read), 7 with none.
 * Whatever is left (shapes whose loops are shorter) is issued when the call returns. */
static inline void fa_prefetch_some(const char **pf, const char *pf_end, int lines)
{
#if defined(__GNUC__)
    for (int z = 0; z < lines && *pf < pf_end; z++, *pf += 64) __builtin_prefetch(*pf, 0, 2);
#else
    (void)pf; (void)pf_end; (void)lines;
#endif
}

/* For a few query rows a BLAS call on a (rows x 16 keys) tile costs more than its
 * arithmetic; paged.py picks these loops there. They use GCC/clang vector types
 * (32 bytes: one AVX register, two SSE2 ones), since the plain loops did not vectorise
 * across rows. Scores: 4 rows x 4 keys accumulate as 16 independent FMA chains (8 would
 * leave the FMA units waiting on their latency; each key and query vector is loaded once
 * per 4 uses), the 16 dot products finished by a shuffle tree (fa_lane_sums_*) instead
 * of one lane sum each. p @ v: 4 rows x 2 vectors, 8 chains, each value row read once
 * per 4 rows. Other compilers get plain loops. Every routine accepts m, n or k == 0. */

#if defined(__GNUC__)

/* helpers inlined into each target clone of their caller (else built for the baseline) */
#define FA_INLINE static inline __attribute__((always_inline))

typedef float fa_vec_f32 __attribute__((vector_size(32)));
typedef double fa_vec_f64 __attribute__((vector_size(32)));
typedef int32_t fa_lanes_f32 __attribute__((vector_size(32)));
typedef int64_t fa_lanes_f64 __attribute__((vector_size(32)));
enum { FA_VL_f32 = 8, FA_VL_f64 = 4 };

/* Lane j of the result = the sum of the lanes of x[j], for j < 8 (float) or 4 (double):
 * a transpose that adds its two halves at each step, so the VL sums cost VL - 1 shuffle
 * pairs in all. At step b, lanes with bit b clear hold partial sums of x[i], lanes with
 * it set those of x[i + b]. The additions are a fixed pairwise tree (no -ffast-math). */
#define FA_FOLD(i, j, lo, hi) \
    x##i = __builtin_shuffle(x##i, x##j, lo) + __builtin_shuffle(x##i, x##j, hi)
FA_INLINE fa_vec_f32 fa_lane_sums_f32(const fa_vec_f32 *x)
{
    const fa_lanes_f32 lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    const fa_lanes_f32 lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const fa_lanes_f32 lo1 = {0, 8, 2, 10, 4, 12, 6, 14}, hi1 = {1, 9, 3, 11, 5, 13, 7, 15};
    fa_vec_f32 x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3],
               x4 = x[4], x5 = x[5], x6 = x[6], x7 = x[7];
    FA_FOLD(0, 4, lo4, hi4); FA_FOLD(1, 5, lo4, hi4); FA_FOLD(2, 6, lo4, hi4);
    FA_FOLD(3, 7, lo4, hi4);
    FA_FOLD(0, 2, lo2, hi2); FA_FOLD(1, 3, lo2, hi2);
    FA_FOLD(0, 1, lo1, hi1);
    return x0;
}
FA_INLINE fa_vec_f64 fa_lane_sums_f64(const fa_vec_f64 *x)
{
    const fa_lanes_f64 lo2 = {0, 1, 4, 5}, hi2 = {2, 3, 6, 7};
    const fa_lanes_f64 lo1 = {0, 4, 2, 6}, hi1 = {1, 5, 3, 7};
    fa_vec_f64 x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
    FA_FOLD(0, 2, lo2, hi2); FA_FOLD(1, 3, lo2, hi2);
    FA_FOLD(0, 1, lo1, hi1);
    return x0;
}
#undef FA_FOLD

#define FA_DEFINE_SMALL_GEMMS(T, SFX)                                                       \
                                                                                           \
FA_INLINE fa_vec_##SFX fa_load_##SFX(const T *p)                                       \
{                                                                                          \
    fa_vec_##SFX v;                                                                        \
    memcpy(&v, p, sizeof v);                                                               \
    return v;                                                                              \
}                                                                                          \
                                                                                           \
FA_INLINE void fa_store_##SFX(T *p, fa_vec_##SFX v) { memcpy(p, &v, sizeof v); }       \
                                                                                           \
FA_INLINE T fa_hsum_##SFX(fa_vec_##SFX v)                                              \
{                                                                                          \
    T s[FA_VL_##SFX];                                                                      \
    memcpy(s, &v, sizeof v);                                                               \
    for (int h = FA_VL_##SFX / 2; h > 0; h /= 2)                                           \
        for (int k = 0; k < h; k++) s[k] += s[k + h];                                      \
    return s[0];                                                                           \
}                                                                                          \
                                                                                           \
/* dot products of x with 4 rows y0..y3 of length k: r[i] = x . yi */                      \
FA_INLINE void fa_dot4_##SFX(const T *x, const T *y0, const T *y1, const T *y2,        \
                                 const T *y3, ptrdiff_t k, T *r)                           \
{                                                                                          \
    enum { VL = FA_VL_##SFX };                                                             \
    fa_vec_##SFX a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                   \
    fa_vec_##SFX b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};                                   \
    ptrdiff_t p = 0;                                                                       \
    for (; p + 2 * VL <= k; p += 2 * VL) {                                                 \
        fa_vec_##SFX x0 = fa_load_##SFX(x + p), x1 = fa_load_##SFX(x + p + VL);            \
        a0 += fa_load_##SFX(y0 + p) * x0; b0 += fa_load_##SFX(y0 + p + VL) * x1;           \
        a1 += fa_load_##SFX(y1 + p) * x0; b1 += fa_load_##SFX(y1 + p + VL) * x1;           \
        a2 += fa_load_##SFX(y2 + p) * x0; b2 += fa_load_##SFX(y2 + p + VL) * x1;           \
        a3 += fa_load_##SFX(y3 + p) * x0; b3 += fa_load_##SFX(y3 + p + VL) * x1;           \
    }                                                                                      \
    for (; p + VL <= k; p += VL) {                                                         \
        fa_vec_##SFX x0 = fa_load_##SFX(x + p);                                            \
        a0 += fa_load_##SFX(y0 + p) * x0; a1 += fa_load_##SFX(y1 + p) * x0;                \
        a2 += fa_load_##SFX(y2 + p) * x0; a3 += fa_load_##SFX(y3 + p) * x0;                \
    }                                                                                      \
    r[0] = fa_hsum_##SFX(a0 + b0); r[1] = fa_hsum_##SFX(a1 + b1);                          \
    r[2] = fa_hsum_##SFX(a2 + b2); r[3] = fa_hsum_##SFX(a3 + b3);                          \
    for (; p < k; p++) {                                                                   \
        r[0] += x[p] * y0[p]; r[1] += x[p] * y1[p];                                        \
        r[2] += x[p] * y2[p]; r[3] += x[p] * y3[p];                                        \
    }                                                                                      \
}                                                                                          \
                                                                                           \
/* 4 rows x0..x3 against 4 rows y0..y3 (row strides ldx, ldy) of length k:             \
 * r[4 * i + j] = xi . yj, as 16 chains; 2 lines of the prefetch range per step (with     \
 * 32-byte vectors that covers 4 rows of y by the end) */                                  \
FA_INLINE void fa_dot4x4_##SFX(const T *x, ptrdiff_t ldx, const T *y, ptrdiff_t ldy,       \
                               ptrdiff_t k, T *r, const char **pf, const char *pf_end)     \
{                                                                                          \
    enum { VL = FA_VL_##SFX };                                                             \
    const T *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;                  \
    const T *y0 = y, *y1 = y + ldy, *y2 = y + 2 * ldy, *y3 = y + 3 * ldy;                  \
    fa_vec_##SFX acc[16] = {{0}};                                                          \
    ptrdiff_t p = 0;                                                                       \
    for (; p + VL <= k; p += VL) {                                                         \
        fa_prefetch_some(pf, pf_end, 2);                                                   \
        fa_vec_##SFX z0 = fa_load_##SFX(y0 + p), z1 = fa_load_##SFX(y1 + p);               \
        fa_vec_##SFX z2 = fa_load_##SFX(y2 + p), z3 = fa_load_##SFX(y3 + p);               \
        fa_vec_##SFX u;                                                                    \
        u = fa_load_##SFX(x0 + p);                                                         \
        acc[0] += u * z0; acc[1] += u * z1; acc[2] += u * z2; acc[3] += u * z3;            \
        u = fa_load_##SFX(x1 + p);                                                         \
        acc[4] += u * z0; acc[5] += u * z1; acc[6] += u * z2; acc[7] += u * z3;            \
        u = fa_load_##SFX(x2 + p);                                                         \
        acc[8] += u * z0; acc[9] += u * z1; acc[10] += u * z2; acc[11] += u * z3;          \
        u = fa_load_##SFX(x3 + p);                                                         \
        acc[12] += u * z0; acc[13] += u * z1; acc[14] += u * z2; acc[15] += u * z3;        \
    }                                                                                      \
    for (int g = 0; g < 16; g += VL) {                                                     \
        fa_vec_##SFX s = fa_lane_sums_##SFX(acc + g);                                      \
        memcpy(r + g, &s, sizeof s);                                                       \
    }                                                                                      \
    for (; p < k; p++)                                                                     \
        for (int i = 0; i < 4; i++)                                                        \
            for (int j = 0; j < 4; j++) r[4 * i + j] += x[i * ldx + p] * y[j * ldy + p];   \
}                                                                                          \
                                                                                           \
/* one row x against 8 rows y0..y7 (row stride ldy): r[j] = x . yj, as 8 chains;        \
 * 4 lines of the prefetch range per step (8 rows of y by the end) */                      \
FA_INLINE void fa_dot1x8_##SFX(const T *x, const T *y, ptrdiff_t ldy, ptrdiff_t k, T *r,   \
                               const char **pf, const char *pf_end)                        \
{                                                                                          \
    enum { VL = FA_VL_##SFX };                                                             \
    fa_vec_##SFX acc[8] = {{0}};                                                           \
    ptrdiff_t p = 0;                                                                       \
    for (; p + VL <= k; p += VL) {                                                         \
        fa_prefetch_some(pf, pf_end, 4);                                                   \
        fa_vec_##SFX u = fa_load_##SFX(x + p);                                             \
        for (int j = 0; j < 8; j++) acc[j] += u * fa_load_##SFX(y + j * ldy + p);          \
    }                                                                                      \
    for (int g = 0; g < 8; g += VL) {                                                      \
        fa_vec_##SFX s = fa_lane_sums_##SFX(acc + g);                                      \
        memcpy(r + g, &s, sizeof s);                                                       \
    }                                                                                      \
    for (; p < k; p++)                                                                     \
        for (int j = 0; j < 8; j++) r[j] += x[p] * y[j * ldy + p];                         \
}                                                                                          \
                                                                                           \
FA_INLINE T fa_dot1_##SFX(const T *x, const T *y, ptrdiff_t k)                         \
{                                                                                          \
    enum { VL = FA_VL_##SFX };                                                             \
    fa_vec_##SFX a = {0}, b = {0};                                                         \
    ptrdiff_t p = 0;                                                                       \
    for (; p + 2 * VL <= k; p += 2 * VL) {                                                 \
        a += fa_load_##SFX(x + p) * fa_load_##SFX(y + p);                                  \
        b += fa_load_##SFX(x + p + VL) * fa_load_##SFX(y + p + VL);                        \
    }                                                                                      \
    for (; p + VL <= k; p += VL) a += fa_load_##SFX(x + p) * fa_load_##SFX(y + p);         \
    T r = fa_hsum_##SFX(a + b);                                                            \
    for (; p < k; p++) r += x[p] * y[p];                                                   \
    return r;                                                                              \
}                                                                                          \
                                                                                           \
/* c[i*ldc + j] = alpha * sum_p a[i*lda + p] * b[j*ldb + p]   (i < m, j < n: c = a b^T); \
 * prefetches [pf, pf + pf_bytes) on the way */                                            \
FA_VECTOR static void fa_gemm_abt_small_##SFX(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,       \
        T alpha, const T *a, ptrdiff_t lda, const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc, \
        const void *pf, ptrdiff_t pf_bytes)                                                \
{                                                                                          \
    const char *pf_at = (const char *)pf, *pf_end = pf ? pf_at + pf_bytes : pf_at;         \
    T r[16];                                                                               \
    ptrdiff_t i = 0;                                                                       \
    for (; i + 4 <= m; i += 4) {            /* 4 rows of a against 4 rows of b, then 1 */  \
        const T *ai = a + i * lda;                                                         \
        ptrdiff_t j = 0;                                                                   \
        for (; j + 4 <= n; j += 4) {                                                       \
            fa_dot4x4_##SFX(ai, lda, b + j * ldb, ldb, k, r, &pf_at, pf_end);              \
            for (int t = 0; t < 4; t++)                                                    \
                for (int u = 0; u < 4; u++) c[(i + t) * ldc + j + u] = alpha * r[4 * t + u]; \
        }                                                                                  \
        for (; j < n; j++) {                                                               \
            fa_dot4_##SFX(b + j * ldb, ai, ai + lda, ai + 2 * lda, ai + 3 * lda, k, r);    \
            for (int t = 0; t < 4; t++) c[(i + t) * ldc + j] = alpha * r[t];               \
        }                                                                                  \
    }                                                                                      \
    for (; i < m; i++) {                    /* one row of a against 8, 4, 1 rows of b */   \
        const T *ai = a + i * lda;                                                         \
        ptrdiff_t j = 0;                                                                   \
        for (; j + 8 <= n; j += 8) {                                                       \
            fa_dot1x8_##SFX(ai, b + j * ldb, ldb, k, r, &pf_at, pf_end);                   \
            for (int t = 0; t < 8; t++) c[i * ldc + j + t] = alpha * r[t];                 \
        }                                                                                  \
        for (; j + 4 <= n; j += 4) {                                                       \
            const T *bj = b + j * ldb;                                                     \
            fa_dot4_##SFX(ai, bj, bj + ldb, bj + 2 * ldb, bj + 3 * ldb, k, r);             \
            for (int t = 0; t < 4; t++) c[i * ldc + j + t] = alpha * r[t];                 \
        }                                                                                  \
        for (; j < n; j++) c[i * ldc + j] = alpha * fa_dot1_##SFX(ai, b + j * ldb, k);     \
    }                                                                                      \
    fa_prefetch(pf_at, pf_end - pf_at);                                                    \
}                                                                                          \
                                                                                           \
/* c[i*ldc + j] += sum_p a[i*lda + p] * b[p*ldb + j]   (i < m, j < n: c += a b);         \
 * prefetches [pf, pf + pf_bytes) on the way, a line per step (k rows of b by the end) */  \
FA_VECTOR static void fa_gemm_ab_acc_small_##SFX(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,    \
        const T *a, ptrdiff_t lda, const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc,         \
        const void *pf, ptrdiff_t pf_bytes)                                                \
{                                                                                          \
    enum { VL = FA_VL_##SFX };                                                             \
    const char *pf_at = (const char *)pf, *pf_end = pf ? pf_at + pf_bytes : pf_at;         \
    ptrdiff_t i = 0;                                                                       \
    /* 4 rows of c, 2 vectors of columns at a time, accumulated in registers over k */     \
    for (; i + 4 <= m; i += 4) {                                                           \
        const T *a0 = a + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;        \
        T *c0 = c + i * ldc, *c1 = c0 + ldc, *c2 = c1 + ldc, *c3 = c2 + ldc;              \
        ptrdiff_t j = 0;                                                                   \
        for (; j + 2 * VL <= n; j += 2 * VL) {                                             \
            fa_vec_##SFX t0 = fa_load_##SFX(c0 + j), u0 = fa_load_##SFX(c0 + j + VL);      \
            fa_vec_##SFX t1 = fa_load_##SFX(c1 + j), u1 = fa_load_##SFX(c1 + j + VL);      \
            fa_vec_##SFX t2 = fa_load_##SFX(c2 + j), u2 = fa_load_##SFX(c2 + j + VL);      \
            fa_vec_##SFX t3 = fa_load_##SFX(c3 + j), u3 = fa_load_##SFX(c3 + j + VL);      \
            for (ptrdiff_t p = 0; p < k; p++) {                                            \
                fa_prefetch_some(&pf_at, pf_end, 1);                                       \
                fa_vec_##SFX x = fa_load_##SFX(b + p * ldb + j);                           \
                fa_vec_##SFX y = fa_load_##SFX(b + p * ldb + j + VL);                      \
                t0 += a0[p] * x; u0 += a0[p] * y; t1 += a1[p] * x; u1 += a1[p] * y;        \
                t2 += a2[p] * x; u2 += a2[p] * y; t3 += a3[p] * x; u3 += a3[p] * y;        \
            }                                                                              \
            fa_store_##SFX(c0 + j, t0); fa_store_##SFX(c0 + j + VL, u0);                   \
            fa_store_##SFX(c1 + j, t1); fa_store_##SFX(c1 + j + VL, u1);                   \
            fa_store_##SFX(c2 + j, t2); fa_store_##SFX(c2 + j + VL, u2);                   \
            fa_store_##SFX(c3 + j, t3); fa_store_##SFX(c3 + j + VL, u3);                   \
        }                                                                                  \
        for (; j < n; j++)                                                                 \
            for (ptrdiff_t p = 0; p < k; p++) {                                            \
                T x = b[p * ldb + j];                                                      \
                c0[j] += a0[p] * x; c1[j] += a1[p] * x;                                    \
                c2[j] += a2[p] * x; c3[j] += a3[p] * x;                                    \
            }                                                                              \
    }                                                                                      \
    /* each remaining row, 4 vectors of columns at a time, then one, then scalars */       \
    for (; i < m; i++) {                                                                   \
        const T *ai = a + i * lda;                                                         \
        T *ci = c + i * ldc;                                                               \
        ptrdiff_t j = 0;                                                                   \
        for (; j + 4 * VL <= n; j += 4 * VL) {                                             \
            fa_vec_##SFX t0 = fa_load_##SFX(ci + j), t1 = fa_load_##SFX(ci + j + VL);      \
            fa_vec_##SFX t2 = fa_load_##SFX(ci + j + 2 * VL);                              \
            fa_vec_##SFX t3 = fa_load_##SFX(ci + j + 3 * VL);                              \
            for (ptrdiff_t p = 0; p < k; p++) {                                            \
                fa_prefetch_some(&pf_at, pf_end, 2);                                       \
                const T *bp = b + p * ldb + j;                                             \
                t0 += ai[p] * fa_load_##SFX(bp); t1 += ai[p] * fa_load_##SFX(bp + VL);     \
                t2 += ai[p] * fa_load_##SFX(bp + 2 * VL);                                  \
                t3 += ai[p] * fa_load_##SFX(bp + 3 * VL);                                  \
            }                                                                              \
            fa_store_##SFX(ci + j, t0); fa_store_##SFX(ci + j + VL, t1);                   \
            fa_store_##SFX(ci + j + 2 * VL, t2); fa_store_##SFX(ci + j + 3 * VL, t3);      \
        }                                                                                  \
        for (; j + VL <= n; j += VL) {                                                     \
            fa_vec_##SFX t0 = fa_load_##SFX(ci + j);                                       \
            for (ptrdiff_t p = 0; p < k; p++) t0 += ai[p] * fa_load_##SFX(b + p * ldb + j); \
            fa_store_##SFX(ci + j, t0);                                                    \
        }                                                                                  \
        for (; j < n; j++)                                                                 \
            for (ptrdiff_t p = 0; p < k; p++) ci[j] += ai[p] * b[p * ldb + j];             \
    }                                                                                      \
    fa_prefetch(pf_at, pf_end - pf_at);                                                    \
}

#else   /* no vector types: plain loops */

#define FA_DEFINE_SMALL_GEMMS(T, SFX)                                                       \
static void fa_gemm_abt_small_##SFX(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, T alpha,        \
        const T *a, ptrdiff_t lda, const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc,         \
        const void *pf, ptrdiff_t pf_bytes)                                                \
{                                                                                          \
    if (pf) fa_prefetch(pf, pf_bytes);                                                     \
    for (ptrdiff_t i = 0; i < m; i++)                                                      \
        for (ptrdiff_t j = 0; j < n; j++)                                                  \
            c[i * ldc + j] = alpha * fa_dot_##SFX(a + i * lda, b + j * ldb, k);            \
}                                                                                          \
static void fa_gemm_ab_acc_small_##SFX(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,              \
        const T *a, ptrdiff_t lda, const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc,         \
        const void *pf, ptrdiff_t pf_bytes)                                                \
{                                                                                          \
    if (pf) fa_prefetch(pf, pf_bytes);                                                     \
    for (ptrdiff_t i = 0; i < m; i++)                                                      \
        for (ptrdiff_t p = 0; p < k; p++)                                                  \
            fa_axpy_##SFX(c + i * ldc, b + p * ldb, n, a[i * lda + p]);                    \
}

#endif

FA_DEFINE_SMALL_GEMMS(float, f32)
FA_DEFINE_SMALL_GEMMS(double, f64)

#endif /* FASTATTN_VECMATH_H */
