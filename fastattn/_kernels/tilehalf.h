/*
 * tilehalf.h -- half-precision operands (float16, bfloat16) for the tile core.
 *
 * Scores, softmax and accumulation are float32 whatever the operands' type; half
 * precision changes only how operands are read. Two ways:
 *
 *  1. Widen while packing (every CPU, both half types): a tile's operands are
 *     converted to float32 into the thread's scratch as they are packed, then the
 *     float32 tile products run. Converting a tile costs cols * (e + ev) conversions
 *     against rows * cols * (e + ev) multiply-adds, so it is noise for a full query block.
 *     float16 uses F16C (vcvtph2ps); bfloat16 is the upper half of a float32 (exact).
 *
 *  2. bfloat16 dot products (CPUs with AVX512_BF16): vdpbf16ps multiplies 32 pairs of
 *     bfloat16 and adds them into 16 float32 lanes, twice the work of a float32 FMA per
 *     instruction. Both products of a tile then take their reduction axis in pairs:
 *       scores  s[r, c] = sum over t of q[r, t] k[c, t]: one operand broadcast as a pair
 *               (q[r, 2u], q[r, 2u + 1]) -- adjacent in memory already -- the other
 *               packed as pair panels, pt[u][c] = (k[c, 2u], k[c, 2u + 1]);
 *       p @ v   acc[r, :] += sum over c of p[r, c] v[c, :]: p rounded to bfloat16
 *               (round to nearest even, as flash-attn does with its P tile) and
 *               broadcast as pairs (p[r, 2w], p[r, 2w + 1]); v packed as pair rows,
 *               vp[w][j] = (v[2w, j], v[2w + 1, j]).
 *     An odd reduction length ends with a pair whose second half is 0 on both sides.
 *
 * FASTATTN_HALF_FALLBACK=1 in the environment turns way 2 off (checked once), so that
 * the widening path of CPUs without AVX512_BF16 is tested on this one too.
 */
#ifndef FASTATTN_TILEHALF_H
#define FASTATTN_TILEHALF_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "scoremods.h"    /* fa_score_mods (the key-major tiles' modifiers) */

/* Element types of the operands: declared here once, mirrored to Cython as parallel.pxd's
 * DType and to Python as parallel.DTYPE_CODES. */
enum fa_dtype { FA_DT_FLOAT32 = 0, FA_DT_FLOAT64 = 1, FA_DT_FLOAT16 = 2, FA_DT_BFLOAT16 = 3 };

/* ---- scalar conversions (portable; the vector loops below use them for tails) -------- */

static inline float fa_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, 4);
    return x;
}

static inline uint16_t fa_f32_to_bf16(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u)          /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1);            /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

static inline float fa_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    float x;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);     /* inf, NaN */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {                                          /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    memcpy(&x, &bits, 4);
    return x;
}

static inline uint16_t fa_f32_to_f16(float x)
{
    uint32_t bits, sign, absb;
    memcpy(&bits, &x, 4);
    sign = (bits >> 16) & 0x8000;
    absb = bits & 0x7fffffffu;
    if (absb > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00 | ((absb >> 13) & 0x3ff));   /* NaN */
    if (absb >= 0x477ff000u)                          /* rounds to >= 65520: inf */
        return (uint16_t)(sign | 0x7c00);
    if (absb < 0x38800000u) {                         /* below 2^-14: subnormal or 0 */
        float a;
        memcpy(&a, &absb, 4);
        /* adding 0.5 (2^-1) puts the subnormal's bits at the bottom, rounded to even */
        a += 0.5f;
        memcpy(&absb, &a, 4);
        return (uint16_t)(sign | (absb - 0x3f000000u));
    }
    absb += 0xfffu + ((absb >> 13) & 1) - (112u << 23);
    return (uint16_t)(sign | (absb >> 13));
}

/* One half value (dtype FA_DT_FLOAT16 or FA_DT_BFLOAT16) to float32, and back. */
static inline float fa_half_to_f32(int dtype, uint16_t h)
{
    return dtype == FA_DT_FLOAT16 ? fa_f16_to_f32(h) : fa_bf16_to_f32(h);
}

