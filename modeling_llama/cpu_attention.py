"""Attention for one query row on CPU (a decode step): each cached key and value read once, masked positions not
read at all.

A decoding step attends one new query per sequence over the whole KV cache. Written as the plain math attention
(``eager``, which ``FastDecoder`` compiles on CPU), inductor fuses the score product into the softmax's reductions
and reads the cached keys more than once: at batch 8 on 2 AVX2 cores (``100M``, a 97-position cache) its attention
kernels took ~9 ms of a ~45 ms step, where reading the 57 MB of cache once takes ~3 ms. The kernel here (C++, a
``torch.library`` op, built on first use and cached like :mod:`.cpu_linear`'s) computes, for each (sequence, head)
pair in parallel, the scores of the positions the mask lets through (one key row at a time), their softmax in
float32 (a vectorised exp, within 1 ulp of ``expf`` at every float in [-87.3, 0]) and the weighted sum of those
values (four rows at a time), reading each key and value row once; bf16 inputs are summed in float32 and the output
rounded to bf16 once. A static cache's positions beyond the current one are masked
(``-inf``/``finfo.min`` in an additive mask, ``False`` in a boolean one), so they cost nothing: the step reads what
has been written, not the cache's length. Skipping them is exact: their softmax weight is 0 in the eager math
(unless every position is masked; then all are computed, as eager does).

:data:`ATTN_IMPLEMENTATION` (``"llama_hf_decode"``) is registered with transformers' attention functions (and the
eager mask): one-row queries on CPU in fp32 or bf16 go to the kernel, everything else (the prefill, other devices,
dtypes, training with dropout) to the eager attention. ``FastDecoder`` sets it on CPU where the kernel builds;
``LLAMA_CPU_ATTENTION=0`` turns the kernel off.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import native_build
from .modeling_llama import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

__all__ = ["ATTN_IMPLEMENTATION", "ENV_VAR", "available", "decode_attention", "library_path"]

ATTN_IMPLEMENTATION = "llama_hf_decode"
ENV_VAR = "LLAMA_CPU_ATTENTION"

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

// The prefetch distance: 8 KB of rows ahead (64 bf16 rows of 64), at least 8 rows. On 2-core Zen 5, bf16, batch 8,
// 12 x 64 heads, 65 positions written: 8 rows ahead (the distance before 2026-12-02) 81-126 us a layer, 16 rows
// 1.40x faster, 32 rows 1.32x, 64 rows 1.63x, 128 rows 0.84x; fp32 at 64 rows (16 KB) 1.29x, but 0.94x with 32 x
// 128 heads (32 KB ahead: beyond L1). benchmarks/decode_attention.py, benchmarks/RESULTS.md.
#define PF_BYTES 8192

typedef float v8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
static inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
static inline v8 load8(const uint16_t* p) {  // 8 bf16 -> fp32, exactly (the 16 bits become the high half)
#ifdef __AVX2__
    return (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
#else
    u32x8 u;
    for (int i = 0; i < 8; i++) u[i] = (uint32_t)p[i] << 16;
    v8 v; std::memcpy(&v, &u, sizeof v); return v;
#endif
}
static inline float load1(const float* p) { return *p; }
static inline float load1(const uint16_t* p) {
    uint32_t u = (uint32_t)*p << 16;
    float f; std::memcpy(&f, &u, 4); return f;
}
static inline void prefetch_row(const void* p, int64_t bytes) {  // every cache line of a key or value row
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char*)p + o, 0, 3);
}
// the 8 lanes' sum as a tree: three dependent adds, not seven
static inline float hsum(v8 a) { return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7])); }
static inline void store1(float* p, float f) { *p = f; }
static inline void store1(uint16_t* p, float f) {  // rounded to bf16, to nearest even, as torch rounds
    uint32_t u;
    std::memcpy(&u, &f, 4);
    *p = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// e^x for 8 lanes, x <= 0 (a softmax's shifted scores): x = n ln2 + r, |r| <= ln2 / 2, e^r by Cephes' expf
// polynomial, times 2^n through the exponent bits; within 1 ulp of expf at every float in [-87.3, 0]. Below
// -87.3 (e^x under float's smallest normal): 0.
static inline v8 exp_nonpositive(v8 x) {
    typedef int32_t i32x8 __attribute__((vector_size(32)));
    const v8 lo = x < -87.33f ? (v8){} - 1.f : (v8){};  // (lanes of -1: true)
    x = lo != 0.f ? (v8){} - 87.f : x;
    const v8 magic = (v8){} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
    const v8 n = (x * 1.44269504088896341f + magic) - magic;
    const v8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    v8 p = (v8){} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    const i32x8 e = (__builtin_convertvector(n, i32x8) + 127) << 23;  // 2^n
    v8 scale;
    std::memcpy(&scale, &e, sizeof scale);
    const v8 y = p * scale;
    return lo != 0.f ? (v8){} : y;
}

// q . k over D (two sums over alternating pieces)
template <typename T> static inline float dot(const T* q, const T* k, int64_t D) {
    int64_t d = 0;
    float s = 0.f;
    if (D >= 8) {
        v8 a = {0}, b = {0};
        for (; d + 16 <= D; d += 16) {
            a += load8(q + d) * load8(k + d);
            b += load8(q + d + 8) * load8(k + d + 8);
        }
        for (; d + 8 <= D; d += 8) a += load8(q + d) * load8(k + d);
        s = hsum(a + b);
    }
    for (; d < D; d++) s += load1(q + d) * load1(k + d);
    return s;
}

// out (B, H, D) = softmax(q k^T * scale + mask) v for one query row per (b, h), kv head h / (H / Hk), in T (bf16:
// float32 sums rounded once). A position whose mask is <= -1e30 (additive, float32) or false (boolean) is not read,
// unless every one is.
template <typename T>
static void attend(const T* q, int64_t sqb, int64_t sqh, const T* k, int64_t skb, int64_t skh, int64_t sks,
                   const T* v, int64_t svb, int64_t svh, int64_t svs, const float* maskf, const uint8_t* maskb,
                   int64_t smb, int64_t smh, int64_t B, int64_t H, int64_t Hk, int64_t S, int64_t D, float scale,
                   T* out) {
    const int64_t groups = H / Hk;
    const int64_t row_bytes = D * (int64_t)sizeof(T), pf = PF_BYTES / row_bytes > 8 ? PF_BYTES / row_bytes : 8;
#pragma omp parallel
    {
        std::vector<float> sc(S + 8), acc(D);  // the read positions' scores, then their weights
        std::vector<int64_t> pos(S);           // the positions read, in order
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H, hk = h / groups;
            const T* qr = q + b * sqb + h * sqh;
            const T* kb = k + b * skb + hk * skh;
            // the next pair's keys (this thread's next pair but at the end of its share): their first rows are
            // prefetched during this pair's value pass, so its score pass does not start cold
            const int64_t bn = (bh + 1) / H, hkn = ((bh + 1) % H) / groups;
            const T* kn = bh + 1 < B * H ? k + bn * skb + hkn * skh : nullptr;
            const T* vb = v + b * svb + hk * svh;
            const float* mf = maskf ? maskf + b * smb + h * smh : nullptr;  // this pair's mask row
            const uint8_t* mb = maskb ? maskb + b * smb + h * smh : nullptr;
            int64_t n = 0;
            for (int64_t p = 0; p < S; p++)
                if (mf ? mf[p] > -1e30f : mb ? mb[p] != 0 : true) pos[n++] = p;
            if (n == 0)  // every position masked: computed anyway, as the eager math does
                for (; n < S; n++) pos[n] = n;
            // scores, one key row at a time, each read in order; the row pf ahead prefetched whole (a head's rows
            // are short streams: 18% faster from memory), the first key and value rows before the keys are read.
            // (Eight keys at a time, each piece of q loaded once for all eight, reads eight rows interleaved: 0.91x-
            // 0.99x the speed of this form on Zen 3 in fp32 and bf16, 2026-12-01.)
            for (int64_t i = 0; i < n && i < pf; i++) {
                prefetch_row(kb + pos[i] * sks, D * sizeof(T));
                prefetch_row(vb + pos[i] * svs, D * sizeof(T));
            }
            int64_t i = 0;
            for (; i < n; i++) {
                if (i + pf < n) prefetch_row(kb + pos[i + pf] * sks, D * sizeof(T));
                sc[i] = dot(qr, kb + pos[i] * sks, D);
            }
            float mx = -INFINITY;
            for (i = 0; i < n; i++) {
                float s = sc[i] * scale;
                if (mf) s += mf[pos[i]];
                sc[i] = s;
                mx = s > mx ? s : mx;
            }
            // weights e^(s - max), 8 at a time (the lanes past n: 0), and their sum
            for (i = n; i < (n + 7) / 8 * 8; i++) sc[i] = -INFINITY;
            v8 sum8 = {0};
            for (i = 0; i < n; i += 8) {
                v8 w = exp_nonpositive(load8(&sc[i]) - mx);
                if (mx == -INFINITY) w = (v8){} + 1.f;  // every score -inf (an all -inf mask): eager's NaN, below
                std::memcpy(&sc[i], &w, sizeof w);
                sum8 += w;
            }
            const float sum = mx == -INFINITY ? NAN : hsum(sum8);
            for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
            // the weighted sum of the value rows, four at a time, then one at a time
            for (i = 0; i + 4 <= n; i += 4) {
                const T* vr[4];
                for (int j = 0; j < 4; j++) {
                    vr[j] = vb + pos[i + j] * svs;
                    if (i + pf + j < n)
                        prefetch_row(vb + pos[i + pf + j] * svs, D * sizeof(T));
                    else if (kn && i + pf + j - n < S)  // (the next pair's positions: mostly the same)
                        prefetch_row(kn + (i + pf + j - n) * sks, D * sizeof(T));
                }
                const float* w = &sc[i];
                const v8 w0 = (v8){} + w[0], w1 = (v8){} + w[1], w2 = (v8){} + w[2], w3 = (v8){} + w[3];
                int64_t d = 0;
                for (; d + 8 <= D; d += 8) {
                    const v8 a = load8(&acc[d]) + ((w0 * load8(vr[0] + d) + w1 * load8(vr[1] + d)) +
                                                   (w2 * load8(vr[2] + d) + w3 * load8(vr[3] + d)));
                    std::memcpy(&acc[d], &a, sizeof a);
                }
                for (; d < D; d++)
                    acc[d] += (w[0] * load1(vr[0] + d) + w[1] * load1(vr[1] + d)) +
                              (w[2] * load1(vr[2] + d) + w[3] * load1(vr[3] + d));
            }
            for (; i < n; i++) {
                const T* vr = vb + pos[i] * svs;
                const float w = sc[i];
                const v8 wv = (v8){} + w;
                int64_t d = 0;
                for (; d + 8 <= D; d += 8) {
                    const v8 a = load8(&acc[d]) + wv * load8(vr + d);
                    std::memcpy(&acc[d], &a, sizeof a);
                }
                for (; d < D; d++) acc[d] += w * load1(vr + d);
            }
            T* o = out + (b * H + h) * D;
            for (int64_t d = 0; d < D; d++) store1(o + d, acc[d] / sum);
        }
    }
}

// q (B, H, 1, D), k and v (B, Hk, S, D) (any strides; rows contiguous or copied), mask None or (Bm, Hm, 1, >=S)
// with Bm in {1, B} and Hm in {1, H}, additive (any float dtype) or boolean (true: attend). Returns (B, 1, H, D).
static at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                   const std::optional<at::Tensor>& mask, double scale) {
    TORCH_CHECK(q_.dim() == 4 && q_.size(2) == 1 && k_.dim() == 4 && v_.dim() == 4,
                "decode_attention: q (B, H, 1, D), k and v (B, Hk, S, D)");
    const int64_t B = q_.size(0), H = q_.size(1), D = q_.size(3), Hk = k_.size(1), S = k_.size(2);
    TORCH_CHECK(k_.size(0) == B && v_.size(0) == B && v_.size(1) == Hk && v_.size(2) == S && k_.size(3) == D &&
                v_.size(3) == D && Hk > 0 && H % Hk == 0, "decode_attention: q, k and v disagree in shape");
    const auto dt = q_.scalar_type();
    TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16) && k_.scalar_type() == dt && v_.scalar_type() == dt,
                "decode_attention: q, k and v must all be float32 or all bfloat16");
    TORCH_CHECK(q_.device().is_cpu() && k_.device().is_cpu() && v_.device().is_cpu(), "decode_attention: CPU only");
    const at::Tensor q = q_.stride(3) == 1 ? q_ : q_.contiguous();
    const at::Tensor k = k_.stride(3) == 1 ? k_ : k_.contiguous();
    const at::Tensor v = v_.stride(3) == 1 ? v_ : v_.contiguous();
    at::Tensor m;  // (Bm, Hm, S): float32 or bool, last dim contiguous
    int64_t smb = 0, smh = 0;
    if (mask.has_value() && mask->defined()) {
        const at::Tensor& m4 = *mask;
        TORCH_CHECK(m4.dim() == 4 && m4.size(2) == 1 && (m4.size(0) == 1 || m4.size(0) == B) &&
                    (m4.size(1) == 1 || m4.size(1) == H) && m4.size(3) >= S,
                    "decode_attention: the mask must be (1 or B, 1 or H, 1, >= S)");
        m = m4.select(2, 0).narrow(2, 0, S);
        m = m4.scalar_type() == at::kBool ? m.contiguous() : m.to(at::kFloat).contiguous();
        smb = m.size(0) == 1 ? 0 : m.stride(0);
        smh = m.size(1) == 1 ? 0 : m.stride(1);
    }
    const float* maskf = m.defined() && m.scalar_type() == at::kFloat ? m.const_data_ptr<float>() : nullptr;
    const uint8_t* maskb = m.defined() && m.scalar_type() == at::kBool ? (const uint8_t*)m.const_data_ptr() : nullptr;
    at::Tensor out = at::empty({B, 1, H, D}, q.options());
    if (dt == at::kFloat)
        attend(q.const_data_ptr<float>(), q.stride(0), q.stride(1), k.const_data_ptr<float>(), k.stride(0),
               k.stride(1), k.stride(2), v.const_data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2), maskf,
               maskb, smb, smh, B, H, Hk, S, D, (float)scale, out.data_ptr<float>());
    else  // bf16: float32 scores, softmax and sums, the output rounded once
        attend((const uint16_t*)q.const_data_ptr(), q.stride(0), q.stride(1), (const uint16_t*)k.const_data_ptr(),
               k.stride(0), k.stride(1), k.stride(2), (const uint16_t*)v.const_data_ptr(), v.stride(0), v.stride(1),
               v.stride(2), maskf, maskb, smb, smh, B, H, Hk, S, D, (float)scale, (uint16_t*)out.data_ptr());
    return out;
}

TORCH_LIBRARY_IMPL(llama_hf, CPU, m) { m.impl("decode_attention", decode_attention); }
"""


