/* The bf16 products of a few rows, y (M, N) = x (M, K) @ w (N, K)^T with bf16 weights and inputs and float32 sums,
   in two forms on a CPU with AVX512-BF16 (vdpbf16ps), side by side:

   - "rows": the form of modeling_llama/cpu_linear.py (its dot-product entry): one weight row at a time (two from
     K = 4096 on), 8 input rows against it, 8 sums of 16 lanes each reduced to one output each at the row's end;
   - "packed": the weights repacked once into blocks of 16 output columns x 2 k (P[n / 16][k / 2][16][2]), so that
     one vdpbf16ps multiplies a pair of one input row's values (broadcast) by the same pair of 16 columns; two
     blocks (32 columns) at a time, 16 sums of 16 columns, no reductions, 16 outputs stored at once. Each group of 8
     input rows re-reads a block's weights from L1 (a block pair at K = 768 is 48 KB);
   - "packed 32": the same with blocks of 32 columns (P[n / 32][k / 2][32][2]), the form of
     modeling_llama/cpu_linear.py's packed_linear: the two 16-column halves of a k pair side by side, so each
     thread reads its blocks as one sequential stream instead of two.

   Per vdpbf16ps the rows form loads one 64-byte piece of an input row (and an eighth of a weight piece) and ends in
   reductions; the packed form loads one 4-byte broadcast and a sixteenth of a weight piece. Which the CPU prefers is
   what this measures: the weights are the products of one decode step (the 100M preset with q/k/v and gate/up
   stacked as FastDecoder runs them: 12 x (2304x768, 768x768, 4096x768, 768x2048) + 32000x768, 219 MB of bf16; two
   LLaMA-7B layers, 12288x4096, 4096x4096, 22016x4096, 4096x11008, 810 MB), read in that order from memory, and one
   N x 768 weight read again and again from cache. Every packed result is checked against a float64 product.

       cc -O3 -march=native -fopenmp benchmarks/cpu_linear_packed.c -o /tmp/packed -lm
       OMP_NUM_THREADS=2 /tmp/packed            # GB/s of bf16 weights, the three forms, 8 and 16 rows, 9 rounds
       /tmp/packed peak                         # one core's vdpbf16ps rate and latency

   (benchmarks/RESULTS.md, "CPU, fourth machine kind": measured on Zen 5.) */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if !defined(__AVX512BF16__)
