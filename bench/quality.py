"""What 4 bits cost, and what the mse quantizer wins back: NF4 absmax (bitsandbytes' quantizer) vs
NF4 mse vs the unquantized base, side by side in one run, on the default model.

    python bench/quality.py                          # every section (~20 min on 2 CPU cores)
    python bench/quality.py --sections weights,timing,perplexity
    python bench/quality.py --sections finetune-task,finetune-text

Sections:
- weights: relative squared error ||W - Q(W)||^2 / ||W||^2 of every NF4 linear, mean over the
  linears, absmax vs mse, with and without double quantization (bits per weight alike);
- timing: seconds of nf4core.quantize_model of the whole model, absmax vs mse;
- perplexity: on bench/data/heldout_english.txt (written for this project, public domain), windows
  of --window tokens, for the float32 and bfloat16 base and NF4 absmax / mse; with the share of
  positions whose top-1 token equals the float32 base's, and the mean KL divergence (nats/token)
  of the next-token distribution from the float32 base's;
- finetune-task: the built-in task (its recommended settings) with a bfloat16 base (plain LoRA),
  QLoRA absmax and QLoRA mse: final validation loss and held-out exact match, same seed and data;
- finetune-text: the same three on text records (the paragraphs of README.md, every 5th held out).

--model, --steps and the sizes exist for the CI smoke test (tests/bench/test_quality_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nf4core  # noqa: E402
from nf4core.sources import is_quantized_linear  # noqa: E402

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "heldout_english.txt"
SECTIONS = ("weights", "timing", "perplexity", "finetune-task", "finetune-text")
# (label, base_dtype, quant_method): the three bases every fine-tune row compares
BASES = (
    ("16-bit LoRA (bfloat16 base)", "bfloat16", "absmax"),
    ("QLoRA, NF4 absmax", "nf4", "absmax"),
    ("QLoRA, NF4 mse", "nf4", "mse"),
)


def _relative_error(w: np.ndarray, t: nf4core.NF4Tensor) -> float:
    w64 = w.astype(np.float64)
    return float(((w64 - nf4core.dequantize(t)) ** 2).sum() / (w64**2).sum())


def weight_errors(model: str, max_tensors: int = 0) -> list[dict]:
    source = nf4core.open_model(model)
    names = [n for n in source.tensor_names() if is_quantized_linear(n)]
    names = names[:max_tensors] if max_tensors else names
    errors: dict[tuple[str, bool], list[float]] = {}
    for name in names:
        w = np.asarray(source.read(name), np.float32)
        for dq in (True, False):
            for method in ("absmax", "mse"):
                errors.setdefault((method, dq), []).append(
                    _relative_error(w, nf4core.quantize(w, 64, dq, method))
                )
    rows = []
    for (method, dq), values in errors.items():
        base = np.array(errors[("absmax", dq)])
        rows.append(
            {
                "method": method,
                "double_quant": dq,
                "tensors": len(values),
                "bits_per_weight": 4 + 8 / 64 + 32 / (64 * 256) if dq else 4 + 32 / 64,
                "mean_rel_sq_error": float(np.mean(values)),
                "vs_absmax": float(np.mean(values) / base.mean()),
                "tensors_better_than_absmax": int(np.sum(np.array(values) < base)),
            }
        )
    return rows


def quantize_seconds(model: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, method in enumerate(("absmax", "mse", "absmax", "mse")):  # interleaved, twice
            t = time.perf_counter()
            nf4core.quantize_model(model, Path(tmp) / f"{i}", method=method)
            rows.append({"method": method, "seconds": time.perf_counter() - t})
    best = {m: min(r["seconds"] for r in rows if r["method"] == m) for m in ("absmax", "mse")}
    return [{"method": m, "seconds": s, "vs_absmax": s / best["absmax"]} for m, s in best.items()]


def _windows(tokenizer: nf4core.Tokenizer, text: str, window: int, max_windows: int) -> np.ndarray:
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    n = min(n, max_windows) if max_windows else n
    return np.array(ids[: n * window], np.int64).reshape(n, window)


def perplexities(
    model: str, text_path: Path = TEXT, window: int = 512, max_windows: int = 0
) -> list[dict]:
    import torch

    from backends.torch_backend.model import CausalLM

    source = nf4core.open_model(model)
    windows = torch.from_numpy(
        _windows(source.tokenizer(), text_path.read_text(), window, max_windows)
    )
    variants = (
        ("float32 base", dict(quantize=False)),
        ("bfloat16 base", dict(quantize=False, base_dtype=torch.bfloat16)),
        ("NF4 absmax", dict(method="absmax")),
        ("NF4 mse", dict(method="mse")),
    )
    rows, reference, base_logprobs = [], None, []
    for label, kw in variants:
        lm = CausalLM.from_source(source, compute_dtype=torch.float32, **kw).eval()
        nll, top1, kl = [], [], []
        with torch.no_grad():
            for i, row in enumerate(windows):
                logprobs = torch.log_softmax(lm(row[None, :-1])[0].float(), -1)  # (T-1, vocab)
                nll.append(-logprobs.gather(1, row[1:, None])[:, 0])
                top1.append(logprobs.argmax(-1))
                if reference is None:
                    base_logprobs.append(logprobs.to(torch.bfloat16))  # half the memory
                else:
                    p = base_logprobs[i].float()
                    kl.append((p.exp() * (p - logprobs)).sum(-1))
        nll_t, top1_t = torch.cat(nll), torch.cat(top1)
        reference = top1_t if reference is None else reference
        rows.append(
            {
                "model": label,
                "perplexity": math.exp(nll_t.mean().item()),
                "tokens": int(nll_t.numel()),
                "top1_same_as_float32": float((top1_t == reference).float().mean()),
                "kl_from_float32": float(torch.cat(kl).mean()) if kl else 0.0,
            }
        )
        del lm
    return rows


def _text_data(directory: Path) -> Path:
    """train.jsonl / valid.jsonl of the paragraphs of README.md (every 5th held out)."""
    readme = (HERE.parent / "README.md").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in readme.split("\n\n") if len(p.strip()) >= 200]
    directory.mkdir(parents=True, exist_ok=True)
    for name, held in (("train.jsonl", False), ("valid.jsonl", True)):
        lines = [json.dumps({"text": p}) for i, p in enumerate(paragraphs) if (i % 5 == 4) == held]
        (directory / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def finetunes(
    kind: str,
    model: str | None,
    steps: int | None,
    eval_max_examples: int = 0,
    backend: str = "torch",
) -> list[dict]:
    from backends import api

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = dict(model=model, backend=backend, device="cpu", seed=0)
        if kind == "text":
            settings.update(
                data=str(_text_data(Path(tmp) / "data")),
                steps=steps or 60,
                batch_size=4,
                max_seq_len=256,
                lr=2e-4,
            )
        else:
            settings.update(steps=steps, eval_max_examples=eval_max_examples or None)
        for label, base_dtype, method in BASES:
            cfg = api.FinetuneConfig(
                out=str(Path(tmp) / f"{base_dtype}-{method}"),
                base_dtype=base_dtype,
                quant_method=method,
                **settings,
            )
            r = api.finetune(cfg, echo=lambda s: None, progress=False)
            after = r.exact_match_after
            rows.append(
                {
                    "run": label,
                    "steps": r.steps,
                    "final_eval_loss": r.eval_loss,
                    "exact_match": after.score if after else None,
                    "seconds": r.seconds,
                }
            )
    reference = rows[0]["final_eval_loss"]
    for row in rows:
        row["eval_loss_vs_16bit"] = row["final_eval_loss"] / reference - 1
    return rows


def _print_table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}")
    if not rows:
        return
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--model", help="[default: the embedded SmolLM2-135M-Instruct]")
    p.add_argument(
        "--max-tensors", type=int, default=0, help="weights: the first N linears (0: all)"
    )
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=0)
    p.add_argument("--steps", type=int, help="fine-tune steps [default: the task's, 60 for text]")
    p.add_argument("--eval-max-examples", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    model = args.model or str(nf4core.default_model_path())
    from bench.machine import describe

    print(f"machine: {describe()}")
    print(f"model: {model}")
    results = {}
    runs = {
        "weights": lambda: weight_errors(model, args.max_tensors),
        "timing": lambda: quantize_seconds(model),
        "perplexity": lambda: perplexities(model, TEXT, args.window, args.max_windows),
        "finetune-task": lambda: finetunes("task", args.model, args.steps, args.eval_max_examples),
        "finetune-text": lambda: finetunes("text", args.model, args.steps),
    }
    for name in SECTIONS:
        if name in sections:
            t = time.perf_counter()
            results[name] = runs[name]()
            _print_table(f"{name} ({time.perf_counter() - t:.0f}s)", results[name])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
