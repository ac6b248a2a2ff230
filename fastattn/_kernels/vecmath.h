/*
 * vecmath.h -- the vector loops of the tile/softmax core, shared by every kernel family:
 * the ISA dispatch machinery (FA_VECTOR, FA_WIDTHS, FA_CALL_BY_ISA, FA_DEFINE_BY_ISA) and
 * the exp, max and sum row routines of the softmax. tanhscores.h (additive scores),
 * scoremods.h (soft-cap, ALiBi) and smallgemm.h (the decode small GEMMs) build on it.
 *
 * Each routine works on one row of a score tile. On x86-64 gcc builds every routine exists
 * for AVX-512, AVX2+FMA and baseline SSE2, and the one for the running CPU is picked at
 * run time, so wheels need no -march=native:
 *   - routines written with GCC vector types (the maxima, exp + sum here; the tanh scores
 *     and the small GEMMs in the other two headers) are instantiated once per ISA at that
 *     ISA's register width (FA_WIDTHS below);
 *   - plain C loops that gcc auto-vectorises (scale, axpy, dot, ...) are target_clones
 *     (FA_VECTOR): the vectoriser already picks each clone's own width.
 *
 * Reductions (max, sum) keep FA_VEC_BYTES of independent partial results (lanes), which
 * lets them vectorise without -ffast-math (no reassociation of one accumulator). Every ISA
 * uses the same lanes and the same order of operations, so AVX-512 and AVX2 give the same
 * bits; baseline SSE2 has no FMA, so where gcc contracts a * b + c into one (exp, axpy,
 * dot, and the small GEMMs of smallgemm.h) its results can differ in the last bit.
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
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>           /* FA_VMAX */
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(FASTATTN_NO_CLONES)
#define FA_VECTOR __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_VECTOR
#endif

#define FA_LANES 16
#define FA_VEC_BYTES 64      /* lanes of the vector-type reductions, on every ISA */
/* fa_exp_sum's blocks: the lanes are summed every FA_SUM_STEPS steps (1024 floats, 512
 * doubles) and the block sums added in double with a compensation term (Neumaier), so a
 * lane never adds more than FA_SUM_STEPS terms and the sum's relative error stays at
 * about FA_SUM_STEPS * eps whatever the row's length (one float lane over 2^24 elements
 * was 1.8e-3 off). A row of at most one block is summed exactly as before. */
#define FA_SUM_STEPS 64

/* ---- one vector width per ISA -------------------------------------------------------- */
/* Routines written with GCC vector types are compiled once per ISA, at its register
 * width: 64 bytes with AVX-512, 32 with AVX2 + FMA, 16 with baseline SSE2 (FA_VEC_BYTES
 * of lanes are then 1, 2 or 4 registers). One width for all, as target_clones gives,
 * does not work: gcc turns a comparison or select of vectors wider than the registers into
 * scalar code (64-byte fa_max was 20x, fa_exp_sum 7.6x slower with AVX2 than with
 * AVX-512 on a Zen 4 core), and keeps a wider vector carried across iterations in memory.
 * fa_isa_level() picks the version at run time. Without it (FASTATTN_NO_CLONES, other
 * compilers or CPUs) there is one version, at the width of the build's own flags. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) \
    && !defined(FASTATTN_NO_CLONES)
#define FA_WIDTHS 1
#define FA_TARGET_ZMM __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma")))
#define FA_TARGET_YMM __attribute__((target("avx2,fma")))
#define FA_TARGET_XMM

enum { FA_ISA_XMM = 0, FA_ISA_YMM = 1, FA_ISA_ZMM = 2 };

/* The best of FA_ISA_* this CPU (and OS) supports. Looked up once: the row routines are
 * called once per row. Threads racing on the first call store the same value. */
static inline int fa_isa_level(void)
{
    static int level = -1;
    int l = __atomic_load_n(&level, __ATOMIC_RELAXED);
    if (l < 0) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("fma"))
            l = FA_ISA_ZMM;
        else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            l = FA_ISA_YMM;
        else
            l = FA_ISA_XMM;
        __atomic_store_n(&level, l, __ATOMIC_RELAXED);
    }
    return l;
}