static inline uint16_t fa_f32_to_half(int dtype, float x)
{
    return dtype == FA_DT_FLOAT16 ? fa_f32_to_f16(x) : fa_f32_to_bf16(x);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) \
    && !defined(FASTATTN_NO_CLONES)
#define FA_HALF_KERNELS 1
#include <immintrin.h>
#define FA_V4H __attribute__((target("arch=x86-64-v4,f16c")))
#define FA_BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#else
#define FA_HALF_KERNELS 0
#endif

/* ---- widening: rows of half values to float32 ------------------------------------------ */

#if FA_HALF_KERNELS
static int fa_have_v4(void)
{
    static int have = -1;
    if (have < 0) {
        __builtin_cpu_init();
        have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
               && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    }
    return have;
}

FA_V4H static void fa_widen_v4(int dtype, int rows, int n, const uint16_t *x, ptrdiff_t ldx,
                               float *y, ptrdiff_t ldy)
{
    for (int r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * ldx;
        float *yr = y + r * ldy;
        int j = 0;
        if (dtype == FA_DT_FLOAT16) {
            for (; j + 16 <= n; j += 16)
                _mm512_storeu_ps(yr + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(xr + j))));
        } else {
            for (; j + 16 <= n; j += 16)
                _mm512_storeu_ps(yr + j, _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xr + j))), 16)));
        }
        for (; j < n; j++)
            yr[j] = fa_half_to_f32(dtype, xr[j]);
    }
}

FA_V4H static void fa_narrow_v4(int dtype, int rows, int n, const float *x, ptrdiff_t ldx,
                                uint16_t *y, ptrdiff_t ldy)
{
    for (int r = 0; r < rows; r++) {
        const float *xr = x + r * ldx;
        uint16_t *yr = y + r * ldy;
        int j = 0;
        if (dtype == FA_DT_FLOAT16) {
            for (; j + 16 <= n; j += 16)
                _mm256_storeu_si256((__m256i *)(yr + j),
                    _mm512_cvtps_ph(_mm512_loadu_ps(xr + j), _MM_FROUND_TO_NEAREST_INT));
        }
        for (; j < n; j++)
            yr[j] = fa_f32_to_half(dtype, xr[j]);
    }
}
#endif

/* y[r, :n] = float32(x[r, :n]) for r < rows (row strides in elements). */
static void fa_widen(int dtype, int rows, int n, const uint16_t *x, ptrdiff_t ldx,
                     float *y, ptrdiff_t ldy)
{
#if FA_HALF_KERNELS
    if (fa_have_v4()) {
        fa_widen_v4(dtype, rows, n, x, ldx, y, ldy);
        return;
    }
#endif
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < n; j++)
            y[r * ldy + j] = fa_half_to_f32(dtype, x[r * ldx + j]);
}

/* y[r, :n] = float64(x[r, :n]) (exact): half operands of a float64 computation, e.g. a
 * half paged cache read by a float64 query; scalar, as that is no hot path. */
static void fa_widen_f64(int dtype, int rows, int n, const uint16_t *x, ptrdiff_t ldx,
                         double *y, ptrdiff_t ldy)
{
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < n; j++)
            y[r * ldy + j] = fa_half_to_f32(dtype, x[r * ldx + j]);
}

/* y[r, :n] = x[r, :n] rounded to the half type (to nearest even). */
static void fa_narrow(int dtype, int rows, int n, const float *x, ptrdiff_t ldx,
                      uint16_t *y, ptrdiff_t ldy)
{
#if FA_HALF_KERNELS
    if (fa_have_v4()) {
        fa_narrow_v4(dtype, rows, n, x, ldx, y, ldy);
        return;
    }
#endif
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < n; j++)
            y[r * ldy + j] = fa_f32_to_half(dtype, x[r * ldx + j]);
}

/* ---- bfloat16 dot products ---------------------------------------------------------------- */

#if FA_HALF_KERNELS

typedef float fa_hv16 __attribute__((vector_size(64)));

