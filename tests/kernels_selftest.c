/* Self-test of the fused decode kernels (nanoseek/kernels/cpu_decode.c) for one kernel variant and one dtype.
 *
 * Compiled with the variant's flags (isa.py), -I nanoseek/kernels and, for the float32 build, -DNS_F32, it
 * includes the kernels' source and compares their vector code with plain loops (sums in double, roundings to the
 * model's dtype where the kernels round) on random inputs: the dot products, the row batching of `dot_k` (bit for
 * bit), ns_linear, ns_rmsnorm, ns_mla_absorbed (rows shared, per query, through slots, the long-context split,
 * a latent width without whole vectors; and over an 8-bit cache's fp8 and int8 rows, ns_mla_absorbed8 after
 * ns_kv8_write, against the same loops over the dequantized rows), ns_ffn_block (dense, and MoE with a shared expert) and ns_dsa_select's
 * scores and selection. Prints each failure and "N passed, N failed"; exits 1 on a failure, 2 on bad usage.
 *
 *   ./selftest <variant>    the variant it must have been built for (ns_isa(): avx2, neon, scalar, ...)
 *
 * tests/test_kernels_cross.py builds and runs it for every variant this machine runs, and for ARM64 under qemu.
 */
#include "cpu_decode.c"

#include <stdio.h>

static int passed, failed;

static void expect(int ok, const char *what) {
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL %s\n", what);
    }
}

/* |got - ref| <= tol * max|ref| over n values (ref: the plain loops in double) */
static void close_to(const char *what, const float *got, const double *ref, int64_t n, double tol) {
    double scale = 0.0, worst = 0.0;
    for (int64_t i = 0; i < n; i++) scale = fmax(scale, fabs(ref[i]));
    int64_t at = 0;
    for (int64_t i = 0; i < n; i++) {
        const double d = fabs((double)got[i] - ref[i]);
        if (!(d <= worst)) { /* (a NaN counts as the worst) */
            worst = d;
            at = i;
        }
    }
    const int ok = worst <= tol * scale;
    if (!ok)
        printf("  %s: |got - ref| = %g at %lld (got %g, ref %g), allowed %g\n", what, worst, (long long)at,
               (double)got[at], ref[at], tol * scale);
    expect(ok, what);
}

#ifdef NS_F32
#define TOL 1e-5        /* fp32 sums in another order */
#else
#define TOL (1.0 / 64)  /* a bf16 ulp or two of the largest value (intermediates rounded to bf16 in both) */
#endif

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float uniform(void) { /* [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (2.0 / (1ull << 24)) - 1.0);
}
static wt *rand_w(int64_t n, float scale) {
    wt *p = malloc(n * sizeof(wt));
    for (int64_t i = 0; i < n; i++) p[i] = f2w(uniform() * scale);
    return p;
}
static float *rand_f(int64_t n, float scale) {
    float *p = malloc(n * sizeof(float));
    for (int64_t i = 0; i < n; i++) p[i] = uniform() * scale;
    return p;
}
static float *widen(const wt *x, int64_t n) { /* wt values as float, for close_to */
    float *p = malloc(n * sizeof(float));
    for (int64_t i = 0; i < n; i++) p[i] = w2f(x[i]);
    return p;
}
static double rdot(const wt *a, const wt *b, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += (double)w2f(a[i]) * w2f(b[i]);
    return s;
}
static double rw(double x) { return w2f(f2w((float)x)); } /* a value rounded to wt, as the kernels store it */

#define NT 3 /* threads: an odd count splits heads, rows and columns unevenly */

