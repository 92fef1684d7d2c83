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
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

typedef uint16_t bf16;

enum { MAX_HEAD_DIM = 512, MAX_GROUP = 16 }; /* decode.supports_native() keeps models within these */

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
 * vectorises where it can). WIDEN_BF16 loads VL bfloat16 values and widens them to float32:
 * exactly, so every product below is exact and only the float32 sums round. */
#if defined(__AVX512F__)
#define VL 16
typedef __m512 vf;
#define VZERO() _mm512_setzero_ps()
#define VADD(a, b) _mm512_add_ps(a, b)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define WIDEN_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
typedef __m256 vf;
#define VZERO() _mm256_setzero_ps()
#define VADD(a, b) _mm256_add_ps(a, b)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define WIDEN_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
static inline float vsum(vf v) {
    float s[8], t = 0.f;
    _mm256_storeu_ps(s, v);
    for (int j = 0; j < 8; j++) t += s[j];
    return t;
}
#endif

/* Software prefetch PREFETCH bytes ahead of the weight stream, one cache line per 64 bytes read
 * (0: none). With two cores streaming at ~16 GB/s each one's hardware prefetcher alone keeps too
 * few lines in flight once every line also costs widening and FMAs. AVX2 builds: the row loop
 * read 85-92% of a plain read of the same bytes without it and 96-102% with it, at 1024 B
 * (benchmarks/gemv_micro.c, AMD EPYC Zen 3). AVX-512 builds: bf16 / int8 / 4-bit rows read
 * 80 / 71 / 72% of a plain read without it, 90 / 80 / 84% at 1024 B and 95 / 93 / 98% at 4096 B,
 * 8192 B no better (benchmarks/row_read.py, 2 threads, an Intel Xeon with AVX512-VNNI and
 * ~20 GB/s). The AVX2 build on that Xeon (AMX, 2026-12-03): bf16 / int8 / 4-bit 87 / 82 / 72% at
 * 1024 B, 104 / 101 / 90% at 4096 B, so AVX2 builds prefetch 4096 B too (not yet measured on an
 * AVX2-only CPU at 4096). */
#ifndef PREFETCH
#if defined(__AVX512F__) || defined(__AVX2__)
#define PREFETCH 4096
#else
#define PREFETCH 0
#endif
#endif
#define PREFETCH_LINE(p) do { if (PREFETCH) __builtin_prefetch((const char *)(p) + PREFETCH, 0, 3); } while (0)

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
            for (int l = 0; l < 8 * VL * (int)sizeof(WT); l += 64) PREFETCH_LINE((const char *)(w + k) + l); \
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

#ifdef VL
/* Widening without shuffles: a vector of 2 VL bfloat16 weights, read as VL 32-bit lanes, holds
 * weight 2j in the low half of lane j and 2j + 1 in the high half, so a left shift by 16 gives
 * the even weights as float32 and clearing the low halves the odd ones. x is laid out to match
 * once per call (xs: per 2 VL values, the even ones, then the odd ones). The cvtepu16 widening
 * above costs a shuffle per VL weights (and per VL values of x, for every row), and Intel cores
 * have one shuffle port: that bound the AVX2 loop to ~66% of the memory's speed on an AVX-512
 * Xeon run as AVX2 (mid shape, 2 threads). Products are exact either way; only the order of the
 * float32 sums differs. */
#if defined(__AVX512F__)
typedef __m512i vi;
#define VLOADI(p) _mm512_loadu_si512((const void *)(p))
#define EVEN_BF16(v) _mm512_castsi512_ps(_mm512_slli_epi32(v, 16))
#define ODD_BF16(v) _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)))
#define VLOADF(p) _mm512_loadu_ps(p)
#else
typedef __m256i vi;
#define VLOADI(p) _mm256_loadu_si256((const __m256i *)(p))
#define EVEN_BF16(v) _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
#define ODD_BF16(v) _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)))
#define VLOADF(p) _mm256_loadu_ps(p)
#endif
#define XS_MAX 16384 /* longest x laid out on the stack (64 KiB); longer rows take DOT_ROWS */

static void dot_rows(const bf16 *W, long K, const bf16 *x, long r0, long r1, float *y) {
    long i = r0;
    const long K2 = K / (2 * VL) * (2 * VL);
    if (K2 == 0 || K > XS_MAX) {
        DOT_ROWS(bf16, WIDEN_BF16, bf2f)
        return;
    }
    float xs[K2];
    for (long k = 0; k < K2; k += 2 * VL)
        for (int j = 0; j < VL; j++) xs[k + j] = bf2f(x[k + 2 * j]), xs[k + VL + j] = bf2f(x[k + 2 * j + 1]);
    for (; i < r1; i++) {
        const bf16 *w = W + i * K;
        vf a0 = VZERO(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        long k = 0;
        for (; k + 8 * VL <= K2; k += 8 * VL) {
            for (int l = 0; l < 16 * VL; l += 64) PREFETCH_LINE((const char *)(w + k) + l);
            const vi v0 = VLOADI(w + k), v1 = VLOADI(w + k + 2 * VL), v2 = VLOADI(w + k + 4 * VL), v3 = VLOADI(w + k + 6 * VL);
            a0 = VFMA(EVEN_BF16(v0), VLOADF(xs + k), a0);
            a1 = VFMA(ODD_BF16(v0), VLOADF(xs + k + VL), a1);
            a2 = VFMA(EVEN_BF16(v1), VLOADF(xs + k + 2 * VL), a2);
            a3 = VFMA(ODD_BF16(v1), VLOADF(xs + k + 3 * VL), a3);
            a4 = VFMA(EVEN_BF16(v2), VLOADF(xs + k + 4 * VL), a4);
            a5 = VFMA(ODD_BF16(v2), VLOADF(xs + k + 5 * VL), a5);
            a6 = VFMA(EVEN_BF16(v3), VLOADF(xs + k + 6 * VL), a6);
            a7 = VFMA(ODD_BF16(v3), VLOADF(xs + k + 7 * VL), a7);
        }
        for (; k < K2; k += 2 * VL) {
            const vi v = VLOADI(w + k);
            a0 = VFMA(EVEN_BF16(v), VLOADF(xs + k), a0);
            a1 = VFMA(ODD_BF16(v), VLOADF(xs + k + VL), a1);
        }
        float t = vsum(VADD(VADD(VADD(a0, a4), VADD(a1, a5)), VADD(VADD(a2, a6), VADD(a3, a7))));
        for (; k < K; k++) t += bf2f(w[k]) * bf2f(x[k]);
        y[i] = t;
    }
}
#else
static void dot_rows(const bf16 *W, long K, const bf16 *x, long r0, long r1, float *y) {
    long i = r0;
    DOT_ROWS(bf16, WIDEN_BF16, bf2f)
}
#endif

/* this thread's share [*r0, *r1) of n rows, in blocks of `unit` */
static void share_units(long n, long unit, long *r0, long *r1) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    long blocks = (n + unit - 1) / unit, per = blocks / nt, extra = blocks % nt;
    long b0 = t * per + (t < extra ? t : extra), b1 = b0 + per + (t < extra);
    *r0 = b0 * unit < n ? b0 * unit : n;
    *r1 = b1 * unit < n ? b1 * unit : n;
}

/* this thread's share [*r0, *r1) of n rows, in blocks of 4 */
static void share(long n, long *r0, long *r1) { share_units(n, 4, r0, r1); }

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

/* ------------------------------------------------------ quantized weights, int16 activations
 * int8 and 4-bit weights are multiplied as integers: the activation vector is quantized to int16
 * in blocks of QB = 64 values (x ~ q * d, d = max |x| / 32639, q = round(x / d): within 1/65278
 * of the block's largest value, a hundred times finer than x's own bfloat16 rounding), each
 * weight is widened to int16 and the products are summed exactly in int32 per block (AVX-512
 * vpdpwssd / vpmaddwd, AVX2 vpmaddwd: 16 or 32 products an instruction), then scaled in float32.
 * Widening every weight to float32 instead took three instructions per 16 weights and made int8
 * compute-bound; int8 activations (llama.cpp's Q8_0) would be cheaper still but add an error the
 * size of the weights' own quantization error.
 *
 * Weights: int8 rows with one float32 scale each (bitsandbytes' row-wise absmax), or 4-bit
 * codes in bitsandbytes' packing (byte j of a row holds weights 2j in its high nibble and 2j + 1
 * in its low one) with one float32 absmax per 64 weights; a code stands for lut[code] / 127 (the
 * NF4 or FP4 value rounded to int8, within 0.4% of the block's absmax). */
enum { QB = 64, W_BF16 = 0, W_I8 = 1, W_Q4 = 2 };

typedef struct {
    const void *w;      /* bf16 or int8 [.., n, K]; 4-bit: uint8 [.., n * K / 2] */
    const float *s;     /* int8: a scale per row [.., n]; 4-bit: an absmax per 64 weights [.., n * K / 64] */
    const int8_t *lut;  /* 4-bit: the 16 code values, value * 127 rounded */
    int kind;           /* W_BF16, W_I8 or W_Q4 */
} Mat;

typedef struct {  /* one activation vector of K values, quantized; views of scratch memory */
    int16_t *q;   /* [K]: q, in order */
    int16_t *qp;  /* [K + 128] (K % 64 == 0 only): q in the order the 4-bit kernels meet the codes.
                   * Those split a block's 32 bytes into low nibbles (values 2j + 1) and high ones
                   * (values 2j), then each into the bytes of even and odd j, as 16-bit lanes: so per
                   * pair of blocks A, B (128 values), the values 4t + 1 of A (16), of B (16), then
                   * 4t + 3, 4t, 4t + 2 likewise */
    float *d;     /* [blocks]: the block scales */
    float *dc;    /* [blocks] (with qp): 128 d (sum of the block's q), what the AVX2 4-bit loop's
                   * codes, offset by 128 to be read as unsigned bytes, add to a block's sum */
    int8_t *qb;   /* [3 K] (K % 64 == 0 only; AVX512-VNNI builds): per pair of whole blocks (128
                   * values, 384 bytes), q split into signed bytes, q = 256 hi + lo, for vpdpbusd:
                   * hi of the values 2t + 1 of A then of B (t < 32; 64 bytes), hi of the values
                   * 2t, lo of 2t + 1, lo of 2t; then the int32 lanes -128 * (sum of A's q) and
                   * -128 * (sum of B's) at lanes 0 and 8 (64 bytes), and d of A in lanes 0-7, of
                   * B in lanes 8-15 (float32, 64 bytes). See dot_rows_q4 */
    long K;
} QX;

/* |q| <= QMAX = 127 * 256 + 127, so that q splits into two signed bytes */
#define QMAX 32639.f

static long round64(long n) { return (n + 63) / 64 * 64; }

static long qx_bytes(long K) { return 2 * round64(K) + 2 * round64(K + 128) + 8 * round64((K + QB - 1) / QB) + 3 * round64(K) + 128; }

