"""Fast greedy decoding: a static KV cache and a ``torch.compile``d one-token step.

``model.generate()`` with the default dynamic cache re-runs Python for every op of every token; on a CPU that
costs little next to the matmuls, but the matmuls themselves run at batch 1 as matrix-vector products that are
memory-bound. :class:`FastDecoder` is the path for latency:

- a ``StaticCache`` (fixed shapes: the step compiles once and never recompiles);
- the one-token step compiled with ``fullgraph=True``; after the first step the compiled graph runs without
  re-checking dynamo's guards (``skip_guard_eval_unsafe``: safe here because the decoder only ever calls it with
  the shapes it was built for, which :meth:`FastDecoder.generate` checks);
- on CUDA, ``mode="reduce-overhead"``: one CUDA-graph replay per token instead of hundreds of launches;
- on CPU at batch 1, each ``nn.Linear`` is traced as a multiply-and-sum over its weight rows (fp32 products and
  accumulation, bf16 weights read once) that inductor turns into one vectorised, threaded loop: it streams the
  weights ~1.6x faster than the bf16 GEMV kernel ``F.linear`` dispatches to (``benchmarks/bench_cpu.py``);
  attention of the step's one-row query goes to :mod:`.cpu_attention`'s kernel, which reads each cached key and
  value once and only the positions written so far (batch 8, 2 AVX2 cores: steps 1.06x-1.16x faster),
  where it cannot be built to the plain math (``eager``) attention, which inductor fuses for a one-row query
  (SDPA's flash kernel costs more in per-call set-up at that size). At batch 2-16 in fp32 each linear
  calls :mod:`.cpu_linear`'s kernel, which reads each weight once for all rows at memory speed (8-15 GB/s on
  2 AVX2 cores at batch 8 against 4-7 for MKL's product; batch 8 decoding 80 -> 114 tok/s); where that kernel
  cannot be built (no C compiler), and at batch > 16, each linear is traced as ``W @ xᵀ`` (a tall-skinny
  product), which MKL runs ~1.3-2.4x faster than ``x @ Wᵀ`` for a few rows. The eager prefill in fp32 runs its
  linears as ``W @ xᵀ`` too (32-256 rows: 1.1-1.9x faster in MKL). In bf16 the kernel takes batch 2-16, and
  batch 1 as well where its bf16 form is the CPU's dot-product instruction (AVX512-BF16: on 2 Intel cores ~1.5-2x
  the rate of inductor's loop and of oneDNN's bf16 products); where the kernel cannot be built, the bf16 linears
  stay matmuls and inductor's freezing pre-packs the weights for oneDNN.
- in bf16 on a CPU with AVX512-BF16 at batch 4-16, the step's products read copies of the weights packed for
  :func:`cpu_linear.packed_linear` (made once, one more copy of the linear weights in memory where it fits:
  ``packed_weights``): on 2-core Zen 5 the batch-8 steps took 0.85x the time of the row kernel's at the ``100M``
  preset, 0.58x at ``1B``;
- the rotary cos/sin of every position computed once (eager, float32, as the module computes them) and looked up
  in the compiled step: computed inside it, inductor fused them into the attention-score reduction and
  recomputed them for every cached key (2 CPUs, batch 8: attention 1.1 ms per layer, 0.65 ms with the table);
- on CPU, the step attends over a prefix of the static cache, 64, 128, ... positions (views of the same tensors,
  one compiled step per length, compiled when first reached), and the prefill over the smallest that holds the
  prompt: attending over all ``max_length`` positions made batch 8 on 2 CPUs fall from 141 to 42 tok/s at
  ``max_length=2048`` (stock ``generate()``: 47); with the buckets 130;
- the dtype: bf16 where the device computes it natively (CUDA; CPUs with AVX512-BF16 or AMX), fp32 on other CPUs,
  where bf16 matmuls are emulated: on an AVX2-only CPU the bf16 step at batch 8 was slower than stock fp32
  ``generate()`` (``benchmarks/RESULTS.md``).

The model is taken over: it is cast to ``dtype`` and put in eval mode, and on CPU its linear weights move to one
buffer on transparent huge pages (:mod:`.huge_pages`: the same values and ``Parameter`` objects; on 2 AVX2 cores
the batch-8 products took 0.85x-0.92x the time, the whole step 0.95x-0.98x). During :meth:`FastDecoder.generate` its
attention is the step's (on CPU ``cpu_attention.ATTN_IMPLEMENTATION``, the eager math with the kernel for one-row
queries, or ``eager``).
Its eager forward is otherwise unchanged (the GEMV form, the kernel and the rotary table are only used while
compiling, ``W @ xᵀ`` only inside :meth:`FastDecoder.generate`'s prefill), so the model can still be used, trained
or saved as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_attention, cpu_linear
from . import huge_pages as thp
from .modeling_llama import LlamaRotaryEmbedding


def _skip_guards(skip: bool):
    """``set_stance(skip_guard_eval_unsafe=skip)`` where torch has it (2.7+); on older torch the guards are
    evaluated as usual (slower per token, same tokens)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or "skip_guard_eval_unsafe" not in inspect.signature(set_stance).parameters:
        return contextlib.nullcontext()
    return set_stance("default", skip_guard_eval_unsafe=skip)


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matmuls natively: CUDA, or a CPU with AVX512-BF16 or AMX (on other CPUs
    oneDNN emulates them, slower than fp32)."""
    device = torch.device(device)
    if device.type != "cpu":
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# Set by FastDecoder around its eager prefill on CPU: the linears then run as ``W @ xᵀ`` in fp32, which MKL computes
# 1.1-1.9x faster than ``x @ Wᵀ`` for 32-256 rows on an AVX2 CPU (``benchmarks/RESULTS.md``); bf16 weights on a CPU
# without bf16 arithmetic are upcast for it (oneDNN's emulated bf16 GEMM runs at ~1/6 of fp32's speed there).
_PREFILL_WXT: contextvars.ContextVar[bool] = contextvars.ContextVar("llama_prefill_wxt", default=False)


def _wxt(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w, rows = self.weight, x.reshape(-1, x.shape[-1])
    if w.dtype == torch.float32:
        y = torch.mm(w, rows.t()).t()  # (N, K) @ (K, M) -> (M, N)
    else:  # the same in fp32 (the upcast is exact), rounded back once
        y = torch.mm(w.float(), rows.float().t()).t().to(x.dtype)
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], -1)


def _eager_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _wxt(self, x) if _PREFILL_WXT.get() else F.linear(x, self.weight, self.bias)


def _small_batch_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` that, while being compiled, is written as ``W @ xᵀ``: for a few rows MKL streams the weight
    faster in this orientation (measured 6.3-7.6 GB/s against 2.8-5.7 GB/s for ``x @ Wᵀ`` at 8 rows, fp32)."""
    return _wxt(self, x) if torch.compiler.is_compiling() else _eager_linear(self, x)


