"""`finetune(cfg)`: the whole run the CLI's `finetune` performs, callable from Python.

Data order is a pure function of (seed, epoch), so a run's position is its micro-batch count; the LR
schedule is computed here (one definition for both backends). Checkpoints hold everything else.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import nf4core
from nf4core.atomic import write_text_atomic
from nf4core.default_task import DefaultTask, default_task

from .checkpoint import Checkpoint, check_fits, load_checkpoint, save_checkpoint
from .engine import BaseWeights, Engine, LoRASettings, TrainSettings, build_engine
from .evaluate import ExactMatch, exact_match_score, perplexity
from .finetune_config import LEGACY_BASE, ConfigError, FinetuneConfig, learning_rate
from .peft_adapter import Adapter, save_adapter
from .registry import BackendChoice, select_backend
from .run_log import MetricsLog, Progress, plot_loss

# settings a resumed run may change; everything else comes from the checkpoint
RESUME_OVERRIDES = ("out", "steps", "epochs", "backend", "device", "compute_dtype", "eval_every",
                    "save_every", "eval_max_examples", "export")  # fmt: skip


@dataclass(frozen=True)
class FinetuneResult:
    config: FinetuneConfig  # resolved
    choice: BackendChoice
    out: Path
    steps: int
    losses: list[float]  # the training loss of each step this call ran
    exact_match_before: ExactMatch | None
    exact_match_after: ExactMatch | None
    eval_loss: float | None
    seconds: float
    checkpoint: Path | None
    phases: dict[str, float]  # seconds spent loading, training, evaluating (keys as they happened)


class _Data:
    """The micro-batch with global index g (epoch g // per_epoch), for any g, deterministically."""

    def __init__(self, dataset: nf4core.Dataset, batch_size: int, pad_id: int, seed: int) -> None:
        if len(dataset) == 0:
            raise ConfigError("the training set is empty")
        self.dataset, self.batch_size, self.pad_id, self.seed = dataset, batch_size, pad_id, seed
        self.per_epoch = math.ceil(len(dataset) / batch_size)
        self._epoch, self._batches = None, None

    def __getitem__(self, g: int) -> nf4core.Batch:
        epoch, index = divmod(g, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = list(nf4core.batches(self.dataset, self.batch_size, self.pad_id,
                                                 seed=self.seed, epoch=epoch))  # fmt: skip
        return self._batches[index]


def resolve(cfg: FinetuneConfig) -> tuple[FinetuneConfig, DefaultTask | None, Checkpoint | None]:
    """The resolved config (with a resume's checkpoint config applied), the built-in task if used."""
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        saved = FinetuneConfig.from_dict({**LEGACY_BASE, **ckpt.config})
        for name in LEGACY_BASE:  # the base the adapters were trained on: a change is refused
            asked = getattr(cfg, name)
            if asked is not None and asked != getattr(saved, name):
                raise ConfigError(f"{name}: {ckpt.path} was trained with {getattr(saved, name)!r}; "
                                  f"a resume cannot change it to {asked!r}")
        overrides = {k: getattr(cfg, k) for k in RESUME_OVERRIDES if getattr(cfg, k) is not None}
        if "steps" in overrides or "epochs" in overrides:
            saved = replace(saved, steps=None, epochs=None)
        cfg = replace(saved, **overrides, resume=str(cfg.resume))
    task = default_task(cfg.seed or 0) if cfg.data is None else None
    return cfg.resolve(task.recommended if task else None), task, ckpt


def load_data(cfg: FinetuneConfig, task: DefaultTask | None, tokenizer: nf4core.Tokenizer, out: Path
              ) -> tuple[nf4core.Dataset, nf4core.Dataset | None, list[dict]]:
    """(train set, validation set or None, held-out records for exact match (built-in task only))."""
    if task is not None:
        data_dir = out / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, records in (("train.jsonl", task.train), ("valid.jsonl", task.heldout)):
            write_text_atomic(data_dir / name, "".join(json.dumps(r) + "\n" for r in records))
        train, valid = data_dir / "train.jsonl", data_dir / "valid.jsonl"
        held = task.heldout
    else:
        path = Path(cfg.data)
        if path.is_dir():
            train, valid = path / "train.jsonl", path / "valid.jsonl"
            if not train.is_file():
                raise ConfigError(f"{path}: a data directory needs train.jsonl (and may hold valid.jsonl)")
            valid = valid if valid.is_file() else None
        elif path.is_file():
            train, valid = path, None
        else:
            raise ConfigError(f"{path}: no such data file or directory")
        held = []
    dc = nf4core.DataConfig(train=train, valid=valid, max_length=cfg.max_seq_len, seed=cfg.seed)
    ds_train, ds_valid = nf4core.load_dataset(dc, tokenizer)
    if cfg.eval_max_examples:
        held = held[: cfg.eval_max_examples]
    return ds_train, ds_valid, held


def total_steps(cfg: FinetuneConfig, data: _Data) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * data.per_epoch / cfg.grad_accum))


