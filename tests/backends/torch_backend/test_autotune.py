"""Autotuning of the Triton launch configurations (autotune.py): the choice by timing, what is
remembered in the process and on disk, and the launchers taking the choice (under the Triton
interpreter on CPU tensors, with NF4_AUTOTUNE=1 and a timer the test controls)."""

import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import nf4core
from backends.torch_backend import autotune, launch_config
from tests.backends.torch_backend.conftest import TRITON_INTERPRETER_READY, quantized


@dataclass(frozen=True)
class Tile:
    size: int


class TooBig(Exception):
    pass


class Clock:
    """A timer that reports the time a table gives each configuration and counts its calls."""

    def __init__(self, ms: dict[int, float]):
        self.ms, self.timed = ms, []

    def __call__(self, run):
        run()
        self.timed.append(self.last)
        return self.ms[self.last]

    def run(self, config: Tile) -> None:
        if self.ms.get(config.size) is None:
            raise TooBig
        self.last = config.size


CANDIDATES = (Tile(64), Tile(128), Tile(16))


def test_the_fastest_is_chosen_once_and_remembered_on_disk(tmp_path):
    clock = Clock({64: 3.0, 128: 1.0, 16: 2.0})
    tuner = autotune.Autotuner(tmp_path / "t.json", clock)
    assert tuner.choose("k", CANDIDATES, clock.run) == Tile(128)
    assert tuner.choose("k", CANDIDATES, clock.run) == Tile(128)
    assert clock.timed == [64, 128, 16]  # timed once, then remembered
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["choices"] == {"k": {"type": "Tile", "size": 128}}

    later = Clock({64: 1.0, 128: 9.0, 16: 9.0})  # a new process: the file's choice, no timing
    assert autotune.Autotuner(tmp_path / "t.json", later).choose("k", CANDIDATES, later.run) == (
        Tile(128)
    )
    assert later.timed == []


def test_each_key_is_tuned_and_kept_beside_the_others(tmp_path):
    path = tmp_path / "t.json"
    a, b = Clock({64: 1.0, 128: 2.0, 16: 3.0}), Clock({64: 3.0, 128: 2.0, 16: 1.0})
    autotune.Autotuner(path, a).choose("a", CANDIDATES, a.run)
    autotune.Autotuner(path, b).choose("b", CANDIDATES, b.run)  # another process, same file
    assert json.loads(path.read_text())["choices"] == {
        "a": {"type": "Tile", "size": 64},
        "b": {"type": "Tile", "size": 16},
    }


def test_a_candidate_the_gpu_cannot_hold_is_left_out(tmp_path):
    clock = Clock({64: None, 128: 5.0, 16: 6.0})
    tuner = autotune.Autotuner(tmp_path / "t.json", clock)
    assert tuner.choose("k", CANDIDATES, clock.run, skip=(TooBig,)) == Tile(128)
    none_fit = Clock({})
    tuner = autotune.Autotuner(tmp_path / "u.json", none_fit)
    assert tuner.choose("k", CANDIDATES, none_fit.run, skip=(TooBig,)) == Tile(64)
    assert not (tmp_path / "u.json").exists()  # nothing chosen, nothing remembered


def test_a_remembered_choice_that_is_no_longer_a_candidate_is_tuned_again(tmp_path):
    path = tmp_path / "t.json"
    body = dict(format=autotune.FORMAT, version=autotune.VERSION)
    path.write_text(json.dumps(dict(body, choices={"k": {"type": "Tile", "size": 32}})))
    clock = Clock({64: 2.0, 128: 1.0, 16: 3.0})
    assert autotune.Autotuner(path, clock).choose("k", CANDIDATES, clock.run) == Tile(128)
    assert clock.timed == [64, 128, 16]


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "is not valid JSON"),
        ('{"format": "something else", "version": 1, "choices": {}}', "is not a version-1"),
        ('{"format": "nf4-qlora triton autotune", "version": 1, "choices": {"k": 3}}', "version-1"),
    ],
)
def test_a_file_that_is_not_ours_costs_one_warning_and_is_rewritten(tmp_path, content, problem):
    path = tmp_path / "t.json"
    path.write_text(content)
    clock = Clock({64: 2.0, 128: 1.0, 16: 3.0})
    tuner = autotune.Autotuner(path, clock)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuner.choose("k", CANDIDATES, clock.run) == Tile(128)
        assert tuner.choose("j", CANDIDATES, clock.run) == Tile(128)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message and problem in message and "\n" not in message
    assert json.loads(path.read_text())["choices"]["k"] == {"type": "Tile", "size": 128}


