/* Fused bf16 CPU kernels for decode steps (a few tokens per call), built and loaded by cpu_decode.py:
 *   ns_linear_bf16        matvec for a few rows, each weight row read once for all of them
 *   ns_rmsnorm_bf16       RMSNorm
 *   ns_mla_project_bf16   MLA's projections: q (q-LoRA, norm, RoPE), the cache row (norm, RoPE), the indexer's wk
 *   ns_mla_absorbed_bf16  absorbed MLA attention over the latent rows (all of them, or DSA's selected ones)
 *   ns_ffn_block_bf16     a block's feed-forward half: norm, router, routed + shared experts, residual
 *   ns_dsa_select_bf16    DSA's lightning indexer at decode: scores over the cached keys, top-k, gathered rows
 *   ns_decode_stack_bf16  all decoder blocks of a decode step, with the latent cache's writes and reads
 *
 * At decode a token reads every activated weight once, so a step is bound by memory bandwidth plus the fixed
 * cost of each call; in PyTorch a layer is ~100 small ops (~5-25 us each, mostly overhead). Rounding follows the
 * PyTorch bf16 path step by step (fp32 accumulation, bf16 wherever PyTorch rounds), so results match it up to
 * the order of fp32 sums (tests/test_cpu_decode.py).
 *
 * Threads: OpenMP with the caller's thread count (libgomp is the one PyTorch already loaded). Compiled with
 * -ffp-contract=off so that the scalar loops round like PyTorch's separate multiplies and adds.
 * Legend: M rows of x, D input width, O output rows, N tokens, K experts per token, I expert width.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
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
        /* b streams weight rows one after another: asking 2 KB ahead keeps more of memory's latency hidden than
         * the hardware prefetcher alone (the block stack ran 8-12% faster; 0.5 and 4 KB ahead were slower) */
        _mm_prefetch((const char *)(b + i + 1024), _MM_HINT_T0);
        _mm_prefetch((const char *)(b + i + 1056), _MM_HINT_T0);
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
#ifdef NS_AVX512BF16
    /* the experts' streams start where the hardware has no history: ask for each one's first KB now, so that
     * their memory latencies overlap instead of stalling one after another (the block stack: median 1.00 against
     * 1.04 ms per token over 7 alternating runs; the spread between runs is larger) */
    for (int64_t nk = 0; nk < N * K; nk++) {
        const char *g = (const char *)(gate_up + idx[nk] * 2 * I * D), *u = g + I * D * 2;
        const char *dn = (const char *)(down + idx[nk] * D * I);
        for (int64_t b = 0; b < 1024; b += 64) {
            _mm_prefetch(g + b, _MM_HINT_T1);
            _mm_prefetch(u + b, _MM_HINT_T1);
            _mm_prefetch(dn + b, _MM_HINT_T1);
        }
    }
