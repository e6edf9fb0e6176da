"""Which keys each query may attend to: causal order, packed examples (segments), and Mistral's
sliding window.

Masks are bool (True = attend), built once per forward and shared by every layer. Positions are row
indices: with packing, an example's positions are consecutive within its segment, so index distances
equal position distances where the segment mask lets a query look at all.
"""

from __future__ import annotations

import torch


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query i sees key j <= i of its own segment; padding (0) sees itself
    only."""
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()  # (T, T)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    real = (segment_ids != 0)[:, :, None]
    eye = torch.eye(t, dtype=torch.bool, device=segment_ids.device)
    return ((same & real & causal) | eye)[:, None]


def causal_window_mask(
    length: int, past: int, window: int | None, device: torch.device | str
) -> torch.Tensor:
    """(T, past + T) bool: query i (absolute position past + i) sees keys j with j <= past + i and,
    with a window, past + i - window < j (transformers' sliding-window overlay)."""
    queries = torch.arange(past, past + length, device=device)[:, None]  # (T, 1)
    keys = torch.arange(past + length, device=device)[None, :]  # (1, S)
    mask = keys <= queries
    if window is not None:
        mask &= keys > queries - window
    return mask


def attention_mask(
    length: int,
    past: int,
    window: int | None,
    device: torch.device | str,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The mask for `length` new positions after `past` cached ones, or None where plain causal
    attention is exact (then attention takes SDPA's fast `is_causal` path, or sees every cached key
    for a single new position). A window only counts once the keys outnumber it."""
    if window is not None and past + length <= window:
        window = None
    if segment_ids is not None:
        if past:
            raise ValueError("a segment mask cannot be combined with cached positions")
        mask = segment_mask(segment_ids)  # (B, 1, T, T)
        return mask if window is None else mask & causal_window_mask(length, 0, window, device)
    if window is None and (past == 0 or length == 1):
        return None
    return causal_window_mask(length, past, window, device)  # (T, S)
