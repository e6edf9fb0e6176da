"""QLoRA training on the CPU side by side: `cli.py finetune` vs transformers + peft + bitsandbytes.

    python bench/vs_peft.py [--steps 6] [--batch 4] [--seq 128] [--rounds 2] [--hf-dir DIR]
                            [--quick] [--no-peer] [--json PATH]

The default model (the embedded SmolLM2-135M-Instruct GGUF) is exported once, through transformers'
GGUF loader, to a 32-bit Hugging Face directory (kept in --hf-dir and reused); both sides load that
directory. Settings of both sides: batch x seq tokens per step (every row full), LoRA r 8 / alpha 16
on all seven projections, FP32 compute, AdamW at lr 2e-4, no gradient checkpointing. The peer is
transformers + peft + bitsandbytes 4-bit NF4 with double quant on the CPU. Each side runs in its own
fresh process and reports tokens/s of every step (the first one is warmup and not counted) and the
process's peak RSS (VmHWM, loading included). Ours runs with and without our memory options
(gradient checkpointing), the two alternating --rounds times; each figure is the median over all of
its runs' steps and the highest peak. --quick: a 2-layer cut of the model, 2 steps, one round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._peak_rss import run_child  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.results import add_json_option, write_json  # noqa: E402

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

EXPORT = r"""
out, layers = sys.argv[1], int(sys.argv[2])
import torch, transformers, safetensors.torch
import nf4core
path = nf4core.default_model_path()
kw = dict(gguf_file=path.name)
model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
config = model.config
state = model.state_dict()
if layers:
    config.num_hidden_layers = layers
    state = {k: v for k, v in state.items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
if config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
config.dtype = "float32"
if hasattr(config, "quantization_config"):  # the GGUF origin: the export is plain float32
    del config.quantization_config
config.save_pretrained(out)
tok.save_pretrained(out)
safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                            out + "/model.safetensors", metadata={"format": "pt"})
print(json.dumps({"layers": config.num_hidden_layers, "vocab": config.vocab_size}))
"""

OURS = r"""
hf_dir, data, out, steps, batch, seq, extra = sys.argv[1:8]
import cli
imports = status()
args = ["finetune", "--model", hf_dir, "--data", data, "--out", out, "--steps", steps,
        "--batch-size", batch, "--max-seq-len", seq, "--lora-r", "8", "--lora-alpha", "16",
        "--targets", TARGETS, "--lr", "2e-4", "--backend", "torch", "--device", "cpu",
        "--compute-dtype", "float32", "--quiet"] + extra.split()
start = time.perf_counter()
try:
    cli.main.main(args, standalone_mode=False)
except SystemExit as e:
    if e.code:
        raise
seconds = time.perf_counter() - start
rows = [json.loads(l) for l in open(out + "/metrics.jsonl")]
steps = [r for r in rows if "tokens_per_s" in r]
print(json.dumps({"tokens_per_s": [r["tokens_per_s"] for r in steps],
                  "tokens_per_step": steps[0]["tokens"], "imports_rss_mib": imports["VmRSS"],
                  "peak_rss_mib": status()["VmHWM"], "seconds": seconds}))
"""

PEER = r"""
hf_dir, steps, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import torch, transformers, peft
imports = status()
start = time.perf_counter()
bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=bnb,
                                                          dtype=torch.float32, device_map="cpu")
lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS.split(","),
                       task_type="CAUSAL_LM")
model = peft.get_peft_model(model, lora)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
gen = torch.Generator().manual_seed(0)
rates = []
for _ in range(steps):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    rates.append(ids.numel() / (time.perf_counter() - t))
print(json.dumps({"tokens_per_s": rates, "tokens_per_step": batch * seq,
                  "imports_rss_mib": imports["VmRSS"], "peak_rss_mib": status()["VmHWM"],
                  "seconds": time.perf_counter() - start,
                  "quant_class": type(model.base_model.model.model.layers[0].mlp.up_proj
                                      .base_layer).__name__}))
