"""An ``F.linear`` for a few rows (up to 16) on CPU that reads each weight once: float32, or bfloat16 weights
summed in float32.

Greedy decoding multiplies one row per sequence by every weight matrix: at batch 8 that is an (8, K) x (K, N)
product, too thin for a BLAS. MKL (torch's fp32 BLAS) streams the weights of such a product at 4-7 GB/s on a
2-core AVX2 CPU (``benchmarks/RESULTS.md``), under half of what a one-row product reads there, and inductor's code
for it as a multiply-and-sum reduces one (row, output) pair at a time, bound by the add latency (~8 GB/s).

The kernel here (C, compiled with the system compiler for this CPU on first use and cached) keeps one vector
accumulator per input row in registers and loads each 8-float piece of a weight row once for up to 8 rows (more
rows: the row is reused from L1 by each group of 8), with a non-temporal prefetch 4 KB ahead so the streamed
weights do not push the input rows out of L1 (on Intel CPUs a T0 prefetch, which ran the 8-row products 1.7-2.2x
faster there); the output columns are split between the threads of torch's OpenMP
pool (it links the same ``libgomp``). Measured on the decode shapes of the ``100M`` preset, 2 AVX2 cores: 8 rows
8-15 GB/s against MKL's 4-7 (one row reads ~15 at best); beyond ~16 rows the product is compute-bound and MKL's
``W @ xᵀ`` is faster, so :data:`MAX_ROWS` is 16.

bfloat16 weights (with bf16 inputs) go through the same loop: each 8-weight piece is widened to float32 exactly
(a zero-extend and a shift, shared by all the rows), the sums are float32, the output is rounded to bf16 once. On a
CPU without bf16 arithmetic (AVX2) this reads half the bytes of the fp32 product, where torch's bf16 ``F.linear``
is emulated by oneDNN at a fraction of fp32's speed. On a CPU with AVX512-BF16 the bf16 loop uses its dot-product
instruction instead (32 weights by 32 inputs, float32 sums; :func:`forms`): on 2 Intel cores 1.5-2x the rate of
torch's bf16 ``F.linear`` at 1-8 rows. The bf16 entry takes the bf16 rows and writes the bf16 output itself (rounded
to nearest even, as torch rounds), so a call makes no conversions in torch (the widening form widens the rows in C).

:func:`small_batch_linear` is a ``torch.library`` op, ``torch.ops.llama_hf.small_batch_linear``, so a compiled
graph calls it as one opaque kernel; where the kernel cannot run (not fp32 or bf16, mixed dtypes, not CPU, more
than :data:`MAX_ROWS` rows, no C compiler, a failed build) it computes ``F.linear`` instead, so callers need no
fallback of their own. :func:`available` says whether the kernel is there. ``LLAMA_CPU_LINEAR=0`` turns it off.
:class:`SmallBatchLinear`, the ``nn.Linear`` the model's projections are, calls it for inference on a few rows,
so a plain ``generate()`` on CPU streams its steps' weights this way too.

:func:`packed_linear` (``torch.ops.llama_hf.packed_linear``) is the same product for bf16 weights that
:func:`pack_weight` has packed into blocks of 32 output columns with each k pair of the 32 side by side (N a
multiple of 32, K even): on a CPU with AVX512-BF16 one dot-product instruction then multiplies a 64-byte weight
piece by one input row's k pair, broadcast, into 16 column sums, with no sums across lanes at the end and a
4-byte load per instruction where the row form loads 64 bytes; each thread reads its blocks as one sequential
stream. On 2-core Zen 5 at 8 rows it ran the ``100M`` preset's step products 1.21-1.45x faster than the row form
and LLaMA-7B's 1.7-2.5x (``benchmarks/cpu_linear_packed.c``); at 1-2 rows the two are even
(``benchmarks/packed_rows.py``). Any number of rows (each group of 8 re-reads its block from cache).
:class:`FastDecoder` keeps packed copies for its bf16 steps (``packed_weights``); elsewhere the widening form runs
the same layout.

The ops' CPU implementations are C++ where a C++ compiler and torch's headers are there (a few lines of glue, built
once with the kernel and cached, :func:`native`): the decode step calls it 85 times per token, and the Python
implementation costs ~20 µs more per call (35 against 14 µs on 2 AVX2 cores, ~1.7 ms of a ~47 ms batch-8 step).
Where the glue cannot be built the op stays in Python; ``LLAMA_CPU_LINEAR=python`` keeps it there.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (`from .x import`: the form transformers follows to copy a model's files for trust_remote_code)
from .native_build import build as _build
from .native_build import (
    c_compilers,
    cpu_signature,
    cxx_compilers,
    define_op,
    disabled,
    drop_python_kernel,
    register_python_kernel,
    torch_flags,
)

__all__ = [
    "small_batch_linear",
    "packed_linear",
    "pack_weight",
    "unpack_weight",
    "packable",
    "SmallBatchLinear",
    "available",
    "eager_rows",
    "forms",
    "native",
    "library_path",
    "native_library_path",
    "MAX_ROWS",
    "ENV_VAR",
]

ENV_VAR = "LLAMA_CPU_LINEAR"  # 0: no kernel (F.linear); python: the op stays in Python
MAX_ROWS = 16  # beyond ~16 rows the products are compute-bound, and MKL's is faster

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));  /* 8 bf16 */
typedef uint32_t u32x8 __attribute__((vector_size(32)));
#define PREFETCH_BYTES 4096  /* ahead of the weight row being read */
/* The prefetch's hint: non-temporal (0) by default, the best of those measured on AMD Zen 3; T0 (3) on Intel,
   where the non-temporal one halved the 8-row products' rate (library_path() passes -DPREFETCH_HINT=3 there, and
   -DPREFETCH_ROW1=1: the one-row form prefetches too). */
#ifndef PREFETCH_HINT
#define PREFETCH_HINT 0
#endif
#ifndef PREFETCH_ROW1
#define PREFETCH_ROW1 0
#endif
#define PREFETCH(p) __builtin_prefetch((p), 0, PREFETCH_HINT)

static inline v8 ld(const float* p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline float hsum(v8 a) { float s = 0.f; for (int i = 0; i < 8; i++) s += a[i]; return s; }

/* bf16 -> fp32 is exact: the 16 bits become the high half of the float (a zero-extend and a shift) */
static inline v8 ld_bf16(const uint16_t* p) {
#ifdef __AVX2__
    return (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
#else
    u16x8 h; memcpy(&h, p, sizeof h);
    u32x8 u = __builtin_convertvector(h, u32x8) << 16;
    v8 v; memcpy(&v, &u, sizeof v); return v;
#endif
}
static inline float bf16_to_float(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
/* float32 -> bf16, rounded to nearest even as torch rounds (exact for values that are bf16 already) */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN: the one torch rounds NaNs to */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* y[0] = x . wr over K, one input row: four accumulators over k, so the adds do not wait on each other (software
   prefetch only with PREFETCH_ROW1: it did not help a single sequential stream on Zen 3, and did on Intel). */
#define DEFINE_ROW_1(NAME, WT, LOADW, SCALARW)                                                              \
static void NAME(const float* x, const WT* wr, int64_t K, float* y, int64_t ldy) {                          \
    (void)ldy;                                                                                              \
    const int64_t K32 = K & ~(int64_t)31;                                                                   \
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                              \
    for (int64_t k = 0; k < K32; k += 32) {                                                                 \
        if (PREFETCH_ROW1) PREFETCH(wr + k + PREFETCH_BYTES / sizeof(WT));                                  \
        a0 += LOADW(wr + k) * ld(x + k);                                                                    \
        a1 += LOADW(wr + k + 8) * ld(x + k + 8);                                                            \
        a2 += LOADW(wr + k + 16) * ld(x + k + 16);                                                          \
        a3 += LOADW(wr + k + 24) * ld(x + k + 24);                                                          \
    }                                                                                                       \
    float s = hsum((a0 + a1) + (a2 + a3));                                                                  \
    for (int64_t k = K32; k < K; k++) s += SCALARW(wr[k]) * x[k];                                           \
    y[0] = s;                                                                                               \
}

/* y[m * ldy] = x[m] . wr for MM input rows: one accumulator per row; each 8-element piece of the weight row is
   loaded once for all of them. */
#define DEFINE_ROW(NAME, MM, WT, LOADW, SCALARW)                                                            \
static void NAME(const float* x, const WT* wr, int64_t K, float* y, int64_t ldy) {                          \
    const int64_t K8 = K & ~(int64_t)7;                                                                     \
    v8 acc[MM];                                                                                             \
    _Pragma("GCC unroll 8")  /* (else gcc may zero the array in memory with rep stos, on every call) */       \
    for (int m = 0; m < MM; m++) acc[m] = (v8){0};                                                          \
    for (int64_t k = 0; k < K8; k += 8) {                                                                   \
        PREFETCH(wr + k + PREFETCH_BYTES / sizeof(WT));                                                     \
        v8 wv = LOADW(wr + k);                                                                              \
        for (int m = 0; m < MM; m++) acc[m] += wv * ld(x + m * K + k);                                      \
    }                                                                                                       \
    for (int m = 0; m < MM; m++) {                                                                          \
        float s = hsum(acc[m]);                                                                             \
        for (int64_t k = K8; k < K; k++) s += SCALARW(wr[k]) * x[m * K + k];                                \
        y[m * ldy] = s;                                                                                     \
    }                                                                                                       \
}

/* The same sums for two weight rows (y[m * ldy] and y[m * ldy + 1]), each added up in exactly the order of
   DEFINE_ROW, so either form gives the same bits. Each 8-element piece of the input rows is loaded once for both
   weight rows: long input rows do not stay in L1 (8 x 4,096 floats are 128 KB), and this halves what is read of
   them from L2. */
#define DEFINE_ROW2(NAME, MM, WT, LOADW, SCALARW)                                                           \
static void NAME(const float* x, const WT* wr, int64_t K, float* y, int64_t ldy) {                          \
    const int64_t K8 = K & ~(int64_t)7;                                                                     \
    const WT* wr1 = wr + K;                                                                                 \
    v8 acc0[MM], acc1[MM];                                                                                  \
    _Pragma("GCC unroll 8")                                                                                 \
    for (int m = 0; m < MM; m++) acc0[m] = acc1[m] = (v8){0};                                               \
    for (int64_t k = 0; k < K8; k += 8) {                                                                   \
        PREFETCH(wr + k + PREFETCH_BYTES / sizeof(WT));                                                     \
        PREFETCH(wr1 + k + PREFETCH_BYTES / sizeof(WT));                                                    \
        const v8 w0 = LOADW(wr + k), w1 = LOADW(wr1 + k);                                                   \
        for (int m = 0; m < MM; m++) {                                                                      \
            const v8 xv = ld(x + m * K + k);                                                                \
            acc0[m] += w0 * xv;                                                                             \
            acc1[m] += w1 * xv;                                                                             \
        }                                                                                                   \
    }                                                                                                       \
    for (int m = 0; m < MM; m++) {                                                                          \
        float s0 = hsum(acc0[m]), s1 = hsum(acc1[m]);                                                       \
        for (int64_t k = K8; k < K; k++) s0 += SCALARW(wr[k]) * x[m * K + k];                               \
        for (int64_t k = K8; k < K; k++) s1 += SCALARW(wr1[k]) * x[m * K + k];                              \
        y[m * ldy] = s0;                                                                                    \
        y[m * ldy + 1] = s1;                                                                                \
    }                                                                                                       \
}

#define SCALAR_F32(v) (v)
DEFINE_ROW_1(f32_1, float, ld, SCALAR_F32)
DEFINE_ROW(f32_2, 2, float, ld, SCALAR_F32) DEFINE_ROW(f32_3, 3, float, ld, SCALAR_F32)
DEFINE_ROW(f32_4, 4, float, ld, SCALAR_F32) DEFINE_ROW(f32_5, 5, float, ld, SCALAR_F32)
DEFINE_ROW(f32_6, 6, float, ld, SCALAR_F32) DEFINE_ROW(f32_7, 7, float, ld, SCALAR_F32)
DEFINE_ROW(f32_8, 8, float, ld, SCALAR_F32)
DEFINE_ROW_1(bf16_1, uint16_t, ld_bf16, bf16_to_float)
DEFINE_ROW(bf16_2, 2, uint16_t, ld_bf16, bf16_to_float) DEFINE_ROW(bf16_3, 3, uint16_t, ld_bf16, bf16_to_float)
DEFINE_ROW(bf16_4, 4, uint16_t, ld_bf16, bf16_to_float) DEFINE_ROW(bf16_5, 5, uint16_t, ld_bf16, bf16_to_float)
DEFINE_ROW(bf16_6, 6, uint16_t, ld_bf16, bf16_to_float) DEFINE_ROW(bf16_7, 7, uint16_t, ld_bf16, bf16_to_float)
DEFINE_ROW(bf16_8, 8, uint16_t, ld_bf16, bf16_to_float)

DEFINE_ROW2(f32x2_2, 2, float, ld, SCALAR_F32) DEFINE_ROW2(f32x2_3, 3, float, ld, SCALAR_F32)
DEFINE_ROW2(f32x2_4, 4, float, ld, SCALAR_F32) DEFINE_ROW2(f32x2_5, 5, float, ld, SCALAR_F32)
DEFINE_ROW2(f32x2_6, 6, float, ld, SCALAR_F32) DEFINE_ROW2(f32x2_7, 7, float, ld, SCALAR_F32)
DEFINE_ROW2(f32x2_8, 8, float, ld, SCALAR_F32)
DEFINE_ROW2(bf16x2_2, 2, uint16_t, ld_bf16, bf16_to_float) DEFINE_ROW2(bf16x2_3, 3, uint16_t, ld_bf16, bf16_to_float)
DEFINE_ROW2(bf16x2_4, 4, uint16_t, ld_bf16, bf16_to_float) DEFINE_ROW2(bf16x2_5, 5, uint16_t, ld_bf16, bf16_to_float)
DEFINE_ROW2(bf16x2_6, 6, uint16_t, ld_bf16, bf16_to_float) DEFINE_ROW2(bf16x2_7, 7, uint16_t, ld_bf16, bf16_to_float)
DEFINE_ROW2(bf16x2_8, 8, uint16_t, ld_bf16, bf16_to_float)

typedef void (*f32_fn)(const float*, const float*, int64_t, float*, int64_t);
typedef void (*bf16_fn)(const float*, const uint16_t*, int64_t, float*, int64_t);
static const f32_fn F32[9] = {0, f32_1, f32_2, f32_3, f32_4, f32_5, f32_6, f32_7, f32_8};
static const bf16_fn BF16[9] = {0, bf16_1, bf16_2, bf16_3, bf16_4, bf16_5, bf16_6, bf16_7, bf16_8};
/* two weight rows at a time (one row takes DEFINE_ROW_1's form, whose sums are ordered differently: not used) */
static const f32_fn F32X2[9] = {0, 0, f32x2_2, f32x2_3, f32x2_4, f32x2_5, f32x2_6, f32x2_7, f32x2_8};
static const bf16_fn BF16X2[9] = {0, 0, bf16x2_2, bf16x2_3, bf16x2_4, bf16x2_5, bf16x2_6, bf16x2_7, bf16x2_8};
/* Two weight rows at a time from K = 4,096 on: on Zen 3, 8 rows of LLaMA-7B's products 1.10-1.22x, 2 rows
   1.04-1.19x; at K = 2,048 (the 100M preset's down projection) 0.93-1.03x, so the one-row form stays there. */
#ifndef PAIR_MIN_K  /* (benchmarks/cpu_linear_pairs.py builds it with others) */
#define PAIR_MIN_K 4096
#endif

/* y (M, N) = x (M, K) @ w (N, K)^T, all row-major and contiguous, x and y float32, w float32 or bfloat16,
   accumulated in float32 (the bf16 entry, llama_small_batch_linear_bf16 below, takes bf16 rows and writes bf16
   outputs; where it widens, through this loop). The output columns (weight rows) are split between the threads;
   each weight row is read from memory once and, for M > 8, reused from L1 by every group of 8 input rows. Return
   0, or -1 for M < 1. */
#define DEFINE_ENTRY(NAME, WT, TABLE, TABLE2)                                                               \
int NAME(const float* x, int64_t M, const WT* w, int64_t N, int64_t K, float* y) {                          \
    if (M < 1) return -1;                                                                                   \
    _Pragma("omp parallel")                                                                                 \
    {                                                                                                       \
        COLUMNS(N, n0, n1);                                                                                 \
        for (int64_t n = n0; n < n1;) {                                                                     \
            const int pair = n + 1 < n1;                                                                    \
            for (int64_t m = 0; m < M; m += 8) {                                                            \
                const int64_t rows = M - m < 8 ? M - m : 8;                                                 \
                if (pair && rows > 1 && K >= PAIR_MIN_K)                                                  \
                    TABLE2[rows](x + m * K, w + n * K, K, y + m * N + n, N);                                \
                else                                                                                        \
                    for (int64_t j = 0; j < 1 + pair; j++)                                                  \
                        TABLE[rows](x + m * K, w + (n + j) * K, K, y + m * N + n + j, N);                   \
            }                                                                                               \
            n += 1 + pair;                                                                                  \
        }                                                                                                   \
    }                                                                                                       \
    return 0;                                                                                               \
}
#ifdef _OPENMP
#define THREADS(nt, t) (nt = omp_get_num_threads(), t = omp_get_thread_num())
#else
#define THREADS(nt, t) ((void)0)
#endif
/* this thread's share [n0, n1) of the N output columns, inside a parallel region (built without OpenMP: all) */
#define COLUMNS(N, n0, n1)                                                                                  \
    int64_t nt = 1, t = 0;                                                                                  \
    THREADS(nt, t);                                                                                         \
    const int64_t per = (N + nt - 1) / nt, n0 = t * per, n1 = n0 + per < N ? n0 + per : N
DEFINE_ENTRY(llama_small_batch_linear, float, F32, F32X2)
/* the calling thread's scratch memory for the widened rows and the float32 outputs, kept between calls (aligned to
   the cache line): allocating and freeing ~0.2 MB on every call made the 16-row products 0.87x as fast */
static __thread float* scratch_buf;
static __thread size_t scratch_len;
__attribute__((unused)) static float* scratch(size_t n) {
    if (n > scratch_len) {
        free(scratch_buf);
        void* p = NULL;
        scratch_buf = posix_memalign(&p, 64, n * sizeof(float)) == 0 ? (float*)p : NULL;
        scratch_len = scratch_buf ? n : 0;
    }
    return scratch_buf;
}
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
/* bf16 weights on a CPU with bf16 dot products (AVX512-BF16: Intel Cooper Lake, Sapphire Rapids and later; AMD Zen
   4 and later): vdpbf16ps multiplies 32 bf16 weights by 32 bf16 inputs and adds each pair of products into one of
   16 float32 sums, a quarter of the instructions of widening each weight to float32 (which ran at ~10 GB/s of
   weights at 8 rows on 2 Intel cores, compute-bound). The input rows are bf16 as the op hands them over. The
   products are exact in float32; the sums are float32 (rounded to nearest even, subnormals
   flushed to zero, as the instruction does), added in another order than the widening form's. */
#define BF16_DOT 1
static inline __m512bh ld_bh(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
static inline __m512bh ld_bh_tail(const uint16_t* p, int64_t left) {  /* the K tail (left < 32), zero-filled */
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1u << left) - 1u), p);
}
/* y[m * ldy] = x[m] . wr for MM bf16 input rows, rounded to bf16; each 32-weight piece loaded once for all of them.
   One row: two sums alternate, so consecutive dot products do not wait on each other. */
#define DEFINE_DOT(NAME, MM)                                                                                \
static void NAME(const uint16_t* x, const uint16_t* wr, int64_t K, uint16_t* y, int64_t ldy) {              \
    __m512 acc[MM], acc1 = _mm512_setzero_ps();                                                             \
    _Pragma("GCC unroll 8")  /* (else gcc zeroes the array in memory with rep stos: ~5% of an 8-row product) */ \
    for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();                                              \
    const int64_t K32 = K & ~(int64_t)31;                                                                   \
    int64_t k = 0;                                                                                          \
    if (MM == 1)                                                                                            \
        for (; k + 64 <= K32; k += 64) {                                                                    \
            PREFETCH(wr + k + PREFETCH_BYTES / 2);                                                          \
            PREFETCH(wr + k + 32 + PREFETCH_BYTES / 2);                                                     \
            acc[0] = _mm512_dpbf16_ps(acc[0], ld_bh(x + k), ld_bh(wr + k));                                 \
            acc1 = _mm512_dpbf16_ps(acc1, ld_bh(x + k + 32), ld_bh(wr + k + 32));                           \
        }                                                                                                   \
    for (; k < K32; k += 32) {                                                                              \
        PREFETCH(wr + k + PREFETCH_BYTES / 2);                                                              \
        const __m512bh wv = ld_bh(wr + k);                                                                  \
        _Pragma("GCC unroll 8")                                                                             \
        for (int m = 0; m < MM; m++) acc[m] = _mm512_dpbf16_ps(acc[m], ld_bh(x + m * K + k), wv);           \
    }                                                                                                       \
    if (k < K) {                                                                                            \
        const __m512bh wv = ld_bh_tail(wr + k, K - k);                                                      \
        _Pragma("GCC unroll 8")                                                                             \
        for (int m = 0; m < MM; m++) acc[m] = _mm512_dpbf16_ps(acc[m], ld_bh_tail(x + m * K + k, K - k), wv);\
    }                                                                                                       \
    acc[0] = _mm512_add_ps(acc[0], acc1);                                                                   \
    _Pragma("GCC unroll 8")                                                                                 \
    for (int m = 0; m < MM; m++) y[m * ldy] = float_to_bf16(_mm512_reduce_add_ps(acc[m]));                  \
}
/* the same for two weight rows wr, wr1 (outputs y[m * ldy], y[m * ldy + 1]): each piece of the input rows loaded
   once for both, 2 * MM sums; each output's sums in the same order as DEFINE_DOT's for MM > 1 */
#define DEFINE_DOT2(NAME, MM)                                                                               \
static void NAME(const uint16_t* x, const uint16_t* wr, int64_t K, uint16_t* y, int64_t ldy) {              \
    const uint16_t* wr1 = wr + K;                                                                           \
    __m512 acc[MM], acc1[MM];                                                                               \
    _Pragma("GCC unroll 8")                                                                                 \
    for (int m = 0; m < MM; m++) acc[m] = acc1[m] = _mm512_setzero_ps();                                    \
    const int64_t K32 = K & ~(int64_t)31;                                                                   \
    int64_t k = 0;                                                                                          \
    for (; k < K32; k += 32) {                                                                              \
        PREFETCH(wr + k + PREFETCH_BYTES / 2);                                                              \
        PREFETCH(wr1 + k + PREFETCH_BYTES / 2);                                                             \
        const __m512bh wv = ld_bh(wr + k), wv1 = ld_bh(wr1 + k);                                            \
        _Pragma("GCC unroll 8")                                                                             \
        for (int m = 0; m < MM; m++) {                                                                      \
            const __m512bh xv = ld_bh(x + m * K + k);                                                       \
            acc[m] = _mm512_dpbf16_ps(acc[m], xv, wv);                                                      \
            acc1[m] = _mm512_dpbf16_ps(acc1[m], xv, wv1);                                                   \
        }                                                                                                   \
    }                                                                                                       \
    if (k < K) {                                                                                            \
        const __m512bh wv = ld_bh_tail(wr + k, K - k), wv1 = ld_bh_tail(wr1 + k, K - k);                   \
        _Pragma("GCC unroll 8")                                                                             \
        for (int m = 0; m < MM; m++) {                                                                      \
            const __m512bh xv = ld_bh_tail(x + m * K + k, K - k);                                           \
            acc[m] = _mm512_dpbf16_ps(acc[m], xv, wv);                                                      \
            acc1[m] = _mm512_dpbf16_ps(acc1[m], xv, wv1);                                                   \
        }                                                                                                   \
    }                                                                                                       \
    _Pragma("GCC unroll 8")                                                                                 \
    for (int m = 0; m < MM; m++) {                                                                          \
        y[m * ldy] = float_to_bf16(_mm512_reduce_add_ps(acc[m]));                                           \
        y[m * ldy + 1] = float_to_bf16(_mm512_reduce_add_ps(acc1[m]));                                      \
    }                                                                                                       \
}
DEFINE_DOT(dot_1, 1) DEFINE_DOT(dot_2, 2) DEFINE_DOT(dot_3, 3) DEFINE_DOT(dot_4, 4)
DEFINE_DOT(dot_5, 5) DEFINE_DOT(dot_6, 6) DEFINE_DOT(dot_7, 7) DEFINE_DOT(dot_8, 8)
DEFINE_DOT2(dot2_8, 8)
typedef void (*dot_fn)(const uint16_t*, const uint16_t*, int64_t, uint16_t*, int64_t);
static const dot_fn DOT[9] = {0, dot_1, dot_2, dot_3, dot_4, dot_5, dot_6, dot_7, dot_8};

int llama_small_batch_linear_bf16(const uint16_t* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, uint16_t* y) {
    if (M < 1) return -1;
    _Pragma("omp parallel")
    {
        COLUMNS(N, n0, n1);
        for (int64_t n = n0; n < n1;) {
            /* groups of 8 rows take two weight rows at a time from K = PAIR_MIN_K on: there the 8 input rows
               outgrow L1 (8 bf16 rows of 4,096: 64 KB) and each pass reads them from L2 once for two weight rows
               (2-core Zen 5, LLaMA-7B's products, four runs: 1.14-1.28x at 8 rows, 1.21-1.40x at 16; with fewer
               rows, which fit L1, 0.82-1.16x, and at the 100M preset's K = 2,048 0.62-0.75x at 8 rows) */
            const int pair = n + 1 < n1 && K >= PAIR_MIN_K;
            for (int64_t m = 0; m < M; m += 8) {
                const int64_t rows = M - m < 8 ? M - m : 8;
                if (pair && rows == 8)
                    dot2_8(x + m * K, w + n * K, K, y + m * N + n, N);
                else
                    for (int64_t j = 0; j < 1 + pair; j++)
                        DOT[rows](x + m * K, w + (n + j) * K, K, y + m * N + n + j, N);
            }
            n += 1 + pair;
        }
    }
    return 0;
}
#else
#define BF16_DOT 0
/* the widening loop: the rows widened to float32 first (exact), float32 sums, rounded to bf16 once */
static DEFINE_ENTRY(small_batch_linear_bf16_f32, uint16_t, BF16, BF16X2)
int llama_small_batch_linear_bf16(const uint16_t* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, uint16_t* y) {
    if (M < 1) return -1;
    float* xf = scratch((size_t)(M * K + M * N));
    if (!xf) return -2;
    float* yf = xf + M * K;
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(x[i]);
    const int rc = small_batch_linear_bf16_f32(xf, M, w, N, K, yf);
    _Pragma("omp parallel for if (M * N >= 65536)")
    for (int64_t i = 0; i < M * N; i++) y[i] = float_to_bf16(yf[i]);
    return rc;
}
#endif
/* Packed bf16 weights: w (N, K) stored as P[N / 32][K / 2][32][2] (P[b][j][c][t] = w[32 b + c][2 j + t]: blocks of
   32 output columns, each k pair of the 32 columns side by side; N a multiple of 32, K even). A 128-byte piece of a
   block holds a k pair of all its 32 columns, so a product needs no sums across lanes: the dot-product form
   multiplies each 64-byte half by one input row's k pair, broadcast (4 bytes), adding into 16 column sums; 16 sums
   for 8 rows. Per instruction it loads a broadcast and a sixteenth of a weight piece, where the row form loads a
   64-byte input piece and an eighth, then reduces each sum at the row's end, and each thread reads its blocks as
   one sequential stream (benchmarks/cpu_linear_packed.c: on 2-core Zen 5 at 8 rows 1.21-1.45x the row form's rate
   on the 100M preset's step, 1.7-2.5x on LLaMA-7B's products; a layout of 16-column blocks, read two at a time,
   measured 1.03-1.18x and 1.65-2.12x in the same runs). Rows beyond 8 reuse the block from L1/L2. */
#if BF16_DOT
#define DEFINE_PACKED(NAME, MM)                                                                             \
static void NAME(const uint16_t* x, int64_t K, const uint16_t* pa, int prefetch, uint16_t* y, int64_t ldy) {  \
    __m512 a[MM], b[MM];                                                                                    \
    _Pragma("GCC unroll 8")                                                                                 \
    for (int m = 0; m < MM; m++) a[m] = b[m] = _mm512_setzero_ps();                                         \
    const int64_t KP = K / 2;                                                                               \
    for (int64_t j = 0; j < KP; j++) {                                                                      \
        if (prefetch) {  /* (the first group of rows: later ones find the block in cache) */               \
            PREFETCH(pa + j * 64 + PREFETCH_BYTES / 2);                                                     \
            PREFETCH(pa + j * 64 + 32 + PREFETCH_BYTES / 2);                                                \
        }                                                                                                   \
        const __m512bh wa = ld_bh(pa + j * 64), wb = ld_bh(pa + j * 64 + 32);                               \
        _Pragma("GCC unroll 8")                                                                             \
        for (int m = 0; m < MM; m++) {                                                                      \
            uint32_t v;                                                                                     \
            memcpy(&v, x + m * K + 2 * j, 4);                                                               \
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)v);                                        \
            a[m] = _mm512_dpbf16_ps(a[m], xb, wa);                                                          \
            b[m] = _mm512_dpbf16_ps(b[m], xb, wb);                                                          \
        }                                                                                                   \
    }                                                                                                       \
    _Pragma("GCC unroll 8")                                                                                 \
    for (int m = 0; m < MM; m++) {                                                                          \
        _mm256_storeu_si256((__m256i*)(y + m * ldy), (__m256i)_mm512_cvtneps_pbh(a[m]));                    \
        _mm256_storeu_si256((__m256i*)(y + m * ldy + 16), (__m256i)_mm512_cvtneps_pbh(b[m]));               \
    }                                                                                                       \
}
DEFINE_PACKED(packed_1, 1) DEFINE_PACKED(packed_2, 2) DEFINE_PACKED(packed_3, 3) DEFINE_PACKED(packed_4, 4)
DEFINE_PACKED(packed_5, 5) DEFINE_PACKED(packed_6, 6) DEFINE_PACKED(packed_7, 7) DEFINE_PACKED(packed_8, 8)
typedef void (*packed_fn)(const uint16_t*, int64_t, const uint16_t*, int, uint16_t*, int64_t);
static const packed_fn PACKED[9] = {0, packed_1, packed_2, packed_3, packed_4, packed_5, packed_6, packed_7, packed_8};
#else
/* Without bf16 dot products: each 32-bit lane of a piece holds one column's k pair; its two bf16 halves widen to
   float32 exactly (a shift, a mask) and are multiplied by the row's two (widened) inputs, broadcast. Half a block
   (16 columns: pa, each k pair 64 elements on), 4 rows at a time (8 + 4 vector registers). */
#define DEFINE_PACKED_W(NAME, MM)                                                                           \
static void NAME(const float* x, int64_t K, const uint16_t* pa, float* y, int64_t ldy) {                    \
    v8 lo[MM], hi[MM];                                                                                      \
    _Pragma("GCC unroll 4")                                                                                 \
    for (int m = 0; m < MM; m++) lo[m] = hi[m] = (v8){0};                                                   \
    const int64_t KP = K / 2;                                                                               \
    for (int64_t j = 0; j < KP; j++) {                                                                      \
        PREFETCH(pa + j * 64 + PREFETCH_BYTES / 2);                                                         \
        u32x8 w0, w1;                                                                                       \
        memcpy(&w0, pa + j * 64, 32);                                                                       \
        memcpy(&w1, pa + j * 64 + 16, 32);                                                                  \
        const u32x8 e0 = w0 << 16, o0 = w0 & 0xffff0000u, e1 = w1 << 16, o1 = w1 & 0xffff0000u;            \
        v8 fe0, fo0, fe1, fo1;                                                                              \
        memcpy(&fe0, &e0, 32); memcpy(&fo0, &o0, 32); memcpy(&fe1, &e1, 32); memcpy(&fo1, &o1, 32);         \
        _Pragma("GCC unroll 4")                                                                             \
        for (int m = 0; m < MM; m++) {                                                                      \
            const float xe = x[m * K + 2 * j], xo = x[m * K + 2 * j + 1];                                   \
            lo[m] += fe0 * xe;                                                                              \
            lo[m] += fo0 * xo;                                                                              \
            hi[m] += fe1 * xe;                                                                              \
            hi[m] += fo1 * xo;                                                                              \
        }                                                                                                   \
    }                                                                                                       \
    for (int m = 0; m < MM; m++) {                                                                          \
        memcpy(y + m * ldy, &lo[m], 32);                                                                    \
        memcpy(y + m * ldy + 8, &hi[m], 32);                                                                \
    }                                                                                                       \
}
DEFINE_PACKED_W(packed_w1, 1) DEFINE_PACKED_W(packed_w2, 2) DEFINE_PACKED_W(packed_w3, 3)
DEFINE_PACKED_W(packed_w4, 4)
typedef void (*packed_w_fn)(const float*, int64_t, const uint16_t*, float*, int64_t);
static const packed_w_fn PACKED_W[5] = {0, packed_w1, packed_w2, packed_w3, packed_w4};
#endif

/* y (M, N) = x (M, K) @ w^T for bf16 rows x and w packed as above (p), bf16 outputs (the float32 sums rounded to
   nearest even once); the column blocks are split between the threads. Return 0; -1 for M < 1; -2 where the
   widening form finds no memory for its float32 rows; -3 where N is not a multiple of 32 or K is odd. */
int llama_packed_linear_bf16(const uint16_t* x, int64_t M, const uint16_t* p, int64_t N, int64_t K, uint16_t* y) {
    if (M < 1) return -1;
    if (N % 32 || K % 2 || N < 32 || K < 2) return -3;
    const int64_t blocks = N / 32, block = K * 32;  /* a block's elements */
#if BF16_DOT
    _Pragma("omp parallel")
    {
        COLUMNS(blocks, b0, b1);
        for (int64_t b = b0; b < b1; b++)
            for (int64_t m = 0; m < M; m += 8) {
                const int64_t rows = M - m < 8 ? M - m : 8;
                PACKED[rows](x + m * K, K, p + b * block, m == 0, y + m * N + 32 * b, N);
            }
    }
    return 0;
#else
    float* xf = scratch((size_t)(M * K + M * N));
    if (!xf) return -2;
    float* yf = xf + M * K;
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_float(x[i]);
    _Pragma("omp parallel")
    {
        COLUMNS(2 * blocks, h0, h1);  /* half blocks */
        for (int64_t h = h0; h < h1; h++)
            for (int64_t m = 0; m < M; m += 4) {
                const int64_t rows = M - m < 4 ? M - m : 4;
                PACKED_W[rows](xf + m * K, K, p + (h / 2) * block + (h % 2) * 32, yf + m * N + 16 * h, N);
            }
    }
    _Pragma("omp parallel for if (M * N >= 65536)")
    for (int64_t i = 0; i < M * N; i++) y[i] = float_to_bf16(yf[i]);
    return 0;
#endif
}
/* 1: the bf16 entry's rows and output are bf16 (before 2026-12-01 they were float32) */
int llama_small_batch_linear_bf16_io(void) { return 1; }
/* which forms this build has: bit 0, bf16 dot products; bit 1, the T0 prefetch hint; bit 2, packed weights */
int llama_small_batch_linear_forms(void) { return BF16_DOT | (PREFETCH_HINT == 3) << 1 | 1 << 2; }
"""
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_FLAGS_NO_OPENMP = [f for f in _FLAGS if f != "-fopenmp"]  # a compiler without OpenMP: one thread

