/* One token through every PhiMoE decoder layer, in C: the CPU decode step at memory bandwidth.
 *
 * Decoding one token reads each active weight once, so its speed is how fast the weights stream
 * from memory. Here each matrix-vector product streams its rows one after another, widening
 * bfloat16 to float32 for FMA (AVX-512, AVX2; elsewhere plain C that the compiler vectorises),
 * and the whole step (all layers, the final norm) runs in one OpenMP parallel region, so there
 * is no per-operation dispatch, no allocation and no thread start-up per token.
 *
 * Numerics follow the eager bfloat16 reference operation for operation: every product is summed
 * in float32 and rounded once to bfloat16, and every elementwise step (rotary, residual adds,
 * SiLU, the sparsemixer's arithmetic) is rounded to bfloat16 where the eager model rounds.
 * Built by native.py with the host's compiler (-O3 -march=native -fopenmp); loaded with ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

typedef uint16_t bf16;

enum { MAX_HEAD_DIM = 512, MAX_GROUP = 16 }; /* native.supports() keeps models within these */

static inline float bf2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float rb(float f) { return bf2f(f2bf(f)); } /* f rounded to bfloat16 */

/* ------------------------------------------------------------------- y[i] = W[i, :] . x */
const char *phimoe_native_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "generic";
#endif
}

/* The vector unit: AVX-512 (16 floats), AVX2 + FMA (8), or none (plain C, which the compiler
 * vectorises where it can). WIDEN_BF16 / WIDEN_I8 load VL weights and widen them to float32:
 * exactly, so every product below is exact and only the float32 sums round. */
#if defined(__AVX512F__)
#define VL 16
typedef __m512 vf;
#define VZERO() _mm512_setzero_ps()
#define VADD(a, b) _mm512_add_ps(a, b)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define WIDEN_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define WIDEN_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
typedef __m256 vf;
#define VZERO() _mm256_setzero_ps()
#define VADD(a, b) _mm256_add_ps(a, b)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define WIDEN_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define WIDEN_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
static inline float vsum(vf v) {
    float s[8], t = 0.f;
    _mm256_storeu_ps(s, v);
    for (int j = 0; j < 8; j++) t += s[j];
    return t;
}
#endif

/* y[i] = W[i, :] . x for rows r0..r1 of W [*, K] (row-major, weights of type WT, each widened by
 * WIDEN, or by TO_F one at a time) and bfloat16 x [K], in float32.
 * One row at a time, front to back: a single sequential stream, which the hardware prefetcher
 * follows at full bandwidth (four rows interleaved measured ~40% slower here), into eight
 * independent sums. Widening bf16 to float32 and FMA read 55 GB/s where AVX512-BF16's vdpbf16ps
 * read 42 on the same memory (benchmarks/README.md). */
