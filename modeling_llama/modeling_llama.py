"""LLaMA-1 decoder (Touvron et al., 2023): pre-norm RMSNorm, SwiGLU MLP, rotary embeddings, no biases.

Weight names are those of stock ``transformers.LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj`` ... ``lm_head``), so checkpoints move between the two without renaming.
Meta's names and the q/k row permutation between Meta's interleaved rotary and the half-split rotary used
here live only in ``convert/``.

The model knows nothing of training or distribution: activation checkpointing policies, FSDP/DeepSpeed wrapping
and compilation are applied from ``training/``. Attention goes through transformers' attention-interface registry
(``eager``, ``sdpa`` (default), ``flash_attention_2`` when installed, ``flex_attention``, and ``blocked_causal``,
registered here: exact math attention that skips the blocks a causal mask hides, fastest for training on CPU),
the causal/padding mask
through ``transformers.masking_utils`` and the KV cache through ``transformers.cache_utils`` (Dynamic or Static).

Shapes: B batch, T query length, S key length (cache + T), D hidden, H heads, Hk key/value heads, Dh head dim,
F SwiGLU width, V vocabulary.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_llama import LlamaConfig
from .cpu_linear import SmallBatchLinear as Linear  # nn.Linear; inference on a few CPU rows streams the weight once
from .linear_cross_entropy import LlamaLMHead

# transformers 5.24 renamed the KV cache argument and output field from ``past_key_values`` to ``cache`` (the old
# argument warns until 5.40). Our forwards take either name; the mask builder and the outputs get the installed
# version's own.
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
_OUTPUT_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache given under either name (``cache``, or ``past_key_values`` as transformers < 5.24 calls it)."""
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "Got both `cache` and `past_key_values`: they are two names of the same argument (`past_key_values` is "
            "its name before transformers 5.24); pass the cache once."
        )
    return cache if cache is not None else past_key_values


def _output_cache(outputs) -> Cache | None:
    return getattr(outputs, _OUTPUT_CACHE_FIELD, None)


__all__ = [
    "LlamaPreTrainedModel",
    "LlamaModel",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "LlamaRMSNorm",
    "LlamaRotaryEmbedding",
    "LlamaAttention",
    "LlamaMLP",
    "LlamaDecoderLayer",
    "apply_rotary_pos_emb",
]


class LlamaRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019) as in Meta's code: normalise in float32, cast back, then scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LlamaRotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021) in the half-split layout of HF checkpoints.

    Channel ``i`` of a head is paired with channel ``i + Dh/2`` (``rotate_half``). Meta's code pairs ``2i`` with
    ``2i+1`` instead; the two are the same function once q/k projection rows are permuted, which ``convert/`` does.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)  # (Dh/2,)
        # Name expected by transformers' generic init code for rotary modules.
        self.original_inv_freq = nn.Buffer(self.inv_freq.clone(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponents)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``cos, sin`` of shape (B, T, Dh) in ``x``'s dtype for ``position_ids`` of shape (B, T)."""
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):  # angles always in float32
            freqs = position_ids[..., None].float() * inv_freq  # (B, T, Dh/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, Dh)
            cos, sin = emb.cos(), emb.sin()
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` (B, H, T, Dh) and ``k`` (B, Hk, T, Dh) by the angles in ``cos``/``sin`` (B, T, Dh)."""
    cos = cos.unsqueeze(unsqueeze_dim)  # (B, 1, T, Dh)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020), width F = 2/3·4D rounded."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, F) -> (B, T, D)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hk, S, Dh) -> (B, Hk * n_rep, S, Dh) for grouped-query attention (a no-op in LLaMA-1)."""
    if n_rep == 1:
        return hidden_states
    b, hk, s, dh = hidden_states.shape
    return hidden_states[:, :, None].expand(b, hk, n_rep, s, dh).reshape(b, hk * n_rep, s, dh)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: softmax(q kᵀ · scaling + mask) v, softmax in float32. Returns (B, T, H, Dh), probs."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    elif query.shape[2] > 1:  # no mask given: plain causal attention aligned to the end of the keys
        t, s = query.shape[2], key.shape[2]
        causal = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(diagonal=s - t)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)  # (B, H, T, Dh)
    return out.transpose(1, 2).contiguous(), probs  # (B, T, H, Dh)


BLOCKED_CAUSAL = "blocked_causal"
_BLOCK = 64  # query rows per block; 64 measured fastest at T=512 on CPU (64: 0.058 s, 128: 0.065, 256: 0.072)


def blocked_causal_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The reference math, softmax(q kᵀ · scaling + mask) v in float32, one block of 64 query rows at a time,
    each block against only the keys a causal mask can let it see: the fully masked blocks above the diagonal are
    never computed. It does about half the flops of full attention in plain matrix products, and its backward is
    autograd's, with no recomputation. On CPU, training at T=512 (fp32, 12 heads of 64) it ran forward + backward
    in 0.06 s per layer against 0.09 s for SDPA's flash kernel; it saves the probabilities (about half of B·H·T·S
    floats), so on GPUs, and for long sequences, ``sdpa``/``flash_attention_2`` are the better choice.

    ``attention_mask`` is ``None`` (plain causal, as SDPA's ``is_causal``; a single query row sees all keys) or
    the boolean/additive 4D mask of ``transformers.masking_utils.sdpa_mask`` (padding, packed sequences, a static
    cache), which is always causal, so skipping the keys past a block's last query stays exact.
    Returns (B, T, H, Dh), None.
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    t, s = query.shape[2], key.shape[2]
    # The last key query row 0 may see. No mask means what it means for SDPA's ``is_causal``: one query row sees
    # every key, several are causal from key 0 (a prefill, or a static cache's first call). With a mask, which is
    # exact, s - t is an upper bound (queries are at most the last t positions), so no visible key is skipped.
    offset = s - t if attention_mask is not None or t == 1 else 0
    low = torch.finfo(torch.float32).min  # not -inf: a fully masked row (left padding) gives uniform, not NaN
    outs = []
    for start in range(0, t, _BLOCK):
        end = min(start + _BLOCK, t)
        kend = min(s, end + offset)  # keys beyond this are masked for every row of the block
        scores = torch.matmul(query[:, :, start:end], key[:, :, :kend].transpose(2, 3)).float() * scaling
        if attention_mask is None:  # causal: row r sees keys <= r + offset
            rows = torch.arange(start, end, device=query.device)[:, None] + offset
            masked = torch.arange(kend, device=query.device)[None, :] > rows  # (T_b, S_b)
            scores = scores.masked_fill(masked, low)
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[:, :, start:end, :kend], low)
        else:
            scores = scores + attention_mask[:, :, start:end, :kend]
        probs = F.softmax(scores, dim=-1).to(query.dtype)  # (B, H, T_b, S_b)
        probs = F.dropout(probs, p=dropout, training=module.training)
        outs.append(torch.matmul(probs, value[:, :, :kend]))  # (B, H, T_b, Dh)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (B, H, T, Dh)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, Dh)


def _register_blocked_causal() -> None:
    """Make ``attn_implementation="blocked_causal"`` a name transformers knows: the attention function and, for
    its mask, ``sdpa_mask`` (``None`` for plain causal batches, a boolean mask for padding or packing)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    ALL_ATTENTION_FUNCTIONS.register(BLOCKED_CAUSAL, blocked_causal_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(BLOCKED_CAUSAL, sdpa_mask)


_register_blocked_causal()


class LlamaAttention(nn.Module):
    """Causal multi-head self-attention with rotary q/k and no biases."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        d, dh = config.hidden_size, self.head_dim
        self.q_proj = Linear(d, self.num_heads * dh, bias=False)
        self.k_proj = Linear(d, self.num_key_value_heads * dh, bias=False)
        self.v_proj = Linear(d, self.num_key_value_heads * dh, bias=False)
        self.o_proj = Linear(self.num_heads * dh, d, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.shape
        hidden_shape = (bsz, q_len, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hk, T, Dh)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hk, T, Dh)

        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)

        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hk, S, Dh)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )  # (B, T, H, Dh)
        attn_output = attn_output.reshape(bsz, q_len, -1).contiguous()  # (B, T, H*Dh)
        return self.o_proj(attn_output), attn_weights


class LlamaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        if output_attentions:
            return hidden_states, attn_weights
        return hidden_states


AUTO_MAP = {
    "AutoConfig": "configuration_llama.LlamaConfig",
    "AutoModel": "modeling_llama.LlamaModel",
    "AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_llama.LlamaForSequenceClassification",
}


def model_card(config: LlamaConfig, n_params: int, dtype: torch.dtype | str, source: str = "") -> str:
    """A Hub model card (YAML metadata + usage) for a LLaMA folder.

    Args:
        config: the model's config.
        n_params: number of parameters.
        dtype: dtype of the saved weights.
        source: optional sentence on where the weights come from (e.g. a conversion).
    """
    c = config
    meta = "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: text-generation",
            "tags:",
            "- llama",
            "- llama-1",
            "- text-generation",
            "---",
        ]
    )
    return f"""{meta}

# LLaMA-1 architecture model ({n_params / 1e6:,.1f}M parameters)

A decoder in the architecture of LLaMA (Touvron et al., 2023, "LLaMA: Open and Efficient Foundation Language
Models"): pre-norm RMSNorm, SwiGLU feed-forward, rotary position embeddings, no biases, untied output head.

| hidden size | layers | heads | FFN width | context | vocabulary | dtype |
|---|---|---|---|---|---|---|
| {c.hidden_size} | {c.num_hidden_layers} | {c.num_attention_heads} | {c.intermediate_size} | \
{c.max_position_embeddings} | {c.vocab_size} | {str(dtype).replace("torch.", "")} |
{source}

## Usage

Stock transformers (its own Llama classes, same weights and logits):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")
```

