/* Grouped bf16 GEMMs of the routed experts for CPU training (DeepSeekMoE, DeepSeek-V3 report §2.1.2).
 *
 * After dispatch, the (token, expert) pairs sit in rows grouped by expert: group g owns rows [ends[g-1], ends[g]).
 * A training step runs three grouped GEMMs per expert projection W_g [N, K] (nn.Linear layout):
 *   forward      y_g  = x_g  W_g^T      [rows, N]   (ne_fwd)
 *   input grad   dx_g = dy_g W_g        [rows, K]   (ne_dgrad)
 *   weight grad  dW_g = dy_g^T x_g      [N, K]      (ne_wgrad)
 * PyTorch's CPU `_grouped_mm` runs one oneDNN call per group, each split across the threads: at ~150 rows an
 * expert, the threads meet after every small GEMM and the packing is redone per call. Here each thread takes
 * whole (group, column block) tasks and packs what its task needs.
 *
 * Arithmetic: AVX-512 BF16 `vdpbf16ps` (a += a0*b0 + a1*b1 in fp32 over pairs of the reduction dimension, pairs in
 * order), fp32 accumulation, one round to bf16 at the end (round to nearest even): on this machine's CPU (AMD
 * Zen 5) the results are bit-identical to `torch._grouped_mm`'s, whose oneDNN kernels sum in the same order.
 * Operands:
 *   A: pair p of row r (two bf16 of the reduction dimension) is the 32-bit word A[r*ar + p*ap];
 *   B: packed in panels of 16 columns: panel j, pair p holds the 16 words (columns 16j..16j+15) at
 *      B[(j*P + p)*16], P = pairs of the reduction dimension ("VNNI" layout).
 * Requirements (the caller checks them and otherwise takes PyTorch): N and K multiples of 16.
 * A reduction over an odd number of rows (the weight gradient) gets a zero pad row in the packing.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef uint16_t bf16;
typedef uint32_t u32;

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

int ne_available(void) { return 1; }

#define MR 8 /* rows per register tile */

/* C [ROWS, 16*NV] = the A tile @ NV panels of B (P pairs each); one bf16 rounding per output */
#define TILE(NAME, ROWS, NV)                                                                                      \
    static inline __attribute__((always_inline)) void NAME(const u32 *A, long ar, long ap, const u32 *B, long P, \
                                                           bf16 *C, long ldc) {                                  \
        __m512 acc[ROWS][NV];                                                                                     \
        for (int r = 0; r < ROWS; r++)                                                                            \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();                                         \
        for (long p = 0; p < P; p++) {                                                                            \
            __m512bh b[NV];                                                                                       \
            for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512(B + (v * P + p) * 16);               \
            for (int r = 0; r < ROWS; r++) {                                                                      \
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)A[r * ar + p * ap]);                                \
                for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);                   \
            }                                                                                                     \
        }                                                                                                         \
        for (int r = 0; r < ROWS; r++)                                                                            \
            for (int v = 0; v < NV; v++)                                                                          \
                _mm256_storeu_si256((__m256i *)(C + r * ldc + v * 16), (__m256i)_mm512_cvtneps_pbh(acc[r][v]));   \
    }
TILE(tile8x3, 8, 3)
TILE(tile8x2, 8, 2)
TILE(tile8x1, 8, 1)
TILE(tile1x3, 1, 3)
TILE(tile1x2, 1, 2)
TILE(tile1x1, 1, 1)

/* C [M, 16*panels] (row stride ldc) = A [M rows] @ B (panels, P pairs). Column blocks of 48 outer, so a block
 * of B (3 panels x P pairs: 36 KB at P = 192) stays in L1 while the rows of A stream past it. */
