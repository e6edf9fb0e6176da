"""Two ranks on the CPU (gloo) are one process on the same global batch: `cli.py finetune` under
torchrun against a plain run, a sharded engine probed under torchrun, and the ways a multi-process
run is refused or ends (a batch that does not split, a launcher the backend cannot join, a rank
that dies)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from backends.checkpoint import load_checkpoint
from tests.backends.finetune_fixtures import tiny_setup
from tests.backends.run_helpers import ROOT, cli_command, cli_env, run_cli, tiny_run_args

pytest.importorskip("torch.distributed")
PROBE = Path(__file__).with_name("dist_probe.py")
RUN = ("--steps", "5", "--save-every", "3", "--lr", "1e-3", "--backend", "torch", "--device", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N ARGS` (a script and its arguments) on a free port."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    command += ["--master-port", str(free_port()), *map(str, args)]
    env = {**cli_env(), "NF4_QLORA_DIST_TIMEOUT": "60"}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def losses(out: Path) -> list[list[float]]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [[r["step"], r["loss"], r["grad_norm"], r["tokens"]] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(model, data, the one-process run's out and result, the two-rank run's out and result)."""
    tmp = tmp_path_factory.mktemp("dist")
    model, data = tiny_setup(tmp)
    one = run_cli(*tiny_run_args(model, data, tmp / "one", *RUN))
    assert one.returncode == 0, one.stderr
    two = torchrun(2, ROOT / "cli.py", *tiny_run_args(model, data, tmp / "two", *RUN))
    assert two.returncode == 0, two.stderr
    return model, data, (tmp / "one", one), (tmp / "two", two)


def test_two_ranks_train_as_one_process_on_the_global_batch(runs):
    _, _, (one, _), (two, _) = runs
    want, got = losses(one), losses(two)
    assert [r[0] for r in got] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=1e-5)
    a, b = (
        load_file(one / "adapter_model.safetensors"),
        load_file(two / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5)
    for name in ("adapters", "optimizer"):  # the checkpoint: full tensors, as one process saves
        a = load_file(one / f"checkpoints/step-000005/{name}.safetensors")
        b = load_file(two / f"checkpoints/step-000005/{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            if not k.startswith("rng."):
                np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5)


def test_only_rank_0_writes_and_prints(runs):
    _, _, (one, one_run), (two, two_run) = runs
    listing = {p.relative_to(one) for p in one.rglob("*")}
    assert {p.relative_to(two) for p in two.rglob("*")} == listing
    assert two_run.stdout.replace(str(two), str(one)) == one_run.stdout


def test_a_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path):
    model, data, (one, _), (two, _) = runs
    out = tmp_path / "resumed"
    args = ("--resume", two / "checkpoints/step-000003", "--out", out, "--backend", "torch")
    r = run_cli("finetune", *args, "--quiet")
    assert r.returncode == 0, r.stderr
    got = losses(out)
    assert [r[0] for r in got] == [4, 5]
    np.testing.assert_allclose(np.array(got), np.array(losses(one)[3:]), rtol=0, atol=1e-5)


def test_a_two_rank_checkpoint_resumes_on_mlx(runs, tmp_path):
    pytest.importorskip("mlx.core")
    _, _, (one, _), (two, _) = runs
    out = tmp_path / "mlx"
    args = ("--resume", two / "checkpoints/step-000003", "--out", out, "--backend", "mlx")
    r = run_cli("finetune", *args, "--quiet")
    assert r.returncode == 0, r.stderr
    got = np.array(losses(out))[:, 1]
    np.testing.assert_allclose(got, np.array(losses(one)[3:])[:, 1], rtol=2e-3)


