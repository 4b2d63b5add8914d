/* Variants of the 8-row fp32 product y (8, N) = x (8, K) @ w (N, K)^T, against a read-only pass over the same
   weights: what bounds modeling_llama/cpu_linear.py's kernel on a given CPU (benchmarks/RESULTS.md, "what bounds
   the batch-8 step"). The weights are the 85 products of one decode step of the 100M preset (12 layers of
   q, k, v, o 768x768, gate, up 2048x768, down 768x2048, and the 32000x768 head: 438 MB, far larger than any
   cache), read in that order, as the step reads them.

       cc -O3 -march=native -fopenmp benchmarks/cpu_linear_variants.c -o /tmp/variants -lm
       OMP_NUM_THREADS=2 /tmp/variants          # cold: GB/s of weights per variant, best of 5, 3 rounds
       OMP_NUM_THREADS=1 /tmp/variants hot      # one core, the layers' products only, each re-reading the
                                                # first N x K weights (<= 6.3 MB: from the last-level cache)
       /tmp/variants levels                     # the kernel and a read-only pass over one N x 768 weight read
                                                # again and again, from 48 KB (L1/L2) to 192 MB (memory), on one
                                                # thread and on all: where the weights come from sets the rate
       /tmp/variants hugepages                  # the step's products and a read-only pass with the weights on
                                                # 4 KB pages and on transparent huge pages (Linux), alternating
       /tmp/variants peak                       # one core's fp32 FMA rate and latency, and what it makes the
                                                # 8-row products' ceiling: one 8-float weight piece takes 8 FMAs
       OMP_NUM_THREADS=2 /tmp/variants prefetch # the kernel with its prefetch 0-16 KB ahead, NTA or T0, 7 rounds

   "bf16 weights" is the kernel's bf16 entry (the same loop, each 8-weight piece widened to fp32): its GB/s count
   bf16 bytes, half of fp32's for the same products; both print their time too.
   "kernel" is the loop of cpu_linear.py (one weight row, 8 input rows, one accumulator per row, a non-temporal
   prefetch 4 KB ahead). Each variant's result is checked against it on the first products. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld(const float* p) { v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline float hsum(v8 a) { float s = 0.f; for (int i = 0; i < 8; i++) s += a[i]; return s; }
#define M 8
#define PF 1024

/* the thread's share n0..n1 of the N columns, cut at multiples of `step` (the last thread takes the rest) */
#define SPLIT(N, step)                                                                  \
    int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();                       \
    int64_t nb = (N) / (step), per = (nb + nt - 1) / nt;                                \
    int64_t n0 = t * per * (step), n1 = (t * per + per < nb ? t * per + per : nb) * (step); \
    if (t == nt - 1) n1 = (N);

typedef void (*fn)(const float* x, const float* w, int64_t N, int64_t K, float* y);

static void read_only(const float* x, const float* w, int64_t N, int64_t K, float* y) {
    (void)x;
    #pragma omp parallel
    {
        SPLIT(N, 1)
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t i = n0 * K; i < n1 * K; i += 32) {
            a0 += ld(w + i); a1 += ld(w + i + 8); a2 += ld(w + i + 16); a3 += ld(w + i + 24);
        }
        y[t] = hsum(a0 + a1 + a2 + a3);
    }
}

