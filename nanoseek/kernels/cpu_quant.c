/* Weight-only quantized matmuls on CPU (nanoseek/quant.py's formats, issue 15), built and loaded by cpu_quant.py:
 *   nq_int8   y[M, N] = x[M, K] @ (codes * scale)^T    codes int8 [N, K], scale bf16 [N] (symmetric per row)
 *   nq_int4   y[M, N] = x[M, K] @ (q * scale + min)^T  q uint8 [N, K/2] (two codes a byte, k = 2j in the low
 *             nibble), scale and min bf16 [N, K/G] (asymmetric per group of G input values)
 *   nq_int4_q8 nq_int4 on int8 activations with AVX512-VNNI (avx512 builds; nq_vnni() says if this CPU has it)
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
 * AVX512-VNNI (nq_int4_q8, its section below); cpu_quant.py has the measurements (speed, added error) that decided
 * it, and why int8 keeps the float path.
 *
 * Decode reads each weight byte once per step, so the loops stream the codes: each widened weight vector serves
 * up to four rows of x (more rows are taken four at a time, re-reading the weight row from L1), threads split the
 * N output rows (OpenMP with the caller's thread count, as cpu_decode.c), and each step prefetches 2 KB ahead.
 * One source for every variant of isa.py over simd.h (AVX-512, AVX2 + FMA, NEON, and a scalar build for the C
 * self-test, tests/cpu_quant_selftest.c). Entry points return 0, -1 for arguments they refuse, -2 when out of
 * memory for their scratch, -3 (nq_int4_q8) where there is no VNNI.
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

/* out[j] = sum_k x[j][k] * (q[k] * scale[g] + mn[g]) for j < r, q packed two a byte, K a multiple of G and G of
 * 2 * NS_VW. x[j] is deinterleaved per block of 2 * NS_VW values (`widen`): the block's even k first, then its
 * odd k, the order in which a load of NS_VW bytes gives its low and high nibbles. */
static inline __attribute__((always_inline)) void dot_q4(const float *const *x, const int r, const uint8_t *q,
                                                          const bf16 *scale, const bf16 *mn, int64_t K, int64_t G,
                                                          float *out) {
    vf acc[NQ_ROWS][2];
    for (int j = 0; j < r; j++) acc[j][0] = acc[j][1] = vf_zero();
    for (int64_t g = 0; g < K / G; g++) {
        const vf s = vf_set1(bf2f(scale[g])), m = vf_set1(bf2f(mn[g]));
        const uint8_t *qg = q + g * G / 2;
        ns_prefetch(qg + NQ_AHEAD);
        for (int64_t b = 0; b < G; b += 2 * NS_VW) {
            vf lo, hi;
            vf_load_nibbles(qg + b / 2, &lo, &hi);
            lo = vf_fmadd(lo, s, m);
            hi = vf_fmadd(hi, s, m);
            const int64_t o = g * G + b;
            for (int j = 0; j < r; j++) {
                acc[j][0] = vf_fmadd(vf_loadu(x[j] + o), lo, acc[j][0]);
                acc[j][1] = vf_fmadd(vf_loadu(x[j] + o + NS_VW), hi, acc[j][1]);
            }
        }
    }
    for (int j = 0; j < r; j++) out[j] = vf_reduce_add(vf_add(acc[j][0], acc[j][1]));
}

/* x [M, K] (fp32 or bf16) as fp32 rows in a new buffer (NULL when out of memory); deint: in dot_q4's order */
static float *widen(const void *x, int bf, int64_t M, int64_t K, int deint) {
    float *xf = malloc((size_t)(M * K > 0 ? M * K : 1) * sizeof(float));
    if (!xf) return NULL;
    for (int64_t t = 0; t < M * K; t++) {
        int64_t d = t;
        if (deint) { /* position of x's value t in its block of 2 * NS_VW */
            const int64_t k = t % K, b = k % (2 * NS_VW);
            d = t - b + (b & 1) * NS_VW + b / 2;
        }
        xf[d] = bf ? bf2f(((const bf16 *)x)[t]) : ((const float *)x)[t];
    }
    return xf;
}

static inline void store(void *y, int bf, int64_t at, float v) {
    if (bf) ((bf16 *)y)[at] = f2bf(v);
    else ((float *)y)[at] = v;
}