def test_the_sharded_engine_holds_half_the_base_and_computes_as_one_process(runs, tmp_path):
    """Gradient checkpointing on, evaluation (rows that split and rows that do not) and greedy
    decoding: both ranks agree with one process; between layers each holds <= 0.55x the base."""
    from tests.backends.torch_backend.dist_probe import probe

    model = runs[0]
    r = torchrun(2, PROBE, model, tmp_path)
    assert r.returncode == 0, r.stderr
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    want = probe(str(model))
    assert want["max_between_layers"] == want["full_nf4_bytes"]  # one process holds it all
    for got in ranks:
        assert got["size"] == 2 and got["full_nf4_bytes"] == want["full_nf4_bytes"]
        assert got["max_between_layers"] <= 0.55 * got["full_nf4_bytes"], got
        np.testing.assert_allclose(got["steps"], want["steps"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["eval"], want["eval"], rtol=1e-6)
        assert got["tokens"] == want["tokens"]
        for k, v in want["adapters"].items():
            np.testing.assert_allclose(got["adapters"][k], v, rtol=0, atol=1e-5)


def test_a_batch_that_does_not_split_is_refused_before_anything_is_written(runs, tmp_path):
    model, data, _, _ = runs
    out = tmp_path / "out"
    args = tiny_run_args(model, data, out, *RUN)
    args[args.index("--batch-size") + 1] = "3"
    r = torchrun(2, ROOT / "cli.py", *args)
    assert r.returncode != 0
    assert "Error: --batch-size 3: a batch of 3 rows does not split over 2 processes" in r.stderr
    assert not out.exists()


def test_torchrun_with_the_mlx_backend_is_refused(runs, tmp_path):
    model, data, _, _ = runs
    out = tmp_path / "out"
    env = {**cli_env(), "TORCHELASTIC_RUN_ID": "t", "WORLD_SIZE": "2", "RANK": "0"}
    args = tiny_run_args(model, data, out, "--backend", "mlx")
    r = subprocess.run(cli_command(*args), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip() == (
        "Error: this process was started by torchrun, which the mlx backend cannot join; "
        "start the mlx backend with mlx.launch"
    )
    assert not out.exists()


def _start_two_ranks(args: list[str]) -> list[subprocess.Popen]:
    """`cli.py *args` as ranks 0 and 1 of a torchrun-style world, started by hand (no agent)."""
    common = {
        **cli_env(),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "TORCHELASTIC_RUN_ID": "test",
        "NF4_QLORA_DIST_TIMEOUT": "60",
    }
    return [
        subprocess.Popen(
            cli_command(*args),
            cwd=ROOT,
            env={**common, "RANK": str(i), "LOCAL_RANK": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]


def test_a_rank_that_dies_ends_the_other_with_one_line(runs, tmp_path):
    """Rank 1 is killed mid-run (no torchrun agent to stop rank 0): rank 0 says so and exits."""
    model, data, _, _ = runs
    out = tmp_path / "out"
    args = tiny_run_args(model, data, out, "--steps", "2000", "--backend", "torch")
    ranks = _start_two_ranks(args)
    try:
        deadline = time.monotonic() + 180
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].stderr
            time.sleep(0.2)
        os.kill(ranks[1].pid, signal.SIGKILL)
        t = time.monotonic()
        _, err = ranks[0].communicate(timeout=90)
        assert time.monotonic() - t < 90
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert ranks[0].returncode == 1
    last = [x for x in err.splitlines() if x.strip()][-1]
    assert last.startswith("Error: rank 0 of 2: lost the other processes of the run"), err


def test_ctrl_c_stops_every_rank_and_rank_0_names_the_checkpoint_that_stays(runs, tmp_path):
    """A SIGINT (the terminal sends it to every rank) ends both at once; rank 0 alone says which
    checkpoint stays, the other rank says nothing, and the run resumes from it."""
    model, data, _, _ = runs
    out = tmp_path / "out"
    args = tiny_run_args(model, data, out, "--steps", "2000", "--save-every", "2", *RUN[4:])
    ranks = _start_two_ranks(args)
    try:
        deadline = time.monotonic() + 180
        while not list((out / "checkpoints").glob("step-*")):
            assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].stderr
            time.sleep(0.2)
        for p in ranks:
            os.kill(p.pid, signal.SIGINT)
        errs = [p.communicate(timeout=90)[1] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in ranks] == [130, 130], errs
    said = [x for x in errs[0].splitlines() if x.strip()]
    assert len(said) == 1 and said[0].startswith("interrupted: all 2 processes stopped"), errs[0]
    assert f"--resume {out}" in said[0] and "checkpoints/step-" in said[0]
    assert not errs[1].strip(), errs[1]
    kept = said[0].split("checkpoint stays ", 1)[1].split(";", 1)[0]
    assert load_checkpoint(kept).state.step >= 2  # complete: a resume can start from it
