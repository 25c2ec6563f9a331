/* Grouped GEMMs of the routed experts for CPU training (DeepSeekMoE, DeepSeek-V3 report §2.1.2), bf16 and float32.
 *
 * After dispatch, the (token, expert) pairs sit in rows grouped by expert: group g owns rows [ends[g-1], ends[g]).
 * A training step runs three grouped GEMMs per expert projection W_g [N, K] (nn.Linear layout):
 *   forward      y_g  = x_g  W_g^T      [rows, N]   (ne_fwd, ne_fwd_f32)
 *   input grad   dx_g = dy_g W_g        [rows, K]   (ne_dgrad, ne_dgrad_f32)
 *   weight grad  dW_g = dy_g^T x_g      [N, K]      (ne_wgrad, ne_wgrad_f32)
 * PyTorch's CPU `_grouped_mm` runs one oneDNN call per group, each split across the threads: at ~150 rows an
 * expert, the threads meet after every small GEMM and the packing is redone per call. Here each thread takes
 * whole (group, column block) tasks and packs what its task needs.
 * Requirements (the caller checks them and otherwise takes PyTorch): N and K multiples of 16.
 * The entry points return 0, -1 for bad ends, -2 when out of memory for their packing scratch.
 *
 * Compiled per variant over simd.h (kernels/isa.py). Two arithmetics:
 * - bf16 with the AVX-512 BF16 dot product (NS_BF16_DOT): `vdpbf16ps` (a += a0*b0 + a1*b1 in fp32 over pairs of
 *   the reduction dimension, pairs in order), fp32 accumulation, one round to bf16 at the end (round to nearest
 *   even): on AMD Zen 5 the results are bit-identical to `torch._grouped_mm`'s, whose oneDNN kernels sum in the
 *   same order.
 * - float32 FMA (every variant): register tiles of FMR rows x FNP panels of 16 columns, B packed in panels per
 *   task. The float32 ops use it with fp32 in and out; without the bf16 dot product, the bf16 ops use it too,
 *   on operands widened to fp32 (exact) and with one round to bf16 at the end: within one bf16 ulp of the fp32
 *   product, though not bit-identical to oneDNN.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "simd.h"

typedef uint32_t u32;

/* the variant this library was built for (isa.py's name) */
const char *ne_isa(void) { return NS_SIMD_NAME; }

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

/* ---- bf16 with the AVX-512 BF16 dot product ---- */
#if defined(NS_BF16_DOT)
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

#endif /* NS_BF16_DOT */

/* ---- float32 FMA GEMMs (every variant); the bf16 ops' path where there is no bf16 dot product ----
 * Operands: A rows of FMR-row tiles (element (r, p) at A[t*at + r*ar + p*ap] in tile t); B packed in panels of 16
 * columns, panel v holds row p of the reduction at B[v*bs + p*16]. A tile keeps FMR x FNP*16 outputs in
 * registers and loads each B vector once per FMR broadcast-multiply-adds: AVX2 6 x 16 (12 accumulators of 16
 * registers), NEON 6 x 16 (24 of 32), AVX-512 12 x 32 (24 of 32). */
#define VPP (16 / NS_VW) /* vectors per panel */
#if NS_VW == 16
#define FMR 12
#define FNP 2
#elif NS_VW == 8 || NS_VW == 4
#define FMR 6
#define FNP 1
#else
#define FMR 4
#define FNP 1
#endif
/* fp32 outputs sum the reduction in blocks of KC, adding into C between blocks: a block of B (KC x FNP*16 fp32,
 * 16 KB) stays in L1 while the row tiles stream past it. bf16 outputs are rounded once, after the whole sum. */
#define KC (256 / FNP)