int nq_int8(const void *x, int64_t M, int64_t K, const int8_t *codes, const bf16 *scale, int64_t N, void *y, int bf,
            int nt) {
    float *xf = widen(x, bf, M, K, 0);
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

/* -1 unless G is a multiple of 2 * NS_VW (every variant: G in 32, 64, 128) and K of G */
int nq_int4(const void *x, int64_t M, int64_t K, const uint8_t *q, const bf16 *scale, const bf16 *mn, int64_t G,
            int64_t N, void *y, int bf, int nt) {
    if (G <= 0 || G % (2 * NS_VW) || K % G) return -1;
    float *xf = widen(x, bf, M, K, 1);
    if (!xf) return -2;
    const int64_t ng = K / G;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qn = q + n * (K / 2);
        const bf16 *sn = scale + n * ng, *mnn = mn + n * ng;
        for (int64_t m = 0; m < M; m += NQ_ROWS) {
            const int r = M - m < NQ_ROWS ? (int)(M - m) : NQ_ROWS;
            const float *xr[NQ_ROWS];
            float o[NQ_ROWS] = {0}; /* (set by the dot for j < r: the compiler cannot tell) */
            for (int j = 0; j < r; j++) xr[j] = xf + (m + j) * K;
            switch (r) {
            case 4: dot_q4(xr, 4, qn, sn, mnn, K, G, o); break;
            case 3: dot_q4(xr, 3, qn, sn, mnn, K, G, o); break;
            case 2: dot_q4(xr, 2, qn, sn, mnn, K, G, o); break;
            default: dot_q4(xr, 1, qn, sn, mnn, K, G, o); break;
            }
            for (int j = 0; j < r; j++) store(y, bf, (m + j) * N + n, o[j]);
        }
    }
    free(xf);
    return 0;
}

/* one projection of the experts (quant.py QuantExperts): codes [E, R, C] (int8, G = 0) or [E, R, C/2] (int4),
 * scale [E, R] or [E, R, C/G], min [E, R, C/G] (int4) */
typedef struct {
    const void *codes;
    const bf16 *scale, *mn;
    int64_t G;
} proj;

/* ---- int4 with int8 activations and VNNI (AVX-512 builds, on CPUs with AVX512-VNNI, checked at run time) ----
 * llama.cpp's approach (Q4_1 weights times Q8 activations): each block of 32 values of a row of x is quantized to
 * int8 with its own scale (dx = max |x| / 127, round to nearest), and VPDPBUSD multiplies 64 unsigned 4-bit codes
 * by 64 signed int8 activations into 16 int32 sums per instruction; each lane's sum then takes its weight group's
 * scale times its block's dx in fp32, and the group mins multiply the sums of the quantized x over each group.
 * The error this adds is x's rounding (at most dx / 2 per value): measured and stated in cpu_quant.py. */
#if NS_VW == 16 && defined(__AVX512VL__) /* (its masked 256-bit loads: every avx512 build, x86-64-v4) */
#define NQ_VNNI 1
int nq_vnni(void) { return __builtin_cpu_supports("avx512vnni"); }

/* 128 values per chunk: byte j of a chunk's 64 code bytes holds k = 2j (low nibble) and 2j + 1 (high); x's int8
 * values are laid out to match, the chunk's even k first (64 bytes), then its odd k. Lane i of VPDPBUSD sums
 * bytes 4i..4i+3, k in [8i, 8i + 8): the 32-block i / 4 of the chunk. */
typedef struct {
    int8_t *xq;  /* [M][chunks][128] */
    float *dx;   /* [M][chunks][16]: each lane's block scale */
    float *xsum; /* [M][ng rounded up to 16]: sums of the quantized x (dx times codes) over each weight group */
} q8x;