# The op's CPU implementation in C++ (what _small_batch_linear below does in Python, with the same checks and the
# same F.linear fallback); the kernel's two entry points are handed over by address after loading.
_NATIVE_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>
#include <vector>

typedef int (*f32_fn)(const float*, int64_t, const float*, int64_t, int64_t, float*);
typedef int (*bf16_fn)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, uint16_t*);
static f32_fn kernel_f32 = nullptr;
static bf16_fn kernel_bf16 = nullptr;
static bf16_fn kernel_packed = nullptr;  // the same signature, the weight packed

extern "C" void llama_hf_set_kernels(void* f32, void* bf16, void* packed) {
    kernel_f32 = (f32_fn)f32;
    kernel_bf16 = (bf16_fn)bf16;
    kernel_packed = (bf16_fn)packed;
}

static at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& w) {
    const auto dt = w.scalar_type();
    const int64_t K = x.dim() ? x.size(-1) : 0, rows = K ? x.numel() / K : 0;
    const bool ok = x.scalar_type() == dt && ((dt == at::kFloat && kernel_f32) || (dt == at::kBFloat16 && kernel_bf16))
        && rows >= 1 && rows <= MAX_ROWS && x.device().is_cpu() && w.device().is_cpu() && w.dim() == 2
        && w.size(1) == K;
    if (!ok) return at::linear(x, w);
    const at::Tensor wc = w.contiguous(), xc = x.contiguous();  // (N, K), (M, K)
    std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
    sizes.back() = w.size(0);
    at::Tensor y = at::empty(sizes, x.options());  // (..., N): written as (M, N), in x's dtype
    // bf16: bf16 rows in, the float32 sums rounded to bf16 once (to nearest even) by the kernel
    const int rc = dt == at::kFloat
        ? kernel_f32(xc.const_data_ptr<float>(), rows, wc.const_data_ptr<float>(), w.size(0), K, y.data_ptr<float>())
        : kernel_bf16(static_cast<const uint16_t*>(xc.const_data_ptr()), rows,
                      static_cast<const uint16_t*>(wc.const_data_ptr()), w.size(0), K,
                      static_cast<uint16_t*>(y.data_ptr()));
    if (rc != 0) return at::linear(x, w);  // -2: no memory for the widened rows
    return y;
}