#endif
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
 * q [B, T, H, N+P]; w_kvb [H, N+V, R] = kv_b_proj's weight (W_UK = its first N rows per head, W_UV the
 * last V); rows [B, S, C] shared by a request's T queries, or
 * [B, T, S, C] per query (DSA's selected rows) when per_query; mask [B, T, S]; out [B, T, H, V].
 * Each row is read once per query for all heads. Roundings as the PyTorch path (mla.py `absorbed`): q_lat,
 * scores, probabilities and o_lat are bf16, the softmax and the W_UK, W_UV products fp32 (exact products of
 * bf16 values, so reading the bf16 weight equals PyTorch's fp32 copy of it).
 * With w_o [Dm, H*V] given, also the output projection y [B, T, Dm] = out . W_o^T (o_proj), plus the residual
 * resid [B, T, Dm] when given (y = resid + o_proj(out), each rounded to bf16 as PyTorch).
 * Scratch: qc [H, C] bf16, sc [H, S] fp32, ol [H, R] fp32, pb [H, S + 1] bf16. */
#define NS_CHUNK 16
#ifdef NS_AVX512BF16
/* ol[h, c0:c0+16] = bf16(sum_s p[h, s] rows[s, c0:c0+16]) for all heads, with VDPBF16PS: each instruction takes
 * two consecutive rows, interleaved column by column, against the head's broadcast probability pair. Heads go
 * in blocks of 8 accumulators kept in registers. pb [H, S2] bf16, S2 = S rounded up to even (padded with 0). */
static void olat_chunk(const bf16 *rm, int64_t S, int64_t C, int64_t c0, const bf16 *pb, int64_t S2, int64_t H,
                       float *ol, int64_t R) {
    uint16_t perm_idx[32];
    for (int k = 0; k < 32; k++) perm_idx[k] = (uint16_t)(k % 2 ? 32 + k / 2 : k / 2);
    const __m512i perm = _mm512_loadu_si512(perm_idx);
    for (int64_t hb = 0; hb < H; hb += 8) {
        const int64_t nb = H - hb < 8 ? H - hb : 8;
        __m512 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t s = 0; s < S; s += 2) {
            const __m256i r0 = _mm256_loadu_si256((const __m256i *)(rm + s * C + c0));
            const __m256i r1 = s + 1 < S ? _mm256_loadu_si256((const __m256i *)(rm + (s + 1) * C + c0))
                                         : _mm256_setzero_si256();
            const __m512i rr = _mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), perm,
                                                         _mm512_castsi256_si512(r1));
            for (int64_t j = 0; j < nb; j++) {
                uint32_t pair;
                memcpy(&pair, pb + (hb + j) * S2 + s, 4);
                acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_set1_epi32((int)pair), (__m512bh)rr);
            }
        }
        for (int64_t j = 0; j < nb; j++) {
            float tmp[16];
            _mm512_storeu_ps(tmp, acc[j]);
            for (int k = 0; k < 16; k++) ol[(hb + j) * R + c0 + k] = rbf(tmp[k]);
        }
    }
}
#endif

void ns_mla_absorbed_bf16(const bf16 *q, int64_t B, int64_t T, int64_t H, int64_t N, int64_t P,
                          const bf16 *w_kvb, int64_t R, int64_t V, const bf16 *rows,
                          int64_t S, int per_query, const uint8_t *mask, float scale, bf16 *out, bf16 *qc,
                          float *sc, float *ol, bf16 *pb, const bf16 *w_o, int64_t Dm, const bf16 *resid,
                          bf16 *y, int nt) {
    const int64_t C = R + P, S2 = S + (S & 1);
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
                    const float qn = bf2f(qh[n]);
                    const bf16 *w = w_kvb + (h * (N + V) + n) * R;
                    for (int64_t r = 0; r < R; r++) lat[r] += qn * bf2f(w[r]);
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
            /* o_lat = p . rows[:, :R] over column chunks: a chunk of every row is read once per block of heads */
#ifdef NS_AVX512BF16
            if (R % 16 == 0) {
#pragma omp for schedule(static)
                for (int64_t t = 0; t < H * S2; t++) { /* probabilities as bf16, padded to an even count */
                    const int64_t h = t / S2, s = t % S2;
                    pb[t] = s < S ? f2bf(sc[h * S + s]) : 0;
                }
#pragma omp for schedule(static)
                for (int64_t c0 = 0; c0 < R; c0 += 16) olat_chunk(rm, S, C, c0, pb, S2, H, ol, R);
            } else
#endif
            {
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
            }
#pragma omp for schedule(static)
            for (int64_t h = 0; h < H; h++)
                for (int64_t v = 0; v < V; v++) {
                    out[(m * H + h) * V + v] = f2bf(dot_bf_f(w_kvb + (h * (N + V) + N + v) * R, ol + h * R, R));
                }
        }
        if (w_o) { /* the output projection: y [B*T, Dm] = out [B*T, H*V] . W_o^T */
#pragma omp for schedule(static)
            for (int64_t d = 0; d < Dm; d++)
                for (int64_t m = 0; m < B * T; m++) {
                    const float o = rbf(dot(out + m * H * V, w_o + d * H * V, H * V));
                    y[m * Dm + d] = f2bf(resid ? bf2f(resid[m * Dm + d]) + o : o);
                }
        }
    }
}

static void rmsnorm_row(const bf16 *x, int64_t D, const bf16 *w, float eps, bf16 *y) {
    float ss = 0.f;
    for (int64_t d = 0; d < D; d++) ss += bf2f(x[d]) * bf2f(x[d]);
    const float inv = 1.f / sqrtf(ss / (float)D + eps);
    for (int64_t d = 0; d < D; d++) y[d] = f2bf(bf2f(w[d]) * rbf(bf2f(x[d]) * inv));
}

