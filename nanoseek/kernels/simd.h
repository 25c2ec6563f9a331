/* simd.h: the one vector layer under nanoseek's C kernels, so each kernel is written once and compiled per ISA
 * (kernels/isa.py picks the flags: AVX-512 BF16, AVX-512, AVX2 + FMA, ARM64 NEON, with or without BFDOT).
 *
 *   vf                NS_VW fp32 lanes (16 AVX-512, 8 AVX2, 4 NEON, 1 scalar)
 *   vf_zero/set1/loadu/storeu/add/sub/mul/div/sqrt/max/fmadd(a, b, c) = a * b + c (fused)
 *   vf_loadu_bf16(p)  NS_VW bf16 values widened to fp32 (exact: a bf16 is the high half of an fp32)
 *   vf_reduce_add(v)  the lanes' sum, in a fixed order per ISA
 *   ns_prefetch(p)    a read prefetch into L1
 *   ns_prefetch_nta(p) a read prefetch of data read once (weights streamed by decode): non-temporal on x86,
 *                     ns_prefetch elsewhere
 *   NS_BF16_DOT       defined where the CPU has a bf16 pair dot product (AVX-512 BF16): vf_dpbf16(acc, a, b)
 *                     adds a[2i] * b[2i] + a[2i+1] * b[2i+1] to lane i, over 2 * NS_VW bf16 values of a and b
 *   NS_SIMD_NAME      the variant's name, for ns_isa() in each library
 *   vf_transpose, vf_storeu_bf16: in the block added for cpu_experts.c, at the end
 *   vf_load_s8, vf_load_nibbles: in the block added for cpu_quant.c, after it
 *
 * Everything else is portable C; a scalar build (no vector ISA) is kept so that the C self-test can compare
 * every variant with plain loops on the same inputs (tests/kernels_selftest.c).
 */
#ifndef NANOSEEK_SIMD_H
#define NANOSEEK_SIMD_H
#include <stdint.h>
#include <string.h>

