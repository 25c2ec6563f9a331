/* Self-test of cpu_quant.c for any variant, the ones this CPU cannot run included (tests/test_cpu_quant_cross.py
 * runs it natively for the scalar build, under qemu for NEON, with SIMDe's emulated intrinsics for AVX-512):
 * nq_int8, nq_int4 (G = 32, 64, 128) and, where the build has it on this CPU (AVX512-VNNI, AVX2: nq_q8), nq_int4_q8
 * on random codes, scales and activations, fp32 and bf16 activations,
 * M = 1..8 rows, N not a multiple of any vector width, K with a tail (int8) or several groups (int4), against
 * plain double loops over the dequantized weight. Bound per output: fp32 sums of K products (each rounded
 * once) stay within (K + 2) * 2^-24 * sum_k |x_k w_k| of the exact value (Higham's gamma_K, plus the scale's
 * rounding); a bf16 output adds its own rounding, 2^-8 of the value.
 * Build: <cc> <variant flags> -fopenmp -I nanoseek/kernels this.c nanoseek/kernels/cpu_quant.c -lm
 * Prints "variant <name>", whether it ran int4 on int8 activations, one line per failing case, "N passed,
 * N failed"; exits 1 if any failed. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;
const char *nq_isa(void);
int nq_int8(const void *, int64_t, int64_t, const int8_t *, const bf16 *, int64_t, void *, int, int);
int nq_int4(const void *, int64_t, int64_t, const uint8_t *, const bf16 *, const bf16 *, int64_t, int64_t, void *,
            int, int);
int nq_int4_q8(const void *, int64_t, int64_t, const uint8_t *, const bf16 *, const bf16 *, int64_t, int64_t,
               void *, int, int);
int nq_q8(void);

static uint64_t state = 88172645463325252ull;
static uint32_t bits(void) {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (uint32_t)(state >> 32);
}
static float rnd(void) { return (float)(bits() >> 8) * (2.0f / (1 << 24)) - 1.0f; } /* uniform in [-1, 1) */
static float from_bf16(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static bf16 to_bf16(float f) { /* truncation: any bf16 is a fine input */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (bf16)(u >> 16);
}

static int passed, failed;

/* one case: x [M, K] random (fp32, or bf16 when bf), a random weight in the format (G = 0: int8); q8: int4 on
 * int8 activations (nq_int4_q8), checked against the weight times x quantized as it quantizes it (per block of 32
 * values: dx = max|x| / 127, codes rint(x * (127 / max|x|))), the magnitude over the codes' and the mins' parts */
static void check(int64_t M, int64_t N, int64_t K, int64_t G, int bf, int q8) {
    const int64_t ng = G ? K / G : 1;
    float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N);
    bf16 *xb = malloc(sizeof(bf16) * M * K), *yb = malloc(sizeof(bf16) * M * N);
    double *w = malloc(sizeof(double) * N * K);
    int8_t *c8 = malloc(N * K);
    uint8_t *c4 = malloc(N * K / 2 + 1);
    bf16 *scale = malloc(sizeof(bf16) * N * ng), *mn = malloc(sizeof(bf16) * N * ng);
    double *xh = malloc(sizeof(double) * M * K); /* x as the kernel multiplies it */
    for (int64_t t = 0; t < M * K; t++) xb[t] = to_bf16(rnd()), x[t] = bf ? from_bf16(xb[t]) : rnd();
    for (int64_t b = 0; b < M * K / 32 * q8; b++) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b * 32 + i]));
        const float inv = amax > 0 ? 127 / amax : 0;
        for (int i = 0; i < 32; i++) xh[b * 32 + i] = (double)(amax / 127) * lrintf(x[b * 32 + i] * inv);
    }
    for (int64_t t = 0; t < M * K * !q8; t++) xh[t] = x[t];
    for (int64_t t = 0; t < N * ng; t++) scale[t] = to_bf16(0.01f + 0.1f * fabsf(rnd())), mn[t] = to_bf16(rnd());
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            if (G) {
                const int q = (int)(bits() % 16);
                if (k % 2 == 0) c4[(n * K + k) / 2] = (uint8_t)q;
                else c4[(n * K + k) / 2] |= (uint8_t)(q << 4);
                w[n * K + k] = q * (double)from_bf16(scale[n * ng + k / G]) + from_bf16(mn[n * ng + k / G]);
            } else {
                c8[n * K + k] = (int8_t)((int)(bits() % 255) - 127);
                w[n * K + k] = c8[n * K + k] * (double)from_bf16(scale[n]);
            }
        }
    const void *xin = bf ? (const void *)xb : (const void *)x;
    void *out = bf ? (void *)yb : (void *)y;
    const int rc = q8 ? nq_int4_q8(xin, M, K, c4, scale, mn, G, N, out, bf, 3)
                   : G ? nq_int4(xin, M, K, c4, scale, mn, G, N, out, bf, 3)
                       : nq_int8(xin, M, K, c8, scale, N, out, bf, 3);
    int bad = rc != 0;
    double worst = 0;
    for (int64_t m = 0; m < M && !bad; m++)
        for (int64_t n = 0; n < N; n++) {
            double exact = 0, mag = 0;
            for (int64_t k = 0; k < K; k++) {
                const double mk = G ? from_bf16(mn[n * ng + k / G]) : 0; /* the min's part, summed apart by q8 */
                exact += xh[m * K + k] * w[n * K + k];
                mag += fabs(xh[m * K + k]) * (q8 ? fabs(w[n * K + k] - mk) + fabs(mk) : fabs(w[n * K + k]));
            }
            const double got = bf ? from_bf16(yb[m * N + n]) : y[m * N + n];
            const double bound = (K + 2) * ldexp(mag, -24) + (bf ? ldexp(fabs(exact), -8) * 1.0001 : 0);
            const double e = fabs(got - exact);
            if (!(e <= bound)) bad = 1; /* (a NaN fails too) */
            if (e / (bound > 0 ? bound : 1) > worst) worst = e / (bound > 0 ? bound : 1);
        }
    if (bad) {
        failed++;
        printf("FAILED %s M=%ld N=%ld K=%ld G=%ld %s rc=%d worst error / bound %.3g\n",
               q8 ? "int4 on int8 activations" : G ? "int4" : "int8", (long)M,
               (long)N, (long)K, (long)G, bf ? "bf16" : "fp32", rc, worst);
    } else passed++;
    free(x), free(y), free(xb), free(yb), free(w), free(c8), free(c4), free(scale), free(mn), free(xh);
}

