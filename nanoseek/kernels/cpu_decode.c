/* Fused CPU kernels for decode steps (a few tokens per call), built and loaded by cpu_decode.py, once for bf16
 * models and once for float32 ones (-DNS_F32):
 *   ns_linear        matvec for a few rows, each weight row read once for all of them
 *   ns_rmsnorm       RMSNorm
 *   ns_mla_project   MLA's projections: q (q-LoRA, norm, RoPE), the cache row (norm, RoPE), the indexer's wk
 *   ns_mla_absorbed  absorbed MLA attention over the latent rows (all of them, or DSA's selected ones)
 *   ns_ffn_block     a block's feed-forward half: norm, router, routed + shared experts, residual
 *   ns_dsa_select    DSA's lightning indexer at decode: scores over the cached keys, top-k, their slots
 *   ns_decode_stack  all decoder blocks of a decode step, with the latent cache's writes and reads, the cache in
 *                    the model's dtype or in 8 bits (fp8 e4m3 / int8 with fp32 scales per group, kv_quant.py); for
 *                    a model quantized to int8 or int4 (nanoseek/quant.py) its matrices are codes with their scales,
 *                    read by cpu_quant.c's dot products (quant_dot.h, quant4.h; `ns_mat`, `mdots`)
 *   ns_kv8_write, ns_mla_absorbed8  the 8-bit cache's write and attention over it (ns_decode_stack's, exported
 *                    for the tests)
 *
 * At decode a token reads every activated weight once, so a step is bound by memory bandwidth plus the fixed
 * cost of each call; in PyTorch a layer is ~100 small ops (~5-25 us each, mostly overhead). Rounding follows the
 * PyTorch path of the model's dtype step by step (fp32 accumulation; in bf16, a rounding wherever PyTorch
 * rounds), so results match it up to the order of fp32 sums (tests/test_cpu_decode.py).
 *
 * Threads: OpenMP with the caller's thread count (libgomp is the one PyTorch already loaded). Compiled with
 * -ffp-contract=off so that the scalar loops round like PyTorch's separate multiplies and adds.
 * Vectors: one source for every variant of isa.py (AVX-512 BF16, AVX-512, AVX2, NEON with or without BF16, and a
 * scalar build for the C self-test, tests/kernels_selftest.c), over simd.h. The bf16 dot products run VDPBF16PS
 * where the CPU has it and two FMAs over the widened pairs elsewhere (simd.h `vf_dot2`). The bf16 build on AVX-512
 * BF16 keeps two kernels written for it (attention's o_lat over pairs of rows, the DSA indexer over 16 keys at a
 * time: NS_AVX512BF16); the other builds run their simd.h forms. ns_isa() names the variant; ns_abi() describes
 * the structs Python passes by pointer, which cpu_decode.py checks against its ctypes mirrors at load.
 * Legend: M rows of x, D input width, O output rows, N tokens, K experts per token, I expert width; wt is the
 * model's dtype (bf16 or float).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "simd.h"
#if !defined(NS_F32) && defined(NS_BF16_DOT) && defined(__AVX512BF16__)
#define NS_AVX512BF16 1 /* the bf16 build on AVX-512 BF16: its own o_lat and DSA indexer kernels */
#endif


static inline float rbf(float f) { return bf2f(f2bf(f)); } /* round through bf16 */

/* wt: the model's dtype. RW(x) marks where PyTorch's path rounds an intermediate to it: through bf16 in the bf16
 * build, nothing to round in the float32 one (everything else is computed in fp32 in both).
 * vw: NS_VWT values of wt loaded for one multiply-add step of the dot products, vw_madd(acc, a, b): lane i of acc
 * += the products of its values of a and b (fp32: one FMA; bf16: a pair, simd.h `vf_dot2`); vf_loadu_w: NS_VW
 * values of wt as fp32. */
#ifdef NS_F32
typedef float wt;
static inline float w2f(wt v) { return v; }
static inline wt f2w(float f) { return f; }
#define RW(x) (x)
typedef vf vw;
#define NS_VWT NS_VW
static inline vw vw_loadu(const wt *p) { return vf_loadu(p); }
static inline vf vw_madd(vf acc, vw a, vw b) { return vf_fmadd(a, b, acc); }
static inline vf vf_loadu_w(const wt *p) { return vf_loadu(p); }
#else
typedef bf16 wt;
#define w2f bf2f
#define f2w f2bf
#define RW rbf
typedef vbf2 vw;
#define NS_VWT (2 * NS_VW)
static inline vw vw_loadu(const wt *p) { return vbf2_loadu(p); }
static inline vf vw_madd(vf acc, vw a, vw b) { return vf_dot2(acc, a, b); }
static inline vf vf_loadu_w(const wt *p) { return vf_loadu_bf16(p); }
#endif
/* int8 weight rows (the quantized stack, see `mdots`): cpu_quant.c's dot products over rows of x in wt (dot_s8),
 * and in fp32 (dot_s8_f: the routed experts' activations of an int8 model) */
#define NQ_X wt
#define NQ_XLOAD vf_loadu_w
#define NQ_X2F w2f
#define NQ_DOT dot_s8
#include "quant_dot.h"
#define NQ_X float
#define NQ_XLOAD vf_loadu
#define NQ_X2F(v) (v)
#define NQ_DOT dot_s8_f
#include "quant_dot.h"
/* int4 weight rows (the quantized stack, see `mdots`): cpu_quant.c's dot products over prepared rows of x */
#include "quant4.h"
#ifdef NS_F32
#define NS_WT_BF 0 /* nq_a4_row's bf for rows of wt */
#else
#define NS_WT_BF 1
#endif

/* The dot products' loop: steps of two cache lines of b, each vector op of a step into accumulator (op %
 * NS_DOT_ACC), a prefetch 2 KB ahead per line (b streams weight rows one after another: asking 2 KB ahead keeps
 * more of memory's latency hidden than the hardware prefetcher alone; on AVX-512 the bf16 block stack ran 8-12%
 * faster, and 0.5 and 4 KB ahead were slower); then whole vector ops into the first accumulator, the accumulators'
 * sum reduced, and a scalar tail. The prefetch is non-temporal on x86 (ns_prefetch_nta): a token reads each weight
 * once, so its lines need not displace lines that are read again (activations, KV cache rows); batch-1 decode ran
 * faster with it on Zen 4 (the notes of issue 12). dot_k shares each load of b among up to four rows, so its
 * 4 x NS_DOT_ACC accumulators must stay in registers. AVX-512 and AVX2 keep one accumulator per line (on AVX-512
 * the arithmetic these kernels had before simd.h): on Zen 3 (AVX2, one thread, rows of 384 in L2) four rows ran
 * 1.2x (bf16) to 1.7x (fp32) faster than with four accumulators (four rows of them spill AVX2's 16 registers; two
 * rows per call read b twice), while one row alone ran ~15% slower (in cache only: rows streamed from memory are
 * bound by its bandwidth). NEON's narrower vectors take four accumulators: 4 x 4 of its 32 registers. */
#define NS_STEP (128 / (int64_t)sizeof(wt))
#define NS_AHEAD (2048 / (int64_t)sizeof(wt))
#define NS_OPS (NS_STEP / NS_VWT) /* vector ops per step */
#define NS_DOT_ACC (NS_VW >= 8 ? 2 : 4)

static inline float acc_sum(const vf *acc) {
    vf t = acc[0];
    for (int j = 1; j < NS_DOT_ACC; j++) t = vf_add(t, acc[j]);
    return vf_reduce_add(t);
}

/* sum_i a[i] * b[i] in fp32 */
static inline float dot(const wt *a, const wt *b, int64_t n) {
    int64_t i = 0;
    vf acc[NS_DOT_ACC];
    for (int j = 0; j < NS_DOT_ACC; j++) acc[j] = vf_zero();
    for (; i + NS_STEP <= n; i += NS_STEP) {
        ns_prefetch_nta(b + i + NS_AHEAD);
        ns_prefetch_nta(b + i + NS_AHEAD + NS_STEP / 2);
        for (int v = 0; v < NS_OPS; v++) {
            const int64_t o = i + v * NS_VWT;
            acc[v % NS_DOT_ACC] = vw_madd(acc[v % NS_DOT_ACC], vw_loadu(a + o), vw_loadu(b + o));
        }
    }
    for (; i + NS_VWT <= n; i += NS_VWT) acc[0] = vw_madd(acc[0], vw_loadu(a + i), vw_loadu(b + i));
    float s = acc_sum(acc);
    for (; i < n; i++) s += w2f(a[i]) * w2f(b[i]);
    return s;
}

/* sum_i a[i] * b[i], a wt, b fp32 */
static inline float dot_wf(const wt *a, const float *b, int64_t n) {
    int64_t i = 0;
    vf acc = vf_zero();
    for (; i + NS_VW <= n; i += NS_VW) acc = vf_fmadd(vf_loadu_w(a + i), vf_loadu(b + i), acc);
    float s = vf_reduce_add(acc);
    for (; i < n; i++) s += w2f(a[i]) * b[i];
    return s;
}

/* out[j] = dot(x[j], b, n) for j < k (k <= 4), the arithmetic of `dot` for each row, bit for bit (the
 * same accumulators over the same chunks, the same reduction and tail), so a row's result does not depend on how
 * many others share the call. Each load of b, and its prefetch, serves the k rows, where `dot` row by row
 * spent two loads per FMA: on AVX-512 a 16-request `small` decode step takes 6-9% less time (float32 and bf16,
 * the two versions alternated step by step in one process). Attention's scores keep `dot` per head: sharing the
 * row there made a 128-head V3.2 layer 16% slower at 2K-16K rows. */
static inline __attribute__((always_inline)) void dot_k(const wt *const *x, const int k, const wt *b, int64_t n,
                                                         float *out) {
    int64_t i = 0;
    vf acc[4][NS_DOT_ACC];
    for (int j = 0; j < k; j++)
        for (int u = 0; u < NS_DOT_ACC; u++) acc[j][u] = vf_zero();
    for (; i + NS_STEP <= n; i += NS_STEP) {
        ns_prefetch_nta(b + i + NS_AHEAD);
        ns_prefetch_nta(b + i + NS_AHEAD + NS_STEP / 2);
        for (int v = 0; v < NS_OPS; v++) {
            const vw bv = vw_loadu(b + i + v * NS_VWT);
            for (int j = 0; j < k; j++)
                acc[j][v % NS_DOT_ACC] = vw_madd(acc[j][v % NS_DOT_ACC], vw_loadu(x[j] + i + v * NS_VWT), bv);
        }
    }
    for (; i + NS_VWT <= n; i += NS_VWT) {
        const vw bv = vw_loadu(b + i);
        for (int j = 0; j < k; j++) acc[j][0] = vw_madd(acc[j][0], vw_loadu(x[j] + i), bv);
    }
    for (int j = 0; j < k; j++) {
        float s = acc_sum(acc[j]);
        for (int64_t t = i; t < n; t++) s += w2f(x[j][t]) * w2f(b[t]);
        out[j] = s;
    }
}

/* out[j] = dot(x[j], b, n) for j < nx, four rows at a time (see dot_k) */
static inline __attribute__((always_inline)) void dots(const wt *const *x, int64_t nx, const wt *b, int64_t n,
                                                        float *out) {
    if (nx == 1) { /* one row: `dot` itself */
        out[0] = dot(x[0], b, n);
        return;
    }
    int64_t j = 0;
    for (; j + 4 <= nx; j += 4) dot_k(x + j, 4, b, n, out + j);
    switch (nx - j) {
    case 3: dot_k(x + j, 3, b, n, out + j); break;
    case 2: dot_k(x + j, 2, b, n, out + j); break;
    case 1: out[j] = dot(x[j], b, n); break;
    }
}