static char *qx_carve(QX *o, long K, char *p) {
    p = (char *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
    o->K = K;
    o->q = (int16_t *)p, p += 2 * round64(K);
    o->qp = (int16_t *)p, p += 2 * round64(K + 128);
    o->d = (float *)p, p += 4 * round64((K + QB - 1) / QB);
    o->dc = (float *)p, p += 4 * round64((K + QB - 1) / QB);
    o->qb = (int8_t *)p, p += 3 * round64(K);
    return p;
}

/* x [K] (bfloat16) into o: q = round-to-even(x / d) with d = max |x| / QMAX per block of QB */
static void quantize_x(const bf16 *x, QX *o) {
    const long K = o->K;
    for (long i0 = 0; i0 < K; i0 += QB) {
        const long i1 = i0 + QB < K ? i0 + QB : K;
        float amax = 0.f, d, id;
#if defined(__AVX512F__)
        if (i1 - i0 == QB) { /* a whole block: the same operations, 16 at a time (x * id rounds to even) */
            __m512 v[4];
            for (int j = 0; j < 4; j++) v[j] = WIDEN_BF16(x + i0 + 16 * j);
            amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])),
                                                      _mm512_max_ps(_mm512_abs_ps(v[2]), _mm512_abs_ps(v[3]))));
            d = amax / QMAX, id = d > 0.f ? 1.f / d : 0.f;
            for (int j = 0; j < 4; j++)
                _mm256_storeu_si256((__m256i *)(o->q + i0 + 16 * j),
                                    _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v[j], _mm512_set1_ps(id)))));
            goto quantized;
        }
#endif
        for (long i = i0; i < i1; i++) amax = fmaxf(amax, fabsf(bf2f(x[i])));
        d = amax / QMAX, id = d > 0.f ? 1.f / d : 0.f;
        for (long i = i0; i < i1; i++) {
            float v = nearbyintf(bf2f(x[i]) * id);
            o->q[i] = (int16_t)(v > QMAX ? QMAX : v < -QMAX ? -QMAX : v);
        }
#if defined(__AVX512F__)
    quantized:
#endif
        o->d[i0 / QB] = d;
        if (o->qp && i1 - i0 == QB && K % 64 == 0) {
            int32_t sum = 0;
            for (long i = i0; i < i1; i++) sum += o->q[i];
            o->dc[i0 / QB] = 128.f * d * (float)sum;
            int16_t *pair = o->qp + (i0 / 128) * 128 + ((i0 / 64) % 2) * 16; /* this block's half of its pair */
            for (int t = 0; t < 16; t++) {
                pair[t] = o->q[i0 + 4 * t + 1];
                pair[32 + t] = o->q[i0 + 4 * t + 3];
                pair[64 + t] = o->q[i0 + 4 * t];
                pair[96 + t] = o->q[i0 + 4 * t + 2];
            }
        }
    }
#if defined(__AVX512VNNI__)
    if (o->qb && K % 64 == 0)
        for (long i0 = 0; i0 + 2 * QB <= K; i0 += 2 * QB) {
            int8_t *h = o->qb + 3 * i0;
            int32_t *corr = (int32_t *)(h + 256);
            float *d = (float *)(h + 320);
            memset(corr, 0, 64);
            for (int c = 0; c < 4; c++) { /* 32 values: t = 16 c .. 16 c + 15 of the pair's 64 (A's, then B's) */
                const __m512i v = _mm512_loadu_si512(o->q + i0 + 32 * c);
                const __m512i odd = _mm512_srai_epi32(v, 16), even = _mm512_srai_epi32(_mm512_slli_epi32(v, 16), 16);
                const __m512i lo_odd = _mm512_srai_epi32(_mm512_slli_epi32(odd, 24), 24);
                const __m512i lo_even = _mm512_srai_epi32(_mm512_slli_epi32(even, 24), 24);
                _mm_storeu_si128((__m128i *)(h + 16 * c), _mm512_cvtepi32_epi8(_mm512_srai_epi32(_mm512_sub_epi32(odd, lo_odd), 8)));
                _mm_storeu_si128((__m128i *)(h + 64 + 16 * c), _mm512_cvtepi32_epi8(_mm512_srai_epi32(_mm512_sub_epi32(even, lo_even), 8)));
                _mm_storeu_si128((__m128i *)(h + 128 + 16 * c), _mm512_cvtepi32_epi8(lo_odd));
                _mm_storeu_si128((__m128i *)(h + 192 + 16 * c), _mm512_cvtepi32_epi8(lo_even));
                corr[8 * (c / 2)] -= 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(odd, even));
            }
            _mm512_storeu_ps(d, _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(o->d[i0 / QB]), _mm512_set1_ps(o->d[i0 / QB + 1])));
        }
#endif
}

/* sum of w[j] * q[j] for j < n, exactly */
static inline int32_t idot(const int8_t *w, const int16_t *q, long n) {
    int32_t s = 0;
    for (long j = 0; j < n; j++) s += (int32_t)w[j] * q[j];
    return s;
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum256(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
/* the int32 sums of 16 int8 weights (widened) times 16 int16 values, in pairs */
static inline __m256i madd16(__m128i w8, const int16_t *q) {
    return _mm256_madd_epi16(_mm256_cvtepi8_epi16(w8), _mm256_loadu_si256((const __m256i *)q));
}
#endif
#if defined(__AVX512BW__)
/* acc + the int32 sums of 32 int16 lanes of w times 32 int16 values, in pairs */
static inline __m512i dpw(__m512i acc, __m512i w, const int16_t *q) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, w, _mm512_loadu_si512(q));
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_loadu_si512(q)));
#endif
}
#endif

/* y[i] = sum over blocks b of d_b * sum of W[i, j] q_j, for int8 rows r0..r1 of W [*, K] */
static void dot_rows_i8(const int8_t *W, long K, const QX *x, long r0, long r1, float *y) {
    for (long i = r0; i < r1; i++) {
        const int8_t *w = W + i * K;
        float t = 0.f;
        long k = 0;
#if defined(__AVX2__) && defined(__FMA__) /* (a 512-bit version measured no faster in the decode step) */
        __m256 f = _mm256_setzero_ps();
        for (; k + QB <= K; k += QB) {
            PREFETCH_LINE(w + k);
            const __m256i a = _mm256_add_epi32(madd16(_mm_loadu_si128((const __m128i *)(w + k)), x->q + k),
                                               madd16(_mm_loadu_si128((const __m128i *)(w + k + 16)), x->q + k + 16));
            const __m256i b = _mm256_add_epi32(madd16(_mm_loadu_si128((const __m128i *)(w + k + 32)), x->q + k + 32),
                                               madd16(_mm_loadu_si128((const __m128i *)(w + k + 48)), x->q + k + 48));
            f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a, b)), _mm256_set1_ps(x->d[k / QB]), f);
        }
        t = hsum256(f);
#endif
        for (; k < K; k += QB) t += x->d[k / QB] * (float)idot(w + k, x->q + k, K - k < QB ? K - k : QB);
        y[i] = t;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* one 4-bit block (32 bytes, 64 weights) times its int16 values (x's pair layout: q, q + 2, q + 4,
 * q + 6), as int32 sums of (code value + 128) q: tbl holds the values + 128 (1..255), so the even
 * and odd bytes widen to int16 by a mask and a shift (not two shifts and one); the caller takes
 * back 128 * (sum of the block's q), x->dc */
static inline __m256i q4_block_avx2(const uint8_t *p, const __m256i *q, __m256i tbl, __m256i low) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p), byte = _mm256_set1_epi16(0xFF);
    const __m256i lo = _mm256_shuffle_epi8(tbl, _mm256_and_si256(v, low));
    const __m256i hi = _mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
    return _mm256_add_epi32(
        _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(lo, byte), _mm256_loadu_si256(q)),
                         _mm256_madd_epi16(_mm256_srli_epi16(lo, 8), _mm256_loadu_si256(q + 2))),
        _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(hi, byte), _mm256_loadu_si256(q + 4)),
                         _mm256_madd_epi16(_mm256_srli_epi16(hi, 8), _mm256_loadu_si256(q + 6))));
}
#endif

#define AD_CHUNK 256 /* blocks whose scales the AVX2 4-bit loop takes at a time (an even number) */
/* y[i] = sum over 64-blocks b of absmax_ib / 127 * d_b * sum of code . q, for 4-bit rows r0..r1
 * (K / 2 bytes and K / 64 absmax each; K a multiple of 64) */
static void dot_rows_q4(const uint8_t *P, const float *A, const int8_t *lut, long K, const QX *x, long r0, long r1, float *y) {
    const long nb = K / 64;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256i tbl = _mm256_xor_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lut)),
                                         _mm256_set1_epi8(-128)); /* the values + 128, as unsigned bytes */
    const __m256i low = _mm256_set1_epi8(15);
#endif
    for (long i = r0; i < r1; i++) {
        const uint8_t *p = P + i * (K / 2);
        const float *a = A + i * nb;
        float t = 0.f;
        long b = 0;
#if defined(__AVX512VNNI__)
        /* two blocks (64 bytes, 128 weights) by vpdpbusd, unsigned bytes times signed ones, 64
         * products an instruction: the codes as bytes lut + 128 (1..255), x as its two signed
         * bytes, so sum (c + 128) x = 256 (sum (c + 128) hi) + sum (c + 128) lo, exactly; the
         * 128 sum x is taken back by starting the lo sums at -128 sum x (qb's correction lanes) */
        const __m512i tbl5 = _mm512_broadcast_i32x4(_mm_add_epi8(_mm_loadu_si128((const __m128i *)lut), _mm_set1_epi8(-128)));
        const __m512i low5 = _mm512_set1_epi8(15), spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        __m512 f = _mm512_setzero_ps();
        for (; b + 2 <= nb; b += 2) {
            PREFETCH_LINE(p + 32 * b);
            const __m512i v = _mm512_loadu_si512(p + 32 * b);
            const __m512i lo = _mm512_shuffle_epi8(tbl5, _mm512_and_si512(v, low5));  /* values 2t + 1 */
            const __m512i hi = _mm512_shuffle_epi8(tbl5, _mm512_and_si512(_mm512_srli_epi16(v, 4), low5));  /* 2t */
            const int8_t *q = x->qb + 192 * b;
            const __m512i sh = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(q)),
                                                   hi, _mm512_loadu_si512(q + 64));
            const __m512i sl = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_loadu_si512(q + 256), lo, _mm512_loadu_si512(q + 128)),
                                                   hi, _mm512_loadu_si512(q + 192));
            /* lanes 0-7: block b, 8-15: block b + 1 */
            const __m512 ab = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(a + b)))));
            const __m512 scale = _mm512_mul_ps(ab, _mm512_loadu_ps((const float *)(q + 320)));
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(sh, 8), sl)), scale, f);
        }
        t = _mm512_reduce_add_ps(f);