// packed (N / 32, K / 2, 32, 2) -> the weight (N, K) it holds
static at::Tensor unpacked(const at::Tensor& p) {
    return p.permute({0, 2, 1, 3}).reshape({p.size(0) * 32, p.size(1) * 2});
}

static at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& p) {
    TORCH_CHECK(p.dim() == 4 && p.size(2) == 32 && p.size(3) == 2,
                "packed_linear: the weight must be packed as (N / 32, K / 2, 32, 2) (cpu_linear.pack_weight), got ",
                p.sizes());
    const int64_t K = x.dim() ? x.size(-1) : 0, rows = K ? x.numel() / K : 0, N = p.size(0) * 32;
    const bool ok = kernel_packed && x.scalar_type() == at::kBFloat16 && p.scalar_type() == at::kBFloat16
        && rows >= 1 && x.device().is_cpu() && p.device().is_cpu() && p.size(1) * 2 == K && N >= 32;
    if (!ok) return at::linear(x, unpacked(p));
    const at::Tensor pc = p.contiguous(), xc = x.contiguous();
    std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
    sizes.back() = N;
    at::Tensor y = at::empty(sizes, x.options());  // (..., N): written as (M, N)
    const int rc = kernel_packed(static_cast<const uint16_t*>(xc.const_data_ptr()), rows,
                                 static_cast<const uint16_t*>(pc.const_data_ptr()), N, K,
                                 static_cast<uint16_t*>(y.data_ptr()));
    if (rc != 0) return at::linear(x, unpacked(p));  // -2: no memory for the widened rows
    return y;
}