/* bf16 -> fp32 exactly: the 16 bits become the high half of the float */
static inline v8 ld_bf16(const uint16_t* p) {
    return (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
}

/* the kernel's loop over weights of type WT (loaded 8 at a time by LOADW), the input rows S floats apart, a
   non-temporal prefetch 4 KB ahead */
#define KERNEL_LOOP(NAME, WT, LOADW)                                                                    \
static void NAME(const float* x, int64_t S, const WT* w, int64_t N, int64_t K, float* y) {             \
    _Pragma("omp parallel") {                                                                          \
        SPLIT(N, 1)                                                                                    \
        for (int64_t n = n0; n < n1; n++) {                                                            \
            const WT* wr = w + n * K;                                                                  \
            v8 acc[M];                                                                                 \
            for (int m = 0; m < M; m++) acc[m] = (v8){0};                                              \
            for (int64_t k = 0; k < K; k += 8) {                                                       \
                __builtin_prefetch(wr + k + PF * sizeof(float) / sizeof(WT), 0, 0);                    \
                v8 wv = LOADW(wr + k);                                                                 \
                for (int m = 0; m < M; m++) acc[m] += wv * ld(x + m * S + k);                          \
            }                                                                                          \
            for (int m = 0; m < M; m++) y[m * N + n] = hsum(acc[m]);                                   \
        }                                                                                              \
    }                                                                                                  \
}
KERNEL_LOOP(kernel_strided, float, ld)
KERNEL_LOOP(kernel_bf16_strided, uint16_t, ld_bf16)

static void kernel(const float* x, const float* w, int64_t N, int64_t K, float* y) { kernel_strided(x, K, w, N, K, y); }

/* NW weight rows x MX input rows of accumulators; the weight rows' block is re-read from L1 per group of MX */
#define TILE(NAME, NW, MX)                                                                              \
static void NAME(const float* x, const float* w, int64_t N, int64_t K, float* y) {                     \
    _Pragma("omp parallel") {                                                                          \
        SPLIT(N, NW)                                                                                   \
        int64_t n = n0;                                                                                \
        for (; n + NW <= n1; n += NW) {                                                                \
            const float* wr = w + n * K;                                                               \
            for (int m0 = 0; m0 < M; m0 += MX) {                                                       \
                v8 acc[NW][MX];                                                                        \
                for (int i = 0; i < NW; i++) for (int j = 0; j < MX; j++) acc[i][j] = (v8){0};         \
                for (int64_t k = 0; k < K; k += 8) {                                                   \
                    if (m0 == 0) for (int i = 0; i < NW; i++) __builtin_prefetch(wr + i * K + k + PF, 0, 0); \
                    v8 wv[NW];                                                                         \
                    for (int i = 0; i < NW; i++) wv[i] = ld(wr + i * K + k);                           \
                    for (int j = 0; j < MX && m0 + j < M; j++) {                                       \
                        v8 xv = ld(x + (m0 + j) * K + k);                                              \
                        for (int i = 0; i < NW; i++) acc[i][j] += wv[i] * xv;                          \
                    }                                                                                  \
                }                                                                                      \
                for (int i = 0; i < NW; i++) for (int j = 0; j < MX && m0 + j < M; j++)                \
                    y[(m0 + j) * N + n + i] = hsum(acc[i][j]);                                         \
            }                                                                                          \
        }                                                                                              \
        for (; n < n1; n++) /* the columns left over (N not a multiple of NW) */                      \
            for (int m = 0; m < M; m++) {                                                              \
                v8 a = {0};                                                                            \
                for (int64_t k = 0; k < K; k += 8) a += ld(w + n * K + k) * ld(x + m * K + k);         \
                y[m * N + n] = hsum(a);                                                                \
            }                                                                                          \
    }                                                                                                  \
}
TILE(tile_4x2, 4, 2)
TILE(tile_2x4, 2, 4)
TILE(tile_3x4, 3, 4)
TILE(tile_4x3, 4, 3)
TILE(tile_2x8, 2, 8)

/* K-blocked: 512 columns of the 8 input rows (16 KB) stay in L1; y accumulates over the blocks */
#define KC 512
static void kblock(const float* x, const float* w, int64_t N, int64_t K, float* y) {
    if (K <= KC) { kernel(x, w, N, K, y); return; }
    #pragma omp parallel
    {
        SPLIT(N, 1)
        for (int64_t kc = 0; kc < K; kc += KC) {
            int64_t ke = kc + KC < K ? kc + KC : K;
            for (int64_t n = n0; n < n1; n++) {
                const float* wr = w + n * K;
                v8 acc[M];
                for (int m = 0; m < M; m++) acc[m] = (v8){0};
                for (int64_t k = kc; k < ke; k += 8) {
                    __builtin_prefetch(wr + K + k, 0, 0);
                    v8 wv = ld(wr + k);
                    for (int m = 0; m < M; m++) acc[m] += wv * ld(x + m * K + k);
                }
                for (int m = 0; m < M; m++) y[m * N + n] = (kc ? y[m * N + n] : 0.f) + hsum(acc[m]);
            }
        }
    }
}

/* input rows copied with a row stride of K + 16 floats (no 4 KB aliasing between rows) */
static float XP[M * (4096 + 16)];
static void padded(const float* x, const float* w, int64_t N, int64_t K, float* y) {
    const int64_t S = K + 16;
    for (int m = 0; m < M; m++) memcpy(XP + m * S, x + m * K, K * sizeof(float));
    kernel_strided(XP, S, w, N, K, y);
}

/* weights repacked once into panels of 16 columns, P[n / 16][k][16]; a broadcast-FMA micro-kernel (the GEMM
   form, no horizontal sums): 6 input rows x 2 vectors of accumulators, then the last 2 rows */
static void panel16(const float* x, const float* P, int64_t N, int64_t K, float* y) {
    #pragma omp parallel
    {
        SPLIT(N, 16)
        for (int64_t n = n0; n < n1; n += 16) {
            const float* pp = P + n * K;
            __m256 c[6][2];
            for (int i = 0; i < 6; i++) c[i][0] = c[i][1] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k++) {
                const float* wk = pp + k * 16;
                _mm_prefetch((const char*)(wk + 512), _MM_HINT_NTA);
                __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
                for (int i = 0; i < 6; i++) {
                    __m256 b = _mm256_broadcast_ss(x + i * K + k);
                    c[i][0] = _mm256_fmadd_ps(b, w0, c[i][0]);
                    c[i][1] = _mm256_fmadd_ps(b, w1, c[i][1]);
                }
            }
            for (int i = 0; i < 6; i++) {
                _mm256_storeu_ps(y + i * N + n, c[i][0]);
                _mm256_storeu_ps(y + i * N + n + 8, c[i][1]);
            }
            __m256 d[2][2];
            for (int i = 0; i < 2; i++) d[i][0] = d[i][1] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k++) {
                const float* wk = pp + k * 16;
                __m256 w0 = _mm256_loadu_ps(wk), w1 = _mm256_loadu_ps(wk + 8);
                for (int i = 0; i < 2; i++) {
                    __m256 b = _mm256_broadcast_ss(x + (6 + i) * K + k);
                    d[i][0] = _mm256_fmadd_ps(b, w0, d[i][0]);
                    d[i][1] = _mm256_fmadd_ps(b, w1, d[i][1]);
                }
            }
            for (int i = 0; i < 2; i++) {
                _mm256_storeu_ps(y + (6 + i) * N + n, d[i][0]);
                _mm256_storeu_ps(y + (6 + i) * N + n + 8, d[i][1]);
            }
        }
    }
}