/* bf16 scalars, shared by every kernel file: the top half of an fp32 */
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

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define NS_VW 16
#if defined(__AVX512BF16__)
#define NS_SIMD_NAME "avx512bf16"
#define NS_BF16_DOT 1
#else
#define NS_SIMD_NAME "avx512"
#endif
typedef __m512 vf;
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_set1(float x) { return _mm512_set1_ps(x); }
static inline vf vf_loadu(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf_storeu(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vf_sqrt(vf a) { return _mm512_sqrt_ps(a); }
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_loadu_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline float vf_reduce_add(vf v) { return _mm512_reduce_add_ps(v); }
#if defined(NS_BF16_DOT)
static inline vf vf_dpbf16(vf acc, const uint16_t *a, const uint16_t *b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a), (__m512bh)_mm512_loadu_si512(b));
}
#endif
#define ns_prefetch(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define ns_prefetch_nta(p) _mm_prefetch((const char *)(p), _MM_HINT_NTA)

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NS_VW 8
#define NS_SIMD_NAME "avx2"
typedef __m256 vf;
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_set1(float x) { return _mm256_set1_ps(x); }
static inline vf vf_loadu(const float *p) { return _mm256_loadu_ps(p); }
static inline void vf_storeu(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vf_sqrt(vf a) { return _mm256_sqrt_ps(a); }
static inline vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_loadu_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline float vf_reduce_add(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define ns_prefetch(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define ns_prefetch_nta(p) _mm_prefetch((const char *)(p), _MM_HINT_NTA)

#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define NS_VW 4
#if defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
#define NS_SIMD_NAME "neon-bf16"
#else
#define NS_SIMD_NAME "neon"
#endif
typedef float32x4_t vf;
static inline vf vf_zero(void) { return vdupq_n_f32(0.f); }
static inline vf vf_set1(float x) { return vdupq_n_f32(x); }
static inline vf vf_loadu(const float *p) { return vld1q_f32(p); }
static inline void vf_storeu(float *p, vf v) { vst1q_f32(p, v); }
static inline vf vf_add(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf vf_sub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf vf_mul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf vf_div(vf a, vf b) { return vdivq_f32(a, b); }
static inline vf vf_sqrt(vf a) { return vsqrtq_f32(a); }
static inline vf vf_max(vf a, vf b) { return vmaxq_f32(a, b); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline vf vf_loadu_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
static inline float vf_reduce_add(vf v) { return vaddvq_f32(v); }
#define ns_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
#define ns_prefetch_nta(p) ns_prefetch(p) /* (untimed on ARM hardware: kept as it was) */

#else /* scalar: the reference build of the self-test */
#define NS_VW 1
#define NS_SIMD_NAME "scalar"
typedef float vf;
static inline vf vf_zero(void) { return 0.f; }
static inline vf vf_set1(float x) { return x; }
static inline vf vf_loadu(const float *p) { return *p; }
static inline void vf_storeu(float *p, vf v) { *p = v; }
static inline vf vf_add(vf a, vf b) { return a + b; }
static inline vf vf_sub(vf a, vf b) { return a - b; }
static inline vf vf_mul(vf a, vf b) { return a * b; }
static inline vf vf_div(vf a, vf b) { return a / b; }
static inline vf vf_sqrt(vf a) { return __builtin_sqrtf(a); }
static inline vf vf_max(vf a, vf b) { return a > b ? a : b; }
static inline vf vf_fmadd(vf a, vf b, vf c) { return __builtin_fmaf(a, b, c); }
static inline vf vf_loadu_bf16(const uint16_t *p) {
    uint32_t u = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float vf_reduce_add(vf v) { return v; }
#define ns_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
#define ns_prefetch_nta(p) ns_prefetch(p)
#endif

/* ---- bf16 pair dot products on every ISA (for cpu_decode.c) ------------------------------------------------
 *   vbf2               2 * NS_VW bf16 values as vf_dot2 takes them: vbf2_loadu(p)
 *   vf_dot2(acc, a, b) lane i += a[2i+1] * b[2i+1], then += a[2i] * b[2i]
 * With NS_BF16_DOT that is VDPBF16PS itself. Elsewhere two FMAs over the pairs widened in place: a pair of bf16
 * in a 32-bit lane holds the odd one in its high half (an fp32 once the low half is cleared) and the even one in
 * its low half (an fp32 once shifted up), so no lane crosses and no widening shuffle is needed. The odd product
 * goes first, as in VDPBF16PS's documented operation; a product of two bf16 values is exact in fp32, so each FMA
 * rounds once, as each of its accumulations does (VDPBF16PS also flushes denormals, these FMAs do not). */
#if defined(NS_BF16_DOT)
typedef __m512bh vbf2;
static inline vbf2 vbf2_loadu(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512(p); }
static inline vf vf_dot2(vf acc, vbf2 a, vbf2 b) { return _mm512_dpbf16_ps(acc, a, b); }
#else
typedef struct { vf odd, even; } vbf2;
#if NS_VW == 16
static inline vbf2 vbf2_loadu(const uint16_t *p) {
    const __m512i u = _mm512_loadu_si512(p);
    return (vbf2){_mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u))),
                  _mm512_castsi512_ps(_mm512_slli_epi32(u, 16))};
}
#elif NS_VW == 8
static inline vbf2 vbf2_loadu(const uint16_t *p) {
    const __m256i u = _mm256_loadu_si256((const __m256i *)p);
    return (vbf2){_mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u))),
                  _mm256_castsi256_ps(_mm256_slli_epi32(u, 16))};
}
#elif NS_VW == 4
static inline vbf2 vbf2_loadu(const uint16_t *p) {
    const uint32x4_t u = vreinterpretq_u32_u16(vld1q_u16(p));
    return (vbf2){vreinterpretq_f32_u32(vandq_u32(u, vdupq_n_u32(0xffff0000u))),
                  vreinterpretq_f32_u32(vshlq_n_u32(u, 16))};
}
#else
static inline vbf2 vbf2_loadu(const uint16_t *p) { return (vbf2){vf_loadu_bf16(p + 1), vf_loadu_bf16(p)}; }
#endif
static inline vf vf_dot2(vf acc, vbf2 a, vbf2 b) { return vf_fmadd(a.even, b.even, vf_fmadd(a.odd, b.odd, acc)); }
#endif
/* ---- end of the block for cpu_decode.c ---------------------------------------------------------------------- */

/* ---- Added for cpu_experts.c (its float32 GEMMs and the bf16 path without a bf16 dot product) ----
 *   vf_transpose(r)       r[0..NS_VW) as the rows of an NS_VW x NS_VW block, transposed in place
 *   vf_storeu_bf16(p, v)  the NS_VW lanes rounded to bf16 (to nearest, ties to even; a NaN stores 0x7fc0, as
 *                         PyTorch's float -> bfloat16 conversion does)
 */
