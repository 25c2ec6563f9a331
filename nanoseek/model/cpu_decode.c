/* Fused bf16 CPU kernels for decode steps (a few tokens per call): matvecs that stream the weights once, and
 * one call per DeepSeekMoE layer for all routed experts of all tokens. Built and loaded by cpu_decode.py.
 *
 * At decode a token reads every activated weight once, so the step is bound by memory bandwidth plus the fixed
 * cost of each call. PyTorch issues a dozen small matmuls per MoE layer (~25 us each, mostly overhead); here a
 * layer's experts are one call and each weight row is read exactly once per call, whatever the number of rows
 * of x. Rounding follows the PyTorch bf16 path step by step (fp32 accumulation, bf16 outputs), so results
 * match it up to the order of the fp32 sums.
 *
 * Threads: OpenMP with the caller's thread count (libgomp is the one PyTorch already loaded).
 * Legend: M rows of x, D input width, O output rows, N tokens, K experts per token, I expert width.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define NS_AVX512BF16 1
#endif

typedef uint16_t bf16;

static inline float bf2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) { /* round to nearest even, as PyTorch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float rbf(float f) { return bf2f(f2bf(f)); } /* round through bf16 */

/* sum_i a[i] * b[i] in fp32 */
static inline float dot(const bf16 *a, const bf16 *b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#ifdef NS_AVX512BF16
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; i + 64 <= n; i += 64) {
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(a + i + 32),
                                (__m512bh)_mm512_loadu_si512(b + i + 32));
    }
    for (; i + 32 <= n; i += 32)
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
    s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += bf2f(a[i]) * bf2f(b[i]);
    return s;
}

/* sum_i a[i] * b[i], a bf16, b fp32 */
static inline float dot_bf_f(const bf16 *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#ifdef NS_AVX512BF16
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(a + i))),
                              _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) s += bf2f(a[i]) * b[i];
    return s;
}

/* sum_i a[i] * b[i], both fp32 */
static inline float dot_f(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#ifdef NS_AVX512BF16
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[M, O] = x[M, D] @ W[O, D]^T, bf16 in and out. Each weight row is read once for all M rows. */
void ns_linear_bf16(const bf16 *x, int64_t M, int64_t D, const bf16 *W, int64_t O, bf16 *y, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t o = 0; o < O; o++) {
        const bf16 *w = W + o * D;
        for (int64_t m = 0; m < M; m++) y[m * O + o] = f2bf(dot(x + m * D, w, D));
    }
}

/* Routed experts of a DeepSeekMoE layer for N tokens:
 *   out[n] = bf16( sum_k gw[n, k] * y[n, k] ),  y[n, k] = down_e(silu(gate_e x[n]) * up_e x[n]),  e = idx[n, k]
 * gate_up [E, 2I, D] (gate rows first), down [E, D, I]. act [N*K, I] bf16 and ys [N*K, D] fp32 are scratch.
 * Intermediate roundings as the PyTorch bf16 path: gate, up, silu(gate), the product and y are bf16. */
void ns_moe_bf16(const bf16 *x, int64_t N, int64_t D, const int64_t *idx, const float *gw, int64_t K,
                 const bf16 *gate_up, const bf16 *down, int64_t I, bf16 *out, bf16 *act, float *ys, int nt) {
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < N * K * I; t++) {
            int64_t nk = t / I, r = t % I;
            const bf16 *w = gate_up + idx[nk] * 2 * I * D, *xn = x + (nk / K) * D;
            float g = rbf(dot(xn, w + r * D, D)), u = rbf(dot(xn, w + (I + r) * D, D));
            act[t] = f2bf(rbf(g / (1.f + expf(-g))) * u);
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < N * K * D; t++) {
            int64_t nk = t / D, d = t % D;
            ys[t] = rbf(dot(act + nk * I, down + (idx[nk] * D + d) * I, I));
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < N * D; t++) {
            int64_t n = t / D, d = t % D;
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += gw[n * K + k] * ys[(n * K + k) * D + d];
            out[t] = f2bf(s);
        }
    }
}

/* Absorbed MLA attention (DeepSeek-V2 §2.1.2 in its decode form) for the B*T queries of a decode call:
 *   q_lat = q_nope W_UK (per head), scores = [q_lat ; q_pe] . rows * scale, p = softmax over the mask,
 *   o_lat = p . rows[:, :R], out = o_lat W_UV^T.
 * q [B, T, H, N+P]; w_uk [H, N, R] and w_uv [H, V, R] fp32; rows [B, S, C] shared by a request's T queries, or
 * [B, T, S, C] per query (DSA's selected rows) when per_query; mask [B, T, S]; out [B, T, H, V].
 * Each row is read once per query for all heads. Roundings as the PyTorch path (mla.py `absorbed`): q_lat,
 * scores, probabilities and o_lat are bf16, the softmax and the W_UV product fp32.
 * Scratch: qc [H, C] bf16, sc [H, S] fp32, ol [H, R] fp32. */