/* the tile of 2 weight rows x 4 input rows written with intrinsics, its loops fully unrolled (8 accumulators, 6 loads
   per 8 FMAs: FMA-bound where the kernel's 9 loads per 8 FMAs are load-bound); two passes over the input rows */
static void tile2x4_intrinsics(const float* x, const float* w, int64_t N, int64_t K, float* y) {
    #pragma omp parallel
    {
        SPLIT(N, 2)
        int64_t n = n0;
        for (; n + 2 <= n1; n += 2) {
            const float* w0 = w + n * K;
            const float* w1 = w0 + K;
            for (int m0 = 0; m0 < M; m0 += 4) {
                __m256 a[2][4];
                for (int j = 0; j < 4; j++) a[0][j] = a[1][j] = _mm256_setzero_ps();
                for (int64_t k = 0; k < K; k += 8) {
                    if (m0 == 0) { _mm_prefetch((const char*)(w0 + k + PF), _MM_HINT_NTA); _mm_prefetch((const char*)(w1 + k + PF), _MM_HINT_NTA); }
                    const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
                    #pragma GCC unroll 4
                    for (int j = 0; j < 4; j++) {
                        const __m256 xv = _mm256_loadu_ps(x + (m0 + j) * K + k);
                        a[0][j] = _mm256_fmadd_ps(v0, xv, a[0][j]);
                        a[1][j] = _mm256_fmadd_ps(v1, xv, a[1][j]);
                    }
                }
                for (int j = 0; j < 4; j++) { y[(m0 + j) * N + n] = hsum((v8)a[0][j]); y[(m0 + j) * N + n + 1] = hsum((v8)a[1][j]); }
            }
        }
        for (; n < n1; n++)
            for (int m = 0; m < M; m++) {
                v8 a = {0};
                for (int64_t k = 0; k < K; k += 8) a += ld(w + n * K + k) * ld(x + m * K + k);
                y[m * N + n] = hsum(a);
            }
    }
}

