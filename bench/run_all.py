"""Runs the benchmarks of bench/ and prints one table per area: ours, the peer, ours / peer, with
the machine and the date.

    python bench/run_all.py              # every area at full size (hours on 2 CPU cores)
    python bench/run_all.py --write      # the same, then rewrites the tables in BENCHMARKS.md
    python bench/run_all.py --quick      # smoke sizes, for CI (never writes BENCHMARKS.md)
    python bench/run_all.py --only nf4core,torch-cpu

Each script runs in its own process with `--json PATH` (gpu_check.py: its output folder) and
run_all turns its figures into rows. A ratio ours / peer below 1 is better for time and memory,
above 1 for tokens/s. The gpu area runs only where CUDA is available, the metal area only on an
Apple-silicon Mac; elsewhere each is skipped with a line. --write replaces what lies between
`<!-- run_all:AREA:start -->` and `<!-- run_all:AREA:end -->` in BENCHMARKS.md and nothing else.
Left out of --quick (too slow for a CI smoke run even at their smallest sizes; run them in full):
vs-peft (~90 s for a 2-layer cut and 2 steps: the peer loads transformers, peft and bitsandbytes)
and the three memory areas (each child loads the whole default model, the peers through
transformers). A script that fails marks its area FAILED and run_all exits 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import area_rows  # noqa: E402
from bench.area_rows import Row  # noqa: E402
from bench.machine import describe  # noqa: E402

BENCHMARKS_MD = REPO / "BENCHMARKS.md"


@dataclass(frozen=True)
class Area:
    name: str
    title: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...] | None  # None: left out of --quick
    rows: Callable[[dict], list[Row]]
    needs: str = ""  # "cuda" or "mac": skipped elsewhere


AREAS = (
    Area(
        "nf4core",
        "nf4core (numpy) vs bitsandbytes: quantize and dequantize",
        "bench_nf4core.py",
        (),
        ("--quick",),
        area_rows.nf4core_rows,
    ),
    Area(
        "torch-cpu",
        "torch backend on the CPU",
        "torch_cpu.py",
        (),
        ("--quick",),
        area_rows.torch_cpu_rows,
    ),
    Area(
        "mlx-cpu",
        "MLX backend on the CPU vs torch",
        "mlx_cpu_vs_torch.py",
        (),
        ("--quick",),
        area_rows.mlx_cpu_rows,
    ),
    Area(
        "decode",
        "decoding at batch 1 vs transformers",
        "decode_vs_transformers.py",
        (),
        ("--quick",),
        area_rows.decode_rows,
    ),
    Area(
        "profile",
        "where a QLoRA step spends its time (torch, CPU)",
        "profile_step.py",
        (),
        ("--quick",),
        area_rows.profile_rows,
    ),
    Area(
        "quality",
        "quantization quality: NF4 mse vs NF4 absmax vs the base",
        "quality.py",
        (),
        ("--sections", "weights", "--max-tensors", "3"),
        area_rows.quality_rows,
    ),
    Area(
        "vs-peft",
        "QLoRA training vs transformers + peft + bitsandbytes (CPU)",
        "vs_peft.py",
        (),
        None,
        area_rows.vs_peft_rows,
    ),
    Area(
        "memory-estimate",
        "info's training-memory estimate vs the measured peak",
        "memory_estimate.py",
        (),
        None,
        area_rows.memory_estimate_rows,
    ),
    Area(
        "merge-memory",
        "merging an adapter: backends.merge vs peft merge_and_unload",
        "merge_memory.py",
        (),
        None,
        area_rows.ours_vs_peer_memory("merge", "peft merge_and_unload"),
    ),
    Area(
        "quantize-memory",
        "quantizing the default model: nf4core vs transformers + bitsandbytes",
        "quantize_model_memory.py",
        (),
        None,
        area_rows.ours_vs_peer_memory("quantize_model", "transformers + bitsandbytes"),
    ),
    Area(
        "gpu",
        "NVIDIA GPU: Triton kernels (bench/gpu_check.py)",
        "gpu_check.py",
        (),
        ("--smoke",),
        area_rows.gpu_rows,
        needs="cuda",
    ),
    Area(
        "metal",
        "Apple GPU: Metal kernels (bench/metal_check.py)",
        "metal_check.py",
        (),
        ("--quick",),
        area_rows.metal_rows,
        needs="mac",
    ),
)


def _missing(needs: str) -> str | None:
    """Why an area cannot run on this machine, or None."""
    if needs == "cuda":
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        return None if torch.cuda.is_available() else "no CUDA device"
    if needs == "mac":
        is_mac = platform.system() == "Darwin" and platform.machine() == "arm64"
        return None if is_mac else "not an Apple-silicon Mac"
    return None


def run_area(area: Area, quick: bool, workdir: Path) -> list[Row]:
    """Run the area's script and return its rows; RuntimeError (one line) when it fails."""
    args = area.quick if quick else area.full
    if area.name == "gpu":
        out = workdir / "gpu"
        command = [sys.executable, str(REPO / "bench" / area.script), *args, str(out)]
        result = out / "gpu_check.json"
    else:
        result = workdir / f"{area.name}.json"
        command = [sys.executable, str(REPO / "bench" / area.script), *args, "--json", str(result)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    log = workdir / f"{area.name}.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"bench/{area.script} exited {proc.returncode}: {last}")
    if not result.is_file():
        raise RuntimeError(f"bench/{area.script} wrote no results to {result.name}")
    try:
        return area.rows(json.loads(result.read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        raise RuntimeError(f"bench/{area.script}: unexpected results ({exc!r})") from None


def _value(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:,.4g}" if abs(x) < 1e4 else f"{x:,.0f}"


def table(area: Area, rows: list[Row], header: str) -> str:
    lines = [
        f"**{area.name}**: {area.title}. {header}",
        "",
        "| case | unit | ours | peer | peer's | ours / peer |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r.ours / r.peer:.2f}" if r.peer else "-"
        lines.append(
            f"| {r.case} | {r.unit} | {_value(r.ours)} | {r.peer_name or '-'} | {_value(r.peer)} | {ratio} |"
        )
    return "\n".join(lines)


def marker(area: str, end: str) -> str:
    return f"<!-- run_all:{area}:{end} -->"


def rewrite_tables(text: str, tables: dict[str, str], where: str = "BENCHMARKS.md") -> str:
    """`text` with the block between each area's markers replaced by its table; the rest as is.
    ValueError naming the area when its markers are missing or out of order."""
    for area, block in tables.items():
        start, end = marker(area, "start"), marker(area, "end")
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        if len(pattern.findall(text)) != 1:
            raise ValueError(f"{where}: needs exactly one {start} ... {end} pair for area {area!r}")
        text = pattern.sub(lambda _m, b=block: f"{start}\n{b}\n{end}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes (CI); never writes")
    ap.add_argument("--write", action="store_true", help="rewrite the tables in BENCHMARKS.md")
    ap.add_argument("--only", help="comma-separated areas: " + ", ".join(a.name for a in AREAS))
    args = ap.parse_args(argv)
    if args.quick and args.write:
        ap.error("--write needs the full run: --quick never writes BENCHMARKS.md")
    chosen = AREAS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {a.name for a in AREAS})
        if unknown:
            ap.error(
                f"--only: unknown area {unknown[0]!r}; choose from {', '.join(a.name for a in AREAS)}"
            )
        chosen = tuple(a for a in AREAS if a.name in names)
    header = (
        f"Machine: {describe()}; date: {datetime.date.today().isoformat()}; "
        f"`bench/run_all.py{' --quick' if args.quick else ''}`."
    )
    print(header)
    tables: dict[str, str] = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="run_all_") as tmp:
        for area in chosen:
            if args.quick and area.quick is None:
                print(f"\n{area.name}: left out of --quick (see bench/run_all.py)")
                continue
            why = _missing(area.needs)
            if why:
                print(f"\n{area.name}: skipped ({why})")
                continue
            start = time.perf_counter()
            try:
                rows = run_area(area, args.quick, Path(tmp))
            except RuntimeError as exc:
                failed.append(area.name)
                print(f"\n{area.name}: FAILED: {exc}")
                continue
            tables[area.name] = table(area, rows, header)
            print(f"\n{tables[area.name]}\n({time.perf_counter() - start:.0f} s)")
    if args.write and tables:
        BENCHMARKS_MD.write_text(rewrite_tables(BENCHMARKS_MD.read_text(), tables))
        print(f"\nrewrote {len(tables)} table(s) in {BENCHMARKS_MD.name}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