#ifdef VL
#define DOT_ROWS(WT, WIDEN, TO_F)                                                                       \
    for (; i < r1; i++) {                                                                              \
        const WT *w = W + i * K;                                                                       \
        vf a0 = VZERO(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;                \
        long k = 0;                                                                                    \
        for (; k + 8 * VL <= K; k += 8 * VL) {                                                         \
            a0 = VFMA(WIDEN(w + k), WIDEN_BF16(x + k), a0);                                            \
            a1 = VFMA(WIDEN(w + k + VL), WIDEN_BF16(x + k + VL), a1);                                  \
            a2 = VFMA(WIDEN(w + k + 2 * VL), WIDEN_BF16(x + k + 2 * VL), a2);                          \
            a3 = VFMA(WIDEN(w + k + 3 * VL), WIDEN_BF16(x + k + 3 * VL), a3);                          \
            a4 = VFMA(WIDEN(w + k + 4 * VL), WIDEN_BF16(x + k + 4 * VL), a4);                          \
            a5 = VFMA(WIDEN(w + k + 5 * VL), WIDEN_BF16(x + k + 5 * VL), a5);                          \
            a6 = VFMA(WIDEN(w + k + 6 * VL), WIDEN_BF16(x + k + 6 * VL), a6);                          \
            a7 = VFMA(WIDEN(w + k + 7 * VL), WIDEN_BF16(x + k + 7 * VL), a7);                          \
        }                                                                                              \
        for (; k + VL <= K; k += VL) a0 = VFMA(WIDEN(w + k), WIDEN_BF16(x + k), a0);                   \
        float t = vsum(VADD(VADD(VADD(a0, a4), VADD(a1, a5)), VADD(VADD(a2, a6), VADD(a3, a7))));      \
        for (; k < K; k++) t += TO_F(w[k]) * bf2f(x[k]);                                               \
        y[i] = t;                                                                                      \
    }
#else /* plain C: sixteen independent sums, which the compiler vectorises */
#define DOT_ROWS(WT, WIDEN, TO_F)                                                                       \
    for (; i < r1; i++) {                                                                              \
        const WT *w = W + i * K;                                                                       \
        float part[16] = {0}, t = 0.f;                                                                 \
        long k = 0;                                                                                    \
        for (; k + 16 <= K; k += 16)                                                                   \
            for (int j = 0; j < 16; j++) part[j] += TO_F(w[k + j]) * bf2f(x[k + j]);                   \
        for (; k < K; k++) t += TO_F(w[k]) * bf2f(x[k]);                                               \
        for (int j = 0; j < 16; j++) t += part[j];                                                     \
        y[i] = t;                                                                                      \
    }
#endif

static inline float i8f(int8_t v) { return (float)v; }

static void dot_rows(const bf16 *W, long K, const bf16 *x, long r0, long r1, float *y) {
    long i = r0;
    DOT_ROWS(bf16, WIDEN_BF16, bf2f)
}

/* int8 rows (their scales are applied by the caller) */
static void dot_rows_i8(const int8_t *W, long K, const bf16 *x, long r0, long r1, float *y) {
    long i = r0;
    DOT_ROWS(int8_t, WIDEN_I8, i8f)
}

/* this thread's share [*r0, *r1) of n rows, in blocks of 4 */
static void share(long n, long *r0, long *r1) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    long blocks = (n + 3) / 4, per = blocks / nt, extra = blocks % nt;
    long b0 = t * per + (t < extra ? t : extra), b1 = b0 + per + (t < extra);
    *r0 = b0 * 4 < n ? b0 * 4 : n;
    *r1 = b1 * 4 < n ? b1 * 4 : n;
}

/* y = bf16(W x + b) for this thread's rows; bias may be NULL */
static void linear_rows(const bf16 *W, const bf16 *b, const bf16 *x, long n, long k, float *tmp, bf16 *y) {
    long r0, r1;
    share(n, &r0, &r1);
    dot_rows(W, k, x, r0, r1, tmp);
    for (long i = r0; i < r1; i++) y[i] = f2bf(b ? tmp[i] + bf2f(b[i]) : tmp[i]);
}

void phimoe_linear(const bf16 *W, const bf16 *b, const bf16 *x, bf16 *y, long n, long k, float *tmp, int threads) {
#pragma omp parallel num_threads(threads)
    linear_rows(W, b, x, n, k, tmp, y);
}

/* rows r0..r1 of expert matrix e ([experts, n, K]: bfloat16, or int8 with float32 row scales)
 * times x, in float32; int8 rows are scaled as torch's int8 kernel does: by the scale rounded
 * to bfloat16 */
static void expert_rows(const void *W, const float *scale, long e, long n, long K, const bf16 *x, long r0, long r1, float *y) {
    if (!scale) {
        dot_rows((const bf16 *)W + e * n * K, K, x, r0, r1, y);
        return;
    }
    dot_rows_i8((const int8_t *)W + e * n * K, K, x, r0, r1, y);
    for (long i = r0; i < r1; i++) y[i] *= rb(scale[e * n + i]);
}