TORCH_LIBRARY_IMPL(llama_hf, CPU, m) {
    m.impl("small_batch_linear", small_batch_linear);
    m.impl("packed_linear", packed_linear);
}
"""


def library_path() -> Path | None:
    """The compiled kernel (a shared object), built on first use with ``$CC``/``cc``/``gcc``/``clang`` and cached
    under ``$XDG_CACHE_HOME/llama-hf`` (the temp directory if that is not writable); ``None`` where no compiler is
    found or the build fails."""
    return _build_kernel("llama_small_batch_linear", _SOURCE)


def _build_kernel(stem: str, source: str, defines: tuple = ()) -> Path | None:
    """``source`` (this module's kernel, or another version of it: the kernel benchmarks' ``--against``) built as
    :func:`library_path` builds it, with this CPU vendor's defines and any ``defines`` more."""
    tuned = [*_vendor_defines(), *defines]
    return _build(stem, source, ".c", c_compilers(), [_FLAGS + tuned, _FLAGS_NO_OPENMP + tuned])


@functools.cache
def _intel() -> bool:
    return "GenuineIntel" in cpu_signature()


def _vendor_defines() -> list[str]:
    """The prefetch form measured best on this CPU's vendor: on Intel (a 2-core Xeon with AVX-512, 2026-12-01) the
    T0 hint, with the one-row form prefetching too (8 rows: 8.5 -> 16-18 GB/s of fp32 weights; one row 17-18 ->
    20); elsewhere the non-temporal hint, the best of those measured on AMD Zen 3 (on Zen 5 T0 measured 0.97-1.05x
    its speed, T1 0.81-1.07x: ``benchmarks/cpu_linear_pairs.py --prefetch``, ``benchmarks/RESULTS.md``)."""
    return ["-DPREFETCH_HINT=3", "-DPREFETCH_ROW1=1"] if _intel() else []