int main(void) {
    puts("this CPU (or compiler target) has no AVX512-BF16: nothing to compare");
    return 0;
}
#else
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
static uint16_t f2b(float f) {  /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static float b2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#define PF 2048 /* prefetch distance in bf16 elements (4 KB), non-temporal, as the module's AMD build */
#define ld_bh(p) ((__m512bh)_mm512_loadu_si512(p))

/* ---- the rows form (K a multiple of 32 here; the module also handles tails) ---- */
static void dot8(const uint16_t* x, const uint16_t* wr, int64_t K, uint16_t* y, int64_t ldy) {
    __m512 acc[8];
#pragma GCC unroll 8
    for (int m = 0; m < 8; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __builtin_prefetch(wr + k + PF, 0, 0);
        const __m512bh wv = ld_bh(wr + k);
#pragma GCC unroll 8
        for (int m = 0; m < 8; m++) acc[m] = _mm512_dpbf16_ps(acc[m], ld_bh(x + m * K + k), wv);
    }
#pragma GCC unroll 8
    for (int m = 0; m < 8; m++) y[m * ldy] = f2b(_mm512_reduce_add_ps(acc[m]));
}
static void dot8x2(const uint16_t* x, const uint16_t* wr, int64_t K, uint16_t* y, int64_t ldy) {
    const uint16_t* wr1 = wr + K;
    __m512 a[8], b[8];
#pragma GCC unroll 8
    for (int m = 0; m < 8; m++) a[m] = b[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __builtin_prefetch(wr + k + PF, 0, 0);
        __builtin_prefetch(wr1 + k + PF, 0, 0);
        const __m512bh wv = ld_bh(wr + k), wv1 = ld_bh(wr1 + k);
#pragma GCC unroll 8
        for (int m = 0; m < 8; m++) {
            const __m512bh xv = ld_bh(x + m * K + k);
            a[m] = _mm512_dpbf16_ps(a[m], xv, wv);
            b[m] = _mm512_dpbf16_ps(b[m], xv, wv1);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < 8; m++) {
        y[m * ldy] = f2b(_mm512_reduce_add_ps(a[m]));
        y[m * ldy + 1] = f2b(_mm512_reduce_add_ps(b[m]));
    }
}
static void rows_form(const uint16_t* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, uint16_t* y) {
#pragma omp parallel
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t per = (N + nt - 1) / nt, n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
        const int pair = K >= 4096;
        for (int64_t n = n0; n < n1; n += 1 + (pair && n + 1 < n1))
            for (int64_t m = 0; m < M; m += 8) {
                if (pair && n + 1 < n1)
                    dot8x2(x + m * K, w + n * K, K, y + m * N + n, N);
                else
                    dot8(x + m * K, w + n * K, K, y + m * N + n, N);
            }
    }
}

/* ---- the packed forms (N a multiple of 32, K even) ---- */
/* w (N, K) packed in blocks of W output columns x 2 k: P[n / W][k / 2][W][2] (W = 16 or 32) */
static void pack(const uint16_t* w, int64_t N, int64_t K, uint16_t* p, int W) {
    for (int64_t nb = 0; nb < N / W; nb++)
        for (int64_t kp = 0; kp < K / 2; kp++)
            for (int j = 0; j < W; j++)
                for (int t = 0; t < 2; t++)
                    p[((nb * (K / 2) + kp) * W + j) * 2 + t] = w[(nb * W + j) * K + 2 * kp + t];
}
/* 32 columns at a time, 16 sums for 8 rows: from two 16-column blocks (w32 = 0: each thread reads two streams, a
   block apart) or from one 32-column block (w32 = 1: one stream). Either way a pair of blocks, or one 32-column
   block, is K * 32 elements; a k pair's two 16-column pieces are a block apart, or side by side. */
static inline __attribute__((always_inline)) void packed_pairs(const uint16_t* x, int64_t M, const uint16_t* p,
                                                               int64_t N, int64_t K, uint16_t* y, const int w32) {
    const int64_t pairs = N / 32, step = w32 ? 64 : 32, half = w32 ? 32 : K * 16;
#pragma omp parallel
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t per = (pairs + nt - 1) / nt, b0 = t * per, b1 = b0 + per < pairs ? b0 + per : pairs;
        for (int64_t bp = b0; bp < b1; bp++) {
            const uint16_t *pa = p + bp * K * 32, *pb = pa + half;
            for (int64_t m0 = 0; m0 < M; m0 += 8) { /* (M a multiple of 8 here) */
                __m512 a[8], b[8];
#pragma GCC unroll 8
                for (int m = 0; m < 8; m++) a[m] = b[m] = _mm512_setzero_ps();
                const uint16_t* xr = x + m0 * K;
                for (int64_t kp = 0; kp < K / 2; kp++) {
                    if (m0 == 0) {
                        __builtin_prefetch(pa + kp * step + PF, 0, 0);
                        __builtin_prefetch(pb + kp * step + PF, 0, 0);
                    }
                    const __m512bh wa = ld_bh(pa + kp * step), wb = ld_bh(pb + kp * step);
#pragma GCC unroll 8
                    for (int m = 0; m < 8; m++) {
                        uint32_t v;
                        memcpy(&v, xr + m * K + 2 * kp, 4);
                        const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)v);
                        a[m] = _mm512_dpbf16_ps(a[m], xb, wa);
                        b[m] = _mm512_dpbf16_ps(b[m], xb, wb);
                    }
                }
#pragma GCC unroll 8
                for (int m = 0; m < 8; m++) {
                    uint16_t* yr = y + (m0 + m) * N + 32 * bp;
                    _mm256_storeu_si256((__m256i*)yr, (__m256i)_mm512_cvtneps_pbh(a[m]));
                    _mm256_storeu_si256((__m256i*)(yr + 16), (__m256i)_mm512_cvtneps_pbh(b[m]));
                }
            }
        }
    }
}
static void packed_form(const uint16_t* x, int64_t M, const uint16_t* p, int64_t N, int64_t K, uint16_t* y) {
    packed_pairs(x, M, p, N, K, y, 0);
}
static void packed32_form(const uint16_t* x, int64_t M, const uint16_t* p, int64_t N, int64_t K, uint16_t* y) {
    packed_pairs(x, M, p, N, K, y, 1);
}