/* Whether way 2 (vdpbf16ps) is used: the CPU has AVX512_BF16 and the environment does
 * not ask for the fallback. */
static int fa_bf16_dot_ok(void)
{
    static int ok = -1;
    if (ok < 0) {
        const char *force = getenv("FASTATTN_HALF_FALLBACK");
        __builtin_cpu_init();
        ok = fa_have_v4() && __builtin_cpu_supports("avx512bf16")
             && !(force && force[0] && force[0] != '0');
    }
    return ok;
}

/* The pair (x[2u], x[2u + 1]) as one 32-bit word; the last pair of an odd n has 0 as
 * its second half. */
static inline uint32_t fa_pair(const uint16_t *x, int u, int n)
{
    uint32_t lo = x[2 * u], hi = 2 * u + 1 < n ? x[2 * u + 1] : 0;
    return lo | (hi << 16);
}

/* Pair panel of n rows of x (n x e halves, row stride ldx):
 *     xt[u * ldxt + j] = pair u of row j,  u < (e + 1) / 2,  j < n;  0 for n <= j < ldxt.
 * Packs keys for the row-major scores, queries for the key-major ones. */
FA_BF16 static void fa_pack_pairs(int n, int e, const uint16_t *x, ptrdiff_t ldx,
                                  uint32_t *xt, ptrdiff_t ldxt)
{
    int npairs = (e + 1) / 2;
    for (int j0 = 0; j0 < ldxt; j0 += 16) {
        for (int u0 = 0; u0 < npairs; u0 += 16) {
            int nu = npairs - u0 < 16 ? npairs - u0 : 16;
            uint32_t blk[16][16];
            for (int i = 0; i < 16; i++) {
                int j = j0 + i;
                if (j < n && nu == 16 && 2 * (u0 + 16) <= e) {
                    memcpy(blk[i], x + j * ldx + 2 * u0, 64);
                } else {
                    for (int u = 0; u < 16; u++)
                        blk[i][u] = (j < n && u < nu) ? fa_pair(x + j * ldx, u0 + u, e) : 0;
                }
            }
            for (int u = 0; u < nu; u++)
                for (int i = 0; i < 16; i++)
                    xt[(u0 + u) * ldxt + j0 + i] = blk[i][u];
        }
    }
}

/* Pair rows of v (cols x ev halves, row stride ldv):
 *     vp[w * ldvp + j] = (v[2w, j], v[2w + 1, j]),  w < (cols + 1) / 2,  j < ev. */
FA_BF16 static void fa_pack_value_pairs(int cols, int ev, const uint16_t *v, ptrdiff_t ldv,
                                        uint32_t *vp, ptrdiff_t ldvp)
{
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10,
                                            41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4,
                                            35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_idx = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26,
                                            57, 25, 56, 24, 55, 23, 54, 22, 53, 21, 52, 20,
                                            51, 19, 50, 18, 49, 17, 48, 16);
    for (int w = 0; w < (cols + 1) / 2; w++) {
        const uint16_t *a = v + 2 * w * ldv;
        const uint16_t *b = 2 * w + 1 < cols ? a + ldv : NULL;
        uint32_t *out = vp + w * ldvp;
        int j = 0;
        for (; j + 32 <= ev; j += 32) {
            __m512i x = _mm512_loadu_si512(a + j);
            __m512i y = b ? _mm512_loadu_si512(b + j) : _mm512_setzero_si512();
            _mm512_storeu_si512(out + j, _mm512_permutex2var_epi16(x, lo_idx, y));
            _mm512_storeu_si512(out + j + 16, _mm512_permutex2var_epi16(x, hi_idx, y));
        }
        for (; j < ev; j++)
            out[j] = (uint32_t)a[j] | ((uint32_t)(b ? b[j] : 0) << 16);
    }
}

FA_BF16 static inline __m512 fa_bcast_pair(uint32_t w)
{
    return (__m512)_mm512_set1_epi32((int)w);
}

/* s[rows, cols] (row stride lds) = scale * a[rows, e] @ panel, the panel packed by
 * fa_pack_pairs (row stride ldpt, a multiple of 32, zero past cols). */
