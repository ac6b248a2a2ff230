/*
 * smallgemm.h -- small GEMMs for decoding, paged.pyx: a few query rows against one
 * key/value block (fa_gemm_abt_small_*: scores, fa_gemm_ab_acc_small_*: p @ v), with
 * software prefetch of the next block (fa_prefetch, fa_prefetch_some). One version per
 * ISA (the dispatch machinery of vecmath.h); without GCC vector types, plain loops over
 * vecmath.h's fa_dot_* / fa_axpy_*.
 */
#ifndef FASTATTN_SMALLGEMM_H
#define FASTATTN_SMALLGEMM_H

#include "vecmath.h"      /* FA_DEFINE_BY_ISA; fa_dot_*, fa_axpy_* */

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
 * across rows. Scores: 4 rows x 4 keys accumulate as 16 independent FMA chains with
 * AVX-512 (8 would leave the FMA units waiting on their latency; each key and query vector
 * is loaded once per 4 uses), 4 x 2 with fewer registers (FA_GEMM_ABT_SMALL_BODY), the dot
 * products finished by a shuffle tree (fa_lane_sums_*) instead of one lane sum each.
 * p @ v: 4 rows x 2 vectors, 8 chains, each value row read once per 4 rows. Other
 * compilers get plain loops. Every routine accepts m, n or k == 0. */

#if defined(__GNUC__)

/* helpers inlined into each ISA's version of their caller (else built for the baseline) */
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

/* The scores' loop, 4 rows of a against 4 rows of b at a time, as NB = 4 or 2 keys per
 * fa_dot4xn: 4 x 4 takes 21 vector registers, fine with AVX-512's 32 but spilled with
 * AVX2's 16, where two 4 x 2 ran 1.3x faster; with AVX-512 4 x 4 ran 1.4x faster than
 * 4 x 2, and with SSE2 (two registers a vector, spilled either way) 1.25x faster (Zen 4,
 * one core, 4-8 rows, k = 64..128, cached). Hence one version per ISA. */
#define FA_GEMM_ABT_SMALL_ARGS(T)                                                           \
    (ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, T alpha, const T *a, ptrdiff_t lda, const T *b, \
     ptrdiff_t ldb, T *c, ptrdiff_t ldc, const void *pf, ptrdiff_t pf_bytes)