@functools.cache
def forms() -> dict:
    """What this machine's build of the kernel does (empty where there is none): ``bf16_dot``, bf16 weights
    multiplied by the CPU's bf16 dot-product instruction (AVX512-BF16) rather than widened to float32 for FMAs;
    ``prefetch``, the hint of its software prefetch (``"t0"`` on Intel, ``"nta"`` elsewhere); ``packed``, the
    product with bf16 weights packed by :func:`pack_weight` (:func:`packed_linear`; every build has it, in the
    dot-product form where ``bf16_dot``)."""
    if not _kernels():  # (off, not built, or not loadable: no forms)
        return {}
    try:
        bits = ctypes.CDLL(str(library_path())).llama_small_batch_linear_forms()
    except (OSError, AttributeError):
        return {}
    return {"bf16_dot": bool(bits & 1), "prefetch": "t0" if bits & 2 else "nta", "packed": bool(bits & 4)}


@functools.cache
def eager_rows(dtype: torch.dtype = torch.float32) -> range:
    """The row counts for which :class:`SmallBatchLinear`'s eager forward takes the kernel for weights of ``dtype``
    (empty where it has none). All of 1 .. :data:`MAX_ROWS`, except float32 on Intel CPUs, where MKL's own
    products of 1-3 and of 13-16 rows were as fast or faster (2-core Xeon with AVX-512, ``100M`` and LLaMA-7B layer
    shapes: the kernel took 1.09-1.22x MKL's time at 1 row, 0.99-1.08x at 2-3, 0.43-0.79x at 4-12, 1.01-1.26x at
    16; ``benchmarks/RESULTS.md``)."""
    if not available(dtype):
        return range(0)
    if dtype == torch.float32 and _intel():
        return range(4, 13)
    return range(1, MAX_ROWS + 1)