/* x [M, K] as q8x (NULL when out of memory); K a multiple of 32 */
static q8x *q8_quantize(const void *x, int bf, int64_t M, int64_t K, int64_t G) {
    const int64_t chunks = (K + 127) / 128, ngp = (K / G + 15) / 16 * 16;
    q8x *a = malloc(sizeof(q8x));
    if (!a) return NULL;
    a->xq = aligned_alloc(64, (size_t)(M * chunks * 128 > 0 ? M * chunks * 128 : 64));
    a->dx = aligned_alloc(64, sizeof(float) * (size_t)(M * chunks * 16 > 0 ? M * chunks * 16 : 16));
    a->xsum = calloc((size_t)(M * ngp > 0 ? M * ngp : 1), sizeof(float));
    if (!a->xq || !a->dx || !a->xsum) {
        free(a->xq), free(a->dx), free(a->xsum), free(a);
        return NULL;
    }
    memset(a->xq, 0, (size_t)(M * chunks * 128));
    memset(a->dx, 0, sizeof(float) * (size_t)(M * chunks * 16));
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / 32; b++) { /* block b of 32 values */
            float v[32], amax = 0;
            for (int i = 0; i < 32; i++) {
                const int64_t t = m * K + b * 32 + i;
                v[i] = bf ? bf2f(((const bf16 *)x)[t]) : ((const float *)x)[t];
                if (fabsf(v[i]) > amax) amax = fabsf(v[i]);
            }
            const float d = amax / 127, inv = amax > 0 ? 127 / amax : 0;
            const int64_t c = b / 4, base = (m * chunks + c) * 128;
            for (int l = 0; l < 4; l++) a->dx[(m * chunks + c) * 16 + (b % 4) * 4 + l] = d;
            int32_t qsum = 0;
            for (int i = 0; i < 32; i++) { /* k = 32 (b % 4) + i within the chunk: even k first, then odd */
                const int kc = (int)(b % 4) * 32 + i;
                const int8_t qi = (int8_t)lrintf(v[i] * inv);
                a->xq[base + (kc & 1) * 64 + kc / 2] = qi;
                qsum += qi;
            }
            /* the mins multiply the sum of the quantized x (Q8_1's), not of x: then y is exactly W' times the
             * quantized x, and the error is W' (x^ - x); with the exact sum, the codes' part (W' - min, up to
             * twice |W'|) times x's rounding would no longer cancel against the mins' part (2-3x the error) */
            a->xsum[m * ngp + b * 32 / G] += d * (float)qsum;
        }
    return a;
}

static void q8_free(q8x *a) {
    if (a) free(a->xq), free(a->dx), free(a->xsum), free(a);
}

/* out[j] for rows j < r of a, weight row (q, scale, mn) */
static inline __attribute__((always_inline, target("avx512vnni"))) void dot_q4_q8(
    const q8x *a, const int64_t *rows, const int r, const uint8_t *q, const bf16 *scale, const bf16 *mn, int64_t K,
    int64_t G, float *out) {
    const int64_t chunks = (K + 127) / 128, ng = K / G, ngp = (ng + 15) / 16 * 16, per = 128 / G;
    /* lane i of the chunk's scale vector: group (i / 4) * 32 / G of the chunk */
    int32_t lanes[16];
    for (int i = 0; i < 16; i++) lanes[i] = (i / 4) * 32 / (int)G;
    const __m512i gidx = _mm512_loadu_si512(lanes);
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[NQ_ROWS];
    for (int j = 0; j < r; j++) acc[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t left = K - c * 128; /* values left in the row: a last chunk may be short */
        const __mmask64 mb = left >= 128 ? ~0ull : (1ull << (left / 2)) - 1;
        const __mmask16 ms = (__mmask16)((1u << (left >= 128 ? per : left / G)) - 1); /* its groups' scales */
        ns_prefetch(q + c * 64 + NQ_AHEAD);
        const __m512i b = _mm512_maskz_loadu_epi8(mb, q + c * 64);
        const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        const int64_t g0 = c * 128 / G; /* (G = 128: the chunk's one group) */
        const __m512 sg = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(ms, scale + g0)), 16));
        const __m512 sw = _mm512_permutexvar_ps(gidx, sg);
        for (int j = 0; j < r; j++) {
            const int8_t *xq = a->xq + (rows[j] * chunks + c) * 128;
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(xq));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_load_si512(xq + 64));
            const __m512 d = _mm512_load_ps(a->dx + (rows[j] * chunks + c) * 16);
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sw, d), acc[j]);
        }
    }
    for (int j = 0; j < r; j++) { /* + sum over groups of min * (the group's sum of x) */
        const float *xs = a->xsum + rows[j] * ngp;
        __m512 t = acc[j];
        int64_t g = 0;
        for (; g + 16 <= ng; g += 16) t = _mm512_fmadd_ps(vf_loadu_bf16(mn + g), _mm512_loadu_ps(xs + g), t);
        float o = _mm512_reduce_add_ps(t);
        for (; g < ng; g++) o += bf2f(mn[g]) * xs[g];
        out[j] = o;
    }
}

