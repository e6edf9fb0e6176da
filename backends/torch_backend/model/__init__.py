"""The Llama-family model in torch: `CausalLM.from_state(config, tensors)`."""

from .llama import CausalLM, causal_lm_loss, target_mask
from .masks import segment_mask

__all__ = ["CausalLM", "causal_lm_loss", "segment_mask", "target_mask"]