/* RMSNorm as norm.py: y = w * bf16(x / sqrt(mean(x^2) + eps)), statistics in fp32. x, y [M, D], w [D]. */
void ns_rmsnorm_bf16(const bf16 *x, int64_t M, int64_t D, const bf16 *w, float eps, bf16 *y) {
    for (int64_t m = 0; m < M; m++) rmsnorm_row(x + m * D, D, w, eps, y + m * D);
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

/* RoPE in DeepSeek's pair layout as rope.py `apply_rope_pairs`: pairs (2i, 2i + 1) of x[0, 2 half) rotated by
 * the angles cos, sin [half], in fp32, rounded once */
static void rope_row(const bf16 *x, int64_t half, const float *cos, const float *sin, bf16 *y) {
    for (int64_t i = 0; i < half; i++) {
        const float a = bf2f(x[2 * i]), b = bf2f(x[2 * i + 1]), c = cos[i], s = sin[i];
        y[2 * i] = f2bf(a * c + b * -s);
        y[2 * i + 1] = f2bf(b * c + a * s);
    }
}

/* MLA's projections of the hidden state x [M, D] (mla.py `_project` and `_latent`), one pass over each weight,
 * after the block's input RMSNorm when in_norm is given (xn [M, D] = the normed x, written for the caller):  xo = x . [W_qa | W_kva | W_ik]^T  ([M, Oq + R + P + Di]; W_ik: the DSA indexer key, Di may be 0);
 *   with q-LoRA (qa_norm != NULL):  cq = RMSNorm(xo[:, :Oq]),  q = cq . W_qb^T;  without:  q = xo[:, :Oq];
 *   q [M, H, N+P] with its last P dims of each head rotated; rows [M, R+P] = [RMSNorm(c_kv) ; rope(k_pe)].
 * With Di > 0 also the DSA indexer key (dsa.py `Indexer.key`): ik [M, Di] = rope_halves(LayerNorm(xo[:, -Di:]))
 * (LayerNorm in fp32, rounded once; the rotation of the first P dims in bf16 arithmetic, as PyTorch does it).
 * cos, sin [M, P/2]. cq is written only with q-LoRA. */
void ns_mla_project_bf16(const bf16 *x, int64_t M, int64_t D, const bf16 *wx, int64_t Oq, int64_t R, int64_t P,
                         int64_t Di, const bf16 *qa_norm, float eps_q, const bf16 *wqb, int64_t H, int64_t N,
                         const bf16 *kv_norm, float eps_kv, const bf16 *ik_w, const bf16 *ik_b, float ik_eps,
                         const float *cos, const float *sin, const bf16 *in_norm, float in_eps, bf16 *xn,
                         bf16 *xo, bf16 *cq, bf16 *q, bf16 *rows, bf16 *ik, int nt) {
    const int64_t Ow = Oq + R + P + Di, Q = H * (N + P), half = P / 2;
    const bf16 *xin = in_norm ? xn : x;
#pragma omp parallel num_threads(nt)
    {
        if (in_norm) { /* the block's input RMSNorm first: the projections read xn */
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) rmsnorm_row(x + m * D, D, in_norm, in_eps, xn + m * D);
        }
#pragma omp for schedule(static)
        for (int64_t o = 0; o < Ow; o++)
            for (int64_t m = 0; m < M; m++) xo[m * Ow + o] = f2bf(dot(xin + m * D, wx + o * D, D));
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const bf16 *xm = xo + m * Ow;
            if (qa_norm) rmsnorm_row(xm, Oq, qa_norm, eps_q, cq + m * Oq);
            else memcpy(q + m * Q, xm, Q * sizeof(bf16));
            rmsnorm_row(xm + Oq, R, kv_norm, eps_kv, rows + m * (R + P));
            rope_row(xm + Oq + R, half, cos + m * half, sin + m * half, rows + m * (R + P) + R);
            if (Di > 0) {
                const bf16 *k = xm + Oq + R + P;
                bf16 *km = ik + m * Di, tmp[1024];
                float mean = 0.f, var = 0.f;
                for (int64_t d = 0; d < Di; d++) mean += bf2f(k[d]);
                mean /= (float)Di;
                for (int64_t d = 0; d < Di; d++) var += (bf2f(k[d]) - mean) * (bf2f(k[d]) - mean);
                const float inv = 1.f / sqrtf(var / (float)Di + ik_eps);
                for (int64_t d = 0; d < Di; d++)
                    tmp[d] = f2bf((bf2f(k[d]) - mean) * inv * bf2f(ik_w[d]) + bf2f(ik_b[d]));
                memcpy(km, tmp, Di * sizeof(bf16));
                for (int64_t i = 0; i < half; i++) { /* halves: (i, i + P/2), each product and sum in bf16 */
                    const float c = rbf(cos[m * half + i]), sn = rbf(sin[m * half + i]);
                    const float a = bf2f(tmp[i]), b = bf2f(tmp[i + half]);
                    km[i] = f2bf(rbf(a * c) + rbf(b * -sn));
                    km[i + half] = f2bf(rbf(b * c) + rbf(a * sn));
                }
            }
        }
        if (qa_norm) {
#pragma omp for schedule(static)
            for (int64_t o = 0; o < Q; o++)
                for (int64_t m = 0; m < M; m++) q[m * Q + o] = f2bf(dot(cq + m * Oq, wqb + o * Oq, Oq));
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < M * H; t++) {
            bf16 *qh = q + t * (N + P) + N, tmp[512];
            const int64_t m = t / H;
            memcpy(tmp, qh, P * sizeof(bf16));
            rope_row(tmp, half, cos + m * half, sin + m * half, qh);
        }
    }
}

