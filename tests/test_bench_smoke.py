"""bench/run_all.py --quick runs every benchmark area that has a quick mode, on smoke sizes, and
prints a table per area (no timing is asserted: the figures of a shared CI machine mean nothing).
It never writes BENCHMARKS.md; --write rewrites only what lies between an area's markers."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("mlx.core")
pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

from bench import run_all  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run():
    before = (REPO / "BENCHMARKS.md").read_bytes()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_all.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        check=False,
    )
    return proc, before


def test_quick_runs_every_area_and_prints_a_table_each(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("Machine: ") and "date: " in out.splitlines()[0]
    for area in run_all.AREAS:
        if area.quick is None:
            assert f"{area.name}: left out of --quick" in out
        elif area.needs:
            ran = f"**{area.name}**: " in out
            assert ran or f"{area.name}: skipped (" in out
        else:
            table = out.split(f"**{area.name}**: ", 1)[1].split("\n\n(", 1)[0]
            rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
            assert rows, f"{area.name}: no rows"
            assert all(len(row.split(" | ")) == 6 for row in rows), rows
    assert "FAILED" not in out


def test_quick_never_writes_benchmarks_md(quick_run):
    _, before = quick_run
    assert (REPO / "BENCHMARKS.md").read_bytes() == before
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_all.py"), "--quick", "--write"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 2 and "--quick never writes BENCHMARKS.md" in proc.stderr


def test_an_unknown_area_is_refused_by_name():
    with pytest.raises(SystemExit):
        run_all.main(["--quick", "--only", "nf4core,speed"])


def test_write_replaces_only_the_blocks_between_markers():
    text = (REPO / "BENCHMARKS.md").read_text()
    tables = {a.name: f"| table of {a.name} |" for a in run_all.AREAS}
    new = run_all.rewrite_tables(text, tables)
    for name, block in tables.items():
        start, end = run_all.marker(name, "start"), run_all.marker(name, "end")
        assert f"{start}\n{block}\n{end}" in new
    outside = [part.split("-->", 1)[-1] for part in text.split("<!-- run_all:")]
    assert [part.split("-->", 1)[-1] for part in new.split("<!-- run_all:")][::2] == outside[::2]
    assert run_all.rewrite_tables(new, tables) == new  # idempotent


def test_write_refuses_a_missing_marker_by_area():
    with pytest.raises(ValueError, match="BENCHMARKS.md: needs exactly one .* 'decode'"):
        run_all.rewrite_tables("# Benchmarks\n", {"decode": "| x |"})
