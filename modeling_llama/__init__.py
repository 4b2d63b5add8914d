"""LLaMA-1 for the Hugging Face ecosystem: config, model and tokenizers.

``import modeling_llama`` exposes the classes and registers them with the Auto* API:

- ``AutoModel`` / ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` / ``AutoTokenizer`` map
  *our* :class:`LlamaConfig` class to our model and tokenizer classes, so
  ``AutoModelForCausalLM.from_config(modeling_llama.LlamaConfig.from_preset("tiny"))`` builds our model. The
  mappings are keyed by the config class, so stock ``transformers.LlamaConfig`` (and every stock checkpoint)
  still resolves to stock classes: importing this package changes nothing for other code in the process.
- ``AutoConfig`` is deliberately not re-registered for ``model_type="llama"`` (that would hijack stock Llama
  checkpoints). Instead every folder we save carries ``auto_map`` and our code files, so
  ``AutoConfig/AutoModelForCausalLM/AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`` loads our
  classes (even where this package is not installed), while the same call without ``trust_remote_code`` loads
  stock transformers' Llama classes with identical logits.
"""

from __future__ import annotations

from .configuration_llama import PRESETS, LlamaConfig, LlamaPreset, get_preset, llama_ffn_dim
from .fast_decode import FastDecoder
from .modeling_llama import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    LlamaPreTrainedModel,
)
from .tokenization_llama import LlamaTokenizer
from .tokenization_llama_fast import LlamaTokenizerFast, convert_sentencepiece_to_tokenizer

__all__ = [
    "PRESETS",
    "LlamaConfig",
    "LlamaPreset",
    "get_preset",
    "llama_ffn_dim",
    "LlamaPreTrainedModel",
    "LlamaModel",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "FastDecoder",
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "convert_sentencepiece_to_tokenizer",
    "register_auto_classes",
]


def register_auto_classes() -> None:
    """Register our classes with the Auto* factories (idempotent; done on import)."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    # Keyed by our config *class*: stock LlamaConfig keeps resolving to stock classes.
    AutoModel.register(LlamaConfig, LlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(LlamaConfig, LlamaForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(LlamaConfig, LlamaForSequenceClassification, exist_ok=True)
    # Not AutoTokenizer.register(): it also registers the classes *by name*, which would make every stock
    # checkpoint whose tokenizer_config says "LlamaTokenizer" load ours. The config-class mapping alone is safe.
    TOKENIZER_MAPPING.register(LlamaConfig, LlamaTokenizerFast, exist_ok=True)

    # Saved folders carry auto_map + code files so that trust_remote_code loads these classes.
    LlamaConfig.register_for_auto_class("AutoConfig")
    LlamaModel.register_for_auto_class("AutoModel")
    LlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    LlamaForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    LlamaTokenizer.register_for_auto_class("AutoTokenizer")
    LlamaTokenizerFast.register_for_auto_class("AutoTokenizer")


register_auto_classes()