#elif defined(__AVX512BW__)
        const __m512i tbl5 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)lut)), low5 = _mm512_set1_epi8(15);
        __m512 f = _mm512_setzero_ps();
        for (; b + 2 <= nb; b += 2) { /* two blocks: 64 bytes, 128 weights */
            PREFETCH_LINE(p + 32 * b);
            const __m512i v = _mm512_loadu_si512(p + 32 * b);
            const __m512i lo = _mm512_shuffle_epi8(tbl5, _mm512_and_si512(v, low5));
            const __m512i hi = _mm512_shuffle_epi8(tbl5, _mm512_and_si512(_mm512_srli_epi16(v, 4), low5));
            /* the int8 codes of even and odd bytes as int16 lanes, by shifts (no lane crossing) */
            const int16_t *q = x->qp + 64 * b;
            __m512i acc = dpw(_mm512_setzero_si512(), _mm512_srai_epi16(_mm512_slli_epi16(lo, 8), 8), q);
            acc = dpw(acc, _mm512_srai_epi16(lo, 8), q + 32);
            acc = dpw(acc, _mm512_srai_epi16(_mm512_slli_epi16(hi, 8), 8), q + 64);
            acc = dpw(acc, _mm512_srai_epi16(hi, 8), q + 96);
            /* lanes 0-7: block b, 8-15: block b + 1 */
            const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a[b] * x->d[b]), _mm512_set1_ps(a[b + 1] * x->d[b + 1]));
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, f);
        }
        t = _mm512_reduce_add_ps(f);
#endif
#if defined(__AVX2__) && defined(__FMA__)
        /* two blocks an iteration into two sums (more independent work for a core that two
         * threads share), then the odd one */
        __m256 g = _mm256_setzero_ps(), g1 = g, back = g; /* back: sum of absmax_b dc_b */
        const long b0 = b;
        for (; b + 8 <= nb; b += 8)
            back = _mm256_fmadd_ps(_mm256_loadu_ps(a + b), _mm256_loadu_ps(x->dc + b), back);
        float back1 = 0.f;
        for (; b < nb; b++) back1 += a[b] * x->dc[b];
        /* the blocks' scales absmax_b d_b first, 8 at a time, so that the loop broadcasts each from
         * memory (a load, not a multiply and a shuffle: the loop is bound by vector operations) */
        for (long c0 = b0; c0 < nb; c0 += AD_CHUNK) {
            const long c1 = c0 + AD_CHUNK < nb ? c0 + AD_CHUNK : nb;
            float ad[AD_CHUNK];
            for (long j = c0; j < c1; j++) ad[j - c0] = a[j] * x->d[j];
            b = c0;
            for (; b + 2 <= c1; b += 2) {
                PREFETCH_LINE(p + 32 * b);
                const __m256i *q = (const __m256i *)(x->qp + (b / 2) * 128);
                g = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q4_block_avx2(p + 32 * b, q, tbl, low)), _mm256_broadcast_ss(ad + b - c0), g);
                g1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q4_block_avx2(p + 32 * b + 32, q + 1, tbl, low)),
                                     _mm256_broadcast_ss(ad + b + 1 - c0), g1);
            }
            for (; b < c1; b++) { /* one block: 32 bytes, 64 weights */
                if (b % 2 == 0) PREFETCH_LINE(p + 32 * b);
                const __m256i *q = (const __m256i *)(x->qp + (b / 2) * 128 + (b % 2) * 16);
                g = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q4_block_avx2(p + 32 * b, q, tbl, low)), _mm256_broadcast_ss(ad + b - c0), g);
            }
        }
        t += hsum256(_mm256_sub_ps(_mm256_add_ps(g, g1), back)) - back1;
#endif
        for (; b < nb; b++) { /* plain C: unpack a block, then one exact integer sum */
            int8_t c[64];
            for (int j = 0; j < 32; j++) {
                c[2 * j] = lut[p[32 * b + j] >> 4];
                c[2 * j + 1] = lut[p[32 * b + j] & 15];
            }
            t += a[b] * x->d[b] * (float)idot(c, x->q + 64 * b, 64);
        }
        y[i] = t * (1.f / 127.f);
    }
}

/* rows r0..r1 of matrix e of m ([.., n, K]) times x, in float32: bf16 rows read the bfloat16
 * vector, quantized rows its quantized form qx; int8 rows are scaled by their scale rounded to
 * bfloat16, as the eager int8 path (torch's int8 kernel) scales them */
static void mat_rows(const Mat *m, long e, long n, long K, const bf16 *x, const QX *qx, long r0, long r1, float *y) {
    if (m->kind == W_BF16) {
        dot_rows((const bf16 *)m->w + e * n * K, K, x, r0, r1, y);
    } else if (m->kind == W_I8) {
        dot_rows_i8((const int8_t *)m->w + e * n * K, K, qx, r0, r1, y);
        for (long i = r0; i < r1; i++) y[i] *= rb(m->s[e * n + i]);
    } else {
        dot_rows_q4((const uint8_t *)m->w + e * n * (K / 2), m->s + e * n * (K / 64), m->lut, K, qx, r0, r1, y);
    }
}

/* y = bf16(m x + b) for this thread's rows */
static void mat_linear_rows(const Mat *m, const bf16 *b, const bf16 *x, const QX *qx, long n, long k, float *tmp, bf16 *y) {
    long r0, r1;
    share(n, &r0, &r1);
    mat_rows(m, 0, n, k, x, qx, r0, r1, tmp);
    for (long i = r0; i < r1; i++) y[i] = f2bf(b ? tmp[i] + bf2f(b[i]) : tmp[i]);
}

long phimoe_qlinear_scratch(long n, long k) { return qx_bytes(k) + 4 * n + 64; }

/* y = bf16(m[e] x + b) for one bfloat16 vector x [k]; m [.., n, k] (b may be NULL) */
void phimoe_qlinear(const Mat *m, long e, const bf16 *b, const bf16 *x, bf16 *y, long n, long k, void *scratch, int threads) {
    QX qx;
    float *tmp = (float *)qx_carve(&qx, k, (char *)scratch);
    if (m->kind != W_BF16) quantize_x(x, &qx);
#pragma omp parallel num_threads(threads)
    {
        long r0, r1;
        share(n, &r0, &r1);
        mat_rows(m, e, n, k, x, &qx, r0, r1, tmp);
        for (long i = r0; i < r1; i++) y[i] = f2bf(b ? tmp[i] + bf2f(b[i]) : tmp[i]);
    }
}

#if defined(__AVX512F__)
/* 8 bytes of 4-bit codes (16 codes, high nibble first) as float32 values tbl[code] * av */
static inline __m512 q4_values16(const uint8_t *p, __m512 tbl, __m512 av) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    /* lanes 0-7: the 8 bytes twice over, as (high, low) pairs */
    const __m512i pairs = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), v);
    const __m512i shift = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(pairs, shift), _mm512_set1_epi32(15));
    return _mm512_mul_ps(_mm512_permutexvar_ps(idx, tbl), av);
}
#endif

/* rows r0..r1 of matrix e of m, as float32 values, into out [(r1 - r0), K]: int8 q * scale;
 * 4-bit (lut[code] / 127) * absmax; the same float32 operations as quant.dequantize, so the
 * same values. For prefill, which multiplies many rows by each weight. */
static void dequantize_row(const Mat *m, long e, long n, long K, long i, float *o) {
    if (m->kind == W_I8) {
        const int8_t *w = (const int8_t *)m->w + (e * n + i) * K;
        const float s = m->s[e * n + i];
        for (long k = 0; k < K; k++) o[k] = (float)w[k] * s;
        return;
    }
    const uint8_t *p = (const uint8_t *)m->w + (e * n + i) * (K / 2);
    const float *a = m->s + (e * n + i) * (K / 64);
    float code[16];
    for (int c = 0; c < 16; c++) code[c] = (float)m->lut[c] / 127.f;
#if defined(__AVX512F__)
    const __m512 tbl = _mm512_loadu_ps(code);
    for (long b = 0; b < K / 64; b++) {
        const __m512 av = _mm512_set1_ps(a[b]);
        for (int j = 0; j < 32; j += 8) _mm512_storeu_ps(o + 64 * b + 2 * j, q4_values16(p + 32 * b + j, tbl, av));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 lo8 = _mm256_loadu_ps(code), hi8 = _mm256_loadu_ps(code + 8);
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), shift = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    for (long b = 0; b < K / 64; b++) {
        const __m256 av = _mm256_set1_ps(a[b]);
        for (int j = 0; j < 32; j += 4) { /* 4 bytes: 8 codes, high nibble first */
            int32_t bytes;
            memcpy(&bytes, p + 32 * b + j, 4);
            const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(bytes));
            const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(v, dup), shift),
                                                 _mm256_set1_epi32(15));
            const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)); /* sign bit: code >= 8 */
            const __m256 val = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, idx), _mm256_permutevar8x32_ps(hi8, idx), high);
            _mm256_storeu_ps(o + 64 * b + 2 * j, _mm256_mul_ps(val, av));
        }
    }
#else
    for (long b = 0; b < K / 64; b++)
        for (int j = 0; j < 32; j++) {
            const uint8_t v = p[32 * b + j];
            o[64 * b + 2 * j] = code[v >> 4] * a[b];
            o[64 * b + 2 * j + 1] = code[v & 15] * a[b];
        }
#endif
}

void phimoe_dequantize(const Mat *m, long e, long n, long K, long r0, long r1, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = r0; i < r1; i++) dequantize_row(m, e, n, K, i, out + (i - r0) * K);
}

/* the same values rounded to bfloat16 (to nearest even, as torch rounds), into out
 * [(r1 - r0), K]: for the prompt's pass where the CPU multiplies bfloat16 natively, so the
 * weights are widened straight into the GEMM's dtype, a row at a time through the cache */
void phimoe_dequantize_bf16(const Mat *m, long e, long n, long K, long r0, long r1, bf16 *out, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *row = (float *)malloc(4 * K + 64);
#pragma omp for schedule(static)
        for (long i = r0; i < r1; i++) {
            bf16 *o = out + (i - r0) * K;
            dequantize_row(m, e, n, K, i, row);
            long k = 0;
#if defined(__AVX512F__)
            for (; k + 16 <= K; k += 16) { /* f2bf, 16 at a time */
                const __m512i v = _mm512_castps_si512(_mm512_loadu_ps(row + k));
                const __m512i r = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 16), _mm512_set1_epi32(1)),
                                                   _mm512_set1_epi32(0x7FFF));
                _mm256_storeu_si256((__m256i *)(o + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(v, r), 16)));
            }
#endif
            for (; k < K; k++) o[k] = f2bf(row[k]);
        }
        free(row);
    }
}

/* --------------------------------------------------------------- the prompt's pass: many rows
 * Y [M, n] = bf16(X [M, K] W^T + b) for quantized W: X's rows quantized to int16 per 64 as the
 * decode step quantizes one, each weight row widened to int16 once and multiplied against four
 * rows of X at a time, in integers per 64-block; so a weight is unpacked once per pass, not once
 * per token, and never widened to float. The widened rows go PANEL at a time (256 KiB at K 4096),
 * each four rows of X meeting the whole panel while they stay in L1: one row at a time against
 * all of X, X came from L2 for every row (1.2-1.9x slower, benchmarks/README.md).
 * Two layouts of the widened rows: with AVX2 or AVX-512 and K a multiple of 64, the row-lane one
 * (lane_rows: each int32 lane one weight row's sum); elsewhere, and for the last n % IV rows, each
 * row's values in order (dotr: each lane a slice of one row's sum, summed across at the end). */
enum { PANEL = 32 };

/* a thread's widened rows and the panel's 4-bit block scales */
static long panel_bytes(long K) { return PANEL * 2 * round64(K) + 4 * PANEL * round64(K / QB + 1) + 128; }

