# Small GEMMs for decoding (paged.pyx), a few query rows against one key/value block.
# Same row-major meaning as gemm_abt / gemm_ab, as vector loops: for a handful of rows
# a BLAS call costs more than its arithmetic. Each also prefetches pf[0:pf_bytes] (the
# piece the caller reads next but one, or NULL), spread over its loop (see smallgemm.h).

from fastattn._kernels.tile cimport real


cdef extern from "smallgemm.h" nogil:
    void fa_gemm_abt_small_f32(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, float alpha,
                               const float *a, Py_ssize_t lda, const float *b, Py_ssize_t ldb,
                               float *c, Py_ssize_t ldc, const void *pf, Py_ssize_t pf_bytes)
    void fa_gemm_abt_small_f64(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, double alpha,
                               const double *a, Py_ssize_t lda, const double *b, Py_ssize_t ldb,
                               double *c, Py_ssize_t ldc, const void *pf, Py_ssize_t pf_bytes)
    void fa_gemm_ab_acc_small_f32(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                                  const float *a, Py_ssize_t lda, const float *b, Py_ssize_t ldb,
                                  float *c, Py_ssize_t ldc, const void *pf, Py_ssize_t pf_bytes)
    void fa_gemm_ab_acc_small_f64(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                                  const double *a, Py_ssize_t lda, const double *b,
                                  Py_ssize_t ldb, double *c, Py_ssize_t ldc, const void *pf,
                                  Py_ssize_t pf_bytes)

cdef inline void gemm_abt_small(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, real alpha,
                                const real *a, Py_ssize_t lda, const real *b, Py_ssize_t ldb,
                                real *c, Py_ssize_t ldc, const void *pf,
                                Py_ssize_t pf_bytes) noexcept nogil:
    # c[m, n] = alpha * a[m, k] @ b[n, k].T
    if real is float:
        fa_gemm_abt_small_f32(m, n, k, alpha, a, lda, b, ldb, c, ldc, pf, pf_bytes)
    else:
        fa_gemm_abt_small_f64(m, n, k, alpha, a, lda, b, ldb, c, ldc, pf, pf_bytes)

cdef inline void gemm_ab_acc_small(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                                   const real *a, Py_ssize_t lda, const real *b, Py_ssize_t ldb,
                                   real *c, Py_ssize_t ldc, const void *pf,
                                   Py_ssize_t pf_bytes) noexcept nogil:
    # c[m, n] += a[m, k] @ b[k, n]
    if real is float:
        fa_gemm_ab_acc_small_f32(m, n, k, a, lda, b, ldb, c, ldc, pf, pf_bytes)
    else:
        fa_gemm_ab_acc_small_f64(m, n, k, a, lda, b, ldb, c, ldc, pf, pf_bytes)

cdef extern from "smallgemm.h" nogil:
    # cache hint for [p, p + nbytes) (e.g. the next key/value block)
    void fa_prefetch(const void *p, Py_ssize_t nbytes)