/* The feed-forward half of a decoder block for N tokens (transformer.py `Block`): out = h + FFN(RMSNorm(h)),
 * FFN = DeepSeekMoE (router + routed experts, plus the shared expert when s_gate_up is given) or, with E = 0,
 * the dense SwiGLU MLP passed as the shared one. Roundings as PyTorch: the norm, the routed and shared outputs,
 * their sum and the residual sum are bf16. Scratch: xn, r_out, s_out [N, D] bf16; act [N*K', I'] bf16 and
 * ys [N*K', D] fp32 with K' = max(K, 1), I' = max(I, Is); rs [N, 2E] fp32; gw [N, K] fp32; idx [N, K] int64. */
void ns_ffn_block_bf16(const bf16 *h, int64_t N, int64_t D, const bf16 *norm_w, float eps, const float *router_w32,
                       int64_t E, const float *bias, int scoring, int method, int64_t n_group, int64_t topk_group,
                       int64_t K, int norm, float scaling, const bf16 *gate_up, const bf16 *down, int64_t I,
                       const bf16 *s_gate_up, const bf16 *s_down, int64_t Is, bf16 *out, bf16 *xn, bf16 *r_out,
                       bf16 *s_out, bf16 *act, float *ys, float *rs, float *gw, int64_t *idx, int nt) {
    ns_rmsnorm_bf16(h, N, D, norm_w, eps, xn);
    if (E > 0) {
        ns_router(xn, N, D, router_w32, E, bias, scoring, method, n_group, topk_group, K, norm, scaling, gw, idx,
                  rs, nt);
        ns_moe_bf16(xn, N, D, idx, gw, K, gate_up, down, I, r_out, act, ys, nt);
    }
    if (s_gate_up) { /* one expert of weight 1: the same roundings as a plain SwiGLU MLP */
        float one[N];
        int64_t zero[N];
        for (int64_t n = 0; n < N; n++) one[n] = 1.f, zero[n] = 0;
        ns_moe_bf16(xn, N, D, zero, one, 1, s_gate_up, s_down, Is, s_out, act, ys, nt);
    }
    for (int64_t t = 0; t < N * D; t++) {
        float f;
        if (E > 0 && s_gate_up) f = rbf(bf2f(r_out[t]) + bf2f(s_out[t]));
        else f = bf2f(E > 0 ? r_out[t] : s_out[t]);
        out[t] = f2bf(bf2f(h[t]) + f);
    }
}

/* The decoder blocks of a decode step in one call (decode_plan.py): per block, the projections, the cache write,
 * absorbed attention with o_proj and the residual, and the feed-forward half, exactly the calls the blocks make
 * one by one. The cache is a pool of rows per layer: kv_pool [L, slots, C] and ik_pool [L, slots, Di]; the new
 * rows go to write_slots [M]; a query reads its request's S rows at read_slots [B, S], or, with read_slots
 * NULL (one request), the contiguous rows from slot span0. kv [B, S, C] (or [M, topk, C]) is scratch for
 * gathered rows. A DSA block whose queries see more than its top-k rows selects them first
 * (ns_dsa_select_bf16).
 * x_in [M, D] is the blocks' input; h [M, D] holds the stream after attention and out [M, D] after each block
 * (the result). idx [L, M, K'] receives each MoE block's expert ids. */
