"""The LM head and the next-token cross-entropy together, a chunk of rows at a time.

The full path holds the (B, T, vocab) logits, their float32 log-softmax and their gradient at once:
for the default model at batch 4 x 128 that is 3 x 96 MiB. This one never holds more than one
chunk's logits. The summed loss is the graph's last node before `backward`, so its gradient with
respect to the hidden states is that of the summed loss times one scalar: forward computes it chunk
by chunk while the chunk's logits are at hand (softmax minus one-hot, through the head weight) and
keeps only that (N, C) gradient; backward scales it. The head costs the same two matmuls as the
full path and no recompute. The LM head weight must be frozen (it is: LoRA adapts the block
linears); a trainable head takes the full path. The matmuls may run in BF16 on CPUs with native
BF16 (`cpu_matmul.py`); the softmax and the loss stay in float32."""

from __future__ import annotations

import torch

CHUNK_ROWS = 128  # (128, 49152) float32 logits: 24 MiB per chunk for the default model


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight^T` over the rows where `mask`; grad for hidden
    only."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        chunk: int,
        matmul_dtype: torch.dtype,
    ) -> torch.Tensor:
        # hidden (N, C) compute dtype; weight (V, C); targets (N,) int64; mask (N,) bool
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, float64 for gradcheck
        w = weight.to(matmul_dtype)  # a BF16 copy lives only inside this call
        need_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            rows = slice(s, s + chunk)
            logits = (hidden[rows].to(matmul_dtype) @ w.t()).to(acc)  # (n, V)
            keep = mask[rows]
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            picked = logits.gather(1, targets[rows, None])[:, 0]
            total += torch.where(keep, lse - picked, 0.0).sum()
            if need_grad:  # d(sum of losses)/d(logits) = softmax - onehot on counted rows
                probs = logits.sub_(lse[:, None]).exp_()  # reuses the logits' memory
                probs[torch.arange(probs.shape[0], device=probs.device), targets[rows]] -= 1.0
                probs *= keep.to(acc)[:, None]
                grad_hidden[rows] = (probs.to(matmul_dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


def chunked_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    chunk: int = CHUNK_ROWS,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) of hidden states (B, T, C) through an LM head
    weight (V, C) (frozen), for targets input_ids[:, 1:] where `mask` (B, T-1) holds. The head's
    matmuls run in `matmul_dtype` (default: hidden's dtype)."""
    if weight.requires_grad:
        raise ValueError(
            "chunked_head_loss needs a frozen LM head (it computes no weight gradient)"
        )
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), C)
    return _ChunkedHeadLoss.apply(
        h,
        weight,
        input_ids[:, 1:].reshape(-1),
        mask.reshape(-1),
        chunk,
        matmul_dtype or hidden.dtype,
    )
