/* The int8 weight rows' dot products (nanoseek/quant.py's int8: codes int8 [N, K], a bf16 scale per row), shared
 * by cpu_quant.c (nq_int8, nq_experts) and cpu_decode.c (the quantized decode stack, ns_decode_stack), so that
 * both compute a row the same way: the codes widened to fp32 in registers, fp32 FMAs, no dequantized copy.
 * Include after simd.h. The rows of x are NQ_X values, loaded NS_VW at a time as fp32 by NQ_XLOAD and one by one
 * by NQ_X2F, and the function is named NQ_DOT: by default fp32 rows and dot_s8 (cpu_quant.c widens x once per
 * call). A file may include it again with other definitions of the four for another row type (cpu_decode.c: its
 * model dtype's rows, and fp32 ones); each include undefines them.
 */
#ifndef NQ_X
#define NQ_X float
#define NQ_XLOAD(p) vf_loadu(p)
#define NQ_X2F(v) (v)
#define NQ_DOT dot_s8
#endif

#define NQ_ROWS 4                      /* rows of x per pass over a weight row */
#define NQ_STEP 64                     /* int8 codes per step: one cache line */
#define NQ_OPS (NQ_STEP / NS_VW)       /* vector ops per step */
#define NQ_ACC (NS_VW >= 8 ? 2 : 4)    /* accumulators per row (as cpu_decode.c: NEON's narrow vectors take 4) */
#define NQ_AHEAD 2048                  /* prefetch distance in bytes of codes (cpu_decode.c measured 2 KB best) */

/* out[j] = sum_k x[j][k] * w[k] for j < r (r <= NQ_ROWS), w int8 */
static inline __attribute__((always_inline)) void NQ_DOT(const NQ_X *const *x, const int r, const int8_t *w,
                                                          int64_t K, float *out) {
    vf acc[NQ_ROWS][NQ_ACC];
    for (int j = 0; j < r; j++)
        for (int u = 0; u < NQ_ACC; u++) acc[j][u] = vf_zero();
    int64_t i = 0;
    for (; i + NQ_STEP <= K; i += NQ_STEP) {
        ns_prefetch(w + i + NQ_AHEAD);
        for (int v = 0; v < NQ_OPS; v++) {
            const vf wv = vf_load_s8(w + i + v * NS_VW);
            for (int j = 0; j < r; j++)
                acc[j][v % NQ_ACC] = vf_fmadd(NQ_XLOAD(x[j] + i + v * NS_VW), wv, acc[j][v % NQ_ACC]);
        }
    }
    for (; i + NS_VW <= K; i += NS_VW) {
        const vf wv = vf_load_s8(w + i);
        for (int j = 0; j < r; j++) acc[j][0] = vf_fmadd(NQ_XLOAD(x[j] + i), wv, acc[j][0]);
    }
    for (int j = 0; j < r; j++) {
        vf t = acc[j][0];
        for (int u = 1; u < NQ_ACC; u++) t = vf_add(t, acc[j][u]);
        float s = vf_reduce_add(t);
        for (int64_t k = i; k < K; k++) s += NQ_X2F(x[j][k]) * (float)w[k];
        out[j] = s;
    }
}
#undef NQ_X
#undef NQ_XLOAD
#undef NQ_X2F
#undef NQ_DOT
