# Additive (Bahdanau) scores (additive.pyx): the tanh score loops of tanhscores.h,
# dispatched on the element type.

from fastattn._kernels.tile cimport real


cdef extern from "tanhscores.h" nogil:
    enum: FA_TANH_KEY_PAD
    void fa_tanh_scores_f32(const float *a, const float *bt, Py_ssize_t ldb, const float *w,
                            Py_ssize_t h, Py_ssize_t n, float *s)
    void fa_tanh_scores_f64(const double *a, const double *bt, Py_ssize_t ldb,
                            const double *w, Py_ssize_t h, Py_ssize_t n, double *s)

cdef inline void row_tanh_scores(const real *a, const real *bt, Py_ssize_t ldb, const real *w,
                                 Py_ssize_t h, Py_ssize_t n, real *s) noexcept nogil:
    # s[j] <- sum_c w[c] * tanh(a[c] + bt[c * ldb + j]) for j < n, a multiple of
    # FA_TANH_KEY_PAD (one query against the key columns of bt: h x n, row stride ldb)
    if real is float:
        fa_tanh_scores_f32(a, bt, ldb, w, h, n, s)
    else:
        fa_tanh_scores_f64(a, bt, ldb, w, h, n, s)
