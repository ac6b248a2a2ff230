/*
 * half_check.c -- checks the widening of tilehalf.h (fa_widen, fa_widen_f64), which the
 * paged kernel applies to every block of a half cache: the version this build runs
 * (AVX-512 / F16C where the CPU has them; with -DFASTATTN_NO_CLONES the portable scalar
 * loop) against the scalar conversions, bit for bit (NaNs: as NaNs of the same sign, see
 * `same`), for every 16-bit pattern of both half types, in rows of every length 0..40 at
 * odd strides (the vector loop's tails).
 * tests/test_paged_half.py compiles and runs it; by hand, from the repository root:
 *
 *   cc -O3 [-DFASTATTN_NO_CLONES] -Ifastattn/_kernels tests/half_check.c -o half_check
 *   ./half_check check    exit status 1 on any mismatch
 *   ./half_check dump     float32 bits of fa_widen of every pattern, float16 then
 *                         bfloat16 (2 x 65536 little-endian words), for comparison
 *                         with NumPy's and ml_dtypes' conversions
 */
#include "tilehalf.h"
#include <stdio.h>
#include <string.h>

/* The same float32, bit for bit; NaNs only need to agree on being NaN and on the sign:
 * vcvtph2ps quiets a signalling float16 NaN (sets its top mantissa bit), the scalar
 * conversion keeps its bits as NumPy's does. */
static int same(float a, float b)
{
    uint32_t x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    if (a != a && b != b)
        return (x >> 31) == (y >> 31);
    return x == y;
}

static int widen_matches(int dtype)
{
    static uint16_t x[65536];
    static float y[65536];
    static double z[65536];
    int bad = 0;
    for (int i = 0; i < 65536; i++)
        x[i] = (uint16_t)i;
    fa_widen(dtype, 1, 65536, x, 65536, y, 65536);
    fa_widen_f64(dtype, 1, 65536, x, 65536, z, 65536);
    for (int i = 0; i < 65536; i++) {
        float want = dtype == FA_DT_FLOAT16 ? fa_f16_to_f32(x[i]) : fa_bf16_to_f32(x[i]);
        double want64 = want;
        if (!same(y[i], want) || !same((float)z[i], (float)want64)) {
            if (bad++ < 5)
                printf("dtype %d: pattern %04x widened to %a / %a, want %a\n", dtype, i,
                       (double)y[i], z[i], (double)want);
        }
    }
    /* rows of every length at strides that are no multiple of the vector's */
    for (int n = 0; n <= 40; n++) {
        uint16_t in[3 * 43];
        float out[3 * 45];
        for (int i = 0; i < 3 * 43; i++)
            in[i] = (uint16_t)(i * 2654435761u >> 13);
        for (int i = 0; i < 3 * 45; i++)
            out[i] = -1.0f;
        fa_widen(dtype, 3, n, in, 43, out, 45);
        for (int r = 0; r < 3; r++)
            for (int j = 0; j < 45; j++) {
                float want = j < n ? (dtype == FA_DT_FLOAT16 ? fa_f16_to_f32(in[r * 43 + j])
                                                             : fa_bf16_to_f32(in[r * 43 + j]))
                                   : -1.0f;
                if (!same(out[r * 45 + j], want)) {
                    if (bad++ < 5)
                        printf("dtype %d: n %d row %d column %d: %a, want %a\n", dtype, n, r,
                               j, (double)out[r * 45 + j], (double)want);
                }
            }
    }
    return bad;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "dump")) {
        static uint16_t x[65536];
        static float y[65536];
        for (int i = 0; i < 65536; i++)
            x[i] = (uint16_t)i;
        for (int dtype = FA_DT_FLOAT16; dtype <= FA_DT_BFLOAT16; dtype++) {
            fa_widen(dtype, 1, 65536, x, 65536, y, 65536);
            fwrite(y, 4, 65536, stdout);
        }
        return 0;
    }
    int bad = widen_matches(FA_DT_FLOAT16) + widen_matches(FA_DT_BFLOAT16);
#if FA_HALF_KERNELS
    printf("vector widening %s\n", fa_have_v4() ? "(AVX-512) checked" : "not run on this CPU");
#else
    printf("scalar widening checked\n");
#endif
    printf("%d mismatches\n", bad);
    return bad != 0;
}