typedef struct {
    int64_t n, k;
} shape;
typedef struct {
    const char* name;
    const shape* shapes;
    int count;
} sequence;

static int cmp(const void* a, const void* b) {
    const double d = *(const double*)a - *(const double*)b;
    return (d > 0) - (d < 0);
}

/* the worst |packed - float64| over the float64 product's scale, first rows and columns of the first product
   (both packed forms) */
static double check(const uint16_t* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const uint16_t* y) {
    double worst = 0;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < (N < 256 ? N : 256); n++) {
            double r = 0, s = 0;
            for (int64_t k = 0; k < K; k++) {
                r += (double)b2f(x[m * K + k]) * b2f(w[n * K + k]);
                s += fabs((double)b2f(x[m * K + k]) * b2f(w[n * K + k]));
            }
            const double e = fabs(b2f(y[m * N + n]) - r) / (fabs(r) + 1e-3 * s);
            if (e > worst) worst = e;
        }
    return worst;
}

/* one table row: the sequence's products, read `passes` times per timing round (1: each weight once, from memory;
   more: a weight small enough for the cache read again and again) */
static void run(const sequence* seq, int M, int rounds, int passes) {
    const int total = seq->count;
    uint16_t **w = malloc(total * sizeof *w), **p = malloc(total * sizeof *p), **p32 = malloc(total * sizeof *p32);
    int64_t kmax = 0, nmax = 0;
    double bytes = 0;
    for (int i = 0; i < total; i++) {
        const shape s = seq->shapes[i];
        w[i] = aligned_alloc(64, s.n * s.k * 2);
        p[i] = aligned_alloc(64, s.n * s.k * 2);
        p32[i] = aligned_alloc(64, s.n * s.k * 2);
        for (int64_t j = 0; j < s.n * s.k; j++) w[i][j] = f2b((float)rand() / RAND_MAX - 0.5f);
        pack(w[i], s.n, s.k, p[i], 16);
        pack(w[i], s.n, s.k, p32[i], 32);
        bytes += s.n * s.k * 2.0;
        if (s.k > kmax) kmax = s.k;
        if (s.n > nmax) nmax = s.n;
    }
    uint16_t* x = aligned_alloc(64, M * kmax * 2);
    uint16_t* y = aligned_alloc(64, M * nmax * 2);
    for (int64_t j = 0; j < M * kmax; j++) x[j] = f2b((float)rand() / RAND_MAX - 0.5f);
    const shape s0 = seq->shapes[0];
    packed_form(x, M, p[0], s0.n, s0.k, y);
    double err = check(x, M, w[0], s0.n, s0.k, y);
    packed32_form(x, M, p32[0], s0.n, s0.k, y);
    const double err32 = check(x, M, w[0], s0.n, s0.k, y);
    err = err32 > err ? err32 : err;
    double t[3][32];
    for (int r = 0; r < rounds; r++) {
        for (int f = 0; f < 3; f++) { /* in turn, each form first once every three rounds */
            const int form = (f + r) % 3;
            const double t0 = now();
            for (int q = 0; q < passes; q++)
                for (int i = 0; i < total; i++) {
                    const shape s = seq->shapes[i];
                    if (form == 0)
                        rows_form(x, M, w[i], s.n, s.k, y);
                    else if (form == 1)
                        packed_form(x, M, p[i], s.n, s.k, y);
                    else
                        packed32_form(x, M, p32[i], s.n, s.k, y);
                }
            t[form][r] = now() - t0;
        }
    }
    for (int form = 0; form < 3; form++) qsort(t[form], rounds, sizeof(double), cmp);
    const double mr = t[0][rounds / 2], mp = t[1][rounds / 2], m32 = t[2][rounds / 2], read = bytes * passes;
    printf("| %s | %d | %.0f | %.1f | %.1f | %.1f | %.2fx | %.2fx | %.1e |\n", seq->name, M, bytes / 1e6,
           read / mr / 1e9, read / mp / 1e9, read / m32 / 1e9, mr / mp, mr / m32, err);
    fflush(stdout);
    for (int i = 0; i < total; i++) free(w[i]), free(p[i]), free(p32[i]);
    free(w), free(p), free(p32), free(x), free(y);
}