static void test_dots(void) {
    const int64_t lens[] = {1, 7, 31, 64, 100, 129, 1012, 4101};
    char what[96];
    for (size_t t = 0; t < sizeof lens / sizeof *lens; t++) {
        const int64_t n = lens[t], R = 11;
        wt *x = rand_w(R * n, 1.f), *b = rand_w(n, 1.f);
        float *bf = rand_f(n, 1.f);
        float got[11], alone[11], wf;
        double ref[11], ref_wf = 0.0;
        const wt *xs[11];
        for (int64_t j = 0; j < R; j++) {
            xs[j] = x + j * n;
            got[j] = dot(xs[j], b, n);
            ref[j] = rdot(xs[j], b, n);
        }
        for (int64_t i = 0; i < n; i++) ref_wf += (double)w2f(x[i]) * bf[i];
        wf = dot_wf(x, bf, n);
        snprintf(what, sizeof what, "dot n=%lld", (long long)n);
        close_to(what, got, ref, R, 1e-5);
        snprintf(what, sizeof what, "dot_wf n=%lld", (long long)n);
        close_to(what, &wf, &ref_wf, 1, 1e-5);
        /* rows batched (dot_k) get the bits of each row alone, whatever the batch */
        for (int64_t k = 1; k <= R; k++) {
            dots(xs, k, b, n, alone);
            int same = 1;
            for (int64_t j = 0; j < k; j++) same &= memcmp(&alone[j], &got[j], sizeof(float)) == 0;
            snprintf(what, sizeof what, "dots of %lld rows, n=%lld: each row's bits alone", (long long)k, (long long)n);
            expect(same, what);
        }
        free(x), free(b), free(bf);
    }
}

static void test_linear(void) {
    const int64_t shapes[][3] = {{1, 384, 40}, {3, 100, 77}, {16, 64, 33}, {5, 33, 5}, {11, 1012, 9}};
    char what[64];
    for (size_t t = 0; t < sizeof shapes / sizeof *shapes; t++) {
        const int64_t M = shapes[t][0], D = shapes[t][1], O = shapes[t][2];
        wt *x = rand_w(M * D, 1.f), *w = rand_w(O * D, 1.f), *y = malloc(M * O * sizeof(wt));
        wt *y1 = malloc(O * sizeof(wt));
        double *ref = malloc(M * O * sizeof(double));
        ns_linear(x, M, D, w, O, y, NT);
        for (int64_t m = 0; m < M; m++)
            for (int64_t o = 0; o < O; o++) ref[m * O + o] = rdot(x + m * D, w + o * D, D);
        float *g = widen(y, M * O);
        snprintf(what, sizeof what, "ns_linear %lldx%lld -> %lld", (long long)M, (long long)D, (long long)O);
        close_to(what, g, ref, M * O, TOL / 2);
        int same = 1; /* each row alone: the same bits */
        for (int64_t m = 0; m < M; m++) {
            ns_linear(x + m * D, 1, D, w, O, y1, NT);
            same &= memcmp(y1, y + m * O, O * sizeof(wt)) == 0;
        }
        snprintf(what, sizeof what, "ns_linear %lldx%lld: rows alone, same bits", (long long)M, (long long)D);
        expect(same, what);
        free(x), free(w), free(y), free(y1), free(ref), free(g);
    }
}

static void test_rmsnorm(void) {
    const int64_t M = 3, D = 200;
    wt *x = rand_w(M * D, 3.f), *w = malloc(D * sizeof(wt)), *y = malloc(M * D * sizeof(wt));
    double *ref = malloc(M * D * sizeof(double));
    for (int64_t d = 0; d < D; d++) w[d] = f2w(1.f + 0.2f * uniform());
    ns_rmsnorm(x, M, D, w, 1e-6f, y);
    for (int64_t m = 0; m < M; m++) {
        const double inv = 1.0 / sqrt(rdot(x + m * D, x + m * D, D) / D + 1e-6);
        for (int64_t d = 0; d < D; d++) ref[m * D + d] = w2f(w[d]) * rw(w2f(x[m * D + d]) * inv);
    }
    float *g = widen(y, M * D);
    close_to("ns_rmsnorm", g, ref, M * D, TOL / 2);
    free(x), free(w), free(y), free(ref), free(g);
}

