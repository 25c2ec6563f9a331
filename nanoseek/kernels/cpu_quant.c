/* Weight-only quantized matmuls on CPU (nanoseek/quant.py's formats, issue 15), built and loaded by cpu_quant.py:
 *   nq_int8   y[M, N] = x[M, K] @ (codes * scale)^T    codes int8 [N, K], scale bf16 [N] (symmetric per row)
 *   nq_int4   y[M, N] = x[M, K] @ (q * scale + min)^T  q uint8 [N, K/2] (two codes a byte, k = 2j in the low
 *             nibble), scale and min bf16 [N, K/G] (asymmetric per group of G input values)
 *   nq_int4_q8 nq_int4 on int8 activations (avx512 builds on CPUs with AVX512-VNNI, avx2 builds; nq_q8() says
 *             whether this library on this CPU has it)
 *   nq_experts the routed experts of a decode batch in one call (DeepSeekMoE, moe.py `Experts`):
 *             y[t] = sum_k w[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = idx[t, k], each projection int8
 *             or int4 as above
 * x and y are fp32 (bf = 0) or bf16 (bf = 1). The codes are read as stored and widened in registers: no
 * dequantized copy of W is ever written. Arithmetic is fp32 throughout (x widened once per call into a scratch
 * row, fp32 FMAs, y rounded once at the end to its dtype): the float path. It is the arithmetic of the reference
 * (dequantize, then a float matmul) up to the order of the fp32 sums and to where the scales are applied:
 * - int8: the row's scale multiplies the finished sum, sum_k x_k c_k * s (one rounding), where the reference
 *   multiplies each code first (W' = c * s rounded to x's dtype);
 * - int4: each group's codes are dequantized in registers, w = q * s + min (one FMA, in fp32, no rounding to
 *   x's dtype), then dotted with x.
 * Integer dot products over x quantized to int8 (llama.cpp's Q8 activations) serve int4 where the CPU has
 * AVX512-VNNI, and in the AVX2 build (nq_int4_q8; the int4 dot products are quant4.h's, shared with
 * cpu_decode.c); cpu_quant.py has the measurements (speed, added error) that decided it, and why int8 keeps the
 * float path.
 *
 * Decode reads each weight byte once per step, so the loops stream the codes: each widened weight vector serves
 * up to four rows of x (more rows are taken four at a time, re-reading the weight row from L1), threads split the
 * N output rows (OpenMP with the caller's thread count, as cpu_decode.c), and each step prefetches 2 KB ahead.
 * One source for every variant of isa.py over simd.h (AVX-512, AVX2 + FMA, NEON, and a scalar build for the C
 * self-test, tests/cpu_quant_selftest.c). Entry points return 0, -1 for arguments they refuse, -2 when out of
 * memory for their scratch, -3 (nq_int4_q8) where this library has no int8-activation path on this CPU.
 * Legend: M rows of x, K input values, N output rows, G group size.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "simd.h"


/* the variant this library was built for (isa.py's name) */
const char *nq_isa(void) { return NS_SIMD_NAME; }

#include "quant_dot.h" /* NQ_ROWS, NQ_AHEAD, dot_s8: shared with cpu_decode.c's quantized decode stack */

#include "quant4.h" /* nq_a4: int4 rows dotted with prepared activations; shared with cpu_decode.c */

/* x [M, K] (fp32 or bf16) as fp32 rows in a new buffer (NULL when out of memory) */
static float *widen(const void *x, int bf, int64_t M, int64_t K) {
    float *xf = malloc((size_t)(M * K > 0 ? M * K : 1) * sizeof(float));
    if (!xf) return NULL;
    for (int64_t t = 0; t < M * K; t++) xf[t] = bf ? bf2f(((const bf16 *)x)[t]) : ((const float *)x)[t];
    return xf;
}

/* x [M, K] (fp32 or bf16) prepared for int4 weights of group G (quant4.h) in a new buffer *buf (NULL when out of
 * memory) */
static nq_a4 *prepare(const void *x, int bf, int64_t M, int64_t K, int64_t G, int q8, nq_a4 *a, void **buf) {
    *buf = malloc((size_t)(nq_a4_bytes(M, K, G, q8) > 0 ? nq_a4_bytes(M, K, G, q8) : 1));
    if (!*buf) return NULL;
    nq_a4_carve(a, *buf, M, K, G, q8);
    for (int64_t m = 0; m < M; m++)
        nq_a4_row(a, m, bf ? (const void *)((const bf16 *)x + m * K) : (const void *)((const float *)x + m * K), bf);
    return a;
}

