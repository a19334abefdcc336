// ops_loss_cpu.c: the lm_head matmul fused with the causal LM cross-entropy (see ops_cpu.h).
//
// With a 128k vocabulary the logits of a micro-batch ([T][V] fp32) would take gigabytes, so rows go
// through in chunks: logits of the chunk, the loss and dloss/dlogits in place, then dh of the chunk,
// and the chunk's logits are dropped. Rows whose label is ignored are skipped entirely (no logits).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"
#include "core/ops_cpu.h"

#define CE_LOGITS_BUDGET ((int64_t)16 << 20)  // floats of logits per chunk (64 MiB)

#define CE_FLUSH 1e-20                            // see ce_row_cpu

static int64_t g_chunk_rows;  // 0: from the budget
void lmhead_ce_set_chunk_rows_cpu(int64_t rows) { g_chunk_rows = rows > 0 ? rows : 0; }

// One row: returns logsumexp(l) - l[y] (in double from the fp32 logits); with grad, overwrites l[V]
// with scale * (softmax(l) - onehot(y)).
double ce_row_cpu(float *l, int V, int y, float scale, int grad) {
    float mx = l[0];
    for (int j = 1; j < V; j++)
        if (l[j] > mx) mx = l[j];
    double sum = 0.0;
    for (int j = 0; j < V; j++) sum += exp((double)l[j] - (double)mx);
    double lse = (double)mx + log(sum);
    double loss = lse - (double)l[y];
    if (grad)
        for (int j = 0; j < V; j++) {
            double d = exp((double)l[j] - lse) - (j == y ? 1.0 : 0.0);
            // Probabilities below 1e-20 cannot move dh at fp32 precision (dh is a sum of V terms of
            // size ~scale), but their products with W in the next matmul would be subnormal floats,
            // which are ~50x slower on x86: flush them to zero.
            l[j] = fabs(d) < CE_FLUSH ? 0.0f : (float)(d * scale);
        }
    return loss;
}

double lmhead_ce_forward_backward_cpu(const float *h, const float *W, const int32_t *targets, int64_t T, int C,
                                      int V, float scale, float *gh, float *logits_out, int64_t *n_counted) {
    // The rows to compute: the supervised ones, or every row when the logits are wanted.
    int64_t *rows = xmalloc((size_t)(T > 0 ? T : 1) * sizeof(int64_t)), n_rows = 0, count = 0;
    for (int64_t t = 0; t < T; t++) {
        int32_t y = targets[t];
        MOSFT_ASSERT(y == OPS_IGNORE_INDEX || (y >= 0 && y < V));  // labels are checked upstream
        if (y != OPS_IGNORE_INDEX) count++;
        if (y != OPS_IGNORE_INDEX || logits_out) rows[n_rows++] = t;
    }
    int64_t chunk = g_chunk_rows > 0 ? g_chunk_rows : CE_LOGITS_BUDGET / V;
    if (chunk < 1) chunk = 1;
    if (chunk > n_rows) chunk = n_rows > 0 ? n_rows : 1;
    float *hc = xmalloc((size_t)chunk * C * sizeof(float));   // [chunk][C] gathered rows of h
    float *lg = xmalloc((size_t)chunk * V * sizeof(float));   // [chunk][V] logits, then dlogits
    float *ghc = gh ? xmalloc((size_t)chunk * C * sizeof(float)) : NULL;  // [chunk][C]
    double *row_loss = xmalloc((size_t)chunk * sizeof(double));
    double loss = 0.0;
    for (int64_t c0 = 0; c0 < n_rows; c0 += chunk) {
        int64_t n = n_rows - c0 < chunk ? n_rows - c0 : chunk;
        for (int64_t r = 0; r < n; r++) memcpy(hc + r * C, h + rows[c0 + r] * C, (size_t)C * sizeof(float));
        matmul_forward_cpu(lg, hc, W, n, C, V, 0);
        if (logits_out)
            for (int64_t r = 0; r < n; r++)
                memcpy(logits_out + rows[c0 + r] * V, lg + r * V, (size_t)V * sizeof(float));
#pragma omp parallel for num_threads(ops_cpu_threads()) if (n * V >= 65536) schedule(static)
        for (int64_t r = 0; r < n; r++) {
            int32_t y = targets[rows[c0 + r]];
            float *l = lg + r * V;
            if (y == OPS_IGNORE_INDEX) {  // only here for logits_out: no loss, no gradient
                row_loss[r] = 0.0;
                memset(l, 0, (size_t)V * sizeof(float));
                continue;
            }
            row_loss[r] = ce_row_cpu(l, V, y, scale, gh != NULL);
        }
        for (int64_t r = 0; r < n; r++) loss += row_loss[r];  // row order: deterministic
        if (gh) {
            gemm_cpu(0, 0, n, C, V, lg, V, W, C, ghc, C, 0);  // ghc[n][C] = dlogits[n][V] W[V][C]
            for (int64_t r = 0; r < n; r++) {
                float *dst = gh + rows[c0 + r] * C;
                const float *src = ghc + r * C;
                for (int i = 0; i < C; i++) dst[i] += src[i];
            }
        }
    }
    free(rows);
    free(hc);
    free(lg);
    free(ghc);
    free(row_loss);
    if (n_counted) *n_counted = count;
    return loss;
}