/* A value of an 8-bit cache as plain arithmetic: e4m3fn (sign, 4 exponent bits of bias 7, 3 mantissa bits;
 * exponent 0: subnormal) or int8 */
static double kv8_value(int fmt, uint8_t b) {
    if (fmt == NS_KV_INT8) return (int8_t)b;
    const int e = (b >> 3) & 15, m = b & 7;
    const double a = e ? (8 + m) * pow(2.0, e - 10) : m * pow(2.0, -9);
    return b & 0x80 ? -a : a;
}

/* The rows of a pool into 8 bits (ns_kv8_write: c_kv in groups of 128, or one when R is not a multiple, k_pe in
 * one group): each value back within the format's error (e4m3: 2^-4 of it, or half its subnormal step; int8: half
 * a step, amax / 254, of its group's largest magnitude), and the rows replaced by their dequantized values wt(value * scale), what the
 * 8-bit reads must see. Returns the planes through q and s; ns scales per row. */
static void quantize_pool(const char *name, int fmt, wt *rows, int64_t n, int64_t R, int64_t P, uint8_t **q,
                          float **s, int64_t *ns, int64_t *g0) {
    const int64_t C = R + P;
    *g0 = R % 128 ? R : 128;
    *ns = R / *g0 + 1;
    *q = malloc(n * C), *s = malloc(n * *ns * sizeof(float));
    int64_t *slots = malloc(n * sizeof(int64_t));
    for (int64_t i = 0; i < n; i++) slots[i] = i;
    ns_kv8_write(rows, n, R, P, fmt, *g0, P, slots, *q, *s);
    int ok = 1;
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < C; c++) {
            const int64_t g = c < R ? c / *g0 : *ns - 1, a = c < R ? g * *g0 : R, w = c < R ? *g0 : P;
            double amax = 0.0;
            for (int64_t j = a; j < a + w; j++) {
                const double v = fabs(w2f(rows[i * C + j]));
                if (v > amax) amax = v;
            }
            const double x = w2f(rows[i * C + c]), y = kv8_value(fmt, (*q)[i * C + c]) * (*s)[i * *ns + g];
            const double sub = (*s)[i * *ns + g] * pow(2.0, -10); /* half e4m3's subnormal step */
            ok &= fabs(y - x) <= (fmt == NS_KV_FP8 ? fmax(fabs(x) / 16, sub) : amax / 254) * 1.001;
            rows[i * C + c] = f2w((float)(kv8_value(fmt, (*q)[i * C + c]) * (*s)[i * *ns + g]));
        }
    char what[96];
    snprintf(what, sizeof what, "%s: ns_kv8_write within the format's error", name);
    expect(ok, what);
    free(slots);
}

/* Absorbed attention with o_proj and the residual (cpu_decode.c ns_mla_absorbed), each query's rows at
 * rows_of(query); with fmt (NS_KV_FP8, NS_KV_INT8) the rows from an 8-bit plane (ns_mla_absorbed8), against the
 * same loops over the dequantized rows */