long phimoe_qmatmul_scratch(long M, long K, int threads) {
    const long nb = (K + QB - 1) / QB, M4 = (M + 3) / 4 * 4;
    return M4 * (2 * round64(K) + 4 * round64(nb)) + threads * panel_bytes(K) + 256;
}

/* weight row i of matrix e as int16 values in order (4-bit: the codes, lut[code]) */
static void widen_row(const Mat *m, long e, long n, long K, long i, int16_t *w) {
    /* the stored rows are read once, as a stream: prefetched as the decode step reads them (without,
     * widening waited on memory: 0.97 -> 0.60 ms for one prompt row of a 6400x4096 nf4 expert) */
    if (m->kind == W_I8) {
        const int8_t *r = (const int8_t *)m->w + (e * n + i) * K;
        for (long k0 = 0; k0 < K; k0 += 64) {
            PREFETCH_LINE(r + k0);
            const long k1 = k0 + 64 < K ? k0 + 64 : K;
            for (long k = k0; k < k1; k++) w[k] = r[k];
        }
        return;
    }
    const uint8_t *p = (const uint8_t *)m->w + (e * n + i) * (K / 2);
    long b = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)m->lut)), low = _mm256_set1_epi8(15);
    for (; b < K / 64; b++) {
        if (b % 2 == 0) PREFETCH_LINE(p + 32 * b);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * b));
        const __m256i hi = _mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
        const __m256i lo = _mm256_shuffle_epi8(tbl, _mm256_and_si256(v, low));
        /* per 128-bit lane: (high, low) pairs of bytes 0-7 and of bytes 8-15: values in order */
        const __m256i e0 = _mm256_unpacklo_epi8(hi, lo), e1 = _mm256_unpackhi_epi8(hi, lo);
        const __m256i n0 = _mm256_permute2x128_si256(e0, e1, 0x20), n1 = _mm256_permute2x128_si256(e0, e1, 0x31);
        int16_t *o = w + 64 * b;
        _mm256_storeu_si256((__m256i *)o, _mm256_cvtepi8_epi16(_mm256_castsi256_si128(n0)));
        _mm256_storeu_si256((__m256i *)(o + 16), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(n0, 1)));
        _mm256_storeu_si256((__m256i *)(o + 32), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(n1)));
        _mm256_storeu_si256((__m256i *)(o + 48), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(n1, 1)));
    }
#endif
    for (; b < K / 64; b++)
        for (int j = 0; j < 32; j++) {
            w[64 * b + 2 * j] = m->lut[p[32 * b + j] >> 4];
            w[64 * b + 2 * j + 1] = m->lut[p[32 * b + j] & 15];
        }
}

/* out[t] = sum over 64-blocks of c_b * d_t,b * (w . q_t over the block), for the R (1-4) rows
 * q_0..q_R-1 of X (stride ldq values, scales D rows of stride ldd); c: the weight's block scales
 * (4-bit: absmax / 127), or NULL for 1. R is a constant where it is inlined (dot_group), so a last
 * group of 1-3 prompt rows costs what it computes: rounding up to 4 did a fifth more work at the
 * real dimensions, where an expert sees 2-16 rows of a 64-token prompt */
static inline __attribute__((always_inline)) void dotr(const int16_t *w, long K, const int16_t *q, long ldq,
                                                       const float *D, long ldd, const float *c, const int R, float *out) {
    long k = 0;
    float t[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX512BW__)
    __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + QB <= K; k += QB) {
        const __m512i w0 = _mm512_loadu_si512(w + k), w1 = _mm512_loadu_si512(w + k + 32);
        const __m512 cb = _mm512_set1_ps(c ? c[k / QB] : 1.f);
        for (int j = 0; j < R; j++) {
            const int16_t *qj = q + j * ldq + k;
#if defined(__AVX512VNNI__)
            const __m512i acc = _mm512_dpwssd_epi32(_mm512_madd_epi16(w0, _mm512_loadu_si512(qj)), w1, _mm512_loadu_si512(qj + 32));
#else
            const __m512i acc = _mm512_add_epi32(_mm512_madd_epi16(w0, _mm512_loadu_si512(qj)), _mm512_madd_epi16(w1, _mm512_loadu_si512(qj + 32)));
#endif
            f[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), cb), _mm512_set1_ps(D[j * ldd + k / QB]), f[j]);
        }
    }
    for (int j = 0; j < R; j++) t[j] = _mm512_reduce_add_ps(f[j]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + QB <= K; k += QB) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + k)), w1 = _mm256_loadu_si256((const __m256i *)(w + k + 16));
        const __m256i w2 = _mm256_loadu_si256((const __m256i *)(w + k + 32)), w3 = _mm256_loadu_si256((const __m256i *)(w + k + 48));
        const __m256 cb = _mm256_set1_ps(c ? c[k / QB] : 1.f);
        for (int j = 0; j < R; j++) {
            const __m256i *qj = (const __m256i *)(q + j * ldq + k);
            const __m256i acc = _mm256_add_epi32(
                _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(qj)), _mm256_madd_epi16(w1, _mm256_loadu_si256(qj + 1))),
                _mm256_add_epi32(_mm256_madd_epi16(w2, _mm256_loadu_si256(qj + 2)), _mm256_madd_epi16(w3, _mm256_loadu_si256(qj + 3))));
            f[j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), cb), _mm256_broadcast_ss(D + j * ldd + k / QB), f[j]);
        }
    }
    for (int j = 0; j < R; j++) t[j] = hsum256(f[j]);
#endif
    for (; k < K; k += QB) { /* plain C, and the last partial block */
        const long len = K - k < QB ? K - k : QB;
        const float cb = c ? c[k / QB] : 1.f;
        for (int j = 0; j < R; j++) {
            int32_t s = 0;
            for (long i = 0; i < len; i++) s += (int32_t)w[k + i] * q[j * ldq + k + i];
            t[j] += (float)s * cb * D[j * ldd + k / QB];
        }
    }
    for (int j = 0; j < R; j++) out[j] = t[j];
}

static void dot_group(const int16_t *w, long K, const int16_t *q, long ldq, const float *D, long ldd, const float *c,
                     int R, float *out) {
    switch (R) {
    case 1: dotr(w, K, q, ldq, D, ldd, c, 1, out); break;
    case 2: dotr(w, K, q, ldq, D, ldd, c, 2, out); break;
    case 3: dotr(w, K, q, ldq, D, ldd, c, 3, out); break;
    default: dotr(w, K, q, ldq, D, ldd, c, 4, out);
    }
}

/* ------------------------------------------ the prompt's pass, row-lane layout (IV rows a vector)
 * A tile of IV weight rows is widened to int16 pair by pair: w[j * IV + r] (as int32) holds row
 * r's values 2j, 2j + 1, and each prompt row's pair is broadcast to every lane, so one multiply-add
 * of pairs (vpmaddwd; AVX512-VNNI: vpdpwssd) adds to IV rows' sums at once. The per-block scaling
 * (the int32 sums to float, times the block scales, added) is then done once per IV rows, not once
 * per row as dotr does it: in dotr it was a third of the instructions. Widening into this layout
 * transposes 8 rows at a time in registers. 6400x4096 nf4, GMAC/s, with WSTEP below
 * (benchmarks/README.md, Zen 5): AVX-512 VNNI 8 rows 172 -> 254, 16 rows 198 -> 324; AVX2 129 ->
 * 146, 143 -> 167. */
#if defined(__AVX512BW__)
#define IV 16
typedef __m512i ivec;
typedef __m512 fvec;
#define ILOAD(p) _mm512_loadu_si512((const void *)(p))
#define IZERO() _mm512_setzero_si512()
#if defined(__AVX512VNNI__)
#define IDOT(a, w, x) _mm512_dpwssd_epi32(a, w, x)
#else
#define IDOT(a, w, x) _mm512_add_epi32(a, _mm512_madd_epi16(w, x))
#endif
#define IBCAST(v) _mm512_set1_epi32(v)
#define I2F(a) _mm512_cvtepi32_ps(a)
#define FZERO() _mm512_setzero_ps()
#define FSET1(f) _mm512_set1_ps(f)
#define FLOADU(p) _mm512_loadu_ps(p)
#define FMUL(a, b) _mm512_mul_ps(a, b)
#define FFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FSTOREU(p, v) _mm512_storeu_ps(p, v)
#define TILES 2
#elif defined(__AVX2__) && defined(__FMA__)
#define IV 8
typedef __m256i ivec;
typedef __m256 fvec;
#define ILOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define IZERO() _mm256_setzero_si256()
#define IDOT(a, w, x) _mm256_add_epi32(a, _mm256_madd_epi16(w, x))
#define IBCAST(v) _mm256_set1_epi32(v)
#define I2F(a) _mm256_cvtepi32_ps(a)
#define FZERO() _mm256_setzero_ps()
#define FSET1(f) _mm256_set1_ps(f)
#define FLOADU(p) _mm256_loadu_ps(p)
#define FMUL(a, b) _mm256_mul_ps(a, b)
#define FFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define FSTOREU(p, v) _mm256_storeu_ps(p, v)
#define TILES 1
#endif

#ifdef IV
/* the first 4 prompt rows are multiplied as the tiles are widened, WSTEP blocks at a time, so that the
 * widening (memory, shuffles) and the products (multiplies) overlap in the out-of-order window:
 * widening a whole panel first, then multiplying, took 10-28% longer at 3-8 rows (Zen 5; 1 block at a
 * time: half the gain) */
#define WSTEP 4
static inline int32_t pair_at(const int16_t *q) { int32_t v; memcpy(&v, q, 4); return v; }

/* The 4-bit codes of a tile, for the row-lane layout. A block's 32 bytes (byte j: the values 2j,
 * 2j + 1) of 8 rows are transposed in three rounds of byte, word and dword interleaves (per 128-bit
 * lane: bytes 0-15, then 16-31), which leaves the 8 rows' byte j side by side: v[g] holds bytes 2g,
 * 2g + 1 (lane 0) and 16 + 2g, 17 + 2g (lane 1), each as 8 bytes of rows 0-7 */
static inline __attribute__((always_inline)) void transpose8(const uint8_t *p, long rb_, long b, __m256i v[8]) {
    __m256i r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(p + i * rb_ + 32 * b));
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi8(r[2 * i], r[2 * i + 1]);     /* bytes 0-7 of rows 2i, 2i + 1 */
        t[2 * i + 1] = _mm256_unpackhi_epi8(r[2 * i], r[2 * i + 1]); /* bytes 8-15 */
    }
    for (int h = 0; h < 2; h++) { /* rows 0-3 (h 0), rows 4-7 (h 1) */
        u[4 * h] = _mm256_unpacklo_epi16(t[4 * h], t[4 * h + 2]);         /* bytes 0-3 */
        u[4 * h + 1] = _mm256_unpackhi_epi16(t[4 * h], t[4 * h + 2]);     /* 4-7 */
        u[4 * h + 2] = _mm256_unpacklo_epi16(t[4 * h + 1], t[4 * h + 3]); /* 8-11 */
        u[4 * h + 3] = _mm256_unpackhi_epi16(t[4 * h + 1], t[4 * h + 3]); /* 12-15 */
    }
    for (int i = 0; i < 4; i++) {
        v[2 * i] = _mm256_unpacklo_epi32(u[i], u[4 + i]);     /* bytes 4i, 4i + 1 of the 8 rows */
        v[2 * i + 1] = _mm256_unpackhi_epi32(u[i], u[4 + i]); /* 4i + 2, 4i + 3 */
    }
}

