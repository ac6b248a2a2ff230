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

/* ---- softmax and additive-attention helpers (softmax.pyx, additive.pyx) ------------ */

/* tanh, branch-free (both branches computed, one selected) so loops vectorise.
 * |x| < 0.625: Cephes odd polynomial/rational approximation (no cancellation near 0);
 * else (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 0.29]. NaN propagates, +-inf -> +-1.
 * Error: float < 3 ulp, double < 2 ulp (checked against np.tanh in the tests). */
static inline float fa_tanh_f32(float x)
{
    float ax = fabsf(x);
    float z = x * x;
    float p = -5.70498872745E-3f;
    p = p * z + 2.06390887954E-2f;
    p = p * z - 5.37397155531E-2f;
    p = p * z + 1.33314422036E-1f;
    p = p * z - 3.33332819422E-1f;
    float small = p * z * x + x;
    float e = fa_expneg_f32(-2.0f * ax);
    float big = copysignf((1.0f - e) / (1.0f + e), x);
    return ax < 0.625f ? small : big;
}

static inline double fa_tanh_f64(double x)
{
    double ax = fabs(x);
    double z = x * x;
    double p = (-9.64399179425052238628E-1 * z - 9.92877231001918586564E1) * z
               - 1.61468768441708447952E3;
    double q = ((z + 1.12811678491632931402E2) * z + 2.23548839060100448583E3) * z
               + 4.84406305325125486048E3;
    double small = x + x * z * (p / q);
    double e = fa_expneg_f64(-2.0 * ax);
    double big = copysign((1.0 - e) / (1.0 + e), x);
    return ax < 0.625 ? small : big;
}

#define FA_DEFINE_SOFTMAX_ROUTINES(T, SFX, TANH)                                            \
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
}                                                                                          \
                                                                                           \
/* sum_j w[j] * tanh(a[j] + b[j])   (the Bahdanau score of one query/key pair) */          \
FA_VECTOR static T fa_tanh_dot_##SFX(const T *a, const T *b, const T *w, ptrdiff_t n)      \
{                                                                                          \
    T acc[FA_LANES];                                                                       \
    for (int k = 0; k < FA_LANES; k++) acc[k] = 0;                                         \
    ptrdiff_t j = 0;                                                                       \
    for (; j + FA_LANES <= n; j += FA_LANES)                                               \
        for (int k = 0; k < FA_LANES; k++)                                                 \
            acc[k] += w[j + k] * TANH(a[j + k] + b[j + k]);                                \
    T s = 0;                                                                               \
    for (; j < n; j++) s += w[j] * TANH(a[j] + b[j]);                                      \
    for (int k = 0; k < FA_LANES; k++) s += acc[k];                                        \
    return s;                                                                              \
}

FA_DEFINE_SOFTMAX_ROUTINES(float, f32, fa_tanh_f32)
FA_DEFINE_SOFTMAX_ROUTINES(double, f64, fa_tanh_f64)

/* ---- small GEMMs for decoding: a few query rows against one key/value block (paged.pyx) */

/* For one query row (or small calls) a BLAS call on a (rows x 16 keys) tile costs more
 * than its arithmetic; paged.py picks these loops there (with OpenBLAS, BLAS wins from 2
 * rows up). They use GCC/clang vector types (32 bytes: one AVX register, two SSE2 ones),
 * since the plain loops did not vectorise across rows. 4 rows x 2 keys (scores) or
 * 4 rows x 2 vectors (p @ v) accumulate in registers as 8 independent FMA chains, each
 * key or value row read once per 4 rows; dot products end in a pairwise lane sum.
 * Other compilers get plain loops. Every routine accepts m, n or k == 0. */

#if defined(__GNUC__)

/* helpers inlined into each target clone of their caller (else built for the baseline) */
#define FA_INLINE static inline __attribute__((always_inline))

#define FA_DEFINE_SMALL_GEMMS(T, SFX)                                                       \
                                                                                           \