static void gemm(const u32 *A, long ar, long ap, long M, const u32 *B, long panels, long P, bf16 *C, long ldc) {
    long j = 0;
    for (; j < panels; j += 3) {
        const long nv = panels - j < 3 ? panels - j : 3;
        const u32 *Bj = B + j * P * 16;
        bf16 *Cj = C + j * 16;
        long r = 0;
        for (; r + MR <= M; r += MR) {
            if (nv == 3) tile8x3(A + r * ar, ar, ap, Bj, P, Cj + r * ldc, ldc);
            else if (nv == 2) tile8x2(A + r * ar, ar, ap, Bj, P, Cj + r * ldc, ldc);
            else tile8x1(A + r * ar, ar, ap, Bj, P, Cj + r * ldc, ldc);
        }
        for (; r < M; r++) {
            if (nv == 3) tile1x3(A + r * ar, ar, ap, Bj, P, Cj + r * ldc, ldc);
            else if (nv == 2) tile1x2(A + r * ar, ar, ap, Bj, P, Cj + r * ldc, ldc);
            else tile1x1(A + r * ar, ar, ap, Bj, P, Cj + r * ldc, ldc);
        }
    }
}

/* panels of W^T for W [N, K] row-major, panels [j0, j1) of the N columns: B pair p, column c = W[c, 2p:2p+2] */
static void pack_t(const bf16 *W, long K, long j0, long j1, u32 *B) {
    const long P = K / 2;
    const u32 *W32 = (const u32 *)W;
    for (long j = j0; j < j1; j++) {
        u32 *dst = B + (j - j0) * P * 16;
        for (long c = 0; c < 16; c++) {
            const u32 *src = W32 + (j * 16 + c) * P;
            for (long p = 0; p < P; p++) dst[p * 16 + c] = src[p];
        }
    }
}

/* panels of X [R, C] row-major (row stride ldx), column panels [j0, j1): B pair p, column c = (X[2p, c],
 * X[2p+1, c]), a zero for the missing row when R is odd */
static void pack_rows(const bf16 *X, long ldx, long R, long j0, long j1, u32 *B) {
    const long P = (R + 1) / 2;
    const __m512i mix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (long j = j0; j < j1; j++)
        for (long p = 0; p < P; p++) {
            const __m256i lo = _mm256_loadu_si256((const __m256i *)(X + 2 * p * ldx + j * 16));
            const __m256i hi = 2 * p + 1 < R ? _mm256_loadu_si256((const __m256i *)(X + (2 * p + 1) * ldx + j * 16))
                                             : _mm256_setzero_si256();
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            _mm512_storeu_si512(B + ((j - j0) * P + p) * 16, _mm512_permutexvar_epi16(mix, both));
        }
}

/* tasks: (group, column block); a group splits its columns into `split` blocks of whole panels */
static long split_for(long G, long panels, int nt) {
    long s = (4L * nt + G - 1) / (G > 0 ? G : 1);
    return s < 1 ? 1 : (s > panels ? panels : s);
}

/* ends must rise from 0 to at most M: 0 if they do. The entry points return 0, -1 for bad ends, -2 when out of
 * memory for their packing scratch. */
static int bad_ends(const int32_t *ends, long G, long M) {
    for (long g = 0; g < G; g++)
        if (ends[g] < (g ? ends[g - 1] : 0) || ends[g] > M) return 1;
    return 0;
}

static inline void group_rows(const int32_t *ends, long g, long *r0, long *r1) {
    *r0 = g ? ends[g - 1] : 0;
    *r1 = ends[g];
}

/* The two GEMMs of rows times their group's weight W_g [N, K]: the forward y_g = x_g W_g^T ([rows, N], reduction
 * over K) and the input gradient dx_g = dy_g W_g ([rows, K], reduction over N). a [M, in], out [M, width]; rows
 * past the last group are zeros. */