void phimoe_linear_int8(const int8_t *W, const float *scale, const bf16 *x, bf16 *y, long n, long k, float *tmp, int threads) {
#pragma omp parallel num_threads(threads)
    {
        long r0, r1;
        share(n, &r0, &r1);
        expert_rows(W, scale, 0, n, k, x, r0, r1, tmp);
        for (long i = r0; i < r1; i++) y[i] = f2bf(tmp[i]);
    }
}

/* ------------------------------------------------------------------------- the decoder layer */
typedef struct {
    int hidden, heads, kv_heads, head_dim, ffn, experts, top_k, layers;
    float eps, jitter_eps, mscale;
    long cache_head_stride; /* elements between two kv heads' rows in the cache */
} Dims;

typedef struct {
    const bf16 *ln1_w, *ln1_b, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;
    const bf16 *ln2_w, *ln2_b, *gate;
    const void *w1, *w2, *w3;  /* the stacked experts: bfloat16, or int8 with row scales s1..s3 */
    const float *s1, *s2, *s3; /* NULL for bfloat16 experts */
    bf16 *k_cache, *v_cache;   /* [kv_heads, rows, head_dim]; row T - 1 is written by the step */
} Layer;

/* float32 sum of n values, in 16 interleaved partial sums (vectorised; torch's order differs too) */
static float sum16(const float *v, int n) {
    float part[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) part[j] += v[i + j];
    float s = 0.f;
    for (; i < n; i++) s += v[i];
    for (int j = 0; j < 16; j++) s += part[j];
    return s;
}

/* nn.LayerNorm of bfloat16 x (statistics in float32), rounded to bfloat16; tmp: n floats */
static void layer_norm(const bf16 *x, const bf16 *w, const bf16 *b, int n, float eps, float *tmp, bf16 *out) {
    for (int i = 0; i < n; i++) tmp[i] = bf2f(x[i]);
    const float mean = sum16(tmp, n) / n;
    for (int i = 0; i < n; i++) tmp[i] = (tmp[i] - mean) * (tmp[i] - mean);
    const float inv = 1.f / sqrtf(sum16(tmp, n) / n + eps);
    for (int i = 0; i < n; i++) out[i] = f2bf((bf2f(x[i]) - mean) * inv * bf2f(w[i]) + bf2f(b[i]));
}

/* in place, one head: x * cos + rotate_half(x) * sin, rounded as the eager bfloat16 ops round */
static void rope(bf16 *x, const bf16 *cos, const bf16 *sin, int d) {
    int h = d / 2;
    for (int i = 0; i < h; i++) {
        float x1 = bf2f(x[i]), x2 = bf2f(x[i + h]);
        x[i] = f2bf(rb(x1 * bf2f(cos[i])) + rb(-x2 * bf2f(sin[i])));
        x[i + h] = f2bf(rb(x2 * bf2f(cos[i + h])) + rb(x1 * bf2f(sin[i + h])));
    }
}

/* softmax of n bfloat16 values (held in float) into float probabilities, rounded to bfloat16 */
static void softmax_bf16(const float *s, int n, float *p) {
    float m = -INFINITY, sum = 0.f;
    for (int i = 0; i < n; i++) m = s[i] > m ? s[i] : m;
    for (int i = 0; i < n; i++) sum += (p[i] = expf(s[i] - m));
    for (int i = 0; i < n; i++) p[i] = rb(p[i] / sum);
}