def native_library_path(build: bool = True) -> Path | None:
    """The op's C++ implementation (a shared object linked against this torch), built on first use with
    ``$CXX``/``c++``/``g++``/``clang++`` and cached like :func:`library_path` (per torch version); ``None`` where
    no C++ compiler or no torch headers are found or the build fails (the op then stays in Python), and with
    ``build=False`` where it has not been built yet."""
    return _build_glue("llama_hf_ops", _NATIVE_SOURCE, build)


def _build_glue(stem: str, source: str, build: bool = True) -> Path | None:
    """``source`` (the op's C++ implementation, or another version of it) built as :func:`native_library_path`
    builds it."""
    flags = torch_flags()
    if flags is None:
        return None
    common = ["-O2", "-shared", "-fPIC", "-w", f"-DMAX_ROWS={MAX_ROWS}", *flags]
    flag_sets = [["-std=c++20", *common], ["-std=c++17", *common]]
    key = (torch.__version__,)
    return _build(stem, source, ".cpp", cxx_compilers(), flag_sets, key, cached_only=not build)


# the entry points by weight dtype, and "packed": bf16 weights packed by pack_weight
_ENTRIES = {
    torch.float32: "llama_small_batch_linear",
    torch.bfloat16: "llama_small_batch_linear_bf16",
    "packed": "llama_packed_linear_bf16",
}
_native = False  # whether the op's CPU implementation is the C++ one


