/*
 * vecmath_check.c -- checks, and times, the row routines of fastattn/_kernels/vecmath.h
 * (fa_max, fa_add_max, fa_keep_max, fa_exp_sum) and the small GEMMs of smallgemm.h in
 * every ISA version this CPU can run, against scalar references. tests/test_vecmath.py
 * compiles and runs it; by hand, from the repository root:
 *
 *   cc -O3 -fno-math-errno [-march=x86-64-v3 -DFASTATTN_NO_CLONES] -Ifastattn/_kernels \
 *      tests/vecmath_check.c -lm -o vecmath_check
 *   ./vecmath_check check      edge cases; exit status 1 on any mismatch
 *   ./vecmath_check bench [n]  ns per element of each routine and version (rows of n)
 *
 * The references follow the routines' own order of operations (FA_VEC_BYTES of lanes over
 * the full steps, then the tail in order, then the lanes in order; the scalar exp compiled
 * for the same ISA), so the routines must match them bit for bit, and the AVX-512 and
 * AVX2 versions must match each other. The exp is also checked against expl (float < 2
 * ulp, double < 1 ulp), the sums and the small GEMMs against long double.
 */
#define _GNU_SOURCE
#include "vecmath.h"
#include "smallgemm.h"
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* ---------------------------------------------------------------- variants under test */
typedef struct {
    const char *name;
    float (*max_f32)(const float *, ptrdiff_t);
    double (*max_f64)(const double *, ptrdiff_t);
    float (*add_max_f32)(float *, const float *, ptrdiff_t);
    double (*add_max_f64)(double *, const double *, ptrdiff_t);
    float (*keep_max_f32)(float *, const uint8_t *, ptrdiff_t);
    double (*keep_max_f64)(double *, const uint8_t *, ptrdiff_t);
    float (*exp_sum_f32)(float *, ptrdiff_t, float);
    double (*exp_sum_f64)(double *, ptrdiff_t, double);
    float (*expneg_f32)(float);      /* scalar exp compiled for the same target */
    double (*expneg_f64)(double);
    int needs;   /* 0 any, 1 avx2+fma, 2 avx512 */
} variant;

/* The scalar exp compiled for each version's ISA: gcc contracts a * b + c where the ISA
 * has FMA, in the scalar and the vector code alike. The public routines run the best
 * version for this CPU (with FASTATTN_NO_CLONES: the build's own). */
#if FA_WIDTHS
FA_TARGET_ZMM static float expneg_zmm_f32(float x) { return fa_expneg_f32(x); }
FA_TARGET_ZMM static double expneg_zmm_f64(double x) { return fa_expneg_f64(x); }
FA_TARGET_YMM static float expneg_ymm_f32(float x) { return fa_expneg_f32(x); }
FA_TARGET_YMM static double expneg_ymm_f64(double x) { return fa_expneg_f64(x); }
static float expneg_xmm_f32(float x) { return fa_expneg_f32(x); }
static double expneg_xmm_f64(double x) { return fa_expneg_f64(x); }
static float pub_expneg_f32(float x) { return FA_CALL_BY_ISA(expneg, f32, (x)); }
static double pub_expneg_f64(double x) { return FA_CALL_BY_ISA(expneg, f64, (x)); }
#else
static float pub_expneg_f32(float x) { return fa_expneg_f32(x); }
static double pub_expneg_f64(double x) { return fa_expneg_f64(x); }
#endif

#if FA_WIDTHS
#define V(ISA, need) { #ISA, fa_max_##ISA##_f32, fa_max_##ISA##_f64,                        \
    fa_add_max_##ISA##_f32, fa_add_max_##ISA##_f64, fa_keep_max_##ISA##_f32,                  \
    fa_keep_max_##ISA##_f64, fa_exp_sum_##ISA##_f32, fa_exp_sum_##ISA##_f64,                  \
    expneg_##ISA##_f32, expneg_##ISA##_f64, need }
static variant variants[] = {
    V(zmm, 2), V(ymm, 1), V(xmm, 0),
    { "public", fa_max_f32, fa_max_f64, fa_add_max_f32, fa_add_max_f64, fa_keep_max_f32,
      fa_keep_max_f64, fa_exp_sum_f32, fa_exp_sum_f64, pub_expneg_f32, pub_expneg_f64, 0 },
};
#else
static variant variants[] = {
    { "public", fa_max_f32, fa_max_f64, fa_add_max_f32, fa_add_max_f64, fa_keep_max_f32,
      fa_keep_max_f64, fa_exp_sum_f32, fa_exp_sum_f64, pub_expneg_f32, pub_expneg_f64, 0 },
};
#endif
#define NVAR ((int)(sizeof variants / sizeof variants[0]))

