# One whole row of a masked softmax (softmax.pyx, additive.pyx), over the row routines of
# the tile core (tile.pxd, vecmath.h).

from libc.math cimport INFINITY, log

from fastattn._kernels.tile cimport (
    real, row_fill, row_scale, row_exp_sum, mask_row_max, row_copy_scale, row_add_const,
)


cdef inline void softmax_row(const real *x, real *y, real *scratch, Py_ssize_t n,
                             Py_ssize_t visible, real scale, const void *mask,
                             int mask_kind, Py_ssize_t mask_col_stride,
                             bint log_out) noexcept nogil:
    # y[:n] <- softmax (or log_softmax) of  scale * x[:visible] + mask,  one pass per
    # stage: scale, mask + max, exp + sum, normalise. Columns >= visible (a causal band)
    # and a row with nothing visible give probability 0 (log: -inf), never NaN.
    # y may be x. scratch (n elements) is only used, and only needed, for log_out.
    cdef real empty = -INFINITY if log_out else 0
    cdef real mx, total
    cdef Py_ssize_t j
    if y != x or scale != 1:
        row_copy_scale(y, x, visible, scale)
    row_fill(y + visible, n - visible, empty)
    # y <- y + mask; mx <- max(y)
    mx = mask_row_max(y, visible, mask, mask_kind, mask_col_stride)
    if mx == -INFINITY:
        row_fill(y, visible, empty)
        return
    if log_out:
        # y <- y - (mx + log(sum exp(y - mx)))
        for j in range(visible):
            scratch[j] = y[j]
        total = row_exp_sum(scratch, visible, mx)
        row_add_const(y, visible, -(mx + log(total)))
    else:
        # y <- exp(y - mx) / sum
        total = row_exp_sum(y, visible, mx)
        row_scale(y, visible, 1 / total)