static inline void store(void *y, int bf, int64_t at, float v) {
    if (bf) ((bf16 *)y)[at] = f2bf(v);
    else ((float *)y)[at] = v;
}

int nq_int8(const void *x, int64_t M, int64_t K, const int8_t *codes, const bf16 *scale, int64_t N, void *y, int bf,
            int nt) {
    float *xf = widen(x, bf, M, K);
    if (!xf) return -2;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; n++) {
        const float s = bf2f(scale[n]);
        for (int64_t m = 0; m < M; m += NQ_ROWS) {
            const int r = M - m < NQ_ROWS ? (int)(M - m) : NQ_ROWS;
            const float *xr[NQ_ROWS];
            float o[NQ_ROWS] = {0}; /* (set by the dot for j < r: the compiler cannot tell) */
            for (int j = 0; j < r; j++) xr[j] = xf + (m + j) * K;
            switch (r) { /* a constant row count per call, so the accumulators stay in registers */
            case 4: dot_s8(xr, 4, codes + n * K, K, o); break;
            case 3: dot_s8(xr, 3, codes + n * K, K, o); break;
            case 2: dot_s8(xr, 2, codes + n * K, K, o); break;
            default: dot_s8(xr, 1, codes + n * K, K, o); break;
            }
            for (int j = 0; j < r; j++) store(y, bf, (m + j) * N + n, o[j] * s);
        }
    }
    free(xf);
    return 0;
}

/* y = x @ W'^T for int4 W' on the float path (q8 0) or on int8 activations (q8 1) */
static int int4(const void *x, int64_t M, int64_t K, const uint8_t *q, const bf16 *scale, const bf16 *mn, int64_t G,
                int64_t N, void *y, int bf, int q8, int nt) {
    nq_a4 a;
    void *buf;
    if (!prepare(x, bf, M, K, G, q8, &a, &buf)) return -2;
    const int64_t ng = K / G;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += NQ_ROWS) {
            const int64_t r = M - m < NQ_ROWS ? M - m : NQ_ROWS, rows[NQ_ROWS] = {m, m + 1, m + 2, m + 3};
            float o[NQ_ROWS];
            nq_a4_dots(&a, rows, r, q + n * (K / 2), scale + n * ng, mn + n * ng, o);
            for (int64_t j = 0; j < r; j++) store(y, bf, (m + j) * N + n, o[j]);
        }
    }
    free(buf);
    return 0;
}

/* -1 unless G is a multiple of 2 * NS_VW (every variant: G in 32, 64, 128) and K of G */
int nq_int4(const void *x, int64_t M, int64_t K, const uint8_t *q, const bf16 *scale, const bf16 *mn, int64_t G,
            int64_t N, void *y, int bf, int nt) {
    if (G <= 0 || G % (2 * NS_VW) || K % G) return -1;
    return int4(x, M, K, q, scale, mn, G, N, y, bf, 0, nt);
}

/* nq_int4 with int8 activations; -3 where this library has no such path on this CPU (nq_q8) */
int nq_int4_q8(const void *x, int64_t M, int64_t K, const uint8_t *q, const bf16 *scale, const bf16 *mn, int64_t G,
               int64_t N, void *y, int bf, int nt) {
    if (G <= 0 || G % 32 || K % G) return -1;
    if (!nq_a4_q8()) return -3;
    return int4(x, M, K, q, scale, mn, G, N, y, bf, 1, nt);
}

int nq_q8(void) { return nq_a4_q8(); }

/* one projection of the experts (quant.py QuantExperts): codes [E, R, C] (int8, G = 0) or [E, R, C/2] (int4),
 * scale [E, R] or [E, R, C/G], min [E, R, C/G] (int4) */
typedef struct {
    const void *codes;
    const bf16 *scale, *mn;
    int64_t G;
} proj;

/* row r of expert e of p (R rows of C values) dotted with row `row` of its activations: xf [.., C] fp32 (int8),
 * a (int4) */