def _streaming_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` that, while being compiled, calls :func:`cpu_linear.small_batch_linear` (fp32 or bf16 weights,
    up to ``cpu_linear.MAX_ROWS`` rows on CPU: each weight read once)."""
    if torch.compiler.is_compiling():
        y = torch.ops.llama_hf.small_batch_linear(x, self.weight)
        return y if self.bias is None else y + self.bias
    return _eager_linear(self, x)


# Set by FastDecoder around its eager prefill where it packed the weights (and the kernel has its dot-product form):
# the prefill's products then read the packed copies too (2-core Zen 5, bf16, the 100M preset's step products:
# 1.67x oneDNN's F.linear at 32 rows, 1.35x at 64, 1.12x at 256; benchmarks/packed_rows.py, RESULTS.md).
_PREFILL_PACKED: contextvars.ContextVar[bool] = contextvars.ContextVar("llama_prefill_packed", default=False)


def _packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` that, while being compiled or in :class:`FastDecoder`'s prefill, calls
    :func:`cpu_linear.packed_linear` on the decoder's packed copy of the weight (``_fast_packed``, made once by the
    decoder)."""
    if torch.compiler.is_compiling() or _PREFILL_PACKED.get():
        y = torch.ops.llama_hf.packed_linear(x, self._fast_packed)
        return y if self.bias is None else y + self.bias
    return _eager_linear(self, x)


def _gemv_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` that, while being compiled for a single row, is written as multiply + sum over ``K``."""
    if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
        y = (x.unsqueeze(-2).float() * self.weight.float()).sum(-1)  # (..., 1, K) * (N, K) -> (..., N)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)
    return _eager_linear(self, x)


