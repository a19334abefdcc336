// ops_cpu.c: the elementwise and row-wise CPU reference ops (see ops_cpu.h): threads, RMSNorm,
// SwiGLU, embedding lookup, rotary embedding, AdamW and the gradient norm.
#include "core/ops_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/common.h"

// ---- threads ----
static int g_threads;

void ops_cpu_set_threads(int n) { g_threads = n > 0 ? n : 0; }
int ops_cpu_threads(void) {
    if (g_threads <= 0) g_threads = mosft_num_threads();
    return g_threads;
}

// Elementwise loops below this many elements run on one thread (a parallel region costs microseconds).
#define OPS_PAR_MIN 32768

// ---- RMSNorm ----
// HF LlamaRMSNorm: variance = mean(x^2) in fp32, x * rsqrt(variance + eps), then * weight. The mean is
// summed in double and rounded once, so it is the correctly rounded fp32 statistic.
static float rmsnorm_rstd(const float *x, int C, float eps) {
    double ss = 0.0;
    for (int i = 0; i < C; i++) ss += (double)x[i] * (double)x[i];
    float var = (float)(ss / C);
    return (float)(1.0 / sqrt((double)(var + eps)));
}

void rmsnorm_forward_cpu(float *out, float *rstd, const float *inp, const float *weight, int64_t T, int C,
                         float eps) {
#pragma omp parallel for num_threads(ops_cpu_threads()) if (T * C >= OPS_PAR_MIN) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *x = inp + t * C;
        float *y = out + t * C;
        float r = rmsnorm_rstd(x, C, eps);
        if (rstd) rstd[t] = r;
        for (int i = 0; i < C; i++) y[i] = weight[i] * (x[i] * r);
    }
}

// y_i = w_i x_i r with r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / C:
//   dL/dx_j = r w_j g_j - (r^3 / C) x_j sum_i g_i w_i x_i
void rmsnorm_backward_cpu(float *ginp, const float *gout, const float *inp, const float *weight, const float *rstd,
                          int64_t T, int C, float eps) {
#pragma omp parallel for num_threads(ops_cpu_threads()) if (T * C >= OPS_PAR_MIN) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *x = inp + t * C, *g = gout + t * C;
        float *gx = ginp + t * C;
        float r = rstd ? rstd[t] : rmsnorm_rstd(x, C, eps);
        double dot = 0.0;
        for (int i = 0; i < C; i++) dot += (double)g[i] * (double)weight[i] * (double)x[i];
        float coef = (float)((double)r * (double)r * (double)r * dot / C);
        for (int i = 0; i < C; i++) gx[i] += r * (weight[i] * g[i]) - coef * x[i];
    }
}

// ---- SwiGLU ----
// silu(g) = g * sigmoid(g); torch computes x / (1 + exp(-x)) in fp32.
static inline float sigmoidf_ref(float g) { return 1.0f / (1.0f + expf(-g)); }

void swiglu_forward_cpu(float *out, const float *gate, const float *up, int64_t n) {
#pragma omp parallel for num_threads(ops_cpu_threads()) if (n >= OPS_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
void swiglu_backward_cpu(float *ggate, float *gup, const float *gout, const float *gate, const float *up, int64_t n) {
#pragma omp parallel for num_threads(ops_cpu_threads()) if (n >= OPS_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i], s = sigmoidf_ref(g);
        ggate[i] += gout[i] * up[i] * (s * (1.0f + g * (1.0f - s)));
        gup[i] += gout[i] * (g / (1.0f + expf(-g)));
    }
}

// ---- embedding ----
void embedding_forward_cpu(float *out, const int32_t *ids, const float *table, int64_t T, int C, int V) {
    for (int64_t t = 0; t < T; t++) {
        MOSFT_ASSERT(ids[t] >= 0 && ids[t] < V);  // token ids are checked against the vocabulary upstream
        memcpy(out + t * C, table + (int64_t)ids[t] * C, (size_t)C * sizeof(float));
    }
}

