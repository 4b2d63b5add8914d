"""LLaMA-1 configuration (Touvron et al., 2023) with the paper's named presets.

The field names are the ones of stock ``transformers.LlamaConfig`` so that a ``config.json`` written by
either class is read by the other with the same meaning. ``model_type`` is ``"llama"`` for the same reason:
stock transformers loads our folders into its own Llama classes without ``trust_remote_code``.

Derived sizes live here and nowhere else:

- ``head_dim = hidden_size // num_attention_heads`` (must divide, must be even for rotary pairs);
- ``intermediate_size`` (SwiGLU width) = ``multiple_of``-rounded ``int(2 * 4 * hidden_size / 3)``, the rule of
  Meta's ``llama/model.py``: 11008 / 13824 / 17920 / 22016 for 7B / 13B / 33B / 65B.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

__all__ = ["LlamaConfig", "LlamaPreset", "PRESETS", "get_preset", "llama_ffn_dim"]


def llama_ffn_dim(hidden_size: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU hidden width as in Meta's ``FeedForward``: 2/3 of 4d, optionally scaled, rounded up.

    Args:
        hidden_size: model width ``d``.
        multiple_of: round the width up to a multiple of this (256 in LLaMA-1).
        ffn_dim_multiplier: optional extra factor (``None`` in LLaMA-1; used by later LLaMA versions).
    """
    if multiple_of <= 0:
        raise ValueError(f"multiple_of must be a positive integer, got {multiple_of}.")
    hidden = int(2 * (4 * hidden_size) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class LlamaPreset:
    """A named model size: architecture plus the paper's training hyperparameters (Table 2).

    Attributes:
        hidden_size, num_attention_heads, num_hidden_layers: the architecture (Table 2 columns).
        peak_learning_rate: AdamW peak LR of the paper's recipe.
        batch_size_tokens: global batch size in tokens (4M in the paper).
        train_tokens: number of tokens the paper trained on.
        max_position_embeddings, vocab_size: context length and vocabulary.
        description: where the numbers come from.
    """

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    peak_learning_rate: float
    batch_size_tokens: int
    train_tokens: int
    max_position_embeddings: int = 2048
    vocab_size: int = 32000
    description: str = ""

    def config_kwargs(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
        }


_4M = 4 * 1024 * 1024  # "4M tokens" per batch: 2048 sequences of 2048 tokens
PRESETS: dict[str, LlamaPreset] = {
    # Table 2 of the paper: params, dimension, n heads, n layers, learning rate, batch size, n tokens.
    "7B": LlamaPreset(4096, 32, 32, 3.0e-4, _4M, 1_000_000_000_000, description="LLaMA-7B, Table 2"),
    "13B": LlamaPreset(5120, 40, 40, 3.0e-4, _4M, 1_000_000_000_000, description="LLaMA-13B, Table 2"),
    "33B": LlamaPreset(6656, 52, 60, 1.5e-4, _4M, 1_400_000_000_000, description="LLaMA-33B, Table 2"),
    "65B": LlamaPreset(8192, 64, 80, 1.5e-4, _4M, 1_400_000_000_000, description="LLaMA-65B, Table 2"),
    # Not in the paper: small shapes for tests, demos, CPU and single-GPU benchmarks. Their learning rates
    # follow the paper's trend of larger LR for smaller models; batch sizes fit one machine.
    "tiny": LlamaPreset(
        64, 4, 2, 1.0e-3, 8 * 128, 10_000_000, max_position_embeddings=256, description="tests (2 layers, width 64)"
    ),
    "small": LlamaPreset(
        256, 4, 4, 1.0e-3, 16 * 256, 100_000_000, max_position_embeddings=512, description="CPU demos"
    ),
    "100M": LlamaPreset(768, 12, 12, 6.0e-4, 512 * 1024, 10_000_000_000, description="CPU benchmarks"),
    "1B": LlamaPreset(2048, 16, 22, 4.0e-4, _4M, 100_000_000_000, description="single-GPU benchmarks"),
}
PRESETS["30B"] = PRESETS["33B"]  # Meta's release names the 33B folder "30B"


def get_preset(name: str) -> LlamaPreset:
    """Look a preset up by name (``7B``, ``13B``, ``33B``/``30B``, ``65B``, ``tiny``, ``small``, ``100M``, ``1B``)."""
    key = name if name in PRESETS else name.upper() if name.upper() in PRESETS else name.lower()
    if key not in PRESETS:
        raise ValueError(f"Unknown LLaMA preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[key]


class LlamaConfig(PretrainedConfig):
    r"""Configuration of a LLaMA-1 decoder (pre-norm RMSNorm, SwiGLU, rotary embeddings, no biases).

    Defaults are LLaMA-7B. Use :meth:`from_preset` for the paper's other sizes.

    Args:
        vocab_size: vocabulary size (32000 for Meta's tokenizer).
        hidden_size: model width ``d``.
        intermediate_size: SwiGLU width; ``None`` derives it from ``multiple_of`` (and ``ffn_dim_multiplier``).
        num_hidden_layers: number of decoder layers.
        num_attention_heads: number of query heads; must divide ``hidden_size``.
        num_key_value_heads: key/value heads (``None`` = ``num_attention_heads``, LLaMA-1's multi-head attention).
        head_dim: per-head width; ``None`` = ``hidden_size // num_attention_heads``. Must be even (rotary pairs).
        hidden_act: activation of the gate (``"silu"`` for SwiGLU).
        max_position_embeddings: context length (2048).
        initializer_range: std of the normal init of linear and embedding weights.
        rms_norm_eps: epsilon of RMSNorm (1e-6 as in ``params.json``).
        use_cache: return key/value caches from forward.
        pad_token_id, bos_token_id, eos_token_id: LLaMA has BOS 1, EOS 2 and no pad token.
        tie_word_embeddings: LLaMA's output projection is separate from the embedding (``False``).
        rope_parameters: ``{"rope_type": "default", "rope_theta": 10000.0}``; only the default type is supported.
        attention_bias, mlp_bias: must stay ``False`` (LLaMA has no biases); present for stock-config compatibility.
        attention_dropout: dropout on attention probabilities (0.0 in the paper).
        pretraining_tp: kept for stock-config compatibility; must be 1.
        multiple_of: rounding of the derived SwiGLU width (256).
        ffn_dim_multiplier: optional factor on the derived SwiGLU width (``None`` in LLaMA-1).
    """

    model_type = "llama"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # Tensor-parallel plan, declared as data (same strings as stock Llama; applied by transformers' TP code).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int | None = None
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    pretraining_tp: int | None = 1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = llama_ffn_dim(self.hidden_size, self.multiple_of, self.ffn_dim_multiplier)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self._check()

    # ----------------------------------------------------------------------------------------------- checks
    def _check(self) -> None:
        """Fail at construction with a message that says what is wrong and how to fix it."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick a head count that divides it, e.g. "
                f"{self.hidden_size // 128 or 1} heads of 128."
            )
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"head_dim ({self.head_dim}) x num_attention_heads ({self.num_attention_heads}) must equal "
                f"hidden_size ({self.hidden_size}) in LLaMA; leave head_dim unset to derive it."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head_dim = hidden_size / num_attention_heads = {self.head_dim} is odd; rotary embeddings rotate "
                "pairs of channels, so it must be even. Change hidden_size or num_attention_heads."
            )
        kv = self.num_key_value_heads
        if not isinstance(kv, int) or kv <= 0 or self.num_attention_heads % kv != 0:
            raise ValueError(
                f"num_key_value_heads ({kv}) must be a positive divisor of num_attention_heads "
                f"({self.num_attention_heads}); LLaMA-1 uses num_key_value_heads = num_attention_heads."
            )
        if self.hidden_act != "silu":
            raise ValueError(f"LLaMA's SwiGLU uses hidden_act='silu', got {self.hidden_act!r}.")
        if self.attention_bias or self.mlp_bias:
            raise ValueError("LLaMA has no biases: attention_bias and mlp_bias must be False.")
        if self.pretraining_tp not in (None, 1):
            raise ValueError(f"pretraining_tp={self.pretraining_tp} is not supported; set it to 1.")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}.")
        if self.max_position_embeddings <= 0:
            raise ValueError(f"max_position_embeddings must be positive, got {self.max_position_embeddings}.")
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}.")
        rope = self.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"rope_type {rope.get('rope_type')!r} is not supported: LLaMA-1 uses plain rotary embeddings "
                "(rope_type 'default')."
            )
        theta = rope.get("rope_theta", 10000.0)
        if not (isinstance(theta, (int, float)) and theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {theta!r}.")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(self, name)
            for i in ids if isinstance(ids, list) else [ids]:
                if i is not None and not 0 <= i < self.vocab_size:
                    raise ValueError(f"{name}={i} is outside the vocabulary [0, {self.vocab_size}).")

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))

    # ---------------------------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """Build the config of a named size (``7B``, ``13B``, ``33B``/``30B``, ``65B``, ``tiny``, ``small`` ...).

        Args:
            name: preset name, see :data:`PRESETS`.
            overrides: any config field, e.g. ``vocab_size=1000`` for a model with a small tokenizer.
        """
        kwargs = get_preset(name).config_kwargs()
        kwargs.update(overrides)
        return cls(**kwargs)

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of :class:`LlamaForCausalLM` built from this config (untied head)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv_dim = self.num_key_value_heads * self.head_dim
        attn = d * d * 2 + d * kv_dim * 2  # q, o + k, v
        mlp = 3 * d * f  # gate, up, down
        per_layer = attn + mlp + 2 * d  # two RMSNorm weights
        total = self.num_hidden_layers * per_layer + d  # final norm
        if include_embeddings:
            total += v * d * (1 if self.tie_word_embeddings else 2)
        return total