static void peak(void) {
    __m512 a[12];
    for (int i = 0; i < 12; i++) a[i] = _mm512_setzero_ps();
    __m512bh u = (__m512bh)_mm512_set1_epi16(0x3f80), v = u;
    const long n = 100000000;
    double t0 = now();
    for (long i = 0; i < n; i++) {
#pragma GCC unroll 12
        for (int j = 0; j < 12; j++) a[j] = _mm512_dpbf16_ps(a[j], u, v);
        __asm__ volatile("" : "+v"(u));
    }
    const double t = now() - t0;
    float s = 0;
    for (int i = 0; i < 12; i++) s += _mm512_reduce_add_ps(a[i]);
    __m512 c = _mm512_setzero_ps();
    t0 = now();
    for (long i = 0; i < n / 4; i++) c = _mm512_dpbf16_ps(c, u, v);
    const double lat = (now() - t0) / (n / 4);
    printf("one core: %.2f G vdpbf16ps/s (12 chains), latency %.3f ns (%g)\n", n * 12 / t / 1e9, lat * 1e9,
           s + _mm512_reduce_add_ps(c));
}

int main(int argc, char** argv) {
    if (argc > 1 && !strcmp(argv[1], "peak")) {
        peak();
        return 0;
    }
    static shape step100m[49], hot[1] = {{4096, 768}};
    for (int l = 0; l < 12; l++) {
        step100m[4 * l] = (shape){2304, 768};
        step100m[4 * l + 1] = (shape){768, 768};
        step100m[4 * l + 2] = (shape){4096, 768};
        step100m[4 * l + 3] = (shape){768, 2048};
    }
    step100m[48] = (shape){32000, 768};
    static const shape llama7b[8] = {{12288, 4096}, {4096, 4096}, {22016, 4096}, {4096, 11008},
                                     {12288, 4096}, {4096, 4096}, {22016, 4096}, {4096, 11008}};
    const sequence seqs[3] = {{"100M step (49 products), from memory", step100m, 49},
                              {"LLaMA-7B, two layers, from memory", llama7b, 8},
                              {"4096 x 768 again and again, from cache (6.3 MB)", hot, 1}};
    const int rounds = 9;
    printf("threads %d; GB/s of bf16 weights, medians of %d rounds, the forms in turn\n\n", omp_get_max_threads(), rounds);
    printf("| products | rows | MB | rows form GB/s | packed GB/s | packed 32 GB/s | packed / rows | packed 32 / rows "
           "| packed error |\n");
    printf("|---|---|---|---|---|---|---|---|---|\n");
    for (int s = 0; s < 3; s++)
        for (int M = 8; M <= 16; M += 8) run(&seqs[s], M, rounds, s == 2 ? 200 : 1);
    return 0;
}
#endif