typedef struct {
    int64_t layer;                                               /* its plane in the cache pools */
    const bf16 *wx; int64_t q_out, R, P, Di; const bf16 *qa_norm; float qa_eps; const bf16 *wqb; int64_t H, N;
    const bf16 *kv_norm; float kv_eps; const bf16 *ik_w, *ik_b; float ik_eps; const bf16 *in_norm; float in_eps;
    int64_t Nk; const bf16 *kv_b; int64_t V; float scale; const bf16 *w_o; int64_t Dm;
    const bf16 *post_w; float post_eps; const float *router_w32; int64_t E; const float *bias; int scoring, method;
    int64_t n_group, topk_group, K; int norm; float scaling; const bf16 *gate_up, *down; int64_t I;
    const bf16 *s_gate_up, *s_down; int64_t Is, Kp;
    const bf16 *iwq, *iwp; int64_t Hi, topk;                     /* DSA indexer: wq_b, weights_proj; topk 0: none */
} ns_block;

static int cmp_i64(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* ord[0:K] = the positions of the K largest of v[0:S] (unordered, ties broken arbitrarily). Quickselect with a
 * three-way partition, so that runs of equal values (-inf: masked rows) stay linear.
 * Invariant: v at ord[0:lo] >= v at ord[lo:hi] >= v at ord[hi:S]. */
static void topk_positions(const float *v, int64_t S, int64_t K, int64_t *ord) {
    for (int64_t i = 0; i < S; i++) ord[i] = i;
    int64_t lo = 0, hi = S;
    while (hi - lo > 1) {
        const float p = v[ord[lo + (hi - lo) / 2]];
        int64_t lt = lo, i = lo, gt = hi, t;
        while (i < gt) { /* [lo, lt) > p, [lt, i) == p, [gt, hi) < p */
            const float x = v[ord[i]];
            if (x > p) { t = ord[lt]; ord[lt++] = ord[i]; ord[i++] = t; }
            else if (x < p) { t = ord[--gt]; ord[gt] = ord[i]; ord[i] = t; }
            else i++;
        }
        if (K <= lt) hi = lt;
        else if (K <= gt) return;
        else lo = gt;
    }
}

/* DSA selection for the M queries of a decode call (dsa.py `Indexer.scores` + `select`, in its bf16 roundings):
 *   iq[m, j] = rope_halves(wq_b cq[m])_j * Di^-1/2 (bf16),  iw[m, j] = bf16(weights_proj xn[m] * Hi^-1/2),
 *   score[m, s] = bf16(sum_j iw[m, j] relu(bf16(iq[m, j] . key[s])))  (-inf where mask[m, s] is 0),
 * then the top K rows of each query (ties at the K-th score to the earliest positions), in position order:
 * ord [M, S] (the first K of each row), sel_mask [M, K], and their latent rows gathered into sel [M, K, C].
 * Keys and rows are read through the slots (read_slots [B, S], or span0). */
void ns_dsa_select_bf16(const bf16 *iwq, const bf16 *iwp, int64_t Hi, int64_t Di, int64_t P, int64_t K,
                        int64_t B, int64_t T, int64_t D, int64_t Oq, int64_t S, int64_t C, const bf16 *cq,
                        const bf16 *xn, const float *cos, const float *sin, const uint8_t *mask, const bf16 *iplane,
                        const bf16 *plane, const int64_t *read_slots, int64_t span0, bf16 *iq, float *iw,
                        float *isc, int64_t *ord, uint8_t *sel_mask, bf16 *sel, int nt) {
    const int64_t M = B * T, half = P / 2;
    const float qscale = 1.f / sqrtf((float)Di), wscale = 1.f / sqrtf((float)Hi);
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < M * Hi * Di; o++) {
            const int64_t m = o / (Hi * Di), r = o % (Hi * Di);
            iq[o] = f2bf(dot(cq + m * Oq, iwq + r * Oq, Oq));
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < M * Hi; t++) {
            const int64_t m = t / Hi;
            bf16 *qh = iq + t * Di;
            for (int64_t i = 0; i < half; i++) { /* halves (i, i + P/2), each product and sum in bf16 */
                const float c = rbf(cos[m * half + i]), sn = rbf(sin[m * half + i]);
                const float a = bf2f(qh[i]), e = bf2f(qh[i + half]);
                qh[i] = f2bf(rbf(a * c) + rbf(e * -sn));
                qh[i + half] = f2bf(rbf(e * c) + rbf(a * sn));
            }
            for (int64_t d = 0; d < Di; d++) qh[d] = f2bf(bf2f(qh[d]) * qscale);
            iw[t] = rbf(dot(xn + m * D, iwp + (t % Hi) * D, D) * wscale);
        }
#ifdef NS_AVX512BF16
        if (Di % 2 == 0 && Di <= 1024) { /* 16 keys at a time, their dims transposed by pairs: no reductions */
            const int64_t nb = (S + 15) / 16, Dp = Di / 2;
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < M * nb; blk++) {
                const int64_t m = blk / nb, s0 = (blk % nb) * 16, n = S - s0 < 16 ? S - s0 : 16;
                const __mmask16 live = (__mmask16)((1u << n) - 1);
                int32_t off[16] = {0};
                for (int64_t r = 0; r < n; r++)
                    off[r] = (int32_t)((read_slots ? read_slots[(m / T) * S + s0 + r] : span0 + s0 + r) * Dp);
                const __m512i vo = _mm512_loadu_si512(off);
                __m512i kt[512]; /* kt[j] lane r = dims (2j, 2j+1) of key s0 + r */
                for (int64_t j = 0; j < Dp; j++)
                    kt[j] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live,
                                                         _mm512_add_epi32(vo, _mm512_set1_epi32((int)j)), iplane, 4);
                __m512 acc = _mm512_setzero_ps();
                for (int64_t h = 0; h < Hi; h++) {
                    const uint32_t *qh = (const uint32_t *)(iq + (m * Hi + h) * Di);
                    __m512 a = _mm512_setzero_ps();
                    for (int64_t j = 0; j < Dp; j++)
                        a = _mm512_dpbf16_ps(a, (__m512bh)kt[j], (__m512bh)_mm512_set1_epi32((int)qh[j]));
                    const __m512 l = _mm512_max_ps(_mm512_cvtpbh_ps(_mm512_cvtneps_pbh(a)), _mm512_setzero_ps());
                    acc = _mm512_fmadd_ps(l, _mm512_set1_ps(iw[m * Hi + h]), acc); /* l * w is exact in fp32 */
                }
                float out[16];
                _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(acc));
                const bf16 *ob = (const bf16 *)out;
                for (int64_t r = 0; r < n; r++)
                    isc[m * S + s0 + r] = mask[m * S + s0 + r] ? bf2f(ob[r]) : -INFINITY;
            }
        } else