/* layers.sparsemixer for one token on bfloat16 scores, rounding as the eager ops do */
void phimoe_sparsemixer(const float *scores, int n, int top_k, float jitter_eps, int *chosen, float *weights) {
    float remaining[256], masked[256], probs[256];
    const float limit = rb(2.f * jitter_eps);
    for (int e = 0; e < n; e++) remaining[e] = scores[e];
    for (int k = 0; k < top_k; k++) {
        int idx = 0;
        for (int e = 1; e < n; e++) if (remaining[e] > remaining[idx]) idx = e;
        float best = remaining[idx];
        for (int e = 0; e < n; e++) {
            float factor = fabsf(scores[e]) > best ? fabsf(scores[e]) : best;
            masked[e] = rb(rb(best - scores[e]) / factor) > limit ? -INFINITY : remaining[e];
        }
        softmax_bf16(masked, n, probs);
        chosen[k] = idx, weights[k] = probs[idx];
        remaining[idx] = -INFINITY;
    }
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

typedef struct { /* per-token working memory, carved from the caller's scratch */
    bf16 *h, *qkv, *att, *act;
    float *tmp, *scores, *router, *weights;
    int *chosen;
} Work;

/* exp(v[i] - m) in place for v[i] <= m, in a form the compiler vectorises (glibc's expf is a call
 * per element): Cephes' expf, 2^n times a degree-6 polynomial on [-ln2/2, ln2/2], within 2 ulp. */
static void exp_shifted(float *v, int n, float m) {
    for (int i = 0; i < n; i++) {
        float x = v[i] - m;
        x = x < -87.f ? -87.f : x;
        const float t = x * 1.44269504f + 12582912.f; /* round to nearest: 1.5 * 2^23 */
        const float k = t - 12582912.f;
        float r = x - k * 0.693359375f;
        r = r - k * -2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.f;
        uint32_t bits;
        memcpy(&bits, &p, 4);
        bits += (uint32_t)(int32_t)k << 23;
        memcpy(&v[i], &bits, 4);
    }
}

#if defined(__AVX512F__)
/* the sums of 16 vectors, in order, by a transposing add tree (45 instructions, not 16 x ~10) */
static inline __m512 sum16x16(const __m512 *a) {
    __m512 b[8], c[4], e[2];
    for (int r = 0; r < 8; r++) /* per 128-bit lane: vectors 2r, 2r+1 */
        b[r] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * r], a[2 * r + 1]), _mm512_unpackhi_ps(a[2 * r], a[2 * r + 1]));
    for (int r = 0; r < 4; r++) /* per lane: vectors 4r .. 4r+3 */
        c[r] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * r], b[2 * r + 1], 0x44), _mm512_shuffle_ps(b[2 * r], b[2 * r + 1], 0xEE));
    for (int r = 0; r < 2; r++)
        e[r] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * r], c[2 * r + 1], 0x88), _mm512_shuffle_f32x4(c[2 * r], c[2 * r + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xDD));
}

/* Four query heads q[4][D] that share one kv head: s[h][t] = K[t] . q[h], each cache row widened
 * once for the four (not once per head); t in [t0, t1). D: a multiple of 16. */
static void scores4(const bf16 *K, int D, const float *q, int t0, int t1, float *s, long stride) {
    int t = t0;
    for (; t + 4 <= t1; t += 4) {
        __m512 a[16];
        for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
        for (int r = 0; r < 4; r++) {
            const bf16 *k = K + (long)(t + r) * D;
            for (int c = 0; c < D; c += 16) {
                const __m512 kv = WIDEN_BF16(k + c);
                for (int h = 0; h < 4; h++) a[4 * r + h] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q + h * D + c), a[4 * r + h]);
            }
        }
        float out[16];
        _mm512_storeu_ps(out, sum16x16(a));
        for (int r = 0; r < 4; r++)
            for (int h = 0; h < 4; h++) s[h * stride + t + r] = out[4 * r + h];
    }
    for (; t < t1; t++)
        for (int h = 0; h < 4; h++) {
            float d = 0.f;
            for (int c = 0; c < D; c++) d += bf2f(K[(long)t * D + c]) * q[h * D + c];
            s[h * stride + t] = d;
        }
}

/* acc[h][0..D) += sum over t in [t0, t1) of p[h][t] * V[t], four heads sharing each widened row;
 * D: a multiple of 64 (four registers of outputs per head, sixteen in all) */