def library_path() -> Path | None:
    """The kernel (C++, linked against this torch), built on first use with ``$CXX``/``c++``/``g++``/``clang++``
    for this CPU and cached per torch version (:mod:`.native_build`); ``None`` where it cannot be built."""
    return _build("llama_hf_attention", _SOURCE)


def _build(stem: str, source: str) -> Path | None:
    """``source`` (this module's kernel, or another version of it: ``benchmarks/decode_attention.py --against``)
    built as :func:`library_path` builds it."""
    torch_flags = native_build.torch_flags()
    if torch_flags is None:
        return None
    common = ["-O3", "-march=native", "-shared", "-fPIC", "-w", *torch_flags]
    flag_sets = [[std, *omp, *common] for omp in (["-fopenmp"], []) for std in ("-std=c++20", "-std=c++17")]
    compilers = native_build.cxx_compilers()
    return native_build.build(stem, source, ".cpp", compilers, flag_sets, (torch.__version__,))


_loaded = False  # read by decode_attention_forward (inside compiled graphs: a constant, not a call)


@functools.cache
def available() -> bool:
    """Whether the kernel is built and loaded (the first call builds it: ~15 s, once per machine and torch)."""
    global _loaded
    if native_build.disabled(ENV_VAR):
        return False
    path = library_path()
    if path is None:
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError):
        return False
    _loaded = torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "CPU")
    return _loaded