def finetune(cfg: FinetuneConfig, echo: Callable[[str], None] = print, progress: bool = True
             ) -> FinetuneResult:
    """Fine-tune as `cfg` says (see FinetuneConfig); writes adapters, checkpoints, metrics.jsonl,
    loss.png and the resolved config.yaml under `cfg.out`, and returns what happened."""
    t0 = time.perf_counter()
    phases = _Phases()
    cfg, task, ckpt = resolve(cfg)
    choice = select_backend(cfg.backend, cfg.device, cfg.compute_dtype)
    echo(choice.describe())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = cfg.model or str(nf4core.default_model_path())
    source = nf4core.open_model(model_path)
    if cfg.base_dtype != "nf4" and isinstance(source, nf4core.sources.BnbDirSource):
        raise ConfigError(f"base_dtype {cfg.base_dtype}: {model_path} is already NF4; a 16/32-bit "
                          f"baseline needs the unquantized model")
    tokenizer = source.tokenizer()
    train_set, valid_set, heldout = load_data(cfg, task, tokenizer, out)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = _Data(train_set, cfg.batch_size, pad, cfg.seed)
    steps = total_steps(cfg, data)
    _write_config(out, cfg)
    lora = LoRASettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.targets, cfg.seed)
    train = TrainSettings(cfg.grad_accum, cfg.max_grad_norm, cfg.weight_decay, cfg.grad_checkpoint,
                          cfg.paged_optimizer, cfg.seed)  # fmt: skip
    engine = build_engine(choice, source, lora, train, cfg.lr,
                          BaseWeights(cfg.base_dtype, cfg.quant_method))  # fmt: skip
    phases.mark("load")
    start = 0
    if ckpt is not None:
        check_fits(ckpt, engine.adapters())
        engine.load_training_state(ckpt.state)
        start = ckpt.state.step
        echo(f"resumed from {ckpt.path} at step {start} (saved by the {ckpt.backend} backend)")
    log = MetricsLog(out / "metrics.jsonl")
    if ckpt is not None:
        log.truncate_after(start)
    before = after = None
    if heldout and ckpt is None:
        before = exact_match_score(engine, tokenizer, heldout)
        log.write({"event": "exact_match", "phase": "before", "step": 0, "exact_match": before.score})
        echo(f"exact match on {before.total} held-out examples before training: {before.score:.1%}")
        phases.mark("exact match before")
    bar = Progress(steps, start, enabled=progress)
    losses, last_ckpt, eval_loss = [], None, None
    for step in range(start, steps):
        micro = [data[step * cfg.grad_accum + k] for k in range(cfg.grad_accum)]
        lr = learning_rate(cfg, step, steps)
        t = time.perf_counter()
        r = engine.train_step(micro, lr)
        dt = time.perf_counter() - t
        losses.append(r.loss)
        seen = sum(int(b.attention_mask.sum()) for b in micro)  # prompt and target, no padding
        log.write({"step": step + 1, "loss": r.loss, "lr": lr, "grad_norm": r.grad_norm,
                   "tokens": seen, "target_tokens": r.tokens, "tokens_per_s": seen / max(dt, 1e-9)})
        bar.update(step + 1, r.loss, seen)
        done = step + 1
        if valid_set is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
            eval_loss, ppl = perplexity(engine, valid_set, cfg.batch_size, pad)
            log.write({"step": done, "eval_loss": eval_loss, "perplexity": ppl})
        if cfg.save_every and done % cfg.save_every == 0 and done < steps:
            last_ckpt = _checkpoint(engine, out, cfg, done)
    bar.close()
    phases.mark("train")
    if valid_set is not None:
        eval_loss, ppl = perplexity(engine, valid_set, cfg.batch_size, pad)
        log.write({"step": steps, "eval_loss": eval_loss, "perplexity": ppl})
        echo(f"validation loss {eval_loss:.4f} (perplexity {ppl:.2f})")
        phases.mark("validation loss")
    if steps > start or last_ckpt is None:
        last_ckpt = _checkpoint(engine, out, cfg, steps)
    adapter = Adapter(engine.adapters(), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.targets,
                      model_path)  # fmt: skip
    save_adapter(out, adapter, cfg.export)
    phases.mark("save")
    if heldout:
        after = exact_match_score(engine, tokenizer, heldout)
        log.write({"event": "exact_match", "phase": "after", "step": steps, "exact_match": after.score})
        echo(f"exact match on {after.total} held-out examples after training: {after.score:.1%}")
        phases.mark("exact match after")
    png = plot_loss(log.read(), out / "loss.png")
    echo(f"adapter: {out / 'adapter_model.safetensors'}; metrics: {log.path}"
         + (f"; loss curve: {png}" if png else ""))
    return FinetuneResult(cfg, choice, out, steps, losses, before, after, eval_loss,
                          time.perf_counter() - t0, last_ckpt, phases.seconds)


class _Phases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now


def _checkpoint(engine: Engine, out: Path, cfg: FinetuneConfig, step: int) -> Path:
    state = engine.training_state()
    assert state.step == step, (state.step, step)
    return save_checkpoint(out / "checkpoints", state, cfg.to_dict(),
                           {"micro_batches": step * cfg.grad_accum}, engine.choice.backend)


def _write_config(out: Path, cfg: FinetuneConfig) -> None:
    import yaml

    write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "resolve"]