"""


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "bitsandbytes"))


def export(hf_dir: Path, layers: int) -> None:
    if (hf_dir / "model.safetensors").is_file():
        return
    hf_dir.mkdir(parents=True, exist_ok=True)
    r = run_child(EXPORT, str(hf_dir), str(layers))
    if "error" in r:
        raise SystemExit(f"export of the default model to {hf_dir} failed: {r['error']}")


def write_data(path: Path, rows: int, seq: int) -> None:
    """Rows of plain words, each longer than `seq` tokens, so every row of a batch is full."""
    import random

    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over a lazy dog while seven bright stars shine above quiet "
        "hills and rivers flow toward distant seas under ancient bridges"
    ).split()
    with open(path, "w") as f:
        for _ in range(rows):
            text = " ".join(rng.choice(words) for _ in range(2 * seq))
            f.write(json.dumps({"text": text}) + "\n")


def merge_runs(runs: list[dict]) -> dict:
    """One side's runs as one: every run's steps but its first (warmup), the highest peak."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    rates = [x for r in runs for x in r["tokens_per_s"][1:] or r["tokens_per_s"]]
    return dict(runs[0], tokens_per_s=rates, peak_rss_mib=max(r["peak_rss_mib"] for r in runs))


def summary(name: str, r: dict) -> dict:
    if "error" in r:
        print(f"{name}: failed: {r['error']}")
        return r
    r["median_tokens_per_s"] = statistics.median(r["tokens_per_s"])
    print(
        f"{name}: tokens/s per step {[round(x, 1) for x in r['tokens_per_s']]} "
        f"(median: {r['median_tokens_per_s']:.1f}); "
        f"peak RSS {r['peak_rss_mib']} MiB (after imports {r['imports_rss_mib']} MiB)"
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--hf-dir",
        type=Path,
        default=None,
        help="where the 32-bit HF export lives [default: a folder under the temp dir]",
    )
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 steps (smoke test)")
    ap.add_argument("--no-peer", action="store_true", help="only our runs")
    ap.add_argument(
        "--rounds", type=int, default=2, help="our two runs alternate this many times [2]"
    )
    add_json_option(ap)
    args = ap.parse_args()
    layers, steps = (2, 2) if args.quick else (0, args.steps)
    if args.quick:
        args.rounds = 1
    hf_dir = args.hf_dir or Path(tempfile.gettempdir()) / f"nf4-bench-hf32-{layers or 'full'}"
    export(hf_dir, layers)
    print(f"machine: {describe()}")
    print(f"versions: {versions()}")
    print(
        f"model: {hf_dir} (default model, 32-bit HF export); batch {args.batch} x {args.seq}, "
        f"LoRA r 8 on {TARGETS}, FP32 compute, {steps} steps"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_data(data, args.batch * steps, args.seq)
        common = (str(hf_dir), str(data))
        size = (str(steps), str(args.batch), str(args.seq))
        prelude = f"TARGETS = {TARGETS!r}\n"
        ours_runs, mem_runs = [], []
        for i in range(args.rounds):  # alternated, so drift on a shared machine hits both alike
            ours_runs.append(
                run_child(prelude + OURS, *common, f"{tmp}/ours{i}", *size, "--no-grad-checkpoint")
            )
            mem_runs.append(
                run_child(prelude + OURS, *common, f"{tmp}/mem{i}", *size, "--grad-checkpoint")
            )
        ours = summary("ours (cli.py finetune)", merge_runs(ours_runs))
        ours_mem = summary("ours, memory options on (--grad-checkpoint)", merge_runs(mem_runs))
        peer = None
        if not args.no_peer:
            peer = summary(
                "peer (transformers + peft + bitsandbytes NF4)",
                run_child(prelude + PEER, str(hf_dir), *size),
            )
            if "error" not in peer:
                print(f"peer's quantized linear: {peer['quant_class']}")
    if peer and "error" not in peer:
        for name, r in (("ours", ours), ("ours, memory options on", ours_mem)):
            if "error" not in r:
                print(
                    f"ratio {name} / peer: tokens/s "
                    f"{r['median_tokens_per_s'] / peer['median_tokens_per_s']:.2f}, "
                    f"peak RSS {r['peak_rss_mib'] / peer['peak_rss_mib']:.2f}"
                )
    if "error" not in ours and "error" not in ours_mem:
        print(
            f"memory options on / off (ours): step time "
            f"{ours['median_tokens_per_s'] / ours_mem['median_tokens_per_s']:.2f}, "
            f"peak RSS {ours_mem['peak_rss_mib'] / ours['peak_rss_mib']:.2f}"
        )
    write_json(args.json, dict(ours=ours, ours_memory_options=ours_mem, peer=peer))
    if any("error" in r for r in (ours, ours_mem, peer or {})):
        sys.exit(1)


if __name__ == "__main__":
    main()
