"""The MLX side of `backends.engine.Engine`: build, train, evaluate, generate, export state."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np
from mlx.utils import tree_flatten

from ..engine import Engine, SourceTensors, StepResult, TrainingState
from ..peft_adapter import peft_key
from ._mlx import mx
from .distributed import join_world
from .generate import generate_tokens, greedy_steps
from .lora import apply_lora, load_lora_state_dict, lora_state_dict
from .model import CausalLM
from .paged_optimizer import FORMAT_VERSION, PagedAdamWConfig
from .train_step import Batch, TrainConfig, Trainer, masked_cross_entropy


def _peft(path: str) -> str:  # "model.layers.0.self_attn.q_proj.lora_A" -> PEFT key
    return peft_key(path)


def optimizer_placement(paged: bool | None) -> str:
    """Where PagedAdamW keeps its pages for `--paged-optimizer` / `--no-paged-optimizer`: "host"
    (numpy arrays outside MLX's allocator, each page copied in for its update; the default) or
    "device" (mlx arrays, updated in place)."""
    return "device" if paged is False else "host"


class MLXEngine(Engine):
    generate_tokens = staticmethod(generate_tokens)
    greedy_steps = staticmethod(greedy_steps)

    def __init__(self, choice, source, lora, train, lr: float, base=None) -> None:
        self.choice, self.config = choice, source.config
        # started by mlx.launch: join its group first, so a misstarted run fails before loading
        self.world, summer = join_world()
        if choice.device == "cpu":
            mx.set_default_device(mx.cpu)
        quantized = base is None or base.quantized
        self.model = CausalLM.from_state(
            source.config,
            SourceTensors(source),
            quantize=quantized,
            compute_dtype=choice.compute_dtype,
            method=base.quant_method if base is not None else "absmax",
            base_dtype=None if quantized else base.dtype,
        )
        self.trainer = None
        if lora is not None:
            apply_lora(self.model, lora)
        self.seed = train.seed if train is not None else 0
        if train is not None:
            paged = PagedAdamWConfig(
                weight_decay=train.weight_decay, placement=optimizer_placement(train.paged)
            )
            self.trainer = Trainer(
                self.model,
                TrainConfig(
                    optimizer=paged,
                    grad_accum_steps=train.grad_accum,
                    max_grad_norm=train.max_grad_norm or None,
                    seed=train.seed,
                    gradient_checkpointing=train.grad_checkpoint,
                ),
                summer,
            )

    @staticmethod
    def _batch(b) -> Batch:
        return Batch.from_tokens(b.input_ids, b.loss_mask, b.position_ids, b.segment_ids)

    def train_step(self, micro_batches, lr: float):
        # Note: MLX offers no way to restore a saved generator state, so the dropout generator is
        # reseeded from (seed, step, rank) every step: a resumed run draws the same masks, and the
        # ranks of a data-parallel run draw different ones.
        step = self.trainer.optimizer.step_count
        mx.random.seed(self.seed * 1_000_003 + step + self.world.rank * 7_919_113)
        whole = [self._batch(b) for b in micro_batches]
        if self.world.size == 1:
            out = self.trainer.train_step(whole, lr)
        else:  # this rank's rows of every global micro-batch; the loss divides by the global count
            mine = [b.take_rows(self.world.rows(b.inputs.shape[0])) for b in whole]
            total = int(sum(b.mask.sum().item() for b in whole))
            out = self.trainer.train_step(mine, lr, total)
        return StepResult(out["loss"], out["tokens"], out["grad_norm"])

    # Evaluation is not split: every rank computes the whole batch (no communication, any batch
    # size), so every rank returns the same numbers.
    def batch_loss(self, b) -> tuple[float, int]:
        batch = self._batch(b)
        s, k = masked_cross_entropy(
            self.model(batch.inputs, None, *batch.packing()), batch.targets, batch.mask
        )
        return s.item(), int(k.item())

    def inference(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def adapters(self) -> dict[str, np.ndarray]:
        return lora_state_dict(self.model)

    def load_adapters(self, tensors: Mapping[str, np.ndarray]) -> None:
        load_lora_state_dict(self.model, tensors)

    def training_state(self):
        tensors, meta = self.trainer.optimizer.state_dict()
        adapters, moments = {}, {}
        for path, _ in tree_flatten(self.model.trainable_parameters()):
            adapters[_peft(path)] = tensors[f"{path}.master"]
            for key in ("exp_avg", "exp_avg_sq"):
                moments[f"{_peft(path)}.{key}"] = tensors[f"{path}.{key}"]
        return TrainingState(adapters, moments, int(meta["step"]))

    def load_training_state(self, state) -> None:
        self.load_adapters(state.adapters)
        tensors = {}
        for path, _ in tree_flatten(self.model.trainable_parameters()):
            tensors[f"{path}.master"] = state.adapters[_peft(path)]
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{path}.{key}"] = state.moments[f"{_peft(path)}.{key}"]
        self.trainer.optimizer.load_state_dict(
            tensors, {"format_version": str(FORMAT_VERSION), "step": str(state.step)}
        )