/* cs[b * IV + r] = a[r * nb + b]: a tile's block scales, per block its IV rows side by side; in
 * 8x8 transposes (a gather per block, or element by element, took a fifth to a quarter of the
 * widening's perf samples) */
static void tile_scales(const float *a, long nb, float *cs) {
    long b0 = 0;
    for (; b0 + 8 <= nb; b0 += 8)
        for (int h = 0; h < IV; h += 8) {
            __m256 r[8], t[8], u[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(a + (h + i) * nb + b0);
            for (int i = 0; i < 4; i++) {
                t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            for (int i = 0; i < 2; i++) {
                u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
                u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
                u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
                u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
            for (int j = 0; j < 4; j++) {
                _mm256_storeu_ps(cs + (b0 + j) * IV + h, _mm256_permute2f128_ps(u[j], u[4 + j], 0x20));
                _mm256_storeu_ps(cs + (b0 + 4 + j) * IV + h, _mm256_permute2f128_ps(u[j], u[4 + j], 0x31));
            }
        }
    for (; b0 < nb; b0++)
        for (int r = 0; r < IV; r++) cs[b0 * IV + r] = a[r * nb + b0];
}

/* The tile's rows are short (2 KiB at K 4096) and read side by side, which the hardware prefetcher
 * does not follow: while block b is widened, the next tile's codes (contiguous) are fetched in order,
 * 1 / nb of them, and its scales; without, widening waited on memory (0.96 -> 0.67 ms for 2 rows
 * of a 6400x4096 nf4 expert, AVX-512) */
static inline __attribute__((always_inline)) void prefetch_next_tile(const void *p, const float *a, long rb_, long nb, long b,
                                                                      const int bb) {
    if (!PREFETCH) return;
    /* TILES tiles are widened side by side: the next are TILES on */
    const char *next = (const char *)p + TILES * IV * rb_ + bb * IV * b; /* a block is bb bytes of each of IV rows */
    for (int o = 0; o < bb * IV; o += 64) __builtin_prefetch(next + o, 0, 3);
    if (a && b % 16 == 0)
        for (int r = 0; r < IV; r++) __builtin_prefetch(a + (TILES * IV + r) * nb + b, 0, 3);
}

/* 4-bit rows i0..i0 + IV of matrix e widened into the row-lane layout (w[j * IV + r]: row r's pair
 * j as int32), and the tile's block scales (cs[b * IV + r]: row r's absmax of block b). Each code
 * becomes its value by a table lookup of its nibble, int8, then int16 */
static __attribute__((noinline)) void widen_q4_tile(const Mat *m, long e, long n, long K, long i0, int16_t *w, float *cs,
                                                    long b0, long b1) {
    const long rb_ = K / 2, nb = K / QB;
    const uint8_t *p = (const uint8_t *)m->w + (e * n + i0) * rb_;
    const float *a = m->s + (e * n + i0) * nb;
    if (b0 == 0) tile_scales(a, nb, cs);
#if IV == 16
    const __m512i tbl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)m->lut)), low = _mm512_set1_epi8(15);
#else
    const __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)m->lut)), low = _mm256_set1_epi8(15);
#endif
    for (long b = b0; b < b1; b++) {
        prefetch_next_tile(p, a, rb_, nb, b, 32);
#if IV == 16
        __m256i v0[8], v1[8];
        transpose8(p, rb_, b, v0);
        transpose8(p + 8 * rb_, rb_, b, v1);
        for (int g = 0; g < 8; g++) {
            /* lanes: bytes (2g, 2g + 1) of rows 0-7, (16 + 2g, 17 + 2g) of rows 0-7, then of rows 8-15 */
            const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(v0[g]), v1[g], 1);
            const __m512i hi = _mm512_shuffle_epi8(tbl, _mm512_and_si512(_mm512_srli_epi16(z, 4), low));
            const __m512i lo = _mm512_shuffle_epi8(tbl, _mm512_and_si512(z, low));
            /* byte 2g of rows 0-7, 16 + 2g of rows 0-7, 2g of rows 8-15, 16 + 2g of 8-15, as value pairs;
             * then the lanes reordered so that each half holds one byte's 16 rows */
            const __m512i e0 = _mm512_shuffle_i64x2(_mm512_unpacklo_epi8(hi, lo), _mm512_unpacklo_epi8(hi, lo), 0xD8);
            const __m512i e1 = _mm512_shuffle_i64x2(_mm512_unpackhi_epi8(hi, lo), _mm512_unpackhi_epi8(hi, lo), 0xD8);
            int16_t *ob = w + (32 * b + 2 * g) * 2 * IV;
            _mm512_storeu_si512((void *)ob, _mm512_cvtepi8_epi16(_mm512_castsi512_si256(e0)));
            _mm512_storeu_si512((void *)(ob + 2 * IV), _mm512_cvtepi8_epi16(_mm512_castsi512_si256(e1)));
            _mm512_storeu_si512((void *)(ob + 32 * IV), _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(e0, 1)));
            _mm512_storeu_si512((void *)(ob + 34 * IV), _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(e1, 1)));
        }
#else
        __m256i v[8];
        transpose8(p, rb_, b, v);
        for (int g = 0; g < 8; g++) {
            const __m256i hi = _mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16(v[g], 4), low));
            const __m256i lo = _mm256_shuffle_epi8(tbl, _mm256_and_si256(v[g], low));
            const __m256i e0 = _mm256_unpacklo_epi8(hi, lo), e1 = _mm256_unpackhi_epi8(hi, lo);
            int16_t *ob = w + (32 * b + 2 * g) * 2 * IV;
            _mm256_storeu_si256((__m256i *)ob, _mm256_cvtepi8_epi16(_mm256_castsi256_si128(e0)));
            _mm256_storeu_si256((__m256i *)(ob + 2 * IV), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(e1)));
            _mm256_storeu_si256((__m256i *)(ob + 32 * IV), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(e0, 1)));
            _mm256_storeu_si256((__m256i *)(ob + 34 * IV), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(e1, 1)));
        }
#endif
    }
}

/* 32 bytes at p + off of each of 8 int8 rows (K apart), as 16 pairs of values each, transposed:
 * v[j] holds pair j (lane 0) and pair 8 + j (lane 1) of rows 0-7, 16 bytes each */
static inline __attribute__((always_inline)) void transpose_pairs8(const int8_t *p, long K, long off, __m256i v[8]) {
    __m256i r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(p + i * K + off));
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi16(r[2 * i], r[2 * i + 1]);     /* pairs 0-3 of rows 2i, 2i + 1 */
        t[2 * i + 1] = _mm256_unpackhi_epi16(r[2 * i], r[2 * i + 1]); /* 4-7 */
    }
    for (int h = 0; h < 2; h++) { /* rows 0-3 (h 0), rows 4-7 (h 1) */
        u[4 * h] = _mm256_unpacklo_epi32(t[4 * h], t[4 * h + 2]);         /* pairs 0, 1 */
        u[4 * h + 1] = _mm256_unpackhi_epi32(t[4 * h], t[4 * h + 2]);     /* 2, 3 */
        u[4 * h + 2] = _mm256_unpacklo_epi32(t[4 * h + 1], t[4 * h + 3]); /* 4, 5 */
        u[4 * h + 3] = _mm256_unpackhi_epi32(t[4 * h + 1], t[4 * h + 3]); /* 6, 7 */
    }
    for (int i = 0; i < 4; i++) {
        v[2 * i] = _mm256_unpacklo_epi64(u[i], u[4 + i]);     /* pair 2i */
        v[2 * i + 1] = _mm256_unpackhi_epi64(u[i], u[4 + i]); /* pair 2i + 1 */
    }
}

/* int8 rows i0..i0 + IV of matrix e widened into the row-lane layout */
static __attribute__((noinline)) void widen_i8_tile(const Mat *m, long e, long n, long K, long i0, int16_t *w, long b0, long b1) {
    const int8_t *p = (const int8_t *)m->w + (e * n + i0) * K;
    for (long b = b0; b < b1; b++) {
        prefetch_next_tile(p, NULL, K, K / QB, b, 64);
        for (int c = 0; c < 2; c++) { /* pairs 32b + 16c + (0-15) */
            int16_t *ob = w + (32 * b + 16 * c) * 2 * IV;
#if IV == 16
            __m256i v0[8], v1[8];
            transpose_pairs8(p, K, 64 * b + 32 * c, v0);
            transpose_pairs8(p + 8 * K, K, 64 * b + 32 * c, v1);
            for (int j = 0; j < 8; j++) {
                _mm512_storeu_si512((void *)(ob + j * 2 * IV), _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(v0[j], v1[j], 0x20)));
                _mm512_storeu_si512((void *)(ob + (8 + j) * 2 * IV), _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(v0[j], v1[j], 0x31)));
            }
#else
            __m256i v[8];
            transpose_pairs8(p, K, 64 * b + 32 * c, v);
            for (int j = 0; j < 8; j++) {
                _mm256_storeu_si256((__m256i *)(ob + j * 2 * IV), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v[j])));
                _mm256_storeu_si256((__m256i *)(ob + (8 + j) * 2 * IV), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v[j], 1)));
            }
#endif
        }
    }
}

/* f[t][j] += the sums of T tiles (IV rows each, TS int16 apart) by R prompt rows, K % 64 == 0;
 * cs: per tile and block the IV rows' block scales (4-bit), or NULL */
static inline __attribute__((always_inline)) void lane_dot(const int16_t *w, long TS, const int T, long K, const int16_t *q,
                                                           long ldq, const float *D, long ldd, const float *cs, const int R,
                                                           long b0, long b1, fvec f[TILES][4]) {
    const long nb = K / QB;
    for (long b = b0; b < b1; b++) {
        ivec a[TILES][4];
        for (int t = 0; t < T; t++)
            for (int j = 0; j < R; j++) a[t][j] = IZERO();
        const int16_t *wb = w + b * QB * IV;
#pragma GCC unroll 8
        for (int p = 0; p < QB / 2; p++) {
            ivec wv[TILES];
            for (int t = 0; t < T; t++) wv[t] = ILOAD(wb + t * TS + p * 2 * IV);
            for (int j = 0; j < R; j++) {
                const ivec x = IBCAST(pair_at(q + j * ldq + b * QB + 2 * p));
                for (int t = 0; t < T; t++) a[t][j] = IDOT(a[t][j], wv[t], x);
            }
        }
        for (int t = 0; t < T; t++) {
            const fvec c = cs ? FLOADU(cs + (t * nb + b) * IV) : FSET1(1.f);
            for (int j = 0; j < R; j++) f[t][j] = FFMA(I2F(a[t][j]), cs ? FMUL(c, FSET1(D[j * ldd + b])) : FSET1(D[j * ldd + b]), f[t][j]);
        }
    }
}

