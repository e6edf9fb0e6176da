"""The default fine-tune's built-in task, measured on the real model: torch backend, CPU, FP32.

Loads the embedded SmolLM2-135M-Instruct quantized to NF4, scores exact match on the held-out set
(greedy generation through the chat template), trains LoRA with the task's recommended settings,
scores again, and prints the figures and the times (model load included in the wall time).

    python bench/default_task_run.py [--steps N] [--lr X] [--n-eval N] [--threads N] [--check-sequential K]

Greedy generation runs batched: held-out prompts of the same token length go through the model
together with one KV cache (no padding needed, so each row is exactly what `generate` would compute
for it alone). `--check-sequential K` also runs the torch backend's `generate` one prompt at a time on
K held-out prompts and checks it gives the same answers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import nf4core  # noqa: E402
from backends.torch_backend.generate import SamplingConfig, generate  # noqa: E402
from backends.torch_backend.lora import LoRAConfig, apply_lora  # noqa: E402
from backends.torch_backend.model import CausalLM  # noqa: E402
from backends.torch_backend.schedule import ScheduleConfig  # noqa: E402
from backends.torch_backend.train_step import Batch, TrainConfig, Trainer  # noqa: E402
from bench.machine import describe  # noqa: E402
from nf4core.dataset import Dataset, batches, tokenize_record  # noqa: E402
from nf4core.default_task import default_task, exact_match  # noqa: E402
from nf4core.jsonl import Record  # noqa: E402


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def stop_ids(tok) -> tuple[int, ...]:
    return tuple(sorted({i for i in (tok.eos_token_id, tok.token_id("<|im_end|>")) if i is not None}))


def prompt_ids(tok, conversation: list[dict]) -> list[int]:
    text = tok.apply_chat_template(conversation, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)  # the template writes its special tokens


@torch.no_grad()
def greedy_batched(model: CausalLM, prompts: list[list[int]], max_new: int, eos: tuple[int, ...],
                   max_batch: int = 64) -> list[list[int]]:
    """Greedy completions (without the stop token) of each prompt; prompts of one length share a
    forward. Equal to `generate(..., SamplingConfig(max_new, eos_token_ids=eos))` per prompt, up to
    float summation order."""
    model.eval()
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for length, members in sorted(groups.items()):
        for s in range(0, len(members), max_batch):
            idx = members[s : s + max_batch]
            ids = torch.tensor([prompts[i] for i in idx])
            cache = model.new_cache(len(idx), length + max_new)
            logits = model(ids, cache)[:, -1]
            done = torch.zeros(len(idx), dtype=torch.bool)
            for _ in range(max_new):
                nxt = logits.argmax(-1)
                for r, i in enumerate(idx):
                    if not done[r]:
                        if int(nxt[r]) in eos:
                            done[r] = True
                        else:
                            out[i].append(int(nxt[r]))
                if bool(done.all()):
                    break
                logits = model(nxt[:, None], cache)[:, -1]
    return out


def evaluate(model, tok, task, records, max_new, eos, show=3):
    pa = task.prompts_and_answers(records)
    prompts = [prompt_ids(tok, conv) for conv, _ in pa]
    start = time.perf_counter()
    outs = greedy_batched(model, prompts, max_new, eos)
    seconds = time.perf_counter() - start
    preds = [tok.decode(o, skip_special_tokens=True) for o in outs]
    hits = [exact_match(p, a) for p, (_, a) in zip(preds, pa)]
    for (conv, a), p in list(zip(pa, preds))[:show]:
        print(f"    {conv[-1]['content'].splitlines()[-1]!r} -> {p!r} (want {a!r})")
    return float(np.mean(hits)), seconds, prompts, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--n-eval", type=int, help="held-out examples to score (default: recommended)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--check-sequential", type=int, default=0, metavar="K")
    ap.add_argument("--skip-base", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    print(f"machine: {describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start: {load_avg()}")

    task = default_task(seed=args.seed)
    rec = dict(task.recommended)
    for key, val in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size),
                     ("n_eval", args.n_eval)):
        if val is not None:
            rec[key] = val
    n_eval = rec.get("n_eval", len(task.heldout))
    heldout = task.heldout[:n_eval]
    print(f"task {task.name}: {len(task.train)} train, {len(heldout)} held-out scored; settings {rec}")

    t = time.perf_counter()
    source = nf4core.open_model(nf4core.default_model_path())
    tok = source.tokenizer()
    model = CausalLM.from_source(source)  # NF4 (blocksize 64, double quant), FP32 compute
    load_s = time.perf_counter() - t
    print(f"model load + NF4 quantization: {load_s:.1f} s")
    eos = stop_ids(tok)
    max_new = rec.get("max_new_tokens", 16)

    base = None
    eval_s = 0.0
    if not args.skip_base:
        base, s, prompts, outs = evaluate(model, tok, task, heldout, max_new, eos)
        eval_s += s
        print(f"base exact match: {base:.1%} ({s:.1f} s)")
        if args.check_sequential:
            cfg = SamplingConfig(max_new_tokens=max_new, eos_token_ids=eos)
            t = time.perf_counter()
            same = 0
            for p, o in list(zip(prompts, outs))[: args.check_sequential]:
                g = generate(model, p, cfg)
                same += [x for x in g if x not in eos] == o
            print(f"sequential generate agrees on {same}/{args.check_sequential} "
                  f"({(time.perf_counter() - t) / args.check_sequential:.2f} s per prompt)")

    # training: the records through nf4core's tokenization (the assistant turn is the only target)
    t = time.perf_counter()
    examples = [tokenize_record(Record("chat", r, f"default-task:{i}"), tok)
                for i, r in enumerate(task.train)]
    examples = [e for e in examples if e.input_ids.size <= rec["max_seq_len"]]
    data = Dataset(examples)
    print(f"tokenized {len(data)} training records in {time.perf_counter() - t:.1f} s")
    pad = tok.pad_token_id
    apply_lora(model, LoRAConfig(rank=rec["lora_r"], alpha=rec["lora_alpha"],
                                 dropout=rec.get("lora_dropout", 0.0),
                                 target_modules=tuple(rec["targets"]), seed=args.seed))
    steps = rec["steps"]
    trainer = Trainer(model, TrainConfig(learning_rate=rec["lr"], schedule=ScheduleConfig(
        rec.get("schedule", "cosine"), warmup_steps=rec.get("warmup_steps", 0), total_steps=steps)))
    t = time.perf_counter()
    epoch, it, tokens, n_tok_all = 0, None, 0, 0
    losses = []
    for step in range(steps):
        while True:
            if it is None:
                it = batches(data, rec["batch_size"], pad, seed=args.seed, epoch=epoch)
            b = next(it, None)
            if b is not None:
                break
            it, epoch = None, epoch + 1
        stats = trainer.train_step([Batch.from_numpy(b)])
        tokens += stats.tokens
        n_tok_all += int(b.attention_mask.sum())
        losses.append(stats.loss)
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {stats.loss:.4f} lr {stats.learning_rate:.2e} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    train_s = time.perf_counter() - t
    print(f"training: {steps} steps in {train_s:.1f} s ({train_s / steps:.2f} s/step, "
          f"{n_tok_all / train_s:.0f} tokens/s incl. prompt, {tokens / train_s:.0f} target tokens/s), "
          f"{steps * rec['batch_size'] / len(data):.2f} epochs")

    final, s, _, _ = evaluate(model, tok, task, heldout, max_new, eos)
    eval_s += s
    wall = time.perf_counter() - wall0
    print(f"final exact match: {final:.1%} ({s:.1f} s)")
    print(f"SUMMARY task={task.name} base={'-' if base is None else f'{base:.1%}'} final={final:.1%} "
          f"n_heldout={len(heldout)} steps={steps} load={load_s:.0f}s train={train_s:.0f}s "
          f"eval={eval_s:.0f}s wall={wall:.0f}s load_avg_end={load_avg()}")


if __name__ == "__main__":
    main()
