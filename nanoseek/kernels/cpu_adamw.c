/* CPU kernels of MasterWeightAdamW (optim.py): one pass per tensor over a bf16 working weight, its fp32 master
 * and AdamW moments, and its bf16 (or fp32, when micro-batches were accumulated) gradient; and the gradients'
 * sum of squares for the clipping norm.
 *
 * The update is torch.optim.AdamW's (decoupled weight decay, bias-corrected moments), in fp32 without FMA
 * contraction; the scalars come precomputed (as fp32) from Python, and the PyTorch reference in optim.py does the
 * same operations in the same order, so the two give the same bits:
 *   g = grad * scale;  m = m + c1 (g - m);  v = b2 v + c2 (g g)      (c1 = 1 - b1, c2 = 1 - b2)
 *   w = w decay - step (m / (sqrt(v) / bc2_sqrt + eps));  p = bf16(w), rounded to nearest even
 *   (decay = 1 - lr wd, step = lr / (1 - b1^t), bc2_sqrt = sqrt(1 - b2^t)).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "simd.h"

#define CHUNK 8192  /* elements per OpenMP work item */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, denormals kept, NaN -> 0xFFFF: what torch's (vectorised) fp32 -> bf16 conversion gives,
 * so the bf16 copy equals `w.to(torch.bfloat16)` bit for bit (the AVX-512 BF16 instruction flushes denormals).
 * Branch-free, so the compiler vectorises the loops that call it. */
#define BF16_NAN 0xffffu

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)BF16_NAN : r;
}

const char *ns_isa(void) { return NS_SIMD_NAME; }

/* sum over i of float(g[i])^2 (g bf16): fp32 within a chunk, then the chunks' sums added in order in double,
 * so the result does not depend on the number of threads */
double ns_sumsq_bf16(const uint16_t *g, int64_t n, int nthreads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    double *part = malloc((size_t)(chunks > 0 ? chunks : 1) * sizeof(double));
    if (!part) return NAN;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t i = k * CHUNK, end = i + CHUNK < n ? i + CHUNK : n;
        /* two accumulators of NS_VW lanes: short fp32 sums (a chunk's 8192 squares in one running sum lose
         * ~1e-5 of relative precision) */
        vf acc0 = vf_zero(), acc1 = vf_zero();
        for (; i + 2 * NS_VW <= end; i += 2 * NS_VW) {
            vf x0 = vf_loadu_bf16(g + i), x1 = vf_loadu_bf16(g + i + NS_VW);
            acc0 = vf_add(acc0, vf_mul(x0, x0));
            acc1 = vf_add(acc1, vf_mul(x1, x1));
        }
        float s = vf_reduce_add(vf_add(acc0, acc1));
        for (; i < end; i++) {
            float x = bf16_to_f32(g[i]);
            s += x * x;
        }
        part[k] = s;
    }
    double total = 0.0;
    for (int64_t k = 0; k < chunks; k++) total += part[k];
    free(part);
    return total;
}

/* one AdamW step of n elements. g16 (bf16) or g32 (fp32): exactly one is non-NULL. */
void ns_adamw_master(uint16_t *p, float *w, float *m, float *v, const uint16_t *g16, const float *g32, int64_t n,
                     float scale, float c1, float b2, float c2, float eps, float decay, float step, float bc2_sqrt,
                     int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < n; c += CHUNK) {
        int64_t i = c, end = c + CHUNK < n ? c + CHUNK : n;
        const vf vs = vf_set1(scale), vc1 = vf_set1(c1), vb2 = vf_set1(b2), vc2 = vf_set1(c2),
                 vdec = vf_set1(decay), vstep = vf_set1(step), vbc2 = vf_set1(bc2_sqrt), veps = vf_set1(eps);
        for (; i + NS_VW <= end; i += NS_VW) {
            vf g = vf_mul(g16 ? vf_loadu_bf16(g16 + i) : vf_loadu(g32 + i), vs);
            vf mi = vf_loadu(m + i), vi = vf_loadu(v + i), wi = vf_loadu(w + i);
            mi = vf_add(mi, vf_mul(vc1, vf_sub(g, mi)));
            vi = vf_add(vf_mul(vb2, vi), vf_mul(vc2, vf_mul(g, g)));
            vf den = vf_add(vf_div(vf_sqrt(vi), vbc2), veps);
            wi = vf_sub(vf_mul(wi, vdec), vf_mul(vstep, vf_div(mi, den)));
            vf_storeu(m + i, mi);
            vf_storeu(v + i, vi);
            vf_storeu(w + i, wi);
        }
        for (int64_t j = c; j < i; j++) p[j] = f32_to_bf16(w[j]); /* vectorised by the compiler */
        for (; i < end; i++) {
            float g = (g16 ? bf16_to_f32(g16[i]) : g32[i]) * scale;
            float mi = m[i] + c1 * (g - m[i]);
            float vi = b2 * v[i] + c2 * (g * g);
            float wi = w[i] * decay - step * (mi / (sqrtf(vi) / bc2_sqrt + eps));
            m[i] = mi;
            v[i] = vi;
            w[i] = wi;
            p[i] = f32_to_bf16(wi);
        }
    }
}