#define LANE_CASE(T, R) lane_dot(w, TS, T, K, q, ldq, D, ldd, cs, R, b0, b1, f)
static void lane_group(const int16_t *w, long TS, int T, long K, const int16_t *q, long ldq, const float *D, long ldd,
                       const float *cs, int R, long b0, long b1, fvec f[TILES][4]) {
#if TILES == 2
    if (T == 2) {
        switch (R) {
        case 1: LANE_CASE(2, 1); return;
        case 2: LANE_CASE(2, 2); return;
        case 3: LANE_CASE(2, 3); return;
        default: LANE_CASE(2, 4); return;
        }
    }
#endif
    switch (R) {
    case 1: LANE_CASE(1, 1); return;
    case 2: LANE_CASE(1, 2); return;
    case 3: LANE_CASE(1, 3); return;
    default: LANE_CASE(1, 4); return;
    }
}
/* Y's columns r0..r1 (multiples of IV) from the quantized rows of X (Q, D), in the row-lane layout;
 * w: the thread's panel (PANEL rows and their block scales), widened while the first group of prompt
 * rows is multiplied (WSTEP), then read by the other groups */
static void lane_rows(const Mat *m, long e, long n, long K, const int16_t *Q, long ldq, const float *D, long ldd, long M,
                      const bf16 *b, bf16 *Y, long r0, long r1, int16_t *w) {
    const long nb = K / QB;
    float *cs = (float *)(w + PANEL * ldq), scale[PANEL], bias[PANEL];
    for (long i0 = r0; i0 < r1; i0 += PANEL) {
        const long rows = r1 - i0 < PANEL ? r1 - i0 : PANEL, nt = rows / IV;
        for (long r = 0; r < rows; r++) {
            scale[r] = m->kind == W_I8 ? rb(m->s[e * n + i0 + r]) : 1.f / 127.f; /* as for dotr, below */
            bias[r] = b ? bf2f(b[i0 + r]) : 0.f;
        }
        for (long t = 0; t < M; t += 4) {
            const int R = M - t < 4 ? (int)(M - t) : 4;
            for (long tl = 0; tl < nt; tl += TILES) {
                const int T = nt - tl < TILES ? (int)(nt - tl) : TILES;
                const float *ct = m->kind == W_Q4 ? cs + tl * nb * IV : NULL;
                fvec f[TILES][4];
                for (int u = 0; u < TILES; u++)
                    for (int j = 0; j < 4; j++) f[u][j] = FZERO();
                if (t == 0) /* the first prompt rows, block by block as the tiles are widened */
                    for (long b0 = 0; b0 < nb; b0 += WSTEP) {
                        const long b1 = b0 + WSTEP < nb ? b0 + WSTEP : nb;
                        for (int u = 0; u < T; u++) {
                            int16_t *wt = w + (tl + u) * IV * K;
                            if (m->kind == W_Q4) widen_q4_tile(m, e, n, K, i0 + (tl + u) * IV, wt, cs + (tl + u) * nb * IV, b0, b1);
                            else widen_i8_tile(m, e, n, K, i0 + (tl + u) * IV, wt, b0, b1);
                        }
                        lane_group(w + tl * IV * K, IV * K, T, K, Q, ldq, D, ldd, ct, R, b0, b1, f);
                    }
                else
                    lane_group(w + tl * IV * K, IV * K, T, K, Q + t * ldq, ldq, D + t * ldd, ldd, ct, R, 0, nb, f);
                for (int u = 0; u < T; u++)
                    for (int j = 0; j < R; j++) {
                        float o[IV];
                        FSTOREU(o, f[u][j]);
                        const long rr = (tl + u) * IV;
                        for (int r = 0; r < IV; r++) Y[(t + j) * n + i0 + rr + r] = f2bf(o[r] * scale[rr + r] + bias[rr + r]);
                    }
            }
        }
    }
}
#endif

void phimoe_qmatmul(const Mat *m, long e, long n, long K, const bf16 *X, long M, const bf16 *b, bf16 *Y,
                    void *scratch, int threads) {
    const long nb = (K + QB - 1) / QB, ldq = round64(K), ldd = round64(nb);
    const long M4 = (M + 3) / 4 * 4; /* rows of X beyond M: zeros, computed and dropped */
    char *p = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    int16_t *Q = (int16_t *)p;
    p += 2 * M4 * ldq;
    float *D = (float *)p;
    p += 4 * M4 * ldd;
#pragma omp parallel num_threads(threads)
    {
        int16_t *w = (int16_t *)(p + omp_get_thread_num() * panel_bytes(K));
#pragma omp for schedule(static)
        for (long t = 0; t < M4; t++) {
            QX qx = {.q = Q + t * ldq, .qp = NULL, .d = D + t * ldd, .dc = NULL, .qb = NULL, .K = K};
            if (t < M) {
                quantize_x(X + t * K, &qx);
            } else {
                memset(qx.q, 0, 2 * K);
                memset(qx.d, 0, 4 * nb);
            }
        }
        long r0 = 0, r1 = 0;
        float out[4], scale[PANEL], bias[PANEL];
#ifdef IV
        if (K % QB == 0) {
            const long tiles = n / IV;
            share_units(tiles, 1, &r0, &r1);
            lane_rows(m, e, n, K, Q, ldq, D, ldd, M, b, Y, r0 * IV, r1 * IV, w);
            /* the last n % IV rows, row by row below, on the last thread */
            if (omp_get_thread_num() == omp_get_num_threads() - 1) r0 = tiles * IV, r1 = n;
            else r0 = r1 = 0;
        } else
#endif
        share(n, &r0, &r1);
        for (long i0 = r0; i0 < r1; i0 += PANEL) {
            const long rows = r1 - i0 < PANEL ? r1 - i0 : PANEL;
            for (long r = 0; r < rows; r++) {
                const long i = i0 + r;
                widen_row(m, e, n, K, i, w + r * ldq);
                /* int8: the row's scale, rounded to bfloat16 as in the decode step; 4-bit: the codes'
                 * 1 / 127 (the absmax of each block goes to dotr) */
                scale[r] = m->kind == W_I8 ? rb(m->s[e * n + i]) : 1.f / 127.f;
                bias[r] = b ? bf2f(b[i]) : 0.f;
            }
            for (long t = 0; t < M; t += 4)
                for (long r = 0; r < rows; r++) {
                    const long i = i0 + r;
                    const float *ci = m->kind == W_Q4 ? m->s + (e * n + i) * (K / 64) : NULL;
                    const int R = M - t < 4 ? (int)(M - t) : 4;
                    dot_group(w + r * ldq, K, Q + t * ldq, ldq, D + t * ldd, ldd, ci, R, out);
                    for (int j = 0; j < R; j++) Y[(t + j) * n + i] = f2bf(out[j] * scale[r] + bias[r]);
                }
        }
    }
}

/* Y [M, n] = X [M, K] W^T + b for bfloat16 W [n, K] and X, in float32 (rounded by the caller):
 * the prompt's pass on CPUs without bfloat16 dot products (AVX2). Each 16 weights are read once
 * per pair of prompt rows and widened in registers, in-lane: the even ones by a shift, the odd
 * ones by a mask, which needs the prompt rows split the same way (XS: per 16 values the 8 even,
 * then the 8 odd, in float32, made once per product). Tiles of 4 weight rows by 3 prompt rows:
 * 12 sums, 24 FMAs per 16 weights. Widening whole blocks of W to float32 for the float32 GEMM
 * instead (kernels.upcast_linear) wrote and re-read every weight twice: 21 GFLOP/s at `mid`.
 * Returns 0 (nothing done) where it cannot run: no AVX2 build, or K not a multiple of 16. */
#if defined(__AVX2__) && defined(__FMA__)
static inline void tile_bf16(const bf16 *W, long K, const float *XS, long ldx, int nr, int mr, const bf16 *next,
                             float out[4][3]) {
    const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 a[4][3];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 3; c++) a[r][c] = _mm256_setzero_ps();
    for (long k = 0; k < K; k += 16) {
        if (next && k % 32 == 0) /* the next 4 rows, a line of each per 32 weights (see below) */
            for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(next + r * K + k), _MM_HINT_T0);
        for (int r = 0; r < 4; r++) {
            if (r >= nr) break;
            const __m256i v = _mm256_loadu_si256((const __m256i *)(W + r * K + k));
            const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
            for (int c = 0; c < 3; c++) {
                if (c >= mr) break;
                a[r][c] = _mm256_fmadd_ps(we, _mm256_loadu_ps(XS + c * ldx + k), a[r][c]);
                a[r][c] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(XS + c * ldx + k + 8), a[r][c]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < mr; c++) out[r][c] = hsum256(a[r][c]);
}
#endif

/* Y [M, n] = bf16(X [M, K] W^T + b) for bfloat16 W [n, K] and X, on CPUs with bfloat16 dot
 * products (AVX512-BF16 without AMX: AMD Zen 4 and later): the prompt's pass on few rows per
 * matrix, where an expert sees ~8 of a short prompt's tokens and oneDNN's GEMM (torch's bfloat16
 * F.linear) reads the weights at about two thirds of the memory's speed. vdpbf16ps adds 16 pairs
 * of bfloat16 products (exact in float32) to 16 float32 sums, as oneDNN's kernels do. Tiles of 4
 * weight rows by up to 6 prompt rows: 24 sums in registers, each 32 weights loaded once per tile.
 * Four rows interleaved are four streams, which the hardware prefetcher alone followed at ~75% of
 * one row's speed; so the first tile of each 4 rows also prefetches the next 4 rows, in order (as
 * one stream, a tile ahead): one prompt row then reads at the decode kernel's speed. Returns 0
 * (nothing done) where it cannot run: no AVX512-BF16 build, or K not a multiple of 32. */
#if defined(__AVX512BF16__)
#define BF_NR 4
#define BF_MR 6
static inline __attribute__((always_inline)) void tile_dpbf16(const bf16 *W, long K, const bf16 *X, long ldx, const int NR,
                                                              const int R, const char *next, float out[BF_NR][BF_MR]) {
    __m512 a[BF_NR][BF_MR];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < R; c++) a[r][c] = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 32) {
        __m512bh w[BF_NR];
        if (next) /* NR lines of the next NR rows per 32 weights: all of them by the tile's end */
            for (int r = 0; r < NR; r++) _mm_prefetch(next + (k / 32) * NR * 64 + r * 64, _MM_HINT_T0);
        for (int r = 0; r < NR; r++) w[r] = (__m512bh)_mm512_loadu_si512(W + r * K + k);
        for (int c = 0; c < R; c++) {
            const __m512bh x = (__m512bh)_mm512_loadu_si512(X + c * ldx + k);
            for (int r = 0; r < NR; r++) a[r][c] = _mm512_dpbf16_ps(a[r][c], w[r], x);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < R; c++) out[r][c] = _mm512_reduce_add_ps(a[r][c]);
}
/* the tile for nr <= 4 weight rows by mr <= 6 prompt rows, from copies with constant sizes */
static void tile_dpbf16_any(const bf16 *W, long K, const bf16 *X, long ldx, int nr, int mr, const char *next,
                            float out[BF_NR][BF_MR]) {
#define DPB(R)                                                                                           \
    case R:                                                                                             \
        if (nr < BF_NR)                                                                                 \
            for (int r = 0; r < nr; r++) tile_dpbf16(W + r * K, K, X, ldx, 1, R, NULL, out + r);        \
        else if (next)                                                                                  \
            tile_dpbf16(W, K, X, ldx, BF_NR, R, next, out);                                             \
        else                                                                                            \
            tile_dpbf16(W, K, X, ldx, BF_NR, R, NULL, out);                                             \
        break;
    switch (mr) { DPB(1) DPB(2) DPB(3) DPB(4) DPB(5) DPB(6) }
#undef DPB
}
#endif

