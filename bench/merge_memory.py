"""Peak resident memory of merging a LoRA adapter into the default model (SmolLM2-135M-Instruct) and
writing a bfloat16 Hugging Face directory: `backends.merge.merge` (streams one tensor at a time) vs
peft's `merge_and_unload` on the transformers model, each in its own fresh process.

    python bench/merge_memory.py [--r 8] [--json PATH]

The adapter is random (PEFT format, all seven projections): memory and time do not depend on its
values. Ours folds the adapter into the NF4-dequantized base (what the adapter was trained on); the
peer loads the GGUF de-quantized to bfloat16, merges, and writes the state dict with safetensors
(transformers' save_pretrained refuses a model loaded from GGUF). Each child reports its RSS after
imports and its peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import nf4core  # noqa: E402
from backends.peft_adapter import PEFT_PREFIX, Adapter, save_adapter  # noqa: E402
from bench._peak_rss import run_child  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.results import add_json_option, write_json  # noqa: E402
from nf4core.model_config import LINEAR_NAMES  # noqa: E402

CHILD = r"""
which, adapter, out = sys.argv[1], sys.argv[2], sys.argv[3]
import nf4core
if which == "ours":
    from backends.merge import merge
    from backends.peft_adapter import load_adapter
else:
    import torch, transformers, peft, safetensors.torch
before = status()
path = nf4core.default_model_path()
start = time.perf_counter()
if which == "ours":
    merge(path, load_adapter(adapter), out, dtype="bfloat16")
else:
    import os
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
        dtype=torch.bfloat16)
    model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    os.makedirs(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, out + "/model.safetensors", metadata={"format": "pt"})
seconds = time.perf_counter() - start
after = status()
print(json.dumps({"imports_rss_mib": before["VmRSS"], "peak_rss_mib": after["VmHWM"],
                  "seconds": round(seconds, 1)}))
"""


def random_adapter(source: nf4core.ModelSource, r: int) -> Adapter:
    rng = np.random.default_rng(0)
    tensors = {}
    for name in source.tensor_names():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LINEAR_NAMES:
            out_f, in_f = source.tensor_shape(name)
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (
                rng.standard_normal((r, in_f), np.float32) * 0.01
            )
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (
                rng.standard_normal((out_f, r), np.float32) * 0.01
            )
    return Adapter(tensors, r, 2.0 * r, 0.0, LINEAR_NAMES, str(source.path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--r", type=int, default=8)
    add_json_option(ap)
    args = ap.parse_args()
    path = nf4core.default_model_path()
    print(f"machine: {describe()}")
    print(
        f"model: {path.name} ({path.stat().st_size / 2**20:.1f} MiB); adapter r {args.r}, all seven projections"
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(os.path.join(tmp, "adapter"), random_adapter(nf4core.open_model(path), args.r))
        results = {}
        for which in ("ours", "peer"):
            results[which] = run_child(
                CHILD, which, os.path.join(tmp, "adapter"), os.path.join(tmp, which)
            )
    for name, key in (("backends.merge.merge", "ours"), ("peft merge_and_unload", "peer")):
        print(f"{name:24s} {json.dumps(results[key])}")
    write_json(args.json, results)
    ours, peer = results["ours"], results["peer"]
    if "error" not in ours and "error" not in peer:
        print(f"ratio peak RSS (ours / peer): {ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f}")
        print(f"ratio time (ours / peer): {ours['seconds'] / peer['seconds']:.2f}")


if __name__ == "__main__":
    main()