The classes this folder was written with (code files included, no installation needed):

```python
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
```

The tokenizer gives the ids of `sentencepiece` on `tokenizer.model` (BOS prepended). LLaMA has no pad token:
batches are padded with `<unk>` (id 0) on the left, and the attention mask carries the padding.
"""


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    commit_message: str = "Upload LLaMA",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create ``repo_id`` if needed and upload every file of ``folder`` in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name))
    ]
    return api.create_commit(
        repo_id=repo_id, operations=operations, commit_message=commit_message, revision=revision, create_pr=create_pr
    )


class LlamaPreTrainedModel(PreTrainedModel):
    config_class = LlamaConfig
    config: LlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # One decoder layer is the unit that device_map="auto" never splits and that FSDP wraps.
    _no_split_modules = ["LlamaDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]  # buffer saved by some old conversions

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` plus a full ``auto_map`` and a model card (README.md).

        The folder loads in stock transformers into its own Llama classes (``model_type="llama"``, stock weight
        names) and, with ``trust_remote_code=True``, into these classes from the code files copied next to it.
        An existing README.md in the folder is kept.
        """
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        card = os.path.join(save_directory, "README.md")
        if not os.path.exists(card) and os.path.isdir(save_directory):
            with open(card, "w", encoding="utf-8") as f:
                f.write(model_card(self.config, sum(p.numel() for p in self.parameters()), self.dtype))
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "5GB",
        **kwargs,
    ):
        """Upload the folder :meth:`save_pretrained` writes (weights, config, code files, our model card).

        transformers' generic ``push_to_hub`` replaces the model card with its template; this keeps ours.
        """
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, max_shard_size=max_shard_size)
            return push_folder_to_hub(
                tmp,
                repo_id,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LlamaRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LlamaRotaryEmbedding):  # non-persistent buffers are not in checkpoints
            inv_freq = module.compute_inv_freq(device=module.inv_freq.device)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