/* x + m * ld for m < M: the row pointers `dots` takes */
static inline void row_ptrs(const wt *x, int64_t M, int64_t ld, const wt **xs) {
    for (int64_t m = 0; m < M; m++) xs[m] = x + m * ld;
}

/* A weight matrix of the kernels, W [O, D]: wt rows (s NULL), or a model quantized by quant.py: int8 codes [O, D]
 * with a bf16 scale per row (s set, mn NULL: W'[o] = codes[o] * s[o]), or int4 codes two a byte [O, D/2] with a
 * bf16 scale and min per group of G input values (s and mn [O, D/G]: W' = q * s + min). */
typedef struct {
    const void *w;
    const bf16 *s, *mn;
    int64_t G;
    int q8; /* int4: its products on int8 activations (quant4.h) */
} ns_mat;
static inline ns_mat mat_f(const wt *w) { return (ns_mat){w, NULL, NULL, 0, 0}; }

/* the address of row o of W (width D), and the bytes of n rows */
static inline const void *mrow(const ns_mat *W, int64_t o, int64_t D) {
    if (W->mn) return (const uint8_t *)W->w + o * (D / 2);
    return W->s ? (const void *)((const int8_t *)W->w + o * D) : (const void *)((const wt *)W->w + o * D);
}
static inline int64_t mbytes(const ns_mat *W, int64_t n, int64_t D) {
    return W->mn ? n * (D / 2) : W->s ? n * D : n * D * (int64_t)sizeof(wt);
}

/* W's rows from o on, as a matrix of its own (an expert of the experts' stacked weights) */
static inline ns_mat msub(const ns_mat *W, int64_t o, int64_t D) {
    const int64_t per = W->mn ? D / W->G : 1; /* scales per row */
    return (ns_mat){mrow(W, o, D), W->s ? W->s + o * per : NULL, W->mn ? W->mn + o * per : NULL, W->G, W->q8};
}

/* Whether W's products read their activations prepared (quant4.h's nq_a4, once per matmul): int4 always; int8 in
 * the bf16 build (the rows widened to fp32 once, not once per weight row: the same values, as cpu_quant.c's nq_int8
 * widens them; the int8 dot products then take fewer instructions per weight) */
static inline int mprep(const ns_mat *W) { return W->mn || (NS_WT_BF && W->s); }

/* a laid out in buf for M rows of width K as W's products read them (mprep) */
static inline void mcarve(nq_a4 *a, void *buf, const ns_mat *W, int64_t M, int64_t K) {
    nq_a4_carve(a, buf, M, K, W->mn ? W->G : 0, W->mn ? W->q8 : 0);
}
static inline int64_t mprep_bytes(const ns_mat *W, int64_t M, int64_t K) {
    return mprep(W) ? nq_a4_bytes(M, K, W->mn ? W->G : 0, W->mn ? W->q8 : 0) : 0;
}

/* out[j] = (int8 row o of (w, s), width D) . x[j] for j < nx through `dot` (dot_s8, dot_s8_f): its sum times the
 * row's scale, four rows of x per pass, as cpu_quant.c's nq_int8 (the same arithmetic: a row's result equals
 * nq_int8's on x widened to fp32, which is exact) */
#define NS_QDOTS(dot, x, nx, w, s, o, D, out)                                                                      \
    do {                                                                                                           \
        const int8_t *c_ = (const int8_t *)(w) + (o) * (D);                                                        \
        for (int64_t j_ = 0; j_ < (nx); j_ += NQ_ROWS) {                                                           \
            switch ((nx) - j_ < NQ_ROWS ? (nx) - j_ : NQ_ROWS) { /* a constant row count per call: registers */    \
            case 4: dot((x) + j_, 4, c_, D, (out) + j_); break;                                                    \
            case 3: dot((x) + j_, 3, c_, D, (out) + j_); break;                                                    \
            case 2: dot((x) + j_, 2, c_, D, (out) + j_); break;                                                    \
            default: dot((x) + j_, 1, c_, D, (out) + j_); break;                                                   \
            }                                                                                                      \
        }                                                                                                          \
        const float sc_ = bf2f((s)[o]);                                                                            \
        for (int64_t j_ = 0; j_ < (nx); j_++) (out)[j_] *= sc_;                                                   \
    } while (0)

/* out[j] = row o of W . x[j] for j < nx: `dots` for wt rows, NS_QDOTS for int8 ones; where mprep(W), the same rows
 * prepared in a (quant4.h), x[j] being row ar[j] of a (cpu_quant.c's nq_int8 / nq_int4 / nq_int4_q8 arithmetic) */
static inline __attribute__((always_inline)) void mdots(const wt *const *x, const nq_a4 *a, const int64_t *ar,
                                                         int64_t nx, const ns_mat *W, int64_t o, int64_t D,
                                                         float *out) {
    if (W->mn) {
        const int64_t ng = D / W->G;
        nq_a4_dots(a, ar, nx, (const uint8_t *)W->w + o * (D / 2), W->s + o * ng, W->mn + o * ng, out);
    } else if (W->s && NS_WT_BF) {
        const float *xf[nx];
        for (int64_t j = 0; j < nx; j++) xf[j] = a->xf + ar[j] * D;
        NS_QDOTS(dot_s8_f, xf, nx, W->w, W->s, o, D, out);
    } else if (W->s) NS_QDOTS(dot_s8, x, nx, W->w, W->s, o, D, out);
    else dots(x, nx, (const wt *)W->w + o * D, D, out);
}

/* ar[m] = m for m < M: the rows of an nq_a4 in order (`mdots`) */
static inline void row_ids(int64_t M, int64_t *ar) {
    for (int64_t m = 0; m < M; m++) ar[m] = m;
}

/* y[M, O] = x[M, D] @ W[O, D]^T, wt in and out. Each weight row is read once for all M rows. a4buf: where
 * mprep(&W), scratch of mprep_bytes(&W, M, D). */
static void linear_m(const wt *x, int64_t M, int64_t D, const ns_mat W, int64_t O, wt *y, void *a4buf, int nt) {
    if (M <= 0) return;
    const wt *xs[M];
    int64_t ar[M];
    row_ptrs(x, M, D, xs);
    row_ids(M, ar);
    nq_a4 a;
    if (mprep(&W)) {
        mcarve(&a, a4buf, &W, M, D);
        for (int64_t m = 0; m < M; m++) nq_a4_row(&a, m, x + m * D, NS_WT_BF);
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t o = 0; o < O; o++) {
        float r[M];
        mdots(xs, &a, ar, M, &W, o, D, r);
        for (int64_t m = 0; m < M; m++) y[m * O + o] = f2w(r[m]);
    }
}

/* y[M, O] = x[M, D] @ W[O, D]^T, wt in and out */
void ns_linear(const wt *x, int64_t M, int64_t D, const wt *W, int64_t O, wt *y, int nt) {
    linear_m(x, M, D, mat_f(W), O, y, NULL, nt);
}

#define NS_CHUNK 16
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

/* [lo, hi) = part t of n of [0, total), split as evenly as `omp for schedule(static)` would */
static inline void part(int64_t total, int t, int n, int64_t *lo, int64_t *hi) {
    const int64_t q = total / n, r = total % n;
    *lo = t * q + (t < r ? t : r);
    *hi = *lo + q + (t < r);
}

/* Software prefetch of a byte range, a few lines at a time: issued between the arithmetic of a compute-bound
 * phase, it brings in the weights of the next phase instead of leaving the memory idle meanwhile */
#define NS_PF_MAX (256 << 10) /* bytes per thread and phase: well within a core's L2 */
typedef struct { const char *p[2], *end[2]; int64_t step; } ns_pf; /* two ranges, in order; lines per call */
static inline void pf_next(ns_pf *c) {
    for (int64_t i = 0; i < c->step; i++) {
        const int r = c->p[0] < c->end[0] ? 0 : 1;
        if (c->p[r] >= c->end[r]) return;
        __builtin_prefetch(c->p[r], 0, 2);
        c->p[r] += 64;
    }
}
static ns_pf pf_make(const void *a, int64_t na, const void *b, int64_t nb, int64_t calls) {
    if (na > NS_PF_MAX) na = NS_PF_MAX;
    if (nb > NS_PF_MAX - na) nb = NS_PF_MAX - na;
    const int64_t lines = (na + nb + 63) / 64;
    ns_pf c = {{(const char *)a, (const char *)b}, {(const char *)a + na, (const char *)b + nb},
               calls > 0 ? (lines + calls - 1) / calls : 0};
    return c;
}

/* Row s of a query's latent rows: rows[s], or rows[ri[s]] through the cache slots ri (no gathered copy) */
static inline const wt *row_at(const wt *rows, const int64_t *ri, int64_t s, int64_t C) {
    return rows + (ri ? ri[s] : s) * C;
}

/* An 8-bit cache plane (kv_quant.py `RowStore` with a format): per row, C bytes (fp8 e4m3 or int8 values) and
 * ns fp32 scales; columns [0, R) (c_kv, or the whole indexer key) in groups of g0 columns, [R, C) (k_pe) in
 * groups of g1, one scale each. lut: the 256 byte values as fp32. Reads give each value as the dequantize-on-read
 * path does, wt(value * scale) (kv_quant.py `KVFormat.dequantize` into the model's dtype), computed in registers
 * or a row's worth of stack: no dequantized copy of the cache is made. */
#define NS_KV8_MAXC 1536 /* the widest row read: R <= 1024 plus P <= 512 (or an index key <= 1024), the
                           * bounds modules.py `_decode_build` keeps the kernels to */
enum { NS_KV_PLAIN = 0, NS_KV_FP8 = 1, NS_KV_INT8 = 2 };
typedef struct { const uint8_t *q; const float *s; const float *lut; int64_t C, ns, R, g0, g1; int int8; } ns_kv8;

/* out[0, n) = the dequantized columns [c0, c0 + n) of row r, as wt: exactly the rows the dequantize-on-read path
 * gives, so that the dot products over them are the plain cache's (`dot`, VDPBF16PS where the CPU has it) */
static inline void kv8_cols(const ns_kv8 *k, int64_t r, int64_t c0, int64_t n, wt *out) {
    const uint8_t *q = k->q + r * k->C;
    const float *s = k->s + r * k->ns;
    for (int64_t c = c0; c < c0 + n;) { /* one group at a time */
        const int64_t g = c < k->R ? c / k->g0 : k->R / k->g0 + (c - k->R) / k->g1;
        const int64_t end = imin(c0 + n, c < k->R ? imin((c / k->g0 + 1) * k->g0, k->R)
                                                  : k->R + ((c - k->R) / k->g1 + 1) * k->g1);
        const float sc = s[g];
        if (k->int8)
            for (; c < end; c++) out[c - c0] = f2w((float)(int8_t)q[c] * sc);
        else
            for (; c < end; c++) out[c - c0] = f2w(k->lut[q[c]] * sc);
    }
}

/* the 256 byte values of a format as fp32: e4m3fn (bias 7, subnormals of 2^-9, 0x7f/0xff NaN) or int8 */
static void kv8_lut(int fmt, float *lut) {
    for (int b = 0; b < 256; b++) {
        if (fmt == NS_KV_INT8) { lut[b] = (float)(int8_t)b; continue; }
        const int e = (b >> 3) & 15, m = b & 7;
        const float a = (e == 15 && m == 7) ? NAN : e == 0 ? ldexpf((float)m, -9) : ldexpf(1.f + m / 8.f, e - 7);
        lut[b] = b & 0x80 ? -a : a;
    }
}

