"""Each bench script's JSON figures as table rows for bench/run_all.py: the case, the unit, our
figure and the peer's (None where there is no peer). A KeyError or ValueError means the script's
results changed shape or report a failure; run_all marks the area FAILED."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    case: str
    unit: str
    ours: float
    peer_name: str = ""
    peer: float | None = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def nf4core_rows(r: dict) -> list[Row]:
    rows, cols = r["shape"]
    return [
        Row(
            f"{x['operation']} {rows}x{cols}, double quant {'on' if x['double_quant'] else 'off'}",
            "ms",
            _ms(x["ours_s"]),
            "bitsandbytes CPU",
            _ms(x["peer_s"]),
        )
        for x in r["rows"]
    ]


def torch_cpu_rows(r: dict) -> list[Row]:
    n = r["size"]
    ours, *peers = r["dequant"]
    rows = [
        Row(f"dequantize {n}x{n} -> FP32", "ms", _ms(ours["seconds"]), p["impl"], _ms(p["seconds"]))
        for p in peers
    ]
    rows += [
        Row(
            f"NF4Linear {n}x{n} forward + input grad, {x['tokens']} tokens",
            "ms",
            _ms(x["nf4_seconds"]),
            "FP32 nn.Linear",
            _ms(x["fp32_seconds"]),
        )
        for x in r["linear"]
    ]
    if r.get("train"):
        q, lora, _ = r["train"]
        rows += [
            Row(
                "QLoRA training step",
                "tokens/s",
                q["tokens_per_s"],
                "LoRA, FP32 base",
                lora["tokens_per_s"],
            ),
            Row(
                "QLoRA training step, peak RSS",
                "MiB",
                q["peak_rss_mb"],
                "LoRA, FP32 base",
                lora["peak_rss_mb"],
            ),
        ]
    return rows


def mlx_cpu_rows(r: dict) -> list[Row]:
    rows = [Row(x["op"], "ms", _ms(x["ours_s"]), x["peer"], _ms(x["peer_s"])) for x in r["rows"]]
    if r.get("step"):
        s = r["step"]
        rows.append(
            Row(
                "QLoRA step (MLX)",
                "tokens/s",
                s["nf4_tokens_per_s"],
                "dense FP32 base",
                s["dense_tokens_per_s"],
            )
        )
    return rows


def vs_peft_rows(r: dict) -> list[Row]:
    peer = r.get("peer") or {}
    name = "transformers + peft + bitsandbytes"
    rows = []
    for label, key in (("ours", "ours"), ("ours, --grad-checkpoint", "ours_memory_options")):
        ours = r[key]
        rows += [
            Row(
                f"QLoRA training, {label}",
                "tokens/s",
                ours["median_tokens_per_s"],
                name,
                peer.get("median_tokens_per_s"),
            ),
            Row(
                f"QLoRA training peak RSS, {label}",
                "MiB",
                ours["peak_rss_mib"],
                name,
                peer.get("peak_rss_mib"),
            ),
        ]
    plain, mem = r["ours"]["median_tokens_per_s"], r["ours_memory_options"]["median_tokens_per_s"]
    rows.append(
        Row("QLoRA step, ours with --grad-checkpoint", "tokens/s", mem, "ours without", plain)
    )
    return rows


def decode_rows(r: dict) -> list[Row]:
    decoders = dict(r["decode"])
    peer_name = "transformers FP32 generate"
    peer = decoders.pop(peer_name)["tokens_per_s"]
    rows = [
        Row(f"decode, {name}", "tokens/s", d["tokens_per_s"], peer_name, peer)
        for name, d in decoders.items()
    ]
    names = list(decoders)  # ours now first, the previous default last (decode_vs_transformers)
    if len(names) >= 2:
        new = decoders[names[0]]["tokens_per_s"]
        cases = ["the previous default", "the GEMV kernel through the modules"][: len(names) - 1]
        for case, name in zip(cases, names[::-1], strict=False):
            rows.append(
                Row(
                    f"decode, generate's default vs {case}",
                    "tokens/s",
                    new,
                    name,
                    decoders[name]["tokens_per_s"],
                )
            )
    for name, p in r.get("profile", {}).items():
        rows.append(Row(f"decode step, {name}", "ms", p["step_ms"]))
        rows.append(Row(f"decode step LM head, {name}", "ms", p["lm_head_ms"]))
        rows.append(Row(f"dense weights held decoding, {name}", "MiB", p["dense_cache_mib"]))
    for x in r["linear"]:
        hows = (("GEMV kernel", "kernel_ms"), ("per call", "per_call_ms"), ("cached", "cached_ms"))
        for how, key in hows:
            rows.append(
                Row(
                    f"NF4Linear {x['shape']} at 1 token, {how}",
                    "ms",
                    x[key],
                    "FP32 F.linear",
                    x["fp32_ms"],
                )
            )
    return rows


def profile_rows(r: dict) -> list[Row]:
    rows = [
        Row(
            f"QLoRA step, batch {r['batch']} x {r['seq']} (no peer: where the time goes)",
            "ms",
            _ms(r["step_s"]),
        )
    ]
    buckets = sorted(r["buckets"].items(), key=lambda kv: -kv[1])
    return rows + [Row(f"of which {name}", "ms", _ms(s)) for name, s in buckets]


def quality_rows(r: dict) -> list[Row]:
    rows = []
    weights = {(x["method"], x["double_quant"]): x for x in r.get("weights", [])}
    for dq in (True, False):
        if ("mse", dq) in weights:
            rows.append(
                Row(
                    f"weight error, NF4 mse, double quant {'on' if dq else 'off'} ({weights['mse', dq]['tensors']} linears)",
                    "rel. sq. error",
                    weights["mse", dq]["mean_rel_sq_error"],
                    "NF4 absmax (bitsandbytes' quantizer)",
                    weights["absmax", dq]["mean_rel_sq_error"],
                )
            )
    ppl = {x["model"]: x["perplexity"] for x in r.get("perplexity", [])}
    for model in ("NF4 absmax", "NF4 mse"):
        if model in ppl:
            rows.append(
                Row(
                    f"perplexity, {model}",
                    "perplexity",
                    ppl[model],
                    "float32 base",
                    ppl["float32 base"],
                )
            )
    for section in ("finetune-task", "finetune-text"):
        runs = r.get(section, [])
        for x in runs[1:]:
            rows.append(
                Row(
                    f"{section} final eval loss, {x['run']}",
                    "loss",
                    x["final_eval_loss"],
                    runs[0]["run"],
                    runs[0]["final_eval_loss"],
                )
            )
    return rows


def memory_estimate_rows(r: dict) -> list[Row]:
    return [
        Row(
            f"training memory, seq {x['seq']} x batch {x['batch']}",
            "MiB",
            x["estimate_mib"],
            "measured peak - imports",
            x["measured_mib"],
        )
        for x in r["rows"]
    ]


def ours_vs_peer_memory(what: str, peer_name: str) -> Callable[[dict], list[Row]]:
    def rows(r: dict) -> list[Row]:
        ours, peer = r["ours"], r["peer"]
        if "error" in ours:
            raise ValueError(f"ours failed: {ours['error']}")
        ok = "error" not in peer
        return [
            Row(
                f"{what}, peak RSS",
                "MiB",
                ours["peak_rss_mib"],
                peer_name,
                peer["peak_rss_mib"] if ok else None,
            ),
            Row(f"{what}, time", "s", ours["seconds"], peer_name, peer["seconds"] if ok else None),
        ]

    return rows


def gpu_rows(r: dict) -> list[Row]:
    sections = r["sections"]
    failed = [t for t, v in sections.items() if isinstance(v, dict) and v.get("ok") is False]
    if failed:
        raise ValueError(f"gpu_check failed: {', '.join(failed)}")
    rows = []
    d = sections.get("bench: dequantize", {})
    if "triton_s" in d:
        n, k = d["shape"]
        rows += [
            Row(
                f"dequantize {n}x{k} -> BF16",
                "ms",
                _ms(d["triton_s"]),
                "device-to-device copy",
                _ms(d["copy_s"]),
            ),
            Row(
                f"dequantize {n}x{k} -> BF16",
                "ms",
                _ms(d["triton_s"]),
                "torch reference",
                _ms(d["torch_reference_s"]),
            ),
        ]
    for x in (
        sections.get("bench: fused matmul", [])
        if isinstance(sections.get("bench: fused matmul"), list)
        else []
    ):
        shape = f"{x['out_features']}x{x['in_features']}, batch {x['batch']}"
        rows += [
            Row(
                f"NF4 forward {shape}",
                "ms",
                _ms(x["fused_s"]),
                "BF16 F.linear",
                _ms(x["bf16_linear_s"]),
            ),
            Row(
                f"NF4 input grad {shape}",
                "ms",
                _ms(x["grad_fused_s"]),
                "BF16 matmul",
                _ms(x["grad_bf16_s"]),
            ),
        ]
    train = sections.get("bench: training step")
    if isinstance(train, list) and len(train) == 2:
        q, lora = train
        rows.append(
            Row(
                "QLoRA training step",
                "tokens/s",
                q["tokens_per_s"],
                "LoRA, BF16 base",
                lora["tokens_per_s"],
            )
        )
        if q.get("peak_mem_mb"):
            rows.append(
                Row(
                    "QLoRA training step, peak memory",
                    "MiB",
                    q["peak_mem_mb"],
                    "LoRA, BF16 base",
                    lora["peak_mem_mb"],
                )
            )
    return rows


def metal_rows(r: dict) -> list[Row]:
    d = r["dequant"]
    n, k = d["shape"]
    rows = [
        Row(f"dequantize {n}x{k} -> BF16", "ms", _ms(d["ours_s"]), "device copy", _ms(d["copy_s"]))
    ]
    for x in r["matmul"]:
        n, k = x["shape"]
        case = f"NF4 matmul {n}x{k}, M {x['rows']}"
        rows += [
            Row(
                case,
                "ms",
                _ms(x["ours_s"]),
                "mx.quantized_matmul (affine 4-bit)",
                _ms(x["affine_s"]),
            ),
            Row(case, "ms", _ms(x["ours_s"]), "bf16 matmul", _ms(x["bf16_s"])),
        ]
    step = r["step"]
    first, *_, dense = step
    rows.append(Row(f"QLoRA step, {first}", "tokens/s", step[first], dense, step[dense]))
    return rows