#endif
        {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * S; i++) {
                const int64_t m = i / S, s = i % S;
                if (!mask[i]) { isc[i] = -INFINITY; continue; }
                const int64_t slot = read_slots ? read_slots[(m / T) * S + s] : span0 + s;
                const bf16 *key = iplane + slot * Di;
                float acc = 0.f;
                for (int64_t j = 0; j < Hi; j++) {
                    const float l = rbf(dot(key, iq + (m * Hi + j) * Di, Di));
                    if (l > 0.f) acc += l * iw[m * Hi + j];
                }
                isc[i] = rbf(acc);
            }
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            int64_t *om = ord + m * S;
            const float *v = isc + m * S;
            topk_positions(v, S, K, om);
            /* ties at the K-th score go to the earliest positions, and the K rows are read in position order: the
             * selection is then a function of the scores alone (not of the quickselect's path), and a query that
             * sees at most K rows reads them as the dense path does, followed by masked ones */
            float thr = INFINITY;
            for (int64_t j = 0; j < K; j++) thr = fminf(thr, v[om[j]]);
            int64_t n = 0;
            for (int64_t j = 0; j < K; j++)
                if (v[om[j]] > thr) om[n++] = om[j];
            for (int64_t s = 0; s < S && n < K; s++)
                if (v[s] == thr) om[n++] = s;
            qsort(om, K, sizeof(int64_t), cmp_i64);
            for (int64_t j = 0; j < K; j++) {
                const int64_t s = om[j], slot = read_slots ? read_slots[(m / T) * S + s] : span0 + s;
                sel_mask[m * K + j] = mask[m * S + s];
                memcpy(sel + (m * K + j) * C, plane + slot * C, C * sizeof(bf16));
            }
        }
    }
}

