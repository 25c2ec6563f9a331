/* The int4 weight rows' dot products (nanoseek/quant.py's int4: codes two a byte [N, K/2], value 2j in the low
 * nibble, 2j + 1 in the high one; a bf16 scale and min per group of G input values, W' = q * scale + min), shared
 * by cpu_quant.c (nq_int4, nq_int4_q8, nq_experts) and cpu_decode.c (a quantized model's int4 matrices in
 * ns_decode_stack), so that both compute a row the same way. Include once, after simd.h and quant_dot.h.
 *
 * The rows of x a matrix product reads are prepared once into an `nq_a4` (nq_a4_row, one row at a time, so that
 * threads can share the work), then each weight row is dotted with any of them (nq_a4_dots, up to NQ_ROWS rows
 * per pass over the weight row). An nq_a4 of group size 0 holds rows for int8 weights instead: x widened to fp32,
 * in order (quant_dot.h's dot products on fp32 rows; cpu_decode.c: rows of a bf16 model, widened once per matmul
 * rather than once per weight row). Two arithmetics for int4, the a4's `q8` (cpu_quant.py has the measurements that
 * chose them):
 * - float (every variant): x widened to fp32, deinterleaved per block of 2 * NS_VW values (the block's even k
 *   first, then its odd k: the order in which a load of NS_VW code bytes gives its low and high nibbles); each
 *   group's codes dequantized in registers (one fp32 FMA) and dotted with x in fp32;
 * - q8 (AVX-512 builds on CPUs with AVX512-VNNI, checked at run time, and AVX2 builds: nq_a4_q8): llama.cpp's
 *   Q4_1 x Q8_1. Each block of 32 values of a row of x is quantized to int8 with its own scale (dx = max |x| / 127,
 *   round to nearest), and the unsigned 4-bit codes times the signed int8 activations are summed in int32 lanes,
 *   exactly: VPDPBUSD (64 products into 16 sums per instruction), or on AVX2 VPMADDUBSW (pairs into int16: at most
 *   2 * 15 * 127, no saturation) then VPMADDWD by ones (into int32); each lane's sum takes its weight group's scale
 *   times its block's dx in fp32, and the group mins multiply the sums of the quantized x over each group. The
 *   error this adds is x's rounding (at most dx / 2 per value): measured and stated in cpu_quant.py.
 * Legend: M rows of x, K input values, G group size (32, 64 or 128; K a multiple of it).
 */
#if NS_VW == 16 && defined(__AVX512VL__) /* (its masked 256-bit loads: every avx512 build, x86-64-v4) */
#define NQ_VNNI 1
static inline int nq_a4_q8(void) { return __builtin_cpu_supports("avx512vnni"); }
#elif NS_VW == 8 && defined(__AVX2__)
#define NQ_MADDUBS 1
static inline int nq_a4_q8(void) { return 1; }
#else
static inline int nq_a4_q8(void) { return 0; }
#endif

/* Rows of x prepared for int4 weights. q8: 128 values per chunk, x's int8 values laid out as a chunk's 64 code
 * bytes hold them (byte j: k = 2j and 2j + 1): the chunk's even k first (64 bytes), then its odd k; lane i of
 * VPDPBUSD sums bytes 4i..4i+3, k in [8i, 8i + 8): the 32-block i / 4 of the chunk (AVX2: lanes 0-7 from the
 * chunk's first 32 code bytes, 8-15 from the others). */
typedef struct {
    int q8;
    int64_t K, G, chunks, ngp;
    int32_t lanes[16]; /* q8: lane i of a chunk's sums takes the scale of the chunk's group (i / 4) * 32 / G */
    float *xf;   /* float: [M][K], deinterleaved */
    int8_t *xq;  /* q8: [M][chunks][128] */
    float *dx;   /* q8: [M][chunks][16], each lane's block scale */
    float *xsum; /* q8: [M][ngp], sums of the quantized x (dx times codes) over each weight group */
} nq_a4;