/* F##_zmm_##SFX ARGS, or the _ymm_ / _xmm_ version, whichever this CPU runs best */
#define FA_CALL_BY_ISA(F, SFX, ARGS) ({                                                    \
    int isa_ = fa_isa_level();                                                             \
    isa_ == FA_ISA_ZMM ? F##_zmm_##SFX ARGS                                                \
        : isa_ == FA_ISA_YMM ? F##_ymm_##SFX ARGS : F##_xmm_##SFX ARGS;                    \
})
#else
#define FA_WIDTHS 0
#if defined(__AVX512F__)
#define FA_NATIVE_BYTES 64
#elif defined(__AVX2__)
#define FA_NATIVE_BYTES 32
#else
#define FA_NATIVE_BYTES 16
#endif
#endif

/* Define `static void F##_##SFX PARAMS`, one version per ISA, from a body macro that takes
 * an ISA parameter last (a vector width, an unroll factor, ...): the body of each version
 * is BODY(BODY_ARGS..., X), with X = ZMM, YMM or XMM for the three versions of
 * FA_CALL_BY_ISA, which F##_##SFX calls with the arguments CALL (PARAMS' names, in
 * parentheses); without FA_WIDTHS, F##_##SFX is the one version at X = NATIVE.
 * FA_INVOKE appends X to BODY_ARGS (parenthesised) before BODY reads its arguments. */
#define FA_EXPAND(...) __VA_ARGS__
#define FA_INVOKE(M, ...) M(__VA_ARGS__)
#if FA_WIDTHS
#define FA_DEFINE_BY_ISA(F, SFX, PARAMS, CALL, BODY, BODY_ARGS, ZMM, YMM, XMM, NATIVE)      \
FA_TARGET_ZMM static void F##_zmm_##SFX PARAMS FA_INVOKE(BODY, FA_EXPAND BODY_ARGS, ZMM)   \
FA_TARGET_YMM static void F##_ymm_##SFX PARAMS FA_INVOKE(BODY, FA_EXPAND BODY_ARGS, YMM)   \
FA_TARGET_XMM static void F##_xmm_##SFX PARAMS FA_INVOKE(BODY, FA_EXPAND BODY_ARGS, XMM)   \
static void F##_##SFX PARAMS                                                               \
{                                                                                          \
    FA_CALL_BY_ISA(F, SFX, CALL);                                                          \
}
#else
#define FA_DEFINE_BY_ISA(F, SFX, PARAMS, CALL, BODY, BODY_ARGS, ZMM, YMM, XMM, NATIVE)      \
static void F##_##SFX PARAMS FA_INVOKE(BODY, FA_EXPAND BODY_ARGS, NATIVE)
#endif

/* ---- exp of a non-positive argument, element-wise, branch-free -------------------- */

/* The constants of the exp, shared by the scalar fa_expneg_* below and the vector
 * FA_EXPNEG_VECS (fa_exp_sum_*, tilegemm.h): one definition, so both compute the same
 * operations on the same numbers. EXP_LO: ln of the smallest normal, below it the result
 * is 0; ROUND: 1.5 * 2^MANT, whose addition rounds to an integer, read back from the
 * mantissa (ROUND_BITS: its bit pattern) with no float->int conversion; LN2HI + LN2LO:
 * ln 2 in two parts (Cody-Waite); EXP_P<k>: the coefficient of r^k in P, where
 * exp(r) = 1 + r + r^2 P(r). */