/* weights repacked into panels of 24 columns, P24[n / 24][k][24] (the last panel N % 24 wide, a multiple of 8):
   two passes of 4 input rows x 3 vectors (12 accumulators, 7 loads per 12 FMAs: FMA-bound in theory); a 16-wide
   panel as 6 + 2 rows, an 8-wide one as 8 rows */
#define PANEL_PASS(NV, R0, NR)                                                                                  \
    {                                                                                                           \
        __m256 c[NR][NV];                                                                                       \
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)                                                    \
            _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) c[i][v] = _mm256_setzero_ps();                 \
        for (int64_t k = 0; k < K; k++) {                                                                       \
            const float* wk = pp + k * (NV * 8);                                                                \
            if (R0 == 0) _mm_prefetch((const char*)(wk + PF), _MM_HINT_NTA);                                    \
            __m256 wv[NV];                                                                                      \
            _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) wv[v] = _mm256_loadu_ps(wk + 8 * v);          \
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {                                              \
                const __m256 b = _mm256_broadcast_ss(x + (R0 + i) * K + k);                                     \
                _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) c[i][v] = _mm256_fmadd_ps(b, wv[v], c[i][v]); \
            }                                                                                                   \
        }                                                                                                       \
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)                                                    \
            _Pragma("GCC unroll 3") for (int v = 0; v < NV; v++) _mm256_storeu_ps(y + (R0 + i) * N + n + 8 * v, c[i][v]); \
    }
static void panel24(const float* x, const float* P, int64_t N, int64_t K, float* y) {
    #pragma omp parallel
    {
        SPLIT(N, 24)
        for (int64_t n = n0; n < n1;) {
            const float* pp = P + n * K;
            const int64_t width = n1 - n >= 24 ? 24 : n1 - n;
            if (width == 24) { PANEL_PASS(3, 0, 4) PANEL_PASS(3, 4, 4) }
            else if (width == 16) { PANEL_PASS(2, 0, 6) PANEL_PASS(2, 6, 2) }
            else { PANEL_PASS(1, 0, 8) }
            n += width;
        }
    }
}
static void pack24(const float* W, float* P, int64_t N, int64_t K) {
    for (int64_t n0 = 0; n0 < N; n0 += 24) {
        const int64_t width = N - n0 >= 24 ? 24 : N - n0;
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < width; j++) P[n0 * K + k * width + j] = W[(n0 + j) * K + k];
    }
}

/* bf16 weights (the kernel's bf16 entry): each 8-weight piece widened to fp32 exactly, sums in fp32 */
static void kernel_bf16(const float* x, const float* w_as_float, int64_t N, int64_t K, float* y) {
    kernel_bf16_strided(x, K, (const uint16_t*)w_as_float, N, K, y);  /* (N, K) bf16, through the common signature */
}

/* the 100M preset's decode step: L layers of q, k, v, o, gate, up, down (N x K each), then the V x H head */
enum { L = 12, H = 768, I = 2048, V = 32000 };  /* every N is a multiple of 16 */
static const int64_t shapes[8][2] = {{H, H}, {H, H}, {H, H}, {H, H}, {I, H}, {I, H}, {H, I}, {V, H}};

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static int cmp_double(const void* a, const void* b) { double d = *(const double*)a - *(const double*)b; return (d > 0) - (d < 0); }

/* "levels": one weight of N x 768 (the q/k/v/o products' K), multiplied again and again, so that it is read from
   the cache level its size fits (or from memory), by the kernel and by the read-only pass; on one thread and on
   omp_get_max_threads(). GB/s of weights, best of 5 (each timing ~0.3 GB of weights read). */
