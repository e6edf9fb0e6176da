"""What the fine-tuning pipeline needs from a backend, in backend-neutral terms (numpy in and out).

A leaf (it imports nf4core, backends/sampling.py and backends/world.py only): both backends import their shared types
from here, while `registry.build_engine` imports the chosen backend lazily; `backends/torch_backend`
and `backends/mlx_backend` never import each other. Adapter and optimizer tensors cross this boundary
under PEFT's key names ("base_model.model.<module>.lora_A.weight"), float32, in the parameter's own
shape, so a state taken from one engine loads into the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

import nf4core
from nf4core.model_config import LINEAR_NAMES

from .sampling import SamplingConfig
from .world import SINGLE, World

if TYPE_CHECKING:
    from .registry import BackendChoice

DEFAULT_TARGETS = LINEAR_NAMES


@dataclass(frozen=True)
class LoRASettings:
    """The adapters of a run, in PEFT's terms, for both backends: rank r, alpha (scale alpha / r),
    dropout on the adapter input, the linears adapted (by the last component of their name), the
    seed of the A initialisation (nf4core.lora_init), and DoRA (`use_dora`: a trainable magnitude
    per output row, PEFT's `lora_magnitude_vector`)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    use_dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("LoRA targets are empty: the adapters would train nothing")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def adapts(self, module: str) -> bool:
        """Whether the linear named `module` (e.g. "model.layers.0.self_attn.q_proj") gets adapters."""
        return module.rsplit(".", 1)[-1] in self.targets


@dataclass(frozen=True)
class BaseWeights:
    """How the frozen base is held: "nf4" (QLoRA: 16/32-bit weights quantized on load by
    `quant_method`, NF4 ones used as stored), or "bfloat16"/"float32" (plain LoRA: the linears
    rounded to that dtype and kept dense, computed in the compute dtype)."""

    dtype: str = "nf4"
    quant_method: str = nf4core.model_quantize.DEFAULT_QUANT_METHOD

    @property
    def quantized(self) -> bool:
        return self.dtype == "nf4"


@dataclass(frozen=True)
class TrainSettings:
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    grad_checkpoint: bool = False
    paged: bool | None = None  # None: the backend's default
    seed: int = 0


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean per target token
    tokens: int  # target tokens in the step
    grad_norm: float


@dataclass(frozen=True)
class TrainingState:
    """Optimizer moments (`<peft key>.exp_avg` / `.exp_avg_sq`), the FP32 master adapters (PEFT keys),
    the optimizer step, and RNG states keyed by backend (`rng.torch`, `rng.mlx`)."""

    adapters: dict[str, np.ndarray]
    moments: dict[str, np.ndarray]
    step: int
    rng: dict[str, np.ndarray] = field(default_factory=dict)


class Engine(Protocol):
    """What the pipeline calls. The backend engines subclass it: `eval_loss`, `generate` and
    `greedy_batch` are written here once, over the backend's `batch_loss` and its generation
    functions (`generate_tokens`, `greedy_steps`: the backend's generate module, called with the
    engine's model).

    Under a launcher (`world.size` > 1) every rank makes the same calls in the same order with the
    same GLOBAL batches: `train_step` and `batch_loss` take this rank's rows (`world.rows`) and
    return the global results (loss, targets, gradient norm identical on every rank); generation
    runs on every rank; `adapters`/`training_state` are the full, unsharded tensors."""

    choice: BackendChoice
    config: nf4core.ModelConfig
    world: World = SINGLE  # the processes training together (backends/world.py)
    model: object  # the backend's model: .training, .eval(), .train(mode)
    generate_tokens: Callable[[object, list[int], SamplingConfig], Iterator[int]]
    greedy_steps: Callable[[object, Sequence[Sequence[int]], int], Iterator[np.ndarray]]

    def train_step(self, micro_batches: Sequence[nf4core.Batch], lr: float) -> StepResult: ...

    def batch_loss(self, batch: nf4core.Batch) -> tuple[float, int]: ...  # (summed loss, targets)

    def notes(self) -> list[str]:
        """Lines for the run's log on choices the backend made (e.g. the CPU matmul dtype)."""
        return []

    def run_finished(self) -> None:
        """This rank's run ended normally (a process with several ranks may then leave in step)."""

    def eval_loss(self, batches: Sequence[nf4core.Batch]) -> tuple[float, int]:
        """(summed loss over the target tokens, their count) over `batches`, dropout off."""
        was = self.model.training
        self.model.eval()
        total, n = 0.0, 0
        try:
            for b in batches:
                s, k = self.batch_loss(b)
                total, n = total + s, n + k
        finally:
            self.model.train(was)
        return total, n

    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_ids: Sequence[int] = (),
    ) -> Iterator[int]:
        cfg = SamplingConfig(max_new_tokens, temperature, top_p, seed, tuple(eos_ids))
        return self.generate_tokens(self.model, list(prompt), cfg)

    def greedy_batch(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int] = ()
    ) -> list[list[int]]:
        """Prompts of one token length decoded together; each row cut before its first stop id."""
        check_one_length(prompts)
        steps = self.greedy_steps(self.model, prompts, max_new_tokens)
        return rows_until_stop(steps, len(prompts), eos_ids)

    def inference(self) -> AbstractContextManager: ...  # faster eval/generation inside, no training

    def adapters(self) -> dict[str, np.ndarray]: ...

    def load_adapters(self, tensors: Mapping[str, np.ndarray]) -> None: ...

    def training_state(self) -> TrainingState: ...

    def load_training_state(self, state: TrainingState) -> None: ...


def rows_until_stop(
    steps: Iterator[np.ndarray], rows: int, eos_ids: Sequence[int]
) -> list[list[int]]:
    """Collect batched greedy decoding: `steps` yields the next token of every row; each row keeps its
    tokens before its first stop id, and drawing ends once every row has stopped."""
    out: list[list[int]] = [[] for _ in range(rows)]
    live, stop = set(range(rows)), set(eos_ids)
    for tokens in steps:
        for r, t in enumerate(tokens.tolist()):
            if r in live:
                if t in stop:
                    live.discard(r)
                else:
                    out[r].append(t)
        if not live:
            break
    return out


def check_one_length(prompts: Sequence[Sequence[int]]) -> None:
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            f"batched greedy decoding needs non-empty prompts of one length, got lengths "
            f"{sorted(lengths)}"
        )


class SourceTensors(Mapping):
    """A read-only mapping over a model source's tensors (both backends build their models from it)
    that reads each one only when asked, so building a model holds one dense tensor at a time
    (linears are quantized as they arrive)."""

    def __init__(self, source: nf4core.ModelSource) -> None:
        self.source, self.names = source, list(source.tensor_names())
        self._set = set(self.names)

    def __getitem__(self, name: str) -> object:
        if name not in self._set:
            raise KeyError(name)
        return self.source.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
