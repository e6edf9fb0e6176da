"""`info`'s training-memory estimate next to the measured peak: the default model (SmolLM2-135M) on
the torch backend, CPU, FP32, two training steps of random tokens at each (seq_len, batch), each in a
fresh process that reports its RSS after imports, after loading (NF4) and its peak (VmHWM).

    python bench/memory_estimate.py [--shapes 512x1,512x4] [--json PATH]

The estimate covers the model and the training step, not the interpreter and its imports, so it is
compared with the peak minus the RSS after imports.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nf4core  # noqa: E402
from backends.model_info import model_info  # noqa: E402
from bench._peak_rss import run_child  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.results import add_json_option, write_json  # noqa: E402

CHILD = r"""
seq, batch = int(sys.argv[1]), int(sys.argv[2])
import numpy as np, nf4core, torch
from backends.engine import LoRASettings, TrainSettings
from backends.registry import build_engine, select_backend
imports = status()
source = nf4core.open_model(nf4core.default_model_path())
engine = build_engine(select_backend("torch", "cpu", "float32"), source, LoRASettings(), TrainSettings(), 1e-4)
loaded = status()
ids = np.random.default_rng(0).integers(0, source.config.vocab_size, (batch, seq)).astype(np.int32)
ones = np.ones_like(ids, dtype=bool)
positions = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
for _ in range(2):
    engine.train_step([nf4core.Batch(ids, ones, ones, positions, ones.astype(np.int32))], 1e-4)
print(json.dumps({"imports_mib": imports["VmRSS"], "loaded_mib": loaded["VmRSS"],
                  "peak_mib": status()["VmHWM"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="512x1,512x4", help="seq_len x batch, comma separated")
    add_json_option(ap)
    args = ap.parse_args()
    rows = []
    path = nf4core.default_model_path()
    print(f"machine: {describe()}")
    print("| seq_len | batch | estimate | measured (peak - imports) | estimate / measured |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        seq, batch = (int(x) for x in shape.split("x"))
        estimate = model_info(path, seq, batch)["memory_estimate_bytes"] / 2**20
        r = run_child(CHILD, str(seq), str(batch))
        if "error" in r:
            print(f"| {seq} | {batch} | {estimate:.0f} MiB | {r['error']} | |")
            continue
        measured = r["peak_mib"] - r["imports_mib"]
        rows.append(dict(seq=seq, batch=batch, estimate_mib=estimate, measured_mib=measured))
        print(
            f"| {seq} | {batch} | {estimate:.0f} MiB | {measured} MiB (loaded: "
            f"{r['loaded_mib'] - r['imports_mib']} MiB) | {estimate / measured:.2f} |"
        )
    write_json(args.json, dict(rows=rows))


if __name__ == "__main__":
    main()