/* C [rows, 16*np] = (C if add) + A tile @ B over kc reduction steps; stored fp32 to C or rounded to bf16 in Cb */
static inline __attribute__((always_inline)) void ftile(const int rows, const int np, const float *A, long ar,
                                                        long ap, const float *B, long bs, long kc, float *C, bf16 *Cb,
                                                        long ldc, int add) {
    vf acc[FMR][FNP * VPP];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < np * VPP; v++) acc[r][v] = add ? vf_loadu(C + r * ldc + v * NS_VW) : vf_zero();
    for (long p = 0; p < kc; p++) {
        vf b[FNP * VPP];
        for (int v = 0; v < np * VPP; v++) b[v] = vf_loadu(B + (v / VPP) * bs + p * 16 + (v % VPP) * NS_VW);
        for (int r = 0; r < rows; r++) {
            const vf a = vf_set1(A[r * ar + p * ap]);
            for (int v = 0; v < np * VPP; v++) acc[r][v] = vf_fmadd(a, b[v], acc[r][v]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < np * VPP; v++) {
            if (Cb) vf_storeu_bf16(Cb + r * ldc + v * NS_VW, acc[r][v]);
            else vf_storeu(C + r * ldc + v * NS_VW, acc[r][v]);
        }
}

/* one specialised tile per (rows, panels): the accumulators stay in registers */
#define FT(R, NP)                                                                                                  \
    case (R) * 4 + (NP):                                                                                           \
        if ((R) <= FMR && (NP) <= FNP) ftile((R) <= FMR ? (R) : 1, (NP) <= FNP ? (NP) : 1, A, ar, ap, B, bs, kc, C, \
                                             Cb, ldc, add);                                                        \
        break;
#define FT_ROWS(R) FT(R, 1) FT(R, 2)
static void ftile_any(int rows, int np, const float *A, long ar, long ap, const float *B, long bs, long kc, float *C,
                      bf16 *Cb, long ldc, int add) {
    switch (rows * 4 + np) {
        FT_ROWS(1) FT_ROWS(2) FT_ROWS(3) FT_ROWS(4) FT_ROWS(5) FT_ROWS(6)
        FT_ROWS(7) FT_ROWS(8) FT_ROWS(9) FT_ROWS(10) FT_ROWS(11) FT_ROWS(12)
    }
}

/* C [M, 16*np] = A [M, P] @ B [P, 16*np] (np <= FNP panels of stride bs): tile t of A at A + t*at. fp32 to C (row
 * stride ldc) in reduction blocks of KC, or bf16 to Cb in one pass. P = 0 stores zeros. */
static void fgemm(const float *A, long at, long ar, long ap, long M, const float *B, long bs, int np, long P,
                  float *C, bf16 *Cb, long ldc) {
    const long kc = !Cb ? KC : P > 0 ? P : 1;
    for (long k0 = 0; k0 == 0 || k0 < P; k0 += kc) {
        const long k = P - k0 < kc ? P - k0 : kc;
        for (long t = 0; t * FMR < M; t++) {
            const long r = t * FMR, rows = M - r < FMR ? M - r : FMR;
            ftile_any((int)rows, np, A + t * at + k0 * ap, ar, ap, B + k0 * 16, bs, k, C ? C + r * ldc : NULL,
                      Cb ? Cb + r * ldc : NULL, ldc, k0 > 0);
        }
    }
}

/* NS_VW values from element i of an fp32 (bf = 0) or bf16 (bf = 1, widened exactly) array; one value */
static inline __attribute__((always_inline)) vf ldv(const void *p, int bf, long i) {
    return bf ? vf_loadu_bf16((const bf16 *)p + i) : vf_loadu((const float *)p + i);
}
static inline __attribute__((always_inline)) float ld1(const void *p, int bf, long i) {
    if (!bf) return ((const float *)p)[i];
    const u32 u = (u32)((const bf16 *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* panels [jb, jb+np) of W^T for W [N, K] row-major: B row p, column c = W[jb*16 + c, p] (transposed in
 * NS_VW x NS_VW blocks) */
static inline __attribute__((always_inline)) void fpack_t(const void *W, int bf, long K, long jb, int np, float *B) {
    for (int v = 0; v < np; v++)
        for (int c0 = 0; c0 < 16; c0 += NS_VW)
            for (long p0 = 0; p0 < K; p0 += NS_VW) {
                vf t[NS_VW];
                for (int i = 0; i < NS_VW; i++) t[i] = ldv(W, bf, ((jb + v) * 16 + c0 + i) * K + p0);
                vf_transpose(t);
                for (int i = 0; i < NS_VW; i++) vf_storeu(B + v * K * 16 + (p0 + i) * 16 + c0, t[i]);
            }
}

/* panels [jb, jb+np) of X [R, ld] row-major: B row p, column c = X[p, jb*16 + c] */
static inline __attribute__((always_inline)) void fpack_rows(const void *X, int bf, long ld, long R, long jb, int np,
                                                             float *B) {
    for (int v = 0; v < np; v++)
        for (long p = 0; p < R; p++)
            for (int u = 0; u < VPP; u++) vf_storeu(B + (v * R + p) * 16 + u * NS_VW, ldv(X, bf, p * ld + (jb + v) * 16 + u * NS_VW));
}

/* X^T for X [R, N] row-major in FMR-row tiles: tile t, reduction step p, row i at A[t*R*FMR + p*FMR + i] =
 * X[p, t*FMR + i]. Whole vectors where X's row has them: each store runs up to NS_VW - 1 values past its FMR,
 * overwritten by the next step's, or the next tile's, or landing in the scratch's NS_VW floats of slack. */
static inline __attribute__((always_inline)) void fpack_tiles(const void *X, int bf, long N, long R, float *A) {
    const long W = (FMR + NS_VW - 1) / NS_VW * NS_VW; /* the values a step's vectors cover */
    for (long n0 = 0; n0 < N; n0 += FMR) {
        const long m = N - n0 < FMR ? N - n0 : FMR;
        float *dst = A + n0 * R;
        if (n0 + W <= N)
            for (long p = 0; p < R; p++)
                for (long u = 0; u < W; u += NS_VW) vf_storeu(dst + p * FMR + u, ldv(X, bf, p * N + n0 + u));
        else
            for (long p = 0; p < R; p++)
                for (long i = 0; i < m; i++) dst[p * FMR + i] = ld1(X, bf, p * N + n0 + i);
    }
}

static long max_rows(const int32_t *ends, long G) {
    long rmax = 0;
    for (long g = 0; g < G; g++) {
        long r0, r1;
        group_rows(ends, g, &r0, &r1);
        if (r1 - r0 > rmax) rmax = r1 - r0;
    }
    return rmax;
}

/* The forward (dgrad = 0: out_g = a_g W_g^T, [rows, N], reduction over K) and the input gradient (dgrad = 1:
 * out_g = a_g W_g, [rows, K], reduction over N) with fp32 (bf = 0) or bf16 (bf = 1) operands and output; a
 * [M, in], out [M, width]; rows past the last group are zeros. bf16 rows of A are widened per task. */
static inline __attribute__((always_inline)) int frows_by_weight(const void *a, const void *W, int bf,
                                                                 const int32_t *ends, long G, long M, long N, long K,
                                                                 int dgrad, void *out, int nt) {
    if (bad_ends(ends, G, M)) return -1;
    const long in = dgrad ? N : K, width = dgrad ? K : N, panels = width / 16, S = split_for(G, panels, nt);
    const long used = G ? ends[G - 1] : 0, es = bf ? 2 : 4, rmax = bf ? max_rows(ends, G) : 0;
    memset((char *)out + used * width * es, 0, (size_t)(M - used) * width * es);
    int failed = 0; /* a thread's scratch allocation failed */
#pragma omp parallel num_threads(nt)
    {
        float *B = aligned_alloc(64, (size_t)FNP * in * 64 + 64);
        float *As = bf ? aligned_alloc(64, (size_t)rmax * in * 4 + 64) : NULL;
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < G * S; t++) {
            const long g = t / S, s = t % S, j0 = panels * s / S, j1 = panels * (s + 1) / S;
            long r0, r1;
            group_rows(ends, g, &r0, &r1);
            if (!B || (bf && !As)) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            if (r1 <= r0 || j1 <= j0) continue;
            const float *A = (const float *)a + r0 * in;
            if (bf) {
                for (long i = 0; i < (r1 - r0) * in; i += NS_VW) vf_storeu(As + i, ldv(a, 1, r0 * in + i));
                A = As;
            }
            const char *Wg = (const char *)W + g * N * K * es;
            for (long jb = j0; jb < j1; jb += FNP) {
                const int np = j1 - jb < FNP ? (int)(j1 - jb) : FNP;
                if (dgrad) fpack_rows(Wg, bf, K, N, jb, np, B); /* B = W_g */
                else fpack_t(Wg, bf, K, jb, np, B);              /* B = W_g^T */
                const long o = r0 * width + jb * 16;
                fgemm(A, FMR * in, in, 1, r1 - r0, B, in * 16, np, in, bf ? NULL : (float *)out + o,
                      bf ? (bf16 *)out + o : NULL, width);
            }
        }
        free(B);
        free(As);
    }
    return failed ? -2 : 0;
}

/* dW [G, N, K] = per group dy_g^T @ x_g (reduction over the group's rows), fp32 or bf16 operands and output; a
 * group with no rows gets zeros */
static inline __attribute__((always_inline)) int fwgrad(const void *dy, const void *x, int bf, const int32_t *ends,
                                                        long G, long M, long N, long K, void *dW, int nt) {
    if (bad_ends(ends, G, M)) return -1;
    const long panels = K / 16, S = split_for(G, panels, nt), es = bf ? 2 : 4, rmax = max_rows(ends, G);
    const long Nt = (N + FMR - 1) / FMR * FMR;
    int failed = 0; /* a thread's scratch allocation failed */
#pragma omp parallel num_threads(nt)
    {
        float *A = aligned_alloc(64, (size_t)Nt * rmax * 4 + 64); /* + 16 floats: fpack_tiles' slack */
        float *B = aligned_alloc(64, (size_t)FNP * rmax * 64 + 64);
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
            char *out = (char *)dW + (g * N * K + j0 * 16) * es;
            if (j1 <= j0) continue;
            if (r1 <= r0) {
                for (long n = 0; n < N; n++) memset(out + n * K * es, 0, (size_t)(j1 - j0) * 16 * es);
                continue;
            }
            const long R = r1 - r0;
            fpack_tiles((const char *)dy + r0 * N * es, bf, N, R, A); /* A = dy_g^T */
            for (long jb = j0; jb < j1; jb += FNP) {
                const int np = j1 - jb < FNP ? (int)(j1 - jb) : FNP;
                fpack_rows((const char *)x + r0 * K * es, bf, K, R, jb, np, B); /* B = x_g */
                char *o = out + (jb - j0) * 16 * es;
                fgemm(A, FMR * R, 1, FMR, N, B, R * 16, np, R, bf ? NULL : (float *)o, bf ? (bf16 *)o : NULL, K);
            }
        }
        free(A);
        free(B);
    }
    return failed ? -2 : 0;
}

/* y [M, N] = per group x_g [rows, K] @ W_g^T, W [G, N, K] */
int ne_fwd_f32(const float *x, const float *W, const int32_t *ends, long G, long M, long N, long K, float *y, int nt) {
    return frows_by_weight(x, W, 0, ends, G, M, N, K, 0, y, nt);
}

/* dx [M, K] = per group dy_g [rows, N] @ W_g, W [G, N, K] */
int ne_dgrad_f32(const float *dy, const float *W, const int32_t *ends, long G, long M, long N, long K, float *dx,
                 int nt) {
    return frows_by_weight(dy, W, 0, ends, G, M, N, K, 1, dx, nt);
}

/* dW [G, N, K] = per group dy_g^T [N, rows] @ x_g [rows, K]; a group with no rows gets zeros */
int ne_wgrad_f32(const float *dy, const float *x, const int32_t *ends, long G, long M, long N, long K, float *dW,
                 int nt) {
    return fwgrad(dy, x, 0, ends, G, M, N, K, dW, nt);
}

#if !defined(NS_BF16_DOT) /* the bf16 ops by widening to fp32 */
int ne_fwd(const bf16 *x, const bf16 *W, const int32_t *ends, long G, long M, long N, long K, bf16 *y, int nt) {
    return frows_by_weight(x, W, 1, ends, G, M, N, K, 0, y, nt);
}

int ne_dgrad(const bf16 *dy, const bf16 *W, const int32_t *ends, long G, long M, long N, long K, bf16 *dx, int nt) {
    return frows_by_weight(dy, W, 1, ends, G, M, N, K, 1, dx, nt);
}

int ne_wgrad(const bf16 *dy, const bf16 *x, const int32_t *ends, long G, long M, long N, long K, bf16 *dW, int nt) {
    return fwgrad(dy, x, 1, ends, G, M, N, K, dW, nt);
}
#endif
