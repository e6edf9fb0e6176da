"""Command-line interface: a thin layer over `backends.api` (every command is a library call).

python cli.py finetune                # the embedded default run (SmolLM2-135M + built-in task)
python cli.py finetune --model DIR --data train.jsonl --out runs/x --steps 200
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import click

BACKENDS = click.Choice(["torch", "mlx"])


class FiniteFloat(click.ParamType):
    """A finite float within bounds (click's FloatRange lets nan and inf through)."""

    name = "float"

    def __init__(self, low: float, high: float = float("inf"), low_open: bool = False) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        above = number > self.low if self.low_open else number >= self.low
        if not (math.isfinite(number) and above and number <= self.high):
            low = f"> {self.low}" if self.low_open else f">= {self.low}"
            high = f" and <= {self.high}" if math.isfinite(self.high) else ""
            self.fail(f"{value} is not a finite number {low}{high}", param, ctx)
        return number


COUNT, POSITIVE = click.IntRange(min=0), click.IntRange(min=1)


DEBUG = {"on": False}  # set by --debug / NF4_DEBUG=1: show tracebacks instead of one-line errors


def one_line(text: object) -> str:
    return " ".join(str(text).split()) or "unknown error"


def describe_os_error(e: OSError) -> str:
    """`path: problem` (both paths for a rename), not Python's `[Errno 28] ...: 'path'`."""
    problem = e.strerror or str(e)
    if e.filename is None:
        return problem
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
    return f"{where}: {problem}"


@contextlib.contextmanager
def user_errors():
    """Problems with what the user gave (paths, files, settings) become one clear line."""
    from backends.checkpoint import CheckpointError
    from backends.peft_adapter import AdapterError
    from backends.registry import BackendUnavailable
    from backends.world import WorldError
    from nf4core import ModelLoadError

    try:
        yield
    except (
        ModelLoadError,
        CheckpointError,
        AdapterError,
        BackendUnavailable,
        WorldError,
        ValueError,
        KeyError,
        OSError,
    ) as e:
        if DEBUG["on"]:
            raise
        if isinstance(e, KeyError) and e.args:
            message = e.args[0]
        elif isinstance(e, OSError):
            message = describe_os_error(e)
        else:
            message = e
        raise click.ClickException(one_line(message)) from e


class OneLineErrors(click.Group):
    """Every error ends the command with one line on stderr and a non-zero exit code: click's usage
    errors (2), ours (1), anything unexpected (1, with a hint at --debug). `--debug` or NF4_DEBUG=1
    shows the traceback instead."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort as e:
            interrupted = isinstance(e.__context__, KeyboardInterrupt)
            click.echo("Aborted." if not interrupted else "Interrupted.", err=True)
            sys.exit(130 if interrupted else 1)
        except click.ClickException as e:
            if DEBUG["on"] and e.__cause__ is not None:
                raise
            click.echo(f"Error: {one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except Exception as e:  # a bug, or a user error we did not foresee: still one line
            if DEBUG["on"] or _env_debug():
                raise
            click.echo(
                f"Error: {type(e).__name__}: {one_line(e)} (run with --debug for the traceback)",
                err=True,
            )
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _env_debug() -> bool:
    return os.environ.get("NF4_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    DEBUG["on"] = bool(value) or _env_debug()
    return value


@click.group(
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="nf4-qlora")
@click.option(
    "--debug",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_set_debug,
    help="Show the full traceback of an error [env NF4_DEBUG=1].",
)
def main() -> None:
    """QLoRA fine-tuning with bitsandbytes-exact NF4 weights, on PyTorch (CUDA/CPU) or MLX
    (Metal/CPU). Run `python cli.py finetune` for the built-in demo run."""


def phase(label: str):
    """A long phase's start and end lines on stderr; in a log (not a terminal), only once it has
    lasted 30 s, so bad input still ends the command with its error as the only line."""
    from backends.run_log import PhaseDisplay

    return PhaseDisplay().phase(label, log_delay=30.0)


def backend_options(f):
    f = click.option(
        "--compute-dtype",
        type=click.Choice(["float32", "bfloat16", "float16"]),
        help="Activation/adapter compute dtype [default: BF16 on GPUs, FP32 on CPUs; "
        "env NF4_COMPUTE_DTYPE].",
    )(f)
    f = click.option(
        "--device", help="cpu, cuda, cuda:N or metal [default: auto; env NF4_DEVICE]."
    )(f)
    return click.option(
        "--backend", type=BACKENDS, help="torch or mlx [default: auto; env NF4_BACKEND]."
    )(f)


@main.command()
@click.option(
    "--model",
    help="HF directory, GGUF file, bitsandbytes-4bit directory, or Hugging Face Hub id "
    "(org/name[@revision]; from the cache, downloaded unless HF_HUB_OFFLINE=1) "
    "[default: the embedded SmolLM2-135M-Instruct].",
)
@click.option(
    "--data",
    help="JSONL, JSON, Parquet or Arrow file; a directory of split files (train*, valid*) or "
    "saved by datasets' save_to_disk; or a Hub data set id in the cache "
    "[default: the built-in digit-shift task].",
)
@click.option(
    "--data-format",
    type=click.Choice(["auto", "messages", "sharegpt", "alpaca", "prompt-completion", "text"]),
    help="The records' shape, when its keys do not tell [default: auto, printed].",
)
@click.option("--out", help="Output directory [default: finetune-out].")
@click.option(
    "--steps", type=int, help="Optimizer steps [default: the task's recommendation, or 100]."
)
@click.option(
    "--epochs", type=float, help="Train this many passes over the data instead of --steps."
)
@click.option("--batch-size", type=int, help="Examples per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step [default: 1].")
@click.option("--max-seq-len", type=int, help="Longer examples are truncated to this many tokens.")
@click.option(
    "--packing/--no-packing",
    default=None,
    help="Lay short examples end to end in rows of --max-seq-len tokens (attention and loss stay "
    "within each example) [default: off].",
)
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, help="Linear warmup steps [default: 0].")
@click.option(
    "--schedule",
    type=click.Choice(["cosine", "linear", "constant"]),
    help="Learning-rate decay after warmup [default: cosine].",
)
@click.option("--lora-r", type=int, help="LoRA rank.")
@click.option("--lora-alpha", type=float, help="LoRA alpha (scale = alpha / r).")
@click.option("--lora-dropout", type=float, help="Dropout on the adapter input [default: 0].")
@click.option("--targets", help="Comma-separated module names to adapt, e.g. q_proj,v_proj.")
@click.option(
    "--use-dora",
    is_flag=True,
    default=None,
    help="DoRA: also train a magnitude per output row (PEFT's use_dora) [default: off].",
)
@click.option("--seed", type=int, help="Seed of adapters, data order and dropout [default: 0].")
@click.option(
    "--base-dtype",
    type=click.Choice(["nf4", "bfloat16", "float32"]),
    help="The frozen base: nf4 (QLoRA) or unquantized bfloat16/float32 (plain LoRA, a "
    "baseline) [default: nf4].",
)
@click.option(
    "--quant-method",
    type=click.Choice(["absmax", "mse"]),
    help="How a 16/32-bit base is quantized on load: absmax or mse (an NF4 model is "
    "used as stored) [default: absmax].",
)
@backend_options
@click.option(
    "--grad-checkpoint/--no-grad-checkpoint",
    default=None,
    help="Recompute activations in backward to save memory; on torch also computes "
    "the loss in chunks, never holding the full logits [default: off].",
)
@click.option(
    "--paged-optimizer/--no-paged-optimizer",
    default=None,
    help="Keep optimizer state in host memory, paged in [default: on for CUDA GPUs and on MLX].",
)
@click.option("--eval-every", type=int, help="Validation loss every N steps (0: only at the end).")
@click.option(
    "--early-stopping-patience",
    type=int,
    help="Stop when the validation loss has not improved for N evaluations (--eval-every); "
    "the best step's adapter is the result [default: 0, off].",
)
@click.option(
    "--report-to",
    "report_to",
    type=click.Choice(["tensorboard", "wandb"]),
    multiple=True,
    help="Also log metrics to TensorBoard (OUT/tensorboard) or Weights & Biases (optional "
    "packages).",
)
@click.option(
    "--save-every", type=int, help="Training checkpoint every N steps (always at the end)."
)
@click.option(
    "--eval-max-examples",
    type=int,
    help="Held-out examples for exact match of the built-in task (0: all).",
)
@click.option(
    "--export",
    "export",
    type=click.Choice(["mlx-lm", "gguf"]),
    multiple=True,
    help="Also write the adapter for mlx-lm (OUT/mlx-lm), or the merged model as GGUF "
    "(OUT/model.gguf, bfloat16).",
)
@click.option(
    "--resume",
    type=click.Path(),
    help="Continue from a run's output or checkpoint directory (writes there, or to --out).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    default=None,
    help="Move a non-empty --out aside (to OUT.old-N) and start afresh.",
)
@click.option(
    "--skip-nonfinite",
    type=int,
    help="Skip up to N steps with a NaN/Inf loss or gradient instead of stopping [default: 0].",
)
@click.option(
    "--strict-data",
    is_flag=True,
    default=None,
    help="Refuse records with no target tokens instead of skipping them.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML file of settings (names as the options, with _ or -); the command line wins.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune(config_file, quiet, export, report_to, **options) -> None:
    """Fine-tune a model with QLoRA (NF4 base, LoRA adapters).

    Writes to OUT: adapter_model.safetensors + adapter_config.json (PEFT), checkpoints/ (resume
    with --resume OUT, on either backend), metrics.jsonl, loss.png and the resolved config.yaml.
    With no --data, trains the built-in task and prints held-out exact match before and after.
    """
    from backends import api

    with user_errors():
        file_settings = api.FinetuneConfig.from_file(config_file) if config_file else {}
        options["export"] = export or None
        options["report_to"] = report_to or None
        cfg = api.FinetuneConfig.merged(options, file_settings)
        try:
            result = api.finetune(cfg, echo=click.echo, progress=not quiet)
        except api.RunInterrupted as e:  # saved; 130 is the shell's code for an interrupt
            if str(e):  # empty on the other ranks of a multi-process run: rank 0 speaks
                click.echo(str(e), err=True)
            sys.exit(130)
        except KeyboardInterrupt:  # a second interrupt: aborted at once
            click.echo("aborted", err=True)
            sys.exit(130)
    if result.is_main and result.exact_match_before and result.exact_match_after:
        b, a = result.exact_match_before, result.exact_match_after
        phases = ", ".join(f"{k} {v:.0f}s" for k, v in result.phases.items())
        click.echo(
            f"held-out exact match: {b.score:.1%} before -> {a.score:.1%} after "
            f"({result.seconds:.0f}s: {phases})"
        )


@main.command()
@click.argument("prompt")
@click.option("--model", help="Base model [default: the embedded SmolLM2-135M-Instruct].")
@click.option(
    "--adapter", type=click.Path(), help="A PEFT adapter directory (e.g. a finetune OUT)."
)
@click.option("--max-new-tokens", type=COUNT, default=128, show_default=True)
@click.option(
    "--temperature", type=FiniteFloat(0.0), default=0.0, show_default=True, help="0 is greedy."
)
@click.option("--top-p", type=FiniteFloat(0.0, 1.0, low_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@backend_options
def generate(
    prompt,
    model,
    adapter,
    max_new_tokens,
    temperature,
    top_p,
    seed,
    raw,
    backend,
    device,
    compute_dtype,
) -> None:
    """Generate a reply to PROMPT, streamed token by token."""
    from backends import api

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 arrive as lone surrogates
        raise click.BadParameter(
            f"not valid UTF-8 text (at character {e.start})", param_hint="PROMPT"
        ) from None
    with user_errors():
        loaded = api.load(
            model, adapter=adapter, backend=backend, device=device, compute_dtype=compute_dtype
        )
        for piece in loaded.stream(
            prompt,
            chat=not raw,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        ):
            click.echo(piece, nl=False)
            sys.stdout.flush()
    click.echo()


@main.command("eval")
@click.argument("data", type=click.Path())
@click.option("--model", help="Base model [default: the embedded SmolLM2-135M-Instruct].")
@click.option("--adapter", type=click.Path(), help="A PEFT adapter directory.")
@click.option("--batch-size", type=POSITIVE, default=4, show_default=True)
@click.option("--max-seq-len", type=click.IntRange(min=2), default=2048, show_default=True)
@click.option("--max-examples", type=COUNT, default=0, help="Exact match on the first N (0: all).")
@backend_options
def evaluate(
    data, model, adapter, batch_size, max_seq_len, max_examples, backend, device, compute_dtype
) -> None:
    """Perplexity on DATA (a data file in any format finetune reads), and exact match on its chat /
    prompt-completion records."""
    from backends import api

    with user_errors():
        with phase("loading the model"):
            loaded = api.load(
                model, adapter=adapter, backend=backend, device=device, compute_dtype=compute_dtype
            )
        r = loaded.evaluate(data, batch_size, max_seq_len, max_examples, progress=True)
    click.echo(
        f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  ({r['examples']} examples)"
    )
    if r["exact_match"] is not None:
        click.echo(f"exact match {r['exact_match']:.1%} ({r['exact_match_examples']} examples)")


@main.command()
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option("--blocksize", type=int, default=64, show_default=True)
@click.option("--double-quant/--no-double-quant", default=True, show_default=True)
@click.option(
    "--method",
    type=click.Choice(["absmax", "mse"]),
    help="Block scales: absmax (bitsandbytes' own, bit-identical) or mse (18% less "
    "weight error, same format; see BENCHMARKS.md) [default: absmax].",
)
def quantize(model, out, blocksize, double_quant, method) -> None:
    """Quantize MODEL (HF dir, GGUF, bnb dir) to a bitsandbytes-format NF4 directory OUT.
    Weights already stored as NF4 are copied, never requantized."""
    from backends import api

    with user_errors():
        with phase(f"quantizing {model}"):
            path = api.quantize(model, out, blocksize, double_quant, method)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("adapter", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--model", help="Base model [default: the adapter's base, else the embedded model].")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32", "q8_0"]),
    default="bfloat16",
    show_default=True,
    help="Dtype of the merged weights (q8_0: --format gguf only).",
)
@click.option("--nf4", "requantize", is_flag=True, help="Re-quantize the merged weights to NF4.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "gguf"]),
    default="hf",
    show_default=True,
    help="A Hugging Face directory, or one GGUF file for llama.cpp (then --dtype may be q8_0).",
)
def merge(adapter, out, model, dtype, requantize, fmt) -> None:
    """Merge ADAPTER into its base model; write a Hugging Face directory (or a GGUF file) OUT."""
    from backends import api
    from backends.peft_adapter import load_adapter
    from nf4core.hub import base_spec

    with user_errors():
        loaded = load_adapter(adapter)
        base = model or base_spec(loaded.base_model, loaded.base_revision)
        with phase(f"merging {adapter} into {base}"):
            path = api.merge_adapter(base, adapter, out, dtype, requantize, fmt)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "gguf"]),
    default="hf",
    show_default=True,
    help="hf: a dense Hugging Face directory (transformers, mlx-lm); gguf: one file for llama.cpp.",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32", "q8_0"]),
    default="bfloat16",
    show_default=True,
    help="Dtype of the weights (q8_0: GGUF only; norms stay float32 in a GGUF).",
)
@click.option("--adapter", type=click.Path(), help="A PEFT adapter to merge in first.")
@click.option("--overwrite", is_flag=True, help="Move an existing OUT aside (to OUT.old-N).")
def export(model, out, fmt, dtype, adapter, overwrite) -> None:
    """Write MODEL (HF dir, GGUF, bnb or NF4 dir; NF4 is dequantized) as a dense Hugging Face
    directory or a GGUF file OUT, with --adapter merged in when given."""
    from backends import api

    with user_errors():
        with phase(f"exporting {model}"):
            path = api.export(model, out, fmt, dtype, adapter, overwrite, echo=click.echo)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("path", required=False)
@click.option(
    "--seq-len",
    type=POSITIVE,
    default=512,
    show_default=True,
    help="Sequence length of the training-memory estimate.",
)
@click.option(
    "--batch-size",
    type=POSITIVE,
    default=1,
    show_default=True,
    help="Rows per micro-batch (with --nproc: the global batch, split over the ranks).",
)
@click.option("--lora-r", type=POSITIVE, default=8, show_default=True)
@click.option(
    "--nproc",
    type=POSITIVE,
    help="Also plan each rank's memory in a run of this many processes (torchrun / mlx.launch).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path, seq_len, batch_size, lora_r, nproc, as_json) -> None:
    """Describe a model, adapter or checkpoint PATH [default: the embedded model]."""
    from backends import api

    with user_errors():
        d = api.info(path, seq_len, batch_size, lora_r, nproc)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    for key, value in d.items():
        if key == "per_rank":
            echo_per_rank(value)
            continue
        if key == "memory_estimate_bytes":
            value = (
                f"{value / 2**30:.2f} GiB (training, seq {d['seq_len']}, batch {d['batch_size']})"
            )
        elif key == "bits_per_weight":
            value = f"{value:.3f}"
        elif isinstance(value, dict):
            value = json.dumps(value)
        click.echo(f"{key:>22}: {value}")


def echo_per_rank(plan: dict) -> None:
    """The per-rank memory plan of `info --nproc`, part by part, saying what is sharded."""

    def size(b: int) -> str:
        return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"

    n, rows = plan["nproc"], plan["rows_per_rank"]
    t, m = plan["torch_fsdp"], plan["mlx_data_parallel"]
    lines = [
        ("torch (torchrun, FSDP2)", t["total"], "per rank"),
        (f"  NF4 base, 1/{n} per rank", t["nf4_base_shard"], "sharded"),
        ("  one layer all-gathered", t["largest_layer_gathered"], "transient, the largest layer"),
        ("  embedding, norms, LM head", t["dense_replicated"], "replicated"),
        ("  adapters, grads, optimizer", t["adapters_and_optimizer_replicated"], "replicated"),
        (f"  activations, {rows} rows", t["activations"], "this rank's rows"),
        ("MLX (mlx.launch, data parallel)", m["total"], f"per rank: a full replica, {rows} rows"),
    ]
    click.echo(f"{'per rank':>22}: {n} processes, {rows} rows of each global batch per rank")
    for label, value, note in lines:
        click.echo(f"{'':>24}{label:<32}{size(value):>11}  {note}")


if __name__ == "__main__":
    main()
