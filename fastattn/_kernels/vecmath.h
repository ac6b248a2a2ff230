/*
 * vecmath.h -- the vector loops of the tile/softmax core, shared by every kernel family.
 *
 * Each routine works on one row of a score tile. On x86-64 gcc builds every routine exists
 * for AVX-512, AVX2+FMA and baseline SSE2, and the one for the running CPU is picked at
 * run time, so wheels need no -march=native:
 *   - routines written with GCC vector types (the maxima, exp + sum, tanh scores) are
 *     instantiated once per ISA at that ISA's register width (FA_WIDTHS below);
 *   - plain C loops that gcc auto-vectorises (scale, axpy, dot, ...) are target_clones
 *     (FA_VECTOR): the vectoriser already picks each clone's own width.
 *
 * Reductions (max, sum) keep FA_VEC_BYTES of independent partial results (lanes), which
 * lets them vectorise without -ffast-math (no reassociation of one accumulator). Every ISA
 * uses the same lanes and the same order of operations, so AVX-512 and AVX2 give the same
 * bits; baseline SSE2 has no FMA, so where gcc contracts a * b + c into one (exp, axpy,
 * dot, the small GEMMs) its results can differ in the last bit.
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
#define FA_EXP_LO_f64 (-708.3964185322641)
#define FA_LOG2E_f64 1.4426950408889634
#define FA_ROUND_f64 6755399441055744.0
#define FA_ROUND_BITS_f64 0x4338000000000000LL
#define FA_LN2HI_f64 6.93147180369123816490e-01
#define FA_LN2LO_f64 1.90821492927058770002e-10
#define FA_BIAS_f64 1023
#define FA_MANT_f64 52

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

/* The exp polynomials (those of fa_expneg_*, step by step), each Horner step applied to
 * the R registers p[], r[] in turn. */
#define FA_EXP_POLY_STEPS_f32(p, r)                                                        \
    FA_ALL(p[u_] = 1.9875691500E-4f * r[u_] + 1.3981999507E-3f)                            \
    FA_ALL(p[u_] = p[u_] * r[u_] + 8.3334519073E-3f)                                       \
    FA_ALL(p[u_] = p[u_] * r[u_] + 4.1665795894E-2f)                                       \
    FA_ALL(p[u_] = p[u_] * r[u_] + 1.6666665459E-1f)                                       \
    FA_ALL(p[u_] = p[u_] * r[u_] + 5.0000001201E-1f)                                       \
    FA_ALL(p[u_] = p[u_] * r[u_] * r[u_] + r[u_] + 1.0f)
