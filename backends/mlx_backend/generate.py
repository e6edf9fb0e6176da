"""Token generation with the KV cache: greedy or temperature / top-p sampling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ..sampling import SamplingConfig, nucleus
from ._mlx import mx
from .model import CausalLM


def _pick(logits: mx.array, cfg: SamplingConfig, key: mx.array) -> int:
    """One token id from logits (V,)."""
    if cfg.temperature == 0:
        return int(mx.argmax(logits).item())
    probs = np.array(mx.softmax(logits.astype(mx.float32) / cfg.temperature))
    if cfg.top_p < 1.0:
        probs = nucleus(probs, cfg.top_p)
    logp = mx.log(mx.array(probs / probs.sum()))
    return int(mx.random.categorical(logp, key=key).item())


def generate_tokens(model: CausalLM, prompt: Sequence[int], cfg: SamplingConfig) -> Iterator[int]:
    """Yield new token ids one by one (stops at an EOS id, which is yielded, or max_new_tokens)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    was_training = model.training
    model.eval()
    key = mx.random.key(cfg.seed)
    try:
        cache = model.make_cache()
        logits = model.last_logits(mx.array([list(prompt)]), cache)[0]
        for _ in range(cfg.max_new_tokens):
            key, sub = mx.random.split(key)
            token = _pick(logits, cfg, sub)
            yield token
            if token in cfg.eos_token_ids:
                return
            logits = model.last_logits(mx.array([[token]]), cache)[0]
    finally:
        model.train(was_training)


def greedy_steps(
    model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> Iterator[np.ndarray]:
    """The next greedy token of every row, step by step: prompts of one length share each forward
    and one KV cache, so no row needs padding."""
    was_training = model.training
    model.eval()
    try:
        cache = model.make_cache()
        ids = mx.array([list(p) for p in prompts])
        for _ in range(max_new_tokens):
            ids = mx.argmax(model.last_logits(ids, cache), axis=-1, keepdims=True)
            yield np.array(ids[:, 0])
    finally:
        model.train(was_training)


def generate(model: CausalLM, prompt: Sequence[int], cfg: SamplingConfig) -> list[int]:
    """The new token ids as a list (see `generate_tokens`)."""
    return list(generate_tokens(model, prompt, cfg))