/* fp32 -> e4m3fn, to nearest even, as PyTorch's cast (past 448 + half an ulp: NaN; the caller's values are
 * scaled to at most 448 up to an fp32 ulp, which rounds to 448) */
static inline uint8_t f2e4m3(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    u &= 0x7fffffffu;
    float a;
    memcpy(&a, &u, 4);
    if (a < 0.015625f) return sign | (uint8_t)nearbyintf(a * 512.f); /* below 2^-6: steps of 2^-9 (8: 2^-6) */
    u += 0x7ffffu + ((u >> 20) & 1); /* the mantissa to 3 bits, ties to even */
    const uint32_t e = (u >> 20) - ((127 - 7) << 3);
    return sign | (uint8_t)(e > 0x7e ? 0x7f : e);
}

/* one part of a row into 8 bits, as `KVFormat.quantize`: per group of g values, scale = max(amax, FLT_MIN) / qmax
 * (448 for e4m3, 127 for int8), values x / scale, rounded to nearest even (int8: to an integer) */
static void kv8_quantize(const wt *x, int64_t n, int64_t g, int fmt, uint8_t *q, float *s) {
    const float qmax = fmt == NS_KV_FP8 ? 448.f : 127.f;
    for (int64_t a = 0; a < n; a += g) {
        float amax = 0.f;
        for (int64_t i = a; i < a + g; i++) { /* (not fmaxf: GCC 12's vectorizer fails on it for NEON BF16) */
            const float v = fabsf(w2f(x[i]));
            amax = v > amax ? v : amax;
        }
        const float sc = fmaxf(amax, 1.17549435e-38f) / qmax;
        s[a / g] = sc;
        for (int64_t i = a; i < a + g; i++) {
            const float y = w2f(x[i]) / sc;
            q[i] = fmt == NS_KV_FP8 ? f2e4m3(y) : (uint8_t)(int8_t)nearbyintf(y);
        }
    }
}

/* The phases of absorbed attention for one query, each over a range of heads [h0, h1) (and of rows or columns
 * where noted), so that a thread can run them for its own heads without waiting for the others. */
static void att_qlat(const wt *qm, const wt *w_kvb, int64_t N, int64_t P, int64_t V, int64_t R, int64_t h0,
                     int64_t h1, wt *qc) { /* qc[h] = [wt(q_nope W_UK) ; q_pe], the W_UK product in fp32 */
    const int64_t C = R + P;
    for (int64_t h = h0; h < h1; h++) {
        const wt *qh = qm + h * (N + P);
        float lat[1024];
        for (int64_t r = 0; r < R; r++) lat[r] = 0.f;
        for (int64_t n = 0; n < N; n++) {
            const float qn = w2f(qh[n]);
            const wt *w = w_kvb + (h * (N + V) + n) * R;
            for (int64_t r = 0; r < R; r++) lat[r] += qn * w2f(w[r]);
        }
        for (int64_t r = 0; r < R; r++) qc[h * C + r] = f2w(lat[r]);
        for (int64_t j = 0; j < P; j++) qc[h * C + R + j] = qh[N + j];
    }
}

static void att_scores(const wt *qc, const wt *rm, const ns_kv8 *k8, const int64_t *ri, const uint8_t *mk,
                       int64_t S, int64_t C, float scale, int64_t h0, int64_t h1, int64_t s0, int64_t s1, float *sc,
                       ns_pf *pf) { /* rows [s0, s1); k8: an 8-bit plane instead of rm */
    if (k8) { /* each visible row dequantized once into the stack, then read by every head */
        wt row[NS_KV8_MAXC];
        for (int64_t s = s0; s < s1; s++) {
            pf_next(pf);
            if (!mk[s]) {
                for (int64_t h = h0; h < h1; h++) sc[h * S + s] = -INFINITY;
                continue;
            }
            kv8_cols(k8, ri ? ri[s] : s, 0, C, row);
            for (int64_t h = h0; h < h1; h++) sc[h * S + s] = RW(dot(qc + h * C, row, C)) * scale;
        }
        return;
    }
    for (int64_t s = s0; s < s1; s++) {
        const wt *row = row_at(rm, ri, s, C);
        pf_next(pf);
        for (int64_t h = h0; h < h1; h++) sc[h * S + s] = mk[s] ? RW(dot(qc + h * C, row, C)) * scale : -INFINITY;
    }
}

/* softmax over the mask, probabilities rounded to wt values; with pb, also as wt padded to S2 */
static void att_softmax(float *sc, const uint8_t *mk, int64_t S, int64_t h0, int64_t h1, wt *pb, int64_t S2) {
    for (int64_t h = h0; h < h1; h++) {
        float *x = sc + h * S, mx = -INFINITY, sum = 0.f;
        for (int64_t s = 0; s < S; s++) mx = x[s] > mx ? x[s] : mx;
        for (int64_t s = 0; s < S; s++) {
            x[s] = mk[s] ? expf(x[s] - mx) : 0.f;
            sum += x[s];
        }
        for (int64_t s = 0; s < S; s++) x[s] = RW(x[s] / sum);
        if (pb)
            for (int64_t s = 0; s < S2; s++) pb[h * S2 + s] = s < S ? f2w(x[s]) : 0;
    }
}

/* ol[h, c0:c1] = wt(p[h] . rows[:, c0:c1]) for heads [h0, h1), columns [c0, c1) (multiples of NS_CHUNK) */
static void att_olat(const wt *rm, const ns_kv8 *k8, const int64_t *ri, const uint8_t *mk, int64_t S, int64_t C,
                     const float *sc, const wt *pb, int64_t S2, int64_t R, int64_t h0, int64_t h1, int64_t c0,
                     int64_t c1, float *ol, ns_pf *pf) {
    if (k8) { /* NS_CHUNK columns of each visible row dequantized once for a block of 8 heads */
        for (int64_t c = c0; c < c1; c += NS_CHUNK) {
            const int64_t nc = imin(NS_CHUNK, c1 - c);
            for (int64_t hb = h0; hb < h1; hb += 8) {
                const int64_t nb = imin(8, h1 - hb);
                float acc[8][NS_CHUNK] = {{0.f}};
                wt r[NS_CHUNK];
                for (int64_t s = 0; s < S; s++) {
                    if (s % 2 == 0) pf_next(pf);
                    if (!mk[s]) continue; /* p = 0 */
                    kv8_cols(k8, ri ? ri[s] : s, c, nc, r);
                    for (int64_t j = 0; j < nb; j++) {
                        const float p = sc[(hb + j) * S + s];
                        for (int64_t i = 0; i < nc; i++) acc[j][i] += p * w2f(r[i]);
                    }
                }
                for (int64_t j = 0; j < nb; j++)
                    for (int64_t i = 0; i < nc; i++) ol[(hb + j) * R + c + i] = RW(acc[j][i]);
            }
        }
        return;
    }
#ifdef NS_AVX512BF16
    if (pb) { /* VDPBF16PS: each instruction takes two consecutive rows, interleaved column by column, against the
               * head's broadcast probability pair; heads in blocks of 8 accumulators kept in registers */
        uint16_t perm_idx[32];
        for (int k = 0; k < 32; k++) perm_idx[k] = (uint16_t)(k % 2 ? 32 + k / 2 : k / 2);
        const __m512i perm = _mm512_loadu_si512(perm_idx);
        for (int64_t c = c0; c < c1; c += 16)
            for (int64_t hb = h0; hb < h1; hb += 8) {
                const int64_t nb = h1 - hb < 8 ? h1 - hb : 8;
                __m512 acc[8];
                for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
                for (int64_t s = 0; s < S; s += 2) {
                    pf_next(pf);
                    const __m256i r0 = _mm256_loadu_si256((const __m256i *)(row_at(rm, ri, s, C) + c));
                    const __m256i r1 = s + 1 < S ? _mm256_loadu_si256((const __m256i *)(row_at(rm, ri, s + 1, C) + c))
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
                    for (int k = 0; k < 16; k++) ol[(hb + j) * R + c + k] = RW(tmp[k]);
                }
            }
        return;
    }
#endif
    if (R % NS_VW == 0) { /* one FMA per row against the head's broadcast probability (fp32, a wt value in the bf16
                           * build: its products with a row are exact), heads in blocks of 8 accumulators */
        for (int64_t c = c0; c < c1; c += NS_VW)
            for (int64_t hb = h0; hb < h1; hb += 8) {
                const int64_t nb = h1 - hb < 8 ? h1 - hb : 8;
                vf acc[8];
                for (int j = 0; j < 8; j++) acc[j] = vf_zero();
                for (int64_t s = 0; s < S; s++) { /* (masked rows have p = 0, and the cache's rows are finite) */
                    if (s % 2 == 0) pf_next(pf);
                    const vf r = vf_loadu_w(row_at(rm, ri, s, C) + c);
                    for (int64_t j = 0; j < nb; j++) acc[j] = vf_fmadd(vf_set1(sc[(hb + j) * S + s]), r, acc[j]);
                }
                for (int64_t j = 0; j < nb; j++) {
                    float tmp[NS_VW];
                    vf_storeu(tmp, acc[j]);
                    for (int k = 0; k < NS_VW; k++) ol[(hb + j) * R + c + k] = RW(tmp[k]);
                }
            }
        return;
    }
    (void)pb, (void)S2, (void)pf;
    for (int64_t c = c0; c < c1; c += NS_CHUNK) {
        const int64_t nc = R - c < NS_CHUNK ? R - c : NS_CHUNK;
        for (int64_t h = h0; h < h1; h++) {
            float acc[NS_CHUNK] = {0.f};
            for (int64_t s = 0; s < S; s++) {
                const float p = sc[h * S + s];
                if (!mk[s] || p == 0.f) continue;
                for (int64_t j = 0; j < nc; j++) acc[j] += p * w2f(row_at(rm, ri, s, C)[c + j]);
            }
            for (int64_t j = 0; j < nc; j++) ol[h * R + c + j] = RW(acc[j]);
        }
    }
}

static void att_wuv(const wt *w_kvb, const float *ol, int64_t N, int64_t V, int64_t R, int64_t h0, int64_t h1,
                    wt *out) { /* out[h] = wt(W_UV[h] . o_lat[h]), out [H, V] of this query */
    for (int64_t h = h0; h < h1; h++)
        for (int64_t v = 0; v < V; v++) out[h * V + v] = f2w(dot_wf(w_kvb + (h * (N + V) + N + v) * R, ol + h * R, R));
}

/* Absorbed MLA attention (DeepSeek-V2 §2.1.2 in its decode form) for the B*T queries of a decode call:
 *   q_lat = q_nope W_UK (per head), scores = [q_lat ; q_pe] . rows * scale, p = softmax over the mask,
 *   o_lat = p . rows[:, :R], out = o_lat W_UV^T.
 * q [B, T, H, N+P]; w_kvb [H, N+V, R] = kv_b_proj's weight (W_UK = its first N rows per head, W_UV the
 * last V); rows [B, S, C] shared by a request's T queries, or [B, T, S, C] per query (DSA's selected rows) when
 * per_query; with row_idx ([B, S] or [B, T, S]) the rows are instead rows[row_idx[...]] (the cache pool read
 * through its slots, without a gathered copy); mask [B, T, S]; out [B, T, H, V].
 * Roundings as the PyTorch path (mla.py `absorbed`): q_lat, scores, probabilities and o_lat are wt, the softmax
 * and the W_UK, W_UV products fp32 (exact products of wt values, so reading the wt weight equals PyTorch's
 * fp32 copy of it).
 * With w_o [Dm, H*V] given, also the output projection y [B, T, Dm] = out . W_o^T (o_proj), plus the residual
 * resid [B, T, Dm] when given (y = resid + o_proj(out), each rounded to wt as PyTorch).
 * Scratch: qc [H, C] wt, sc [H, S] fp32, ol [H, R] fp32, pb [H, S + 1] wt.
 *
 * Threads split the heads. While a query's rows fit a core's cache (up to NS_ROWS_SPLIT bytes) each thread runs
 * every phase for its heads alone, with no barrier until o_proj: a decode step's attention is a chain of small
 * phases, and waiting for each other between them cost more than the arithmetic. Longer contexts split the
 * scores by rows and o_lat by columns, so that the rows stream from memory once, not once per thread. Both
 * schedules compute every value the same way. */
