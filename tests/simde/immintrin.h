/* <immintrin.h> for running nanoseek's avx512 (no BF16) kernel code on a CPU without AVX-512: the intrinsics
 * emulated in portable C by SIMDe (Debian: libsimde-dev), which tests/test_cpu_experts_cross.py puts first on the
 * include path. The few that SIMDe 0.7 lacks are written out here from the Intel SDM's definitions. */
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
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