def _fake(q, k, v, mask, scale):
    torch._check(q.shape[2] == 1, lambda: "decode_attention: one query row")
    return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])  # (B, 1, H, D)


_OP = "llama_hf::decode_attention"
_LIB = native_build.define_op(
    "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor", _fake
)


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """``softmax(query keyᵀ · scaling + mask) value`` for ``query`` (B, H, 1, D) against ``key``/``value``
    (B, Hk, S, D), float32 or bfloat16 (summed in float32, rounded once), ``mask`` additive or boolean
    (1 or B, 1 or H, 1, >= S) or ``None``; returns (B, 1, H, D). Needs :func:`available`."""
    if not available():
        raise RuntimeError(
            "cpu_attention's kernel is not built here (no C++ compiler or torch headers, or "
            f"{ENV_VAR}=0); use the eager attention instead."
        )
    return torch.ops.llama_hf.decode_attention(query, key, value, mask, scaling)


def decode_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention interface: the kernel for one-row queries on CPU (fp32, bf16), else eager."""
    loaded = _loaded or (not torch.compiler.is_compiling() and available())  # eager: the first call builds it
    if (
        loaded
        and query.shape[2] == 1
        and query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.bfloat16)
        and key.dtype == query.dtype
        and value.dtype == query.dtype
        and (attention_mask is None or attention_mask.dim() == 4)
        and not (module.training and dropout > 0)
    ):
        return torch.ops.llama_hf.decode_attention(query, key, value, attention_mask, scaling), None
    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, decode_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)


_register()