static inline int64_t a4_up64(int64_t n) { return (n + 63) / 64 * 64; }

/* bytes of scratch an nq_a4 of M rows needs (nq_a4_carve aligns its parts to 64 bytes within them); G 0: int8 */
static inline int64_t nq_a4_bytes(int64_t M, int64_t K, int64_t G, int q8) {
    if (M <= 0 || K <= 0) return 0;
    if (!q8 || !G) return 64 + a4_up64(M * K * 4);
    const int64_t chunks = (K + 127) / 128, ngp = (K / G + 15) / 16 * 16;
    return 64 + a4_up64(M * chunks * 128) + a4_up64(M * chunks * 16 * 4) + a4_up64(M * ngp * 4);
}

/* a's parts laid out in buf (at least nq_a4_bytes(M, K, G, q8) bytes) */
static inline void nq_a4_carve(nq_a4 *a, void *buf, int64_t M, int64_t K, int64_t G, int q8) {
    char *p = (char *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    q8 = q8 && G;
    a->q8 = q8, a->K = K, a->G = G, a->chunks = (K + 127) / 128, a->ngp = G ? (K / G + 15) / 16 * 16 : 0;
    for (int i = 0; i < 16; i++) a->lanes[i] = G ? (int32_t)((i / 4) * 32 / G) : 0;
    a->xf = NULL, a->xq = NULL, a->dx = a->xsum = NULL;
    if (!q8) {
        a->xf = (float *)p;
        return;
    }
    a->xq = (int8_t *)p;
    p += a4_up64(M * a->chunks * 128);
    a->dx = (float *)p;
    p += a4_up64(M * a->chunks * 16 * 4);
    a->xsum = (float *)p;
}

/* row m of a from x's K values (bf16 when bf, else fp32) */
static inline void nq_a4_row(const nq_a4 *a, int64_t m, const void *x, int bf) {
    const int64_t K = a->K;
#define A4_X(k) (bf ? bf2f(((const bf16 *)x)[k]) : ((const float *)x)[k])
    if (!a->q8) {
        float *xf = a->xf + m * K;
        if (!a->G) { /* int8 weights: in order */
            for (int64_t k = 0; k < K; k++) xf[k] = A4_X(k);
            return;
        }
        for (int64_t k = 0; k < K; k++) { /* position of value k in its block of 2 * NS_VW */
            const int64_t b = k % (2 * NS_VW);
            xf[k - b + (b & 1) * NS_VW + b / 2] = A4_X(k);
        }
        return;
    }
    const int64_t chunks = a->chunks;
    int8_t *xq = a->xq + m * chunks * 128;
    float *dx = a->dx + m * chunks * 16, *xsum = a->xsum + m * a->ngp;
    memset(xq, 0, (size_t)(chunks * 128)); /* a last chunk shorter than 128 values reads zeros past K */
    memset(dx, 0, sizeof(float) * (size_t)(chunks * 16));
    memset(xsum, 0, sizeof(float) * (size_t)a->ngp);
    for (int64_t b = 0; b < K / 32; b++) { /* block b of 32 values */
        float v[32], amax = 0;
        for (int i = 0; i < 32; i++) {
            v[i] = A4_X(b * 32 + i);
            if (fabsf(v[i]) > amax) amax = fabsf(v[i]);
        }
        const float d = amax / 127, inv = amax > 0 ? 127 / amax : 0;
        const int64_t c = b / 4;
        for (int l = 0; l < 4; l++) dx[c * 16 + (b % 4) * 4 + l] = d;
        int32_t qsum = 0;
        for (int i = 0; i < 32; i++) { /* k = 32 (b % 4) + i within the chunk: even k first, then odd */
            const int kc = (int)(b % 4) * 32 + i;
            const int8_t qi = (int8_t)lrintf(v[i] * inv);
            xq[c * 128 + (kc & 1) * 64 + kc / 2] = qi;
            qsum += qi;
        }
        /* the mins multiply the sum of the quantized x (Q8_1's), not of x: then y is exactly W' times the
         * quantized x, and the error is W' (x^ - x); with the exact sum, the codes' part (W' - min, up to
         * twice |W'|) times x's rounding would no longer cancel against the mins' part (2-3x the error) */
        xsum[b * 32 / a->G] += d * (float)qsum;
    }
#undef A4_X
}

/* float: out[j] = sum_k x[j][k] * (q[k] * scale[g] + mn[g]) for j < r, x[j] deinterleaved (nq_a4_row); G a
 * multiple of 2 * NS_VW */
static inline __attribute__((always_inline)) void dot_q4(const float *const *x, const int r, const uint8_t *q,
                                                          const bf16 *scale, const bf16 *mn, int64_t K, int64_t G,
                                                          float *out) {
    vf acc[NQ_ROWS][2];
    for (int j = 0; j < r; j++) acc[j][0] = acc[j][1] = vf_zero();
    for (int64_t g = 0; g < K / G; g++) {
        const vf s = vf_set1(bf2f(scale[g])), m = vf_set1(bf2f(mn[g]));
        const uint8_t *qg = q + g * G / 2;
        ns_prefetch(qg + NQ_AHEAD);
        for (int64_t b = 0; b < G; b += 2 * NS_VW) {
            vf lo, hi;
            vf_load_nibbles(qg + b / 2, &lo, &hi);
            lo = vf_fmadd(lo, s, m);
            hi = vf_fmadd(hi, s, m);
            const int64_t o = g * G + b;
            for (int j = 0; j < r; j++) {
                acc[j][0] = vf_fmadd(vf_loadu(x[j] + o), lo, acc[j][0]);
                acc[j][1] = vf_fmadd(vf_loadu(x[j] + o + NS_VW), hi, acc[j][1]);
            }
        }
    }
    for (int j = 0; j < r; j++) out[j] = vf_reduce_add(vf_add(acc[j][0], acc[j][1]));
}

#ifdef NQ_VNNI
/* q8: out[j] for rows rows[j] (j < r) of a, weight row (q, scale, mn) */
static inline __attribute__((always_inline, target("avx512vnni"))) void dot_q4_q8(
    const nq_a4 *a, const int64_t *rows, const int r, const uint8_t *q, const bf16 *scale, const bf16 *mn,
    float *out) {
    const int64_t K = a->K, G = a->G, chunks = a->chunks, ng = K / G, ngp = a->ngp, per = 128 / G;
    const __m512i gidx = _mm512_loadu_si512(a->lanes);
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[NQ_ROWS];
    for (int j = 0; j < r; j++) acc[j] = _mm512_setzero_ps();
    /* the scales of 16 groups at a time (4 to 16 chunks), widened once (4 floats of padding: the last chunks of a
     * window read past its 16th only into lanes they do not use) */
    float sg[20] __attribute__((aligned(64))) = {0};
    /* (g0, the chunk's first group, counted up: a division per chunk cost ~a third of the loop's time) */
    for (int64_t c = 0, g0 = 0; c < chunks; c++, g0 += per) {
        const int64_t left = K - c * 128; /* values left in the row: a last chunk may be short */
        if ((g0 & 15) == 0) {
            const int64_t n = ng - g0 < 16 ? ng - g0 : 16;
            _mm512_store_ps(sg, _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), scale + g0)), 16)));
        }
        /* lane i: the chunk's group (i / 4) * 32 / G, within its 128-bit quarter: the chunk's (at most) 4 scales
         * broadcast to each quarter (a load), then an in-lane permute */
        const __m512 sw = _mm512_permutevar_ps(_mm512_broadcast_f32x4(_mm_loadu_ps(sg + (g0 & 15))), gidx);
        ns_prefetch(q + c * 64 + NQ_AHEAD);
        const __m512i b = left >= 128 ? _mm512_loadu_si512(q + c * 64)
                                      : _mm512_maskz_loadu_epi8((1ull << (left / 2)) - 1, q + c * 64);
        const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        for (int j = 0; j < r; j++) {
            const int8_t *xq = a->xq + (rows[j] * chunks + c) * 128;
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(xq));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_load_si512(xq + 64));
            const __m512 d = _mm512_load_ps(a->dx + (rows[j] * chunks + c) * 16);
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sw, d), acc[j]);
        }
    }
    for (int j = 0; j < r; j++) { /* + sum over groups of min * (the group's sum of x), 16 groups at a time */
        const float *xs = a->xsum + rows[j] * ngp; /* (zero past ng up to ngp) */
        __m512 t = acc[j];
        for (int64_t g = 0; g < ng; g += 16) {
            const __mmask16 mg = (__mmask16)(ng - g >= 16 ? 0xffff : (1u << (ng - g)) - 1);
            const __m512 m = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mg, mn + g)), 16));
            t = _mm512_fmadd_ps(m, _mm512_load_ps(xs + g), t);
        }
        out[j] = _mm512_reduce_add_ps(t);
    }
}

