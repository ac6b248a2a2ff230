/*
 * aclnnFlashAttentionVarLenScore test double (included by opapi.c, whose helpers it uses).
 *
 * ops-transformer attention/flash_attention_score/docs/aclnnFlashAttentionVarLenScore.md:
 * query/key/value in layout TND, T the packed sequences; actualSeqQLenOptional and
 * actualSeqKvLenOptional give each sequence's cumulative end (e.g. {3, 5} for lengths 3
 * and 2, sparse_mode_introduction.md); every sequence is attended on its own;
 * softmaxMaxOut/softmaxSumOut are FLOAT [N, T, 8], attentionOutOut the query's [T, N, Dv].
 *
 * Simulated: sparse modes 0 without a mask (everything computed), 2, 3 and 4 with the
 * [2048, 2048] compressed mask (2: causal top-left, 3: causal bottom-right, which needs
 * Sq <= Skv in every sequence since invalid rows are not supported; 4: band, bottom-right
 * origin, preTokens and nextTokens intersecting), keepProb 1, innerPrecise 0 (reserved).
 * realShift, dropout, padding, prefix and empty sequences are rejected as not simulated
 * (161002). A row with no visible key is undefined (NaN), as the documentation leaves it.
 */

enum { KIND_FLASH_ATTENTION_VAR_LEN_SCORE = 4 };

typedef struct {
    aclTensor query, key, value, mask, softmax_max, softmax_sum, out;
    int has_mask;
    double scale;
    int64_t pre_tokens, next_tokens, sparse_mode, batch;
    int64_t *ends_q, *ends_kv; /* cumulative ends, batch of each */
} VarLenArgs;

static void varlen_free(void *payload) {
    VarLenArgs *a = payload;
    free(a->ends_q);
    free(a->ends_kv);
    free(a);
}

static int64_t at3(const aclTensor *t, int64_t a, int64_t b, int64_t c) {
    return t->offset + a * t->strides[0] + b * t->strides[1] + c * t->strides[2];
}

/* Is key j (of the sequence's Skv) masked out for its query i (of Sq)? */
static int varlen_masked(const VarLenArgs *a, int64_t i, int64_t j, int64_t Sq, int64_t Skv) {
    if (!a->has_mask) return 0; /* no mask: sparse mode and pre/next do not take effect */
    switch (a->sparse_mode) {
    case 2: return j > i;
    case 3: return j > i + (Skv - Sq);
    case 4: return j - (i + Skv - Sq) > a->next_tokens || (i + Skv - Sq) - j > a->pre_tokens;
    default: return 0;
    }
}