@functools.cache
def _kernels() -> dict:
    """The compiled entry points by weight dtype, and ``"packed"`` (empty where the kernel is off or could not be
    built; the first call builds it, ~1.5 s once per machine); on the first call, also moves the ops' CPU
    implementations to C++ where that is already built (:func:`native` builds it)."""
    if disabled(ENV_VAR):
        return {}
    path = library_path()
    if path is None:
        return {}
    kernels = {}
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    try:
        lib = ctypes.CDLL(str(path))
        for key, name in _ENTRIES.items():
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ptr, i64, ptr, i64, i64, ptr]  # x, M, w, N, K, y
            kernels[key] = fn
    except (OSError, AttributeError):
        return {}
    _load_native(kernels, build=False)
    return kernels


def _load_native(kernels: dict, build: bool) -> None:
    """Replace the op's Python CPU implementation by the C++ one (with ``build``, built if need be: ~12-15 s, once
    per machine and torch version); on any failure, or where it is not built and ``build`` is false, the Python
    one stays."""
    global _native
    if _native or not kernels or os.environ.get(ENV_VAR, "").strip().lower() == "python":
        return
    path = native_library_path(build=build)
    if path is None:
        return
    # Unregister the Python kernels (this copy's or another copy's of this module): loading the library registers
    # the C++ ones for CPU.
    for op in _OPS:
        drop_python_kernel(op)
    try:
        torch.ops.load_library(str(path))
        ctypes.CDLL(str(path)).llama_hf_set_kernels(
            *(ctypes.c_void_p(ctypes.cast(kernels[key], ctypes.c_void_p).value) for key in _ENTRIES)
        )
    except (OSError, AttributeError, RuntimeError):
        for op, fn in _OPS.items():
            register_python_kernel(op, fn)  # (where none is registered)
        return
    _native = True