static void test_absorbed(const char *name, int64_t S, int64_t R, int per_query, int gather, int fmt) {
    const int64_t B = 2, T = 2, H = 3, N = 8, P = 8, V = 8, Dm = 24, C = R + P, M = B * T;
    const int64_t nsets = per_query ? M : B, pool = nsets * S;
    wt *q = rand_w(M * H * (N + P), 1.f), *w_kvb = rand_w(H * (N + V) * R, 0.3f), *rows = rand_w(pool * C, 1.f);
    uint8_t *q8 = NULL;
    float *s8 = NULL;
    int64_t ns = 0, g0 = 0;
    if (fmt) quantize_pool(name, fmt, rows, pool, R, P, &q8, &s8, &ns, &g0);
    wt *w_o = rand_w(Dm * H * V, 0.3f), *resid = rand_w(M * Dm, 1.f), *y = malloc(M * Dm * sizeof(wt));
    uint8_t *mask = malloc(M * S);
    int64_t *slots = malloc(pool * sizeof(int64_t));
    for (int64_t i = 0; i < M * S; i++) mask[i] = uniform() < 0.4f || i % S == 0;
    for (int64_t i = 0; i < pool; i++) slots[i] = (i * 7 + 3) % pool; /* scattered (repeats allowed) */
    const float scale = 0.3f;
    wt *out = malloc(M * H * V * sizeof(wt)), *qc = malloc(H * C * sizeof(wt)), *pb = malloc(H * (S + 1) * sizeof(wt));
    float *sc = malloc(H * S * sizeof(float)), *ol = malloc(H * R * sizeof(float));
    if (fmt)
        ns_mla_absorbed8(q, B, T, H, N, P, w_kvb, R, V, q8, s8, fmt, ns, g0, P, gather ? slots : NULL, S, per_query,
                         mask, scale, out, qc, sc, ol, pb, w_o, Dm, resid, y, NT);
    else
        ns_mla_absorbed(q, B, T, H, N, P, w_kvb, R, V, rows, gather ? slots : NULL, S, per_query, mask, scale, out, qc,
                        sc, ol, pb, w_o, Dm, resid, y, NT);
    double *ref = malloc(M * Dm * sizeof(double)), *lat = malloc(C * sizeof(double)), *p = malloc(S * sizeof(double));
    double *o = malloc(H * V * sizeof(double)), *olr = malloc(R * sizeof(double));
    for (int64_t m = 0; m < M; m++) {
        const int64_t set = per_query ? m : m / T;
        for (int64_t h = 0; h < H; h++) {
            const wt *qh = q + (m * H + h) * (N + P);
            for (int64_t r = 0; r < R; r++) {
                double s = 0.0;
                for (int64_t n = 0; n < N; n++) s += (double)w2f(qh[n]) * w2f(w_kvb[(h * (N + V) + n) * R + r]);
                lat[r] = rw(s);
            }
            for (int64_t j = 0; j < P; j++) lat[R + j] = w2f(qh[N + j]);
            double mx = -INFINITY, sum = 0.0;
            for (int64_t s = 0; s < S; s++) {
                const wt *row = rows + (gather ? slots[set * S + s] : set * S + s) * C;
                double d = 0.0;
                for (int64_t c = 0; c < C; c++) d += lat[c] * w2f(row[c]);
                p[s] = mask[m * S + s] ? rw(d) * scale : -INFINITY;
                mx = fmax(mx, p[s]);
            }
            for (int64_t s = 0; s < S; s++) sum += (p[s] = mask[m * S + s] ? exp(p[s] - mx) : 0.0);
            for (int64_t r = 0; r < R; r++) olr[r] = 0.0;
            for (int64_t s = 0; s < S; s++) {
                const wt *row = rows + (gather ? slots[set * S + s] : set * S + s) * C;
                const double ps = rw(p[s] / sum);
                for (int64_t r = 0; r < R; r++) olr[r] += ps * w2f(row[r]);
            }
            for (int64_t v = 0; v < V; v++) {
                double s = 0.0;
                for (int64_t r = 0; r < R; r++) s += (double)w2f(w_kvb[(h * (N + V) + N + v) * R + r]) * rw(olr[r]);
                o[h * V + v] = rw(s);
            }
        }
        for (int64_t d = 0; d < Dm; d++) {
            double s = 0.0;
            for (int64_t k = 0; k < H * V; k++) s += o[k] * w2f(w_o[d * H * V + k]);
            ref[m * Dm + d] = w2f(resid[m * Dm + d]) + rw(s);
        }
    }
    float *g = widen(y, M * Dm);
    close_to(name, g, ref, M * Dm, TOL);
    free(q), free(w_kvb), free(rows), free(w_o), free(resid), free(y), free(mask), free(slots), free(out), free(qc);
    free(pb), free(sc), free(ol), free(ref), free(lat), free(p), free(o), free(olr), free(g), free(q8), free(s8);
}