static aclnnStatus varlen_run(void *payload, double *scores) {
    const VarLenArgs *a = payload;
    const aclTensor *tensors[] = {&a->query, &a->key, &a->value, &a->softmax_max,
                                  &a->softmax_sum, &a->out, &a->mask};
    const char *names[] = {"query", "key", "value", "softmaxMaxOut", "softmaxSumOut",
                           "attentionOutOut", "attenMaskOptional"};
    for (int k = 0; k < 7; ++k)
        if ((k < 6 || a->has_mask) && !in_device_memory(tensors[k]))
            FAIL(ACLNN_ERR_RUNTIME_ERROR, "EZ9999: %s lies outside device memory "
                 "(freed or too small)", names[k]);
    if (a->has_mask) {
        FlashAttentionArgs view = {0}; /* the compressed-mask check reads mask and mode */
        view.mask = a->mask;
        view.sparse_mode = a->sparse_mode;
        aclnnStatus status = fa_compressed_mask_check(&view);
        if (status != ACLNN_SUCCESS) return status;
    }
    const int64_t N = a->query.dims[1], D = a->query.dims[2];
    const int64_t Nkv = a->key.dims[1], Dv = a->value.dims[2], group = N / Nkv;
    for (int64_t b = 0; b < a->batch; ++b) {
        const int64_t q0 = b ? a->ends_q[b - 1] : 0, q1 = a->ends_q[b];
        const int64_t k0 = b ? a->ends_kv[b - 1] : 0, k1 = a->ends_kv[b];
        const int64_t Sq = q1 - q0, Skv = k1 - k0;
        for (int64_t n = 0; n < N; ++n)
            for (int64_t i = 0; i < Sq; ++i) {
                double row_max = -INFINITY, row_sum = 0.0;
                for (int64_t j = 0; j < Skv; ++j) {
                    if (varlen_masked(a, i, j, Sq, Skv)) {
                        scores[j] = -INFINITY;
                        continue;
                    }
                    double dot = 0.0;
                    for (int64_t d = 0; d < D; ++d)
                        dot += load(&a->query, at3(&a->query, q0 + i, n, d)) *
                               load(&a->key, at3(&a->key, k0 + j, n / group, d));
                    scores[j] = a->scale * dot;
                    if (scores[j] > row_max) row_max = scores[j];
                }
                if (row_max == -INFINITY) { /* no visible key: undefined */
                    row_sum = NAN;
                    for (int64_t d = 0; d < Dv; ++d)
                        store(&a->out, at3(&a->out, q0 + i, n, d), NAN);
                } else {
                    for (int64_t j = 0; j < Skv; ++j) {
                        scores[j] = exp(scores[j] - row_max);
                        row_sum += scores[j];
                    }
                    for (int64_t d = 0; d < Dv; ++d) {
                        double acc = 0.0;
                        for (int64_t j = 0; j < Skv; ++j)
                            if (scores[j] != 0.0)
                                acc += scores[j] *
                                       load(&a->value, at3(&a->value, k0 + j, n / group, d));
                        store(&a->out, at3(&a->out, q0 + i, n, d), acc / row_sum);
                    }
                }
                for (int64_t r = 0; r < 8; ++r) {
                    store(&a->softmax_max, at3(&a->softmax_max, n, q0 + i, r), row_max);
                    store(&a->softmax_sum, at3(&a->softmax_sum, n, q0 + i, r), row_sum);
                }
            }
    }
    return ACLNN_SUCCESS;
}

/* The cumulative ends of one side: `batch` non-decreasing values, the last equal to T,
 * every sequence non-empty. Copied into *ends. */
static aclnnStatus varlen_ends(const aclIntArray *lens, const char *name, int64_t total,
                               int64_t **ends) {
    int64_t previous = 0;
    for (uint64_t b = 0; b < lens->size; ++b) {
        if (lens->values[b] <= previous)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: %s[%llu] = %lld: cumulative lengths must "
                 "increase (empty sequences are not simulated)", name, (unsigned long long)b,
                 (long long)lens->values[b]);
        previous = lens->values[b];
    }
    if (previous != total)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: %s ends at %lld, T is %lld", name,
             (long long)previous, (long long)total);
    *ends = malloc(lens->size * sizeof(int64_t));
    if (*ends == NULL) FAIL(561000, "EZ9999: out of host memory");
    memcpy(*ends, lens->values, lens->size * sizeof(int64_t));
    return ACLNN_SUCCESS;
}

