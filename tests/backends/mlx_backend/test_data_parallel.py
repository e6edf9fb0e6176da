"""MLX data parallel: 2 processes started by `mlx.launch --backend ring` on localhost train exactly as
one process on the same global batches (losses, grad norms and final adapters within 1e-5 in fp32),
and the launcher-free pieces (joining, the flat all-sum) behave as documented."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from safetensors.numpy import load_file  # noqa: E402

from backends.mlx_backend.distributed import Summer, join_world  # noqa: E402
from backends.world import SINGLE, World  # noqa: E402
from tests.backends.finetune_fixtures import tiny_model_dir, tiny_setup  # noqa: E402
from tests.backends.run_helpers import run_cli, tiny_run_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
WORKER = "tests.backends.mlx_backend.dist_worker"
TIMEOUT_S = 180


def _launcher() -> str:
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "mlx.launch"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("mlx.launch")
    if found is None:
        pytest.skip("mlx.launch is not installed")
    return found


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # a session of its own, so a timeout ends the launcher and both ranks it started
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.PIPE,  # mlx.launch forwards stdin; a pipe never written keeps it idle
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT_S} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _launch(
    n: int, *args: str, command: tuple[str, ...] = ("-m", WORKER)
) -> subprocess.CompletedProcess:
    head = [
        _launcher(),
        "-n",
        str(n),
        "--backend",
        "ring",
        "--starting-port",
        str(_free_port_pair()),
    ]
    return _run([*head, "--", sys.executable, *command, *args])


def _result(out: Path, rank: int) -> tuple[dict, dict[str, np.ndarray]]:
    return json.loads((out / f"rank{rank}.json").read_text()), load_file(
        str(out / f"rank{rank}.safetensors")
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("dp_model"))


def test_two_ranks_train_as_one_process_on_the_global_batch(model, tmp_path):
    one = _run([sys.executable, "-m", WORKER, str(model), str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _launch(2, str(model), str(tmp_path / "two"))
    # mlx.launch exits 0 even when a rank fails: the files are the evidence
    assert (tmp_path / "two" / "rank1.json").is_file(), two.stdout + two.stderr
    ref, ref_adapters = _result(tmp_path / "one", 0)
    assert ref["world"] == [0, 1, None]
    for rank in (0, 1):
        got, adapters = _result(tmp_path / "two", rank)
        assert got["world"] == [rank, 2, "mlx.launch"]
        assert got["tokens"] == ref["tokens"]  # the global count, on every rank
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["eval_loss"], ref["eval_loss"], rtol=1e-6)
        assert adapters.keys() == ref_adapters.keys()
        for key, value in ref_adapters.items():
            np.testing.assert_allclose(adapters[key], value, rtol=0, atol=1e-5, err_msg=key)
    # the run learned something: B moved off zero and the loss went down
    assert any(np.abs(v).max() > 1e-3 for k, v in ref_adapters.items() if "lora_B" in k)
    assert ref["losses"][-1] < ref["losses"][0]


def test_a_global_batch_that_does_not_split_is_refused_in_one_line(model, tmp_path):
    r = _launch(2, str(model), str(tmp_path / "odd"), "--rows", "3", "--steps", "1")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    # one line from each rank, unless the launcher ended a rank before it printed
    assert 1 <= len(errors) <= 2, r.stdout + r.stderr
    for line in errors:
        assert "a batch of 3 rows does not split over 2 processes" in line
        assert "--batch-size" in line
    assert not (tmp_path / "odd").exists()


def test_when_a_rank_dies_the_other_exits_instead_of_waiting(model, tmp_path):
    r = _launch(2, str(model), str(tmp_path / "dies"), "--steps", "3", "--die", "1")
    assert "rank 1 exited with code 3" in r.stderr.replace("Node with ", ""), r.stderr
    assert not (tmp_path / "dies").exists()  # rank 0 never finished its steps


def test_a_peer_that_never_starts_ends_the_join_with_a_message(tmp_path):
    hosts = tmp_path / "hosts.json"
    port = _free_port_pair()  # nobody listens on port + 1: rank 1 never starts
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    code = (
        "import backends.mlx_backend.distributed as d; d.JOIN_TIMEOUT_S = 2; "
        "d.join_world(); print('joined')"
    )
    env = {"MLX_RANK": "0", "MLX_HOSTFILE": str(hosts)}
    r = _run([sys.executable, "-c", code], env)
    assert r.returncode != 0 and "joined" not in r.stdout
    assert "rank 0: no answer from the other mlx.launch processes after 2 s" in r.stderr


def test_without_a_launcher_the_world_is_one_plain_process():
    assert join_world({}) == (SINGLE, None)


def test_mlx_launch_with_one_process_is_a_world_of_one(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("\n")  # what `mlx.launch -n 1` writes: no ring to join
    world, summer = join_world({"MLX_RANK": "0", "MLX_HOSTFILE": str(hosts)})
    assert world == World(0, 1, "mlx.launch") and summer is None


def test_the_flat_all_sum_keeps_every_leaf_in_place():
    group = mx.distributed.init()  # a singleton group: the sum over one rank is the identity
    assert group.size() == 1
    tree = (
        {"a": mx.arange(6, dtype=mx.float32).reshape(2, 3), "b": [mx.array([7.0, 8.0])]},
        mx.array(9.0),
    )
    summed = Summer(group).all_sum(tree)
    np.testing.assert_array_equal(np.array(summed[0]["a"]), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(np.array(summed[0]["b"][0]), [7.0, 8.0])
    assert summed[1].shape == () and summed[1].item() == 9.0


def _metrics(out: Path) -> list[list[float]]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [[r["step"], r["loss"], r["grad_norm"], r["tokens"]] for r in records if "loss" in r]


def test_cli_finetune_under_mlx_launch_is_one_process_and_rank_0_alone_writes(tmp_path):
    """The README's line: `mlx.launch -n 2 --backend ring -- python cli.py finetune --backend mlx`."""
    model, data = tiny_setup(tmp_path)
    args = ("--steps", "4", "--save-every", "2", "--lr", "1e-3", "--backend", "mlx")
    one = run_cli(*tiny_run_args(model, data, tmp_path / "one", *args))
    assert one.returncode == 0, one.stderr
    two = _launch(
        2,
        *tiny_run_args(model, data, tmp_path / "two", *args),
        command=(str(ROOT / "cli.py"),),
    )
    assert (tmp_path / "two" / "adapter_model.safetensors").is_file(), two.stdout + two.stderr
    assert "error" not in two.stderr.lower(), two.stderr
    got, want = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [r[0] for r in got] == [1, 2, 3, 4] and [r[3] for r in got] == [r[3] for r in want]
    np.testing.assert_allclose([r[1:3] for r in got], [r[1:3] for r in want], rtol=0, atol=1e-5)
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-5, err_msg=key)
    one_files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*"))
    two_files = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*"))
    assert two_files == one_files  # one writer: the same files a single process writes