#define FA_EXP_LO_f32 (-87.33654f)
#define FA_LOG2E_f32 1.44269504088896341f
#define FA_ROUND_f32 12582912.0f
#define FA_ROUND_BITS_f32 0x4B400000
#define FA_LN2HI_f32 0.693359375f
#define FA_LN2LO_f32 (-2.12194440e-4f)
#define FA_BIAS_f32 127
#define FA_MANT_f32 23
#define FA_EXP_LO_f64 (-708.3964185322641)
#define FA_LOG2E_f64 1.4426950408889634
#define FA_ROUND_f64 6755399441055744.0
#define FA_ROUND_BITS_f64 0x4338000000000000LL
#define FA_LN2HI_f64 6.93147180369123816490e-01
#define FA_LN2LO_f64 1.90821492927058770002e-10
#define FA_BIAS_f64 1023
#define FA_MANT_f64 52
#define FA_EXP_P0_f32 5.0000001201E-1f
#define FA_EXP_P1_f32 1.6666665459E-1f
#define FA_EXP_P2_f32 4.1665795894E-2f
#define FA_EXP_P3_f32 8.3334519073E-3f
#define FA_EXP_P4_f32 1.3981999507E-3f
#define FA_EXP_P5_f32 1.9875691500E-4f
#define FA_EXP_P0_f64 0.5
#define FA_EXP_P1_f64 (1.0 / 6.0)
#define FA_EXP_P2_f64 (1.0 / 24.0)
#define FA_EXP_P3_f64 (1.0 / 120.0)
#define FA_EXP_P4_f64 (1.0 / 720.0)
#define FA_EXP_P5_f64 (1.0 / 5040.0)
#define FA_EXP_P6_f64 (1.0 / 40320.0)
#define FA_EXP_P7_f64 (1.0 / 362880.0)
#define FA_EXP_P8_f64 (1.0 / 3628800.0)
#define FA_EXP_P9_f64 (1.0 / 39916800.0)
#define FA_EXP_P10_f64 (1.0 / 479001600.0)
#define FA_EXP_P11_f64 (1.0 / 6227020800.0)

/* float: n = round(x*log2 e); r = x - n ln2 (two-part Cody-Waite); degree-6 minimax
 * polynomial (Cephes expf); 2^n built in the exponent bits.  n is read off the
 * rounding constant's mantissa so no float->int conversion is needed. */
static inline float fa_expneg_f32(float x)
{
    const float lo = FA_EXP_LO_f32;              /* ln(FLT_MIN): below it the result is 0 */
    float xc = x < lo ? lo : x;                  /* NaN compares false and passes through */
    float kf = xc * FA_LOG2E_f32 + FA_ROUND_f32; /* 0x1.8p23: round to integer */
    int32_t kbits;
    memcpy(&kbits, &kf, 4);
    float n = kf - FA_ROUND_f32;
    float r = xc - n * FA_LN2HI_f32;
    r = r - n * FA_LN2LO_f32;
    float p = FA_EXP_P5_f32;
    p = p * r + FA_EXP_P4_f32;
    p = p * r + FA_EXP_P3_f32;
    p = p * r + FA_EXP_P2_f32;
    p = p * r + FA_EXP_P1_f32;
    p = p * r + FA_EXP_P0_f32;
    p = p * r * r + r + 1.0f;
    /* 2^n, n in [-126, 0] */
    int32_t ebits = (kbits - FA_ROUND_BITS_f32 + FA_BIAS_f32) << FA_MANT_f32;
    float scale;
    memcpy(&scale, &ebits, 4);
    float y = p * scale;
    return x < lo ? 0.0f : y;
}

/* double: same scheme, degree-13 Taylor polynomial on |r| <= ln2/2 (error < 1e-17). */
static inline double fa_expneg_f64(double x)
{
    const double lo = FA_EXP_LO_f64;             /* ln(DBL_MIN) */
    double xc = x < lo ? lo : x;
    double kf = xc * FA_LOG2E_f64 + FA_ROUND_f64; /* 0x1.8p52 */
    int64_t kbits;
    memcpy(&kbits, &kf, 8);
    double n = kf - FA_ROUND_f64;
    double r = xc - n * FA_LN2HI_f64;
    r = r - n * FA_LN2LO_f64;
    double p = FA_EXP_P11_f64;
    p = p * r + FA_EXP_P10_f64;
    p = p * r + FA_EXP_P9_f64;
    p = p * r + FA_EXP_P8_f64;
    p = p * r + FA_EXP_P7_f64;
    p = p * r + FA_EXP_P6_f64;
    p = p * r + FA_EXP_P5_f64;
    p = p * r + FA_EXP_P4_f64;
    p = p * r + FA_EXP_P3_f64;
    p = p * r + FA_EXP_P2_f64;
    p = p * r + FA_EXP_P1_f64;
    p = p * r + FA_EXP_P0_f64;
    p = p * r * r + r + 1.0;
    int64_t ebits = (kbits - FA_ROUND_BITS_f64 + FA_BIAS_f64) << FA_MANT_f64;
    double scale;
    memcpy(&scale, &ebits, 8);
    double y = p * scale;
    return x < lo ? 0.0 : y;
}

