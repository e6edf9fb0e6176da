"""Peak resident memory of quantizing the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) to an
NF4 bitsandbytes directory: nf4core.quantize_model vs transformers + bitsandbytes doing the same,
each in its own fresh process. transformers refuses a BitsAndBytesConfig together with a GGUF file,
so the peer takes the two steps a user would: load the GGUF (de-quantized to bfloat16) and save it
as a Hugging Face directory, then load that with load_in_4bit (nf4, double quant) and save it.

    python bench/quantize_model_memory.py [--json PATH]   # prints a table and the ratios

Each child reports its own VmHWM (peak RSS) and its RSS after imports, so import costs are visible.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._peak_rss import run_child  # noqa: E402

CHILD = r"""
which, out = sys.argv[1], sys.argv[2]
import nf4core
if which == "peer":
    import torch, transformers
before = status()
path = nf4core.default_model_path()
start = time.perf_counter()
if which == "nf4core":
    nf4core.quantize_model(path, out)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
        dtype=torch.bfloat16)
    # save_pretrained refuses a model loaded from GGUF: write its state dict and config directly
    import os, safetensors.torch
    os.makedirs(out + "-bf16")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, out + "-bf16/model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with open(out + "-bf16/config.json", "w") as f:
        json.dump(config, f)
    del model, state
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(out + "-bf16",
        quantization_config=config, device_map="cpu")
    model.save_pretrained(out)
seconds = time.perf_counter() - start
after = status()
print(json.dumps({"imports_rss_mib": before["VmRSS"], "peak_rss_mib": after["VmHWM"],
                  "seconds": round(seconds, 1)}))
"""


def run(which: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        result = run_child(CHILD, which, out)
        if "error" in result:
            return result
        result["output_mib"] = round(
            sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**20, 1
        )
        return result


def main() -> None:
    import argparse

    import nf4core
    from bench.results import add_json_option, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_option(ap)
    args = ap.parse_args()

    path = nf4core.default_model_path()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    )
    print(f"model: {path.name} ({path.stat().st_size / 2**20:.1f} MiB)")
    ours = run("nf4core")
    peer = run("peer")
    for name, result in (("nf4core.quantize_model", ours), ("transformers+bitsandbytes", peer)):
        print(f"{name:28s} {json.dumps(result)}")
    write_json(args.json, dict(ours=ours, peer=peer))
    if "error" not in ours and "error" not in peer:
        print(f"ratio peak RSS (ours / peer): {ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f}")
        print(f"ratio time (ours / peer): {ours['seconds'] / peer['seconds']:.2f}")


if __name__ == "__main__":
    main()