#define FA_DEFINE_BF16_SCORE_BLOCK(R)                                                      \
FA_BF16 static inline void fa_bf16_score_block_##R(int e, float scale, const uint16_t *a,  \
                                                   ptrdiff_t lda, const uint32_t *pt,      \
                                                   ptrdiff_t ldpt, float *s, ptrdiff_t lds, \
                                                   int ncols)                              \
{                                                                                          \
    __m512 c0[R], c1[R];                                                                   \
    int full = e / 2;                                                                      \
    for (int r = 0; r < R; r++)                                                            \
        c0[r] = c1[r] = _mm512_setzero_ps();                                               \
    for (int u = 0; u < full; u++) {                                                       \
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(pt + u * ldpt);                         \
        __m512bh b1 = (__m512bh)_mm512_loadu_si512(pt + u * ldpt + 16);                    \
        for (int r = 0; r < R; r++) {                                                      \
            uint32_t w;                                                                    \
            memcpy(&w, a + r * lda + 2 * u, 4);                                            \
            __m512bh x = (__m512bh)fa_bcast_pair(w);                                       \
            c0[r] = _mm512_dpbf16_ps(c0[r], x, b0);                                        \
            c1[r] = _mm512_dpbf16_ps(c1[r], x, b1);                                        \
        }                                                                                  \
    }                                                                                      \
    if (e & 1) {                                                                           \
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(pt + full * ldpt);                      \
        __m512bh b1 = (__m512bh)_mm512_loadu_si512(pt + full * ldpt + 16);                 \
        for (int r = 0; r < R; r++) {                                                      \
            __m512bh x = (__m512bh)fa_bcast_pair(a[r * lda + e - 1]);                      \
            c0[r] = _mm512_dpbf16_ps(c0[r], x, b0);                                        \
            c1[r] = _mm512_dpbf16_ps(c1[r], x, b1);                                        \
        }                                                                                  \
    }                                                                                      \
    __m512 sc = _mm512_set1_ps(scale);                                                     \
    for (int r = 0; r < R; r++) {                                                          \
        __m512 x0 = _mm512_mul_ps(c0[r], sc), x1 = _mm512_mul_ps(c1[r], sc);               \
        if (ncols >= 32) {                                                                 \
            _mm512_storeu_ps(s + r * lds, x0);                                             \
            _mm512_storeu_ps(s + r * lds + 16, x1);                                        \
        } else if (ncols > 16) {                                                           \
            _mm512_storeu_ps(s + r * lds, x0);                                             \
            _mm512_mask_storeu_ps(s + r * lds + 16, (__mmask16)((1u << (ncols - 16)) - 1), x1); \
        } else {                                                                           \
            _mm512_mask_storeu_ps(s + r * lds, (__mmask16)((1u << ncols) - 1), x0);        \
        }                                                                                  \
    }                                                                                      \
}
FA_DEFINE_BF16_SCORE_BLOCK(8)
FA_DEFINE_BF16_SCORE_BLOCK(1)

FA_BF16 static void fa_bf16_scores_from_panel(int rows, int cols, int e, float scale,
                                              const uint16_t *a, ptrdiff_t lda,
                                              const uint32_t *pt, ptrdiff_t ldpt,
                                              float *s, ptrdiff_t lds)
{
    int r0 = 0;
    for (; r0 + 8 <= rows; r0 += 8)
        for (int j0 = 0; j0 < cols; j0 += 32)
            fa_bf16_score_block_8(e, scale, a + r0 * lda, lda, pt + j0, ldpt,
                                  s + r0 * lds + j0, lds, cols - j0 < 32 ? cols - j0 : 32);
    for (; r0 < rows; r0++)
        for (int j0 = 0; j0 < cols; j0 += 32)
            fa_bf16_score_block_1(e, scale, a + r0 * lda, lda, pt + j0, ldpt,
                                  s + r0 * lds + j0, lds, cols - j0 < 32 ? cols - j0 : 32);
}

/* acc[rows, W*16 columns] += p @ v with p as bfloat16 pair words (pair w of row r at
 * pw[r * prs + w * pcs]) and v as pair rows (fa_pack_value_pairs, row stride ldvp). */