// ---- rotary embedding ----
// HF LlamaRotaryEmbedding computes freqs = inv_freq (fp32) * position (fp32) in fp32 and takes cos/sin
// of that fp32 angle; the angle is kept in fp32 here too (at position 4000 its rounding is ~2e-4 rad,
// so computing it in double would differ from HF by more than the tolerances). cos/sin are evaluated
// in double and rounded once.
static void rope_rotate(float *x, const int32_t *pos, const float *inv_freq, int64_t T, int H, int D, float sign) {
    MOSFT_ASSERT(D % 2 == 0);
    int half = D / 2;
#pragma omp parallel num_threads(ops_cpu_threads()) if (T * H * D >= OPS_PAR_MIN)
    {
        float *cs = xmalloc((size_t)D * sizeof(float));  // cos[half], sin[half] of one position
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float p = (float)pos[t];
            for (int i = 0; i < half; i++) {
                float a = p * inv_freq[i];
                cs[i] = (float)cos((double)a);
                cs[half + i] = sign * (float)sin((double)a);
            }
            for (int h = 0; h < H; h++) {
                float *v = x + (t * H + h) * D;
                for (int i = 0; i < half; i++) {
                    float x1 = v[i], x2 = v[half + i], c = cs[i], s = cs[half + i];
                    v[i] = x1 * c - x2 * s;
                    v[half + i] = x2 * c + x1 * s;
                }
            }
        }
        free(cs);
    }
}

void rope_forward_cpu(float *x, const int32_t *pos, const float *inv_freq, int64_t T, int H, int D) {
    rope_rotate(x, pos, inv_freq, T, H, D, 1.0f);
}

// The rotation is orthogonal: its transpose is the rotation by -a.
void rope_backward_cpu(float *g, const int32_t *pos, const float *inv_freq, int64_t T, int H, int D) {
    rope_rotate(g, pos, inv_freq, T, H, D, -1.0f);
}

// ---- AdamW ----
// torch.optim.AdamW, _single_tensor_adamw (the CPU path), line by line:
//   param.mul_(1 - lr * weight_decay)
//   exp_avg.lerp_(grad, 1 - beta1)
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//   step_size = lr / (1 - beta1 ** step); bias_correction2_sqrt = sqrt(1 - beta2 ** step)
//   denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
//   param.addcdiv_(exp_avg, denom, value=-step_size)
// Python scalars are doubles; torch rounds them to fp32 when it applies them to an fp32 tensor, and
// evaluates addcmul as self + value * t1 * t2, addcdiv as self + value * t1 / t2, lerp (weight < 0.5) as
// self + weight * (end - self). (torch's SIMD lerp fuses that multiply-add, so its moments can differ
// from these in the last bit; the parameters matched torch bit for bit in test_ops_cpu_torch.)
void adamw_update_cpu(float *param, const float *grad, float *m, float *v, int64_t n, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int64_t step) {
    MOSFT_ASSERT(step >= 1);
    float decay = (float)(1.0 - lr * weight_decay);
    float w1 = (float)(1.0 - beta1), b2 = (float)beta2, w2 = (float)(1.0 - beta2);
    double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    float neg_step = (float)(-(lr / bc1)), bc2_sqrt = (float)sqrt(bc2), epsf = (float)eps;
    MOSFT_ASSERT(w1 < 0.5f);  // torch's lerp takes the other form for weights >= 0.5 (beta1 <= 0.5)
#pragma omp parallel for num_threads(ops_cpu_threads()) if (n >= OPS_PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float g = grad[i];
        float p = param[i] * decay;
        float mi = m[i] + w1 * (g - m[i]);
        float vi = v[i] * b2;
        vi = vi + w2 * g * g;
        float denom = sqrtf(vi) / bc2_sqrt + epsf;
        param[i] = p + neg_step * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

// Fixed blocks summed in block order: the same double result for any thread count.
#define NORM_BLOCK 65536
double global_norm_sq_cpu(const float *x, int64_t n) {
    int64_t nb = (n + NORM_BLOCK - 1) / NORM_BLOCK;
    double *part = xcalloc(nb > 0 ? (size_t)nb : 1, sizeof(double));
#pragma omp parallel for num_threads(ops_cpu_threads()) if (nb > 1) schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        int64_t lo = b * NORM_BLOCK, hi = lo + NORM_BLOCK < n ? lo + NORM_BLOCK : n;
        double s = 0.0;
        for (int64_t i = lo; i < hi; i++) s += (double)x[i] * (double)x[i];
        part[b] = s;
    }
    double total = 0.0;
    for (int64_t b = 0; b < nb; b++) total += part[b];
    free(part);
    return total;
}