#define FA_GEMM_ABT_SMALL_BODY(T, SFX, NB)                                                  \
{                                                                                          \
    const char *pf_at = (const char *)pf, *pf_end = pf ? pf_at + pf_bytes : pf_at;         \
    T r[16];                                                                               \
    ptrdiff_t i = 0;                                                                       \
    for (; i + 4 <= m; i += 4) {            /* 4 rows of a against 4 rows of b, then 1 */  \
        const T *ai = a + i * lda;                                                         \
        ptrdiff_t j = 0;                                                                   \
        for (; j + 4 <= n; j += 4) {                                                       \
            for (int h = 0; h < 4; h += NB)                                                \
                fa_dot4xn_##SFX(ai, lda, b + (j + h) * ldb, ldb, k, r + h, &pf_at, pf_end, \
                                NB);                                                       \
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
}
#define FA_DEFINE_GEMM_ABT_SMALL(T, SFX)                                                    \
FA_DEFINE_BY_ISA(fa_gemm_abt_small, SFX, FA_GEMM_ABT_SMALL_ARGS(T),                        \
                 (m, n, k, alpha, a, lda, b, ldb, c, ldc, pf, pf_bytes),                   \
                 FA_GEMM_ABT_SMALL_BODY, (T, SFX), 4, 2, 4, (FA_NATIVE_BYTES == 32 ? 2 : 4))

/* p @ v, the values' loop: c[i*ldc + j] += sum_p a[i*lda + p] * b[p*ldb + j] (c += a b);
 * prefetches [pf, pf + pf_bytes) on the way, a line per step. Vectors of VB bytes: 32, or
 * 16 for SSE2, where gcc kept the 32-byte accumulators in memory (47x slower than AVX2 at
 * 4 x 128 x 16). Each element of c is one chain over p whatever VB: the same bits. */
#define FA_LOADV(V, p) ({ V v_; memcpy(&v_, (p), sizeof v_); v_; })
#define FA_STOREV(p, v) do { __typeof__(v) v_ = (v); memcpy((p), &v_, sizeof v_); } while (0)
#define FA_GEMM_AB_ACC_SMALL_ARGS(T)                                                       \
    (ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, const T *a, ptrdiff_t lda, const T *b,         \
     ptrdiff_t ldb, T *c, ptrdiff_t ldc, const void *pf, ptrdiff_t pf_bytes)
#define FA_GEMM_AB_ACC_SMALL_BODY(T, VB)                                                   \
{                                                                                          \
    typedef T vec_ __attribute__((vector_size(VB)));                                       \
    enum { VL = (VB) / sizeof(T) };                                                        \
    const char *pf_at = (const char *)pf, *pf_end = pf ? pf_at + pf_bytes : pf_at;         \
    ptrdiff_t i = 0;                                                                       \
    /* 4 rows of c, 2 vectors of columns at a time, accumulated in registers over k */     \
    for (; i + 4 <= m; i += 4) {                                                           \
        const T *a0 = a + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;         \
        T *c0 = c + i * ldc, *c1 = c0 + ldc, *c2 = c1 + ldc, *c3 = c2 + ldc;               \
        ptrdiff_t j = 0;                                                                   \
        for (; j + 2 * VL <= n; j += 2 * VL) {                                             \
            vec_ t0 = FA_LOADV(vec_, c0 + j), u0 = FA_LOADV(vec_, c0 + j + VL);            \
            vec_ t1 = FA_LOADV(vec_, c1 + j), u1 = FA_LOADV(vec_, c1 + j + VL);            \
            vec_ t2 = FA_LOADV(vec_, c2 + j), u2 = FA_LOADV(vec_, c2 + j + VL);            \
            vec_ t3 = FA_LOADV(vec_, c3 + j), u3 = FA_LOADV(vec_, c3 + j + VL);            \
            for (ptrdiff_t p = 0; p < k; p++) {                                            \
                fa_prefetch_some(&pf_at, pf_end, 1);                                       \
                vec_ x = FA_LOADV(vec_, b + p * ldb + j);                                  \
                vec_ y = FA_LOADV(vec_, b + p * ldb + j + VL);                             \
                t0 += a0[p] * x; u0 += a0[p] * y; t1 += a1[p] * x; u1 += a1[p] * y;        \
                t2 += a2[p] * x; u2 += a2[p] * y; t3 += a3[p] * x; u3 += a3[p] * y;        \
            }                                                                              \
            FA_STOREV(c0 + j, t0); FA_STOREV(c0 + j + VL, u0);                             \
            FA_STOREV(c1 + j, t1); FA_STOREV(c1 + j + VL, u1);                             \
            FA_STOREV(c2 + j, t2); FA_STOREV(c2 + j + VL, u2);                             \
            FA_STOREV(c3 + j, t3); FA_STOREV(c3 + j + VL, u3);                             \
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
            vec_ t0 = FA_LOADV(vec_, ci + j), t1 = FA_LOADV(vec_, ci + j + VL);            \
            vec_ t2 = FA_LOADV(vec_, ci + j + 2 * VL);                                     \
            vec_ t3 = FA_LOADV(vec_, ci + j + 3 * VL);                                     \
            for (ptrdiff_t p = 0; p < k; p++) {                                            \
                fa_prefetch_some(&pf_at, pf_end, 2);                                       \
                const T *bp = b + p * ldb + j;                                             \
                t0 += ai[p] * FA_LOADV(vec_, bp); t1 += ai[p] * FA_LOADV(vec_, bp + VL);   \
                t2 += ai[p] * FA_LOADV(vec_, bp + 2 * VL);                                 \
                t3 += ai[p] * FA_LOADV(vec_, bp + 3 * VL);                                 \
            }                                                                              \
            FA_STOREV(ci + j, t0); FA_STOREV(ci + j + VL, t1);                             \
            FA_STOREV(ci + j + 2 * VL, t2); FA_STOREV(ci + j + 3 * VL, t3);                \
        }                                                                                  \
        for (; j + VL <= n; j += VL) {                                                     \
            vec_ t0 = FA_LOADV(vec_, ci + j);                                              \
            for (ptrdiff_t p = 0; p < k; p++)                                              \
                t0 += ai[p] * FA_LOADV(vec_, b + p * ldb + j);                             \
            FA_STOREV(ci + j, t0);                                                         \
        }                                                                                  \
        for (; j < n; j++)                                                                 \
            for (ptrdiff_t p = 0; p < k; p++) ci[j] += ai[p] * b[p * ldb + j];             \
    }                                                                                      \
    fa_prefetch(pf_at, pf_end - pf_at);                                                    \
}
#define FA_DEFINE_GEMM_AB_ACC_SMALL(T, SFX)                                                \
FA_DEFINE_BY_ISA(fa_gemm_ab_acc_small, SFX, FA_GEMM_AB_ACC_SMALL_ARGS(T),                  \
                 (m, n, k, a, lda, b, ldb, c, ldc, pf, pf_bytes),                          \
                 FA_GEMM_AB_ACC_SMALL_BODY, (T), 32, 32, 16,                                \
                 (FA_NATIVE_BYTES < 32 ? FA_NATIVE_BYTES : 32))

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
/* 4 rows x0..x3 against NB = 4 or 2 rows y0.. (row strides ldx, ldy) of length k:     \
 * r[4 * i + j] = xi . yj, as 4 NB chains; NB / 2 lines of the prefetch range per step    \
 * (with 32-byte vectors that covers NB rows of y by the end). Both shapes give the same  \
 * bits (one chain per product, lanes summed by the same tree). */                         \
FA_INLINE void fa_dot4xn_##SFX(const T *x, ptrdiff_t ldx, const T *y, ptrdiff_t ldy,       \
                               ptrdiff_t k, T *r, const char **pf, const char *pf_end,     \
                               int nb)                                                     \
{                                                                                          \
    enum { VL = FA_VL_##SFX };                                                             \
    const T *xi[4] = {x, x + ldx, x + 2 * ldx, x + 3 * ldx};                               \
    fa_vec_##SFX acc[16] = {{0}};                                                          \
    ptrdiff_t p = 0;                                                                       \
    for (; p + VL <= k; p += VL) {                                                         \
        fa_prefetch_some(pf, pf_end, nb / 2);                                              \
        fa_vec_##SFX z[4];                                                                 \
        for (int j = 0; j < nb; j++) z[j] = fa_load_##SFX(y + j * ldy + p);                \
        for (int i = 0; i < 4; i++) {                                                      \
            fa_vec_##SFX u = fa_load_##SFX(xi[i] + p);                                     \
            for (int j = 0; j < nb; j++) acc[nb * i + j] += u * z[j];                      \
        }                                                                                  \
    }                                                                                      \
    T t[16];                                                                               \
    for (int g = 0; g < 4 * nb; g += VL) {                                                 \
        fa_vec_##SFX s = fa_lane_sums_##SFX(acc + g);                                      \
        memcpy(t + g, &s, sizeof s);                                                       \
    }                                                                                      \
    for (; p < k; p++)                                                                     \
        for (int i = 0; i < 4; i++)                                                        \
            for (int j = 0; j < nb; j++) t[nb * i + j] += xi[i][p] * y[j * ldy + p];       \
    for (int i = 0; i < 4; i++)                                                            \
        for (int j = 0; j < nb; j++) r[4 * i + j] = t[nb * i + j];                         \
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
FA_DEFINE_GEMM_ABT_SMALL(T, SFX)                                                           \
                                                                                           \
/* c[i*ldc + j] += sum_p a[i*lda + p] * b[p*ldb + j]   (i < m, j < n: c += a b);         \
 * prefetches [pf, pf + pf_bytes) on the way */                                            \
FA_DEFINE_GEMM_AB_ACC_SMALL(T, SFX)

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

#endif /* FASTATTN_SMALLGEMM_H */