#define FA_DEFINE_BF16_PV_BLOCK(R, W)                                                      \
FA_BF16 static inline __attribute__((always_inline))                                       \
void fa_bf16_pv_block_##R##_##W(int npairs, const uint32_t *pw, ptrdiff_t prs,             \
                                ptrdiff_t pcs, const uint32_t *vp, ptrdiff_t ldvp,         \
                                float *acc, ptrdiff_t ldacc)                               \
{                                                                                          \
    __m512 c[R][W];                                                                        \
    for (int r = 0; r < R; r++)                                                            \
        for (int w = 0; w < W; w++)                                                        \
            c[r][w] = _mm512_loadu_ps(acc + r * ldacc + 16 * w);                           \
    for (int u = 0; u < npairs; u++) {                                                     \
        __m512bh b[W];                                                                     \
        for (int w = 0; w < W; w++)                                                        \
            b[w] = (__m512bh)_mm512_loadu_si512(vp + u * ldvp + 16 * w);                   \
        for (int r = 0; r < R; r++) {                                                      \
            __m512bh x = (__m512bh)fa_bcast_pair(pw[r * prs + u * pcs]);                   \
            for (int w = 0; w < W; w++)                                                    \
                c[r][w] = _mm512_dpbf16_ps(c[r][w], x, b[w]);                              \
        }                                                                                  \
    }                                                                                      \
    for (int r = 0; r < R; r++)                                                            \
        for (int w = 0; w < W; w++)                                                        \
            _mm512_storeu_ps(acc + r * ldacc + 16 * w, c[r][w]);                           \
}
FA_DEFINE_BF16_PV_BLOCK(4, 4)
FA_DEFINE_BF16_PV_BLOCK(1, 4)
FA_DEFINE_BF16_PV_BLOCK(8, 2)
FA_DEFINE_BF16_PV_BLOCK(1, 2)
FA_DEFINE_BF16_PV_BLOCK(8, 1)
FA_DEFINE_BF16_PV_BLOCK(1, 1)

#define FA_BF16_PV_ROWS_LOOP(R, W)                                                         \
    do {                                                                                   \
        int r0 = 0;                                                                        \
        for (; r0 + R <= rows; r0 += R)                                                    \
            fa_bf16_pv_block_##R##_##W(npairs, pw + r0 * prs, prs, pcs, vp + c0, ldvp,     \
                                       acc + r0 * ldacc + c0, ldacc);                      \
        for (; r0 < rows; r0++)                                                            \
            fa_bf16_pv_block_1_##W(npairs, pw + r0 * prs, prs, pcs, vp + c0, ldvp,         \
                                   acc + r0 * ldacc + c0, ldacc);                          \
    } while (0)

/* acc[rows, ev] += p @ v, ev a multiple of 16; p as pair words (see above). */
FA_BF16 static void fa_bf16_pv(int rows, int ev, int npairs, const uint32_t *pw,
                               ptrdiff_t prs, ptrdiff_t pcs, const uint32_t *vp,
                               ptrdiff_t ldvp, float *acc, ptrdiff_t ldacc)
{
    int c0 = 0;
    if (pcs == 1) {
        for (; c0 + 64 <= ev; c0 += 64)
            FA_BF16_PV_ROWS_LOOP(4, 4);
        for (; c0 + 32 <= ev; c0 += 32)
            FA_BF16_PV_ROWS_LOOP(8, 2);
        for (; c0 + 16 <= ev; c0 += 16)
            FA_BF16_PV_ROWS_LOOP(8, 1);
    } else {
        for (; c0 + 64 <= ev; c0 += 64)
            FA_BF16_PV_ROWS_LOOP(4, 4);
        for (; c0 + 32 <= ev; c0 += 32)
            FA_BF16_PV_ROWS_LOOP(8, 2);
        for (; c0 + 16 <= ev; c0 += 16)
            FA_BF16_PV_ROWS_LOOP(8, 1);
    }
}