def _cache_buckets(max_length: int) -> tuple[int, ...]:
    """Cache lengths the step is compiled for: 64, 128, ... up to half of ``max_length``, then ``max_length``
    (each bucket at least halves the cache the attention reads; one compilation each, when first reached)."""
    small = []
    while (b := 64 << len(small)) <= max_length // 2:
        small.append(b)
    return (*small, max_length)


def _rotary_table_forward(self: LlamaRotaryEmbedding, x: torch.Tensor, position_ids: torch.Tensor):
    """``LlamaRotaryEmbedding.forward`` that, while being compiled, looks the angles' cos/sin up in the table
    :class:`FastDecoder` computed once in eager mode (same values); otherwise inductor fuses the cos/sin into the
    attention-score reduction and recomputes them for every cached key position."""
    if torch.compiler.is_compiling() and self._fast_active:  # FastDecoder's steps only (positions < max_length)
        return self._fast_cos[position_ids].to(x.dtype), self._fast_sin[position_ids].to(x.dtype)  # (B, T, Dh)
    return type(self).forward(self, x, position_ids)


# The smallest batch for which FastDecoder packs the weights by default (bf16 on a CPU with AVX512-BF16). The packed
# products against the row form's on 2-core Zen 5, the 100M preset's step products through the ops, two runs
# (benchmarks/packed_rows.py): 1.03-1.08x at 1 row, 1.01-1.03x at 2, 1.03-1.20x at 4, 1.14-1.47x at 8, 1.61-1.88x
# at 16; at 1-2 rows the second copy of the weights would cost its memory for next to nothing.
PACKED_MIN_BATCH = 4