#define NQ_Q8_FN __attribute__((target("avx512vnni"), noinline)) /* (dot_q4_q8 inlines only into its target) */
#endif

#ifdef NQ_MADDUBS
/* n (1 to 4) bf16 values from p as fp32 lanes 0..n-1 (zeros after): loads straight into a register (through a
 * stack buffer, a wide load of values just stored misses store forwarding: AVX2 q8 ran at half the float path's
 * speed that way) */
static inline __m256 bf16_upto4(const bf16 *p, int64_t n) {
    uint64_t v;
    uint32_t w;
    uint16_t h;
    switch (n) { /* (each memcpy fills its whole variable: a register load, no partial store to read back) */
    case 4: memcpy(&v, p, 8); break;
    case 3: memcpy(&w, p, 4), memcpy(&h, p + 2, 2), v = w | (uint64_t)h << 32; break;
    case 2: memcpy(&w, p, 4), v = w; break;
    default: memcpy(&h, p, 2), v = h; break;
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_cvtsi64_si128((long long)v)), 16));
}

/* q8 on AVX2: dot_q4_q8's arithmetic (same int32 sums per lane, fp32 in 8-lane halves) */
static inline __attribute__((always_inline)) void dot_q4_q8(const nq_a4 *a, const int64_t *rows, const int r,
                                                             const uint8_t *q, const bf16 *scale, const bf16 *mn,
                                                             float *out) {
    const int64_t K = a->K, G = a->G, chunks = a->chunks, ng = K / G, ngp = a->ngp, per = 128 / G;
    const __m256i g0 = _mm256_loadu_si256((const __m256i *)a->lanes);
    const __m256i g1 = _mm256_loadu_si256((const __m256i *)(a->lanes + 8));
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc[NQ_ROWS];
    for (int j = 0; j < r; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t c = 0, gc = 0; c < chunks; c++, gc += per) { /* gc: the chunk's first group */
        const int64_t left = K - c * 128, ngc = left >= 128 ? per : left / G; /* the chunk's groups */
        const uint8_t *qc = q + c * 64;
        uint8_t tail[64];
        if (left < 128) { /* a short last chunk: its own bytes only, zeros after (x's are zero there too) */
            memset(tail, 0, 64);
            memcpy(tail, qc, (size_t)(left / 2));
            qc = tail;
        }
        ns_prefetch(q + c * 64 + NQ_AHEAD);
        const __m256i b0 = _mm256_loadu_si256((const __m256i *)qc);
        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(qc + 32));
        const __m256i lo0 = _mm256_and_si256(b0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low);
        const __m256i lo1 = _mm256_and_si256(b1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low);
        const __m256 sg = bf16_upto4(scale + gc, ngc); /* the chunk's groups' scales (G >= 32: <= 4) */
        const __m256 sw0 = _mm256_permutevar8x32_ps(sg, g0), sw1 = _mm256_permutevar8x32_ps(sg, g1);
        for (int j = 0; j < r; j++) {
            const int8_t *xq = a->xq + (rows[j] * chunks + c) * 128;
            const float *d = a->dx + (rows[j] * chunks + c) * 16;
            const __m256i s0 = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_maddubs_epi16(lo0, _mm256_load_si256((const __m256i *)xq)), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16(hi0, _mm256_load_si256((const __m256i *)(xq + 64))), ones));
            const __m256i s1 = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_maddubs_epi16(lo1, _mm256_load_si256((const __m256i *)(xq + 32))), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16(hi1, _mm256_load_si256((const __m256i *)(xq + 96))), ones));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_mul_ps(sw0, _mm256_load_ps(d)), acc[j]);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_mul_ps(sw1, _mm256_load_ps(d + 8)), acc[j]);
        }
    }
    for (int j = 0; j < r; j++) { /* + sum over groups of min * (the group's sum of x), 8 groups at a time */
        const float *xs = a->xsum + rows[j] * ngp;
        __m256 t = acc[j];
        int64_t g = 0;
        for (; g + 8 <= ng; g += 8) t = _mm256_fmadd_ps(vf_loadu_bf16(mn + g), _mm256_load_ps(xs + g), t);
        float o = vf_reduce_add(t);
        for (; g < ng; g++) o += bf2f(mn[g]) * xs[g];
        out[j] = o;
    }
}