/* ---- row routines, instantiated for float and double ------------------------------- */
/* Every routine accepts n == 0. Max of nothing (or of all -inf) is -inf. */

/* The routines written with vector types are defined once, by FA_DEFINE_ROW_VECTOR_ROUTINES
 * below, and instantiated per ISA. In their bodies vec / ivec are vectors of VB bytes of T
 * / of its integer twin, W lanes each, and a step of their main loops covers FA_VEC_BYTES,
 * R registers. gcc lowers the comparisons and selects of vectors of the registers' width
 * to each ISA's own instructions. */
#define FA_VEC_TYPES(T, IT, VB)                                                            \
    typedef T vec __attribute__((vector_size(VB)));                                        \
    typedef IT ivec __attribute__((vector_size(VB)));                                      \
    enum { W = (VB) / sizeof(T), R = FA_VEC_BYTES / (VB) }

/* stmt for each of the R registers u_ of a step */
#define FA_ALL(stmt) for (int u_ = 0; u_ < R; u_++) { stmt; }

#define FA_CAT(a, b) FA_CAT_(a, b)
#define FA_CAT_(a, b) a##b

/* a > b ? a : b lane by lane (vectors of type vec). x86's max instructions compute exactly
 * that (b when a is NaN, b of +0 and -0) with half the latency of a compare and a blend:
 * a row's running max is a chain of them. */
#if defined(__GNUC__) && defined(__x86_64__)
#define FA_VMAX(a, b) ((vec)_Generic((a), __m512: _mm512_max_ps, __m512d: _mm512_max_pd,   \
    __m256: _mm256_max_ps, __m256d: _mm256_max_pd, __m128: _mm_max_ps,                     \
    __m128d: _mm_max_pd)((a), (b)))
#else
#define FA_VMAX(a, b) ({                                                                   \
    vec a_ = (a), b_ = (b);                                                                \
    ivec gt_ = (ivec)(a_ > b_);                                                            \
    (vec)(((ivec)a_ & gt_) | ((ivec)b_ & ~gt_));                                           \
})
#endif

/* The exp polynomials (those of fa_expneg_*, step by step, on the same FA_EXP_P*),
 * each Horner step applied to the R registers p[], r[] in turn. */
#define FA_EXP_POLY_STEPS_f32(p, r)                                                        \
    FA_ALL(p[u_] = FA_EXP_P5_f32 * r[u_] + FA_EXP_P4_f32)                                  \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P3_f32)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P2_f32)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P1_f32)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P0_f32)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] * r[u_] + r[u_] + 1.0f)
#define FA_EXP_POLY_STEPS_f64(p, r)                                                        \
    FA_ALL(p[u_] = FA_EXP_P11_f64 * r[u_] + FA_EXP_P10_f64)                                \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P9_f64)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P8_f64)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P7_f64)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P6_f64)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P5_f64)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P4_f64)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P3_f64)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P2_f64)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P1_f64)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + FA_EXP_P0_f64)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] * r[u_] + r[u_] + 1.0)

/* e[u] = exp(v[u]) for the R registers v[] <= 0 of a step: fa_expneg_* lane by lane, the
 * same operations in the same order (so the same bits on the same ISA). Each stage runs
 * over the R registers before the next, so that their R chains of dependent steps
 * interleave in the instruction stream; one chain after the other left AVX2 and SSE2
 * waiting on latency (1.2x to 1.3x slower). */