static void values4(const bf16 *V, int D, const float *p, long stride, int t0, int t1, float *acc) {
    for (int i0 = 0; i0 < D; i0 += 64) {
        __m512 a[16];
        for (int h = 0; h < 4; h++)
            for (int j = 0; j < 4; j++) a[4 * h + j] = _mm512_loadu_ps(acc + h * D + i0 + 16 * j);
        for (int t = t0; t < t1; t++) {
            const bf16 *v = V + (long)t * D + i0;
            const __m512 v0 = WIDEN_BF16(v), v1 = WIDEN_BF16(v + 16), v2 = WIDEN_BF16(v + 32), v3 = WIDEN_BF16(v + 48);
            for (int h = 0; h < 4; h++) {
                const __m512 ph = _mm512_set1_ps(p[h * stride + t]);
                a[4 * h] = _mm512_fmadd_ps(ph, v0, a[4 * h]);
                a[4 * h + 1] = _mm512_fmadd_ps(ph, v1, a[4 * h + 1]);
                a[4 * h + 2] = _mm512_fmadd_ps(ph, v2, a[4 * h + 2]);
                a[4 * h + 3] = _mm512_fmadd_ps(ph, v3, a[4 * h + 3]);
            }
        }
        for (int h = 0; h < 4; h++)
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(acc + h * D + i0 + 16 * j, a[4 * h + j]);
    }
}
#endif

/* One query against the cache, per kv head: its group of query heads shares every pass over the
 * keys and values (read once, in blocks that stay in L1), so long contexts read the cache once. */
static void attention(const Dims *d, const Layer *L, const Work *w, int T) {
    enum { BLOCK = 64, CHUNK = 64 };
    const int D = d->head_dim, group = d->heads / d->kv_heads;
    const float scale = 1.f / sqrtf((float)D);
#pragma omp for schedule(static)
    for (int g = 0; g < d->kv_heads; g++) {
        const bf16 *K = L->k_cache + g * d->cache_head_stride, *V = L->v_cache + g * d->cache_head_stride;
        const int h0 = g * group;
        float acc[MAX_GROUP * MAX_HEAD_DIM];
#if defined(__AVX512F__)
        const int by4 = group % 4 == 0 && D % 64 == 0; /* Phi-3.5-MoE: 4 query heads per kv head, D 128 */
#else
        const int by4 = 0;
#endif
        if (by4) /* acc holds the queries in float32 until the value sums start */
            for (int i = 0; i < group * D; i++) acc[i] = bf2f(w->qkv[(long)h0 * D + i]);
        for (int t0 = 0; t0 < T; t0 += BLOCK) {
            const int n = T - t0 < BLOCK ? T - t0 : BLOCK;
#if defined(__AVX512F__)
            if (by4) {
                for (int h = 0; h < group; h += 4)
                    scores4(K, D, acc + h * D, t0, t0 + n, w->scores + (long)(h0 + h) * T, T);
                continue;
            }
#endif
            for (int h = 0; h < group; h++)
                dot_rows(K + (long)t0 * D, D, w->qkv + (long)(h0 + h) * D, 0, n, w->scores + (long)(h0 + h) * T + t0);
        }
        for (int h = 0; h < group; h++) { /* softmax(scores * scale) in float32 */
            float *s = w->scores + (long)(h0 + h) * T, m = -INFINITY;
            for (int t = 0; t < T; t++) {
                s[t] *= scale;
                m = s[t] > m ? s[t] : m;
            }
            exp_shifted(s, T, m);
            const float inv = 1.f / sum16(s, T);
            for (int t = 0; t < T; t++) s[t] *= inv;
        }
        if (by4) memset(acc, 0, sizeof(float) * group * D);
        for (int t0 = 0; t0 < T; t0 += BLOCK) { /* acc += p * V, CHUNK outputs at a time in registers */
            const int t1 = T - t0 < BLOCK ? T : t0 + BLOCK;
#if defined(__AVX512F__)
            if (by4) {
                for (int h = 0; h < group; h += 4)
                    values4(V, D, w->scores + (long)(h0 + h) * T, T, t0, t1, acc + h * D);
                continue;
            }
#endif
            for (int h = 0; h < group; h++) {
                const float *p = w->scores + (long)(h0 + h) * T;
                for (int i0 = 0; i0 < D; i0 += CHUNK) {
                    float *a = acc + h * D + i0, part[CHUNK];
                    const int c = D - i0 < CHUNK ? D - i0 : CHUNK;
                    if (t0 == 0) memset(a, 0, sizeof(float) * c);
                    if (c == CHUNK) {
                        memcpy(part, a, sizeof part);
                        for (int t = t0; t < t1; t++)
                            for (int i = 0; i < CHUNK; i++) part[i] += p[t] * bf2f(V[(long)t * D + i0 + i]);
                        memcpy(a, part, sizeof part);
                    } else {
                        for (int t = t0; t < t1; t++)
                            for (int i = 0; i < c; i++) a[i] += p[t] * bf2f(V[(long)t * D + i0 + i]);
                    }
                }
            }
        }
        for (int h = 0; h < group; h++)
            for (int i = 0; i < D; i++) w->att[(long)(h0 + h) * D + i] = f2bf(acc[h * D + i]);
    }
}

