"""The torch side of `backends.engine.Engine`: build, train, evaluate, generate, export state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from nf4core.dtypes import FLOAT_DTYPES

from ..engine import Engine, StepResult, TrainingState
from ..peft_adapter import PEFT_PREFIX
from ..world import WorldError, take_rows
from . import cpu_matmul, distributed
from .generate import generate_tokens, greedy_steps
from .lora import apply_lora, load_lora_state_dict, lora_state_dict
from .malloc_tuning import keep_freed_memory
from .model import CausalLM
from .model.llama import causal_lm_loss
from .nf4_linear import NF4Linear
from .train_step import Batch, TrainConfig, Trainer

DTYPES = {name: getattr(torch, name) for name in FLOAT_DTYPES}  # "bfloat16" -> torch.bfloat16


class TorchEngine(Engine):
    generate_tokens = staticmethod(generate_tokens)
    greedy_steps = staticmethod(greedy_steps)

    def __init__(self, choice, source, lora, train, lr: float, base=None) -> None:
        self.choice, self.config = choice, source.config
        self.world, self.device = distributed.join(choice.device)
        if self.world.size > 1 and lora is not None and lora.use_dora:
            raise WorldError(
                "use_dora: DoRA reads each whole base weight outside the layer's forward, which "
                "a sharded (torchrun) run does not hold; train DoRA in one process"
            )
        quantized = base is None or base.quantized
        self.model = CausalLM.from_source(
            source,
            quantize=quantized,
            compute_dtype=DTYPES[choice.compute_dtype],
            method=base.quant_method if base is not None else "absmax",
            base_dtype=None if quantized else DTYPES[base.dtype],
        )
        self.sharded = self.world.size > 1
        if self.sharded:  # before moving: only this rank's shards go to the device
            from .sharding import shard_nf4_linears, shard_root

            mesh = shard_nf4_linears(self.model, self.world.size, self.device)
        self.model.to(self.device)
        self.trainer = None
        if lora is not None:
            apply_lora(self.model, lora)
        if self.sharded:
            shard_root(self.model, mesh)
        if train is not None:
            if self.device.type == "cpu":
                keep_freed_memory()  # steps reuse what the previous one freed (no page faults)
            torch.manual_seed(train.seed)
            self.model.gradient_checkpointing = train.grad_checkpoint
            self.model.chunked_loss = True  # never holds the logits; costs no extra matmul
            self.trainer = Trainer(
                self.model,
                TrainConfig(
                    weight_decay=train.weight_decay,
                    max_grad_norm=train.max_grad_norm,
                    grad_accum_steps=train.grad_accum,
                    paged=train.paged,
                ),
            )
            self._names = [
                PEFT_PREFIX + n for n, p in self.model.named_parameters() if p.requires_grad
            ]
            if self.sharded:
                self.trainer.reduce = _sum_over_ranks

    def notes(self) -> list[str]:
        if self.trainer is None or self.device.type != "cpu":
            return []
        return [cpu_matmul.describe()] if self.model.compute_dtype == torch.float32 else []

    def run_finished(self) -> None:
        distributed.run_finished()

    def _batch(self, b) -> Batch:
        return Batch.from_numpy(b, self.device)

    def train_step(self, micro_batches, lr: float):
        """`micro_batches` are the global ones: with N ranks each trains on its rows of every one,
        normalised by the global target count, and the gradients are summed over the ranks."""
        if not self.sharded:
            stats = self.trainer.train_step([self._batch(b) for b in micro_batches], lr)
            return StepResult(stats.loss, stats.tokens, stats.grad_norm)
        total = sum(self._batch(b).n_targets() for b in micro_batches)
        mine = [self._batch(take_rows(b, self.world.rows(len(b.input_ids)))) for b in micro_batches]
        with distributed.collective_errors(self.world):
            stats = self.trainer.train_step(mine, lr, total=total)
        return StepResult(stats.loss, stats.tokens, stats.grad_norm)

    @torch.no_grad()
    def batch_loss(self, b) -> tuple[float, int]:
        """(summed loss, targets) of the global batch `b`: with N ranks, each computes its rows and
        the sums are added up (every rank computes all rows when they do not split evenly)."""
        if not self.sharded:
            return self._batch_loss(b)
        n = len(b.input_ids)
        with distributed.collective_errors(self.world):
            if n % self.world.size:
                return self._batch_loss(b)
            s, k = self._batch_loss(take_rows(b, self.world.rows(n)))
            sums = torch.tensor([s, float(k)], dtype=torch.float64, device=self.device)
            distributed.all_reduce_sum([sums])
        return float(sums[0]), int(sums[1])

    def _batch_loss(self, b) -> tuple[float, int]:
        batch = self._batch(b)
        logits = self.model(
            batch.input_ids, position_ids=batch.position_ids, segment_ids=batch.segment_ids
        )
        s, k = causal_lm_loss(logits, batch.input_ids, batch.loss_mask, batch.segment_ids)
        return float(s), int(k)

    def greedy_batch(self, prompts, max_new_tokens: int, eos_ids=()) -> list[list[int]]:
        """Every rank decodes every prompt (each layer's forward gathers it on all ranks)."""
        with distributed.collective_errors(self.world):
            return super().greedy_batch(prompts, max_new_tokens, eos_ids)

    @contextlib.contextmanager
    def inference(self, budget_bytes: int = 2 << 30) -> Iterator[None]:
        """Generation and evaluation inside run on dense copies of the frozen NF4 weights when they
        fit in `budget_bytes` (else on NF4 as in training); the copies are dropped on exit.

        Note: the NF4 path dequantizes every weight on every call, which dominates token-by-token
        decoding; a dense copy is dequantized once (bit-exactly the same values)."""
        swaps = [(name, m) for name, m in self.model.named_modules() if isinstance(m, NF4Linear)]
        size = torch.finfo(self.model.compute_dtype).bits // 8
        if self.sharded:  # dense copies would undo the sharding
            with torch.no_grad():
                yield
            return
        if sum(m.weight.numel for _, m in swaps) * size > budget_bytes:
            yield
            return
        for name, m in swaps:
            _set(self.model, name, _dense(m, self.model.compute_dtype))
        try:
            with torch.no_grad():
                yield
        finally:
            for name, m in swaps:
                _set(self.model, name, m)

    def adapters(self) -> dict[str, np.ndarray]:
        return {k: v.float().cpu().numpy().copy() for k, v in lora_state_dict(self.model).items()}

    def load_adapters(self, tensors: Mapping[str, np.ndarray]) -> None:
        load_lora_state_dict(
            self.model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        )

    def training_state(self):
        opt = self.trainer.optimizer
        moments, step = {}, self.trainer.step_index
        for name, p in zip(self._names, self.trainer.params):
            state = opt.state.get(p)
            for key in ("exp_avg", "exp_avg_sq"):
                value = (
                    np.zeros(p.shape, np.float32)
                    if not state
                    else (state[key].float().cpu().numpy().reshape(p.shape).copy())
                )
                moments[f"{name}.{key}"] = value
        adapters = {}
        for name, p in zip(self._names, self.trainer.params):
            master = (opt.state.get(p) or {}).get("master")
            adapters[name] = (
                (master.reshape(p.shape) if master is not None else p)
                .detach()
                .float()
                .cpu()
                .numpy()
                .copy()
            )
        rng = {"rng.torch": torch.get_rng_state().numpy().copy()}
        return TrainingState(adapters, moments, step, rng)

    def load_training_state(self, state) -> None:
        self.load_adapters(state.adapters)
        opt = self.trainer.optimizer
        saved = {}
        for i, (name, p) in enumerate(zip(self._names, self.trainer.params)):
            entry = {"step": state.step}
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = torch.from_numpy(
                    np.ascontiguousarray(state.moments[f"{name}.{key}"], np.float32)
                ).reshape(-1)
            if p.dtype != torch.float32:
                entry["master"] = torch.from_numpy(
                    np.ascontiguousarray(state.adapters[name], np.float32)
                ).reshape(-1)
            saved[i] = entry
        groups = opt.state_dict()["param_groups"]
        opt.load_state_dict({"state": saved if state.step > 0 else {}, "param_groups": groups})
        self.trainer.step_index = state.step
        if "rng.torch" in state.rng:
            torch.set_rng_state(torch.from_numpy(np.asarray(state.rng["rng.torch"], np.uint8)))


def _sum_over_ranks(params: list[torch.Tensor], loss_sum: float) -> float:
    """The gradients of `params` and the loss summed over the ranks (each rank's loss is already
    divided by the global target count, so the sum is the one-process gradient)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    loss = torch.tensor([loss_sum], dtype=torch.float64, device=params[0].device)
    distributed.all_reduce_sum([p.grad for p in params] + [loss])
    return float(loss[0])


def _dense(m: NF4Linear, dtype: torch.dtype) -> torch.nn.Linear:
    w = m.dequantize(dtype)
    lin = torch.nn.Linear(
        w.shape[1], w.shape[0], bias=m.bias is not None, device=w.device, dtype=dtype
    )
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    if m.bias is not None:
        lin.bias = torch.nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
    return lin


def _set(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
