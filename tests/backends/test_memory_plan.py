"""`info MODEL --nproc N`: each rank's memory, checked against the tiny model's own tensors (NF4 bytes
as bitsandbytes stores them, dense bytes, LoRA shapes) and against the one-process estimate on the
rank's share of the batch; bad --nproc values are refused by name."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from cli import main
from nf4core.model_config import LINEAR_NAMES
from tests.backends.finetune_fixtures import tiny_model_dir
from tests.nf4core.bnb_oracle import quantize

LORA_R, BYTES_PER_ADAPTER_PARAM = 8, 16  # float32 weight, grad and two Adam moments


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("plan"))


def _info(*args: str) -> dict:
    r = CliRunner().invoke(main, ["info", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def _bnb_nf4_bytes(w) -> int:
    packed, qs = quantize(w, 64, True)
    parts = (packed, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code)
    return sum(t.nbytes for t in parts)


@pytest.fixture(scope="module")
def expected(model) -> dict:
    nf4_by_layer, dense, lora = defaultdict(int), 0, 0
    for name, w in load_file(str(model / "model.safetensors")).items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEAR_NAMES:
            nf4_by_layer[name.split(".")[2]] += _bnb_nf4_bytes(w)  # model.layers.<i>.…
            lora += LORA_R * (w.shape[0] + w.shape[1])
        else:
            dense += w.size * 4  # float32 compute on the CPU
    assert len(nf4_by_layer) == 2 and dense > 0
    return {"nf4": nf4_by_layer, "dense": dense, "adapters": lora * BYTES_PER_ADAPTER_PARAM}


def test_per_rank_memory_adds_up_from_the_model_tensors(model, expected):
    nf4 = sum(expected["nf4"].values())
    fixed = nf4 + expected["dense"] + expected["adapters"]
    one = {b: _info(str(model), "--batch-size", str(b))["memory_estimate_bytes"] for b in (1, 2, 4)}
    act = {b: one[b] - fixed for b in one}  # what the one-process estimate gives the batch
    assert act[1] > 0 and act[2] == 2 * act[1] and act[4] == 4 * act[1]
    for nproc, rows in ((1, 4), (2, 2), (4, 1)):
        plan = _info(str(model), "--batch-size", "4", "--nproc", str(nproc))["per_rank"]
        assert plan["nproc"] == nproc and plan["rows_per_rank"] == rows
        t = plan["torch_fsdp"]
        assert t["nf4_base_shard"] == math.ceil(nf4 / nproc)
        assert t["largest_layer_gathered"] == (max(expected["nf4"].values()) if nproc > 1 else 0)
        assert t["dense_replicated"] == expected["dense"]
        assert t["adapters_and_optimizer_replicated"] == expected["adapters"]
        assert t["activations"] == act[rows]
        parts = ("nf4_base_shard", "largest_layer_gathered", "dense_replicated")
        assert t["total"] == sum(t[k] for k in parts) + expected["adapters"] + act[rows]
        # MLX: a full replica on the rank's rows, the one-process estimate for that many rows
        assert plan["mlx_data_parallel"]["total"] == one[rows]


def test_the_text_output_says_what_is_sharded_and_what_is_per_rank(model):
    r = CliRunner().invoke(main, ["info", str(model), "--batch-size", "4", "--nproc", "2"])
    assert r.exit_code == 0, r.output
    for words in ("2 processes, 2 rows", "1/2 per rank", "sharded", "replicated", "transient"):
        assert words in r.output
    assert "per rank" not in CliRunner().invoke(main, ["info", str(model)]).output


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_nproc_is_refused_by_name(model, value):
    r = CliRunner().invoke(main, ["info", str(model), "--nproc", value])
    assert r.exit_code == 2 and "'--nproc'" in r.output


def test_a_batch_that_does_not_split_and_a_plan_for_an_adapter_are_refused(model, tmp_path):
    r = CliRunner().invoke(main, ["info", str(model), "--batch-size", "3", "--nproc", "2"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "--batch-size 3 does not split over --nproc 2" in lines[0]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_text("{}")
    r = CliRunner().invoke(main, ["info", str(adapter), "--nproc", "2"])
    assert r.exit_code == 1 and "--nproc" in r.output and "adapter" in r.output