static int runnable(const variant *v)
{
#if defined(__x86_64__)
    if (v->needs == 2)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
               && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    if (v->needs == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    (void)v;
    return 1;
}

/* ---------------------------------------------------------------- random numbers */
static uint64_t rng = 88172645463325252ULL;
static uint64_t next_u64(void)
{
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}
static double unif(void) { return (next_u64() >> 11) * (1.0 / 9007199254740992.0); }
static double gauss(void)
{
    double s = 0;
    for (int i = 0; i < 12; i++) s += unif();
    return s - 6;
}

static int failures = 0;
#define FAIL(...) do {                                                                 \
    if (failures++ < 40) { printf("FAIL: "); printf(__VA_ARGS__); printf("\n"); }          \
} while (0)

/* ---------------------------------------------------------------- references, per type */
/* Lane layout of the routines: LANES logical lanes (64 bytes) over the full blocks, then
 * the tail in order, then the lanes in order (the reduction order of every ISA). */
#define DEFINE_REFS(T, IT, SFX, TOL)                                                         \
enum { LANES_##SFX = 64 / sizeof(T) };                                                       \
static int same_##SFX(T a, T b)                                                              \
{                                                                                            \
    if (a != a && b != b) return 1;                                                          \
    return memcmp(&a, &b, sizeof a) == 0;                                                    \
}                                                                                            \
static T ref_max_##SFX(const T *x, ptrdiff_t n)                                              \
{                                                                                            \
    T acc[LANES_##SFX];                                                                      \
    int nan = 0;                                                                             \
    for (int k = 0; k < LANES_##SFX; k++) acc[k] = -INFINITY;                                \
    ptrdiff_t j = 0;                                                                         \
    for (; j + LANES_##SFX <= n; j += LANES_##SFX)                                           \
        for (int k = 0; k < LANES_##SFX; k++) {                                              \
            if (x[j + k] > acc[k]) acc[k] = x[j + k];                                        \
            nan |= x[j + k] != x[j + k];                                                     \
        }                                                                                    \
    T m = -INFINITY;                                                                         \
    for (; j < n; j++) { if (x[j] > m) m = x[j]; nan |= x[j] != x[j]; }                      \
    for (int k = 0; k < LANES_##SFX; k++) if (acc[k] > m) m = acc[k];                        \
    return nan ? (T)NAN : m;                                                                 \
}                                                                                            \
/* blocks of FA_SUM_STEPS steps: each block's lanes summed in order into a compensated */  \
/* double sum (Neumaier); the last block's lanes go with the tail, as for one block */      \
static T ref_sum_##SFX(const T *e, ptrdiff_t n)                                              \
{                                                                                            \
    T acc[LANES_##SFX];                                                                      \
    double hi = 0, lo = 0;                                                                   \
    ptrdiff_t j = 0;                                                                         \
    for (;;) {                                                                               \
        ptrdiff_t block = (ptrdiff_t)FA_SUM_STEPS * LANES_##SFX;                             \
        ptrdiff_t end = n - j > block ? j + block : n;                                       \
        for (int k = 0; k < LANES_##SFX; k++) acc[k] = 0;                                    \
        for (; j + LANES_##SFX <= end; j += LANES_##SFX)                                     \
            for (int k = 0; k < LANES_##SFX; k++) acc[k] += e[j + k];                        \
        if (end == n) break;                                                                 \
        T b = 0;                                                                             \
        for (int k = 0; k < LANES_##SFX; k++) b += acc[k];                                   \
        double t = hi + b;                                                                   \
        lo += fabs(hi) >= fabs((double)b) ? (hi - t) + b : ((double)b - t) + hi;             \
        hi = t;                                                                              \
    }                                                                                        \
    T s = 0;                                                                                 \
    for (; j < n; j++) s += e[j];                                                            \
    for (int k = 0; k < LANES_##SFX; k++) s += acc[k];                                       \
    return hi == 0 ? s : (T)(hi + (lo + s));                                                 \
}                                                                                            \
/* distance in ulps between two finite values of the same sign class */                     \
static double ulps_##SFX(T a, T b)                                                           \
{                                                                                            \
    IT ia, ib;                                                                               \
    memcpy(&ia, &a, sizeof a); memcpy(&ib, &b, sizeof b);                                   \
    if (ia < 0) ia = (IT)((IT)1 << (8 * sizeof(IT) - 1)) - ia;                               \
    if (ib < 0) ib = (IT)((IT)1 << (8 * sizeof(IT) - 1)) - ib;                               \
    return ia > ib ? (double)(ia - ib) : (double)(ib - ia);                                  \
}                                                                                            \
static double worst_ulp_##SFX = 0;                                                           \
static long n_checked_##SFX = 0;                                                             \
static void check_row_##SFX(const variant *v, const char *what, const T *x0, const T *add,   \
                            const uint8_t *keep, ptrdiff_t n, T m)                           \
{                                                                                            \
    T *x = malloc((n + 1) * sizeof(T)), *r = malloc((n + 1) * sizeof(T));                    \
    T got, want;                                                                             \
    n_checked_##SFX++;                                                                       \
    /* max */                                                                                \
    got = v->max_##SFX(x0, n); want = ref_max_##SFX(x0, n);                                  \
    if (!same_##SFX(got, want))                                                              \
        FAIL("%s %s max_" #SFX " n=%td: got %a want %a", v->name, what, n, (double)got,      \
             (double)want);                                                                  \
    /* add_max */                                                                            \
    memcpy(x, x0, n * sizeof(T));                                                            \
    for (ptrdiff_t j = 0; j < n; j++) r[j] = add[j] == -INFINITY ? add[j] : x0[j] + add[j];  \
    got = v->add_max_##SFX(x, add, n); want = ref_max_##SFX(r, n);                           \
    if (!same_##SFX(got, want))                                                              \
        FAIL("%s %s add_max_" #SFX " n=%td: got %a want %a", v->name, what, n, (double)got,  \
             (double)want);                                                                  \
    for (ptrdiff_t j = 0; j < n; j++)                                                        \
        if (!same_##SFX(x[j], r[j])) {                                                       \
            FAIL("%s %s add_max_" #SFX " n=%td x[%td]=%a want %a", v->name, what, n, j,      \
                 (double)x[j], (double)r[j]);                                                \
            break;                                                                           \
        }                                                                                    \
    /* keep_max */                                                                           \
    memcpy(x, x0, n * sizeof(T));                                                            \
    for (ptrdiff_t j = 0; j < n; j++) r[j] = keep[j] ? x0[j] : (T)-INFINITY;                 \
    got = v->keep_max_##SFX(x, keep, n); want = ref_max_##SFX(r, n);                         \
    if (!same_##SFX(got, want))                                                              \
        FAIL("%s %s keep_max_" #SFX " n=%td: got %a want %a", v->name, what, n, (double)got, \
             (double)want);                                                                  \
    for (ptrdiff_t j = 0; j < n; j++)                                                        \
        if (!same_##SFX(x[j], r[j])) {                                                       \
            FAIL("%s %s keep_max_" #SFX " n=%td x[%td]=%a want %a", v->name, what, n, j,     \
                 (double)x[j], (double)r[j]);                                                \
            break;                                                                           \
        }                                                                                    \
    /* exp_sum: elements bit-equal to the scalar exp of the same target, sum in lane order */ \
    memcpy(x, x0, n * sizeof(T));                                                            \
    for (ptrdiff_t j = 0; j < n; j++) r[j] = v->expneg_##SFX(x0[j] - m);                     \
    got = v->exp_sum_##SFX(x, n, m); want = ref_sum_##SFX(r, n);                             \
    if (!same_##SFX(got, want))                                                              \
        FAIL("%s %s exp_sum_" #SFX " n=%td m=%g: got %a want %a", v->name, what, n,          \
             (double)m, (double)got, (double)want);                                          \
    long double exact = 0, mag = 0;                                                          \
    int has_nan = 0;                                                                         \
    for (ptrdiff_t j = 0; j < n; j++) {                                                      \
        if (!same_##SFX(x[j], r[j])) {                                                       \
            FAIL("%s %s exp_sum_" #SFX " n=%td x[%td]: exp(%a) = %a want %a", v->name, what, \
                 n, j, (double)(x0[j] - m), (double)x[j], (double)r[j]);                     \
            break;                                                                           \
        }                                                                                    \
        T d = x0[j] - m;                                                                     \
        if (d != d) { has_nan = 1; continue; }                                               \
        long double e = expl((long double)d);                                                \
        T lo = FA_EXP_LO_##SFX;                                                              \
        if (d > 0) continue;               /* outside the contract (m below the max) */     \
        if (d < lo) {                                                                        \
            if (x[j] != 0) FAIL("%s exp(%a) below range gave %a", v->name, (double)d,        \
                                (double)x[j]);                                               \
        } else {                                                                             \
            double u = ulps_##SFX(x[j], (T)e);                                               \
            if (u > worst_ulp_##SFX) worst_ulp_##SFX = u;                                    \
            if (u > TOL) FAIL("%s exp_" #SFX "(%a) = %a, %g ulp", v->name, (double)d,        \
                              (double)x[j], u);                                              \
        }                                                                                    \
        exact += x[j]; mag += fabsl((long double)x[j]);                                      \
    }                                                                                        \
    if (has_nan ? got == got : fabsl(got - exact) > mag * 8 * (sizeof(T) == 4 ? FLT_EPSILON  \
                                                                : DBL_EPSILON) * 4)          \
        FAIL("%s %s exp_sum_" #SFX " n=%td sum %a vs exact %La", v->name, what, n,           \
             (double)got, exact);                                                            \
    free(x); free(r);                                                                        \
}                                                                                            \
                                                                                             \
static void fill_##SFX(T *x, T *add, uint8_t *keep, ptrdiff_t n, int kind, ptrdiff_t pos,    \
                       T *m)                                                                 \
{                                                                                            \
    const T big = sizeof(T) == 4 ? FLT_MAX : DBL_MAX;                                        \
    const T tiny = sizeof(T) == 4 ? 1e-40f : 1e-310;                                         \
    for (ptrdiff_t j = 0; j < n; j++) {                                                      \
        x[j] = (T)(gauss() * 3);                                                             \
        add[j] = (T)(gauss());                                                               \
        keep[j] = (next_u64() & 3) ? (uint8_t)(1 + (next_u64() & 1) * 254) : 0;              \
        switch (kind) {                                                                      \
        case 1: if ((next_u64() % 5) == 0) x[j] = -INFINITY;                                 \
                if ((next_u64() % 7) == 0) add[j] = -INFINITY;                               \
                break;                                                                       \
        case 2: x[j] = -INFINITY; add[j] = -INFINITY; keep[j] = 0; break;                    \
        case 3: if (j == pos) x[j] = NAN; break;                                             \
        case 4: if (j == pos) add[j] = NAN; break;                                           \
        case 5: x[j] = (T)(tiny * gauss()); add[j] = (next_u64() & 1) ? (T)0 : (T)-0.0;      \
                if ((next_u64() & 3) == 0) x[j] = (next_u64() & 1) ? (T)0 : (T)-0.0;         \
                break;                                                                       \
        case 6: x[j] = (T)(gauss() * 1e30);                                                  \
                if ((next_u64() % 9) == 0) x[j] = (next_u64() & 1) ? big : -big;             \
                if ((next_u64() % 11) == 0) x[j] = (next_u64() & 1) ? INFINITY : -INFINITY;  \
                if ((next_u64() % 13) == 0) add[j] = (next_u64() & 1) ? INFINITY : -INFINITY; \
                break;                                                                       \
        case 7: /* the whole range of exp's argument, down past the underflow */              \
                x[j] = (T)(-unif() * (sizeof(T) == 4 ? 100 : 760));                          \
                if ((next_u64() % 17) == 0) x[j] = FA_EXP_LO_##SFX;                          \
                break;                                                                       \
        case 8: keep[j] = (j == pos); x[j] = (T)(-0.0); break;                               \
        case 9: x[j] = (next_u64() & 1) ? (T)0 : (T)-0.0; add[j] = (T)0; break;              \
        }                                                                                    \
    }                                                                                        \
    T mx = ref_max_##SFX(x, n);                                                              \
    *m = mx == -INFINITY ? 0 : mx;   /* the kernels' m: the row max (may be +inf or NaN) */   \
    if (kind == 7) *m = 0;                                                                   \
}

DEFINE_REFS(float, int32_t, f32, 2.0)
DEFINE_REFS(double, int64_t, f64, 1.0)

static const char *kinds[] = { "normal", "-inf", "all -inf", "nan x", "nan add", "denormal",
                               "large", "exp range", "one kept", "zeros" };

static void check_all(void)
{
    ptrdiff_t sizes[200];
    int ns = 0;
    for (int n = 0; n <= 70; n++) sizes[ns++] = n;
    ptrdiff_t more[] = { 96, 100, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1000, 1023,
                           1024, 1025, 1031, 2048, 4099, 8192 };
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++) sizes[ns++] = more[i];
    float *xf = malloc(8192 * 4), *af = malloc(8192 * 4);
    double *xd = malloc(8192 * 8), *ad = malloc(8192 * 8);
    uint8_t *keep = malloc(8192);
    for (int vi = 0; vi < NVAR; vi++) {
        const variant *v = &variants[vi];
        if (!runnable(v)) { printf("skip %s (CPU)\n", v->name); continue; }
        for (int si = 0; si < ns; si++) {
            ptrdiff_t n = sizes[si];
            for (int kind = 0; kind < 10; kind++) {
                /* NaN / one-kept at every position for small n, a few for large */
                int npos = (kind == 3 || kind == 4 || kind == 8) ? (n <= 70 ? (int)n : 9) : 1;
                for (int p = 0; p < npos; p++) {
                    ptrdiff_t pos = n <= 70 ? p : (ptrdiff_t)(next_u64() % n);
                    if (p == npos - 1 && n > 70) pos = n - 1;
                    float mf; double md;
                    fill_f32(xf, af, keep, n, kind, pos, &mf);
                    check_row_f32(v, kinds[kind], xf, af, keep, n, mf);
                    if (kind == 0) check_row_f32(v, "m above max", xf, af, keep, n, mf + 5);
                    fill_f64(xd, ad, keep, n, kind, pos, &md);
                    check_row_f64(v, kinds[kind], xd, ad, keep, n, md);
                    if (kind == 0) check_row_f64(v, "m above max", xd, ad, keep, n, md + 5);
                }
            }
        }
        printf("%-7s checked %ld f32 rows, %ld f64 rows; exp worst %.2f ulp (f32), %.2f "
               "(f64)\n",
               v->name, n_checked_f32, n_checked_f64, worst_ulp_f32, worst_ulp_f64);
        n_checked_f32 = n_checked_f64 = 0;
    }
    /* Versions against each other on the same rows: AVX-512 and AVX2 must agree bit for
     * bit; baseline (no FMA) may differ in the last bit of the exp. */
#if FA_WIDTHS
    for (int vi = 1; vi < 3; vi++) {
        const variant *a = &variants[0], *b = &variants[vi];
        if (!runnable(a) || !runnable(b)) continue;
        long diff = 0, total = 0;
        double worst = 0;
        for (int rep = 0; rep < 200; rep++) {
            ptrdiff_t n = 1 + next_u64() % 700;
            float mf, *y1 = malloc(n * 4), *y2 = malloc(n * 4);
            double md, *z1 = malloc(n * 8), *z2 = malloc(n * 8);
            fill_f32(xf, af, keep, n, rep % 2 ? 7 : 0, 0, &mf);
            memcpy(y1, xf, n * 4); memcpy(y2, xf, n * 4);
            diff += !same_f32(a->exp_sum_f32(y1, n, mf), b->exp_sum_f32(y2, n, mf));
            fill_f64(xd, ad, keep, n, rep % 2 ? 7 : 0, 0, &md);
            memcpy(z1, xd, n * 8); memcpy(z2, xd, n * 8);
            diff += !same_f64(a->exp_sum_f64(z1, n, md), b->exp_sum_f64(z2, n, md));
            for (ptrdiff_t j = 0; j < n; j++) {
                double u = ulps_f32(y1[j], y2[j]), w = ulps_f64(z1[j], z2[j]);
                diff += (u != 0) + (w != 0);
                worst = u > worst ? u : w > worst ? w : worst;
            }
            total += 2 * (n + 1);
            free(y1); free(y2); free(z1); free(z2);
        }
        printf("exp_sum %s vs %s: %ld of %ld results differ, by at most %.0f ulp\n", a->name,
               b->name, diff, total, worst);
        if (vi == 1 && diff) FAIL("AVX-512 and AVX2 versions differ");
        if (worst > 1) FAIL("baseline exp differs by more than 1 ulp");
    }
#endif
    free(xf); free(af); free(xd); free(ad); free(keep);
}

/* ---------------------------------------------------------------- timing */
static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define TIME(expr, n, reps) ({                                                               \
    double best = 1e30;                                                                      \
    for (int b_ = 0; b_ < 9; b_++) {                                                         \
        double t0 = now();                                                                   \
        for (int r_ = 0; r_ < (reps); r_++) { expr; __asm__ volatile("" ::: "memory"); }     \
        double t = (now() - t0) / (reps) / (n) * 1e9;                                        \
        if (t < best) best = t;                                                              \
    }                                                                                        \
    best; })

static volatile double sink;
static volatile float one_f = 1.0f, zero_f = 0.0f;
static volatile double one_d = 1.0, zero_d = 0.0;

static void bench(ptrdiff_t n)
{
    int reps = (int)(4000000 / (n + 8));
    float *xf = aligned_alloc(64, (n + 64) * 4), *af = aligned_alloc(64, (n + 64) * 4);
    double *xd = aligned_alloc(64, (n + 64) * 8), *ad = aligned_alloc(64, (n + 64) * 8);
    uint8_t *keep = aligned_alloc(64, n + 64);
    printf("%-7s %5s  %8s %8s %8s %8s | %8s %8s %8s %8s   (ns/element, n=%td)\n", "variant",
           "", "max", "add_max", "keep_max", "exp_sum", "max", "add_max", "keep_max",
           "exp_sum", n);
    for (int vi = 0; vi < NVAR; vi++) {
        const variant *v = &variants[vi];
        if (!runnable(v)) continue;
        for (ptrdiff_t j = 0; j < n; j++) {
            xf[j] = (float)(-unif()); af[j] = 0; xd[j] = -unif(); ad[j] = 0;
            keep[j] = (next_u64() % 8) != 0;
        }
        double t[8];
        t[0] = TIME(sink = v->max_f32(xf, n), n, reps);
        t[1] = TIME(sink = v->add_max_f32(xf, af, n), n, reps);
        t[2] = TIME(sink = v->keep_max_f32(xf, keep, n), n, reps);
        for (ptrdiff_t j = 0; j < n; j++) xf[j] = (float)(-unif());
        t[3] = TIME(sink = v->exp_sum_f32(xf, n, 1.0f), n, reps);
        t[4] = TIME(sink = v->max_f64(xd, n), n, reps);
        t[5] = TIME(sink = v->add_max_f64(xd, ad, n), n, reps);
        t[6] = TIME(sink = v->keep_max_f64(xd, keep, n), n, reps);
        for (ptrdiff_t j = 0; j < n; j++) xd[j] = -unif();
        t[7] = TIME(sink = v->exp_sum_f64(xd, n, 1.0), n, reps);
        printf("%-7s %5s  %8.3f %8.3f %8.3f %8.3f | %8.3f %8.3f %8.3f %8.3f\n", v->name, "",
               t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
    }
    /* the plain loops (one target_clones dispatcher each) */
    for (ptrdiff_t j = 0; j < n; j++) {
        xf[j] = (float)unif(); af[j] = (float)unif(); xd[j] = unif(); ad[j] = unif();
    }
    double u[10];
    u[0] = TIME(fa_scale_f32(xf, n, one_f), n, reps);
    u[1] = TIME(fa_axpy_f32(xf, af, n, zero_f), n, reps);
    u[2] = TIME(sink = fa_dot_f32(xf, af, n), n, reps);
    u[3] = TIME(fa_copy_scale_f32(af, xf, n, one_f), n, reps);
    u[4] = TIME(fa_add_const_f32(xf, n, zero_f), n, reps);
    u[5] = TIME(fa_scale_f64(xd, n, one_d), n, reps);
    u[6] = TIME(fa_axpy_f64(xd, ad, n, zero_d), n, reps);
    u[7] = TIME(sink = fa_dot_f64(xd, ad, n), n, reps);
    u[8] = TIME(fa_copy_scale_f64(ad, xd, n, one_d), n, reps);
    u[9] = TIME(fa_add_const_f64(xd, n, zero_d), n, reps);
    printf("plain loops f32: scale %.3f axpy %.3f dot %.3f copy_scale %.3f add_const %.3f\n",
           u[0], u[1], u[2], u[3], u[4]);
    printf("plain loops f64: scale %.3f axpy %.3f dot %.3f copy_scale %.3f add_const %.3f\n",
           u[5], u[6], u[7], u[8], u[9]);
    free(xf); free(af); free(xd); free(ad); free(keep);
}

/* plain loops: a quick check against scalar references (they are not per width) */
static void check_plain(void)
{
    for (int n = 0; n < 140; n++) {
        float x[140] = {0}, y[140] = {0}, z[140];
        double xd[140] = {0}, yd[140] = {0}, zd[140];
        for (int j = 0; j < n; j++) {
            x[j] = (float)gauss(); y[j] = (float)gauss(); xd[j] = gauss(); yd[j] = gauss();
        }
        memcpy(z, x, sizeof x); fa_scale_f32(z, n, 0.3f);
        for (int j = 0; j < n; j++) if (z[j] != x[j] * 0.3f) FAIL("scale_f32");
        fa_copy_scale_f32(z, x, n, 0.7f);
        for (int j = 0; j < n; j++) if (z[j] != x[j] * 0.7f) FAIL("copy_scale_f32");
        memcpy(z, x, sizeof x); fa_add_const_f32(z, n, -1.5f);
        for (int j = 0; j < n; j++) if (z[j] != x[j] + -1.5f) FAIL("add_const_f32");
        memcpy(z, y, sizeof y); fa_axpy_f32(z, x, n, 0.3f);
        for (int j = 0; j < n; j++)         /* contracted or not */
            if (z[j] != y[j] + 0.3f * x[j] && z[j] != fmaf(0.3f, x[j], y[j])) FAIL("axpy_f32");
        long double d = 0, mag = 0;
        for (int j = 0; j < n; j++) {
            d += (long double)x[j] * y[j];
            mag += fabsl((long double)x[j] * y[j]);
        }
        if (fabsl(fa_dot_f32(x, y, n) - d) > mag * 1e-6L + 1e-30L) FAIL("dot_f32 n=%d", n);
        memcpy(zd, xd, sizeof xd); fa_scale_f64(zd, n, 0.3);
        for (int j = 0; j < n; j++) if (zd[j] != xd[j] * 0.3) FAIL("scale_f64");
        fa_copy_scale_f64(zd, xd, n, 0.7);
        for (int j = 0; j < n; j++) if (zd[j] != xd[j] * 0.7) FAIL("copy_scale_f64");
        memcpy(zd, xd, sizeof xd); fa_add_const_f64(zd, n, -1.5);
        for (int j = 0; j < n; j++) if (zd[j] != xd[j] + -1.5) FAIL("add_const_f64");
        memcpy(zd, yd, sizeof yd); fa_axpy_f64(zd, xd, n, 0.3);
        for (int j = 0; j < n; j++)
            if (zd[j] != yd[j] + 0.3 * xd[j] && zd[j] != fma(0.3, xd[j], yd[j])) FAIL("axpy_f64");
        d = 0; mag = 0;
        for (int j = 0; j < n; j++) {
            d += (long double)xd[j] * yd[j];
            mag += fabsl((long double)xd[j] * yd[j]);
        }
        if (fabsl(fa_dot_f64(xd, yd, n) - d) > mag * 1e-14L + 1e-300L) FAIL("dot_f64 n=%d", n);
    }
}

/* ---------------------------------------------------------------- small GEMMs */
/* Each version of fa_gemm_abt_small / fa_gemm_ab_acc_small against a long double product,
 * on shapes that reach every block (4 x 4 or 4 x 2 keys, 1 x 8, leftover rows, columns and
 * k not a multiple of the vector). Error bound: a few ulp of the sum of |terms|. */
typedef void (*abt_f32_fn)(ptrdiff_t, ptrdiff_t, ptrdiff_t, float, const float *, ptrdiff_t,
                           const float *, ptrdiff_t, float *, ptrdiff_t, const void *,
                           ptrdiff_t);
typedef void (*ab_f32_fn)(ptrdiff_t, ptrdiff_t, ptrdiff_t, const float *, ptrdiff_t,
                          const float *, ptrdiff_t, float *, ptrdiff_t, const void *,
                          ptrdiff_t);
typedef void (*abt_f64_fn)(ptrdiff_t, ptrdiff_t, ptrdiff_t, double, const double *, ptrdiff_t,
                           const double *, ptrdiff_t, double *, ptrdiff_t, const void *,
                           ptrdiff_t);
typedef void (*ab_f64_fn)(ptrdiff_t, ptrdiff_t, ptrdiff_t, const double *, ptrdiff_t,
                          const double *, ptrdiff_t, double *, ptrdiff_t, const void *,
                          ptrdiff_t);
typedef struct {
    const char *name;
    abt_f32_fn abt_f32; ab_f32_fn ab_f32; abt_f64_fn abt_f64; ab_f64_fn ab_f64;
    int needs;
} gemm_variant;
#if FA_WIDTHS
#define GV(ISA, need) { #ISA, fa_gemm_abt_small_##ISA##_f32, fa_gemm_ab_acc_small_##ISA##_f32, \
    fa_gemm_abt_small_##ISA##_f64, fa_gemm_ab_acc_small_##ISA##_f64, need }
static gemm_variant gemms[] = { GV(zmm, 2), GV(ymm, 1), GV(xmm, 0),
    { "public", fa_gemm_abt_small_f32, fa_gemm_ab_acc_small_f32, fa_gemm_abt_small_f64,
      fa_gemm_ab_acc_small_f64, 0 } };
#else
static gemm_variant gemms[] = {
    { "public", fa_gemm_abt_small_f32, fa_gemm_ab_acc_small_f32, fa_gemm_abt_small_f64,
      fa_gemm_ab_acc_small_f64, 0 } };
#endif

#define CHECK_GEMMS(T, SFX, EPS)                                                             \
static void check_gemms_##SFX(const gemm_variant *g, int m, int n, int k)                    \
{                                                                                            \
    int lda = k + 3, ldb = k + 1, ldv = n + 5, ldc = n + 2;                                  \
    T *a = malloc(m * lda * sizeof(T)), *b = malloc(n * ldb * sizeof(T));                    \
    T *v = malloc(k * ldv * sizeof(T)), *c = malloc(m * ldc * sizeof(T));                    \
    T *c0 = malloc(m * ldc * sizeof(T));                                                     \
    for (int i = 0; i < m * lda; i++) a[i] = (T)gauss();                                     \
    for (int i = 0; i < n * ldb; i++) b[i] = (T)gauss();                                     \
    for (int i = 0; i < k * ldv; i++) v[i] = (T)gauss();                                     \
    for (int i = 0; i < m * ldc; i++) c0[i] = (T)gauss();                                    \
    /* c = 0.5 a b^T; the prefetch range is b itself (any readable range will do) */        \
    memcpy(c, c0, m * ldc * sizeof(T));                                                      \
    g->abt_##SFX(m, n, k, (T)0.5, a, lda, b, ldb, c, ldc, b, n * ldb * sizeof(T));           \
    for (int i = 0; i < m; i++)                                                              \
        for (int j = 0; j < ldc; j++) {                                                      \
            if (j >= n) {                                                                    \
                if (!same_##SFX(c[i * ldc + j], c0[i * ldc + j]))                            \
                    FAIL("%s abt_" #SFX " wrote past column n", g->name);                    \
                continue;                                                                    \
            }                                                                                \
            long double r = 0, mag = 0;                                                      \
            for (int p = 0; p < k; p++) {                                                    \
                r += (long double)a[i * lda + p] * b[j * ldb + p];                           \
                mag += fabsl((long double)a[i * lda + p] * b[j * ldb + p]);                  \
            }                                                                                \
            if (fabsl(c[i * ldc + j] - r / 2) > (mag + 1) * EPS)                             \
                FAIL("%s abt_" #SFX " m=%d n=%d k=%d c[%d,%d] = %g, want %Lg", g->name, m,   \
                     n, k, i, j, (double)c[i * ldc + j], r / 2);                             \
        }                                                                                    \
    /* c += a v, a: m x k, v: k x n */                                                       \
    memcpy(c, c0, m * ldc * sizeof(T));                                                      \
    g->ab_##SFX(m, n, k, a, lda, v, ldv, c, ldc, NULL, 0);                                   \
    for (int i = 0; i < m; i++)                                                              \
        for (int j = 0; j < n; j++) {                                                        \
            long double r = c0[i * ldc + j], mag = fabsl(r);                                 \
            for (int p = 0; p < k; p++) {                                                    \
                r += (long double)a[i * lda + p] * v[p * ldv + j];                           \
                mag += fabsl((long double)a[i * lda + p] * v[p * ldv + j]);                  \
            }                                                                                \
            if (fabsl(c[i * ldc + j] - r) > (mag + 1) * EPS)                                 \
                FAIL("%s ab_acc_" #SFX " m=%d n=%d k=%d c[%d,%d] = %g, want %Lg", g->name,   \
                     m, n, k, i, j, (double)c[i * ldc + j], r);                              \
        }                                                                                    \
    free(a); free(b); free(v); free(c); free(c0);                                            \
}
CHECK_GEMMS(float, f32, 1e-5L)
CHECK_GEMMS(double, f64, 1e-13L)

static void check_all_gemms(void)
{
    const int ms[] = {1, 2, 3, 4, 5, 7, 8, 9, 16}, ns[] = {1, 3, 4, 6, 8, 13, 16, 31, 64, 130};
    const int ks[] = {0, 1, 5, 8, 16, 33, 64, 128};
    for (size_t g = 0; g < sizeof gemms / sizeof gemms[0]; g++) {
        variant probe = { .needs = gemms[g].needs };
        if (!runnable(&probe)) continue;
        for (int mi = 0; mi < 9; mi++)
            for (int ni = 0; ni < 10; ni++)
                for (int ki = 0; ki < 8; ki++) {
                    check_gemms_f32(&gemms[g], ms[mi], ns[ni], ks[ki]);
                    check_gemms_f64(&gemms[g], ms[mi], ns[ni], ks[ki]);
                }
        printf("%-7s small GEMMs checked\n", gemms[g].name);
    }
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "check";
    if (!strcmp(mode, "check")) {
        check_all();
        check_plain();
        check_all_gemms();
        printf(failures ? "%d FAILURES\n" : "all checks passed\n", failures);
        return failures != 0;
    }
    if (!strcmp(mode, "bench")) {
        bench(argc > 2 ? atol(argv[2]) : 512);
        return 0;
    }
    return 2;
}