int phimoe_dpbf16_matmul(const bf16 *W, const bf16 *b, const bf16 *X, long M, long n, long K, bf16 *Y, int threads) {
#if defined(__AVX512BF16__)
    if (K % 32) return 0;
#pragma omp parallel num_threads(threads)
    {
        long r0, r1;
        share(n, &r0, &r1);
        float out[BF_NR][BF_MR];
        for (long i = r0; i < r1; i += BF_NR) {
            const int nr = r1 - i < BF_NR ? (int)(r1 - i) : BF_NR;
            for (long t = 0; t < M; t += BF_MR) {
                const int mr = M - t < BF_MR ? (int)(M - t) : BF_MR;
                tile_dpbf16_any(W + i * K, K, X + t * K, K, nr, mr, t == 0 ? (const char *)(W + (i + BF_NR) * K) : NULL, out);
                for (int r = 0; r < nr; r++)
                    for (int c = 0; c < mr; c++) Y[(t + c) * n + i + r] = f2bf(out[r][c] + (b ? bf2f(b[i + r]) : 0.f));
            }
        }
    }
    return 1;
#else
    (void)W, (void)b, (void)X, (void)M, (void)n, (void)K, (void)Y, (void)threads;
    return 0;
#endif
}

int phimoe_bf16_matmul(const bf16 *W, const bf16 *b, const bf16 *X, long M, long n, long K, float *XS, float *Y,
                       int threads) {
#if defined(__AVX2__) && defined(__FMA__)
    if (K % 16) return 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long t = 0; t < M; t++) /* XS: X's rows split into even and odd halves per 16 */
            for (long k = 0; k < K; k += 16)
                for (int j = 0; j < 8; j++) {
                    XS[t * K + k + j] = bf2f(X[t * K + k + 2 * j]);
                    XS[t * K + k + 8 + j] = bf2f(X[t * K + k + 2 * j + 1]);
                }
        float out[4][3];
#pragma omp for schedule(static)
        for (long i = 0; i < n; i += 4) {
            const int nr = n - i < 4 ? (int)(n - i) : 4;
            for (long t = 0; t < M; t += 3) {
                const int mr = M - t < 3 ? (int)(M - t) : 3;
                /* the first tile of each 4 rows prefetches the next 4: the four interleaved streams
                 * alone read at ~45% of one row's speed (one prompt row, 6400x4096, Zen 5) */
                const bf16 *next = t == 0 && i + 4 < n ? W + (i + 4) * K : NULL;
                if (nr == 4 && mr == 3 && next) tile_bf16(W + i * K, K, XS + t * K, K, 4, 3, next, out); /* the common cases, specialised */
                else if (nr == 4 && mr == 3) tile_bf16(W + i * K, K, XS + t * K, K, 4, 3, NULL, out);
                else tile_bf16(W + i * K, K, XS + t * K, K, nr, mr, next, out);
                for (int r = 0; r < nr; r++)
                    for (int c = 0; c < mr; c++) Y[(t + c) * n + i + r] = out[r][c] + (b ? bf2f(b[i + r]) : 0.f);
            }
        }
    }
    return 1;
#else
    (void)W, (void)b, (void)X, (void)M, (void)n, (void)K, (void)XS, (void)Y, (void)threads;
    return 0;
#endif
}

/* Y [M, n] = bf16(X [M, K] W^T + b) with AMX (Intel Sapphire Rapids and later): the prompt's
 * pass on few rows per matrix (an expert sees ~8 of a short prompt's tokens). W is bfloat16, int8
 * or 4-bit; quantized rows are widened 16-64 rows by AMX_KC values at a time into L1, as the same
 * bfloat16 values phimoe_dequantize_bf16 gives, and each 16 x 32 piece is an A tile. X is laid out
 * once as B tiles: row r of tile (g, c) holds, for each of prompt rows 16g..16g+15, the pair of
 * values 32c + 2r, 32c + 2r + 1. TDPBF16PS sums the products in float32 tiles [16 weight rows,
 * 16 prompt rows] over the whole of K, so a weight is read from memory once per product and
 * widened once, never written out whole: ~3x the blocked path (dequantize_bf16 + torch's GEMM)
 * at 8 rows of a 6400 x 4096 expert. Up to 64 prompt rows per pass over W. Returns 0 (nothing
 * done) where it cannot run: no AMX build, the kernel refusing the tile state, n % 16, K % 32. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
enum { AMX_KC = 256 };

static int amx_permitted(void) { /* Linux hands out the 8 KiB tile state only on request */
    static int state = 0;        /* 1 granted, -1 refused */
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state > 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* rows i0..i0+rows-1, values k0..k0+kc of matrix e of m, as bfloat16, into a [rows, kc]; the
 * rows' next kc values prefetched */
static void amx_widen(const Mat *m, long e, long n, long K, long i0, int rows, long k0, long kc, bf16 *a) {
    if (m->kind == W_I8) {
        for (int r = 0; r < rows; r++) {
            const int8_t *w = (const int8_t *)m->w + (e * n + i0 + r) * K + k0;
            const __m512 s = _mm512_set1_ps(m->s[e * n + i0 + r]);
            for (long k = 0; k < kc; k += 64) _mm_prefetch((const char *)(w + kc + k), _MM_HINT_T0);
            for (long k = 0; k < kc; k += 32) {
                const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k)))), s);
                const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16)))), s);
                _mm512_storeu_si512(a + r * kc + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
        return;
    }
    float code[16];
    for (int c = 0; c < 16; c++) code[c] = (float)m->lut[c] / 127.f;
    const __m512 tbl = _mm512_loadu_ps(code);
    for (int r = 0; r < rows; r++) {
        const uint8_t *p = (const uint8_t *)m->w + ((e * n + i0 + r) * K + k0) / 2;
        const float *s = m->s + ((e * n + i0 + r) * K + k0) / 64;
        for (long k = 0; k < kc / 2; k += 64) _mm_prefetch((const char *)(p + kc / 2 + k), _MM_HINT_T0);
        for (long k = 0; k < kc; k += 32) { /* 16 bytes: 32 codes, high nibble first */
            const __m512 av = _mm512_set1_ps(s[k / 64]);
            const __m512 v0 = q4_values16(p + k / 2, tbl, av), v1 = q4_values16(p + k / 2 + 8, tbl, av);
            _mm512_storeu_si512(a + r * kc + k, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
        }
    }
}

/* the tile products of one chunk of 32 values: C tiles 0-3 are [R weight groups] x [G prompt
 * groups] of 16 x 16 sums; A tiles (weights) in 4-5, B tiles (the prompt) in 6-7 (tile numbers
 * must be constants, hence one case per shape). a: the 16R weight rows, stride sa bytes; bt: the
 * prompt's first B tile, the next group's gs floats on */
