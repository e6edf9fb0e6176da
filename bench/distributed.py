"""torch data parallel on the CPU: 2 gloo ranks (torchrun, FSDP2-sharded NF4 base) vs 1 process,
training the same global batches of the default model (SmolLM2-135M, LoRA r=8 on every linear);
with --device cuda, NCCL ranks on every visible GPU vs one GPU.

  python bench/distributed.py [--quick] [--ranks 2] [--batch 4] [--seq 128] [--steps 4]
  python bench/distributed.py --device cuda   # every visible GPU (NCCL), vs one GPU

Each run is its own `torchrun --nproc-per-node N` (N = 1 is the plain single-process path); the
machine's cores are shared out equally (threads per rank = cores // N). Prints per run: tokens/s in
total and per rank, each rank's peak RSS (VmHWM) and the NF4 base bytes it holds between layers.
--quick: 2 steps of 2 x 64 tokens (a smoke test, ~1 minute).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One rank: build, warm up, time `steps` optimizer steps, write OUT/rank<r>.json."""
    import numpy as np
    import torch

    import nf4core
    from backends.engine import LoRASettings, TrainSettings
    from backends.registry import build_engine, select_backend
    from backends.torch_backend.sharding import nf4_bytes, resident_nf4_bytes

    size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    choice = select_backend("torch", args.device, "float32" if args.device == "cpu" else None)
    source = nf4core.open_model(str(nf4core.default_model_path()))
    engine = build_engine(choice, source, LoRASettings(), TrainSettings(seed=0), 1e-4)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq)
    ids = rng.integers(10, source.config.vocab_size, shape).astype(np.int32)
    ones = np.ones(shape, bool)
    pos = np.broadcast_to(np.arange(args.seq, dtype=np.int32), shape).copy()
    batch = nf4core.Batch(ids, ones, ones.copy(), pos, ones.astype(np.int32))
    engine.train_step([batch], 1e-4)  # warm-up
    t = time.perf_counter()
    for _ in range(args.steps):
        engine.train_step([batch], 1e-4)
    seconds = time.perf_counter() - t
    with open("/proc/self/status") as f:
        peak = int(next(x for x in f if x.startswith("VmHWM")).split()[1]) * 1024
    if engine.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(engine.device)
    result = {
        "rank": engine.world.rank,
        "size": engine.world.size,
        "threads": torch.get_num_threads(),
        "tokens_per_s": args.batch * args.seq * args.steps / seconds,
        "peak_rss": peak,
        "nf4_held": resident_nf4_bytes(engine.model),
        "nf4_full": nf4_bytes(engine.model),
    }
    Path(args.out, f"rank{result['rank']}.json").write_text(json.dumps(result))


def run(n: int, args: argparse.Namespace) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
        command += ["--master-port", str(port), __file__, "--worker", "--out", out]
        command += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
        command += ["--device", args.device]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(os.cpu_count() // n)}
        subprocess.run(command, check=True, env=env, cwd=ROOT)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ranks", type=int, help="default: 2 on the CPU, every visible GPU on cuda")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=4, help="global rows per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.batch, args.seq, args.steps = 2, 64, 2
    if args.ranks is None:
        import torch

        args.ranks = torch.cuda.device_count() if args.device == "cuda" else 2
    from bench.machine import describe

    print(
        f"machine: {describe()}; global batch {args.batch} x {args.seq} tokens, {args.steps} steps"
    )
    memory = "peak RSS" if args.device == "cpu" else "peak GPU memory"
    print(
        f"| ranks | threads/rank | tokens/s total | tokens/s per rank | {memory} per rank (MiB) "
        "| NF4 held per rank (MiB) | NF4 base (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    base = None
    for n in sorted({1, args.ranks}):
        ranks = run(n, args)
        total = ranks[0]["tokens_per_s"]  # every rank steps the whole global batch together
        base = base or total
        rss = " / ".join(f"{r['peak_rss'] / 2**20:.0f}" for r in ranks)
        held = " / ".join(f"{r['nf4_held'] / 2**20:.1f}" for r in ranks)
        print(
            f"| {n} | {ranks[0]['threads']} | {total:.0f} ({total / base:.2f}x) | {total / n:.0f} "
            f"| {rss} | {held} | {ranks[0]['nf4_full'] / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