#define NS_ROWS_SPLIT (256 << 10)
/* (k8: the rows from an 8-bit plane instead of `rows`, ns_decode_stack's reads of an 8-bit cache; w_o: see ns_mat,
 * NULL for none; a4buf: where mprep(w_o), scratch for its activations, mprep_bytes(w_o, B * T, H * V)) */
static void mla_absorbed(const wt *q, int64_t B, int64_t T, int64_t H, int64_t N, int64_t P,
                         const wt *w_kvb, int64_t R, int64_t V, const wt *rows, const ns_kv8 *k8,
                         const int64_t *row_idx, int64_t S, int per_query, const uint8_t *mask, float scale, wt *out,
                         wt *qc, float *sc, float *ol, wt *pb, const ns_mat *w_o, int64_t Dm,
                         const wt *resid, wt *y, void *a4buf, int nt) {
    const int64_t C = R + P, S2 = S + (S & 1);
    const int by_heads = S * C * (int64_t)sizeof(wt) <= NS_ROWS_SPLIT;
#ifdef NS_AVX512BF16
    wt *pbv = R % 16 == 0 && !k8 ? pb : NULL; /* o_lat with VDPBF16PS reads the probabilities as bf16 pairs */
#else
    wt *pbv = NULL; /* (o_lat below reads the fp32 probabilities) */
    (void)pb;
#endif
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t h0, h1, d0, d1;
        part(H, t, n, &h0, &h1);
        part(Dm, t, n, &d0, &d1);
        /* while the scores and o_lat compute, this thread's W_UV heads and o_proj rows come in: spread over the
         * loop iterations of both (one query's worth; later queries find them cached): scores, one per row;
         * o_lat, one per pair of rows, vector of columns and block of 8 heads */
        const int64_t chunks = (R + NS_VW - 1) / NS_VW, iters = by_heads ? S + S / 2 * chunks * ((h1 - h0 + 7) / 8)
                                                               : S / n + S / 2 * (chunks / n + 1) * ((H + 7) / 8);
        ns_pf pf = pf_make(w_kvb + (h0 * (N + V) + N) * R, (h1 - h0) * (N + V) * R * (int64_t)sizeof(wt),
                           w_o ? mrow(w_o, d0, H * V) : NULL, w_o ? mbytes(w_o, d1 - d0, H * V) : 0, iters);
        for (int64_t m = 0; m < B * T; m++) {
            const int64_t rq = per_query ? m : m / T; /* the query's set of rows */
            const wt *rm = row_idx || !rows ? rows : rows + rq * S * C;
            ns_kv8 kq;
            if (k8) { /* this query's rows: through the slots, or the request's S rows */
                kq = *k8;
                if (!row_idx) kq.q += rq * S * C, kq.s += rq * S * kq.ns;
            }
            const ns_kv8 *kr = k8 ? &kq : NULL;
            const int64_t *ri = row_idx ? row_idx + rq * S : NULL;
            const uint8_t *mk = mask + m * S;
            att_qlat(q + m * H * (N + P), w_kvb, N, P, V, R, h0, h1, qc);
            if (by_heads) {
                att_scores(qc, rm, kr, ri, mk, S, C, scale, h0, h1, 0, S, sc, &pf);
                att_softmax(sc, mk, S, h0, h1, pbv, S2);
                att_olat(rm, kr, ri, mk, S, C, sc, pbv, S2, R, h0, h1, 0, R, ol, &pf);
            } else {
                int64_t s0, s1, c0, c1;
                part(S, t, n, &s0, &s1);
                part((R + NS_CHUNK - 1) / NS_CHUNK, t, n, &c0, &c1);
#pragma omp barrier
                att_scores(qc, rm, kr, ri, mk, S, C, scale, 0, H, s0, s1, sc, &pf);
#pragma omp barrier
                att_softmax(sc, mk, S, h0, h1, pbv, S2);
#pragma omp barrier
                att_olat(rm, kr, ri, mk, S, C, sc, pbv, S2, R, 0, H, c0 * NS_CHUNK, c1 * NS_CHUNK < R ? c1 * NS_CHUNK : R,
                         ol, &pf);
#pragma omp barrier
            }
            att_wuv(w_kvb, ol, N, V, R, h0, h1, out + m * H * V);
        }
        if (w_o) { /* the output projection: y [B*T, Dm] = out [B*T, H*V] . W_o^T */
#pragma omp barrier
            const wt *xs[B * T];
            float r[B * T];
            int64_t ar[B * T];
            row_ptrs(out, B * T, H * V, xs);
            row_ids(B * T, ar);
            nq_a4 a;
            if (mprep(w_o)) { /* the rows of `out` prepared first, each thread its share */
                int64_t m0, m1;
                part(B * T, t, n, &m0, &m1);
                mcarve(&a, a4buf, w_o, B * T, H * V);
                for (int64_t m = m0; m < m1; m++) nq_a4_row(&a, m, out + m * H * V, NS_WT_BF);
#pragma omp barrier
            }
            for (int64_t d = d0; d < d1; d++) { /* the rows `pf` brought to this core */
                mdots(xs, &a, ar, B * T, w_o, d, H * V, r);
                for (int64_t m = 0; m < B * T; m++) {
                    const float o = RW(r[m]);
                    y[m * Dm + d] = f2w(resid ? w2f(resid[m * Dm + d]) + o : o);
                }
            }
        }
    }
}

void ns_mla_absorbed(const wt *q, int64_t B, int64_t T, int64_t H, int64_t N, int64_t P,
                     const wt *w_kvb, int64_t R, int64_t V, const wt *rows, const int64_t *row_idx,
                     int64_t S, int per_query, const uint8_t *mask, float scale, wt *out, wt *qc,
                     float *sc, float *ol, wt *pb, const wt *w_o, int64_t Dm, const wt *resid,
                     wt *y, int nt) {
    const ns_mat wo = mat_f(w_o);
    mla_absorbed(q, B, T, H, N, P, w_kvb, R, V, rows, NULL, row_idx, S, per_query, mask, scale, out, qc, sc, ol, pb,
                 w_o ? &wo : NULL, Dm, resid, y, NULL, nt);
}

/* The same over the 8-bit rows of a cache plane (fmt NS_KV_FP8 or NS_KV_INT8): values rows8 [.., R + P] and
 * scales [.., ns] (c_kv in groups of g0, k_pe in groups of g1), indexed as `rows` above. The kernels' path over an
 * 8-bit cache (ns_decode_stack); exported for the self-test against the dequantized rows. */
void ns_mla_absorbed8(const wt *q, int64_t B, int64_t T, int64_t H, int64_t N, int64_t P,
                      const wt *w_kvb, int64_t R, int64_t V, const uint8_t *rows8, const float *scales, int fmt,
                      int64_t ns, int64_t g0, int64_t g1, const int64_t *row_idx, int64_t S, int per_query,
                      const uint8_t *mask, float scale, wt *out, wt *qc, float *sc, float *ol, wt *pb,
                      const wt *w_o, int64_t Dm, const wt *resid, wt *y, int nt) {
    float lut[256];
    kv8_lut(fmt, lut);
    const ns_kv8 k8 = {rows8, scales, lut, R + P, ns, R, g0, g1, fmt == NS_KV_INT8};
    const ns_mat wo = mat_f(w_o);
    mla_absorbed(q, B, T, H, N, P, w_kvb, R, V, NULL, &k8, row_idx, S, per_query, mask, scale, out, qc, sc, ol, pb,
                 w_o ? &wo : NULL, Dm, resid, y, NULL, nt);
}

/* rows [M, R + P] into an 8-bit plane (fmt, groups g0 and g1 as ns_mla_absorbed8) at slots [M]: values
 * q [slots, R + P], scales s [slots, ns] */
void ns_kv8_write(const wt *rows, int64_t M, int64_t R, int64_t P, int fmt, int64_t g0, int64_t g1,
                  const int64_t *slots, uint8_t *q, float *s) {
    const int64_t C = R + P, ns = R / g0 + (P ? P / g1 : 0);
    for (int64_t m = 0; m < M; m++) {
        kv8_quantize(rows + m * C, R, g0, fmt, q + slots[m] * C, s + slots[m] * ns);
        if (P) kv8_quantize(rows + m * C + R, P, g1, fmt, q + slots[m] * C + R, s + slots[m] * ns + R / g0);
    }
}

static void rmsnorm_row(const wt *x, int64_t D, const wt *w, float eps, wt *y) {
    float ss = 0.f;
    for (int64_t d = 0; d < D; d++) ss += w2f(x[d]) * w2f(x[d]);
    const float inv = 1.f / sqrtf(ss / (float)D + eps);
    for (int64_t d = 0; d < D; d++) y[d] = f2w(w2f(w[d]) * RW(w2f(x[d]) * inv));
}

/* RMSNorm as norm.py: y = w * wt(x / sqrt(mean(x^2) + eps)), statistics in fp32. x, y [M, D], w [D]. */
void ns_rmsnorm(const wt *x, int64_t M, int64_t D, const wt *w, float eps, wt *y) {
    for (int64_t m = 0; m < M; m++) rmsnorm_row(x + m * D, D, w, eps, y + m * D);
}

/* DeepSeekMoE routing of one token as moe.py `Router`, from its logits s [E] = x . W (fp32): scores = sigmoid
 * (scoring 0) or softmax (1), in place; choice = scores (+ bias); with n_group > 1 and method != greedy (0) only
 * the topk_group best groups compete (group score: top-2 sum for noaux_tc (2), max for group_limited_greedy
 * (1)); top-K of choice; gate weights = scores of the chosen (renormalised when norm) * scaling. bias [E] or
 * NULL; c [E] scratch. Outputs gw [K] fp32, idx [K] int64. */
static void route_token(float *s, int64_t E, const float *bias, int scoring, int method, int64_t n_group,
                        int64_t topk_group, int64_t K, int norm, float scaling, float *gw, int64_t *idx, float *c) {
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
        idx[k] = best;
        gw[k] = s[best];
        total += s[best];
    }
    for (int64_t k = 0; k < K; k++) gw[k] = (norm && K > 1 ? gw[k] / (total + 1e-20f) : gw[k]) * scaling;
}

/* RoPE in DeepSeek's pair layout as rope.py `apply_rope_pairs`: pairs (2i, 2i + 1) of x[0, 2 half) rotated by
 * the angles cos, sin [half], in fp32, rounded once */
static void rope_row(const wt *x, int64_t half, const float *cos, const float *sin, wt *y) {
    for (int64_t i = 0; i < half; i++) {
        const float a = w2f(x[2 * i]), b = w2f(x[2 * i + 1]), c = cos[i], s = sin[i];
        y[2 * i] = f2w(a * c + b * -s);
        y[2 * i + 1] = f2w(b * c + a * s);
    }
}

/* RoPE in the halves layout as rope.py `apply_rope_halves` (the DSA indexer): pairs (i, i + half) of x rotated in
 * place, each product and sum rounded to the model's dtype as PyTorch does it in that dtype */
