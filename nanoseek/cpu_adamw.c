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
#ifdef __AVX512F__
#include <immintrin.h>
#define NS_SIMD 1
#endif

#define CHUNK 8192  /* elements per OpenMP work item */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, denormals kept, NaN -> 0xFFFF: what torch's (vectorised) fp32 -> bf16 conversion gives,
 * so the bf16 copy equals `w.to(torch.bfloat16)` bit for bit (the AVX-512 BF16 instruction flushes denormals) */
#define BF16_NAN 0xffffu

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return BF16_NAN;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#ifdef NS_SIMD
static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m256i to_bf16(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(BF16_NAN));
    return _mm512_cvtepi32_epi16(r);
}
#endif

/* sum over i of float(g[i])^2 (g bf16): fp32 within a chunk, then the chunks' sums added in order in double,
 * so the result does not depend on the number of threads */
double ns_sumsq_bf16(const uint16_t *g, int64_t n, int nthreads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    double *part = malloc((size_t)(chunks > 0 ? chunks : 1) * sizeof(double));
    if (!part) return NAN;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t k = 0; k < chunks; k++) {
        int64_t i = k * CHUNK, end = i + CHUNK < n ? i + CHUNK : n;
        float s = 0.0f;
#ifdef NS_SIMD
        __m512 acc = _mm512_setzero_ps();
        for (; i + 16 <= end; i += 16) {
            __m512 x = load_bf16(g + i);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(x, x));
        }
        s = _mm512_reduce_add_ps(acc);
#endif
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
#ifdef NS_SIMD
        const __m512 vs = _mm512_set1_ps(scale), vc1 = _mm512_set1_ps(c1), vb2 = _mm512_set1_ps(b2),
                     vc2 = _mm512_set1_ps(c2), vdec = _mm512_set1_ps(decay), vstep = _mm512_set1_ps(step),
                     vbc2 = _mm512_set1_ps(bc2_sqrt), veps = _mm512_set1_ps(eps);
        for (; i + 16 <= end; i += 16) {
            __m512 g = _mm512_mul_ps(g16 ? load_bf16(g16 + i) : _mm512_loadu_ps(g32 + i), vs);
            __m512 mi = _mm512_loadu_ps(m + i), vi = _mm512_loadu_ps(v + i), wi = _mm512_loadu_ps(w + i);
            mi = _mm512_add_ps(mi, _mm512_mul_ps(vc1, _mm512_sub_ps(g, mi)));
            vi = _mm512_add_ps(_mm512_mul_ps(vb2, vi), _mm512_mul_ps(vc2, _mm512_mul_ps(g, g)));
            __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), vbc2), veps);
            wi = _mm512_sub_ps(_mm512_mul_ps(wi, vdec), _mm512_mul_ps(vstep, _mm512_div_ps(mi, den)));
            _mm512_storeu_ps(m + i, mi);
            _mm512_storeu_ps(v + i, vi);
            _mm512_storeu_ps(w + i, wi);
            _mm256_storeu_si256((__m256i *)(p + i), to_bf16(wi));
        }
#endif
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