def native() -> bool:
    """Move the op's CPU implementation to the C++ glue (building it once per machine and torch version, ~12-15 s,
    where it is not built yet) and say whether it is there (else the op stays in Python: ~20 µs more a call; both
    call the same kernel). :class:`FastDecoder` calls this; an eager forward only uses the glue once built."""
    _load_native(_kernels(), build=True)
    return _native


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the compiled kernel is there for weights of ``dtype`` (float32 or bfloat16); else
    :func:`small_batch_linear` computes ``F.linear``."""
    return dtype in _kernels()


def _small_batch_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    fn = _kernels().get(weight.dtype)
    if (
        fn is None
        or not 1 <= rows <= MAX_ROWS
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or x.dtype != weight.dtype
        or weight.dim() != 2
        or weight.shape[1] != x.shape[-1]
    ):
        return F.linear(x, weight)
    n, k = weight.shape
    w = weight if weight.is_contiguous() else weight.contiguous()  # (N, K)
    xc = x if x.is_contiguous() else x.contiguous()  # (..., K) read as (M, K)
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)  # (..., N): written as (M, N); bf16: rounded once by the kernel
    if fn(xc.data_ptr(), rows, w.data_ptr(), n, k, y.data_ptr()) != 0:  # -2: no memory for the widened rows
        return F.linear(x, weight)
    return y


# A plain torch.library op (a kernel behind the dispatcher: the Python one costs ~35 us a call here, the C++ one
# ~14 us, torch.library.custom_op's wrapper ~60 us; the decode step makes 85 of these calls per token).
def _fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    torch._check(weight.shape[-1] == x.shape[-1], lambda: "small_batch_linear: x and weight disagree on K")
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_OP = "llama_hf::small_batch_linear"
_LIB = define_op("small_batch_linear(Tensor x, Tensor weight) -> Tensor", _fake)  # and its fake


def packable(weight: torch.Tensor) -> bool:
    """Whether :func:`pack_weight` can pack ``weight``: a 2-D bfloat16 tensor (N, K) with N a multiple of 32 and K
    even (every LLaMA projection and LM head)."""
    return (
        weight.dim() == 2
        and weight.dtype == torch.bfloat16
        and weight.shape[0] % 32 == 0
        and weight.shape[1] % 2 == 0
        and weight.numel() > 0
    )


def pack_weight(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer's bf16 weight (N, K) packed for :func:`packed_linear`: (N / 32, K / 2, 32, 2), element
    ``[b, j, c, t]`` = ``weight[32 b + c, 2 j + t]`` (blocks of 32 output columns, each k pair of the 32 side by
    side). The same values, another order; written into ``out`` (N * K bf16 elements, any shape, contiguous) where
    given, e.g. memory on huge pages. :func:`unpack_weight` undoes it."""
    if not packable(weight):
        raise ValueError(
            f"pack_weight needs a 2-D bfloat16 weight (N, K) with N a multiple of 32 and K even; got "
            f"{tuple(weight.shape)} {weight.dtype}. Cast it with .bfloat16(), or keep it unpacked (small_batch_linear)."
        )
    n, k = weight.shape
    blocks = weight.detach().reshape(n // 32, 32, k // 2, 2).permute(0, 2, 1, 3)  # (N/32, K/2, 32, 2), a view
    if out is None:
        return blocks.contiguous()
    if out.numel() * out.element_size() != weight.numel() * 2 or not out.is_contiguous():
        raise ValueError(f"pack_weight: out must be contiguous and hold {weight.numel() * 2} bytes")
    packed = out.view(torch.bfloat16).view(blocks.shape)
    packed.copy_(blocks)
    return packed


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """The weight (N, K) that :func:`pack_weight` packed into ``packed`` (a copy)."""
    _check_packed(packed)
    b, j = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(b * 32, j * 2)


def _check_packed(packed: torch.Tensor) -> None:
    torch._check(
        packed.dim() == 4 and packed.shape[2] == 32 and packed.shape[3] == 2,
        lambda: (
            f"packed_linear: the weight must be packed as (N / 32, K / 2, 32, 2) (cpu_linear.pack_weight), got "
            f"{tuple(packed.shape)}"
        ),
    )


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    _check_packed(packed)
    n, k = packed.shape[0] * 32, packed.shape[1] * 2
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    fn = _kernels().get("packed")
    if (
        fn is None
        or rows < 1
        or x.dtype != torch.bfloat16
        or packed.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or packed.device.type != "cpu"
        or x.shape[-1] != k
        or n < 32
    ):
        return F.linear(x, unpack_weight(packed))
    p = packed if packed.is_contiguous() else packed.contiguous()
    xc = x if x.is_contiguous() else x.contiguous()  # (..., K) read as (M, K)
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)  # (..., N): written as (M, N)
    if fn(xc.data_ptr(), rows, p.data_ptr(), n, k, y.data_ptr()) != 0:  # -2: no memory for the widened rows
        return F.linear(x, unpack_weight(packed))
    return y


def _packed_fake(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    _check_packed(packed)
    torch._check(packed.shape[1] * 2 == x.shape[-1], lambda: "packed_linear: x and the packed weight disagree on K")
    return x.new_empty(*x.shape[:-1], packed.shape[0] * 32)


_PACKED_OP = "llama_hf::packed_linear"
_PACKED_LIB = define_op("packed_linear(Tensor x, Tensor packed) -> Tensor", _packed_fake)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, unpack_weight(packed))`` (no bias) for bf16 ``x`` (..., K), any number of rows, and a bf16
    weight packed by :func:`pack_weight`, on CPU: float32 sums (in the CPU's bf16 dot-product instruction where it
    has one, :func:`forms`), rounded to bf16 once. Each group of 8 rows reads a 32-column block; every
    weight is read from memory once for all rows. Other inputs (not bf16, not CPU, no kernel) go to ``F.linear``
    on the unpacked weight. The same as ``torch.ops.llama_hf.packed_linear`` (no autograd: for inference)."""
    return torch.ops.llama_hf.packed_linear(x, packed)


# The ops' Python CPU implementations, until _load_native replaces them by the C++ ones; registered once a process,
# whichever copy of this module comes first (a reload, or trust_remote_code's copy, finds a kernel there and keeps it).
_OPS = {"small_batch_linear": _small_batch_linear, "packed_linear": _packed_linear}
for _name, _fn in _OPS.items():
    register_python_kernel(_name, _fn)


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) for ``x`` (..., K) with at most :data:`MAX_ROWS` rows on CPU, both float32
    or both bfloat16 (summed in float32, rounded to bf16 once), through the streaming kernel; any other input (or
    no kernel) goes to ``F.linear``. The same as ``torch.ops.llama_hf.small_batch_linear`` (no autograd: for
    inference)."""
    return torch.ops.llama_hf.small_batch_linear(x, weight)


class SmallBatchLinear(nn.Linear):
    """``nn.Linear`` (the same parameters, state dict, initialisation and training) whose forward, for inference
    on a few rows, streams the weight once for all of them through :func:`small_batch_linear`: with autograd off
    (``torch.no_grad()`` or ``inference_mode``, as ``generate()`` runs), ``x`` a plain CPU tensor of at most
    :data:`MAX_ROWS` rows (a decoding step's batch; :func:`eager_rows` says which counts, by dtype and CPU) in the
    weight's dtype (float32 or bfloat16), the weight a plain
    contiguous tensor, and not while ``torch.compile`` traces it (compiled decoding has its own forms, see
    :class:`~modeling_llama.FastDecoder`). Anything else (training, prefill-sized inputs, CUDA, tensor subclasses
    such as DTensor, no C compiler, ``LLAMA_CPU_LINEAR=0``) is ``F.linear``.

    The model's projections are these modules, so a plain ``model.generate()`` on CPU gets the kernel for its steps
    (2 AVX2 cores, ``100M`` preset: batch 8 1.87x-2.12x stock's ``generate()``, batch 1 1.09x-1.44x, two runs;
    ``benchmarks/RESULTS.md``).
    The kernel sums in float32 in another order than MKL's, so outputs differ from ``F.linear``'s in the last bits.
    Its first use builds it (~1.5 s, once per machine); the op's C++ glue is used where already built."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            not torch.is_grad_enabled()
            and type(x) is torch.Tensor  # (not a DTensor, FakeTensor or tracing proxy)
            and x.device.type == "cpu"
            and x.dim() >= 2
            and x.shape[-1] > 0
            and type(w) in (nn.Parameter, torch.Tensor)
            and w.dtype == x.dtype
            and w.is_contiguous()
            and not torch.compiler.is_compiling()  # (before eager_rows: its first call reads /proc/cpuinfo)
            and x.numel() // x.shape[-1] in eager_rows(w.dtype)
        ):
            y = torch.ops.llama_hf.small_batch_linear(x, w)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w, self.bias)