#define FA_EXPNEG_VECS(SFX, v, e) do {                                                     \
    const vec lo_ = (vec){0} + FA_EXP_LO_##SFX;                                            \
    ivec below_[R];                                                                        \
    vec kf_[R], n_[R], r_[R], p_[R];                                                       \
    FA_ALL(below_[u_] = (ivec)(v[u_] < lo_))          /* result 0 (and -inf -> 0) */       \
    FA_ALL(r_[u_] = FA_VMAX(lo_, v[u_]))              /* v < lo ? lo : v; NaN stays */     \
    FA_ALL(kf_[u_] = r_[u_] * FA_LOG2E_##SFX + FA_ROUND_##SFX)                             \
    FA_ALL(n_[u_] = kf_[u_] - FA_ROUND_##SFX)                                              \
    FA_ALL(r_[u_] = r_[u_] - n_[u_] * FA_LN2HI_##SFX)                                      \
    FA_ALL(r_[u_] = r_[u_] - n_[u_] * FA_LN2LO_##SFX)                                      \
    FA_EXP_POLY_STEPS_##SFX(p_, r_)                                                        \
    FA_ALL(e[u_] = (vec)((ivec)(p_[u_] * (vec)((((ivec)kf_[u_] - FA_ROUND_BITS_##SFX)      \
                                              + FA_BIAS_##SFX) << FA_MANT_##SFX))          \
                         & ~below_[u_]))                                                   \
} while (0)

/* Partial max: acc = v > acc ? v : acc (strict: of equal values the first stays, as in
 * the scalar loop, which decides between -0 and +0); nan collects the lanes where v is
 * NaN (NaN never enters acc). */
#define FA_MAX_STEP(acc, nan, v) do {                                                      \
    (acc) = FA_VMAX(v, acc);                                                               \
    (nan) |= (ivec)((v) != (v));                                                           \
} while (0)

/* The max of x[j:n] and of the R partial maxima acc[] (lanes in order): NaN if any element
 * was NaN (a NaN score must give a NaN row, not a masked one). The same result as one
 * scalar pass over x[j:n] and then over the lanes, on every ISA: "the first of the
 * largest" is associative, so the lanes are combined as a tree of neighbours, lane k with
 * lane k + b for b = 1, 2, 4, ... (later > earlier ? later : earlier), log2(W) steps
 * instead of a chain of R * W. IOTA: the lane numbers {0, 1, ..., W - 1}. */
#define FA_IOTA_f32_64 {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
#define FA_IOTA_f32_32 {0, 1, 2, 3, 4, 5, 6, 7}
#define FA_IOTA_f32_16 {0, 1, 2, 3}
#define FA_IOTA_f64_64 {0, 1, 2, 3, 4, 5, 6, 7}
#define FA_IOTA_f64_32 {0, 1, 2, 3}
#define FA_IOTA_f64_16 {0, 1}
#define FA_MAX_FINISH(T, IOTA, acc, nan, x, j, n) ({                                       \
    const ivec lane_ = IOTA;                                                               \
    T m_ = -INFINITY;                                                                      \
    int any_nan_ = 0;                                                                      \
    for (; j < n; j++) { m_ = x[j] > m_ ? x[j] : m_; any_nan_ |= x[j] != x[j]; }           \
    ivec nans_ = nan[0];                                                                   \
    for (int u_ = 1; u_ < R; u_++) nans_ |= nan[u_];                                       \
    vec top_[R];                                                                           \
    FA_ALL(top_[u_] = acc[u_])                                                             \
    for (int b_ = 1; b_ < W; b_ *= 2) {                                                    \
        ivec down_ = (lane_ + b_) & (W - 1);          /* lane k <- lane k + b */           \
        FA_ALL(top_[u_] = FA_VMAX(__builtin_shuffle(top_[u_], down_), top_[u_]))           \
        nans_ |= __builtin_shuffle(nans_, down_);                                          \
    }                                                                                      \
    T lanes_ = top_[0][0];                                                                 \
    for (int u_ = 1; u_ < R; u_++) lanes_ = top_[u_][0] > lanes_ ? top_[u_][0] : lanes_;   \
    m_ = lanes_ > m_ ? lanes_ : m_;                                                        \
    any_nan_ || nans_[0] != 0 ? (T)NAN : m_;                                               \
})

/* drop[u] = all ones in the lanes of register u whose keep byte is 0, for the R registers
 * of a step (R * W bytes of keep). AVX2 and AVX-512 widen the bytes' test by sign
 * extension (vpmovsxb*). SSE2 has no such instruction (gcc widens lane by lane in scalar
 * code, 3x to 6x slower), so there the test is spread over the lanes by interleaving it with
 * itself (punpckl/h*): twice for float, three times for double. */
#define FA_DROP_MASKS_WIDE(keep, drop) do {                                                \
    typedef uint8_t bytes_ __attribute__((vector_size(W)));                                \
    for (int u_ = 0; u_ < R; u_++) {                                                       \
        bytes_ kb_;                                                                        \
        memcpy(&kb_, (keep) + u_ * W, sizeof kb_);                                         \
        drop[u_] = __builtin_convertvector(kb_ == 0, ivec);                                \
    }                                                                                      \
} while (0)
#define FA_DROP_MASKS_64 FA_DROP_MASKS_WIDE
#define FA_DROP_MASKS_32 FA_DROP_MASKS_WIDE
#define FA_DROP_MASKS_16(keep, drop) do {                                                  \
    typedef int8_t b_ __attribute__((vector_size(16)));                                    \
    typedef int16_t h_ __attribute__((vector_size(16)));                                   \
    typedef int32_t w_ __attribute__((vector_size(16)));                                   \
    typedef int64_t q_ __attribute__((vector_size(16)));                                   \
    _Static_assert(R == 4, "a step is 4 SSE2 registers");                                  \
    b_ kb_;                                                                                \
    if (W == 4) {                                 /* float: 16 bytes */                    \
        memcpy(&kb_, (keep), 16);                                                          \
    } else {                                      /* double: 8 bytes, one movq */          \
        int64_t k8_;                                                                       \
        memcpy(&k8_, (keep), 8);                                                           \
        kb_ = (b_)(q_){k8_, 0};                                                            \
    }                                                                                      \
    b_ t_ = kb_ == 0;                                                                      \
    h_ lo_ = (h_)__builtin_shuffle(t_, t_, (b_){0, 16, 1, 17, 2, 18, 3, 19,                \
                                                4, 20, 5, 21, 6, 22, 7, 23});              \
    h_ hi_ = (h_)__builtin_shuffle(t_, t_, (b_){8, 24, 9, 25, 10, 26, 11, 27,              \
                                                12, 28, 13, 29, 14, 30, 15, 31});          \
    w_ q0_ = (w_)__builtin_shuffle(lo_, lo_, (h_){0, 8, 1, 9, 2, 10, 3, 11});              \
    w_ q1_ = (w_)__builtin_shuffle(lo_, lo_, (h_){4, 12, 5, 13, 6, 14, 7, 15});            \
    w_ q2_ = (w_)__builtin_shuffle(hi_, hi_, (h_){0, 8, 1, 9, 2, 10, 3, 11});              \
    w_ q3_ = (w_)__builtin_shuffle(hi_, hi_, (h_){4, 12, 5, 13, 6, 14, 7, 15});            \
    if (W == 4) {                                                                          \
        drop[0] = (ivec)q0_; drop[1] = (ivec)q1_; drop[2] = (ivec)q2_; drop[3] = (ivec)q3_; \
    } else {                                                                               \
        drop[0] = (ivec)__builtin_shuffle(q0_, q0_, (w_){0, 4, 1, 5});                     \
        drop[1] = (ivec)__builtin_shuffle(q0_, q0_, (w_){2, 6, 3, 7});                     \
        drop[2] = (ivec)__builtin_shuffle(q1_, q1_, (w_){0, 4, 1, 5});                     \
        drop[3] = (ivec)__builtin_shuffle(q1_, q1_, (w_){2, 6, 3, 7});                     \
    }                                                                                      \
} while (0)

/* The routines for one ISA: named F##ISA##_##SFX (ISA: _zmm, _ymm, _xmm, or nothing), with
 * function attribute ATTR and vectors of VB bytes. */
#define FA_DEFINE_ROW_VECTOR_ROUTINES(T, IT, SFX, EXPNEG, ISA, ATTR, VB)                   \
                                                                                           \
/* max_j x[j]; NaN if any x[j] is NaN. gcc does not vectorise a scalar `a > b ? a : b` */  \
/* max reduction without -ffast-math, hence vector types. */                               \
ATTR static T fa_max##ISA##_##SFX(const T *x, ptrdiff_t n)                                 \
{                                                                                          \
    FA_VEC_TYPES(T, IT, VB);                                                               \
    vec acc[R];                                                                            \
    ivec nan[R];                                                                           \
    FA_ALL(acc[u_] = (vec){0} - (T)INFINITY; nan[u_] = (ivec){0})                          \
    ptrdiff_t j = 0;                                                                       \
    for (; j + R * W <= n; j += R * W)                                                     \
        for (int u = 0; u < R; u++) {                                                      \
            vec v;                                                                         \
            memcpy(&v, x + j + u * W, sizeof v);                                           \
            FA_MAX_STEP(acc[u], nan[u], v);                                                \
        }                                                                                  \
    return FA_MAX_FINISH(T, FA_CAT(FA_IOTA_##SFX##_, VB), acc, nan, x, j, n);              \
}                                                                                          \
                                                                                           \
/* x[j] = add[j] == -inf ? -inf : x[j] + add[j]; return max_j x[j]   (float mask; one */ \
/* pass). A -inf of the mask drops the entry whatever its score (+inf and NaN too), as */  \
/* a skipped tile and a bool mask do: not +inf + -inf = NaN. */                            \
ATTR static T fa_add_max##ISA##_##SFX(T *x, const T *add, ptrdiff_t n)                     \
{                                                                                          \
    FA_VEC_TYPES(T, IT, VB);                                                               \
    const vec ninf = (vec){0} - (T)INFINITY;                                               \
    vec acc[R];                                                                            \
    ivec nan[R];                                                                           \
    FA_ALL(acc[u_] = (vec){0} - (T)INFINITY; nan[u_] = (ivec){0})                          \
    ptrdiff_t j = 0;                                                                       \
    for (; j + R * W <= n; j += R * W)                                                     \
        for (int u = 0; u < R; u++) {                                                      \
            vec v, a;                                                                      \
            memcpy(&v, x + j + u * W, sizeof v);                                           \
            memcpy(&a, add + j + u * W, sizeof a);                                         \
            v = (vec)((ivec)v & ~(ivec)(a == ninf)) + a;   /* dropped: 0 + -inf */         \
            memcpy(x + j + u * W, &v, sizeof v);                                           \
            FA_MAX_STEP(acc[u], nan[u], v);                                                \
        }                                                                                  \
    for (ptrdiff_t t = j; t < n; t++)                                                      \
        x[t] = add[t] == -INFINITY ? (T)-INFINITY : x[t] + add[t];                         \
    return FA_MAX_FINISH(T, FA_CAT(FA_IOTA_##SFX##_, VB), acc, nan, x, j, n);              \
}                                                                                          \
                                                                                           \
/* x[j] = keep[j] ? x[j] : -inf; return max_j x[j]   (bool mask, True = keep; one pass) */ \
ATTR static T fa_keep_max##ISA##_##SFX(T *x, const uint8_t *keep, ptrdiff_t n)             \
{                                                                                          \
    FA_VEC_TYPES(T, IT, VB);                                                               \
    const ivec ninf = (ivec)((vec){0} - (T)INFINITY);                                      \
    vec acc[R];                                                                            \
    ivec nan[R], drop[R];                                                                  \
    FA_ALL(acc[u_] = (vec){0} - (T)INFINITY; nan[u_] = (ivec){0})                          \
    ptrdiff_t j = 0;                                                                       \
    for (; j + R * W <= n; j += R * W) {                                                   \
        FA_CAT(FA_DROP_MASKS_, VB)(keep + j, drop);                                        \
        for (int u = 0; u < R; u++) {                                                      \
            vec v;                                                                         \
            memcpy(&v, x + j + u * W, sizeof v);                                           \
            v = (vec)(((ivec)v & ~drop[u]) | (ninf & drop[u]));                            \
            memcpy(x + j + u * W, &v, sizeof v);                                           \
            FA_MAX_STEP(acc[u], nan[u], v);                                                \
        }                                                                                  \
    }                                                                                      \
    for (ptrdiff_t t = j; t < n; t++) x[t] = keep[t] ? x[t] : (T)-INFINITY;                \
    return FA_MAX_FINISH(T, FA_CAT(FA_IOTA_##SFX##_, VB), acc, nan, x, j, n);              \
}                                                                                          \
                                                                                           \
/* x[j] = exp(x[j] - m); return sum_j x[j].  m must be finite. The sum, block by block */ \
/* of FA_SUM_STEPS steps: lanes over the steps, then the lanes in order, each block's */   \
/* sum added to a compensated double sum; the last block adds the tail in order, then */   \
/* its lanes in order (the same on every ISA). */                                          \
ATTR static T fa_exp_sum##ISA##_##SFX(T *x, ptrdiff_t n, T m)                              \
{                                                                                          \
    FA_VEC_TYPES(T, IT, VB);                                                               \
    vec acc[R];                                                                            \
    double hi = 0, lo = 0;                 /* the finished blocks: hi + lo */             \
    ptrdiff_t j = 0;                                                                       \
    for (;;) {                                                                             \
        ptrdiff_t end = n - j > FA_SUM_STEPS * R * W ? j + FA_SUM_STEPS * R * W : n;       \
        FA_ALL(acc[u_] = (vec){0})                                                         \
        for (; j + R * W <= end; j += R * W) {                                             \
            vec v[R], e[R];                                                                \
            FA_ALL(memcpy(&v[u_], x + j + u_ * W, sizeof v[u_]); v[u_] = v[u_] - m)        \
            FA_EXPNEG_VECS(SFX, v, e);                                                     \
            FA_ALL(memcpy(x + j + u_ * W, &e[u_], sizeof e[u_]); acc[u_] += e[u_])         \
        }                                                                                  \
        if (end == n)                                                                      \
            break;                                                                         \
        T b = 0;                                                                           \
        for (int u = 0; u < R; u++)                                                        \
            for (int k = 0; k < W; k++) b += acc[u][k];                                    \
        double t = hi + b;                 /* Neumaier: lo collects what t rounded off */ \
        lo += fabs(hi) >= fabs((double)b) ? (hi - t) + b : ((double)b - t) + hi;           \
        hi = t;                                                                            \
    }                                                                                      \
    T s = 0;                                                                               \
    for (; j < n; j++) { T e = EXPNEG(x[j] - m); x[j] = e; s += e; }                       \
    for (int u = 0; u < R; u++)                                                            \
        for (int k = 0; k < W; k++) s += acc[u][k];                                        \
    return hi == 0 ? s : (T)(hi + (lo + s));                                               \
}

/* The vector-type routines per ISA, and fa_max_f32 & co. picking one at run time. */
#if FA_WIDTHS
#define FA_DEFINE_ROW_VECTOR_ALL(T, IT, SFX, EXPNEG)                                       \
FA_DEFINE_ROW_VECTOR_ROUTINES(T, IT, SFX, EXPNEG, _zmm, FA_TARGET_ZMM, 64)                 \
FA_DEFINE_ROW_VECTOR_ROUTINES(T, IT, SFX, EXPNEG, _ymm, FA_TARGET_YMM, 32)                 \
FA_DEFINE_ROW_VECTOR_ROUTINES(T, IT, SFX, EXPNEG, _xmm, FA_TARGET_XMM, 16)                 \
static T fa_max_##SFX(const T *x, ptrdiff_t n)                                             \
{ return FA_CALL_BY_ISA(fa_max, SFX, (x, n)); }                                            \
static T fa_add_max_##SFX(T *x, const T *add, ptrdiff_t n)                                 \
{ return FA_CALL_BY_ISA(fa_add_max, SFX, (x, add, n)); }                                   \
static T fa_keep_max_##SFX(T *x, const uint8_t *keep, ptrdiff_t n)                         \
{ return FA_CALL_BY_ISA(fa_keep_max, SFX, (x, keep, n)); }                                 \
static T fa_exp_sum_##SFX(T *x, ptrdiff_t n, T m)                                          \
{ return FA_CALL_BY_ISA(fa_exp_sum, SFX, (x, n, m)); }
#else
#define FA_DEFINE_ROW_VECTOR_ALL(T, IT, SFX, EXPNEG)                                       \
FA_DEFINE_ROW_VECTOR_ROUTINES(T, IT, SFX, EXPNEG, , , FA_NATIVE_BYTES)
#endif

FA_DEFINE_ROW_VECTOR_ALL(float, int32_t, f32, fa_expneg_f32)
FA_DEFINE_ROW_VECTOR_ALL(double, int64_t, f64, fa_expneg_f64)

/* The plain loops (auto-vectorised in each target_clones clone). */
#define FA_DEFINE_ROW_ROUTINES(T, SFX)                                                      \
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

FA_DEFINE_ROW_ROUTINES(float, f32)
FA_DEFINE_ROW_ROUTINES(double, f64)

/* ---- softmax helpers (softmax_row; also gathered attention, lowrank) ---------------- */

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

#endif /* FASTATTN_VECMATH_H */