static void rope_halves(wt *x, int64_t half, const float *cos, const float *sin) {
    for (int64_t i = 0; i < half; i++) {
        const float c = RW(cos[i]), sn = RW(sin[i]);
        const float a = w2f(x[i]), b = w2f(x[i + half]);
        x[i] = f2w(RW(a * c) + RW(b * -sn));
        x[i + half] = f2w(RW(b * c) + RW(a * sn));
    }
}

/* MLA's projections of the hidden state x [M, D] (mla.py `_project` and `_latent`), one pass over each weight,
 * after the block's input RMSNorm when in_norm is given (xn [M, D] = the normed x, written for the caller):
 *   xo = x . [W_qa | W_kva | W_ik]^T  ([M, Oq + R + P + Di]; W_ik: the DSA indexer key, Di may be 0);
 *   with q-LoRA (qa_norm != NULL):  cq = RMSNorm(xo[:, :Oq]),  q = cq . W_qb^T;  without:  q = xo[:, :Oq];
 *   q [M, H, N+P] with its last P dims of each head rotated; rows [M, R+P] = [RMSNorm(c_kv) ; rope(k_pe)].
 * With Di > 0 also the DSA indexer key (dsa.py `Indexer.key`): ik [M, Di] = rope_halves(LayerNorm(xo[:, -Di:]))
 * (LayerNorm in fp32, rounded once; the rotation of the first P dims in wt arithmetic, as PyTorch does it).
 * cos, sin [M, P/2]. cq is written only with q-LoRA.
 * The projections of x as separate matrices (ns_decode_stack): wx holds W_qa (or W_q), wkv W_kva and ik_wk the
 * indexer key's rows [Di, D] (float rows: quant.py keeps the indexer float); wkv->w NULL: wx holds all three
 * concatenated (ns_mla_project). Quantized (wx->s set: ns_mat): wx and wkv hold codes, and W_qb may be quantized
 * too. a4buf: scratch for the prepared activations (mprep) of either, the larger of mprep_bytes(wx, M, D) and
 * mprep_bytes(wqb, M, Oq). */
static void mla_project(const wt *x, int64_t M, int64_t D, const ns_mat *wx, const ns_mat *wkv, const wt *ik_wk,
                        int64_t Oq, int64_t R, int64_t P, int64_t Di, const wt *qa_norm, float eps_q,
                        const ns_mat *wqb, int64_t H, int64_t N, const wt *kv_norm, float eps_kv,
                        const wt *ik_w, const wt *ik_b, float ik_eps, const float *cos, const float *sin,
                        const wt *in_norm, float in_eps, wt *xn, wt *xo, wt *cq, wt *q, wt *rows, wt *ik,
                        void *a4buf, int nt) {
    const int64_t Ow = Oq + R + P + Di, Q = H * (N + P), half = P / 2, Oc = Oq + R + P;
    const wt *xin = in_norm ? xn : x;
#pragma omp parallel num_threads(nt)
    {
        /* the norms work row by row, so with fewer rows than threads some threads wait meanwhile: those ask for
         * the start of their share of the next matrix (as much as the norms last, about), a thread that works
         * for its first 2 KB */
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
        int64_t m0, m1, o0, o1, q0, q1;
        part(M, t, nth, &m0, &m1);
        part(Ow, t, nth, &o0, &o1);
        part(Q, t, nth, &q0, &q1);
        const int64_t idle = m0 == m1;
        if (in_norm) { /* the block's input RMSNorm first: the projections read xn */
            const int64_t ok = wkv->w && o0 >= Oq; /* (a prefetch may run past its matrix's end: harmless) */
            ns_pf pf = pf_make(mrow(ok ? wkv : wx, ok ? o0 - Oq : o0, D),
                               imin(idle ? 4096 : 2048, mbytes(wx, o1 - o0, D)), NULL, 0, 1);
            pf_next(&pf);
            for (int64_t m = m0; m < m1; m++) rmsnorm_row(x + m * D, D, in_norm, in_eps, xn + m * D);
#pragma omp barrier
        }
        const wt *xs[M];
        float r[M];
        int64_t ar[M];
        row_ptrs(xin, M, D, xs);
        row_ids(M, ar);
        nq_a4 a; /* the rows of xin, then of cq, prepared (mprep; each thread its share of rows) */
        if (mprep(wx)) {
            mcarve(&a, a4buf, wx, M, D);
            for (int64_t m = m0; m < m1; m++) nq_a4_row(&a, m, xin + m * D, NS_WT_BF);
#pragma omp barrier
        }
        for (int64_t o = o0; o < o1; o++) {
            if (ik_wk && o >= Oc) dots(xs, M, ik_wk + (o - Oc) * D, D, r);
            else if (wkv->w && o >= Oq) mdots(xs, &a, ar, M, wkv, o - Oq, D, r);
            else mdots(xs, &a, ar, M, wx, o, D, r);
            for (int64_t m = 0; m < M; m++) xo[m * Ow + o] = f2w(r[m]);
        }
#pragma omp barrier
        if (qa_norm) {
            ns_pf pf = pf_make(mrow(wqb, q0, Oq), imin(idle ? 32768 : 2048, mbytes(wqb, q1 - q0, Oq)), NULL, 0, 1);
            pf_next(&pf);
            if (mprep(wqb)) mcarve(&a, a4buf, wqb, M, Oq); /* (xin's rows are read: the barrier) */
        }
        for (int64_t m = m0; m < m1; m++) {
            const wt *xm = xo + m * Ow;
            if (qa_norm) {
                rmsnorm_row(xm, Oq, qa_norm, eps_q, cq + m * Oq);
                if (mprep(wqb)) nq_a4_row(&a, m, cq + m * Oq, NS_WT_BF);
            } else memcpy(q + m * Q, xm, Q * sizeof(wt));
            rmsnorm_row(xm + Oq, R, kv_norm, eps_kv, rows + m * (R + P));
            rope_row(xm + Oq + R, half, cos + m * half, sin + m * half, rows + m * (R + P) + R);
            if (Di > 0) {
                const wt *k = xm + Oq + R + P;
                wt *km = ik + m * Di;
                float mean = 0.f, var = 0.f;
                for (int64_t d = 0; d < Di; d++) mean += w2f(k[d]);
                mean /= (float)Di;
                for (int64_t d = 0; d < Di; d++) var += (w2f(k[d]) - mean) * (w2f(k[d]) - mean);
                const float inv = 1.f / sqrtf(var / (float)Di + ik_eps);
                for (int64_t d = 0; d < Di; d++) km[d] = f2w((w2f(k[d]) - mean) * inv * w2f(ik_w[d]) + w2f(ik_b[d]));
                rope_halves(km, half, cos + m * half, sin + m * half);
            }
        }
#pragma omp barrier
        if (qa_norm) {
            row_ptrs(cq, M, Oq, xs);
            for (int64_t o = q0; o < q1; o++) { /* the rows asked for above */
                mdots(xs, &a, ar, M, wqb, o, Oq, r);
                for (int64_t m = 0; m < M; m++) q[m * Q + o] = f2w(r[m]);
            }
#pragma omp barrier
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < M * H; t++) {
            wt *qh = q + t * (N + P) + N, tmp[512];
            const int64_t m = t / H;
            memcpy(tmp, qh, P * sizeof(wt));
            rope_row(tmp, half, cos + m * half, sin + m * half, qh);
        }
    }
}

void ns_mla_project(const wt *x, int64_t M, int64_t D, const wt *wx, int64_t Oq, int64_t R, int64_t P,
                    int64_t Di, const wt *qa_norm, float eps_q, const wt *wqb, int64_t H, int64_t N,
                    const wt *kv_norm, float eps_kv, const wt *ik_w, const wt *ik_b, float ik_eps,
                    const float *cos, const float *sin, const wt *in_norm, float in_eps, wt *xn,
                    wt *xo, wt *cq, wt *q, wt *rows, wt *ik, int nt) {
    const ns_mat mx = mat_f(wx), mq = mat_f(wqb), none = mat_f(NULL);
    mla_project(x, M, D, &mx, &none, NULL, Oq, R, P, Di, qa_norm, eps_q, &mq, H, N, kv_norm, eps_kv, ik_w, ik_b,
                ik_eps, cos, sin, in_norm, in_eps, xn, xo, cq, q, rows, ik, NULL, nt);
}

/* The experts' work of a block, as groups: one expert (routed, or the shared one) with every (token, expert) pair
 * routed to it, so that each weight row is read once for all of them. Pair p: the routed pairs n*K + k
 * (p < NKr), then the shared expert's pair of token n (p = NKr + n); its activations act[p] [I] and output
 * ys[p] [D]. */
typedef struct { /* pairs[first, first + count); the expert's matrices (ns_mat: gate_up holds the gate rows, then
                  * the up rows unless `up` has them); f32: see ffn_block; prep: its down projection reads its
                  * activations prepared (mprep; fp32 routed rows need it for int4 only) */
    ns_mat gate_up, up, down;
    int64_t I, first, count;
    int f32, prep;
} ns_group;
typedef struct {
    const wt *xn;
    wt *act;
    float *ys;
    const int64_t *pairs;
    int64_t NKr, K, D, I, Is;
    int f32; /* the routed pairs' activations are fp32 (an int8 or int4 model's experts, see ffn_block) */
    /* prepared (mprep) for quantized matrices, or NULL: xn's rows (row n: token n), the routed pairs' activations
     * (row p, int4 only), the shared ones' (row n) */
    const nq_a4 *ax, *ah, *ahs;
} ns_pairs;

static inline int64_t pair_token(const ns_pairs *c, int64_t p) { return p < c->NKr ? p / c->K : p - c->NKr; }
static inline const wt *pair_x(const ns_pairs *c, int64_t p) { return c->xn + pair_token(c, p) * c->D; }
static inline wt *pair_act(const ns_pairs *c, int64_t p) { /* (pair_actf for fp32 routed activations) */
    wt *shared = c->f32 ? (wt *)((float *)c->act + c->NKr * c->I) : c->act + c->NKr * c->I;
    return p < c->NKr ? c->act + p * c->I : shared + (p - c->NKr) * c->Is;
}
static inline float *pair_actf(const ns_pairs *c, int64_t p) { return (float *)c->act + p * c->I; }

/* the activations of the group's pairs [j0, j1) prepared for its down projection (g->prep) */
static void group_prepare(const ns_pairs *c, const ns_group *g, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++) {
        const int64_t p = c->pairs[g->first + j];
        if (p < c->NKr) nq_a4_row(c->ah, p, g->f32 ? (const void *)pair_actf(c, p) : pair_act(c, p),
                                  g->f32 ? 0 : NS_WT_BF);
        else nq_a4_row(c->ahs, p - c->NKr, pair_act(c, p), NS_WT_BF);
    }
}

static void group_gate_up(const ns_pairs *c, const ns_group *g, int64_t r0, int64_t r1) { /* act rows [r0, r1) */
    const int64_t n = g->count;
    const wt *xs[n];
    wt *acts[n];
    float *actf[n], ga[n], ua[n];
    int64_t xr[n];
    for (int64_t j = 0; j < n; j++) {
        const int64_t p = c->pairs[g->first + j];
        xs[j] = pair_x(c, p);
        xr[j] = pair_token(c, p);
        acts[j] = pair_act(c, p);
        actf[j] = pair_actf(c, p);
    }
    for (int64_t r = r0; r < r1; r++) {
        mdots(xs, c->ax, xr, n, &g->gate_up, r, c->D, ga);
        if (g->up.w) mdots(xs, c->ax, xr, n, &g->up, r, c->D, ua);
        else mdots(xs, c->ax, xr, n, &g->gate_up, g->I + r, c->D, ua);
        for (int64_t j = 0; j < n; j++) {
            if (g->f32) { /* nq_experts' arithmetic: nothing rounded */
                actf[j][r] = ga[j] / (1.f + expf(-ga[j])) * ua[j];
                continue;
            }
            const float a = RW(ga[j]), u = RW(ua[j]);
            acts[j][r] = f2w(RW(a / (1.f + expf(-a))) * u);
        }
    }
}