int main(void) {
    printf("variant %s\nint4 on int8 activations: %s\n", nq_isa(), nq_q8() ? "yes" : "not on this CPU or build");
    for (int bf = 0; bf < 2; bf++)
        for (int64_t M = 1; M <= 8; M++) {
            check(M, 37, 203, 0, bf, 0);   /* int8: K with a vector tail and a scalar tail */
            check(M, 19, 1024, 0, bf, 0);  /* int8: whole steps of 64 codes */
            for (int64_t G = 32; G <= 128; G *= 2) { /* int4: three groups (a short last q8 step of 128) */
                check(M, 37, 3 * G, G, bf, 0);
                if (nq_q8()) check(M, 37, 3 * G, G, bf, 1);
            }
        }
    /* a K that is not a multiple of G: refused */
    const float x[96] = {0};
    const uint8_t q[48] = {0};
    const bf16 s[3] = {0};
    float y[1];
    const int q8_refused = !nq_q8() || nq_int4_q8(x, 1, 96, q, s, s, 64, 1, y, 0, 1) == -1;
    if (nq_int4(x, 1, 96, q, s, s, 64, 1, y, 0, 1) == -1 && q8_refused) passed++;
    else failed++, printf("FAILED: K = 96 with G = 64 was not refused\n");
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
