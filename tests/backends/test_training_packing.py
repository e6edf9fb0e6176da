"""`--packing`: the finetune pipeline's packed batches give each example the loss it has alone (on
both backends), a packed run takes fewer steps for short examples, and packing is fixed on resume."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

import nf4core
from backends.engine import BaseWeights, LoRASettings, TrainSettings
from backends.finetune_data import TrainBatches
from backends.registry import build_engine, select_backend
from cli import main
from tests.backends.finetune_fixtures import tiny_setup

pytest.importorskip("torch")

BACKENDS = ["torch"] + (["mlx"] if importlib.util.find_spec("mlx") else [])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("pack"))


def _train_set(model, data) -> tuple[nf4core.Dataset, int]:
    tokenizer = nf4core.open_model(str(model)).tokenizer()
    train, _ = nf4core.load_dataset(nf4core.DataConfig(train=data, max_length=128), tokenizer)
    return train, tokenizer.pad_token_id or 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_batches_give_the_unpacked_loss(setup, backend):
    model, data = setup
    train, pad = _train_set(model, data)
    packed = TrainBatches(train, 4, pad, seed=0, packing=True, max_length=128)
    plain = TrainBatches(train, 4, pad, seed=0)
    assert packed.per_epoch < plain.per_epoch  # short examples: several to a row
    engine = build_engine(
        select_backend(backend, "cpu", "float32"),
        nf4core.open_model(str(model)),
        LoRASettings(r=4, seed=1),
        TrainSettings(),
        1e-3,
        BaseWeights(),
    )
    for b in (packed[g] for g in range(packed.per_epoch)):  # no target crosses an example
        starts = np.diff(b.segment_ids, axis=1) != 0
        assert (b.position_ids[:, 1:][starts & (b.segment_ids[:, 1:] > 0)] == 0).all()
    s_packed, n_packed = engine.eval_loss([packed[g] for g in range(packed.per_epoch)])
    s_plain, n_plain = engine.eval_loss([plain[g] for g in range(plain.per_epoch)])
    per_example = [engine.batch_loss(b) for b in nf4core.batches(train, 1, pad, shuffle=False)]
    assert n_packed == n_plain == sum(k for _, k in per_example)
    assert s_packed == pytest.approx(s_plain, rel=1e-5)
    assert s_packed == pytest.approx(sum(s for s, _ in per_example), rel=1e-5)


def _run(model, data, out, *extra, backend="torch"):
    args = ["finetune", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += ["--batch-size", "4", "--max-seq-len", "128", "--epochs", "1", "--quiet", *extra]
    return CliRunner().invoke(main, [*args, "--backend", backend])


def test_cli_packing_takes_fewer_steps_and_is_fixed_on_resume(setup, tmp_path):
    model, data = setup
    plain = _run(model, data, tmp_path / "plain")
    conf = tmp_path / "packing.yaml"
    conf.write_text("packing: true\n")  # the config file's name for --packing
    packed = _run(model, data, tmp_path / "packed", "--config", str(conf))
    assert plain.exit_code == 0 and packed.exit_code == 0, plain.output + packed.output
    line = next(x for x in packed.output.splitlines() if x.startswith("packing: "))
    assert line.startswith("packing: 12 examples in ")

    def steps(out):
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in records if "loss" in r]

    assert steps(tmp_path / "plain") == [1, 2, 3]  # 12 examples, 4 a batch
    assert len(steps(tmp_path / "packed")) < 3
    if "mlx" in BACKENDS:
        r = _run(model, data, tmp_path / "mlx", "--packing", backend="mlx")
        assert r.exit_code == 0, r.output
        assert steps(tmp_path / "mlx") == steps(tmp_path / "packed")
    config = (tmp_path / "packed" / "config.yaml").read_text()
    assert "packing: true" in config
    r = CliRunner().invoke(
        main, ["finetune", "--resume", str(tmp_path / "packed"), "--no-packing", "--quiet"]
    )
    assert r.exit_code != 0 and "--packing False (checkpoint: True)" in r.output