/* "hugepages": the 85 products (and a read-only pass) over the weights as allocated (aligned_alloc: 4 KB pages
   unless the system's THP mode is "always") and over a copy marked MADV_HUGEPAGE before it is written, alternating,
   21 rounds; medians of the per-round time ratios. What FastDecoder's huge_pages does for the step's weights. */
static int hugepages(const float* X, const float* W, int64_t total, float* Y) {
#ifdef MADV_HUGEPAGE
    const size_t page = 2 << 20, bytes = ((size_t)total * 4 + page - 1) / page * page;
    float* Hw = aligned_alloc(page, bytes);
    if (!Hw) { fprintf(stderr, "out of memory\n"); return 1; }
    const int advised = madvise(Hw, bytes, MADV_HUGEPAGE) == 0;
    memcpy(Hw, W, total * 4);  /* first touch: huge pages, where granted */
    long huge_kb = -1;
    FILE* f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f)) if (!strncmp(line, "AnonHugePages:", 14)) huge_kb = atol(line + 14);
    if (f) fclose(f);
    printf("madvise(MADV_HUGEPAGE) %s; the process's AnonHugePages: %.0f MB, for %.0f MB of weights\n",
           advised ? "accepted" : "refused", huge_kb * 1024e-6, total * 4e-6);
    enum { R = 21 };
    double t[4][R];
    const float* bases[2] = {W, Hw};
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) {
            const int v = (i + r) % 4, huge = v & 1, read = v >> 1;  /* the order rotates every round */
            const double t0 = now();
            if (read) read_only(X, bases[huge], total / 768, 768, Y);
            else {
                int64_t o = 0;
                for (int64_t l = 0; l <= L; l++)
                    for (int s = 0; s < (l == L ? 1 : 7); s++) {
                        const int64_t N = shapes[l == L ? 7 : s][0], K = shapes[l == L ? 7 : s][1];
                        kernel(X, bases[huge] + o, N, K, Y);
                        o += N * K;
                    }
            }
            t[v][r] = now() - t0;
        }
    for (int read = 0; read < 2; read++) {
        double ratio[R], a[R], b[R];
        for (int r = 0; r < R; r++) { a[r] = t[2 * read][r]; b[r] = t[2 * read + 1][r]; ratio[r] = b[r] / a[r]; }
        qsort(ratio, R, sizeof(double), cmp_double); qsort(a, R, sizeof(double), cmp_double); qsort(b, R, sizeof(double), cmp_double);
        printf("%-22s 4 KB pages %6.1f ms, huge pages %6.1f ms (medians); huge / 4 KB %.3f (median of rounds)\n",
               read ? "read-only pass" : "85 products, 8 rows", a[R / 2] * 1e3, b[R / 2] * 1e3, ratio[R / 2]);
    }
    free(Hw);
    return 0;
#else
    (void)X; (void)W; (void)total; (void)Y;
    printf("no MADV_HUGEPAGE on this system\n");
    return 1;
#endif
}

static int levels(const float* X, const float* W, int64_t total, float* Y) {
    const int64_t K = 768, sizes[] = {16, 64, 256, 1024, 4096, 16384, 65536};
    const int maxt = omp_get_max_threads();
    printf("one N x 768 fp32 weight read again and again, 8 input rows: GB/s of weights, best of 5\n");
    printf("%9s %10s | %-22s | %-22s\n", "N", "weight", "1 thread: read / kernel", "all threads: read / kernel");
    for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        const int64_t N = sizes[i], bytes = N * K * 4;
        if (N * K > total) break;
        const int reps = (int)(3e8 / bytes) + 1;
        printf("%9ld %8.0f KB |", (long)N, bytes / 1024.0);
        for (int threads = 1; threads <= maxt; threads = threads == maxt ? maxt + 1 : maxt) {
            omp_set_num_threads(threads);
            const fn pair[2] = {read_only, kernel};
            for (int f = 0; f < 2; f++) {
                double best = 1e9;
                for (int it = 0; it < 5; it++) {
                    const double t0 = now();
                    for (int r = 0; r < reps; r++) pair[f](X, W, N, K, Y);
                    const double dt = (now() - t0) / reps;
                    best = dt < best ? dt : best;
                }
                printf(" %9.1f%s", bytes / best / 1e9, f ? " |" : "");
            }
        }
        printf("\n");
    }
    omp_set_num_threads(maxt);
    return 0;
}