/* The feed-forward half (ns_ffn_block): E = 0, the dense MLP as the shared expert; else sigmoid routing, greedy
 * top-K of E experts, renormalised gate weights times `scaling`, and a shared expert when Is > 0 */
static void test_ffn(const char *name, int64_t E, int64_t Is) {
    const int64_t N = 3, D = 64, I = 32, K = E ? 2 : 0, Kp = K ? K : 1;
    const float scaling = 2.5f, eps = 1e-6f;
    wt *h = rand_w(N * D, 1.f), *norm_w = malloc(D * sizeof(wt)), *out = malloc(N * D * sizeof(wt));
    for (int64_t d = 0; d < D; d++) norm_w[d] = f2w(1.f + 0.2f * uniform());
    float *router = E ? rand_f(E * D, 0.3f) : NULL;
    wt *gate_up = E ? rand_w(E * 2 * I * D, 0.2f) : NULL, *down = E ? rand_w(E * D * I, 0.2f) : NULL;
    wt *s_gate_up = Is ? rand_w(2 * Is * D, 0.2f) : NULL, *s_down = Is ? rand_w(D * Is, 0.2f) : NULL;
    wt *xn = malloc(N * D * sizeof(wt)), *act = malloc(N * (Kp * I + Is) * sizeof(wt));
    float *ys = malloc(N * (Kp + 1) * D * sizeof(float)), *rs = malloc(N * 2 * (E ? E : 1) * sizeof(float));
    float *gw = malloc(N * Kp * sizeof(float));
    int64_t *idx = malloc(N * Kp * sizeof(int64_t));
    ns_ffn_block(h, N, D, norm_w, eps, router, E, NULL, 0, 0, 1, 1, K, 1, scaling, gate_up, down, I, s_gate_up, s_down,
                 Is, out, xn, act, ys, rs, gw, idx, NT);
    double *ref = malloc(N * D * sizeof(double)), *y = malloc(D * sizeof(double));
    wt *xr = malloc(D * sizeof(wt)), *a = malloc((I > Is ? I : Is) * sizeof(wt));
    int routes_ok = 1;
    for (int64_t n = 0; n < N; n++) {
        const wt *hn = h + n * D;
        const double inv = 1.0 / sqrt(rdot(hn, hn, D) / D + eps);
        for (int64_t d = 0; d < D; d++) xr[d] = f2w((float)(w2f(norm_w[d]) * rw(w2f(hn[d]) * inv)));
        /* one expert's output: down . (silu(gate . x) * (up . x)), each step rounded to wt */
#define EXPERT(gu, dn, width, into)                                                                                    \
    do {                                                                                                               \
        for (int64_t r = 0; r < (width); r++) {                                                                        \
            const double g = rw(rdot(xr, (gu) + r * D, D)), u = rw(rdot(xr, (gu) + ((width) + r) * D, D));             \
            a[r] = f2w((float)(rw(g / (1.0 + exp(-g))) * u));                                                          \
        }                                                                                                              \
        for (int64_t d = 0; d < D; d++) (into)[d] = rw(rdot(a, (dn) + d * (width), (width)));                          \
    } while (0)
        double routed[64] = {0.0}, shared[64] = {0.0};
        if (E) {
            double s[16], total = 0.0;
            int64_t pick[2];
            for (int64_t e = 0; e < E; e++) {
                double l = 0.0;
                for (int64_t d = 0; d < D; d++) l += (double)w2f(xr[d]) * router[e * D + d];
                s[e] = 1.0 / (1.0 + exp(-l));
            }
            for (int64_t k = 0; k < K; k++) { /* greedy top-K */
                int64_t best = -1;
                for (int64_t e = 0; e < E; e++)
                    if ((k == 0 || e != pick[0]) && (best < 0 || s[e] > s[best])) best = e;
                pick[k] = best;
                total += s[best];
            }
            for (int64_t k = 0; k < K; k++) {
                routes_ok &= idx[n * K + k] == pick[k];
                EXPERT(gate_up + pick[k] * 2 * I * D, down + pick[k] * D * I, I, y);
                for (int64_t d = 0; d < D; d++) routed[d] += s[pick[k]] / total * scaling * y[d];
            }
        }
        if (Is) EXPERT(s_gate_up, s_down, Is, shared);
#undef EXPERT
        for (int64_t d = 0; d < D; d++) {
            const double f = E && Is ? rw(rw(routed[d]) + shared[d]) : E ? rw(routed[d]) : shared[d];
            ref[n * D + d] = w2f(hn[d]) + f;
        }
    }
    char what[64];
    snprintf(what, sizeof what, "%s: the experts chosen", name);
    expect(routes_ok, what);
    float *g = widen(out, N * D);
    close_to(name, g, ref, N * D, TOL);
    free(h), free(norm_w), free(out), free(router), free(gate_up), free(down), free(s_gate_up), free(s_down), free(xn);
    free(act), free(ys), free(rs), free(gw), free(idx), free(ref), free(y), free(xr), free(a), free(g);
}