class LlamaModel(LlamaPreTrainedModel):
    """The decoder stack without a head: embeddings -> N pre-norm blocks -> final RMSNorm."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the decoder.

        Args:
            input_ids: (B, T) token ids; or give ``inputs_embeds`` (B, T, D) instead.
            attention_mask: (B, S) with 1 for real tokens and 0 for padding (left or right), or a prepared 4D mask.
            position_ids: (B, T) positions; default ``cache_length + arange(T)``. Generation derives them from the
                mask so that left-padded rows get the positions of unpadded ones.
            cache: a ``Cache`` (``DynamicCache``, ``StaticCache`` ...) to extend; created if ``use_cache``.
                ``past_key_values`` is accepted as its other name (transformers < 5.24 calls it that).
            use_cache: return the cache (defaults to ``config.use_cache``; off while training).
            output_attentions: return per-layer attention probabilities (needs ``attn_implementation="eager"``).
            output_hidden_states: return the embeddings and the output of every layer.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        cache = _one_cache(cache, past_key_values)
        if self.training and torch.is_grad_enabled() and any(layer.gradient_checkpointing for layer in self.layers):
            use_cache, cache = False, None  # recomputation in backward would append to the cache a second time

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        fresh_cache = use_cache and cache is None
        if fresh_cache:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)  # (1, T)

        # None (sdpa's is_causal fast path), a 4D additive/boolean mask, or a backend-specific block mask.
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            # A cache created just now is empty: leave it out so that packed sequences (position_ids restarting
            # at 0, no attention mask) still get their block-diagonal mask when forward is called with a cache.
            position_ids=position_ids,
            **{_MASK_CACHE_ARG: None if fresh_cache else cache},
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)  # cos, sin: (B, T, Dh)
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for layer in self.layers[: self.config.num_hidden_layers]:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            out = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                output_attentions=output_attentions,
                **kwargs,
            )
            if output_attentions:
                hidden_states, attn = out
                all_attn.append(attn)
            else:
                hidden_states = out
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attn) if all_attn is not None else None,
            **{_OUTPUT_CACHE_FIELD: cache},
        )
        return output if return_dict else output.to_tuple()


class LlamaForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    """LLaMA with its (untied) language-model head; ``generate()`` comes from ``GenerationMixin``."""

    # Tied only if a config asks for it (LLaMA's default is untied), as in stock transformers.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = LlamaLMHead(config.hidden_size, config.vocab_size, bias=False)  # an nn.Linear
        self.post_init()
        if self.generation_config is not None and self.generation_config.pad_token_id is None:
            # LLaMA has no pad token; batched generation fills finished rows with <unk> (0), never with EOS.
            self.generation_config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (B, T, V) and, with ``labels`` (B, T), the next-token cross-entropy.

        Labels are the input ids (shifted inside the loss); positions labelled -100 carry no loss; a
        ``shift_labels`` keyword (already shifted, (B, T)) may replace them, as in transformers' loss.
        ``logits_to_keep=k`` computes logits for the last k positions only (generation needs 1).
        ``return_logits=False`` with labels computes the loss fused with the LM head, chunk by chunk, without the
        (B, T, V) logits (``logits`` is then None): the same loss and gradients, less memory, and faster where
        the logits' buffers cost page faults (CPU). See ``linear_cross_entropy``.
        """
        shift_labels = kwargs.pop("shift_labels", None)
        fused = not return_logits and (labels is not None or shift_labels is not None)
        if fused and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("return_logits=False computes the loss over every position; leave logits_to_keep at 0")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,  # LlamaModel takes either name (and refuses both)
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = loss = None
        if fused:
            if shift_labels is None:
                shift_labels = F.pad(labels[..., 1:], (0, 1), value=-100)  # (B, T): targets of each position
            loss = self.lm_head(
                hidden_states,
                targets=shift_labels.to(hidden_states.device),
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])  # (B, T', V)
            if labels is not None or shift_labels is not None:
                loss = self.loss_function(
                    logits=logits,
                    labels=labels,
                    vocab_size=self.config.vocab_size,
                    shift_labels=shift_labels,
                    **kwargs,
                )

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_OUTPUT_CACHE_FIELD: _output_cache(outputs)},
        )
        return output if return_dict else output.to_tuple()


class LlamaForSequenceClassification(LlamaPreTrainedModel):
    """LLaMA with a linear score head on the last real token of each row (left or right padding)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,  # LlamaModel takes either name (and refuses both)
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # (B, T, C)
        bsz, seq_len = logits.shape[:2]
        positions = torch.arange(seq_len, device=logits.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask[:, -seq_len:].to(logits.device)
            last = (positions * mask).argmax(-1)  # last real token, whichever side the padding is on
        elif input_ids is not None and self.config.pad_token_id is not None:
            not_pad = (input_ids != self.config.pad_token_id).to(logits.device).int()
            last = (positions * not_pad).argmax(-1)
        else:
            last = torch.full((bsz,), seq_len - 1, device=logits.device)
        pooled = logits[torch.arange(bsz, device=logits.device), last]  # (B, C)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        output = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled,
            hidden_states=None,
            attentions=None,
            **{_OUTPUT_CACHE_FIELD: _output_cache(outputs)},
        )
        return output if return_dict else output.to_tuple()
