"""The LM head and the next-token cross-entropy together, a chunk of rows at a time.

The full path holds the (B, T, vocab) logits, their float32 log-softmax and their gradient at once:
for the default model at batch 4 x 128 that is 3 x 96 MiB. This one never holds more than one
chunk's logits: forward keeps only the summed loss, backward recomputes each chunk's logits and
turns them into the hidden states' gradient right away. The price is one more LM head matmul per
step. The LM head weight must be frozen (it is: LoRA adapts the block linears); a trainable head
takes the full path."""

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
    ) -> torch.Tensor:
        # hidden (N, C) compute dtype; weight (V, C); targets (N,) int64; mask (N,) bool
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, float64 for gradcheck
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s : s + chunk] @ weight.t()).to(acc)  # (n, V)
            picked = logits.gather(1, targets[s : s + chunk, None])[:, 0]
            losses = torch.logsumexp(logits, dim=-1) - picked
            total += torch.where(mask[s : s + chunk], losses, 0.0).sum()
        ctx.save_for_backward(hidden, weight, targets, mask)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, targets, mask = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], ctx.chunk):
            logits = (hidden[s : s + ctx.chunk] @ weight.t()).to(grad_total.dtype)  # (n, V)
            probs = torch.softmax(logits, dim=-1)
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, targets[s : s + ctx.chunk]] -= 1.0
            probs *= (mask[s : s + ctx.chunk].to(probs.dtype) * grad_total)[:, None]
            grad_hidden[s : s + ctx.chunk] = probs.to(hidden.dtype) @ weight
        return grad_hidden, None, None, None, None


def chunked_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    chunk: int = CHUNK_ROWS,
) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) of hidden states (B, T, C) through an LM head
    weight (V, C) (frozen), for targets input_ids[:, 1:] where `mask` (B, T-1) holds."""
    if weight.requires_grad:
        raise ValueError(
            "chunked_head_loss needs a frozen LM head (it computes no weight gradient)"
        )
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), C)
    return _ChunkedHeadLoss.apply(h, weight, input_ids[:, 1:].reshape(-1), mask.reshape(-1), chunk)