static void layer_step(const Dims *d, const Layer *L, bf16 *x, int T, const bf16 *cos, const bf16 *sin, const Work *w) {
    const int H = d->hidden, D = d->head_dim, F = d->ffn, qn = d->heads * D, kn = d->kv_heads * D;
    long r0, r1;
#pragma omp single
    layer_norm(x, L->ln1_w, L->ln1_b, H, d->eps, w->tmp, w->h);
    /* q, k, v */
    linear_rows(L->wq, L->bq, w->h, qn, H, w->tmp, w->qkv);
    linear_rows(L->wk, L->bk, w->h, kn, H, w->tmp + qn, w->qkv + qn);
    linear_rows(L->wv, L->bv, w->h, kn, H, w->tmp + qn + kn, w->qkv + qn + kn);
#pragma omp barrier
#pragma omp single
    {
        for (int hd = 0; hd < d->heads + d->kv_heads; hd++) rope(w->qkv + (long)hd * D, cos, sin, D);
        for (int g = 0; g < d->kv_heads; g++) {
            memcpy(L->k_cache + g * d->cache_head_stride + (long)(T - 1) * D, w->qkv + qn + (long)g * D, D * 2);
            memcpy(L->v_cache + g * d->cache_head_stride + (long)(T - 1) * D, w->qkv + qn + kn + (long)g * D, D * 2);
        }
    }
    attention(d, L, w, T);
    /* x += o_proj(attention) */
    share(H, &r0, &r1);
    dot_rows(L->wo, qn, w->att, r0, r1, w->tmp);
    for (long i = r0; i < r1; i++)
        x[i] = f2bf(bf2f(x[i]) + rb(L->bo ? w->tmp[i] + bf2f(L->bo[i]) : w->tmp[i]));
#pragma omp barrier
#pragma omp single
    {
        layer_norm(x, L->ln2_w, L->ln2_b, H, d->eps, w->tmp, w->h);
        dot_rows(L->gate, H, w->h, 0, d->experts, w->router);
        for (int e = 0; e < d->experts; e++) w->router[e] = rb(w->router[e]);
        phimoe_sparsemixer(w->router, d->experts, d->top_k, d->jitter_eps, w->chosen, w->weights);
    }
    /* the chosen experts: act_k = bf16(bf16(silu(w1 h)) * (w3 h)) */
    share(F, &r0, &r1);
    for (int k = 0; k < d->top_k; k++) {
        const long e = w->chosen[k];
        float *g = w->tmp + 2L * k * F, *u = g + F;
        expert_rows(L->w1, L->s1, e, F, H, w->h, r0, r1, g);
        expert_rows(L->w3, L->s3, e, F, H, w->h, r0, r1, u);
        for (long i = r0; i < r1; i++) w->act[(long)k * F + i] = f2bf(rb(silu(rb(g[i]))) * rb(u[i]));
    }
#pragma omp barrier
    /* x += sum over the chosen experts, in expert order, of bf16(bf16(w2 act_k) * weight_k) */
    share(H, &r0, &r1);
    int order[64];
    for (int k = 0; k < d->top_k; k++) order[k] = k;
    for (int a = 1; a < d->top_k; a++)
        for (int b = a; b > 0 && w->chosen[order[b]] < w->chosen[order[b - 1]]; b--) {
            int t = order[b]; order[b] = order[b - 1]; order[b - 1] = t;
        }
    float *y = w->tmp + 2L * d->top_k * F;
    for (int j = 0; j < d->top_k; j++) {
        const int k = order[j];
        const long e = w->chosen[k];
        expert_rows(L->w2, L->s2, e, H, F, w->act + (long)k * F, r0, r1, y + (long)j * H);
    }
    for (long i = r0; i < r1; i++) {
        float sum = 0.f;
        for (int j = 0; j < d->top_k; j++) {
            float v = rb(rb(y[(long)j * H + i]) * w->weights[order[j]]);
            sum = j ? rb(sum + v) : v;
        }
        x[i] = f2bf(bf2f(x[i]) + sum);
    }
#pragma omp barrier
}