SIM_EXPORT aclnnStatus aclnnFlashAttentionVarLenScoreGetWorkspaceSize(
    const aclTensor *query, const aclTensor *key, const aclTensor *value,
    const aclTensor *realShiftOptional, const aclTensor *dropMaskOptional,
    const aclTensor *paddingMaskOptional, const aclTensor *attenMaskOptional,
    const aclIntArray *prefixOptional, const aclIntArray *actualSeqQLenOptional,
    const aclIntArray *actualSeqKvLenOptional, double scaleValue, double keepProb,
    int64_t preTokens, int64_t nextTokens, int64_t headNum, char *inputLayout,
    int64_t innerPrecise, int64_t sparseMode, const aclTensor *softmaxMaxOut,
    const aclTensor *softmaxSumOut, const aclTensor *softmaxOutOut,
    const aclTensor *attentionOutOut, uint64_t *workspaceSize, aclOpExecutor **executor) {
    int injected = ascendsim_injected_failure("aclnnFlashAttentionVarLenScoreGetWorkspaceSize");
    if (injected) return injected;
    REQUIRE(query, "query");
    REQUIRE(key, "key");
    REQUIRE(value, "value");
    REQUIRE(inputLayout, "inputLayout");
    REQUIRE(softmaxMaxOut, "softmaxMaxOut");
    REQUIRE(softmaxSumOut, "softmaxSumOut");
    REQUIRE(attentionOutOut, "attentionOutOut");
    REQUIRE(workspaceSize, "workspaceSize");
    REQUIRE(executor, "executor");
    CHECK_TENSOR(query, "query");
    CHECK_TENSOR(key, "key");
    CHECK_TENSOR(value, "value");
    CHECK_TENSOR(attenMaskOptional, "attenMaskOptional");
    CHECK_TENSOR(softmaxMaxOut, "softmaxMaxOut");
    CHECK_TENSOR(softmaxSumOut, "softmaxSumOut");
    CHECK_TENSOR(attentionOutOut, "attentionOutOut");
    if (softmaxOutOut != NULL && !ascendsim_tensor_valid(softmaxOutOut))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: softmaxOutOut is not a valid tensor");
    if (strcmp(inputLayout, "TND") != 0)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: aclnnFlashAttentionVarLenScore takes inputLayout "
             "TND, got '%s'", inputLayout);
    if (query->ndim != 3 || key->ndim != 3 || value->ndim != 3)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: TND query/key/value must be 3-D");
    if (!is_float_dtype(query->dtype) || key->dtype != query->dtype || value->dtype != query->dtype)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: query/key/value dtypes must be equal and one of "
             "FLOAT16, BFLOAT16, FLOAT32");
    const int64_t Tq = query->dims[0], N = query->dims[1], D = query->dims[2];
    const int64_t Tkv = key->dims[0], Nkv = key->dims[1], Dv = value->dims[2];
    if (value->dims[0] != Tkv || value->dims[1] != Nkv || key->dims[2] != D)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: query/key/value shapes are inconsistent");
    if (Tq < 1 || Tkv < 1 || N < 1 || Nkv < 1 || D < 1 || Dv < 1)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: empty query/key/value are not supported");
    if (headNum != N)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: headNum %lld != query N %lld", (long long)headNum,
             (long long)N);
    if (N % Nkv != 0)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: Nq/Nkv must be an integer (Nq %lld, Nkv %lld)",
             (long long)N, (long long)Nkv);
    if (N > 256 || D > 768 || Dv > D || Tq > (1 << 20) || Tkv > (1 << 20))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: limits exceeded: N <= 256, Dv <= D <= 768, "
             "T <= 1M");
    if (!(keepProb > 0.0 && keepProb <= 1.0))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: keepProb must be in (0, 1]");
    if (keepProb != 1.0 || dropMaskOptional || paddingMaskOptional || prefixOptional ||
        realShiftOptional)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: dropout, paddingMask, prefix and realShift are "
             "not simulated for TND");
    if (innerPrecise != 0)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: innerPrecise is reserved for TND (pass 0)");
    if (sparseMode < 0 || sparseMode > 8 || sparseMode == 5)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode %lld is invalid for TND (0, 1, 2, 3, "
             "4, 6, 7, 8)", (long long)sparseMode);
    if (actualSeqQLenOptional == NULL || actualSeqKvLenOptional == NULL ||
        !ascendsim_int_array_valid(actualSeqQLenOptional) ||
        !ascendsim_int_array_valid(actualSeqKvLenOptional))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: TND needs actualSeqQLen and actualSeqKvLen");
    const uint64_t batch = actualSeqQLenOptional->size;
    if (batch < 1 || actualSeqKvLenOptional->size != batch)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: actualSeqQLen and actualSeqKvLen must have one "
             "entry per sequence (got %llu and %llu)", (unsigned long long)batch,
             (unsigned long long)actualSeqKvLenOptional->size);
    if (attenMaskOptional) {
        const aclTensor *m = attenMaskOptional;
        if (m->dtype != ACL_BOOL && m->dtype != ACL_UINT8)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: attenMask dtype must be BOOL or UINT8");
        if (sparseMode < 2 || sparseMode > 4)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode %lld with an attenMask is not "
                 "simulated for TND (2, 3, 4)", (long long)sparseMode);
        if (m->ndim != 2 || m->dims[0] != COMPRESSED_MASK_SIZE ||
            m->dims[1] != COMPRESSED_MASK_SIZE)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode %lld needs a [2048, 2048] "
                 "compressed attenMask", (long long)sparseMode);
        if (sparseMode == 4 && preTokens < -nextTokens)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode 4: preTokens %lld and nextTokens "
                 "%lld have no intersection", (long long)preTokens, (long long)nextTokens);
    }
    const int64_t stats_shape[3] = {N, Tq, 8}, out_shape[3] = {Tq, N, Dv};
    if (softmaxMaxOut->dtype != ACL_FLOAT || softmaxSumOut->dtype != ACL_FLOAT ||
        !same_shape(softmaxMaxOut, 3, stats_shape) || !same_shape(softmaxSumOut, 3, stats_shape))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: softmaxMaxOut/softmaxSumOut must be FLOAT "
             "[N, T, 8]");
    if (attentionOutOut->dtype != query->dtype || !same_shape(attentionOutOut, 3, out_shape))
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: attentionOutOut must be [T, N, Dv] with the query "
             "dtype");

    VarLenArgs *a = calloc(1, sizeof *a);
    if (a == NULL) FAIL(561000, "EZ9999: out of host memory");
    aclnnStatus status = varlen_ends(actualSeqQLenOptional, "actualSeqQLen", Tq, &a->ends_q);
    if (status == ACLNN_SUCCESS)
        status = varlen_ends(actualSeqKvLenOptional, "actualSeqKvLen", Tkv, &a->ends_kv);
    int64_t longest = 0;
    for (uint64_t b = 0; status == ACLNN_SUCCESS && b < batch; ++b) {
        const int64_t Sq = a->ends_q[b] - (b ? a->ends_q[b - 1] : 0);
        const int64_t Skv = a->ends_kv[b] - (b ? a->ends_kv[b - 1] : 0);
        if (Skv > longest) longest = Skv;
        /* "When the value is set to 3, computation on invalid rows is not supported, and
         * Sq <= Skv must be satisfied for each batch." */
        if (attenMaskOptional && sparseMode == 3 && Sq > Skv) {
            ascendsim_set_error("EZ1001: sparseMode 3 needs Sq <= Skv in every sequence; "
                                "sequence %llu has Sq %lld, Skv %lld", (unsigned long long)b,
                                (long long)Sq, (long long)Skv);
            status = ACLNN_ERR_PARAM_INVALID;
        }
    }
    if (status != ACLNN_SUCCESS) {
        varlen_free(a);
        return status;
    }
    a->query = *query;
    a->key = *key;
    a->value = *value;
    a->softmax_max = *softmaxMaxOut;
    a->softmax_sum = *softmaxSumOut;
    a->out = *attentionOutOut;
    if ((a->has_mask = attenMaskOptional != NULL)) a->mask = *attenMaskOptional;
    a->scale = scaleValue;
    a->pre_tokens = preTokens;
    a->next_tokens = nextTokens;
    a->sparse_mode = sparseMode;
    a->batch = (int64_t)batch;
    uint64_t required = 4096 + (uint64_t)longest * sizeof(double);
    return hand_over(KIND_FLASH_ATTENTION_VAR_LEN_SCORE, a, varlen_free, required, executor,
                     workspaceSize);
}

SIM_EXPORT aclnnStatus aclnnFlashAttentionVarLenScore(void *workspace, uint64_t workspaceSize,
                                                      aclOpExecutor *executor,
                                                      aclrtStream stream) {
    return launch("aclnnFlashAttentionVarLenScore", KIND_FLASH_ATTENTION_VAR_LEN_SCORE,
                  workspace, workspaceSize, executor, stream, varlen_run);
}