__attribute__((target("avx512vnni"))) static void int4_q8_rows(const q8x *a, int64_t M, int64_t K, const uint8_t *q,
                                                                 const bf16 *scale, const bf16 *mn, int64_t G,
                                                                 int64_t N, void *y, int bf, int nt) {
    const int64_t ng = K / G;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qn = q + n * (K / 2);
        const bf16 *sn = scale + n * ng, *mnn = mn + n * ng;
        for (int64_t m = 0; m < M; m += NQ_ROWS) {
            const int r = M - m < NQ_ROWS ? (int)(M - m) : NQ_ROWS;
            const int64_t rows[NQ_ROWS] = {m, m + 1, m + 2, m + 3};
            float o[NQ_ROWS] = {0};
            switch (r) {
            case 4: dot_q4_q8(a, rows, 4, qn, sn, mnn, K, G, o); break;
            case 3: dot_q4_q8(a, rows, 3, qn, sn, mnn, K, G, o); break;
            case 2: dot_q4_q8(a, rows, 2, qn, sn, mnn, K, G, o); break;
            default: dot_q4_q8(a, rows, 1, qn, sn, mnn, K, G, o); break;
            }
            for (int j = 0; j < r; j++) store(y, bf, (m + j) * N + n, o[j]);
        }
    }
}

/* row r of int4 expert e of p (R rows of C values) dotted with row `row` of a */
__attribute__((target("avx512vnni"), noinline)) static float proj_dot_q8(const proj *p, int64_t e, int64_t R,
                                                                          int64_t C, int64_t r, const q8x *a,
                                                                          int64_t row) {
    const int64_t ng = C / p->G, n = e * R + r;
    float o[1] = {0};
    dot_q4_q8(a, &row, 1, (const uint8_t *)p->codes + n * (C / 2), p->scale + n * ng, p->mn + n * ng, C, p->G, o);
    return o[0];
}

/* nq_int4 with int8 activations; -3 where this CPU has no AVX512-VNNI */
int nq_int4_q8(const void *x, int64_t M, int64_t K, const uint8_t *q, const bf16 *scale, const bf16 *mn, int64_t G,
               int64_t N, void *y, int bf, int nt) {
    if (G <= 0 || G % 32 || K % G) return -1;
    if (!nq_vnni()) return -3;
    q8x *a = q8_quantize(x, bf, M, K, G);
    if (!a) return -2;
    int4_q8_rows(a, M, K, q, scale, mn, G, N, y, bf, nt);
    q8_free(a);
    return 0;
}
#else
int nq_vnni(void) { return 0; }
int nq_int4_q8(const void *x, int64_t M, int64_t K, const uint8_t *q, const bf16 *scale, const bf16 *mn, int64_t G,
               int64_t N, void *y, int bf, int nt) {
    (void)x, (void)M, (void)K, (void)q, (void)scale, (void)mn, (void)G, (void)N, (void)y, (void)bf, (void)nt;
    return -3;
}
#endif


/* row r of expert e of p (input width C) dotted with x (deinterleaved for int4, `widen`) */
static inline float proj_dot(const proj *p, int64_t e, int64_t R, int64_t C, int64_t r, const float *x) {
    float o[1] = {0};
    if (p->G) {
        const int64_t ng = C / p->G, row = e * R + r;
        dot_q4(&x, 1, (const uint8_t *)p->codes + row * (C / 2), p->scale + row * ng, p->mn + row * ng, C, p->G, o);
        return o[0];
    }
    dot_s8(&x, 1, (const int8_t *)p->codes + (e * R + r) * C, C, o);
    return o[0] * bf2f(p->scale[e * R + r]);
}