/* bytes of scratch memory phimoe_decode needs for a context of up to T tokens */
long phimoe_scratch_bytes(const Dims *d, long T) {
    long qkv = (long)(d->heads + 2 * d->kv_heads) * d->head_dim, f = d->ffn, h = d->hidden;
    long floats = qkv + 2L * d->top_k * f + (long)d->top_k * h + h + 3L * d->experts + (long)d->heads * T;
    long halves = h + qkv + (long)d->heads * d->head_dim + (long)d->top_k * f;
    return 4 * floats + 2 * halves + 64 * 8;
}

/* x [hidden] (bfloat16, updated in place) through every layer for the token at cache row T - 1
 * and rotary position `position`; the final layer norm's output goes to `out`. `threads`: as many
 * as torch.get_num_threads() (OpenMP's default is per calling thread, torch's is global).
 * inv_freq [head_dim / 2]: the rotary frequencies (short or long factors) in float32. */
void phimoe_decode(const Dims *d, const Layer *layers, bf16 *x, int T, int position, const float *inv_freq,
                   const bf16 *norm_w, const bf16 *norm_b, bf16 *out, void *scratch, int threads) {
    const int D = d->head_dim;
    long qkv = (long)(d->heads + 2 * d->kv_heads) * D;
    Work w;
    char *p = (char *)scratch;
    w.tmp = (float *)p, p += 4 * (qkv + 2L * d->top_k * d->ffn + (long)d->top_k * d->hidden + d->hidden);
    w.router = (float *)p, p += 4L * d->experts;
    w.weights = (float *)p, p += 4L * d->experts;
    w.chosen = (int *)p, p += 4L * d->experts;
    w.scores = (float *)p, p += 4L * d->heads * T;
    w.h = (bf16 *)p, p += 2L * d->hidden;
    w.qkv = (bf16 *)p, p += 2 * qkv;
    w.att = (bf16 *)p, p += 2L * d->heads * D;
    w.act = (bf16 *)p;
    bf16 cos[MAX_HEAD_DIM], sin[MAX_HEAD_DIM]; /* as LongRoPE.forward: bf16(cos(position * inv_freq) * mscale) */
    for (int i = 0; i < D; i++) {
        float f = (float)position * inv_freq[i % (D / 2)];
        cos[i] = f2bf(cosf(f) * d->mscale);
        sin[i] = f2bf(sinf(f) * d->mscale);
    }
#pragma omp parallel num_threads(threads)
    {
        for (int l = 0; l < d->layers; l++) layer_step(d, layers + l, x, T, cos, sin, &w);
#pragma omp single
        layer_norm(x, norm_w, norm_b, d->hidden, d->eps, w.tmp, out);
    }
}