/* Row-major probabilities to pair words: pw[r * ldpw + w] = (bf16(s[r, 2w]),
 * bf16(s[r, 2w + 1])), the last pair of an odd cols padded with 0. */
FA_BF16 static void fa_bf16_pairs_rows(int rows, int cols, const float *s, ptrdiff_t lds,
                                       uint32_t *pw, ptrdiff_t ldpw)
{
    for (int r = 0; r < rows; r++) {
        const float *x = s + r * lds;
        uint16_t *y = (uint16_t *)(pw + r * ldpw);
        int j = 0;
        for (; j + 32 <= cols; j += 32)
            _mm512_storeu_si512(y + j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + j + 16),
                                                                    _mm512_loadu_ps(x + j)));
        for (; j < cols; j++)
            y[j] = fa_f32_to_bf16(x[j]);
        if (cols & 1)
            y[cols] = 0;
    }
}

#include "tilegemm.h"

/* exp(v) for v <= 0 (finite), relative error < 5e-5: probabilities that are rounded to
 * bfloat16 (8 significant bits) need no more. A degree-4 polynomial on the reduced
 * argument |r| <= ln(2)/2, scaled by 2^n with vscalefps (which underflows to 0). */
FA_BF16 static inline __m512 fa_exp_for_bf16(__m512 v)
{
    const __m512 lo = _mm512_set1_ps(-100.0f);
    v = _mm512_max_ps(v, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), v);
    __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 24), _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The bfloat16 step of a key-major tile (see fa_kmajor_softmax_f32): the probabilities
 * go straight to pair words, pw[w * ldqt + j] = (bf16(p[2w, j]), bf16(p[2w + 1, j])),
 * the last pair of an odd cols padded with 0; l sums them before rounding. */
FA_BF16 static int fa_kmajor_softmax_bf16(int rows, int cols, int ev, float *st,
                                          ptrdiff_t ldqt, uint32_t *pw,
                                          const fa_score_mods *mods, ptrdiff_t band_lo,
                                          ptrdiff_t band_hi, float *acc,
                                          ptrdiff_t ldacc, float *m, float *l)
{
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10,
                                         25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
                                         19, 3, 18, 2, 17, 1, 16, 0);
    float *tile_max = st + (ptrdiff_t)cols * ldqt;
    const int banded = fa_kmajor_banded(rows, cols, band_lo, band_hi);
    if (!fa_kmajor_tile_max(rows, cols, st, ldqt, tile_max, mods, band_lo, band_hi))
        return 0;
    for (int g = 0; g < rows; g += 16) {
        int n = rows - g < 16 ? rows - g : 16;
        fa_kv16 m_new, m_sub, l_old, alpha, sum = (fa_kv16){0};
        fa_kmajor_group_start(g, n, tile_max, m, l, &m_new, &m_sub, &l_old, &alpha);
        const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
        for (int w = 0; w < (cols + 1) / 2; w++) {
            const float *x = st + (ptrdiff_t)(2 * w) * ldqt + g;
            __m512 s0 = _mm512_loadu_ps(x), s1 = ninf;
            if (2 * w + 1 < cols)
                s1 = _mm512_loadu_ps(x + ldqt);
            __m512 p0 = fa_exp_for_bf16(_mm512_sub_ps(s0, (__m512)m_sub));
            __m512 p1 = fa_exp_for_bf16(_mm512_sub_ps(s1, (__m512)m_sub));
            if (banded || 2 * w + 1 >= cols) {
                /* fa_exp_for_bf16 is not 0 at -inf (it clamps at -100): masked out exactly */
                p0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s0, ninf, _CMP_NEQ_OQ), p0);
                p1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s1, ninf, _CMP_NEQ_OQ), p1);
            }
            sum += (fa_kv16)p0;
            sum += (fa_kv16)p1;
            /* lanes 0-15: bf16(p0), 16-31: bf16(p1); interleaved into pairs */
            __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);
            _mm512_storeu_si512(pw + w * ldqt + g, _mm512_permutexvar_epi16(idx, both));
        }
        fa_kmajor_group_end(g, n, ev, m_new, l_old, alpha, sum, m, l, acc, ldacc);
    }
    return 1;
}