static inline float proj_dot(const proj *p, int64_t e, int64_t R, int64_t C, int64_t r, const float *xf,
                             const nq_a4 *a, int64_t row) {
    float o[1] = {0};
    const int64_t n = e * R + r;
    if (p->G) {
        const int64_t ng = C / p->G;
        nq_a4_dots(a, &row, 1, (const uint8_t *)p->codes + n * (C / 2), p->scale + n * ng, p->mn + n * ng, o);
        return o[0];
    }
    const float *x = xf + row * C;
    dot_s8(&x, 1, (const int8_t *)p->codes + n * C, C, o);
    return o[0] * bf2f(p->scale[n]);
}

/* x [T, D] (fp32 or bf16: bf), idx [T, K] (int64, < E), w [T, K] fp32; gate_up [E, 2I, D] and down [E, D, I] as
 * `proj` (G_gu, G_dn: 0 for int8) -> y [T, D] in x's dtype. Every intermediate stays fp32 (the reference rounds
 * gate, up, their product and each expert's output to x's dtype). q8: int4 projections on int8 activations
 * (x, then the hidden rows) where nq_q8(), as nq_int4_q8. Returns -1 for an expert id out of range or a
 * group size that does not divide its width (as nq_int4), -2 out of memory. */
int nq_experts(const void *x, int64_t T, int64_t D, const int64_t *idx, const float *w, int64_t K, int64_t E,
               int64_t I, const void *gu_codes, const bf16 *gu_scale, const bf16 *gu_min, int64_t G_gu,
               const void *dn_codes, const bf16 *dn_scale, const bf16 *dn_min, int64_t G_dn, void *y, int bf,
               int q8, int nt) {
    for (int64_t t = 0; t < T * K; t++)
        if (idx[t] < 0 || idx[t] >= E) return -1;
    if ((G_gu && (G_gu % (2 * NS_VW) || D % G_gu)) || (G_dn && (G_dn % (2 * NS_VW) || I % G_dn))) return -1;
    q8 = q8 && nq_a4_q8();
    const proj gu = {gu_codes, gu_scale, gu_min, G_gu}, dn = {dn_codes, dn_scale, dn_min, G_dn};
    const int64_t P = T * K; /* (token, expert) pairs */
    float *g = malloc(sizeof(float) * (P * 2 * I > 0 ? P * 2 * I : 1)), *xf = NULL, *h = NULL;
    void *xbuf = NULL, *hbuf = NULL; /* int4 projections' prepared activations: x here, the hidden rows below */
    nq_a4 xa, ha;
    int rc = -2;
    if (!g) goto done;
    if (G_gu ? !prepare(x, bf, T, D, G_gu, q8, &xa, &xbuf) : !(xf = widen(x, bf, T, D))) goto done;
    /* gate and up of every pair: a task per (pair, output row), each reading its expert's row once */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t u = 0; u < P * 2 * I; u++) {
        const int64_t p = u / (2 * I), r = u % (2 * I);
        g[u] = proj_dot(&gu, idx[p], 2 * I, D, r, xf, &xa, p / K);
    }
    for (int64_t p = 0; p < P; p++) /* silu(gate) * up, in place over the gate half */
        for (int64_t i = 0; i < I; i++) {
            const float a = g[p * 2 * I + i];
            g[p * 2 * I + i] = a / (1.f + expf(-a)) * g[p * 2 * I + I + i];
        }
    for (int64_t p = 0; p < P; p++) /* packed to [P, I] rows */
        memmove(g + p * I, g + p * 2 * I, sizeof(float) * I);
    if (G_dn ? !prepare(g, 0, P, I, G_dn, q8, &ha, &hbuf) : !(h = widen(g, 0, P, I))) goto done;
    /* down and the gate-weighted sum: a task per (token, output row), over the token's K experts */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t u = 0; u < T * D; u++) {
        const int64_t t = u / D, d = u % D;
        float s = 0;
        for (int64_t k = 0; k < K; k++) {
            const int64_t p = t * K + k;
            s += w[p] * proj_dot(&dn, idx[p], D, I, d, h, &ha, p);
        }
        store(y, bf, u, s);
    }
    rc = 0;
done:
    free(g), free(xf), free(h), free(xbuf), free(hbuf);
    return rc;
}
