/* <immintrin.h> for running nanoseek's avx512 and avx512bf16 kernel code on a CPU without AVX-512: the intrinsics
 * emulated in portable C by SIMDe (Debian: libsimde-dev), which tests/test_cpu_experts_cross.py,
 * tests/test_kernels_cross.py and tests/test_cpu_quant_cross.py put first on the include path. The few that
 * SIMDe 0.7 lacks are written out here from the Intel SDM's definitions. */
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
typedef simde__mmask16 __mmask16;
#include <string.h>

#ifndef _mm512_cvtepu16_epi32 /* vpmovzxwd: 16 unsigned 16-bit values zero-extended to 32 bits */
static inline __m512i _mm512_cvtepu16_epi32(__m256i a) {
    unsigned short s[16];
    int d[16];
    __m512i r;
    memcpy(s, &a, 32);
    for (int i = 0; i < 16; i++) d[i] = s[i];
    memcpy(&r, d, 64);
    return r;
}
#endif
#ifndef _mm512_cvtepi32_epi16 /* vpmovdw: each 32-bit lane truncated to its low 16 bits */
static inline __m256i _mm512_cvtepi32_epi16(__m512i a) {
    unsigned int s[16];
    unsigned short d[16];
    __m256i r;
    memcpy(s, &a, 64);
    for (int i = 0; i < 16; i++) d[i] = (unsigned short)s[i];
    memcpy(&r, d, 32);
    return r;
}
#endif
#ifndef _mm512_shuffle_f32x4 /* vshuff32x4: 128-bit lanes 0, 1 from a and 2, 3 from b, two bits of imm each */
static inline __m512 _mm512_shuffle_f32x4(__m512 a, __m512 b, int imm) {
    float x[16], y[16], d[16];
    __m512 r;
    memcpy(x, &a, 64), memcpy(y, &b, 64);
    for (int l = 0; l < 4; l++) memcpy(d + 4 * l, (l < 2 ? x : y) + 4 * ((imm >> (2 * l)) & 3), 16);
    memcpy(&r, d, 64);
    return r;
}
#endif
#ifndef _mm512_reduce_add_ps
static inline float _mm512_reduce_add_ps(__m512 v) {
    float f[16], s = 0;
    memcpy(f, &v, 64);
    for (int i = 0; i < 16; i++) s += f[i];
    return s;
}
#endif
/* AVX-512 BF16 pieces SIMDe 0.7 lacks, from the Intel SDM (VCVTNEPS2BF16: round to nearest even, denormal
 * inputs and outputs flushed to zero, NaN quieted) and AVX-512F's masked gather */
#ifndef _mm512_cvtneps_pbh
static inline __m256bh ns_cvtneps_pbh(__m512 a) {
    float f[16];
    unsigned short o[16];
    __m256bh r;
    memcpy(f, &a, 64);
    for (int i = 0; i < 16; i++) {
        unsigned int u;
        memcpy(&u, &f[i], 4);
        if ((u & 0x7f800000u) == 0 && (u & 0x7fffffu)) u &= 0x80000000u; /* denormal -> signed zero */
        if ((u & 0x7fffffffu) > 0x7f800000u) o[i] = (unsigned short)((u >> 16) | 0x40);
        else o[i] = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    memcpy(&r, o, 32);
    return r;
}
#define _mm512_cvtneps_pbh ns_cvtneps_pbh
#endif
#ifndef _mm512_cvtpbh_ps
static inline __m512 ns_cvtpbh_ps(__m256bh a) {
    unsigned short s[16];
    unsigned int u[16];
    __m512 r;
    memcpy(s, &a, 32);
    for (int i = 0; i < 16; i++) u[i] = (unsigned int)s[i] << 16;
    memcpy(&r, u, 64);
    return r;
}
#define _mm512_cvtpbh_ps ns_cvtpbh_ps
#endif
#ifndef _mm512_mask_i32gather_epi32
static inline __m512i ns_mask_i32gather_epi32(__m512i src, __mmask16 k, __m512i vindex, const void *base, int scale) {
    int s[16], idx[16];
    __m512i r;
    memcpy(s, &src, 64);
    memcpy(idx, &vindex, 64);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) memcpy(&s[i], (const char *)base + (long)idx[i] * scale, 4);
    memcpy(&r, s, 64);
    return r;
}
#define _mm512_mask_i32gather_epi32 ns_mask_i32gather_epi32
#endif
/* for cpu_quant.c (simd.h vf_load_s8, vf_load_nibbles) */
#ifndef _mm512_cvtepi8_epi32 /* vpmovsxbd: 16 signed bytes sign-extended to 32 bits */
static inline __m512i _mm512_cvtepi8_epi32(__m128i a) {
    signed char s[16];
    int d[16];
    __m512i r;
    memcpy(s, &a, 16);
    for (int i = 0; i < 16; i++) d[i] = s[i];
    memcpy(&r, d, 64);
    return r;
}
#endif
#ifndef _mm512_cvtepu8_epi32 /* vpmovzxbd: 16 unsigned bytes zero-extended to 32 bits */
static inline __m512i _mm512_cvtepu8_epi32(__m128i a) {
    unsigned char s[16];
    int d[16];
    __m512i r;
    memcpy(s, &a, 16);
    for (int i = 0; i < 16; i++) d[i] = s[i];
    memcpy(&r, d, 64);
    return r;
}
#endif
#ifndef _mm512_cvtepi32_ps /* vcvtdq2ps: each 32-bit integer lane to fp32 (exact below 2^24) */
static inline __m512 _mm512_cvtepi32_ps(__m512i a) {
    int s[16];
    float d[16];
    __m512 r;
    memcpy(s, &a, 64);
    for (int i = 0; i < 16; i++) d[i] = (float)s[i];
    memcpy(&r, d, 64);
    return r;
}
#endif