#define NS_CHUNK 16
void ns_mla_absorbed_bf16(const bf16 *q, int64_t B, int64_t T, int64_t H, int64_t N, int64_t P,
                          const float *w_uk, const float *w_uv, int64_t R, int64_t V, const bf16 *rows,
                          int64_t S, int per_query, const uint8_t *mask, float scale, bf16 *out, bf16 *qc,
                          float *sc, float *ol, int nt) {
    const int64_t C = R + P;
#pragma omp parallel num_threads(nt)
    {
        float acc[NS_CHUNK * 128];
        for (int64_t m = 0; m < B * T; m++) {
            const bf16 *qm = q + m * H * (N + P);
            const bf16 *rm = rows + (per_query ? m : m / T) * S * C;
            const uint8_t *mk = mask + m * S;
#pragma omp for schedule(static)
            for (int64_t h = 0; h < H; h++) {
                const bf16 *qh = qm + h * (N + P);
                float lat[1024];
                for (int64_t r = 0; r < R; r++) lat[r] = 0.f;
                for (int64_t n = 0; n < N; n++) {
                    const float qn = bf2f(qh[n]), *w = w_uk + (h * N + n) * R;
                    for (int64_t r = 0; r < R; r++) lat[r] += qn * w[r];
                }
                for (int64_t r = 0; r < R; r++) qc[h * C + r] = f2bf(lat[r]);
                for (int64_t j = 0; j < P; j++) qc[h * C + R + j] = qh[N + j];
            }
#pragma omp for schedule(static)
            for (int64_t s = 0; s < S; s++) {
                const bf16 *row = rm + s * C;
                for (int64_t h = 0; h < H; h++)
                    sc[h * S + s] = mk[s] ? rbf(dot(qc + h * C, row, C)) * scale : -INFINITY;
            }
#pragma omp for schedule(static)
            for (int64_t h = 0; h < H; h++) {
                float *x = sc + h * S, mx = -INFINITY, sum = 0.f;
                for (int64_t s = 0; s < S; s++) mx = x[s] > mx ? x[s] : mx;
                for (int64_t s = 0; s < S; s++) {
                    x[s] = mk[s] ? expf(x[s] - mx) : 0.f;
                    sum += x[s];
                }
                for (int64_t s = 0; s < S; s++) x[s] = rbf(x[s] / sum);
            }
            /* o_lat over column chunks: a chunk of every row is read once for all heads (heads in blocks of 128) */
#pragma omp for schedule(static) collapse(2)
            for (int64_t hb = 0; hb < H; hb += 128)
                for (int64_t c0 = 0; c0 < R; c0 += NS_CHUNK) {
                    int64_t nh = H - hb < 128 ? H - hb : 128, nc = R - c0 < NS_CHUNK ? R - c0 : NS_CHUNK;
                    for (int64_t i = 0; i < nh * NS_CHUNK; i++) acc[i] = 0.f;
                    for (int64_t s = 0; s < S; s++) {
                        if (!mk[s]) continue;
                        const bf16 *row = rm + s * C + c0;
                        float rf[NS_CHUNK];
                        for (int64_t j = 0; j < nc; j++) rf[j] = bf2f(row[j]);
                        for (int64_t h = 0; h < nh; h++) {
                            const float p = sc[(hb + h) * S + s];
                            if (p == 0.f) continue;
                            for (int64_t j = 0; j < nc; j++) acc[h * NS_CHUNK + j] += p * rf[j];
                        }
                    }
                    for (int64_t h = 0; h < nh; h++)
                        for (int64_t j = 0; j < nc; j++) ol[(hb + h) * R + c0 + j] = rbf(acc[h * NS_CHUNK + j]);
                }
#pragma omp for schedule(static)
            for (int64_t h = 0; h < H; h++)
                for (int64_t v = 0; v < V; v++) {
                    out[(m * H + h) * V + v] = f2bf(dot_f(ol + h * R, w_uv + (h * V + v) * R, R));
                }
        }
    }
}

/* RMSNorm as norm.py: y = w * bf16(x / sqrt(mean(x^2) + eps)), statistics in fp32. x, y [M, D], w [D]. */
void ns_rmsnorm_bf16(const bf16 *x, int64_t M, int64_t D, const bf16 *w, float eps, bf16 *y) {
    for (int64_t m = 0; m < M; m++) {
        const bf16 *xm = x + m * D;
        float ss = 0.f;
        for (int64_t d = 0; d < D; d++) ss += bf2f(xm[d]) * bf2f(xm[d]);
        const float inv = 1.f / sqrtf(ss / (float)D + eps);
        for (int64_t d = 0; d < D; d++) y[m * D + d] = f2bf(bf2f(w[d]) * rbf(bf2f(xm[d]) * inv));
    }
}

