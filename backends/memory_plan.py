"""Training-memory arithmetic for `info`: one process, and each rank of a multi-process run.

From the model's tensor shapes alone (no backend, nothing loaded). The frozen linears count as
double-quantized NF4 at blocksize 64 (codes, 8-bit block scales, their float32 scales, the tables);
every other tensor is dense in the compute dtype; adapters count 16 bytes a parameter (float32
weight, gradient and two Adam moments). Activations are a rough upper estimate.

Per rank, with N ranks and a global batch of B rows (B/N rows each):
- torch (`torchrun`, FSDP2): 1/N of the NF4 base is held between layers, plus one decoder layer's
  full NF4 weights all-gathered while it runs (transient; the largest layer); the dense tensors
  (embedding, norms, LM head), the adapters and their optimizer state are replicated.
- MLX (`mlx.launch`, data parallel): a full replica of everything.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from nf4core import ModelConfig, ModelSource
from nf4core.codebooks import DYNAMIC_MAP_SIGNED, NESTED_BLOCKSIZE, NF4_CODE
from nf4core.model_config import LINEAR_NAMES

BLOCKSIZE = 64
ADAPTER_BYTES = 16  # float32 weight, gradient, exp_avg, exp_avg_sq
_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def nf4_bytes(numel: int, blocksize: int = BLOCKSIZE) -> int:
    """Bytes of one double-quantized NF4 tensor of `numel` weights, tables included."""
    blocks = math.ceil(numel / blocksize)
    scales = (
        blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4
    )  # uint8 codes, their scales, offset
    return math.ceil(numel / 2) + scales + DYNAMIC_MAP_SIGNED.nbytes + NF4_CODE.nbytes


@dataclass(frozen=True)
class ModelBytes:
    """The batch-independent parts: NF4 bytes per sharding unit (a decoder layer, or a quantized
    linear outside the layers), dense bytes in the compute dtype, and the LoRA parameter count."""

    nf4_units: dict[str, int]
    dense: int
    lora_parameters: int

    @property
    def nf4(self) -> int:
        return sum(self.nf4_units.values())

    @property
    def adapters_and_optimizer(self) -> int:
        return self.lora_parameters * ADAPTER_BYTES


def model_bytes(source: ModelSource, lora_r: int, compute_bytes: int) -> ModelBytes:
    units: dict[str, int] = {}
    dense = lora = 0
    for name in source.tensor_names():
        shape = source.tensor_shape(name)
        n = math.prod(shape)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEAR_NAMES:
            layer = _LAYER.match(name)
            unit = layer.group(1) if layer else module
            units[unit] = units.get(unit, 0) + nf4_bytes(n)
            lora += lora_r * (shape[0] + shape[1])
        else:
            dense += n * compute_bytes
    return ModelBytes(units, dense, lora)


def activation_bytes(c: ModelConfig, rows: int, seq_len: int, compute_bytes: int) -> int:
    # values kept for backward a token and layer: ~10 hidden-sized and 3 intermediate-sized vectors,
    # and attention scores and probabilities (heads x seq_len each) where attention is not fused
    per_token = 10 * c.hidden_size + 3 * c.intermediate_size + 2 * c.num_attention_heads * seq_len
    kept = c.num_hidden_layers * rows * seq_len * per_token * compute_bytes
    return kept + rows * seq_len * c.vocab_size * 4 * 3  # float32 logits, log-probs, their gradient


def training_bytes(m: ModelBytes, c: ModelConfig, rows: int, seq_len: int, compute_bytes: int):
    """One process training on `rows` rows."""
    act = activation_bytes(c, rows, seq_len, compute_bytes)
    return m.nf4 + m.dense + m.adapters_and_optimizer + act


def per_rank(
    m: ModelBytes, c: ModelConfig, nproc: int, batch_size: int, seq_len: int, compute_bytes: int
) -> dict:
    """Each rank's bytes, part by part, for the torch sharded run and the MLX data-parallel run of
    `nproc` ranks on a global batch of `batch_size` rows."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive whole number of ranks, got {nproc!r}")
    if batch_size % nproc:
        raise ValueError(
            f"--batch-size {batch_size} does not split over --nproc {nproc} ranks; choose a "
            f"--batch-size that is a multiple of {nproc}"
        )
    rows = batch_size // nproc
    act = activation_bytes(c, rows, seq_len, compute_bytes)
    torch = {
        "nf4_base_shard": math.ceil(m.nf4 / nproc),
        "largest_layer_gathered": max(m.nf4_units.values(), default=0) if nproc > 1 else 0,
        "dense_replicated": m.dense,
        "adapters_and_optimizer_replicated": m.adapters_and_optimizer,
        "activations": act,
    }
    mlx = {
        "base_replica": m.nf4 + m.dense,
        "adapters_and_optimizer_replicated": m.adapters_and_optimizer,
        "activations": act,
    }
    return {
        "nproc": nproc,
        "rows_per_rank": rows,
        "torch_fsdp": {"total": sum(torch.values()), **torch},
        "mlx_data_parallel": {"total": sum(mlx.values()), **mlx},
    }
