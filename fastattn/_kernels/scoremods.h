/*
 * scoremods.h -- the score modifiers of the tile core (tile.pxd's ScoreMods): soft-capping
 * and ALiBi applied to a row of scaled scores, in flash-attn's order:
 *
 *     s <- softcap * tanh(s / softcap)      (softcap > 0; Gemma 2)
 *     s <- s - slope * |d|                  (ALiBi; d = i + off - j, the query's
 *                                            position minus the key's)
 *
 * before the mask, the causal band and the window (which the tile core applies as the
 * row's visible columns). tanh is tanhscores.h's rational one (FA_TANH_VEC, <= 5 ulp in
 * float). The key-major tiles of tilegemm.h apply the same with fa_kmajor_mods_f32.
 * One version per ISA at its register width (FA_WIDTHS, vecmath.h).
 */
#ifndef FASTATTN_SCOREMODS_H
#define FASTATTN_SCOREMODS_H

#include <stddef.h>
#include <string.h>

#include "tanhscores.h"   /* FA_TANH_VEC; vecmath.h's FA_DEFINE_BY_ISA */

/* The modifiers of one tile call. A driver keeps one per thread and sets `diag` for the
 * rows and columns it hands over: d of their element (0, 0); element (r, c) has
 * d = diag + r - c. */
typedef struct fa_score_mods {
    double softcap;     /* > 0: soft-cap the scores; 0: off */
    double slope;       /* ALiBi slope of this (batch, head); 0: no bias */
    ptrdiff_t diag;
} fa_score_mods;

/* Whether a call has anything to do (a driver passes NULL rather than an idle struct). */
static inline int fa_mods_active(const fa_score_mods *m)
{
    return m != NULL && (m->softcap > 0 || m->slope != 0);
}

/* s[j] for j < n, whose d is d0 - j: soft-capped, then the ALiBi bias added. The tail is
 * done as one padded vector, so every element takes the same operations. Distances are
 * converted to T (exact below 2^24 in float). */
#define FA_MODS_ROW_BODY(T, IT, SFX, VB)                                                    \
{                                                                                          \
    typedef T vec __attribute__((vector_size(VB)));                                        \
    typedef IT ivec __attribute__((vector_size(VB)));                                      \
    enum { W = VB / sizeof(T) };                                                           \
    const T cap = (T)m->softcap, inv = cap > 0 ? (T)1 / cap : 0, slope = (T)m->slope;     \
    const ivec sign = (ivec){0} + ((IT)1 << (8 * sizeof(IT) - 1));                         \
    vec iota;                                                                              \
    for (int t = 0; t < W; t++) iota[t] = (T)t;                                            \
    for (ptrdiff_t j = 0; j < n; j += W) {                                                 \
        ptrdiff_t w = n - j < W ? n - j : W;                                               \
        vec x = (vec){0};                                                                  \
        memcpy(&x, s + j, w * sizeof(T));                                                  \
        if (cap > 0)                                                                       \
            x = cap * FA_TANH_VEC(IT, SFX, x * inv);                                       \
        if (slope != 0) {                                                                  \
            vec d = (T)(d0 - j) - iota;                                                    \
            x -= slope * (vec)((ivec)d & ~sign);                                           \
        }                                                                                  \
        memcpy(s + j, &x, w * sizeof(T));                                                  \
    }                                                                                      \
}

#define FA_MODS_ROW_ARGS(T) (const fa_score_mods *m, T *s, ptrdiff_t n, ptrdiff_t d0)

#define FA_DEFINE_MODS_ROW(T, IT, SFX)                                                      \
FA_DEFINE_BY_ISA(fa_mods_row, SFX, FA_MODS_ROW_ARGS(T), (m, s, n, d0), FA_MODS_ROW_BODY,   \
                 (T, IT, SFX), 64, 32, 16, FA_NATIVE_BYTES)

FA_DEFINE_MODS_ROW(float, int32_t, f32)
FA_DEFINE_MODS_ROW(double, int64_t, f64)

#endif /* FASTATTN_SCOREMODS_H */
