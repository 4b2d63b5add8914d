"""Parallelism and memory policies applied to a built model from the outside (the model knows none of this).

- Activation checkpointing, three modes, per decoder layer (through the layers' ``GradientCheckpointingLayer``
  hook, so FSDP's hooks stay outside the recomputed region):

  * ``none``: keep every activation;
  * ``full``: keep only each layer's input, recompute the whole layer in backward;
  * ``selective``: the paper's "save the activations that are expensive to compute, such as the outputs of linear
    layers": matmuls and attention outputs are saved, the cheap element-wise ops (RMSNorm, rotary, SiLU·mul,
    residual adds) are recomputed (``torch.utils.checkpoint`` with a selective policy).

- FSDP2: ``fully_shard`` on every decoder layer (the model's ``_no_split_modules``) and on the root, optionally
  with bf16 parameters and fp32 gradient reduction. Works on CUDA (NCCL) and on CPU (gloo).

- Regional compilation: ``torch.compile`` of every decoder layer's ``forward`` in place (weight names unchanged).
  Order: activation checkpointing, then FSDP2, then compilation, so that the checkpoint (and its selective policy)
  is traced inside the compiled region while FSDP2's hooks stay outside it, in ``__call__``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

__all__ = [
    "AC_MODES",
    "apply_activation_checkpointing",
    "selective_policy",
    "apply_fsdp2",
    "apply_compile",
    "decoder_layers",
]

AC_MODES = ("none", "full", "selective")


def _saved_ops() -> set:
    aten = torch.ops.aten
    names = [
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_mm",
        "linear",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    ]
    ops = set()
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            ops.add(packet.default)
    return ops


_SAVE = None


def selective_policy(ctx, op, *args, **kwargs):
    """Save matmul / attention outputs, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    global _SAVE
    if _SAVE is None:
        _SAVE = _saved_ops()
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (classes named in ``_no_split_modules``), also once FSDP2 has swapped their class
    for an ``FSDP<Layer>`` subclass."""
    names = set(getattr(model, "_no_split_modules", None) or ["LlamaDecoderLayer"])
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Turn on activation checkpointing of ``mode`` (see module doc) for every decoder layer of ``model``."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        if any(getattr(layer, "gradient_checkpointing", False) for layer in decoder_layers(model)):
            model.activation_checkpointing_disable() if hasattr(
                model, "activation_checkpointing_disable"
            ) else model.gradient_checkpointing_disable()
        return
    kwargs: dict = {"use_reentrant": False}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, selective_policy)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def apply_fsdp2(
    model: nn.Module,
    mesh=None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` with FSDP2 (``torch.distributed.fsdp.fully_shard``) per decoder layer, then the root.

    Args:
        model: the model, already on its device.
        mesh: a 1-D ``DeviceMesh`` (default: all ranks of the default process group on the model's device type).
        param_dtype: dtype of the gathered parameters for compute (``torch.bfloat16`` for mixed precision).
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: free gathered parameters after forward (ZeRO-3 behaviour).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def apply_compile(model: nn.Module, fullgraph: bool = True, mode: str | None = None) -> nn.Module:
    """Compile every decoder layer's ``forward`` with ``torch.compile`` (regional compilation), in place.

    Identical layers share one compiled graph (their parameters are graph inputs), so compile time is that of one
    layer. Inductor fuses what runs between the matmuls: RMSNorm, rotary, SiLU·mul, residual adds and the casts of
    mixed precision. Call it after :func:`apply_activation_checkpointing` and :func:`apply_fsdp2` (see module doc):
    the bound ``forward`` taken here is the one that checkpoints, and FSDP2 changes the layer's class.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"found no decoder layer to compile in {type(model).__name__}")
    for layer in layers:
        if getattr(layer, "_regionally_compiled", False):
            continue
        layer.forward = torch.compile(layer.forward, fullgraph=fullgraph, mode=mode)
        layer._regionally_compiled = True
    return model