#define NQ_Q8_FN
#endif

#if defined(NQ_VNNI) || defined(NQ_MADDUBS)
/* q8: out[j] for j < n, up to NQ_ROWS rows of a per pass over the weight row */
NQ_Q8_FN static void a4_dots_q8(const nq_a4 *a, const int64_t *rows, int64_t n, const uint8_t *q, const bf16 *scale,
                                const bf16 *mn, float *out) {
    for (int64_t j = 0; j < n; j += NQ_ROWS) {
        switch (n - j < NQ_ROWS ? n - j : NQ_ROWS) { /* a constant row count per call: registers */
        case 4: dot_q4_q8(a, rows + j, 4, q, scale, mn, out + j); break;
        case 3: dot_q4_q8(a, rows + j, 3, q, scale, mn, out + j); break;
        case 2: dot_q4_q8(a, rows + j, 2, q, scale, mn, out + j); break;
        default: dot_q4_q8(a, rows + j, 1, q, scale, mn, out + j); break;
        }
    }
}
#endif

/* out[j] = int4 weight row (q, scale, mn) of width a->K . row rows[j] of a, for j < n */
static void nq_a4_dots(const nq_a4 *a, const int64_t *rows, int64_t n, const uint8_t *q, const bf16 *scale,
                       const bf16 *mn, float *out) {
#if defined(NQ_VNNI) || defined(NQ_MADDUBS)
    if (a->q8) {
        a4_dots_q8(a, rows, n, q, scale, mn, out);
        return;
    }
#endif
    for (int64_t j = 0; j < n; j += NQ_ROWS) {
        const int r = n - j < NQ_ROWS ? (int)(n - j) : NQ_ROWS;
        const float *xs[NQ_ROWS];
        for (int i = 0; i < r; i++) xs[i] = a->xf + rows[j + i] * a->K;
        switch (r) {
        case 4: dot_q4(xs, 4, q, scale, mn, a->K, a->G, out + j); break;
        case 3: dot_q4(xs, 3, q, scale, mn, a->K, a->G, out + j); break;
        case 2: dot_q4(xs, 2, q, scale, mn, a->K, a->G, out + j); break;
        default: dot_q4(xs, 1, q, scale, mn, a->K, a->G, out + j); break;
        }
    }
}