static void group_down(const ns_pairs *c, const ns_group *g, int64_t d0, int64_t d1) { /* y rows [d0, d1) */
    const int64_t n = g->count;
    const wt *acts[n];
    const float *actf[n];
    float *ys[n], r[n];
    int64_t hr[n];
    for (int64_t j = 0; j < n; j++) {
        const int64_t p = c->pairs[g->first + j];
        acts[j] = pair_act(c, p);
        actf[j] = pair_actf(c, p);
        ys[j] = c->ys + p * c->D;
        hr[j] = p < c->NKr ? p : p - c->NKr;
    }
    const nq_a4 *ha = g->first < c->NKr ? c->ah : c->ahs; /* (a group is routed pairs only, or the shared ones) */
    for (int64_t d = d0; d < d1; d++) {
        if (g->f32 && !g->down.mn) NS_QDOTS(dot_s8_f, actf, n, g->down.w, g->down.s, d, g->I, r);
        else mdots(acts, ha, hr, n, &g->down, d, g->I, r);
        for (int64_t j = 0; j < n; j++) ys[j][d] = g->f32 ? r[j] : RW(r[j]);
    }
}

/* The matrix whose layout the experts' one prepared copy of xn follows (ffn_block; decode_plan.py gives the routed
 * and the shared gate_up one format): the routed gate_up where it reads prepared activations, else the shared
 * expert's, else none */
static inline const ns_mat *ffn_gx(const ns_mat *gate_up, int routed, const ns_mat *s_gate_up) {
    return routed && mprep(gate_up) ? gate_up : s_gate_up->w && mprep(s_gate_up) ? s_gate_up : NULL;
}

/* Whether group g (work [cost[g], cost[g + 1]) of C in all) straddles a boundary between the nth threads' shares */
static inline int straddles(const int64_t *cost, int64_t g, int64_t C, int nth) {
    for (int b = 1; b < nth; b++)
        if (cost[g] < C * b / nth && C * b / nth < cost[g + 1]) return 1;
    return 0;
}

/* The feed-forward half of a decoder block for N tokens (transformer.py `Block`): out = h + FFN(RMSNorm(h)),
 * FFN = DeepSeekMoE (router + routed experts, plus the shared expert when s_gate_up is given) or, with E = 0,
 * the dense SwiGLU MLP passed as the shared one. Routed experts (moe.py `GroupedExperts`):
 *   routed[n] = wt( sum_k gw[n, k] * y[n, k] ),  y[n, k] = down_e(silu(gate_e x[n]) * up_e x[n]),  e = idx[n, k]
 * gate_up [E, 2I, D] (gate rows first), down [E, D, I]; the shared expert is one more expert of weight 1
 * (gate_up [2Is, D], down [D, Is]). Roundings as PyTorch: the norm, gate, up, silu(gate), their product, each
 * y, the routed and shared outputs, their sum and the residual sum are wt.
 * One parallel region: the norm, the router's logits, the routing and the grouping of the pairs by expert (one
 * thread), the expert groups (see below), then the weighted sums and the residual. Scratch: xn [N, D] wt;
 * act [N, K'*I + Is] wt and ys [N*(K' + 1), D] fp32 with K' = max(K, 1); rs [N, 2E] fp32; gw [N, K] fp32;
 * idx [N, K] int64.
 * Quantized (ffn_block with quantized matrices, ns_mat): gate_up [E, 2I, D], down [E, D, I] and the shared expert's
 * (s_gate_up->w NULL: none; its up rows in s_up, or after its gate rows in s_gate_up when s_up->w is NULL).
 * Quantized routed experts compute as cpu_quant.c's nq_experts, the per-op path of a quantized model: gate, up,
 * their activation and each y stay fp32 (act holds fp32 routed rows then: [N*K', I] fp32 before the shared rows),
 * the weighted sum is rounded once. int4 matrices read their activations prepared in
 * a4buf (at most the nq_a4_bytes of xn, of the routed rows [N*K, I] and of the shared ones [N, Is]). */
static void ffn_block(const wt *h, int64_t N, int64_t D, const wt *norm_w, float eps, const float *router_w32,
                      int64_t E, const float *bias, int scoring, int method, int64_t n_group, int64_t topk_group,
                      int64_t K, int norm, float scaling, const ns_mat *gate_up, const ns_mat *down, int64_t I,
                      const ns_mat *s_gate_up, const ns_mat *s_up, const ns_mat *s_down, int64_t Is, wt *out,
                      wt *xn, wt *act, float *ys, float *rs, float *gw, int64_t *idx, void *a4buf, int nt) {
    const int64_t Kr = E > 0 ? K : 0, Ns = s_gate_up->w ? N : 0, NKr = N * Kr; /* routed pairs; shared pairs */
    float *ys_s = ys + NKr * D;
    int64_t pairs[NKr + Ns + 1], cost[E + 2], G = 0;
    ns_group groups[E + 2];
    const int f32 = gate_up->s != NULL;
    /* prepared activations (mprep): xn's rows (ffn_gx), the routed hidden rows (int4: the fp32 rows the others read
     * as they are) and the shared ones */
    const ns_mat *gx = ffn_gx(gate_up, Kr > 0, s_gate_up);
    const int prep_r = Kr > 0 && down->mn, prep_s = Ns && mprep(s_down), prep_down = prep_r || prep_s;
    nq_a4 ax, ah, ahs;
    char *ab = a4buf;
    if (gx) mcarve(&ax, ab, gx, N, D), ab += mprep_bytes(gx, N, D);
    if (prep_r) mcarve(&ah, ab, down, NKr, I), ab += mprep_bytes(down, NKr, I);
    if (prep_s) mcarve(&ahs, ab, s_down, N, Is);
    const ns_pairs pc = {xn, act, ys, pairs, NKr, K, D, I, Is, f32, gx ? &ax : NULL, prep_r ? &ah : NULL,
                         prep_s ? &ahs : NULL};
#pragma omp parallel num_threads(nt)
    {
#pragma omp single
        for (int64_t n = 0; n < N; n++) {
            rmsnorm_row(h + n * D, D, norm_w, eps, xn + n * D);
            if (gx) nq_a4_row(&ax, n, xn + n * D, NS_WT_BF);
        }
        if (Kr > 0) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < N * E; t++) rs[t] = dot_wf(xn + (t / E) * D, router_w32 + (t % E) * D, D);
        }
#pragma omp single
        {
            for (int64_t n = 0; n < N && Kr > 0; n++)
                route_token(rs + n * E, E, bias, scoring, method, n_group, topk_group, K, norm, scaling,
                            gw + n * K, idx + n * K, rs + N * E + n * E);
            /* the groups: the routed experts in expert order (a counting sort of the pairs, each group's pairs in
             * order), then the shared one; cost[g] = the work before group g (pairs x width), cost[G] the total */
            int64_t count[E + 1], slot[E + 1], first = 0;
            for (int64_t e = 0; e < E; e++) count[e] = 0;
            for (int64_t p = 0; p < NKr; p++) count[idx[p]]++;
            for (int64_t e = 0; e < E; e++) {
                slot[e] = G;
                if (count[e])
                    groups[G++] = (ns_group){msub(gate_up, e * 2 * I, D), mat_f(NULL), msub(down, e * D, I), I,
                                             first, 0, f32, prep_r};
                first += count[e];
            }
            for (int64_t p = 0; p < NKr; p++) {
                ns_group *gr = &groups[slot[idx[p]]];
                pairs[gr->first + gr->count++] = p;
            }
            if (Ns) {
                for (int64_t n = 0; n < N; n++) pairs[NKr + n] = NKr + n;
                groups[G++] = (ns_group){*s_gate_up, *s_up, *s_down, Is, NKr, N, 0, prep_s};
            }
            cost[0] = 0;
            for (int64_t g = 0; g < G; g++) cost[g + 1] = cost[g] + groups[g].count * groups[g].I;
            /* the experts' streams start where the hardware has no history: ask for each one's first KB now, so
             * that their memory latencies overlap instead of stalling one after another (the block stack: median
             * 1.00 against 1.04 ms per token over 7 alternating runs; the spread between runs is larger) */
            for (int64_t g = 0; g < G; g++) {
                const char *gp = (const char *)groups[g].gate_up.w;
                const char *up = (const char *)(groups[g].up.w ? groups[g].up.w
                                                               : mrow(&groups[g].gate_up, groups[g].I, D));
                const char *dn = (const char *)groups[g].down.w;
                for (int64_t b = 0; b < 1024; b += 64) {
                    __builtin_prefetch(gp + b, 0, 2);
                    __builtin_prefetch(up + b, 0, 2);
                    __builtin_prefetch(dn + b, 0, 2);
                }
            }
        }
        /* the groups split by cost into one contiguous share per thread: a thread runs its whole groups, gate/up
         * then down, streaming their matrices one after another with no wait (6% more bandwidth than splitting
         * each phase's rows over the threads and waiting between the phases); a group across a share boundary
         * is split by rows over all threads, with one wait between its two halves */
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t C = cost[G], lo = C * t / nth, hi = C * (t + 1) / nth;
        int any_split = 0;
        for (int64_t g = 0; g < G; g++) {
            if (straddles(cost, g, C, nth)) {
                int64_t r0, r1;
                part(groups[g].I, t, nth, &r0, &r1);
                group_gate_up(&pc, &groups[g], r0, r1);
                any_split = 1;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            if (!straddles(cost, g, C, nth) && lo <= cost[g] && cost[g] < hi) {
                group_gate_up(&pc, &groups[g], 0, groups[g].I);
                if (groups[g].prep) group_prepare(&pc, &groups[g], 0, groups[g].count);
                group_down(&pc, &groups[g], 0, D);
            }
        }
        if (any_split) {
#pragma omp barrier
            if (prep_down) { /* a split group's activations, prepared by all threads (a share of its pairs each) */
                for (int64_t g = 0; g < G; g++) {
                    if (straddles(cost, g, C, nth) && groups[g].prep) {
                        int64_t j0, j1;
                        part(groups[g].count, t, nth, &j0, &j1);
                        group_prepare(&pc, &groups[g], j0, j1);
                    }
                }
#pragma omp barrier
            }
            for (int64_t g = 0; g < G; g++) {
                if (straddles(cost, g, C, nth)) {
                    int64_t d0, d1;
                    part(D, t, nth, &d0, &d1);
                    group_down(&pc, &groups[g], d0, d1);
                }
            }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N * D; i++) {
            const int64_t n = i / D, d = i % D;
            float r = 0.f;
            for (int64_t k = 0; k < Kr; k++) r += gw[n * K + k] * ys[(n * K + k) * D + d];
            float f;
            if (Kr > 0 && Ns) f = RW(w2f(f2w(r)) + ys_s[i]);
            else f = Kr > 0 ? w2f(f2w(r)) : ys_s[i];
            out[i] = f2w(w2f(h[i]) + f);
        }
    }
}