#if NS_VW == 16
static inline void vf_transpose(vf r[16]) {
    vf t[16], u[16];
    for (int k = 0; k < 8; k++) { /* rows 2k, 2k+1 interleaved per 128-bit lane */
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; k++) { /* u[4k + c]: rows 4k..4k+3 of columns c, c+4, c+8, c+12 (one per lane) */
        u[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
        u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
        u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
        u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) { /* gather lane L of u[c], u[4+c], u[8+c], u[12+c]: column c + 4L */
        const vf v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        const vf w0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD), w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_f32x4(v0, v1, 0x88);
        r[c + 8] = _mm512_shuffle_f32x4(v0, v1, 0xDD);
        r[c + 4] = _mm512_shuffle_f32x4(w0, w1, 0x88);
        r[c + 12] = _mm512_shuffle_f32x4(w0, w1, 0xDD);
    }
}
static inline void vf_storeu_bf16(uint16_t *p, vf v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
}
#elif NS_VW == 8
static inline void vf_transpose(vf r[8]) {
    __m256 t[8], s[8];
    for (int k = 0; k < 4; k++) {
        t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 2; k++) { /* s[4k + c]: rows 4k..4k+3 of column c (low half) and c+4 (high half) */
        s[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
        s[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
        s[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
        s[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
        r[c + 4] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
    }
}
static inline void vf_storeu_bf16(uint16_t *p, vf v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#elif NS_VW == 4
static inline void vf_transpose(vf r[4]) {
    const float32x4x2_t ab = vtrnq_f32(r[0], r[1]), cd = vtrnq_f32(r[2], r[3]);
    r[0] = vcombine_f32(vget_low_f32(ab.val[0]), vget_low_f32(cd.val[0]));
    r[1] = vcombine_f32(vget_low_f32(ab.val[1]), vget_low_f32(cd.val[1]));
    r[2] = vcombine_f32(vget_high_f32(ab.val[0]), vget_high_f32(cd.val[0]));
    r[3] = vcombine_f32(vget_high_f32(ab.val[1]), vget_high_f32(cd.val[1]));
}
static inline void vf_storeu_bf16(uint16_t *p, vf v) {
    const uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t odd = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    const uint16x4_t r = vshrn_n_u32(vaddq_u32(u, vaddq_u32(odd, vdupq_n_u32(0x7fff))), 16);
    vst1_u16(p, vbsl_u16(vmovn_u32(vceqq_f32(v, v)), r, vdup_n_u16(0x7fc0)));
}
#else
static inline void vf_transpose(vf r[1]) { (void)r; }
static inline void vf_storeu_bf16(uint16_t *p, vf v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    *p = v != v ? 0x7fc0 : (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
#endif
/* ---- end of the cpu_experts.c additions ---- */

/* ---- Added for cpu_quant.c (weight codes widened to fp32; exact: |code| < 2^24) ----
 *   vf_load_s8(p)                 NS_VW int8 values as fp32
 *   vf_load_nibbles(p, lo, hi)    NS_VW bytes: their low nibbles as fp32 in *lo, their high nibbles in *hi
 */
#if NS_VW == 16
static inline vf vf_load_s8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline void vf_load_nibbles(const uint8_t *p, vf *lo, vf *hi) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
#elif NS_VW == 8
static inline vf vf_load_s8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline void vf_load_nibbles(const uint8_t *p, vf *lo, vf *hi) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
#elif NS_VW == 4
static inline vf vf_load_s8(const int8_t *p) {
    int32_t u;
    memcpy(&u, p, 4); /* exactly the 4 bytes: a vld1_s8 would read 8 */
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(u))))));
}
static inline void vf_load_nibbles(const uint8_t *p, vf *lo, vf *hi) {
    uint32_t u;
    memcpy(&u, p, 4);
    const uint32x4_t b = vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(u)))));
    *lo = vcvtq_f32_u32(vandq_u32(b, vdupq_n_u32(15)));
    *hi = vcvtq_f32_u32(vshrq_n_u32(b, 4));
}
#else
static inline vf vf_load_s8(const int8_t *p) { return (float)*p; }
static inline void vf_load_nibbles(const uint8_t *p, vf *lo, vf *hi) {
    *lo = (float)(*p & 15);
    *hi = (float)(*p >> 4);
}
#endif
/* ---- end of the cpu_quant.c additions ---- */

#endif
