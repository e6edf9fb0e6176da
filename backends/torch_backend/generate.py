"""Token generation with the KV cache: greedy or temperature / top-p sampling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..sampling import SamplingConfig, nucleus
from .dequant_cache import DequantCache
from .fast_decode import decode_steps
from .model import CausalLM


def _pick(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> int:
    """One token id from logits (V,)."""
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1).cpu()
    if cfg.top_p < 1.0:
        probs = torch.from_numpy(nucleus(probs.numpy(), cfg.top_p))
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate_tokens(model: CausalLM, prompt: Sequence[int], cfg: SamplingConfig) -> Iterator[int]:
    """Yield new token ids one by one (stops at an EOS id, which is yielded, or max_new_tokens)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    was_training = model.training
    model.eval()
    try:
        device = model.inv_freq.device
        cache = model.new_cache(1, len(prompt) + cfg.max_new_tokens)
        gen = torch.Generator().manual_seed(cfg.seed)
        weights = DequantCache.for_decoding(1, model.compute_dtype, device)  # only inside forwards
        with weights.active():
            logits = last_logits(model, torch.tensor([list(prompt)], device=device), cache)[0]
            step = decode_steps(model, cache, 1, lambda ids: last_logits(model, ids, cache))
        for i in range(cfg.max_new_tokens):
            token = _pick(logits, cfg, gen)
            yield token
            if token in cfg.eos_token_ids or i == cfg.max_new_tokens - 1:
                return  # (no forward for a token that will not be picked)
            with weights.active():
                logits = step(torch.tensor([[token]], device=device))[0]
    finally:
        model.train(was_training)


def last_logits(model: CausalLM, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Logits (B, vocab) of the last position only: the LM head on one token per row, not the prompt."""
    return model.lm_head(model.hidden_states(input_ids, cache)[:, -1])


@torch.no_grad()
def greedy_steps(
    model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> Iterator[np.ndarray]:
    """The next greedy token of every row (int64 array), step by step: prompts of one length share
    each forward and one KV cache, so no row needs padding."""
    was_training = model.training
    model.eval()
    try:
        device = model.inv_freq.device
        cache = model.new_cache(len(prompts), len(prompts[0]) + max_new_tokens)
        ids = torch.tensor([list(p) for p in prompts], device=device)
        weights = DequantCache.for_decoding(len(prompts), model.compute_dtype, device)

        def module_path(ids: torch.Tensor) -> torch.Tensor:
            return last_logits(model, ids, cache)

        step = None  # after the prefill: the fast decoder where it applies (fast_decode.py)
        for _ in range(max_new_tokens):
            with weights.active():
                if step is None:
                    ids = module_path(ids).argmax(-1, keepdim=True)
                    step = decode_steps(model, cache, len(prompts), module_path)
                else:
                    ids = step(ids).argmax(-1, keepdim=True)
            yield ids[:, 0].cpu().numpy()
    finally:
        model.train(was_training)


def generate(model: CausalLM, prompt: Sequence[int], cfg: SamplingConfig) -> list[int]:
    """The new token ids as a list (see `generate_tokens`)."""
    return list(generate_tokens(model, prompt, cfg))
