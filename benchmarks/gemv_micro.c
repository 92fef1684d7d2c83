/* The bfloat16 matrix-vector row loop against a plain streaming read of the same bytes (AVX2 or
 * AVX-512), interleaved, so that what the row loop costs beyond reading memory is measured apart
 * from the memory itself. Not part of the package or of CI.
 *
 *   the 4th argument: a software prefetch distance in bytes (0: none)
 *   gcc -O3 -march=native -fopenmp benchmarks/gemv_micro.c -o /tmp/gemv_micro && /tmp/gemv_micro [K] [MiB] [rounds]
 *   (add -mno-avx512f to force the AVX2 loops on an AVX-512 CPU)
 *
 * Variants, each over rows of K bfloat16 weights, one row at a time, the threads halving the rows:
 *   evenodd_bf: evenodd with the activations split in the loop from bfloat16
 *   read     : 256-bit integer adds over the bytes (no arithmetic that could be the limit)
 *   widen    : the package's loop until 2026-12: each 8 weights and 8 activations widened by
 *              vpmovzxwd + shift, one FMA (two lane-crossing widenings per FMA)
 *   evenodd  : 16 weights per load split in-lane into even (shift) and odd (mask) halves, each
 *              already a float32; the activations split the same way once per product, in float32
 *              (2 in-lane ops and 2 FMAs per 16 weights, no lane crossing)
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <math.h>

typedef uint16_t bf16;

static long PF = 0; /* software prefetch distance in bytes (0: none) */
#define PREFETCH(p) do { if (PF) { _mm_prefetch((const char *)(p) + PF, _MM_HINT_T0); _mm_prefetch((const char *)(p) + PF + 64, _MM_HINT_T0); } } while (0)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void share(long n, long *r0, long *r1) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    long per = (n + nt - 1) / nt;
    *r0 = t * per < n ? t * per : n;
    *r1 = (t + 1) * per < n ? (t + 1) * per : n;
}

static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

static void v_read(const bf16 *W, long K, long n, const bf16 *x, const float *xs, float *y) {
    (void)x, (void)xs;
#pragma omp parallel
    {
        long r0, r1;
        share(n, &r0, &r1);
        for (long i = r0; i < r1; i++) {
            const __m256i *w = (const __m256i *)(W + i * K);
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (long k = 0; k + 4 <= K / 16; k += 4) {
                PREFETCH(w + k);
                a0 = _mm256_add_epi32(a0, _mm256_loadu_si256(w + k));
                a1 = _mm256_add_epi32(a1, _mm256_loadu_si256(w + k + 1));
                a2 = _mm256_add_epi32(a2, _mm256_loadu_si256(w + k + 2));
                a3 = _mm256_add_epi32(a3, _mm256_loadu_si256(w + k + 3));
            }
            a0 = _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3));
            y[i] = (float)_mm256_extract_epi32(a0, 0);
        }
    }
}

/* One float variant: each thread's rows, one at a time, eight float32 sums; STEP(k) adds the
 * products of weights k..k+63 of row w into a[0..7] */
#define FLOAT_ROWS(NAME, STEP)                                                               \
    static void NAME(const bf16 *W, long K, long n, const bf16 *x, const float *xs, float *y) { \
        (void)x, (void)xs;                                                                   \
        const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);                              \
        (void)hi;                                                                            \
        _Pragma("omp parallel") {                                                            \
            long r0, r1;                                                                     \
            share(n, &r0, &r1);                                                              \
            for (long i = r0; i < r1; i++) {                                                 \
                const bf16 *w = W + i * K;                                                   \
                __m256 a[8];                                                                 \
                for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();                      \
                for (long k = 0; k + 64 <= K; k += 64) {                                     \
                    PREFETCH(w + k);                                                         \
                    STEP(k)                                                                  \
                }                                                                            \
                for (int j = 1; j < 8; j++) a[0] = _mm256_add_ps(a[0], a[j]);                \
                y[i] = hsum(a[0]);                                                           \
            }                                                                                \
        }                                                                                    \
    }

#define WIDEN8(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define EVEN(v) _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
#define ODD(v) _mm256_castsi256_ps(_mm256_and_si256(v, hi))
#define LOAD16(p) _mm256_loadu_si256((const __m256i *)(p))

#define STEP_WIDEN(k) \
    for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(WIDEN8(w + k + 8 * j), WIDEN8(x + k + 8 * j), a[j]);
#define STEP_EVENODD(k)                                                                             \
    for (int j = 0; j < 4; j++) {                                                                   \
        const __m256i v = LOAD16(w + k + 16 * j);                                                   \
        a[2 * j] = _mm256_fmadd_ps(EVEN(v), _mm256_loadu_ps(xs + k + 16 * j), a[2 * j]);            \
        a[2 * j + 1] = _mm256_fmadd_ps(ODD(v), _mm256_loadu_ps(xs + k + 16 * j + 8), a[2 * j + 1]); \
    }