#define FA_EXP_POLY_STEPS_f64(p, r)                                                        \
    FA_ALL(p[u_] = 1.0 / 6227020800.0 * r[u_] + 1.0 / 479001600.0)                         \
    FA_ALL(p[u_] = p[u_] * r[u_] + 1.0 / 39916800.0)                                       \
    FA_ALL(p[u_] = p[u_] * r[u_] + 1.0 / 3628800.0)                                        \
    FA_ALL(p[u_] = p[u_] * r[u_] + 1.0 / 362880.0)                                         \
    FA_ALL(p[u_] = p[u_] * r[u_] + 1.0 / 40320.0)                                          \
    FA_ALL(p[u_] = p[u_] * r[u_] + 1.0 / 5040.0)                                           \
    FA_ALL(p[u_] = p[u_] * r[u_] + 1.0 / 720.0)                                            \
    FA_ALL(p[u_] = p[u_] * r[u_] + 1.0 / 120.0)                                            \
    FA_ALL(p[u_] = p[u_] * r[u_] + 1.0 / 24.0)                                             \
    FA_ALL(p[u_] = p[u_] * r[u_] + 1.0 / 6.0)                                              \
    FA_ALL(p[u_] = p[u_] * r[u_] + 0.5)                                                    \
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
/* x[j] += add[j]; return max_j x[j]   (float mask; one pass) */                           \
ATTR static T fa_add_max##ISA##_##SFX(T *x, const T *add, ptrdiff_t n)                     \
{                                                                                          \
    FA_VEC_TYPES(T, IT, VB);                                                               \
    vec acc[R];                                                                            \
    ivec nan[R];                                                                           \
    FA_ALL(acc[u_] = (vec){0} - (T)INFINITY; nan[u_] = (ivec){0})                          \
    ptrdiff_t j = 0;                                                                       \
    for (; j + R * W <= n; j += R * W)                                                     \
        for (int u = 0; u < R; u++) {                                                      \
            vec v, a;                                                                      \
            memcpy(&v, x + j + u * W, sizeof v);                                           \
            memcpy(&a, add + j + u * W, sizeof a);                                         \
            v += a;                                                                        \
            memcpy(x + j + u * W, &v, sizeof v);                                           \
            FA_MAX_STEP(acc[u], nan[u], v);                                                \
        }                                                                                  \
    for (ptrdiff_t t = j; t < n; t++) x[t] += add[t];                                      \
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
/* x[j] = exp(x[j] - m); return sum_j x[j].  m must be finite. The sum: lanes over the */  \
/* steps, then the tail in order, then the lanes in order (the same on every ISA). */      \
ATTR static T fa_exp_sum##ISA##_##SFX(T *x, ptrdiff_t n, T m)                              \
{                                                                                          \
    FA_VEC_TYPES(T, IT, VB);                                                               \
    vec acc[R];                                                                            \
    FA_ALL(acc[u_] = (vec){0})                                                             \
    ptrdiff_t j = 0;                                                                       \
    for (; j + R * W <= n; j += R * W) {                                                   \
        vec v[R], e[R];                                                                    \
        FA_ALL(memcpy(&v[u_], x + j + u_ * W, sizeof v[u_]); v[u_] = v[u_] - m)            \
        FA_EXPNEG_VECS(SFX, v, e);                                                         \
        FA_ALL(memcpy(x + j + u_ * W, &e[u_], sizeof e[u_]); acc[u_] += e[u_])             \
    }                                                                                      \
    T s = 0;                                                                               \
    for (; j < n; j++) { T e = EXPNEG(x[j] - m); x[j] = e; s += e; }                       \
    for (int u = 0; u < R; u++)                                                            \
        for (int k = 0; k < W; k++) s += acc[u][k];                                        \
    return s;                                                                              \
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

/* One version per ISA at its register width (FA_WIDTHS above): a vector wider than the
 * registers that is carried across loop iterations (the accumulators) lives in memory,
 * which made 64-byte vectors half as fast as 32-byte ones with AVX2, while AVX-512 runs
 * 64-byte ones 1.5x faster, and SSE2 runs 16-byte ones 1.8x (float) and 1.5x (double)
 * faster than 32-byte ones (all measured on a Zen 4 core). The width does not change the
 * results: each key has its own lane and its own sums. */
#define FA_TANH_SCORES_ARGS(T) \
    (const T *a, const T *bt, ptrdiff_t ldb, const T *w, ptrdiff_t h, ptrdiff_t n, T *s)

#if FA_WIDTHS
#define FA_DEFINE_TANH_SCORES(T, IT, SFX)                                                   \
FA_TARGET_ZMM static void fa_tanh_scores_zmm_##SFX FA_TANH_SCORES_ARGS(T)                  \
FA_TANH_SCORES_BODY(T, IT, SFX, 64)                                                        \
FA_TARGET_YMM static void fa_tanh_scores_ymm_##SFX FA_TANH_SCORES_ARGS(T)                  \
FA_TANH_SCORES_BODY(T, IT, SFX, 32)                                                        \
FA_TARGET_XMM static void fa_tanh_scores_xmm_##SFX FA_TANH_SCORES_ARGS(T)                  \
FA_TANH_SCORES_BODY(T, IT, SFX, 16)                                                        \
static void fa_tanh_scores_##SFX FA_TANH_SCORES_ARGS(T)                                    \
{                                                                                          \
    FA_CALL_BY_ISA(fa_tanh_scores, SFX, (a, bt, ldb, w, h, n, s));                         \
}
#else
#define FA_DEFINE_TANH_SCORES(T, IT, SFX)                                                   \
static void fa_tanh_scores_##SFX FA_TANH_SCORES_ARGS(T)                                    \
FA_TANH_SCORES_BODY(T, IT, SFX, FA_NATIVE_BYTES)
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
#if FA_WIDTHS
#define FA_DEFINE_GEMM_ABT_SMALL(T, SFX)                                                    \
FA_TARGET_ZMM static void fa_gemm_abt_small_zmm_##SFX FA_GEMM_ABT_SMALL_ARGS(T)            \
FA_GEMM_ABT_SMALL_BODY(T, SFX, 4)                                                          \
FA_TARGET_YMM static void fa_gemm_abt_small_ymm_##SFX FA_GEMM_ABT_SMALL_ARGS(T)            \
FA_GEMM_ABT_SMALL_BODY(T, SFX, 2)                                                          \
FA_TARGET_XMM static void fa_gemm_abt_small_xmm_##SFX FA_GEMM_ABT_SMALL_ARGS(T)            \
FA_GEMM_ABT_SMALL_BODY(T, SFX, 4)                                                          \
static void fa_gemm_abt_small_##SFX FA_GEMM_ABT_SMALL_ARGS(T)                              \
{                                                                                          \
    FA_CALL_BY_ISA(fa_gemm_abt_small, SFX,                                                 \
                   (m, n, k, alpha, a, lda, b, ldb, c, ldc, pf, pf_bytes));                \
}
#else
#define FA_DEFINE_GEMM_ABT_SMALL(T, SFX)                                                    \
static void fa_gemm_abt_small_##SFX FA_GEMM_ABT_SMALL_ARGS(T)                              \
FA_GEMM_ABT_SMALL_BODY(T, SFX, (FA_NATIVE_BYTES == 32 ? 2 : 4))
#endif

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
#if FA_WIDTHS
#define FA_DEFINE_GEMM_AB_ACC_SMALL(T, SFX)                                                \
FA_TARGET_ZMM static void fa_gemm_ab_acc_small_zmm_##SFX FA_GEMM_AB_ACC_SMALL_ARGS(T)      \
FA_GEMM_AB_ACC_SMALL_BODY(T, 32)                                                           \
FA_TARGET_YMM static void fa_gemm_ab_acc_small_ymm_##SFX FA_GEMM_AB_ACC_SMALL_ARGS(T)      \
FA_GEMM_AB_ACC_SMALL_BODY(T, 32)                                                           \
FA_TARGET_XMM static void fa_gemm_ab_acc_small_xmm_##SFX FA_GEMM_AB_ACC_SMALL_ARGS(T)      \
FA_GEMM_AB_ACC_SMALL_BODY(T, 16)                                                           \
static void fa_gemm_ab_acc_small_##SFX FA_GEMM_AB_ACC_SMALL_ARGS(T)                        \
{                                                                                          \
    FA_CALL_BY_ISA(fa_gemm_ab_acc_small, SFX,                                              \
                   (m, n, k, a, lda, b, ldb, c, ldc, pf, pf_bytes));                       \
}
#else
#define FA_DEFINE_GEMM_AB_ACC_SMALL(T, SFX)                                                \
static void fa_gemm_ab_acc_small_##SFX FA_GEMM_AB_ACC_SMALL_ARGS(T)                        \
FA_GEMM_AB_ACC_SMALL_BODY(T, (FA_NATIVE_BYTES < 32 ? FA_NATIVE_BYTES : 32))
#endif

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

#endif /* FASTATTN_VECMATH_H */