/* "peak": one core's fp32 FMA throughput (12 independent 8-lane chains) and latency (one chain). At 8 input rows
   each 8-float weight piece takes 8 FMAs, so one core computes at most (FMAs per second) x 4 bytes of weights per
   second: the ceiling of the 8-row products on that core, whatever memory delivers. */
static int peak(void) {
    const long n = 100000000;
    /* distinct starting values: twelve equal chains could be computed as one */
    __m256 a0 = _mm256_set1_ps(0.f), a1 = _mm256_set1_ps(.01f), a2 = _mm256_set1_ps(.02f), a3 = _mm256_set1_ps(.03f),
           a4 = _mm256_set1_ps(.04f), a5 = _mm256_set1_ps(.05f), a6 = _mm256_set1_ps(.06f), a7 = _mm256_set1_ps(.07f),
           a8 = _mm256_set1_ps(.08f), a9 = _mm256_set1_ps(.09f), a10 = _mm256_set1_ps(.1f), a11 = _mm256_set1_ps(.11f);
    const __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-4f);
    double t0 = now();
    for (long k = 0; k < n; k++) {
        a0 = _mm256_fmadd_ps(a0, b, c); a1 = _mm256_fmadd_ps(a1, b, c); a2 = _mm256_fmadd_ps(a2, b, c);
        a3 = _mm256_fmadd_ps(a3, b, c); a4 = _mm256_fmadd_ps(a4, b, c); a5 = _mm256_fmadd_ps(a5, b, c);
        a6 = _mm256_fmadd_ps(a6, b, c); a7 = _mm256_fmadd_ps(a7, b, c); a8 = _mm256_fmadd_ps(a8, b, c);
        a9 = _mm256_fmadd_ps(a9, b, c); a10 = _mm256_fmadd_ps(a10, b, c); a11 = _mm256_fmadd_ps(a11, b, c);
    }
    const double rate = 12.0 * n / (now() - t0);
    const float sum = a0[0] + a1[0] + a2[0] + a3[0] + a4[0] + a5[0] + a6[0] + a7[0] + a8[0] + a9[0] + a10[0] + a11[0];
    t0 = now();
    __m256 z = a0;
    for (long k = 0; k < n; k++) z = _mm256_fmadd_ps(z, b, c);
    const double latency = (now() - t0) / n;
    printf("one core: %.2f G FMA/s (8 lanes each, %.1f GFLOP/s), one FMA's latency %.3f ns (%.2f, %.2f)\n",
           rate / 1e9, rate * 16 / 1e9, latency * 1e9, sum, z[0]);
    printf("8-row products' compute ceiling: %.1f GB/s of fp32 weights per core, %.1f on %d threads\n",
           rate * 4 / 1e9, rate * 4 / 1e9 * omp_get_max_threads(), omp_get_max_threads());
    return 0;
}

/* "prefetch": the kernel's loop with its prefetch DIST floats ahead (0: none) and hint HINT (0 NTA, 3 T0) */
#define KERNEL_PF(NAME, DIST, HINT)                                                                      \
static void NAME(const float* x, const float* w, int64_t N, int64_t K, float* y) {                       \
    _Pragma("omp parallel") {                                                                             \
        SPLIT(N, 1)                                                                                       \
        for (int64_t n = n0; n < n1; n++) {                                                               \
            const float* wr = w + n * K;                                                                  \
            v8 acc[M];                                                                                    \
            _Pragma("GCC unroll 8") for (int m = 0; m < M; m++) acc[m] = (v8){0};                         \
            for (int64_t k = 0; k < K; k += 8) {                                                          \
                if (DIST) __builtin_prefetch(wr + k + DIST, 0, HINT);                                     \
                v8 wv = ld(wr + k);                                                                       \
                for (int m = 0; m < M; m++) acc[m] += wv * ld(x + m * K + k);                             \
            }                                                                                             \
            for (int m = 0; m < M; m++) y[m * N + n] = hsum(acc[m]);                                      \
        }                                                                                                 \
    }                                                                                                     \
}
KERNEL_PF(pf_none, 0, 0) KERNEL_PF(pf_2k_nta, 512, 0) KERNEL_PF(pf_8k_nta, 2048, 0) KERNEL_PF(pf_16k_nta, 4096, 0)
KERNEL_PF(pf_4k_t0, 1024, 3) KERNEL_PF(pf_8k_t0, 2048, 3)