def _available_memory() -> int | None:
    """The system's available memory in bytes (``MemAvailable`` of ``/proc/meminfo``), ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _refuse_packing(device: torch.device, dtype: torch.dtype, compile: bool) -> None:
    """Raise ``ValueError`` where ``packed_weights=True`` cannot apply (before :class:`FastDecoder` touches the
    model)."""
    why = (
        "it runs on CUDA" if device.type == "cuda"
        else f"dtype is {dtype}, not torch.bfloat16" if dtype != torch.bfloat16
        else "compile=False (only the compiled steps read them)" if not compile
        else "cpu_linear's kernel could not be built here (no C compiler?)" if not cpu_linear.forms().get("packed")
        else None
    )  # fmt: skip
    if why:
        raise ValueError(
            f"packed_weights=True needs a compiled bf16 decoder on CPU with cpu_linear's kernel; {why}. Pass "
            "packed_weights=None (where it applies) or False."
        )


class FastDecoder:
    """Greedy decoding of a causal LM through a static cache and a compiled one-token step.

    Args:
        model: a causal LM whose forward takes a ``Cache`` (``cache``, or ``past_key_values`` before transformers
            5.24) and ``cache_position`` (ours or stock transformers' ``LlamaForCausalLM``).
        batch_size: the batch size every :meth:`generate` call will use (the cache and the graph are built for it).
        max_length: prompt + new tokens the cache holds.
        dtype: weights and cache dtype; default bf16 where the device computes it natively (:func:`native_bf16`),
            else fp32 (whose tokens equal stock fp32 ``generate()``'s). In bf16 the step's products at batch 2-16
            go to :mod:`cpu_linear`'s bf16 kernel (at batch 1 too on CPUs with AVX512-BF16, where it uses the bf16
            dot-product instruction). bf16 on a CPU without bf16 arithmetic halves the weights' memory and runs
            faster than fp32 there; its prefill computes in fp32 with SDPA attention.
        compile: ``False`` runs the same static-cache loop eagerly (for comparison and debugging).
        attn_implementation: the attention the steps run; default on CPU ``cpu_attention``'s one-row kernel
            (``"llama_hf_decode"``) where it builds, else ``"eager"`` (fused by inductor), on CUDA the model's
            own. Kept in :attr:`attn_implementation`.
        cpp_wrapper: on CPU, compile each step's wrapper (the code that calls its kernels, ~170 calls a token at
            the ``100M`` preset) to C++ instead of Python: inductor's ``cpp_wrapper``. At batch 8 on 2 AVX2 cores
            the steps took 0.94x-0.97x the time (``benchmarks/RESULTS.md``); batch 1 gains nothing. The cost: each
            step's first compile takes ~35% longer (``100M``, 2 cores: 57 s against 42 s; inductor caches it on
            disk, so later processes on the machine load it). Worth it for long or repeated generation at batch
            2-16; off by default. Ignored on CUDA, where CUDA graphs replay the step without its wrapper.
        huge_pages: on CPU (Linux with transparent huge pages), move the linear layers' weights, which every step
            reads from memory, into one buffer on 2-MB pages (:mod:`.huge_pages`; same values, dtype and
            ``Parameter`` objects). On 2 AVX2 cores the batch-8 step's products took 0.85x-0.92x the time, the
            whole step 0.95x-0.98x (``benchmarks/RESULTS.md``). The bytes moved are in :attr:`huge_page_bytes` (how
            many of them the kernel backs with huge pages is its best effort; ``huge_pages.huge_page_bytes(w)``
            reads it back for a weight ``w``), 0 where nothing moved: CUDA, no THP, ``LLAMA_HUGE_PAGES=0``, frozen
            bf16 weights, which inductor copies).

        packed_weights: on CPU in bf16, have the compiled steps read a copy of each linear weight packed for
            :func:`cpu_linear.packed_linear` (blocks of 32 output columns, each k pair side by side: the CPU's bf16
            dot products then need no sums across lanes, and each thread reads one sequential stream). The copy is
            made once, here, in one buffer (on huge pages with ``huge_pages``), and :meth:`generate`'s prefill reads
            it too where the kernel has its dot-product form (1.10x-1.16x faster prefills at batch 4-8 on Zen 5);
            the model's own weights are kept, unchanged, for any other use, so this costs one more copy of the
            linear weights in memory (:attr:`packed_bytes`), and weights changed after this are not seen by
            :meth:`generate` (build a new decoder). ``None`` (default): packed where measured faster and where
            the copy fits: the CPU has bf16 dot products (AVX512-BF16), the batch is :data:`PACKED_MIN_BATCH` ..
            ``cpu_linear.MAX_ROWS`` and the copy takes at most half of the available memory (on 2-core Zen 5 at
            batch 8 the steps took 0.85x the time at the ``100M`` preset, 0.58x at ``1B``:
            ``benchmarks/RESULTS.md``). ``True``: packed wherever it can be (any batch, and the kernel's widening
            form on CPUs without bf16 dot products); a ``ValueError`` where it cannot (not bf16, CUDA,
            ``compile=False``, no kernel). Weights with N not a multiple of 32 or K odd stay unpacked.

    The decoder works on ``model`` itself, not on a copy (a second copy of the weights would double the memory):
    it converts the model to ``dtype`` in place and installs forwards on its linear and rotary modules that compute
    the same products outside :meth:`generate` (their fast forms are only traced by its compiled steps); on CPU it
    moves the linear weights' data to huge pages (``huge_pages``), or, where it packs them (``packed_weights``: the
    one copy it makes, and only where it fits), leaves them and puts the packed copies there. The model's attention
    implementation is the step's during :meth:`generate` only. Pass ``copy.deepcopy(model)`` to keep the original dtype.

    Example::

        dec = FastDecoder(model, batch_size=1, max_length=256)
        new_tokens = dec.generate(input_ids, max_new_tokens=128)  # (B, 128), greedy
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype | None = None,
        compile: bool = True,
        attn_implementation: str | None = None,
        cpp_wrapper: bool = False,
        huge_pages: bool = True,
        packed_weights: bool | None = None,
    ) -> None:
        from transformers import StaticCache

        if batch_size < 1 or max_length < 2:
            raise ValueError(f"FastDecoder needs batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}.")
        if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
            raise TypeError(f"FastDecoder needs a causal LM (e.g. LlamaForCausalLM), got {type(model).__name__}.")
        self.device = next(model.parameters()).device
        if dtype is None:
            dtype = torch.bfloat16 if native_bf16(self.device) else torch.float32
        self.dtype = dtype
        if packed_weights:  # (refused before the model is touched)
            _refuse_packing(self.device, dtype, compile)
        self.model = model.to(dtype).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.cuda = self.device.type == "cuda"
        self.compiled = compile
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        self._steps: dict[int, object] = {}  # bucket -> its step (compiled once, on first use)
        self._warm: set[int] = set()  # buckets whose step has run (and compiled) once
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.24 : older
        # the LM head on the last position only (the prefill's other positions need no logits: at batch 8 and a
        # 32-token prompt that is 255 of 256 rows of a 32000 x 768 product, ~15% of the prefill)
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        options = None
        linear_forward = None
        # the model's attention outside generate() stays the user's; generate() sets the step's and restores it.
        # On CPU the step's one-row attention is cpu_attention's kernel (reads each cached key and value once, and
        # only the positions written so far), else the eager math, fused by inductor; the prefill runs eager either
        # way. On CUDA the model's own.
        self._user_attn = model.config._attn_implementation
        if attn_implementation is None and not self.cuda:
            attn_implementation = cpu_attention.ATTN_IMPLEMENTATION if cpu_attention.available() else "eager"
        self.attn_implementation = attn_implementation or self._user_attn
        self._rotary: list[nn.Module] = []  # rotary modules whose cos/sin table the compiled steps look up
        emulated_bf16 = dtype == torch.bfloat16 and not native_bf16(self.device)  # CPUs without bf16 arithmetic
        if not self.cuda:
            # bf16 through the kernel's dot-product form (AVX512-BF16) at every batch; else inductor's own loop
            # at batch 1 (measured faster than the kernel's one-row form on Zen 3, fp32 and widened bf16)
            bf16_dot = dtype == torch.bfloat16 and cpu_linear.forms().get("bf16_dot", False)  # ({} without a kernel)
            if batch_size == 1 and not bf16_dot:
                linear_forward = _gemv_linear_forward
            elif (
                dtype in (torch.float32, torch.bfloat16)
                and batch_size <= cpu_linear.MAX_ROWS
                and cpu_linear.available(dtype)
            ):
                linear_forward = _streaming_linear_forward
                cpu_linear.native()  # the op's C++ glue (85 calls a token; built once per machine where it is not)
            elif dtype == torch.float32:
                linear_forward = _small_batch_linear_forward
            else:
                options = {"freezing": True}  # weights become constants, pre-packed for oneDNN's GEMM
        # bf16 steps on packed copies of the weights (cpu_linear.packed_linear); the model's own stay for the rest
        packed = self._packable(model, packed_weights, batch_size, compile, linear_forward)
        packed_ids = {id(m) for m in packed}
        if packed:
            options = None if (options or {}).get("freezing") else options  # (the packed copies are read, not these)
        # the weights every step streams, on 2-MB pages: fewer TLB misses (CPU; frozen weights are inductor's copies)
        self.huge_page_bytes = 0
        self.packed_bytes = self._pack(packed, huge_pages)
        # the eager prefill's products on the packed copies too, in the dot-product form (faster than oneDNN's bf16
        # GEMM at 32-256 rows; the widening form is not, and the prefill keeps its own path there)
        self._prefill_packed = bool(self.packed_bytes) and cpu_linear.forms().get("bf16_dot", False)
        if huge_pages and not self.cuda and not (options or {}).get("freezing"):
            linears = (m.weight for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in packed_ids)
            self.huge_page_bytes += thp.move_parameters(linears)
        self.cpp_wrapper = bool(cpp_wrapper and compile and not self.cuda)
        if self.cpp_wrapper:
            options = {**(options or {}), "cpp_wrapper": True}
        # the eager prefill's linears as W @ xᵀ in fp32 (CPU, fp32 or emulated bf16: where the installed forwards
        # read the flag)
        self._prefill_wxt = linear_forward is not None and (dtype == torch.float32 or emulated_bf16)
        # and its attention through SDPA where bf16 is emulated: the eager attention's bf16 matmuls go to oneDNN's
        # emulation there (8 x 32 prompt: 885 -> 604 ms for the whole prefill); the step keeps eager (compiled)
        self._prefill_attn = "sdpa" if emulated_bf16 else None  # (never on CUDA: native_bf16 there)
        for module in model.modules():
            if id(module) in packed_ids:
                module.forward = _packed_linear_forward.__get__(module)
            elif linear_forward is not None and isinstance(module, nn.Linear):
                module.forward = linear_forward.__get__(module)
            elif compile and type(module) is LlamaRotaryEmbedding:  # cos/sin of every position, once (float32,
                probe = torch.empty(0, device=self.device)  # as the module computes them; cast on lookup)
                module._fast_cos, module._fast_sin = (
                    t[0] for t in module(probe, torch.arange(max_length, device=self.device)[None])
                )
                module.forward = _rotary_table_forward.__get__(module)
                module._fast_active = False  # set during generate(): a model compiled elsewhere computes cos/sin
                self._rotary.append(module)
        # On CPU the step attends over a prefix of the cache (a bucket: 64, 128, ... positions, at most half of
        # max_length, then all of it), not over all max_length positions: reading the whole static cache made the
        # batch-8 step 3.3x slower at max_length 2048 than at 97, slower than stock generate().
        # One bucket on CUDA (CUDA graphs; untested there) and with freezing (each graph would hold its own
        # pre-packed copy of the weights).
        views = not self.cuda and not (options or {}).get("freezing") and hasattr(self.cache, "layers")
        self.buckets = _cache_buckets(max_length) if views else (max_length,)
        self._caches = {max_length: self.cache}  # bucket -> a cache whose tensors are views of self.cache's
        early_init = getattr(self.cache, "early_initialization", None)  # the views need the tensors before prefill
        if len(self.buckets) > 1 and early_init is not None:
            cfg = model.config
            heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            early_init(batch_size, heads, head_dim, dtype, self.device)
        if not self.cuda:  # no shape and stride checks of each kernel's output in the step's wrapper: its shapes
            # are fixed (~170 Python calls a token; batch 8, 2 Intel cores: the wrapper's own time 2.5 -> 2.1 ms)
            options = {**(options or {}), "size_asserts": False}
        self._compile_kwargs = {"mode": "reduce-overhead" if self.cuda else None, "options": options}

    def _packable(
        self, model: nn.Module, packed_weights: bool | None, batch_size: int, compile: bool, streaming
    ) -> list:
        """The linear modules whose weights the compiled steps read packed (the ``packed_weights`` argument's rule;
        ``True`` was checked by :func:`_refuse_packing`)."""
        if packed_weights is False or self.cuda:
            return []
        forms = cpu_linear.forms()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and cpu_linear.packable(m.weight)]
        if packed_weights is None:  # the default: where measured faster, and where the copies fit
            nbytes = sum(m.weight.numel() * 2 for m in {id(m.weight): m for m in linears}.values())
            free = _available_memory()
            if not (
                compile
                and streaming is _streaming_linear_forward
                and forms.get("bf16_dot")
                and forms.get("packed")
                and PACKED_MIN_BATCH <= batch_size <= cpu_linear.MAX_ROWS
                and free is not None
                and nbytes <= free // 2
            ):
                return []
        return linears

    def _pack(self, linears: list, huge_pages: bool) -> int:
        """Pack each module's weight into one buffer (on huge pages where asked and available) as ``_fast_packed``;
        return the bytes packed (counted in :attr:`huge_page_bytes` too where they are on huge pages)."""
        if not linears:
            return 0
        weights = list({id(m.weight): m.weight for m in linears}.values())  # (a weight shared by modules: once)
        sizes = [-(-w.numel() * 2 // 64) * 64 for w in weights]  # (each 64-byte aligned)
        arena = thp._mapped(sum(sizes)) if huge_pages and thp.available() else None  # (None: refused, warned)
        on_huge = arena is not None
        arena = arena if on_huge else torch.empty(sum(sizes), dtype=torch.uint8)
        offset, packed = 0, {}
        for w, size in zip(weights, sizes):
            packed[id(w)] = cpu_linear.pack_weight(w, out=arena[offset : offset + w.numel() * 2])
            offset += size
        for m in linears:
            m._fast_packed = packed[id(m.weight)]
        if on_huge:
            thp.collapse(arena)
            self.huge_page_bytes += offset
        return offset

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache=None) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            position_ids=pos[None].expand(ids.shape[0], -1),
            use_cache=True,
            cache_position=pos,
            **{self._cache_arg: self.cache if cache is None else cache},
            **self._extra,
        )
        return out.logits[:, -1].argmax(-1)  # (B,)

    def _bucket_cache(self, bucket: int):
        """A cache of ``bucket`` positions whose key/value tensors are views of the first ``bucket`` positions of
        :attr:`cache` (written through, reset with it, sharing its position counter)."""
        if bucket not in self._caches:
            from transformers import StaticCache

            view = StaticCache(config=self.model.config, max_cache_len=bucket)
            for small, full in zip(view.layers, self.cache.layers):
                small.__dict__.update(full.__dict__)  # device, shapes, the shared position counter, ...
                small.max_cache_len = bucket  # the attention mask's length
                small.keys, small.values = full.keys[:, :, :bucket], full.values[:, :, :bucket]  # (B, H, bucket, D)
            self._caches[bucket] = view
        return self._caches[bucket]

    def _step_for(self, bucket: int):
        """The one-token step attending over ``bucket`` cache positions. Each bucket's step is a function with a
        code object of its own: dynamo keeps compiled graphs per code object, and once guard evaluation is skipped
        a code object must hold a single graph."""
        if bucket not in self._steps:
            namespace: dict = {}
            scope = {"forward": self._forward, "cache": self._bucket_cache(bucket)}
            exec("def step(ids, pos):\n    return forward(ids, pos, cache)\n", scope, namespace)
            step = namespace["step"]
            if self.compiled:  # CUDA: replayed as one CUDA graph per token
                step = torch.compile(step, fullgraph=True, dynamic=False, **self._compile_kwargs)
            self._steps[bucket] = step
        return self._steps[bucket]

    def _call_step(self, step, nxt: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return step(nxt[:, None], pos).clone()  # clone: a CUDA-graph replay overwrites its output buffer

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` (B, T): returns the ``max_new_tokens`` new tokens (B, N).

        No end-of-sequence stop: every row gets exactly ``max_new_tokens`` tokens (cut them after EOS if needed).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(
                f"FastDecoder was built for batch_size={self.batch_size}; got input_ids of shape "
                f"{tuple(input_ids.shape)}. Build another FastDecoder for another batch size."
            )
        if (
            input_ids.shape[1] == 0
            or input_ids.dtype == torch.bool
            or input_ids.dtype.is_floating_point
            or input_ids.dtype.is_complex
        ):
            raise ValueError(
                f"input_ids must be token ids (an integer tensor) with at least one token per row; got shape "
                f"{tuple(input_ids.shape)}, dtype {input_ids.dtype}. Start each row with the BOS token if the prompt "
                "is empty."
            )
        t = input_ids.shape[1]
        if max_new_tokens < 1 or t + max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt ({t}) + max_new_tokens ({max_new_tokens}) must be within max_length={self.max_length} "
                "and max_new_tokens >= 1; build the FastDecoder with a larger max_length."
            )
        input_ids = input_ids.to(self.device)
        config = self.model.config
        config._attn_implementation = self.attn_implementation
        for module in self._rotary:
            module._fast_active = True
        try:
            return self._generate(input_ids, max_new_tokens)
        finally:  # the model outside generate(): the user's attention, cos/sin computed
            config._attn_implementation = self._user_attn
            for module in self._rotary:
                module._fast_active = False

    def _generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        t = input_ids.shape[1]
        self.cache.reset()
        prefill_cache = None  # the whole cache, or the smallest bucket that holds the prompt once initialised
        if len(self.buckets) > 1 and getattr(self.cache.layers[0], "is_initialized", False):
            prefill_cache = self._bucket_cache(next(b for b in self.buckets if b >= t))
        flag = _PREFILL_WXT.set(self._prefill_wxt)
        packed_flag = _PREFILL_PACKED.set(self._prefill_packed)
        config = self.model.config
        if self._prefill_attn is not None:
            config._attn_implementation = self._prefill_attn
        try:
            nxt = self._forward(input_ids, torch.arange(t, device=self.device), prefill_cache)  # prefill, eager
        finally:
            _PREFILL_WXT.reset(flag)
            _PREFILL_PACKED.reset(packed_flag)
            config._attn_implementation = self.attn_implementation
        tokens = [nxt]
        positions = torch.arange(t, t + max_new_tokens, device=self.device)
        i, n_steps = 0, max_new_tokens - 1  # step i feeds the token at position t + i
        while i < n_steps:
            bucket = next(b for b in self.buckets if b > t + i)  # holds positions 0 .. t + i
            end = min(n_steps, bucket - t)  # the steps that fit in this bucket
            step = self._step_for(bucket)
            if self.compiled and bucket not in self._warm:  # the first call compiles, with guards evaluated
                nxt = self._call_step(step, nxt, positions[i : i + 1])
                tokens.append(nxt)
                i += 1
                self._warm.add(bucket)
            # later calls skip dynamo's guard evaluation: the shapes are the ones checked above
            with _skip_guards(self.compiled):
                for j in range(i, end):
                    nxt = self._call_step(step, nxt, positions[j : j + 1])
                    tokens.append(nxt)
            i = end
        return torch.stack(tokens, 1)  # (B, N)