void ns_decode_stack_bf16(const ns_block *blocks, int64_t n_blocks, const bf16 *x_in, int64_t B, int64_t T,
                          int64_t D, const float *cos, const float *sin, const uint8_t *mask, int64_t S,
                          bf16 *kv_pool, bf16 *ik_pool, int64_t n_slots, const int64_t *write_slots,
                          const int64_t *read_slots, int64_t span0, bf16 *kv, bf16 *rows, bf16 *ik, bf16 *xn,
                          bf16 *xo, bf16 *cq, bf16 *q, bf16 *att, bf16 *qc, float *sc, float *ol, bf16 *pb,
                          bf16 *fxn, bf16 *r_out, bf16 *s_out, bf16 *act, float *ys, float *rs, float *gw,
                          bf16 *iq, float *iw, float *isc, int64_t *ord, uint8_t *sel_mask, bf16 *h, bf16 *out,
                          int64_t *idx, int nt) {
    const int64_t M = B * T;
    const bf16 *x = x_in;
    for (int64_t l = 0; l < n_blocks; l++) {
        const ns_block *b = &blocks[l];
        const int64_t C = b->R + b->P;
        ns_mla_project_bf16(x, M, D, b->wx, b->q_out, b->R, b->P, b->Di, b->qa_norm, b->qa_eps, b->wqb, b->H, b->N,
                            b->kv_norm, b->kv_eps, b->ik_w, b->ik_b, b->ik_eps, cos, sin, b->in_norm, b->in_eps,
                            xn, xo, b->qa_norm ? cq : NULL, q, rows, b->Di ? ik : NULL, nt);
        bf16 *plane = kv_pool + b->layer * n_slots * C;
        for (int64_t m = 0; m < M; m++) memcpy(plane + write_slots[m] * C, rows + m * C, C * sizeof(bf16));
        if (b->Di) {
            bf16 *iplane = ik_pool + b->layer * n_slots * b->Di;
            for (int64_t m = 0; m < M; m++)
                memcpy(iplane + write_slots[m] * b->Di, ik + m * b->Di, b->Di * sizeof(bf16));
        }
        if (b->topk > 0 && S > b->topk) { /* DSA: each query attends to its top-k rows only */
            ns_dsa_select_bf16(b->iwq, b->iwp, b->Hi, b->Di, b->P, b->topk, B, T, D, b->q_out, S, C, cq, xn, cos,
                               sin, mask, ik_pool + b->layer * n_slots * b->Di, plane, read_slots, span0, iq, iw,
                               isc, ord, sel_mask, kv, nt);
            ns_mla_absorbed_bf16(q, B, T, b->H, b->Nk, b->P, b->kv_b, b->R, b->V, kv, b->topk, 1, sel_mask, b->scale,
                                 att, qc, sc, ol, pb, b->w_o, b->Dm, x, h, nt);
        } else {
            const bf16 *r = plane + span0 * C;
            if (read_slots) {
                for (int64_t i = 0; i < B * S; i++) memcpy(kv + i * C, plane + read_slots[i] * C, C * sizeof(bf16));
                r = kv;
            }
            ns_mla_absorbed_bf16(q, B, T, b->H, b->Nk, b->P, b->kv_b, b->R, b->V, r, S, 0, mask, b->scale, att, qc,
                                 sc, ol, pb, b->w_o, b->Dm, x, h, nt);
        }
        ns_ffn_block_bf16(h, M, D, b->post_w, b->post_eps, b->router_w32, b->E, b->bias, b->scoring, b->method,
                          b->n_group, b->topk_group, b->K, b->norm, b->scaling, b->gate_up, b->down, b->I,
                          b->s_gate_up, b->s_down, b->Is, out, fxn, r_out, s_out, act, ys, rs, gw,
                          idx + l * M * b->Kp, nt); /* Kp: the largest K of the blocks */
        x = out;
    }
}

int ns_has_avx512bf16(void) {
#ifdef NS_AVX512BF16
    return 1;
#else
    return 0;
#endif
}