#define STEP_EVENODD_BF(k)                                                       \
    for (int j = 0; j < 4; j++) {                                                \
        const __m256i v = LOAD16(w + k + 16 * j), u = LOAD16(x + k + 16 * j);    \
        a[2 * j] = _mm256_fmadd_ps(EVEN(v), EVEN(u), a[2 * j]);                  \
        a[2 * j + 1] = _mm256_fmadd_ps(ODD(v), ODD(u), a[2 * j + 1]);            \
    }

FLOAT_ROWS(v_widen, STEP_WIDEN)
FLOAT_ROWS(v_evenodd, STEP_EVENODD) /* xs: x split as split_x does */
FLOAT_ROWS(v_evenodd_bf, STEP_EVENODD_BF)

/* xs: x split per 16 values into its 8 even then its 8 odd values, as float32 */
static void split_x(const bf16 *x, long K, float *xs) {
    for (long k = 0; k < K; k += 16)
        for (int j = 0; j < 8; j++) {
            uint32_t e = (uint32_t)x[k + 2 * j] << 16, o = (uint32_t)x[k + 2 * j + 1] << 16;
            memcpy(xs + k + j, &e, 4);
            memcpy(xs + k + 8 + j, &o, 4);
        }
}

typedef void (*fn)(const bf16 *, long, long, const bf16 *, const float *, float *);

int main(int argc, char **argv) {
    const long K = argc > 1 ? atol(argv[1]) : 4096, mib = argc > 2 ? atol(argv[2]) : 512;
    const int rounds = argc > 3 ? atoi(argv[3]) : 6;
    PF = argc > 4 ? atol(argv[4]) : 0;
    const long bytes = mib << 20, n = bytes / 2 / K;
    bf16 *W = aligned_alloc(2 << 20, (size_t)n * K * 2);
    madvise(W, (size_t)n * K * 2, MADV_HUGEPAGE);
    bf16 *x = aligned_alloc(64, K * 2);
    float *xs = aligned_alloc(64, K * 4), *y = aligned_alloc(64, n * 4), *ref = aligned_alloc(64, n * 4);
    for (long i = 0; i < n * K; i++) W[i] = (bf16)(0x3f80 + (i * 2654435761u >> 25) % 64 - 32 + ((i & 1) << 15));
    for (long k = 0; k < K; k++) x[k] = (bf16)(0x3f00 + k % 100);
    split_x(x, K, xs);
    /* every variant without and with a software prefetch PF bytes ahead (default 1024), in turn,
     * round after round; each timing against the plain read of the same round */
    const long pf = PF ? PF : 1024;
    enum { NV = 8 };
    const char *names[NV] = {"read", "read+pf", "widen", "widen+pf", "evenodd", "evenodd+pf", "evenodd_bf", "evenodd_bf+pf"};
    fn fns[NV] = {v_read, v_read, v_widen, v_widen, v_evenodd, v_evenodd, v_evenodd_bf, v_evenodd_bf};
    double ratio[NV][64], gbs[NV][64];
    v_widen(W, K, n, x, xs, ref);
    v_evenodd_bf(W, K, n, x, xs, y);
    double err = 0;
    for (long i = 0; i < n; i++) {
        double e = fabsf(y[i] - ref[i]) / (1e-6f + fabsf(ref[i]));
        err = e > err ? e : err;
    }
    printf("K %ld, %ld rows, %ld MiB, %d threads, prefetch %ld B; evenodd vs widen: max relative difference %.2e\n",
           K, n, mib, omp_get_max_threads(), pf, err);
    const int R = rounds < 64 ? rounds : 64;
    for (int r = 0; r < R; r++) {
        double base = 0;
        for (int v = 0; v < NV; v++) {
            PF = v % 2 ? pf : 0;
            double t = now();
            fns[v](W, K, n, x, xs, y);
            t = now() - t;
            if (v == 0) base = t;
            gbs[v][r] = bytes / t / 1e9;
            ratio[v][r] = base / t;
        }
    }
    printf("%-14s %10s %12s\n", "variant", "GB/s med", "vs read med");
    for (int v = 0; v < NV; v++) { /* medians by insertion sort */
        for (int a = 1; a < R; a++)
            for (int b = a; b > 0 && ratio[v][b] < ratio[v][b - 1]; b--) {
                double t = ratio[v][b]; ratio[v][b] = ratio[v][b - 1]; ratio[v][b - 1] = t;
            }
        for (int a = 1; a < R; a++)
            for (int b = a; b > 0 && gbs[v][b] < gbs[v][b - 1]; b--) {
                double t = gbs[v][b]; gbs[v][b] = gbs[v][b - 1]; gbs[v][b - 1] = t;
            }
        printf("%-14s %10.1f %11.0f%%\n", names[v], gbs[v][R / 2], 100 * ratio[v][R / 2]);
    }
    return 0;
}
