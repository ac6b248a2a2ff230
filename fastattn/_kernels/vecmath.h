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

/* ---- row routines, instantiated for float and double ------------------------------- */
/* Every routine accepts n == 0. Max of nothing (or of all -inf) is -inf. */

#define FA_DEFINE_ROW_ROUTINES(T, SFX, EXPNEG)                                              \
                                                                                           \
/* max_j x[j]; NaN if any x[j] is NaN (a NaN score must give a NaN row, not a masked one) */ \
FA_VECTOR static T fa_max_##SFX(const T *x, ptrdiff_t n)                                   \
{                                                                                          \
    T acc[FA_LANES];                                                                       \
    for (int k = 0; k < FA_LANES; k++) acc[k] = -INFINITY;                                 \
    ptrdiff_t j = 0;                                                                       \
    for (; j + FA_LANES <= n; j += FA_LANES)                                               \
        for (int k = 0; k < FA_LANES; k++)                                                 \
            acc[k] = (x[j + k] > acc[k] || x[j + k] != x[j + k]) ? x[j + k] : acc[k];      \
    T m = -INFINITY;                                                                       \
    for (; j < n; j++) m = (x[j] > m || x[j] != x[j]) ? x[j] : m;                          \
    for (int k = 0; k < FA_LANES; k++) m = (acc[k] > m || acc[k] != acc[k]) ? acc[k] : m;  \
    return m;                                                                              \
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
/* x[j] = exp(x[j] - m); return sum_j x[j].  m must be finite. */                          \
FA_VECTOR static T fa_exp_sum_##SFX(T *x, ptrdiff_t n, T m)                                \
{                                                                                          \
    T acc[FA_LANES];                                                                       \
    for (int k = 0; k < FA_LANES; k++) acc[k] = 0;                                         \
    ptrdiff_t j = 0;                                                                       \
    for (; j + FA_LANES <= n; j += FA_LANES)                                               \
        for (int k = 0; k < FA_LANES; k++) {                                               \
            T e = EXPNEG(x[j + k] - m);                                                    \
            x[j + k] = e;                                                                  \
            acc[k] += e;                                                                   \
        }                                                                                  \
    T s = 0;                                                                               \
    for (; j < n; j++) { T e = EXPNEG(x[j] - m); x[j] = e; s += e; }                       \
    for (int k = 0; k < FA_LANES; k++) s += acc[k];                                        \
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

FA_DEFINE_ROW_ROUTINES(float, f32, fa_expneg_f32)
FA_DEFINE_ROW_ROUTINES(double, f64, fa_expneg_f64)

#endif /* FASTATTN_VECMATH_H */