/* DSA's selection (ns_dsa_select): the scores from the kernel's own rotated queries iq and head weights iw (both
 * outputs: iw checked against its reference), then each query's K positions: increasing, and none of the rows
 * left out scores above the lowest chosen one */
static void test_dsa(void) {
    const int64_t B = 2, T = 2, Hi = 4, Di = 32, P = 8, K = 5, D = 48, Oq = 24, S = 40, M = B * T, half = P / 2;
    wt *iwq = rand_w(Hi * Di * Oq, 0.3f), *iwp = rand_w(Hi * D, 0.3f), *cq = rand_w(M * Oq, 1.f);
    wt *xn = rand_w(M * D, 1.f), *keys = rand_w(B * S * Di, 1.f), *iq = malloc(M * Hi * Di * sizeof(wt));
    float *cs = rand_f(M * half, 1.f), *sn = rand_f(M * half, 1.f), *iw = malloc(M * Hi * sizeof(float));
    float *isc = malloc(M * S * sizeof(float));
    uint8_t *mask = malloc(M * S), *sel_mask = malloc(M * K);
    int64_t *slots = malloc(B * S * sizeof(int64_t)), *ord = malloc(M * S * sizeof(int64_t));
    int64_t *sel = malloc(M * K * sizeof(int64_t));
    for (int64_t i = 0; i < M * S; i++) mask[i] = uniform() < 0.6f || i % S == 0;
    for (int64_t i = 0; i < B * S; i++) slots[i] = (i * 7 + 3) % (B * S);
    ns_dsa_select(iwq, iwp, Hi, Di, P, K, B, T, D, Oq, S, cq, xn, cs, sn, mask, keys, slots, 0, iq, iw, isc, ord,
                  sel_mask, sel, NT);
    double *ref_w = malloc(M * Hi * sizeof(double)), *ref = malloc(M * S * sizeof(double));
    float *got = malloc(M * S * sizeof(float));
    int inf_ok = 1, order_ok = 1;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t j = 0; j < Hi; j++) ref_w[m * Hi + j] = rw(rdot(xn + m * D, iwp + j * D, D) / sqrt((double)Hi));
        for (int64_t s = 0; s < S; s++) {
            const int64_t i = m * S + s;
            const wt *key = keys + slots[(m / T) * S + s] * Di;
            double acc = 0.0;
            for (int64_t j = 0; j < Hi; j++)
                acc += fmax(rw(rdot(key, iq + (m * Hi + j) * Di, Di)), 0.0) * iw[m * Hi + j];
            ref[i] = mask[i] ? rw(acc) : 0.0;
            got[i] = mask[i] ? isc[i] : 0.f;
            inf_ok &= mask[i] ? isfinite(isc[i]) : isc[i] == -INFINITY;
        }
        const int64_t *om = ord + m * S;
        float lowest = INFINITY;
        for (int64_t k = 0; k < K; k++) {
            order_ok &= (k == 0 || om[k] > om[k - 1]) && sel[m * K + k] == slots[(m / T) * S + om[k]] &&
                        sel_mask[m * K + k] == mask[m * S + om[k]];
            lowest = fminf(lowest, isc[m * S + om[k]]);
        }
        for (int64_t s = 0, k = 0; s < S; s++) {
            if (k < K && om[k] == s) k++;
            else order_ok &= isc[m * S + s] <= lowest;
        }
    }
    close_to("ns_dsa_select: head weights", iw, ref_w, M * Hi, TOL);
    close_to("ns_dsa_select: scores", got, ref, M * S, TOL);
    expect(inf_ok, "ns_dsa_select: -inf exactly where masked");
    expect(order_ok, "ns_dsa_select: the top K positions, in order, their slots and mask");
    free(iwq), free(iwp), free(cq), free(xn), free(keys), free(iq), free(cs), free(sn), free(iw), free(isc), free(mask);
    free(sel_mask), free(slots), free(ord), free(sel), free(ref_w), free(ref), free(got);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s <variant it was built for>\n", argv[0]);
        return 2;
    }
