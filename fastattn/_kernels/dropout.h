/*
 * dropout.h -- dropout on attention probabilities without a stored mask.
 *
 * The keep/drop decision of probability (b, i, j) -- flat batch index b, query row i,
 * key column j -- is a pure function of (seed, b, i, j): a counter-based generator, so
 * any tile, thread or key split computes the same decision, and a backward pass can
 * regenerate the forward's mask from the seed instead of storing it. The hash:
 *
 *     key_b  = mix64(seed + G (b + 1))
 *     key_bi = mix64(key_b + G (i + 1))
 *     h      = mix64(key_bi + G (j + 1))          (mod 2^64, G = 0x9E3779B97F4A7C15)
 *
 * where mix64 is SplitMix64's finaliser (a bijection of 64-bit words), so each row is a
 * SplitMix64 stream seeded by key_bi. The probability is kept when h >= threshold =
 * floor(p * 2^64): with probability 1 - p up to 2^-64. fastattn.reference.dropout_keep
 * computes the same bits in NumPy.
 *
 * Applied by the tile core (tile.pxd, attend_tile) to a tile's unnormalised
 * probabilities after the online-softmax step has added them to the row sums l and
 * before they meet V: kept values are scaled by 1 / (1 - p), dropped ones become 0. The
 * denominator thus stays that of all keys, as in PyTorch and FlashAttention.
 */
#ifndef FASTATTN_DROPOUT_H
#define FASTATTN_DROPOUT_H

#include <stdint.h>
#include <stddef.h>
#include "vecmath.h"             /* FA_VECTOR */

#define FA_DROPOUT_GAMMA 0x9E3779B97F4A7C15ULL

/* One call's dropout, and where the current tile sits (set by the driver per tile). */
typedef struct {
    uint64_t seed;
    uint64_t threshold;          /* floor(p * 2^64): h < threshold is dropped */
    double scale;                /* 1 / (1 - p) */
    int64_t batch;               /* flat batch index b of the tile */
    int64_t row0;                /* query row of the tile's first row */
    int64_t col0;                /* key column of the tile's first column */
} fa_dropout;

static inline uint64_t fa_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* The stream of row i of batch entry b: h(b, i, j) = mix64(key + G (j + 1)). */
static inline uint64_t fa_dropout_row_key(uint64_t seed, int64_t b, int64_t i)
{
    uint64_t key_b = fa_mix64(seed + FA_DROPOUT_GAMMA * (uint64_t)(b + 1));
    return fa_mix64(key_b + FA_DROPOUT_GAMMA * (uint64_t)(i + 1));
}

#define FA_DEFINE_DROPOUT(T, SFX)                                                          \
                                                                                           \
/* p[c] <- keep(c) ? p[c] * scale : 0 for c < n, the row's columns j0 + c. */              \
FA_VECTOR static void fa_dropout_row_##SFX(T *p, ptrdiff_t n, uint64_t key, int64_t j0,    \
                                           uint64_t threshold, T scale)                    \
{                                                                                          \
    uint64_t x0 = key + FA_DROPOUT_GAMMA * (uint64_t)(j0 + 1);                             \
    for (ptrdiff_t c = 0; c < n; c++) {                                                    \
        uint64_t h = fa_mix64(x0 + FA_DROPOUT_GAMMA * (uint64_t)c);                        \
        p[c] = h >= threshold ? p[c] * scale : (T)0;                                       \
    }                                                                                      \
}                                                                                          \
                                                                                           \
/* Dropout on rows r0 .. r0 + rows of the current tile: s is rows x cols (row stride */    \
/* cols) of probabilities, its row r is query row d->row0 + r0 + r. */                     \
static inline void fa_dropout_tile_##SFX(const fa_dropout *d, int r0, int rows, int cols,  \
                                         T *s)                                             \
{                                                                                          \
    for (int r = 0; r < rows; r++)                                                         \
        fa_dropout_row_##SFX(s + (ptrdiff_t)r * cols, cols,                                \
                             fa_dropout_row_key(d->seed, d->batch, d->row0 + r0 + r),      \
                             d->col0, d->threshold, (T)d->scale);                          \
}

FA_DEFINE_DROPOUT(float, f32)
FA_DEFINE_DROPOUT(double, f64)

#endif