static inline void amx_chunk(int R, int G, const bf16 *a, long sa, const uint32_t *bt, long gs) {
    if (R == 4) {
        _tile_loadd(6, bt, 64);
        _tile_loadd(4, a, sa);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(5, (const char *)a + 16 * sa, sa);
        _tile_dpbf16ps(1, 5, 6);
        _tile_loadd(4, (const char *)a + 32 * sa, sa);
        _tile_dpbf16ps(2, 4, 6);
        _tile_loadd(5, (const char *)a + 48 * sa, sa);
        _tile_dpbf16ps(3, 5, 6);
    } else if (R == 2) {
        _tile_loadd(4, a, sa);
        _tile_loadd(5, (const char *)a + 16 * sa, sa);
        _tile_loadd(6, bt, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (G > 1) {
            _tile_loadd(7, bt + gs, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    } else {
        _tile_loadd(4, a, sa);
        _tile_loadd(6, bt, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (G > 1) {
            _tile_loadd(7, bt + gs, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (G > 2) {
            _tile_loadd(6, bt + 2 * gs, 64);
            _tile_dpbf16ps(2, 4, 6);
        }
        if (G > 3) {
            _tile_loadd(7, bt + 3 * gs, 64);
            _tile_dpbf16ps(3, 4, 7);
        }
    }
}

int phimoe_amx_matmul(const Mat *m, long e, long n, long K, const bf16 *X, long M, const bf16 *b, bf16 *Y, int threads) {
    if (n % 16 || K % 32 || M < 1 || !amx_permitted()) return 0;
    const long groups = (M + 15) / 16, chunks = K / 32;
    /* weight groups per pass: as many as the four C tiles leave, so that each B tile is read from
     * L2 once per 16R weight rows, not once per 16 (~10% at 8 prompt rows); but 1 for bfloat16, whose A
     * tiles load straight from memory, where more rows at a time read 2-4x slower */
    int R = m->kind == W_BF16 ? 1 : groups == 1 ? 4 : groups == 2 ? 2 : 1;
    while (n % (16 * R)) R /= 2;
    const int G = 4 / R < 4 ? 4 / R : 4;
    const size_t abytes = (size_t)16 * R * AMX_KC * 2; /* per thread, <= 32 KiB */
    uint32_t *B = (uint32_t *)aligned_alloc(64, (size_t)groups * chunks * 1024);
    bf16 *abuf = (bf16 *)aligned_alloc(64, abytes * threads);
    if (!B || !abuf) {
        free(B), free(abuf);
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long gc = 0; gc < groups * chunks; gc++) { /* B tiles, group-major */
            const long g = gc / chunks, c = gc % chunks;
            uint32_t *tile = B + gc * 256;
            for (int t = 0; t < 16; t++) {
                const long row = 16 * g + t;
                const uint32_t *x = (const uint32_t *)(X + row * K) + 16 * c;
                for (int r = 0; r < 16; r++) tile[r * 16 + t] = row < M ? x[r] : 0;
            }
        }
        TileConfig cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
        _tile_loadconfig(&cfg);
        bf16 *a = abuf + omp_get_thread_num() * (abytes / 2);
        float out[16 * 16];
#pragma omp for schedule(static)
        for (long i0 = 0; i0 < n; i0 += 16 * R) {
            for (long g0 = 0; g0 < groups; g0 += G) {
                const int ng = groups - g0 < G ? (int)(groups - g0) : G;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (long k0 = 0; k0 < K; k0 += AMX_KC) {
                    const long kc = K - k0 < AMX_KC ? K - k0 : AMX_KC;
                    const bf16 *src = a;
                    long stride = 2 * kc;
                    if (m->kind == W_BF16) src = (const bf16 *)m->w + (e * n + i0) * K + k0, stride = 2 * K;
                    else amx_widen(m, e, n, K, i0, 16 * R, k0, kc, a);
                    const uint32_t *bt = B + (g0 * chunks + k0 / 32) * 256;
                    for (long j = 0; j < kc; j += 32, bt += 256) amx_chunk(R, ng, src + j, stride, bt, chunks * 256);
                }
                for (int wr = 0; wr < R; wr++)
                    for (int pg = 0; pg < ng; pg++) { /* C tile of weight group wr, prompt group pg */
                        switch (R == 4 ? wr : R == 2 ? 2 * wr + pg : pg) {
                        case 0: _tile_stored(0, out, 64); break;
                        case 1: _tile_stored(1, out, 64); break;
                        case 2: _tile_stored(2, out, 64); break;
                        default: _tile_stored(3, out, 64);
                        }
                        const long r0 = i0 + 16 * wr;
                        for (int t = 0; t < 16 && 16 * (g0 + pg) + t < M; t++) {
                            bf16 *y = Y + (16 * (g0 + pg) + t) * n + r0;
                            for (int r = 0; r < 16; r++) y[r] = f2bf(b ? out[r * 16 + t] + bf2f(b[r0 + r]) : out[r * 16 + t]);
                        }
                    }
            }
        }
        _tile_release();
    }
    free(B), free(abuf);
    return 1;
}
#else
int phimoe_amx_matmul(const Mat *m, long e, long n, long K, const bf16 *X, long M, const bf16 *b, bf16 *Y, int threads) {
    (void)m, (void)e, (void)n, (void)K, (void)X, (void)M, (void)b, (void)Y, (void)threads;
    return 0;
}
#endif

/* the quantized form of x [k] as the kernels use it: q [k] (int16) and the block scales d [blocks] */
void phimoe_quantize_x(const bf16 *x, long k, int16_t *q, float *d, void *scratch) {
    QX qx;
    qx_carve(&qx, k, (char *)scratch);
    quantize_x(x, &qx);
    memcpy(q, qx.q, 2 * k);
    memcpy(d, qx.d, 4 * ((k + QB - 1) / QB));
}

/* ------------------------------------------------------------------------- the decoder layer */
typedef struct {
    int hidden, heads, kv_heads, head_dim, ffn, experts, top_k, layers;
    float eps, jitter_eps, mscale;
    long cache_head_stride; /* elements between two kv heads' rows in the cache */
} Dims;

typedef struct {
    const bf16 *ln1_w, *ln1_b, *bq, *bk, *bv, *bo, *ln2_w, *ln2_b, *gate;
    Mat q, k, v, o;          /* the attention projections: bfloat16 or quantized */
    Mat w1, w2, w3;          /* the stacked experts [experts, ffn, hidden] / [experts, hidden, ffn] */
    bf16 *k_cache, *v_cache; /* [kv_heads, rows, head_dim]; row T - 1 is written by the step */
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
    QX qh, qa, qact[64]; /* quantized h (norm output), attention output, expert activations */
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

#ifdef VL
#if defined(__AVX512F__)
/* the sums of 16 vectors, in order, by a transposing add tree (45 instructions, not 16 x ~10) */
static inline __m512 sum_each(const __m512 *a) {
    __m512 b[8], c[4], e[2];
    for (int r = 0; r < 8; r++) /* per 128-bit lane: vectors 2r, 2r+1 */
        b[r] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * r], a[2 * r + 1]), _mm512_unpackhi_ps(a[2 * r], a[2 * r + 1]));
    for (int r = 0; r < 4; r++) /* per lane: vectors 4r .. 4r+3 */
        c[r] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * r], b[2 * r + 1], 0x44), _mm512_shuffle_ps(b[2 * r], b[2 * r + 1], 0xEE));
    for (int r = 0; r < 2; r++)
        e[r] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * r], c[2 * r + 1], 0x88), _mm512_shuffle_f32x4(c[2 * r], c[2 * r + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xDD));
}
#define VSET1(f) _mm512_set1_ps(f)
#define VSTOREF(p, v) _mm512_storeu_ps(p, v)
#define VCHUNK 4 /* values4: output registers per head (16 in all) */
#else
/* the sums of 8 vectors, in order: three rounds of horizontal adds and one swap of halves */
static inline __m256 sum_each(const __m256 *a) {
    const __m256 b0 = _mm256_hadd_ps(a[0], a[1]), b1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 b2 = _mm256_hadd_ps(a[4], a[5]), b3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 c0 = _mm256_hadd_ps(b0, b1), c1 = _mm256_hadd_ps(b2, b3); /* per 128-bit half: vectors 0-3, 4-7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}
#define VSET1(f) _mm256_set1_ps(f)
#define VSTOREF(p, v) _mm256_storeu_ps(p, v)
#define VCHUNK 2 /* values4: output registers per head (8 in all, of AVX2's 16) */
#endif
#define SROWS (VL / 4) /* scores4: cache rows per pass, four heads each: one register of sums */

/* Four query heads q[4][D] that share one kv head: s[h][t] = K[t] . q[h], each cache row widened
 * once for the four (not once per head); t in [t0, t1). D: a multiple of VL. */
static void scores4(const bf16 *K, int D, const float *q, int t0, int t1, float *s, long stride) {
    int t = t0;
    for (; t + SROWS <= t1; t += SROWS) {
        vf a[4 * SROWS];
        for (int j = 0; j < 4 * SROWS; j++) a[j] = VZERO();
        for (int c = 0; c < D; c += VL) {
            const vf q0 = VLOADF(q + c), q1 = VLOADF(q + D + c), q2 = VLOADF(q + 2 * D + c), q3 = VLOADF(q + 3 * D + c);
            for (int r = 0; r < SROWS; r++) {
                const vf kv = WIDEN_BF16(K + (long)(t + r) * D + c);
                a[4 * r] = VFMA(kv, q0, a[4 * r]);
                a[4 * r + 1] = VFMA(kv, q1, a[4 * r + 1]);
                a[4 * r + 2] = VFMA(kv, q2, a[4 * r + 2]);
                a[4 * r + 3] = VFMA(kv, q3, a[4 * r + 3]);
            }
        }
        float out[VL];
        VSTOREF(out, sum_each(a));
        for (int r = 0; r < SROWS; r++)
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
 * D: a multiple of VCHUNK * VL (VCHUNK registers of outputs per head) */
static void values4(const bf16 *V, int D, const float *p, long stride, int t0, int t1, float *acc) {
    for (int i0 = 0; i0 < D; i0 += VCHUNK * VL) {
        vf a[4 * VCHUNK];
        for (int h = 0; h < 4; h++)
            for (int j = 0; j < VCHUNK; j++) a[VCHUNK * h + j] = VLOADF(acc + h * D + i0 + VL * j);
        for (int t = t0; t < t1; t++) {
            const bf16 *v = V + (long)t * D + i0;
            vf row[VCHUNK];
            for (int j = 0; j < VCHUNK; j++) row[j] = WIDEN_BF16(v + VL * j);
            for (int h = 0; h < 4; h++) {
                const vf ph = VSET1(p[h * stride + t]);
                for (int j = 0; j < VCHUNK; j++) a[VCHUNK * h + j] = VFMA(ph, row[j], a[VCHUNK * h + j]);
            }
        }
        for (int h = 0; h < 4; h++)
            for (int j = 0; j < VCHUNK; j++) VSTOREF(acc + h * D + i0 + VL * j, a[VCHUNK * h + j]);
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
#ifdef VL
        const int by4 = group % 4 == 0 && D % 64 == 0; /* Phi-3.5-MoE: 4 query heads per kv head, D 128 */
#else
        const int by4 = 0;
#endif
        if (by4) /* acc holds the queries in float32 until the value sums start */
            for (int i = 0; i < group * D; i++) acc[i] = bf2f(w->qkv[(long)h0 * D + i]);
        for (int t0 = 0; t0 < T; t0 += BLOCK) {
            const int n = T - t0 < BLOCK ? T - t0 : BLOCK;
#ifdef VL
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
#ifdef VL
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

static void layer_step(const Dims *d, const Layer *L, bf16 *x, int T, const bf16 *cos, const bf16 *sin, Work *w) {
    const int H = d->hidden, D = d->head_dim, F = d->ffn, qn = d->heads * D, kn = d->kv_heads * D;
    long r0, r1;
#pragma omp single
    {
        layer_norm(x, L->ln1_w, L->ln1_b, H, d->eps, w->tmp, w->h);
        if (L->q.kind || L->k.kind || L->v.kind) quantize_x(w->h, &w->qh);
    }
    /* q, k, v */
    mat_linear_rows(&L->q, L->bq, w->h, &w->qh, qn, H, w->tmp, w->qkv);
    mat_linear_rows(&L->k, L->bk, w->h, &w->qh, kn, H, w->tmp + qn, w->qkv + qn);
    mat_linear_rows(&L->v, L->bv, w->h, &w->qh, kn, H, w->tmp + qn + kn, w->qkv + qn + kn);
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
    if (L->o.kind) {
#pragma omp single
        quantize_x(w->att, &w->qa);
    }
    /* x += o_proj(attention) */
    share(H, &r0, &r1);
    mat_rows(&L->o, 0, H, qn, w->att, &w->qa, r0, r1, w->tmp);
    for (long i = r0; i < r1; i++)
        x[i] = f2bf(bf2f(x[i]) + rb(L->bo ? w->tmp[i] + bf2f(L->bo[i]) : w->tmp[i]));
#pragma omp barrier
#pragma omp single
    {
        layer_norm(x, L->ln2_w, L->ln2_b, H, d->eps, w->tmp, w->h);
        dot_rows(L->gate, H, w->h, 0, d->experts, w->router);
        for (int e = 0; e < d->experts; e++) w->router[e] = rb(w->router[e]);
        phimoe_sparsemixer(w->router, d->experts, d->top_k, d->jitter_eps, w->chosen, w->weights);
        if (L->w1.kind || L->w3.kind) quantize_x(w->h, &w->qh);
    }
    /* the chosen experts: act_k = bf16(bf16(silu(w1 h)) * (w3 h)) */
    share(F, &r0, &r1);
    for (int k = 0; k < d->top_k; k++) {
        const long e = w->chosen[k];
        float *g = w->tmp + 2L * k * F, *u = g + F;
        mat_rows(&L->w1, e, F, H, w->h, &w->qh, r0, r1, g);
        mat_rows(&L->w3, e, F, H, w->h, &w->qh, r0, r1, u);
        for (long i = r0; i < r1; i++) w->act[(long)k * F + i] = f2bf(rb(silu(rb(g[i]))) * rb(u[i]));
    }
#pragma omp barrier
    if (L->w2.kind) {
#pragma omp single
        for (int k = 0; k < d->top_k; k++) quantize_x(w->act + (long)k * F, &w->qact[k]);
    }
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
        mat_rows(&L->w2, e, H, F, w->act + (long)k * F, &w->qact[k], r0, r1, y + (long)j * H);
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
    long quantized = 2 * qx_bytes(h) + qx_bytes((long)d->heads * d->head_dim) + d->top_k * qx_bytes(f);
    return 4 * floats + 2 * halves + quantized + 64 * 8;
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
    w.act = (bf16 *)p, p += 2L * d->top_k * d->ffn;
    p = qx_carve(&w.qh, d->hidden, p);
    p = qx_carve(&w.qa, (long)d->heads * D, p);
    for (int k = 0; k < d->top_k; k++) p = qx_carve(&w.qact[k], d->ffn, p);
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
