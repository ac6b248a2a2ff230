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
    FlashAttentionArgs fwd;     /* TND tensors, no pse, innerPrecise 0 */
    int64_t batch;
    int64_t *ends_q, *ends_kv; /* cumulative ends, batch of each */
} VarLenArgs;

static void varlen_free(void *payload) {
    VarLenArgs *a = payload;
    free(a->ends_q);
    free(a->ends_kv);
    free(a);
}

/* Head n of the statistics [N, T, 8] from row `first`: [S, 8]. */
static Rows tnd_stats(const aclTensor *t, int64_t n, int64_t first) {
    return (Rows){t, at3(t, n, first, 0), t->strides[1], t->strides[2]};
}

static aclnnStatus varlen_run(void *payload, double *scores) {
    const VarLenArgs *v = payload;
    const FlashAttentionArgs *a = &v->fwd;
    TRY(fa_launch_checks(a));
    const int64_t N = a->query.dims[1], D = a->query.dims[2], Dv = a->value.dims[2];
    const int64_t group = N / a->key.dims[1];
    for (int64_t b = 0; b < v->batch; ++b) {
        const int64_t q0 = b ? v->ends_q[b - 1] : 0, k0 = b ? v->ends_kv[b - 1] : 0;
        const int64_t Sq = v->ends_q[b] - q0, Skv = v->ends_kv[b] - k0;
        for (int64_t n = 0; n < N; ++n) {
            const Head h = {a, tnd_head(&a->query, q0, n), tnd_head(&a->key, k0, n / group),
                            tnd_head(&a->value, k0, n / group), tnd_head(&a->out, q0, n),
                            tnd_stats(&a->softmax_max, n, q0), tnd_stats(&a->softmax_sum, n, q0),
                            {0}, {0}};
            attend_head(&h, Sq, Skv, D, Dv, scores);
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
    TRY(check_qkv(query, key, value, "key", LAYOUT_TND, headNum));
    const int64_t Tq = query->dims[0], N = query->dims[1];
    const int64_t Tkv = key->dims[0], Dv = value->dims[2];
    TRY(check_no_dropout(keepProb, dropMaskOptional, paddingMaskOptional, prefixOptional));
    if (realShiftOptional)
        FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: realShift is not simulated for TND");
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
        if (sparseMode < 2 || sparseMode > 4)
            FAIL(ACLNN_ERR_PARAM_INVALID, "EZ1001: sparseMode %lld with an attenMask is not "
                 "simulated for TND (2, 3, 4)", (long long)sparseMode);
        TRY(check_atten_mask(attenMaskOptional, sparseMode, preTokens, nextTokens, NULL));
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
    fa_args_fill(&a->fwd, query, key, value, NULL, attenMaskOptional, softmaxMaxOut,
                 softmaxSumOut, attentionOutOut, scaleValue, preTokens, nextTokens, 0, sparseMode);
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