#ifdef NS_F32
    const char *dtype = "float32";
#else
    const char *dtype = "bf16";
#endif
    printf("cpu_decode self-test: %s, %s\n", ns_isa(), dtype);
    expect(strcmp(ns_isa(), argv[1]) == 0, "built for the variant asked (ns_isa)");
    test_dots();
    test_linear();
    test_rmsnorm();
    /* latent widths: 64 (whole vectors everywhere), 18 (the scalar o_lat); 2000 rows: the long-context split */
    test_absorbed("ns_mla_absorbed: rows shared", 21, 64, 0, 0, 0);
    test_absorbed("ns_mla_absorbed: rows per query", 21, 64, 1, 0, 0);
    test_absorbed("ns_mla_absorbed: rows through slots", 21, 64, 0, 1, 0);
    test_absorbed("ns_mla_absorbed: long context, split by rows", 2000, 64, 0, 1, 0);
    test_absorbed("ns_mla_absorbed: R = 18", 21, 18, 0, 0, 0);
    /* the 8-bit cache's reads: c_kv of two groups of 128 or one of 18, rows shared, per query, through slots, and
     * the long-context split */
    for (int fmt = NS_KV_FP8; fmt <= NS_KV_INT8; fmt++) {
        const char *f = fmt == NS_KV_FP8 ? "fp8" : "int8";
        char what[96];
        snprintf(what, sizeof what, "ns_mla_absorbed8 %s: rows shared, R = 256", f);
        test_absorbed(what, 21, 256, 0, 0, fmt);
        snprintf(what, sizeof what, "ns_mla_absorbed8 %s: rows per query", f);
        test_absorbed(what, 21, 64, 1, 0, fmt);
        snprintf(what, sizeof what, "ns_mla_absorbed8 %s: rows through slots, R = 18", f);
        test_absorbed(what, 21, 18, 0, 1, fmt);
        snprintf(what, sizeof what, "ns_mla_absorbed8 %s: long context, split by rows", f);
        test_absorbed(what, 2000, 256, 0, 1, fmt);
    }
    test_ffn("ns_ffn_block: dense", 0, 40);
    test_ffn("ns_ffn_block: MoE + shared", 8, 32);
    test_ffn("ns_ffn_block: MoE", 8, 0);
    test_dsa();
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