typedef T fa_vec_##SFX __attribute__((vector_size(32)));                                   \
enum { FA_VL_##SFX = 32 / sizeof(T) };                                                     \
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
/* two rows x0, x1 against 4 rows y0..y3: r[4 * a + i] = xa . yi (8 chains, and each     \
 * y vector loaded once for both x rows) */                                                \
FA_INLINE void fa_dot4x2_##SFX(const T *x0, const T *x1, const T *y0, const T *y1,         \
                               const T *y2, const T *y3, ptrdiff_t k, T *r)                \
{                                                                                          \
    enum { VL = FA_VL_##SFX };                                                             \
    fa_vec_##SFX a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                   \
    fa_vec_##SFX b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};                                   \
    ptrdiff_t p = 0;                                                                       \
    for (; p + VL <= k; p += VL) {                                                         \
        fa_vec_##SFX u = fa_load_##SFX(x0 + p), w = fa_load_##SFX(x1 + p);                 \
        fa_vec_##SFX z0 = fa_load_##SFX(y0 + p), z1 = fa_load_##SFX(y1 + p);               \
        fa_vec_##SFX z2 = fa_load_##SFX(y2 + p), z3 = fa_load_##SFX(y3 + p);               \
        a0 += z0 * u; a1 += z1 * u; a2 += z2 * u; a3 += z3 * u;                            \
        b0 += z0 * w; b1 += z1 * w; b2 += z2 * w; b3 += z3 * w;                            \
    }                                                                                      \
    r[0] = fa_hsum_##SFX(a0); r[1] = fa_hsum_##SFX(a1);                                    \
    r[2] = fa_hsum_##SFX(a2); r[3] = fa_hsum_##SFX(a3);                                    \
    r[4] = fa_hsum_##SFX(b0); r[5] = fa_hsum_##SFX(b1);                                    \
    r[6] = fa_hsum_##SFX(b2); r[7] = fa_hsum_##SFX(b3);                                    \
    for (; p < k; p++) {                                                                   \
        r[0] += x0[p] * y0[p]; r[1] += x0[p] * y1[p];                                      \
        r[2] += x0[p] * y2[p]; r[3] += x0[p] * y3[p];                                      \
        r[4] += x1[p] * y0[p]; r[5] += x1[p] * y1[p];                                      \
        r[6] += x1[p] * y2[p]; r[7] += x1[p] * y3[p];                                      \
    }                                                                                      \
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
/* c[i*ldc + j] = alpha * sum_p a[i*lda + p] * b[j*ldb + p]   (i < m, j < n: c = a b^T) */ \
FA_VECTOR static void fa_gemm_abt_small_##SFX(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,       \
        T alpha, const T *a, ptrdiff_t lda, const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc) \
{                                                                                          \
    T r[8];                                                                                \
    ptrdiff_t i = 0;                                                                       \
    for (; i + 4 <= m; i += 4) {            /* 4 rows of a against 2 rows of b, then 1 */  \
        const T *ai = a + i * lda;                                                         \
        ptrdiff_t j = 0;                                                                   \
        for (; j + 2 <= n; j += 2) {                                                       \
            fa_dot4x2_##SFX(b + j * ldb, b + (j + 1) * ldb,                                \
                            ai, ai + lda, ai + 2 * lda, ai + 3 * lda, k, r);               \
            for (int t = 0; t < 4; t++) {                                                  \
                c[(i + t) * ldc + j] = alpha * r[t];                                       \
                c[(i + t) * ldc + j + 1] = alpha * r[4 + t];                               \
            }                                                                              \
        }                                                                                  \
        for (; j < n; j++) {                                                               \
            fa_dot4_##SFX(b + j * ldb, ai, ai + lda, ai + 2 * lda, ai + 3 * lda, k, r);    \
            for (int t = 0; t < 4; t++) c[(i + t) * ldc + j] = alpha * r[t];               \
        }                                                                                  \
    }                                                                                      \
    for (; i < m; i++) {                    /* one row of a against 4 rows of b, then 1 */ \
        const T *ai = a + i * lda;                                                         \
        ptrdiff_t j = 0;                                                                   \
        for (; j + 4 <= n; j += 4) {                                                       \
            const T *bj = b + j * ldb;                                                     \
            fa_dot4_##SFX(ai, bj, bj + ldb, bj + 2 * ldb, bj + 3 * ldb, k, r);             \
            for (int t = 0; t < 4; t++) c[i * ldc + j + t] = alpha * r[t];                 \
        }                                                                                  \
        for (; j < n; j++) c[i * ldc + j] = alpha * fa_dot1_##SFX(ai, b + j * ldb, k);     \
    }                                                                                      \
}                                                                                          \
                                                                                           \
/* c[i*ldc + j] += sum_p a[i*lda + p] * b[p*ldb + j]   (i < m, j < n: c += a b) */         \
FA_VECTOR static void fa_gemm_ab_acc_small_##SFX(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,    \
        const T *a, ptrdiff_t lda, const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc)         \
{                                                                                          \
    enum { VL = FA_VL_##SFX };                                                             \
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
}

#else   /* no vector types: plain loops */

#define FA_DEFINE_SMALL_GEMMS(T, SFX)                                                       \
static void fa_gemm_abt_small_##SFX(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, T alpha,        \
        const T *a, ptrdiff_t lda, const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc)         \
{                                                                                          \
    for (ptrdiff_t i = 0; i < m; i++)                                                      \
        for (ptrdiff_t j = 0; j < n; j++)                                                  \
            c[i * ldc + j] = alpha * fa_dot_##SFX(a + i * lda, b + j * ldb, k);            \
}                                                                                          \
static void fa_gemm_ab_acc_small_##SFX(ptrdiff_t m, ptrdiff_t n, ptrdiff_t k,              \
        const T *a, ptrdiff_t lda, const T *b, ptrdiff_t ldb, T *c, ptrdiff_t ldc)         \
{                                                                                          \
    for (ptrdiff_t i = 0; i < m; i++)                                                      \
        for (ptrdiff_t p = 0; p < k; p++)                                                  \
            fa_axpy_##SFX(c + i * ldc, b + p * ldb, n, a[i * lda + p]);                    \
}

#endif

FA_DEFINE_SMALL_GEMMS(float, f32)
FA_DEFINE_SMALL_GEMMS(double, f64)

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

#endif /* FASTATTN_VECMATH_H */
