"""`finetune(cfg)`: the whole run the CLI's `finetune` performs, callable from Python.

Data order is a pure function of (seed, epoch), so a run's position is its micro-batch count; the LR
schedule is computed here (one definition for both backends). Checkpoints hold everything else.

Several processes (a launcher's ranks, `engine.world`) run this same pipeline on the same global
batches and make the same engine calls in the same order; only the main rank writes (run
directory, lock, config, data files, metrics, reporters, checkpoints, adapter, exports) and prints.
The others read what every rank needs to read: the model, the data, a checkpoint to resume.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nf4core
from nf4core.atomic import write_text_atomic
from nf4core.default_task import DefaultTask, default_task
from nf4core.gguf_write import gguf_architecture, gguf_package, tokenizer_metadata
from nf4core.hub import recorded_base
from nf4core.model_quantize import DEFAULT_QUANT_METHOD

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    check_fits,
    checkpoint_of_step,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .early_stopping import EarlyStopping
from .engine import BaseWeights, Engine, LoRASettings, TrainSettings
from .evaluate import ExactMatch, exact_match_score, perplexity
from .export import write_model_gguf
from .finetune_config import ConfigError, FinetuneConfig, learning_rate
from .finetune_data import TrainBatches, load_data, task_files, total_steps
from .interrupts import Interrupts
from .nonfinite import NonFiniteError
from .peft_adapter import Adapter, save_adapter
from .registry import BackendChoice, build_engine, select_backend
from .reporters import Reporters, check_reporters
from .resume import resumed_config, run_dir_of, same_dir
from .run_dir import check_not_locked, check_out, is_empty, move_aside, run_lock
from .run_log import MetricsLog, PhaseDisplay, Progress, plot_loss
from .world import World, check_launcher, check_split, launched_rank


class RunInterrupted(Exception):
    """The run stopped at the user's request (SIGINT): after saving in one process, at once with
    several ranks; the message says how to go on (empty on the ranks other than the main one)."""


@dataclass(frozen=True)
class FinetuneResult:
    config: FinetuneConfig  # resolved
    choice: BackendChoice
    out: Path
    steps: int  # the step the run ended at (before the planned last with early stopping)
    losses: list[float]  # the training loss of each step this call ran
    exact_match_before: ExactMatch | None
    exact_match_after: ExactMatch | None
    eval_loss: float | None
    seconds: float
    checkpoint: Path | None
    phases: dict[str, float]  # seconds spent loading, training, evaluating (keys as they happened)
    best_step: int | None = None  # with early stopping: the step whose adapter was written
    is_main: bool = True  # False on the other ranks of a multi-process run (they write nothing)


def resolve(
    cfg: FinetuneConfig, echo: Callable[[str], None] = print
) -> tuple[FinetuneConfig, DefaultTask | None, Checkpoint | None]:
    """The resolved config (with a resume's checkpoint config applied), the built-in task if used."""
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        cfg = resumed_config(cfg, ckpt, echo)
    task = default_task(cfg.seed or 0) if cfg.data is None else None
    return cfg.resolve(task.recommended if task else None), task, ckpt


def finetune(
    cfg: FinetuneConfig, echo: Callable[[str], None] = print, progress: bool = True
) -> FinetuneResult:
    """Fine-tune as `cfg` says (see FinetuneConfig); writes adapters, checkpoints, metrics.jsonl,
    loss.png and the resolved config.yaml under `cfg.out`, and returns what happened.

    Everything is checked (settings, the output directory, model, data, checkpoint) before anything
    is written. NonFiniteError stops a run whose loss or gradient norm is not finite (beyond
    `skip_nonfinite` skipped steps); RunInterrupted follows a SIGINT, after saving."""
    t0 = time.perf_counter()
    phases = _Phases()
    main = launched_rank() == 0
    if not main:  # the other ranks of a launcher stay quiet
        echo, progress = _quiet, False
    cfg, task, ckpt = resolve(cfg, echo)
    out = Path(cfg.out)
    continuing = ckpt is not None and same_dir(out, run_dir_of(ckpt))
    choice = select_backend(cfg.backend, cfg.device, cfg.compute_dtype)
    check_launcher(choice.backend)
    if main:
        check_out(out, continuing, bool(cfg.overwrite))
    echo(choice.describe())
    model_path = cfg.model or str(nf4core.default_model_path())
    source = nf4core.open_model(model_path)
    if cfg.base_dtype != "nf4" and isinstance(source, nf4core.sources.BnbDirSource):
        raise ConfigError(
            f"base_dtype {cfg.base_dtype}: {model_path} is already NF4; a 16/32-bit "
            f"baseline needs the unquantized model"
        )
    if "gguf" in (cfg.export or ()):
        check_gguf_export(cfg, source, model_path)
    if main:
        check_reporters(cfg.report_to or ())
    tokenizer = source.tokenizer()
    with tempfile.TemporaryDirectory() as scratch:
        train_set, valid_set, heldout = load_data(cfg, task, tokenizer, Path(scratch), echo)
    check_early_stopping(cfg, valid_set)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = TrainBatches(train_set, cfg.batch_size, pad, cfg.seed, cfg.packing, cfg.max_seq_len)
    if data.rows is not None:
        echo(
            f"packing: {len(train_set)} examples in {len(data.rows)} rows of up to "
            f"{cfg.max_seq_len} tokens"
        )
    steps = total_steps(cfg, data)
    lora = LoRASettings(
        cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.targets, cfg.seed, cfg.use_dora
    )
    train = TrainSettings(
        cfg.grad_accum,
        cfg.max_grad_norm,
        cfg.weight_decay,
        cfg.grad_checkpoint,
        cfg.paged_optimizer,
        cfg.seed,
    )
    display = PhaseDisplay(enabled=progress)
    quantizing = " (quantizing its linears to NF4)" if cfg.base_dtype == "nf4" else ""
    with display.phase(f"loading the model{quantizing}", log_delay=30.0):  # may fail on input
        engine = build_engine(
            choice, source, lora, train, cfg.lr, BaseWeights(cfg.base_dtype, cfg.quant_method)
        )
    world = engine.world
    check_split(world, data.batch_rows(), f"--batch-size {cfg.batch_size}")
    for line in engine.notes():
        echo(line)
    start = 0
    if ckpt is not None:
        check_fits(ckpt, engine.adapters())
        engine.load_training_state(ckpt.state)
        start = ckpt.state.step
    phases.mark("load")
    if not world.is_main:
        run = _Run(cfg, engine, out, steps, start, echo, model_path, (None, None), display, world)
        return _train(run, data, valid_set, heldout, tokenizer, pad, progress, phases, t0)
    if cfg.overwrite and not continuing and not is_empty(out):
        check_not_locked(out)
        echo(f"moved the earlier contents of {out} to {move_aside(out)} (--overwrite)")
    with run_lock(out, echo):
        if ckpt is not None:
            echo(f"resumed from {ckpt.path} at step {start} (saved by the {ckpt.backend} backend)")
        if task is not None:
            (out / "data").mkdir(exist_ok=True)
            for name, text in task_files(task).items():
                write_text_atomic(out / "data" / name, text)
        if not (out / "config.yaml").exists():
            _write_config(out, cfg)
        run = _Run(
            cfg,
            engine,
            out,
            steps,
            start,
            echo,
            model_path,
            recorded_base(cfg.model),
            display,
            world,
        )
        try:
            return _train(run, data, valid_set, heldout, tokenizer, pad, progress, phases, t0)
        finally:
            run.reporters.close()


def _train(run: _Run, *args) -> FinetuneResult:
    """`run.train`; with several ranks a SIGINT aborts every rank at once (they could not stop at
    one step together), and the main rank says which checkpoint stays (the others say nothing)."""
    try:
        result = run.train(*args)
    except KeyboardInterrupt:
        if run.engine.world.size == 1:
            raise
        raise RunInterrupted(run.aborted() if run.main else "") from None
    run.engine.run_finished()
    return result


class _Run:
    """The training loop of one `finetune` call, from `start` to `steps`, in its locked `out`."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        engine: Engine,
        out: Path,
        steps: int,
        start: int,
        echo: Callable[[str], None],
        model_path: str,
        base: tuple[str, str | None],
        display: PhaseDisplay,
        world: World,
    ) -> None:
        self.cfg, self.engine, self.out, self.steps, self.start = cfg, engine, out, steps, start
        self.echo, self.model_path, self.display = echo, model_path, display
        self.base = base  # the (name, revision) the adapter records
        self.main = world.is_main  # the others make the same engine calls and write nothing
        self.log = MetricsLog(out / "metrics.jsonl", create=self.main)
        self.reporters = Reporters((cfg.report_to or ()) if self.main else (), out, cfg.to_dict())
        self._truncate = start > 0  # records after `start` are replaced, once this run logs
        self.saved_step: int | None = None  # of the latest checkpoint this call saved
        self.best_checkpoint: Path | None = None  # with early stopping

    def write(self, record: dict) -> None:
        if not self.main:
            return
        if self._truncate:
            self.log.truncate_after(self.start)
            self._truncate = False
        self.log.write(record)
        self.reporters.record(record)

    def train(
        self,
        data: TrainBatches,
        valid_set: nf4core.Dataset | None,
        heldout: list[dict],
        tokenizer: nf4core.Tokenizer,
        pad: int,
        progress: bool,
        phases: _Phases,
        t0: float,
    ) -> FinetuneResult:
        cfg, engine, out, steps, start, echo = (
            self.cfg,
            self.engine,
            self.out,
            self.steps,
            self.start,
            self.echo,
        )
        before = after = None
        if heldout and start == 0:
            with self.display.phase(f"exact match on {len(heldout)} held-out examples") as c:
                before = exact_match_score(engine, tokenizer, heldout, progress=c.update)
            self.write(
                {"event": "exact_match", "phase": "before", "step": 0, "exact_match": before.score}
            )
            echo(
                f"exact match on {before.total} held-out examples before training: "
                f"{before.score:.1%}"
            )
            phases.mark("exact match before")
        bar = Progress(steps, start, enabled=progress)
        losses, last_ckpt, eval_loss, bad_steps = [], None, None, 0
        stopper = self._early_stopping()
        evaluated_at = None
        done = start
        # several ranks would see an interrupt at different steps: there it aborts at once
        with Interrupts(enabled=self.engine.world.size == 1) as interrupts:
            for step in range(start, steps):
                micro = [data[step * cfg.grad_accum + k] for k in range(cfg.grad_accum)]
                lr = learning_rate(cfg, step, steps)
                t = time.perf_counter()
                r = engine.train_step(micro, lr)  # never applies a non-finite update
                dt = time.perf_counter() - t
                done = step + 1
                if not (math.isfinite(r.loss) and math.isfinite(r.grad_norm)):
                    bad_steps += 1
                    skipped = bad_steps <= cfg.skip_nonfinite
                    what = f"loss {r.loss}, gradient norm {r.grad_norm}"
                    record = {
                        "step": done,
                        "event": "nonfinite",
                        "detail": what,
                        "skipped": skipped,
                    }
                    if not skipped:  # appended: a failed run removes no record of an earlier one
                        if self.main:
                            self.log.write(record)
                        bar.close()
                        raise NonFiniteError(self._stopped(done, what))
                    self.write(record)
                    echo(
                        f"step {done}: non-finite {what}; update skipped ({bad_steps} of "
                        f"--skip-nonfinite {cfg.skip_nonfinite})"
                    )
                else:
                    losses.append(r.loss)
                    seen = sum(int(b.attention_mask.sum()) for b in micro)  # prompt and target
                    self.write(
                        {
                            "step": done,
                            "loss": r.loss,
                            "lr": lr,
                            "grad_norm": r.grad_norm,
                            "tokens": seen,
                            "target_tokens": r.tokens,
                            "tokens_per_s": seen / max(dt, 1e-9),
                        }
                    )
                    bar.update(done, r.loss, seen)
                if interrupts.requested:
                    break
                if (
                    valid_set is not None
                    and cfg.eval_every
                    and done % cfg.eval_every == 0
                    and (done < steps)
                ):
                    eval_loss, ppl = self._validation(valid_set, done, pad)
                    self.write({"step": done, "eval_loss": eval_loss, "perplexity": ppl})
                    evaluated_at = done
                    if stopper is not None and stopper.improved(done, eval_loss):
                        last_ckpt = self._checkpoint(done)  # the best: every checkpoint is kept
                        self.best_checkpoint = last_ckpt
                    if stopper is not None and stopper.stop:
                        echo(
                            f"early stopping at step {done}: the validation loss has not improved "
                            f"for {stopper.since_best} evaluations (best {stopper.best_loss:.4f} "
                            f"at step {stopper.best_step})"
                        )
                        break
                saved_here = self.saved_step == done
                if (
                    cfg.save_every
                    and done % cfg.save_every == 0
                    and done < steps
                    and not saved_here
                ):
                    last_ckpt = self._checkpoint(done)
            bar.close()
            phases.mark("train")
            if interrupts.requested:  # a second interrupt while saving aborts; the save is atomic
                self._save_result(done, None, stopper)
                raise RunInterrupted(
                    f"interrupted: saved step {done} of {steps} to {out}; "
                    f"continue with: python cli.py finetune --resume {out}"
                )
        if valid_set is not None and evaluated_at != done:
            eval_loss, ppl = self._validation(valid_set, done, pad)
            self.write({"step": done, "eval_loss": eval_loss, "perplexity": ppl})
            echo(f"validation loss {eval_loss:.4f} (perplexity {ppl:.2f})")
            phases.mark("validation loss")
            if stopper is not None:
                stopper.improved(done, eval_loss)
        with self.display.phase(f"saving step {done} (checkpoint, adapter)"):
            last_ckpt = self._save_result(done, last_ckpt, stopper)
        phases.mark("save")
        if "gguf" in (cfg.export or ()) and self.main:
            with self.display.phase("exporting the merged model as GGUF"):
                self._export_gguf()
            phases.mark("export")
        if heldout:
            with self.display.phase(f"exact match on {len(heldout)} held-out examples") as c:
                after = exact_match_score(engine, tokenizer, heldout, progress=c.update)
            self.write(
                {
                    "event": "exact_match",
                    "phase": "after",
                    "step": done,
                    "exact_match": after.score,
                }
            )
            echo(
                f"exact match on {after.total} held-out examples after training: {after.score:.1%}"
            )
            phases.mark("exact match after")
        png = plot_loss(self.log.read(), out / "loss.png") if self.main else None
        echo(
            f"adapter: {out / 'adapter_model.safetensors'}; metrics: {self.log.path}"
            + (f"; loss curve: {png}" if png else "")
        )
        return FinetuneResult(
            cfg,
            engine.choice,
            out,
            done,
            losses,
            before,
            after,
            eval_loss,
            time.perf_counter() - t0,
            last_ckpt,
            phases.seconds,
            stopper.best_step if stopper is not None else None,
            self.main,
        )

    def _early_stopping(self) -> EarlyStopping | None:
        """The early stopping of this run; a resumed run picks up the validation losses its log
        holds up to `start`, when the best of them has its checkpoint here."""
        if not self.cfg.early_stopping_patience:
            return None
        stopper = EarlyStopping(self.cfg.early_stopping_patience)
        if self.start == 0:
            return stopper
        earlier = EarlyStopping(self.cfg.early_stopping_patience)
        for r in self.log.read():
            if "eval_loss" in r and r.get("step", 0) <= self.start:
                earlier.improved(r["step"], r["eval_loss"])
        if earlier.best_step is not None:
            best = checkpoint_of_step(self.out / "checkpoints", earlier.best_step)
            if best is not None:
                self.best_checkpoint = best
                return earlier
        return stopper

    def _validation(self, valid_set: nf4core.Dataset, step: int, pad: int) -> tuple[float, float]:
        label = f"validation loss at step {step} ({len(valid_set)} examples)"
        with self.display.phase(label) as c:
            return perplexity(self.engine, valid_set, self.cfg.batch_size, pad, progress=c.update)

    def _save_result(
        self, step: int, saved: Path | None = None, stopper: EarlyStopping | None = None
    ) -> Path:
        """The checkpoint of `step` (unless this call ran no step and saved one), the adapter and
        config.yaml; nothing non-finite is saved (NonFiniteStateError names the tensor). With early
        stopping, the adapter is the best step's (loaded back from its checkpoint, into the engine
        too, so exact match and exports see it)."""
        if (step > self.start or saved is None) and self.saved_step != step:
            saved = self._checkpoint(step)
        if stopper is not None and stopper.best_step is not None:
            at_step = stopper.best_step == step and saved is not None
            self._use_best(stopper, saved if at_step else self.best_checkpoint, step)
        if self.main:
            save_adapter(self.out, self._adapter(), self.cfg.export)
            _write_config(self.out, self.cfg)
        return saved

    def _use_best(self, stopper: EarlyStopping, best: Path, step: int) -> None:
        if stopper.best_step != step:
            if not self.main:  # the main rank wrote it (under this name, or a re-save's)
                best = checkpoint_of_step(best.parent, stopper.best_step) or best
            self.engine.load_adapters(load_checkpoint(best).state.adapters)
        self.write(
            {
                "step": step,
                "event": "best_checkpoint",
                "best_step": stopper.best_step,
                "best_eval_loss": stopper.best_loss,
                "checkpoint": str(best),
            }
        )
        self.echo(
            f"adapter: the best step's, {stopper.best_step} (validation loss "
            f"{stopper.best_loss:.4f}; checkpoint {best})"
        )

    def _adapter(self) -> Adapter:
        cfg = self.cfg
        return Adapter(
            self.engine.adapters(),
            cfg.lora_r,
            cfg.lora_alpha,
            cfg.lora_dropout,
            cfg.targets,
            base_model=self.base[0],
            base_revision=self.base[1],
            use_dora=bool(self.cfg.use_dora),
        )

    def _export_gguf(self) -> None:
        """The trained adapter merged into the base, as OUT/model.gguf (bfloat16)."""
        path = write_model_gguf(
            nf4core.open_model(self.model_path), self._adapter(), self.out / GGUF_EXPORT_NAME
        )
        self.echo(f"merged model (GGUF, bfloat16): {path}")

    def _checkpoint(self, step: int) -> Path:
        state = self.engine.training_state()
        assert state.step == step, (state.step, step)
        self.saved_step = step
        if not self.main:  # the name the main rank gives it
            return self.out / "checkpoints" / f"step-{step:06d}"
        return save_checkpoint(
            self.out / "checkpoints",
            state,
            self.cfg.to_dict(),
            {"micro_batches": step * self.cfg.grad_accum},
            self.engine.choice.backend,
        )

    def aborted(self) -> str:
        try:
            kept = find_checkpoint(self.out)
        except CheckpointError:
            return f"interrupted: all {self.engine.world.size} processes stopped; no checkpoint was saved"
        return (
            f"interrupted: all {self.engine.world.size} processes stopped at once; the latest "
            f"checkpoint stays {kept}; continue with: python cli.py finetune --resume {self.out}"
        )

    def _stopped(self, step: int, what: str) -> str:
        try:
            latest = f"the latest checkpoint stays {find_checkpoint(self.out)}"
        except CheckpointError:
            latest = "no checkpoint was saved"
        return (
            f"step {step}: non-finite {what}; stopped without saving this state ({latest}); "
            "lower --lr, check the data and model, or pass --skip-nonfinite N"
        )


class _Phases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now


GGUF_EXPORT_NAME = "model.gguf"


def _quiet(line: str) -> None:
    """The echo of the ranks other than the main one."""


def check_early_stopping(cfg: FinetuneConfig, valid_set: nf4core.Dataset | None) -> None:
    """Early stopping watches the validation loss: it needs a validation set and --eval-every."""
    if not cfg.early_stopping_patience:
        return
    if valid_set is None:
        raise ConfigError(
            f"early_stopping_patience {cfg.early_stopping_patience}: needs a validation set "
            "(a valid* file beside the training data, or a --data directory with one)"
        )
    if not cfg.eval_every:
        raise ConfigError(
            f"early_stopping_patience {cfg.early_stopping_patience}: needs --eval-every N "
            "(the validation loss it watches is computed every N steps)"
        )


def check_gguf_export(cfg: FinetuneConfig, source: nf4core.ModelSource, model_path: str) -> None:
    """Before training: `--export gguf` can write this model, and merges onto the base trained
    (the NF4 base as `merge` rebuilds it: absmax blocks)."""
    if cfg.base_dtype != "nf4" or cfg.quant_method != DEFAULT_QUANT_METHOD:
        raise ConfigError(
            f"export gguf merges the adapter into the {DEFAULT_QUANT_METHOD} NF4 base, as merge "
            f"does; this run trains on base_dtype {cfg.base_dtype}, quant_method "
            f"{cfg.quant_method} (not supported)"
        )
    gguf_package()
    gguf_architecture(source.config)
    tokenizer_metadata(source)


def _write_config(out: Path, cfg: FinetuneConfig) -> None:
    import yaml

    write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "NonFiniteError",
    "RunInterrupted",
    "finetune",
    "resolve",
]