void ns_ffn_block(const wt *h, int64_t N, int64_t D, const wt *norm_w, float eps, const float *router_w32,
                  int64_t E, const float *bias, int scoring, int method, int64_t n_group, int64_t topk_group,
                  int64_t K, int norm, float scaling, const wt *gate_up, const wt *down, int64_t I,
                  const wt *s_gate_up, const wt *s_down, int64_t Is, wt *out, wt *xn, wt *act,
                  float *ys, float *rs, float *gw, int64_t *idx, int nt) {
    const ns_mat gu = mat_f(gate_up), dn = mat_f(down), sgu = mat_f(s_gate_up), sup = mat_f(NULL),
                 sdn = mat_f(s_down);
    ffn_block(h, N, D, norm_w, eps, router_w32, E, bias, scoring, method, n_group, topk_group, K, norm, scaling,
              &gu, &dn, I, &sgu, &sup, &sdn, Is, out, xn, act, ys, rs, gw, idx, NULL, nt);
}

/* The decoder blocks of a decode step in one call (decode_plan.py): per block, the projections, the cache write,
 * absorbed attention with o_proj and the residual, and the feed-forward half, exactly the calls the blocks make
 * one by one. The cache is a pool of rows per layer: kv_pool [L, slots, C] and ik_pool [L, slots, Di]; the new
 * rows go to write_slots [M]; a query reads its request's S rows at read_slots [B, S], or at the slots its block
 * table gives (tables [B, nb] with blocks of bs rows: row s at tables[b, s / bs] * bs + s % bs; the engine's paged
 * pool), or, with both NULL (one request), the contiguous rows from slot span0; attention reads them in place.
 * mask [B, T, S] says which rows each query sees; NULL: those up to its position (s <= pos). A DSA block whose
 * queries see more than its top-k rows selects them first (ns_dsa_select) into sel [M, topk] (slots).
 * x_in [M, D] is the blocks' input; h [M, D] holds the stream after attention and out [M, D] after each block.
 * idx [L, M, K'] receives each MoE block's expert ids. The angles of RoPE come from tables of every position
 * (cos_tab, sin_tab [positions, P/2]) at pos [M]; cs [2, M, P/2] is scratch. With kv_fmt NS_KV_FP8 or NS_KV_INT8
 * the pools hold 8-bit values (bytes, same layout) and kv_scales [L, slots, R/g0 + P/g1], ik_scales
 * [L, slots, Di/gi] their fp32 scales, each part in groups of kv_group values or whole when its width is not a
 * multiple (kv_quant.py `KVFormat.groups`): the new rows are quantized into them and attention and the DSA
 * indexer dequantize what they read (ns_kv8 above). Then the model's final norm,
 * hn [M, D], and with head_w [V, D] (int8 codes where head_s holds their scales) the logits [B, n_logits, V] of
 * each request's last n_logits rows (hl [B * n_logits, D] scratch). Returns 0, or -2 when out of memory for the
 * prepared activations of quantized matrices (mprep), the slots of the tables or the mask (allocated per call). */
/* ns_block's fields, F(type, name) in order: the struct's declaration and its layout for ns_abi come from this one
 * list. layer: the block's plane in the cache pools; iwq, iwp, Hi, topk: the DSA indexer (wq_b, weights_proj;
 * topk 0: none). A model quantized by quant.py sets the scales after Kp: a matrix whose scale is set holds int8
 * codes, not wt values, and one whose min (the _m fields) is set too int4 codes in groups of qg, its products on
 * int8 activations where q8 (ns_mat). wx, wkv and ik_wk: W_qa (or W_q), W_kva and the indexer key's float rows
 * (mla_project); s_gate_up and s_up: the shared expert's (or the dense MLP's) gate and up rows. */
#define NS_BLOCK_FIELDS(F)                                                                                         \
    F(int64_t, layer)                                                                                              \
    F(const wt *, wx) F(int64_t, q_out) F(int64_t, R) F(int64_t, P) F(int64_t, Di) F(const wt *, qa_norm)          \
    F(float, qa_eps) F(const wt *, wqb) F(int64_t, H) F(int64_t, N) F(const wt *, kv_norm) F(float, kv_eps)        \
    F(const wt *, ik_w) F(const wt *, ik_b) F(float, ik_eps) F(const wt *, in_norm) F(float, in_eps)               \
    F(int64_t, Nk) F(const wt *, kv_b) F(int64_t, V) F(float, scale) F(const wt *, w_o) F(int64_t, Dm)             \
    F(const wt *, post_w) F(float, post_eps) F(const float *, router_w32) F(int64_t, E) F(const float *, bias)      \
    F(int, scoring) F(int, method) F(int64_t, n_group) F(int64_t, topk_group) F(int64_t, K) F(int, norm)           \
    F(float, scaling) F(const wt *, gate_up) F(const wt *, down) F(int64_t, I) F(const wt *, s_gate_up)            \
    F(const wt *, s_down) F(int64_t, Is) F(int64_t, Kp)                                                            \
    F(const bf16 *, wx_s) F(const wt *, ik_wk) F(const bf16 *, wqb_s) F(const bf16 *, w_o_s)                       \
    F(const bf16 *, gate_up_s) F(const bf16 *, down_s) F(const bf16 *, s_gate_up_s) F(const bf16 *, s_down_s)     \
    F(const bf16 *, wx_m) F(const bf16 *, wqb_m) F(const bf16 *, w_o_m) F(const bf16 *, gate_up_m)                 \
    F(const bf16 *, down_m) F(const bf16 *, s_gate_up_m) F(const bf16 *, s_down_m) F(int64_t, qg) F(int, q8)       \
    F(const wt *, wkv) F(const bf16 *, wkv_s) F(const bf16 *, wkv_m) F(const wt *, s_up) F(const bf16 *, s_up_s)     \
    F(const bf16 *, s_up_m)                                                                                        \
    F(const wt *, iwq) F(const wt *, iwp) F(int64_t, Hi) F(int64_t, topk)
#define NS_DECLARE(type, name) type name;
typedef struct { NS_BLOCK_FIELDS(NS_DECLARE) } ns_block;

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

/* DSA selection for the M queries of a decode call (dsa.py `Indexer.scores` + `select`, in its wt roundings):
 *   iq[m, j] = rope_halves(wq_b cq[m])_j * Di^-1/2 (wt),  iw[m, j] = wt(weights_proj xn[m] * Hi^-1/2),
 *   score[m, s] = wt(sum_j iw[m, j] relu(wt(iq[m, j] . key[s])))  (-inf where mask[m, s] is 0),
 * then the top K rows of each query (ties at the K-th score to the earliest positions), in position order:
 * ord [M, S] (the first K of each row), sel_mask [M, K], and the slots of their latent rows sel [M, K].
 * Keys are read through the slots (read_slots [B, S], or span0). */
static void dsa_select(const wt *iwq, const wt *iwp, int64_t Hi, int64_t Di, int64_t P, int64_t K,
                       int64_t B, int64_t T, int64_t D, int64_t Oq, int64_t S, const wt *cq, const wt *xn,
                       const float *cos, const float *sin, const uint8_t *mask, const wt *iplane, const ns_kv8 *ik8,
                       const int64_t *read_slots, int64_t span0, wt *iq, float *iw, float *isc, int64_t *ord,
                       uint8_t *sel_mask, int64_t *sel, int nt) {
    const int64_t M = B * T, half = P / 2;
    const float qscale = 1.f / sqrtf((float)Di), wscale = 1.f / sqrtf((float)Hi);
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < M * Hi * Di; o++) {
            const int64_t m = o / (Hi * Di), r = o % (Hi * Di);
            iq[o] = f2w(dot(cq + m * Oq, iwq + r * Oq, Oq));
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < M * Hi; t++) {
            const int64_t m = t / Hi;
            wt *qh = iq + t * Di;
            rope_halves(qh, half, cos + m * half, sin + m * half);
            for (int64_t d = 0; d < Di; d++) qh[d] = f2w(w2f(qh[d]) * qscale);
            iw[t] = RW(dot(xn + m * D, iwp + (t % Hi) * D, D) * wscale);
        }
#ifdef NS_AVX512BF16
        if (Di % 2 == 0 && Di <= 1024) { /* 16 keys at a time, their dims transposed by pairs: no reductions */
            const int64_t nb = (S + 15) / 16, Dp = Di / 2;
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < M * nb; blk++) {
                const int64_t m = blk / nb, s0 = (blk % nb) * 16, n = S - s0 < 16 ? S - s0 : 16;
                const __mmask16 live = (__mmask16)((1u << n) - 1);
                int32_t off[16] = {0};
                wt keys8[ik8 ? 16 * Di : 1]; /* 8-bit keys: the block's 16 dequantized, gathered from here */
                for (int64_t r = 0; r < n; r++) {
                    const int64_t slot = read_slots ? read_slots[(m / T) * S + s0 + r] : span0 + s0 + r;
                    if (ik8) kv8_cols(ik8, slot, 0, Di, keys8 + r * Di);
                    off[r] = (int32_t)((ik8 ? r : slot) * Dp);
                }
                const __m512i vo = _mm512_loadu_si512(off);
                const void *kbase = ik8 ? (const void *)keys8 : (const void *)iplane;
                __m512i kt[512]; /* kt[j] lane r = dims (2j, 2j+1) of key s0 + r */
                for (int64_t j = 0; j < Dp; j++)
                    kt[j] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live,
                                                         _mm512_add_epi32(vo, _mm512_set1_epi32((int)j)), kbase, 4);
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
                const wt *ob = (const wt *)out;
                for (int64_t r = 0; r < n; r++)
                    isc[m * S + s0 + r] = mask[m * S + s0 + r] ? w2f(ob[r]) : -INFINITY;
            }
        } else
#endif
        {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * S; i++) {
                const int64_t m = i / S, s = i % S;
                if (!mask[i]) { isc[i] = -INFINITY; continue; }
                const int64_t slot = read_slots ? read_slots[(m / T) * S + s] : span0 + s;
                float acc = 0.f;
                if (ik8) { /* an 8-bit key: dequantized once into the stack for every head */
                    wt key[NS_KV8_MAXC];
                    kv8_cols(ik8, slot, 0, Di, key);
                    for (int64_t j = 0; j < Hi; j++) {
                        const float l = RW(dot(key, iq + (m * Hi + j) * Di, Di));
                        if (l > 0.f) acc += l * iw[m * Hi + j];
                    }
                } else {
                    const wt *key = iplane + slot * Di;
                    for (int64_t j = 0; j < Hi; j++) {
                        const float l = RW(dot(key, iq + (m * Hi + j) * Di, Di));
                        if (l > 0.f) acc += l * iw[m * Hi + j];
                    }
                }
                isc[i] = RW(acc);
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
                const int64_t s = om[j];
                sel_mask[m * K + j] = mask[m * S + s];
                sel[m * K + j] = read_slots ? read_slots[(m / T) * S + s] : span0 + s;
            }
        }
    }
}

void ns_dsa_select(const wt *iwq, const wt *iwp, int64_t Hi, int64_t Di, int64_t P, int64_t K,
                   int64_t B, int64_t T, int64_t D, int64_t Oq, int64_t S, const wt *cq, const wt *xn,
                   const float *cos, const float *sin, const uint8_t *mask, const wt *iplane,
                   const int64_t *read_slots, int64_t span0, wt *iq, float *iw, float *isc, int64_t *ord,
                   uint8_t *sel_mask, int64_t *sel, int nt) {
    dsa_select(iwq, iwp, Hi, Di, P, K, B, T, D, Oq, S, cq, xn, cos, sin, mask, iplane, NULL, read_slots, span0, iq,
               iw, isc, ord, sel_mask, sel, nt);
}

/* a block's matrix as ns_mat from its fields (w, s, m) */
static inline ns_mat bmat(const ns_block *b, const void *w, const bf16 *s, const bf16 *m) {
    return (ns_mat){w, s, m, m ? b->qg : 0, m ? b->q8 : 0};
}