/* One bfloat16 tile of the online softmax with no mask beyond a band, key-major (as
 * fa_attend_tile_kmajor_f32, with both products on vdpbf16ps):
 *   qp: the query block as a pair panel, fa_pack_pairs(rows, e, q, ldq, qp, ldqt),
 *       ldqt = fa_kmajor_ld(rows); or rows r0 .. of a larger one (qp + r0, r0 a
 *       multiple of FA_PANEL);
 *   k: cols x e, v: cols x ev bfloat16 (row strides ldk, ldv), ev a multiple of 16;
 *   st: (cols + 1) * ldqt floats; pw: (cols + 1) / 2 * ldqt words; vp: (cols + 1) / 2 * ev
 *   words of scratch; mods: the score modifiers, or NULL; band_lo, band_hi: the band.
 *   Returns 0 as fa_kmajor_softmax_f32 does. */
FA_BF16 static int fa_attend_tile_kmajor_bf16(int rows, int cols, int e, int ev, float scale,
                                              const uint32_t *qp, ptrdiff_t ldqt,
                                              const uint16_t *k, ptrdiff_t ldk,
                                              const uint16_t *v, ptrdiff_t ldv, float *st,
                                              uint32_t *pw, uint32_t *vp,
                                              const fa_score_mods *mods, ptrdiff_t band_lo,
                                              ptrdiff_t band_hi,
                                              float *acc, ptrdiff_t ldacc, float *m, float *l)
{
    fa_bf16_scores_from_panel(cols, (int)fa_kmajor_ld(rows), e, scale, k, ldk, qp, ldqt, st,
                              ldqt);
    if (!fa_kmajor_softmax_bf16(rows, cols, ev, st, ldqt, pw, mods, band_lo, band_hi, acc,
                                ldacc, m, l))
        return 0;
    fa_pack_value_pairs(cols, ev, v, ldv, vp, ev);
    fa_bf16_pv(rows, ev, (cols + 1) / 2, pw, 1, ldqt, vp, ev, acc, ldacc);
    return 1;
}

#else   /* no half kernels in this build: widening only */

static int fa_bf16_dot_ok(void) { return 0; }
#define FA_HALF_STUB(...) { (void)0; }
static void fa_pack_pairs(int n, int e, const uint16_t *x, ptrdiff_t ldx, uint32_t *xt,
                          ptrdiff_t ldxt) FA_HALF_STUB()
static void fa_pack_value_pairs(int cols, int ev, const uint16_t *v, ptrdiff_t ldv,
                                uint32_t *vp, ptrdiff_t ldvp) FA_HALF_STUB()
static void fa_bf16_scores_from_panel(int rows, int cols, int e, float scale,
                                      const uint16_t *a, ptrdiff_t lda, const uint32_t *pt,
                                      ptrdiff_t ldpt, float *s, ptrdiff_t lds) FA_HALF_STUB()
static void fa_bf16_pv(int rows, int ev, int npairs, const uint32_t *pw, ptrdiff_t prs,
                       ptrdiff_t pcs, const uint32_t *vp, ptrdiff_t ldvp, float *acc,
                       ptrdiff_t ldacc) FA_HALF_STUB()
static void fa_bf16_pairs_rows(int rows, int cols, const float *s, ptrdiff_t lds,
                               uint32_t *pw, ptrdiff_t ldpw) FA_HALF_STUB()
static int fa_attend_tile_kmajor_bf16(int rows, int cols, int e, int ev, float scale,
                                      const uint32_t *qp, ptrdiff_t ldqt, const uint16_t *k,
                                      ptrdiff_t ldk, const uint16_t *v, ptrdiff_t ldv,
                                      float *st, uint32_t *pw, uint32_t *vp,
                                      const fa_score_mods *mods, ptrdiff_t band_lo,
                                      ptrdiff_t band_hi, float *acc,
                                      ptrdiff_t ldacc, float *m, float *l) { return 0; }
#endif  /* FA_HALF_KERNELS */

#endif  /* FASTATTN_TILEHALF_H */
