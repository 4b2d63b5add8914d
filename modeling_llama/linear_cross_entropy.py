"""The language-model head and its next-token cross-entropy in one pass, chunk by chunk, without the logits.

``F.cross_entropy(hidden @ W.T, targets)`` materialises the (N, V) logits, the log-softmax and, in backward, their
gradient: three N·V float32 buffers (785 MB at N=2048, V=32000), each freshly allocated (on CPU: page faults on
every page), written once and read once. Here the rows go through in chunks of ~32M logits in one reused buffer:
for each chunk the logits, the loss terms and the gradient ``(softmax - onehot) / n`` are computed in place and
turned at once into that chunk's gradient for the hidden states and its contribution to the weight's gradient.
Backward only scales the two stored gradients. Same matmul flops as the plain path, no recomputation, and peak
memory of one chunk instead of the full logits (plus the weight-sized gradient, which backward would allocate
anyway).

Numerics: the log-sum-exp, loss and softmax gradient are float32 whatever the compute dtype (as stock casts
logits to float32); under autocast the matmuls run in the autocast dtype, the weight gradient accumulates in
float32 across chunks.
"""

from __future__ import annotations

import torch

from .cpu_linear import SmallBatchLinear

_CHUNK_LOGITS = 1 << 25  # logits per chunk (128 MB in float32; 1024 rows of a 32,000-token vocabulary)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, divisor):  # (N, D), (V, D), (N,)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = torch.promote_types(hidden.dtype, weight.dtype)
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            n, vocab = h.shape[0], w.shape[0]
            valid = targets != ignore_index  # (N,)
            safe = torch.where(valid, targets, 0)
            divisor = valid.sum().float() if divisor is None else divisor
            # every row's gradient carries 1/divisor (0 for ignored rows): scaled once, here, not in backward
            scale = valid.float() / divisor  # (N,)
            need_h, need_w = ctx.needs_input_grad[:2]  # both False under no_grad: the loss alone
            grad_h = torch.empty_like(h) if need_h else None  # (N, D)
            # the first chunk writes the weight's gradient, the others add to it: no pass to zero 98 MB first
            # (zeros only for an empty batch, which has no first chunk)
            new_w = torch.zeros if n == 0 else torch.empty
            grad_w = new_w(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            chunk = max(1, min(n, _CHUNK_LOGITS // vocab))
            buf = torch.empty(chunk, vocab, dtype=torch.float32, device=hidden.device)  # reused by every chunk
            low = torch.empty(chunk, vocab, dtype=dtype, device=hidden.device) if dtype != torch.float32 else None
            rows = torch.arange(chunk, device=hidden.device)
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                c = end - start
                hc, tc, sc = h[start:end], safe[start:end], scale[start:end]
                z = buf[:c]  # (C, V)
                if low is None:
                    torch.mm(hc, w.T, out=z)  # logits
                else:
                    z.copy_(torch.mm(hc, w.T, out=low[:c]))
                top = z.amax(dim=1, keepdim=True)  # (C, 1)
                picked = z.gather(1, tc[:, None])  # (C, 1)
                z.sub_(top).exp_()
                total = z.sum(dim=1, keepdim=True)  # (C, 1)
                loss += ((total.log() + top - picked).squeeze(1) * valid[start:end]).sum()
                if not (need_h or need_w):
                    continue
                z.mul_(sc[:, None] / total)  # softmax / divisor (0 on ignored rows)
                z[rows[:c], tc] -= sc  # d loss / d logits = (softmax - onehot) / divisor
                g = z if low is None else low[:c].copy_(z)
                if need_h:
                    torch.mm(g, w, out=grad_h[start:end])  # (C, D)
                if need_w and low is None and start == 0:
                    torch.mm(g.T, hc, out=grad_w)  # (V, D)
                elif need_w and low is None:
                    grad_w.addmm_(g.T, hc)  # (V, D), in place
                elif need_w and start == 0:
                    grad_w.copy_(g.T @ hc)  # product in the compute dtype, accumulated in float32
                elif need_w:
                    grad_w.add_(g.T @ hc)
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = (hidden.dtype, weight.dtype)
            return loss / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors  # scaled in place: no new buffers (a second backward is refused)
        grad_h = None if grad_h is None else grad_h.mul_(grad_loss).to(ctx.dtypes[0])
        grad_w = None if grad_w is None else grad_w.mul_(grad_loss).to(ctx.dtypes[1])
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` without materialising the logits.

    Args:
        hidden: (..., D) final hidden states.
        weight: (V, D) output projection.
        targets: (...) target ids, aligned with ``hidden`` (already shifted); ``ignore_index`` carries no loss.
        num_items_in_batch: divide the summed loss by this instead of the number of non-ignored targets (what
            transformers' ``Trainer`` passes so that gradient accumulation averages over the whole batch).

    Returns the mean (or ``sum / num_items_in_batch``) loss as a float32 scalar, differentiable in both inputs.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden states {tuple(hidden.shape)}")
    divisor = None
    if num_items_in_batch is not None:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), ignore_index, divisor
    )


class LlamaLMHead(SmallBatchLinear):
    """The output projection (an ``nn.Linear``, weight ``lm_head.weight``): ``head(h)`` gives logits (for a few
    rows on CPU without autograd, a decoding step's, through the streaming kernel: :class:`SmallBatchLinear`),
    ``head(h, targets=...)`` the fused cross-entropy. Calling the module (not reading its weight from outside)
    keeps it working where the weight is only gathered inside the module's forward (DeepSpeed ZeRO-3)."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, **loss_kwargs) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, targets, **loss_kwargs)