static int rows_by_weight(const bf16 *a, const bf16 *W, const int32_t *ends, long G, long M, long N, long K,
                          int dgrad, bf16 *out, int nt) {
    if (bad_ends(ends, G, M)) return -1;
    const long in = dgrad ? N : K, width = dgrad ? K : N, panels = width / 16, S = split_for(G, panels, nt);
    const long P = in / 2, used = G ? ends[G - 1] : 0;
    memset(out + used * width, 0, (size_t)(M - used) * width * sizeof(bf16));
    int failed = 0; /* a thread's scratch allocation failed */
#pragma omp parallel num_threads(nt)
    {
        u32 *B = aligned_alloc(64, (size_t)((panels + S - 1) / S) * P * 64);
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < G * S; t++) {
            const long g = t / S, s = t % S, j0 = panels * s / S, j1 = panels * (s + 1) / S;
            long r0, r1;
            group_rows(ends, g, &r0, &r1);
            if (!B) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            if (r1 <= r0 || j1 <= j0) continue;
            if (dgrad) pack_rows(W + g * N * K, K, N, j0, j1, B); /* B = W_g: pairs of its rows */
            else pack_t(W + g * N * K, K, j0, j1, B);              /* B = W_g^T: pairs within its rows */
            gemm((const u32 *)(a + r0 * in), P, 1, r1 - r0, B, j1 - j0, P, out + r0 * width + j0 * 16, width);
        }
        free(B);
    }
    return failed ? -2 : 0;
}

/* y [M, N] = per group x_g [rows, K] @ W_g^T, W [G, N, K] */
int ne_fwd(const bf16 *x, const bf16 *W, const int32_t *ends, long G, long M, long N, long K, bf16 *y, int nt) {
    return rows_by_weight(x, W, ends, G, M, N, K, 0, y, nt);
}

/* dx [M, K] = per group dy_g [rows, N] @ W_g, W [G, N, K] */
int ne_dgrad(const bf16 *dy, const bf16 *W, const int32_t *ends, long G, long M, long N, long K, bf16 *dx, int nt) {
    return rows_by_weight(dy, W, ends, G, M, N, K, 1, dx, nt);
}

/* dW [G, N, K] = per group dy_g^T [N, rows] @ x_g [rows, K]; a group with no rows gets zeros */
int ne_wgrad(const bf16 *dy, const bf16 *x, const int32_t *ends, long G, long M, long N, long K, bf16 *dW, int nt) {
    if (bad_ends(ends, G, M)) return -1;
    const long panels = K / 16, S = split_for(G, panels, nt);
    long rmax = 0;
    for (long g = 0; g < G; g++) {
        long r0, r1;
        group_rows(ends, g, &r0, &r1);
        if (r1 - r0 > rmax) rmax = r1 - r0;
    }
    const long Pmax = (rmax + 1) / 2;
    int failed = 0; /* a thread's scratch allocation failed */
#pragma omp parallel num_threads(nt)
    {
        u32 *A = aligned_alloc(64, (size_t)(N / 16) * (Pmax > 0 ? Pmax : 1) * 64);
        u32 *B = aligned_alloc(64, (size_t)((panels + S - 1) / S) * (Pmax > 0 ? Pmax : 1) * 64);
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < G * S; t++) {
            const long g = t / S, s = t % S, j0 = panels * s / S, j1 = panels * (s + 1) / S;
            long r0, r1;
            group_rows(ends, g, &r0, &r1);
            if (!A || !B) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            bf16 *out = dW + g * N * K + j0 * 16;
            if (j1 <= j0) continue;
            if (r1 <= r0) {
                for (long n = 0; n < N; n++) memset(out + n * K, 0, (size_t)(j1 - j0) * 16 * sizeof(bf16));
                continue;
            }
            const long P = (r1 - r0 + 1) / 2;
            /* A = dy_g^T: row n (a column of dy), pair p = (dy[2p, n], dy[2p+1, n]); packed in panels of 16
             * columns of dy, row n sits at panel n/16, lane n%16: an 8-row tile stays inside one panel */
            pack_rows(dy + r0 * N, N, r1 - r0, 0, N / 16, A);
            pack_rows(x + r0 * K, K, r1 - r0, j0, j1, B);
            for (long n = 0; n < N; n += 16)
                gemm(A + (n / 16) * P * 16, 1, 16, 16, B, j1 - j0, P, out + n * K, K);
        }
        free(A);
        free(B);
    }
    return failed ? -2 : 0;
}

#else /* no AVX-512 BF16: callers take PyTorch */
int ne_available(void) { return 0; }
int ne_fwd(void) { return -1; }
int ne_dgrad(void) { return -1; }
int ne_wgrad(void) { return -1; }
#endif