static double step_time(fn f, const float* X, const float* W, float* Y) {  /* the 85 products, best of 5 */
    double best = 1e9;
    for (int it = 0; it < 5; it++) {
        const double t0 = now();
        int64_t o = 0;
        for (int l = 0; l <= L; l++)
            for (int s = 0; s < (l == L ? 1 : 7); s++) {
                const int64_t N = shapes[l == L ? 7 : s][0], K = shapes[l == L ? 7 : s][1];
                f(X, W + o, N, K, Y);
                o += N * K;
            }
        const double dt = now() - t0;
        best = dt < best ? dt : best;
    }
    return best;
}

static int prefetch(const float* X, const float* W, int64_t total, float* Y) {
    const fn fns[] = {read_only, kernel, pf_none, pf_2k_nta, pf_8k_nta, pf_16k_nta, pf_4k_t0, pf_8k_t0};
    const char* names[] = {"read only", "kernel (4 KB, NTA)", "none", "2 KB NTA", "8 KB NTA", "16 KB NTA", "4 KB T0",
                           "8 KB T0"};
    enum { NF = sizeof fns / sizeof fns[0], R = 7 };
    double gbs[NF][R];
    printf("%d threads, 85 products of 8 rows, %.0f MB of weights, the kernel's prefetch distance and hint: GB/s of "
           "weights, best of 5, %d rounds\n", omp_get_max_threads(), total * 4e-6, R);
    for (int r = 0; r < R; r++)
        for (int f = 0; f < NF; f++) gbs[f][r] = total * 4.0 / step_time(fns[f], X, W, Y) / 1e9;
    for (int f = 0; f < NF; f++) {
        qsort(gbs[f], R, sizeof(double), cmp_double);
        printf("%-20s median %5.1f (%.1f-%.1f)\n", names[f], gbs[f][R / 2], gbs[f][0], gbs[f][R - 1]);
    }
    return 0;
}

