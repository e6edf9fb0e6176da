"""Command-line interface: a thin layer over `backends.api` (every command is a library call).

    python cli.py finetune                # the embedded default run (SmolLM2-135M + built-in task)
    python cli.py finetune --model DIR --data train.jsonl --out runs/x --steps 200
"""

from __future__ import annotations

import contextlib
import json
import sys

import click

BACKENDS = click.Choice(["torch", "mlx"])


@contextlib.contextmanager
def user_errors():
    """Problems with what the user gave (paths, files, settings) become one clear line."""
    from backends.checkpoint import CheckpointError
    from backends.peft_adapter import AdapterError
    from backends.registry import BackendUnavailable
    from nf4core import ModelLoadError

    try:
        yield
    except (ModelLoadError, CheckpointError, AdapterError, BackendUnavailable, ValueError, KeyError,
            OSError) as e:  # fmt: skip
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise click.ClickException(str(message)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="nf4-qlora")
def main() -> None:
    """QLoRA fine-tuning with bitsandbytes-exact NF4 weights, on PyTorch (CUDA/CPU) or MLX
    (Metal/CPU). Run `python cli.py finetune` for the built-in demo run."""


def backend_options(f):
    f = click.option("--compute-dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Activation/adapter compute dtype [default: BF16 on GPUs, FP32 on CPUs; "
                          "env NF4_COMPUTE_DTYPE].")(f)  # fmt: skip
    f = click.option("--device", help="cpu, cuda, cuda:N or metal [default: auto; env NF4_DEVICE].")(f)
    return click.option("--backend", type=BACKENDS,
                        help="torch or mlx [default: auto; env NF4_BACKEND].")(f)  # fmt: skip


@main.command()
@click.option("--model", help="HF directory, GGUF file or bitsandbytes-4bit directory "
              "[default: the embedded SmolLM2-135M-Instruct].")  # fmt: skip
@click.option("--data", help="JSONL file, or a directory with train.jsonl (+ valid.jsonl) "
              "[default: the built-in digit-shift task].")  # fmt: skip
@click.option("--out", help="Output directory [default: finetune-out].")
@click.option("--steps", type=int, help="Optimizer steps [default: the task's recommendation, or 100].")
@click.option("--epochs", type=float, help="Train this many passes over the data instead of --steps.")
@click.option("--batch-size", type=int, help="Examples per micro-batch.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step [default: 1].")
@click.option("--max-seq-len", type=int, help="Longer examples are truncated to this many tokens.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--warmup-steps", type=int, help="Linear warmup steps [default: 0].")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]),
              help="Learning-rate decay after warmup [default: cosine].")
@click.option("--lora-r", type=int, help="LoRA rank.")
@click.option("--lora-alpha", type=float, help="LoRA alpha (scale = alpha / r).")
@click.option("--lora-dropout", type=float, help="Dropout on the adapter input [default: 0].")
@click.option("--targets", help="Comma-separated module names to adapt, e.g. q_proj,v_proj.")
@click.option("--seed", type=int, help="Seed of adapters, data order and dropout [default: 0].")
@click.option("--base-dtype", type=click.Choice(["nf4", "bfloat16", "float32"]),
              help="The frozen base: nf4 (QLoRA) or unquantized bfloat16/float32 (plain LoRA, a "
                   "baseline) [default: nf4].")  # fmt: skip
@click.option("--quant-method", type=click.Choice(["absmax", "mse"]),
              help="How a 16/32-bit base is quantized on load: absmax or mse (an NF4 model is "
                   "used as stored) [default: mse].")  # fmt: skip
@backend_options
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None,
              help="Recompute activations in backward to save memory [default: off].")
@click.option("--paged-optimizer/--no-paged-optimizer", default=None,
              help="Keep optimizer state in host memory, paged in [default: on for GPUs].")
@click.option("--eval-every", type=int, help="Validation loss every N steps (0: only at the end).")
@click.option("--save-every", type=int, help="Training checkpoint every N steps (always at the end).")
@click.option("--eval-max-examples", type=int,
              help="Held-out examples for exact match of the built-in task (0: all).")
@click.option("--export", "export", type=click.Choice(["mlx-lm"]), multiple=True,
              help="Also write the adapter in another format (under OUT/mlx-lm).")