/* DeepSeekMoE routing as moe.py `Router` for N tokens: logits = x . W (fp32), scores = sigmoid (scoring 0) or
 * softmax (1); choice = scores (+ bias); with n_group > 1 and method != greedy (0) only the topk_group best
 * groups compete (group score: top-2 sum for noaux_tc (2), max for group_limited_greedy (1)); top-K of choice;
 * gate weights = scores of the chosen (renormalised when norm) * scaling. w32 [E, D] fp32, bias [E] or NULL.
 * Outputs gw [N, K] fp32, idx [N, K] int64. */
void ns_router(const bf16 *x, int64_t N, int64_t D, const float *w32, int64_t E, const float *bias, int scoring,
               int method, int64_t n_group, int64_t topk_group, int64_t K, int norm, float scaling, float *gw,
               int64_t *idx, float *scratch /* [N, 2E] */, int nt) {
    float *sc = scratch, *ch = scratch + N * E;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t t = 0; t < N * E; t++) sc[t] = dot_bf_f(x + (t / E) * D, w32 + (t % E) * D, D);
    for (int64_t n = 0; n < N; n++) {
        float *s = sc + n * E, *c = ch + n * E;
        if (scoring == 0) {
            for (int64_t e = 0; e < E; e++) s[e] = 1.f / (1.f + expf(-s[e]));
        } else {
            float mx = -INFINITY, sum = 0.f;
            for (int64_t e = 0; e < E; e++) mx = s[e] > mx ? s[e] : mx;
            for (int64_t e = 0; e < E; e++) sum += (s[e] = expf(s[e] - mx));
            for (int64_t e = 0; e < E; e++) s[e] /= sum;
        }
        for (int64_t e = 0; e < E; e++) c[e] = bias ? s[e] + bias[e] : s[e];
        if (method != 0 && n_group > 1) {
            const int64_t gs = E / n_group;
            float gscore[256];
            int keep[256];
            for (int64_t g = 0; g < n_group; g++) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int64_t e = g * gs; e < (g + 1) * gs; e++) {
                    if (c[e] > b1) { b2 = b1; b1 = c[e]; } else if (c[e] > b2) b2 = c[e];
                }
                gscore[g] = method == 2 ? b1 + b2 : b1;
                keep[g] = 0;
            }
            for (int64_t j = 0; j < topk_group; j++) {
                int64_t best = -1;
                for (int64_t g = 0; g < n_group; g++)
                    if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                keep[best] = 1;
            }
            for (int64_t e = 0; e < E; e++)
                if (!keep[e / gs]) c[e] = method == 2 ? -INFINITY : 0.f;
        }
        float total = 0.f;
        for (int64_t k = 0; k < K; k++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (c[e] > -INFINITY && (best < 0 || c[e] > c[best])) best = e;
            if (best < 0) best = 0;
            c[best] = -INFINITY; /* taken */
            idx[n * K + k] = best;
            gw[n * K + k] = s[best];
            total += s[best];
        }
        for (int64_t k = 0; k < K; k++)
            gw[n * K + k] = (norm && K > 1 ? gw[n * K + k] / (total + 1e-20f) : gw[n * K + k]) * scaling;
    }
}

/* RoPE in DeepSeek's pair layout as rope.py `apply_rope_pairs`: x [M, H, W], the dims [lead, W) rotated as
 * pairs (2i, 2i + 1) by the angles of row m (cos, sin [M, (W - lead) / 2] fp32), in fp32, rounded once. */
void ns_rope_pairs_bf16(const bf16 *x, int64_t M, int64_t H, int64_t W, int64_t lead, const float *cos,
                        const float *sin, bf16 *y) {
    const int64_t half = (W - lead) / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t h = 0; h < H; h++) {
            const bf16 *xh = x + (m * H + h) * W;
            bf16 *yh = y + (m * H + h) * W;
            memcpy(yh, xh, lead * sizeof(bf16));
            for (int64_t i = 0; i < half; i++) {
                const float a = bf2f(xh[lead + 2 * i]), b = bf2f(xh[lead + 2 * i + 1]);
                const float c = cos[m * half + i], s = sin[m * half + i];
                yh[lead + 2 * i] = f2bf(a * c + b * -s);
                yh[lead + 2 * i + 1] = f2bf(b * c + a * s);
            }
        }
}

int ns_has_avx512bf16(void) {
#ifdef NS_AVX512BF16
    return 1;
#else
    return 0;
#endif
}