int main(int argc, char** argv) {
    const int hot = argc > 1 && !strcmp(argv[1], "hot");
    int64_t total = (int64_t)V * H;
    for (int l = 0; l < L; l++) for (int s = 0; s < 7; s++) total += shapes[s][0] * shapes[s][1];
    float* W = aligned_alloc(64, total * 4);
    float* P = aligned_alloc(64, total * 4);
    float* P24 = aligned_alloc(64, total * 4);
    uint16_t* B = aligned_alloc(64, total * 2);  /* the weights rounded to bf16 (truncated: any bf16 values do) */
    float* X = aligned_alloc(64, M * 4096 * 4);
    float* Y = aligned_alloc(64, M * V * 4);
    float* R = aligned_alloc(64, M * V * 4);
    if (!W || !P || !P24 || !B || !X || !Y || !R) { fprintf(stderr, "out of memory\n"); return 1; }
    for (int64_t i = 0; i < total; i++) W[i] = (float)((i * 7919) % 13) * 0.01f - 0.06f;
    for (int i = 0; i < M * 4096; i++) X[i] = (float)(i % 5) * 0.1f;
    for (int64_t i = 0; i < total; i++) { uint32_t u; memcpy(&u, &W[i], 4); B[i] = (uint16_t)(u >> 16); }
    int64_t off = 0;  /* the 16-column panels of every product */
    for (int l = 0; l <= L; l++)
        for (int s = 0; s < (l == L ? 1 : 7); s++) {
            const int64_t N = shapes[l == L ? 7 : s][0], K = shapes[l == L ? 7 : s][1];
            for (int64_t n = 0; n < N; n++) for (int64_t k = 0; k < K; k++)
                P[off + (n / 16) * K * 16 + k * 16 + n % 16] = W[off + n * K + k];
            pack24(W + off, P24 + off, N, K);
            off += N * K;
        }
    if (argc > 1 && !strcmp(argv[1], "levels")) return levels(X, W, total, Y);
    if (argc > 1 && !strcmp(argv[1], "hugepages")) return hugepages(X, W, total, Y);
    if (argc > 1 && !strcmp(argv[1], "peak")) return peak();
    if (argc > 1 && !strcmp(argv[1], "prefetch")) return prefetch(X, W, total, Y);
    const fn fns[] = {read_only, kernel, tile_4x2, tile_2x4, tile_3x4, tile_4x3, tile_2x8, kblock, padded, panel16,
                      tile2x4_intrinsics, panel24, kernel_bf16};
    const char* names[] = {"read only", "kernel", "tile 4x2", "tile 2x4", "tile 3x4", "tile 4x3", "tile 2x8",
                           "K-blocked", "padded rows", "16-col panels", "2x4 intrinsics", "24-col panels", "bf16 weights"};
    const int nf = sizeof fns / sizeof fns[0];
    for (int f = 2; f < nf; f++) {  /* check each variant against the kernel on the first layer's products */
        if (fns[f] == kernel_bf16) continue;  /* other weights (rounded): checked in tests/test_cpu_linear.py */
        const float* base = fns[f] == panel16 ? P : fns[f] == panel24 ? P24 : W;
        double worst = 0;
        int64_t o = 0;
        for (int s = 0; s < 7; s++) {
            const int64_t N = shapes[s][0], K = shapes[s][1];
            kernel(X, W + o, N, K, R);
            fns[f](X, base + o, N, K, Y);
            for (int64_t i = 0; i < M * N; i++) worst = fmax(worst, fabs(Y[i] - R[i]) / (1e-3 + fabs(R[i])));
            o += N * K;
        }
        if (worst > 1e-3) { fprintf(stderr, "%s disagrees with the kernel (relative %g)\n", names[f], worst); return 1; }
    }
    printf("%s, %d threads, 85 products of 8 rows, %.0f MB of weights: GB/s of weights, best of 5\n",
           hot ? "hot (each product re-reads the first N x K weights; no head)" : "cold", omp_get_max_threads(), total * 4e-6);
    for (int round = 0; round < 3; round++) {
        for (int f = 0; f < nf; f++) {
            const float* base = fns[f] == panel16 ? P : fns[f] == panel24 ? P24 : W;
            const int half = fns[f] == kernel_bf16;  /* bf16: offsets in halves, half the bytes */
            double best = 1e9;
            for (int it = 0; it < 5; it++) {
                const double t0 = now();
                int64_t o = 0;
                for (int l = 0; l <= L; l++) {
                    for (int s = 0; s < (l == L ? 1 : 7) && !(hot && l == L); s++) {
                        const int64_t N = shapes[l == L ? 7 : s][0], K = shapes[l == L ? 7 : s][1];
                        if (hot) o = 0;  /* every product re-reads the first N x K weights (<= 6.3 MB); no head */
                        fns[f](X, half ? (const float*)(B + o) : base + o, N, K, Y);
                        o += N * K;
                    }
                }
                const double dt = now() - t0;
                best = dt < best ? dt : best;
            }
            const double bytes = (hot ? 12.0 * (total - (int64_t)V * H) / L * 4 : total * 4.0) / (half ? 2 : 1);
            printf("%s%-14s %6.1f", f ? "  " : "", names[f], bytes / best / 1e9);
            if (half) printf(" (%.1f ms; GB/s of bf16)", best * 1e3);
            if (f == 1) printf(" (%.1f ms)", best * 1e3);
            if (f % 5 == 4 || f == nf - 1) printf("\n");
        }
        printf("\n");
    }
    return 0;
}
