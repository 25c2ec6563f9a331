/* Self-test of cpu_experts.c for a variant this CPU cannot run (tests/test_cpu_experts_cross.py runs it under
 * qemu, or with SIMDe's emulated AVX-512): the three grouped GEMMs, float32 and bf16, on random operands with
 * empty and odd-sized groups, against plain double-precision loops; bf16 ties round to even.
 * Build: <cc> <variant flags> -fopenmp -I nanoseek/kernels this.c nanoseek/kernels/cpu_experts.c -lm
 * It prints one line per check and exits 1 if any is off. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;
const char *ne_isa(void);
int ne_fwd_f32(const float *, const float *, const int32_t *, long, long, long, long, float *, int);
int ne_dgrad_f32(const float *, const float *, const int32_t *, long, long, long, long, float *, int);
int ne_wgrad_f32(const float *, const float *, const int32_t *, long, long, long, long, float *, int);
int ne_fwd(const bf16 *, const bf16 *, const int32_t *, long, long, long, long, bf16 *, int);
int ne_dgrad(const bf16 *, const bf16 *, const int32_t *, long, long, long, long, bf16 *, int);
int ne_wgrad(const bf16 *, const bf16 *, const int32_t *, long, long, long, long, bf16 *, int);

static uint64_t state = 88172645463325252ull;
static float rnd(void) { /* uniform in [-1, 1) */
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (float)((state >> 40) * (2.0 / (1 << 24)) - 1.0);
}
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

/* the three references in double over rows grouped by ends; out0 [M, N], out1 [M, K], out2 [G, N, K] */
static void reference(const float *x, const float *w, const float *dy, const int32_t *ends, long G, long M, long N,
                      long K, double *y, double *dx, double *dw) {
    memset(y, 0, sizeof(double) * M * N), memset(dx, 0, sizeof(double) * M * K);
    memset(dw, 0, sizeof(double) * G * N * K);
    for (long g = 0, r0 = 0; g < G; r0 = ends[g++])
        for (long r = r0; r < ends[g]; r++)
            for (long n = 0; n < N; n++)
                for (long k = 0; k < K; k++) {
                    const double wv = w[(g * N + n) * K + k];
                    y[r * N + n] += (double)x[r * K + k] * wv;
                    dx[r * K + k] += (double)dy[r * N + n] * wv;
                    dw[(g * N + n) * K + k] += (double)dy[r * N + n] * x[r * K + k];
                }
}

/* max |got - ref| / max |ref| (NaN if any output is NaN) */
static double rel_err(const float *got, const double *ref, long n) {
    double e = 0, m = 0;
    for (long i = 0; i < n; i++) {
        const double d = fabs(got[i] - ref[i]);
        if (!(d <= e)) e = d;
        m = fmax(m, fabs(ref[i]));
    }
    return m > 0 ? e / m : e;
}

/* whether every bf16 output is within half a bf16 ulp of the exact value (the rounding), plus the fp32 sum's
 * error, 1e-5 of the largest value */
static int bf16_close(const bf16 *got, const double *ref, long n) {
    double m = 0;
    for (long i = 0; i < n; i++) m = fmax(m, fabs(ref[i]));
    for (long i = 0; i < n; i++)
        if (!(fabs(from_bf16(got[i]) - ref[i]) <= fabs(ref[i]) / 256 + 1e-5 * m)) return 0;
    return 1;
}

int main(void) {
    static const int sizes[] = {16, 0, 7, 1, 33, 270, 8, 13};
    const long G = sizeof sizes / sizeof *sizes;
    const long shapes[][2] = {{64, 48}, {80, 16}, {288, 272}};
    int32_t ends[sizeof sizes / sizeof *sizes];
    long used = 0;
    for (long g = 0; g < G; g++) ends[g] = (int32_t)(used += sizes[g]);
    const long M = used + 5; /* rows past the last group: zeros in y and dx */
    int bad = 0;
    printf("variant %s\n", ne_isa());
    { /* ties round to even: rows 1 + 2^-8 (between 1 and 1 + 2^-7: to 1) and 1 + 3 * 2^-8 (to 1 + 2^-6) */
        bf16 xt[2 * 16] = {0}, wt[16 * 16] = {0}, yt[2 * 16];
        const int32_t one[1] = {2};
        xt[0] = xt[16] = 0x3f80, xt[1] = 0x3b80, xt[17] = 0x3c40; /* 1, 2^-8, 3 * 2^-8 */
        for (int n = 0; n < 16; n++) wt[n * 16] = wt[n * 16 + 1] = 0x3f80;
        const int ok = ne_fwd(xt, wt, one, 1, 2, 16, 16, yt, 1) == 0 && yt[0] == 0x3f80 && yt[16] == 0x3f82;
        printf("bf16 ties to even: %s\n", ok ? "ok" : "FAILED");
        bad |= !ok;
    }
    for (int s = 0; s < 3; s++) {
        const long N = shapes[s][0], K = shapes[s][1];
        float *x = malloc(4 * M * K), *w = malloc(4 * G * N * K), *dy = malloc(4 * M * N);
        bf16 *xb = malloc(2 * M * K), *wb = malloc(2 * G * N * K), *dyb = malloc(2 * M * N);
        for (long i = 0; i < M * K; i++) x[i] = from_bf16(xb[i] = to_bf16(rnd()));
        for (long i = 0; i < G * N * K; i++) w[i] = from_bf16(wb[i] = to_bf16(rnd()));
        for (long i = 0; i < M * N; i++) dy[i] = from_bf16(dyb[i] = to_bf16(rnd()));
        double *y = malloc(8 * M * N), *dx = malloc(8 * M * K), *dw = malloc(8 * G * N * K);
        reference(x, w, dy, ends, G, M, N, K, y, dx, dw);
        float *o[3] = {malloc(4 * M * N), malloc(4 * M * K), malloc(4 * G * N * K)};
        bf16 *ob[3] = {malloc(2 * M * N), malloc(2 * M * K), malloc(2 * G * N * K)};
        const long len[3] = {M * N, M * K, G * N * K};
        const double *ref[3] = {y, dx, dw};
        for (int k = 0; k < 3; k++) memset(o[k], 0xff, 4 * len[k]), memset(ob[k], 0xff, 2 * len[k]); /* NaNs */
        int rc = ne_fwd_f32(x, w, ends, G, M, N, K, o[0], 2) | ne_dgrad_f32(dy, w, ends, G, M, N, K, o[1], 2) |
                 ne_wgrad_f32(dy, x, ends, G, M, N, K, o[2], 2) | ne_fwd(xb, wb, ends, G, M, N, K, ob[0], 2) |
                 ne_dgrad(dyb, wb, ends, G, M, N, K, ob[1], 2) | ne_wgrad(dyb, xb, ends, G, M, N, K, ob[2], 2);
        static const char *names[3] = {"fwd", "dgrad", "wgrad"};
        for (int k = 0; k < 3; k++) {
            const double e32 = rel_err(o[k], ref[k], len[k]);
            const int b16 = bf16_close(ob[k], ref[k], len[k]), ok = rc == 0 && e32 < 1e-5 && b16;
            printf("%ldx%ld %-5s fp32 max error %.2e of the largest value, bf16 %s: %s\n", N, K, names[k], e32,
                   b16 ? "within half an ulp" : "off", ok ? "ok" : "FAILED");
            bad |= !ok;
        }
        for (int k = 0; k < 3; k++) free(o[k]), free(ob[k]);
        free(x), free(w), free(dy), free(xb), free(wb), free(dyb), free(y), free(dx), free(dw);
    }
    return bad;
}