@click.option("--resume", type=click.Path(), help="Continue from a run's output or checkpoint directory.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file of settings (names as the options, with _ or -); the command line wins.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune(config_file, quiet, export, **options) -> None:
    """Fine-tune a model with QLoRA (NF4 base, LoRA adapters).

    Writes to OUT: adapter_model.safetensors + adapter_config.json (PEFT), checkpoints/ (resume
    with --resume OUT, on either backend), metrics.jsonl, loss.png and the resolved config.yaml.
    With no --data, trains the built-in task and prints held-out exact match before and after.
    """
    from backends import api

    with user_errors():
        file_settings = api.FinetuneConfig.from_file(config_file) if config_file else {}
        options["export"] = export or None
        cfg = api.FinetuneConfig.merged(options, file_settings)
        result = api.finetune(cfg, echo=click.echo, progress=not quiet)
    if result.exact_match_before and result.exact_match_after:
        b, a = result.exact_match_before, result.exact_match_after
        phases = ", ".join(f"{k} {v:.0f}s" for k, v in result.phases.items())
        click.echo(f"held-out exact match: {b.score:.1%} before -> {a.score:.1%} after "
                   f"({result.seconds:.0f}s: {phases})")  # fmt: skip


@main.command()
@click.argument("prompt")
@click.option("--model", help="Base model [default: the embedded SmolLM2-135M-Instruct].")
@click.option("--adapter", type=click.Path(), help="A PEFT adapter directory (e.g. a finetune OUT).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--raw", is_flag=True, help="Do not apply the chat template.")
@backend_options
def generate(prompt, model, adapter, max_new_tokens, temperature, top_p, seed, raw, backend, device,
             compute_dtype) -> None:
    """Generate a reply to PROMPT, streamed token by token."""
    from backends import api

    with user_errors():
        loaded = api.load(model, adapter=adapter, backend=backend, device=device,
                          compute_dtype=compute_dtype)  # fmt: skip
        for piece in loaded.stream(prompt, chat=not raw, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed):  # fmt: skip
            click.echo(piece, nl=False)
            sys.stdout.flush()
    click.echo()


@main.command("eval")
@click.argument("data", type=click.Path())
@click.option("--model", help="Base model [default: the embedded SmolLM2-135M-Instruct].")
@click.option("--adapter", type=click.Path(), help="A PEFT adapter directory.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--max-seq-len", type=int, default=2048, show_default=True)
@click.option("--max-examples", type=int, default=0, help="Exact match on the first N (0: all).")
@backend_options
def evaluate(data, model, adapter, batch_size, max_seq_len, max_examples, backend, device,
             compute_dtype) -> None:
    """Perplexity on DATA (JSONL), and exact match on its chat / prompt-completion records."""
    from backends import api

    with user_errors():
        loaded = api.load(model, adapter=adapter, backend=backend, device=device,
                          compute_dtype=compute_dtype)  # fmt: skip
        r = loaded.evaluate(data, batch_size, max_seq_len, max_examples)
    click.echo(f"loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  ({r['examples']} examples)")
    if r["exact_match"] is not None:
        click.echo(f"exact match {r['exact_match']:.1%} ({r['exact_match_examples']} examples)")


@main.command()
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option("--blocksize", type=int, default=64, show_default=True)
@click.option("--double-quant/--no-double-quant", default=True, show_default=True)
@click.option("--method", type=click.Choice(["absmax", "mse"]),
              help="Block scales: mse (18% less weight error, lower perplexity, same format; "
                   "see BENCHMARKS.md) or absmax (bitsandbytes' own, bit-identical) "
                   "[default: mse].")  # fmt: skip
def quantize(model, out, blocksize, double_quant, method) -> None:
    """Quantize MODEL (HF dir, GGUF, bnb dir) to a bitsandbytes-format NF4 directory OUT.
    Weights already stored as NF4 are copied, never requantized."""
    from backends import api

    with user_errors():
        path = api.quantize(model, out, blocksize, double_quant, method)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("adapter", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--model", help="Base model [default: the adapter's base, else the embedded model].")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Dtype of the merged weights.")
@click.option("--nf4", "requantize", is_flag=True, help="Re-quantize the merged weights to NF4.")
def merge(adapter, out, model, dtype, requantize) -> None:
    """Merge ADAPTER into its base model; write a Hugging Face directory OUT."""
    from backends import api
    from backends.peft_adapter import load_adapter

    with user_errors():
        base = model or load_adapter(adapter).base_model
        path = api.merge_adapter(base, adapter, out, dtype, requantize)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("path", required=False)
@click.option("--seq-len", type=int, default=512, show_default=True,
              help="Sequence length of the training-memory estimate.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--lora-r", type=int, default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path, seq_len, batch_size, lora_r, as_json) -> None:
    """Describe a model, adapter or checkpoint PATH [default: the embedded model]."""
    from backends import api

    with user_errors():
        d = api.info(path, seq_len, batch_size, lora_r)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    for key, value in d.items():
        if key == "memory_estimate_bytes":
            value = f"{value / 2**30:.2f} GiB (training, seq {d['seq_len']}, batch {d['batch_size']})"
        elif key == "bits_per_weight":
            value = f"{value:.3f}"
        elif isinstance(value, dict):
            value = json.dumps(value)
        click.echo(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