/* x [T, D] (fp32 or bf16: bf), idx [T, K] (int64, < E), w [T, K] fp32; gate_up [E, 2I, D] and down [E, D, I] as
 * `proj` (G_gu, G_dn: 0 for int8) -> y [T, D] in x's dtype. Every intermediate stays fp32 (the reference rounds
 * gate, up, their product and each expert's output to x's dtype). q8: int4 projections on int8 activations
 * (x, then the hidden rows) where the CPU has VNNI, as nq_int4_q8. Returns -1 for an expert id out of range or a
 * group size that does not divide its width (as nq_int4), -2 out of memory. */
int nq_experts(const void *x, int64_t T, int64_t D, const int64_t *idx, const float *w, int64_t K, int64_t E,
               int64_t I, const void *gu_codes, const bf16 *gu_scale, const bf16 *gu_min, int64_t G_gu,
               const void *dn_codes, const bf16 *dn_scale, const bf16 *dn_min, int64_t G_dn, void *y, int bf,
               int q8, int nt) {
    for (int64_t t = 0; t < T * K; t++)
        if (idx[t] < 0 || idx[t] >= E) return -1;
    if ((G_gu && (G_gu % (2 * NS_VW) || D % G_gu)) || (G_dn && (G_dn % (2 * NS_VW) || I % G_dn))) return -1;
    const proj gu = {gu_codes, gu_scale, gu_min, G_gu}, dn = {dn_codes, dn_scale, dn_min, G_dn};
    const int64_t P = T * K; /* (token, expert) pairs */
    float *xf = widen(x, bf, T, D, G_gu != 0), *g = malloc(sizeof(float) * (P * 2 * I > 0 ? P * 2 * I : 1));
    float *h = NULL;
    int rc = -2;
#ifdef NQ_VNNI
    q8x *xa = NULL, *ha = NULL; /* int4 projections' int8 activations: x here, the hidden rows below */
    q8 = q8 && nq_vnni();
#else
    (void)q8;
#endif
    if (!xf || !g) goto done;
#ifdef NQ_VNNI
    xa = q8 && G_gu ? q8_quantize(x, bf, T, D, G_gu) : NULL;
    if (q8 && G_gu && !xa) goto done;
#endif
    /* gate and up of every pair: a task per (pair, output row), each reading its expert's row once */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t u = 0; u < P * 2 * I; u++) {
        const int64_t p = u / (2 * I), r = u % (2 * I);
#ifdef NQ_VNNI
        if (xa) {
            g[u] = proj_dot_q8(&gu, idx[p], 2 * I, D, r, xa, p / K);
            continue;
        }
#endif
        g[u] = proj_dot(&gu, idx[p], 2 * I, D, r, xf + (p / K) * D);
    }
    for (int64_t p = 0; p < P; p++) /* silu(gate) * up, in place over the gate half */
        for (int64_t i = 0; i < I; i++) {
            const float a = g[p * 2 * I + i];
            g[p * 2 * I + i] = a / (1.f + expf(-a)) * g[p * 2 * I + I + i];
        }
    for (int64_t p = 0; p < P; p++) /* packed to [P, I] rows (the activations' layout `widen` reads) */
        memmove(g + p * I, g + p * 2 * I, sizeof(float) * I);
    h = widen(g, 0, P, I, G_dn != 0);
    if (!h) goto done;
#ifdef NQ_VNNI
    ha = q8 && G_dn ? q8_quantize(g, 0, P, I, G_dn) : NULL;
    if (q8 && G_dn && !ha) goto done;
#endif
    /* down and the gate-weighted sum: a task per (token, output row), over the token's K experts */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t u = 0; u < T * D; u++) {
        const int64_t t = u / D, d = u % D;
        float s = 0;
        for (int64_t k = 0; k < K; k++) {
            const int64_t p = t * K + k;
#ifdef NQ_VNNI
            if (ha) {
                s += w[p] * proj_dot_q8(&dn, idx[p], D, I, d, ha, p);
                continue;
            }
#endif
            s += w[p] * proj_dot(&dn, idx[p], D, I, d, h + p * I);
        }
        store(y, bf, u, s);
    }
    rc = 0;
done:
#ifdef NQ_VNNI
    q8_free(xa), q8_free(ha);
#endif
    free(xf), free(g), free(h);
    return rc;
}