def test_an_unwritable_file_keeps_the_choice_in_the_process(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    clock = Clock({64: 2.0, 128: 1.0, 16: 3.0})
    tuner = autotune.Autotuner(blocker / "t.json", clock)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tuner.choose("k", CANDIDATES, clock.run) == Tile(128)
    messages = [str(w.message) for w in caught]  # the path cannot be read, then not written
    assert len(messages) == 2 and "cannot be read" in messages[0]
    assert "for this process only" in messages[1]
    assert tuner.choose("k", CANDIDATES, clock.run) == Tile(128)
    assert clock.timed == [64, 128, 16]


def test_the_switch(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(autotune.ENV, raising=False)
    assert autotune.enabled(cuda) and not autotune.enabled(cpu)
    monkeypatch.setenv(autotune.ENV, "0")
    assert not autotune.enabled(cuda)
    monkeypatch.setenv(autotune.ENV, "1")
    assert autotune.enabled(cpu)
    monkeypatch.setenv(autotune.ENV, "yes")
    with pytest.raises(ValueError, match="NF4_AUTOTUNE='yes'"):
        autotune.enabled(cuda)
    assert [autotune.row_class(m) for m in (1, 9, 16, 17, 512, 513)] == [1, 16, 16, 32, 512, 1024]


def test_every_gpu_has_several_candidates_and_the_smallest_tile_last():
    for capability in ((8, 0), (8, 6), (9, 0), (12, 0), None):
        for size in (4, 2):
            for m in (9, 17, 512):
                configs = launch_config.matmul_configs(capability, size, m)
                assert len(set(configs)) == len(configs) >= 3
                assert configs[-1] == launch_config.FALLBACK_MATMUL
        assert len(set(launch_config.gemv_configs(capability))) >= 2


@pytest.mark.skipif(
    not TRITON_INTERPRETER_READY or os.environ.get("TRITON_INTERPRET") != "1",
    reason="kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported",
)
@pytest.mark.parametrize("prefer", [0, 1])
def test_the_launchers_run_the_tuned_choice(tmp_path, monkeypatch, prefer):
    pytest.importorskip("triton")
    from backends.torch_backend import ops_triton

    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv("NF4_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "_tuners", {})
    launched = []
    original = ops_triton._launch
    monkeypatch.setattr(ops_triton, "_launch", lambda *a: launched.append(a[4][0]) or original(*a))
    favourite = {
        "matmul": launch_config.INTERPRETER_MATMUL[prefer],
        "gemv": launch_config.INTERPRETER_GEMV[prefer],
    }
    # the interpreter's timings mean nothing: each kernel's two candidates are timed in order
    # (the GEMV's first), and the clock makes candidate `prefer` the faster of each pair
    pair = (0.0, 1.0) if prefer == 0 else (1.0, 0.0)
    costs = iter(pair * 2)
    autotune.tuner(torch.device("cpu")).timer = lambda run: run() or next(costs)
    n, k = 40, 96
    _, t = quantized(np.random.default_rng(5), (n, k), 64, True)
    from backends.torch_backend.nf4_weight import NF4Weight

    w = NF4Weight.from_nf4(t)
    dense = torch.from_numpy(nf4core.dequantize(t))
    for m in (3, 20):
        x = torch.randn(m, k)
        got = ops_triton.linear(x, w)
        assert torch.allclose(got, x @ dense.T, rtol=1e-5, atol=1e-5)
    assert launched == [favourite["gemv"], favourite["matmul"]]
    saved = json.loads((tmp_path / autotune.FILE_NAME).read_text())["choices"]
    assert len(saved) == 2 and all(key.endswith("|cpu") for key in saved)