/* a block's matrices (unset ones have w NULL) */
typedef struct { ns_mat wx, wkv, wqb, w_o, gu, dn, sgu, sup, sdn; } ns_mats;
static ns_mats block_mats(const ns_block *b) {
    return (ns_mats){bmat(b, b->wx, b->wx_s, b->wx_m), bmat(b, b->wkv, b->wkv_s, b->wkv_m),
                     bmat(b, b->wqb, b->wqb_s, b->wqb_m), bmat(b, b->w_o, b->w_o_s, b->w_o_m),
                     bmat(b, b->gate_up, b->gate_up_s, b->gate_up_m), bmat(b, b->down, b->down_s, b->down_m),
                     bmat(b, b->s_gate_up, b->s_gate_up_s, b->s_gate_up_m), bmat(b, b->s_up, b->s_up_s, b->s_up_m),
                     bmat(b, b->s_down, b->s_down_s, b->s_down_m)};
}

/* bytes of the prepared activations (mprep) of block b's matrices for M rows, the larger of its attention's and
 * its FFN's (as mla_project, mla_absorbed and ffn_block lay them out) */
static int64_t block_a4_bytes(const ns_block *b, int64_t M, int64_t D) {
    const ns_mats m = block_mats(b);
    int64_t att = mprep_bytes(&m.wx, M, D), ffn = 0;
    if (b->qa_norm && mprep_bytes(&m.wqb, M, b->q_out) > att) att = mprep_bytes(&m.wqb, M, b->q_out);
    if (mprep_bytes(&m.w_o, M, b->H * b->V) > att) att = mprep_bytes(&m.w_o, M, b->H * b->V);
    const ns_mat *gx = ffn_gx(&m.gu, b->E > 0, &m.sgu);
    if (gx) ffn += mprep_bytes(gx, M, D);
    if (b->E > 0 && m.dn.mn) ffn += mprep_bytes(&m.dn, M * b->K, b->I);
    if (b->s_gate_up) ffn += mprep_bytes(&m.sdn, M, b->Is);
    return att > ffn ? att : ffn;
}

int ns_decode_stack(const ns_block *blocks, int64_t n_blocks, const wt *x_in, int64_t B, int64_t T,
                     int64_t D, const float *cos_tab, const float *sin_tab, const int64_t *pos, float *cs,
                     const uint8_t *mask_in, int64_t S,
                     void *kv_pool, void *ik_pool, int64_t n_slots, const int64_t *write_slots,
                     const int64_t *read_slots_in, int64_t span0, const int64_t *tables, int64_t nb, int64_t bs,
                     int kv_fmt, int64_t kv_group, float *kv_scales,
                     float *ik_scales, int64_t *sel, wt *rows, wt *ik, wt *xn,
                     wt *xo, wt *cq, wt *q, wt *att, wt *qc, float *sc, float *ol, wt *pb,
                     wt *fxn, wt *act, float *ys, float *rs, float *gw,
                     wt *iq, float *iw, float *isc, int64_t *ord, uint8_t *sel_mask, wt *h, wt *out,
                     int64_t *idx, const wt *norm_w, float norm_eps, wt *hn, const wt *head_w,
                     const bf16 *head_s, int64_t V, int64_t n_logits, wt *hl, wt *logits, int nt) {
    const int64_t M = B * T, half = blocks[0].P / 2;
    const wt *x = x_in;
    float *cos = cs, *sin = cs + M * half; /* the angles of the queries' positions, from the tables */
    for (int64_t m = 0; m < M; m++) {
        memcpy(cos + m * half, cos_tab + pos[m] * half, half * sizeof(float));
        memcpy(sin + m * half, sin_tab + pos[m] * half, half * sizeof(float));
    }
    float lut[256];
    if (kv_fmt) kv8_lut(kv_fmt, lut);
    const ns_mat head = {head_w, head_s, NULL, 0, 0}; /* head_s: an int8 head's scales */
    int64_t a4n = head_w ? mprep_bytes(&head, B * n_logits, D) : 0;
    for (int64_t l = 0; l < n_blocks; l++)
        if (block_a4_bytes(&blocks[l], M, D) > a4n) a4n = block_a4_bytes(&blocks[l], M, D);
    void *a4buf = a4n ? malloc((size_t)a4n) : NULL;
    int64_t *slots = tables ? malloc((size_t)(B * S) * sizeof(int64_t)) : NULL; /* read slots from the tables */
    uint8_t *by_pos = mask_in ? NULL : malloc((size_t)(M * S)); /* the mask from the positions */
    if ((a4n && !a4buf) || (tables && !slots) || (!mask_in && !by_pos)) {
        free(a4buf);
        free(slots);
        free(by_pos);
        return -2;
    }
    for (int64_t b = 0; b < B && tables; b++)
        for (int64_t s = 0; s < S; s++) slots[b * S + s] = tables[b * nb + s / bs] * bs + s % bs;
    for (int64_t m = 0; m < M && by_pos; m++)
        for (int64_t s = 0; s < S; s++) by_pos[m * S + s] = s <= pos[m];
    const int64_t *read_slots = tables ? slots : read_slots_in;
    const uint8_t *mask = mask_in ? mask_in : by_pos;
    for (int64_t l = 0; l < n_blocks; l++) {
        const ns_block *b = &blocks[l];
        const int64_t C = b->R + b->P;
        const ns_mats mt = block_mats(b);
        /* an 8-bit cache's groups per part (kv_quant.py `KVFormat.groups`): kv_group values, or the whole part */
        const int64_t g0 = b->R % kv_group ? b->R : kv_group, g1 = b->P % kv_group ? b->P : kv_group,
                      gi = b->Di % kv_group ? b->Di : kv_group, ns = b->R / g0 + b->P / g1;
        const ns_kv8 k8 = {(const uint8_t *)kv_pool + b->layer * n_slots * C,
                           kv_fmt ? kv_scales + b->layer * n_slots * ns : NULL,
                           lut, C, ns, b->R, g0, g1, kv_fmt == NS_KV_INT8};
        const ns_kv8 ik8 = {(const uint8_t *)ik_pool + b->layer * n_slots * b->Di,
                            kv_fmt && b->Di ? ik_scales + b->layer * n_slots * (b->Di / gi) : NULL, lut, b->Di,
                            b->Di ? b->Di / gi : 0, b->Di, gi, 1, kv_fmt == NS_KV_INT8};
        mla_project(x, M, D, &mt.wx, &mt.wkv, b->ik_wk, b->q_out, b->R, b->P, b->Di, b->qa_norm, b->qa_eps, &mt.wqb,
                    b->H, b->N, b->kv_norm, b->kv_eps, b->ik_w, b->ik_b, b->ik_eps, cos, sin, b->in_norm, b->in_eps,
                    xn, xo, b->qa_norm ? cq : NULL, q, rows, b->Di ? ik : NULL, a4buf, nt);
        wt *plane = kv_fmt ? NULL : (wt *)kv_pool + b->layer * n_slots * C;
        wt *iplane = kv_fmt || !b->Di ? NULL : (wt *)ik_pool + b->layer * n_slots * b->Di;
        if (kv_fmt) { /* the new rows quantized as `RowStore.write` does, each part with its own scales */
            ns_kv8_write(rows, M, b->R, b->P, kv_fmt, g0, g1, write_slots, (uint8_t *)k8.q, (float *)k8.s);
            if (b->Di) ns_kv8_write(ik, M, b->Di, 0, kv_fmt, gi, 1, write_slots, (uint8_t *)ik8.q, (float *)ik8.s);
        } else {
            for (int64_t m = 0; m < M; m++) memcpy(plane + write_slots[m] * C, rows + m * C, C * sizeof(wt));
            if (b->Di)
                for (int64_t m = 0; m < M; m++)
                    memcpy(iplane + write_slots[m] * b->Di, ik + m * b->Di, b->Di * sizeof(wt));
        }
        if (b->topk > 0 && S > b->topk) { /* DSA: each query attends to its top-k rows only */
            dsa_select(b->iwq, b->iwp, b->Hi, b->Di, b->P, b->topk, B, T, D, b->q_out, S, cq, xn, cos, sin, mask,
                       iplane, kv_fmt ? &ik8 : NULL, read_slots, span0, iq, iw, isc, ord, sel_mask, sel, nt);
            mla_absorbed(q, B, T, b->H, b->Nk, b->P, b->kv_b, b->R, b->V, plane, kv_fmt ? &k8 : NULL, sel, b->topk,
                         1, sel_mask, b->scale, att, qc, sc, ol, pb, &mt.w_o, b->Dm, x, h, a4buf, nt);
        } else { /* the rows through the slots, or one request's contiguous span */
            ns_kv8 span = k8;
            if (!read_slots) span.q += span0 * C, span.s = kv_fmt ? span.s + span0 * ns : NULL;
            mla_absorbed(q, B, T, b->H, b->Nk, b->P, b->kv_b, b->R, b->V,
                         kv_fmt || read_slots ? plane : plane + span0 * C, kv_fmt ? &span : NULL, read_slots, S, 0,
                         mask, b->scale, att, qc, sc, ol, pb, &mt.w_o, b->Dm, x, h, a4buf, nt);
        }
        ffn_block(h, M, D, b->post_w, b->post_eps, b->router_w32, b->E, b->bias, b->scoring, b->method, b->n_group,
                  b->topk_group, b->K, b->norm, b->scaling, &mt.gu, &mt.dn, b->I, &mt.sgu, &mt.sup, &mt.sdn, b->Is,
                  out, fxn, act, ys, rs, gw, idx + l * M * b->Kp, a4buf, nt); /* Kp: the largest K of the blocks */
        x = out;
    }
    /* the final norm (hn [M, D]) and the head over each request's last n_logits rows (logits [B, n_logits, V]) */
    ns_rmsnorm(out, M, D, norm_w, norm_eps, hn);
    if (head_w) {
        const wt *xl = hn;
        if (n_logits < T) {
            for (int64_t b = 0; b < B; b++)
                memcpy(hl + b * n_logits * D, hn + (b * T + T - n_logits) * D, n_logits * D * sizeof(wt));
            xl = hl;
        }
        linear_m(xl, B * n_logits, D, head, V, logits, a4buf, nt);
    }
    free(a4buf);
    free(slots);
    free(by_pos);
    return 0;
}

const char *ns_isa(void) { return NS_SIMD_NAME; } /* the variant this library was built for */

/* whether int4 matrices can take their products on int8 activations here (ns_block's q8; quant4.h) */
int ns_q8(void) { return nq_a4_q8(); }

/* The layout of the structs Python passes by pointer, for the check of its ctypes mirrors at load (kernels/abi.py).
 * ns_abi_fields(which): "struct field field ..." (which 0: ns_block), NULL past the last struct;
 * ns_abi(which, out, n): out = [sizeof, then each field's offset and size] (at most n values), returns how many
 * values that is (-1 past the last struct). */
#define NS_NAME(type, name) " " #name
#define NS_LAYOUT(type, name) if (k + 2 <= n) { out[k] = offsetof(ns_block, name); out[k + 1] = sizeof(type); } k += 2;
const char *ns_abi_fields(int which) { return which == 0 ? "ns_block" NS_BLOCK_FIELDS(NS_NAME) : NULL; }

int64_t ns_abi(int which, int64_t *out, int64_t n) {
    if (which != 0) return -1;
    int64_t k = 1;
    if (n >= 1) out[0] = sizeof(ns_block);
    NS_BLOCK_FIELDS(NS_LAYOUT)
    return k;
}
