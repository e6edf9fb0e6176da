"""What bench/scaling.py divides its times by: FLOPs of a training step's parts and bytes a decoded
token reads, from a Llama config alone (no model needed)."""

from __future__ import annotations

import nf4core
from nf4core.blockwise import n_blocks
from nf4core.codebooks import NESTED_BLOCKSIZE

CODES_PER_QUANT_MAP = 16  # float32 NF4 code table of every weight
NESTED_CODES = 256  # float32 table of the 8-bit absmax codes (double quant)


def linear_shapes(cfg: nf4core.ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's seven projections: q, k, v, o, gate, up, down."""
    c, f = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.resolved_head_dim
    kv = cfg.num_key_value_heads * cfg.resolved_head_dim
    return [(q, c), (kv, c), (kv, c), (c, q), (f, c), (f, c), (c, f)]


def nf4_bytes(
    numel: int, blocksize: int, double_quant: bool, nested_blocksize: int = NESTED_BLOCKSIZE
) -> int:
    """Bytes of one NF4 weight in bitsandbytes' layout: packed codes, block scales (8-bit codes,
    their float32 scales and code table with double quant; float32 absmax without), code table."""
    blocks = n_blocks(numel, blocksize)
    if double_quant:
        scales = blocks + 4 * n_blocks(blocks, nested_blocksize) + 4 * NESTED_CODES
    else:
        scales = 4 * blocks
    return (numel + 1) // 2 + scales + 4 * CODES_PER_QUANT_MAP


def layer_weight_bytes(
    cfg: nf4core.ModelConfig, weights: str, blocksize: int = 64, double_quant: bool = True
) -> int:
    """Bytes of one layer's seven linear weights as a decode step reads them: "nf4" (the CPU GEMV
    reads the packed codes and scales) or "fp32" (dense copies in the dequant cache)."""
    if weights == "nf4":
        return sum(nf4_bytes(o * i, blocksize, double_quant) for o, i in linear_shapes(cfg))
    if weights == "fp32":
        return sum(4 * o * i for o, i in linear_shapes(cfg))
    raise ValueError(f"weights must be 'nf4' or 'fp32', got {weights!r}")


def fixed_decode_bytes(cfg: nf4core.ModelConfig) -> int:
    """Bytes a decoded token reads outside the layers: its FP32 embedding row and the dense FP32 LM
    head (the tied embedding matrix, or lm_head.weight)."""
    return 4 * cfg.hidden_size + 4 * cfg.vocab_size * cfg.hidden_size


def train_layer_flops(cfg: nf4core.ModelConfig, batch: int, seq: int) -> int:
    """One layer's forward + backward at batch x seq: 4 FLOPs per frozen weight per token (forward
    and the input gradient; a frozen weight has no weight gradient) plus dense attention scores
    and values (QK^T and PV: 4 B T^2 H D forward, twice that backward). LoRA's rank-r matmuls are
    left out (under 1% at r 8)."""
    weights = sum(o * i for o, i in linear_shapes(cfg))
    heads = cfg.num_attention_heads * cfg.resolved_head_dim
    return 4 * batch * seq * weights + 12 * batch * seq * seq * heads


def train_head_flops(cfg: nf4core.ModelConfig, rows: int) -> int:
    """The LM head's forward + input gradient over `rows` positions (every position through the
    plain head; only the counted targets through the chunked loss). The frozen head has no weight
    gradient."""
    return 4 * rows * cfg.vocab_size * cfg.hidden_size
