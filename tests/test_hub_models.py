"""Models and data sets by Hugging Face Hub id, through the CLI, from a Hub cache built by hand in the
real layout (tests/hub_cache.py) with HF_HUB_OFFLINE=1; peft and transformers open the adapter by
the Hub id it records, from the same cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nf4core
from tests.backends.finetune_fixtures import chat_records, tiny_model_dir, write_jsonl
from tests.backends.run_helpers import ROOT, cli_command, cli_env, error_line
from tests.hub_cache import add_snapshot, hub_env
from tests.nf4core.tiny_models import hf_config, random_weights, tiny_tokenizer, write_hf_dir

pytest.importorskip("huggingface_hub")
pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

MAIN, V2 = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An HF_HOME holding org/tiny (main: 2 layers; branch v2: 1 layer) and a train file."""
    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "hf" / "hub"
    main = add_snapshot(cache, "org/tiny", tiny_model_dir(tmp / "m2"), MAIN)
    config = hf_config("llama", vocab=300, num_hidden_layers=1)
    one_layer = write_hf_dir(tmp / "m1", config, random_weights(config), tiny_tokenizer(300))
    v2 = add_snapshot(cache, "org/tiny", one_layer, V2, ref="v2")
    data = write_jsonl(tmp / "train.jsonl", chat_records(8))
    return tmp, main, v2, data


def run(hf_home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**cli_env(), **hub_env(hf_home), **env}
    return subprocess.run(
        cli_command(*args),
        cwd=ROOT,
        env={k: v for k, v in env.items() if v},
        capture_output=True,
        text=True,
        timeout=300,
    )


def layers(hf_home: Path, model: str) -> int:
    r = run(hf_home, "info", model, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["layers"]


def test_hub_ids_revisions_and_cache_directories(hub):
    tmp, main, v2, _ = hub
    hf = tmp / "hf"
    repo = hf / "hub" / "models--org--tiny"
    assert layers(hf, "org/tiny") == 2
    assert layers(hf, "org/tiny@v2") == 1
    assert layers(hf, f"org/tiny@{V2}") == 1
    assert layers(hf, str(repo)) == 2  # a repository folder: its main snapshot
    assert layers(hf, str(v2)) == 1


def test_an_id_not_in_the_cache_is_one_line(hub):
    tmp = hub[0]
    r = run(tmp / "hf", "info", "org/absent")
    line = error_line(r.stderr)
    assert r.returncode == 1
    assert line.startswith(
        "Error: org/absent: no such file or directory, and the Hub model org/absent"
    )
    assert f"not in the Hugging Face cache ({tmp / 'hf' / 'hub'}); HF_HUB_OFFLINE is set" in line
    r = run(tmp / "hf", "info", "org/tiny@nope")
    assert "the Hub model org/tiny at revision nope is not in the" in error_line(r.stderr)
    r = run(tmp / "hf", "info", str(tmp / "absent.gguf"))
    assert error_line(r.stderr) == f"Error: {tmp / 'absent.gguf'}: no such file or directory"


def test_an_id_not_in_the_cache_is_downloaded_only_when_not_offline(hub):
    tmp = hub[0]
    # HF_HUB_OFFLINE unset: the download is tried, from an endpoint that refuses at once (localhost)
    r = run(tmp / "hf", "info", "org/absent", HF_HUB_OFFLINE="", HF_ENDPOINT="http://127.0.0.1:9")
    line = error_line(r.stderr)
    assert r.returncode == 1 and "HF_HUB_OFFLINE" not in line
    assert "is not in the Hugging Face cache" in line and "could not be downloaded" in line
    # a cached id never reaches the endpoint
    r = run(tmp / "hf", "info", "org/tiny", HF_HUB_OFFLINE="", HF_ENDPOINT="http://127.0.0.1:9")
    assert r.returncode == 0, r.stderr


PEFT_CHECK = r"""
import json, sys
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
out, snapshot = sys.argv[1], sys.argv[2]
model = AutoPeftModelForCausalLM.from_pretrained(out)
state = model.state_dict()
ours = load_file(out + "/adapter_model.safetensors")
lora = max((state[k.replace(".weight", ".default.weight")] - v).abs().max().item() for k, v in ours.items())
base = load_file(snapshot + "/model.safetensors")
embed = (state["base_model.model.model.embed_tokens.weight"] - base["model.embed_tokens.weight"]).abs().max().item()
trained = max(v.abs().max().item() for k, v in state.items() if "lora_B" in k)
print(json.dumps({"lora": lora, "embed": embed, "trained": trained, "tensors": len(ours), "layers": model.config.num_hidden_layers}))
"""


def finetune(hub, model: str, out: Path) -> dict:
    tmp, _, _, data = hub
    args = ["finetune", "--model", model, "--data", data, "--out", out, "--steps", "2"]
    r = run(tmp / "hf", *args, "--batch-size", "4", "--max-seq-len", "64", "--quiet")
    assert r.returncode == 0, r.stderr
    return json.loads((out / "adapter_config.json").read_text())


def peft_opens(hub, out: Path, snapshot: Path) -> dict:
    tmp = hub[0]
    r = subprocess.run(
        [sys.executable, "-c", PEFT_CHECK, str(out), str(snapshot)],
        cwd=tmp,  # not the checkout: peft must find the base by its Hub id alone
        env={**os.environ, "OMP_NUM_THREADS": "1", **hub_env(tmp / "hf")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_round_trip_hub_id_to_an_adapter_peft_opens(hub):
    tmp, main, v2, _ = hub
    config = finetune(hub, "org/tiny", tmp / "by-id")
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny", None)
    got = peft_opens(hub, tmp / "by-id", main)
    assert got["layers"] == 2 and got["tensors"] == 2 * 7 * 2
    assert got["lora"] == 0.0 and got["embed"] == 0.0  # our adapter on the cached base, exactly
    assert got["trained"] > 0  # lora_B starts at zero: these are trained weights
    # ... -> a merged GGUF out, from the base the adapter names by its Hub id: the same tensors
    # as the merged Hugging Face directory, read back by the gguf package's reader and by ours
    for name, fmt in (("merged-id.gguf", "gguf"), ("merged-id", "hf")):
        r = run(
            tmp / "hf", "merge", tmp / "by-id", tmp / name, "--format", fmt, "--dtype", "float32"
        )
        assert r.returncode == 0, r.stderr
    gg, hf = nf4core.open_model(tmp / "merged-id.gguf"), nf4core.open_model(tmp / "merged-id")
    reader = gguf.GGUFReader(tmp / "merged-id.gguf")
    assert len(reader.tensors) == len(hf.tensor_names())
    assert sorted(gg.tensor_names()) == sorted(hf.tensor_names())
    for tensor in hf.tensor_names():
        np.testing.assert_array_equal(gg.read(tensor), hf.read(tensor), err_msg=tensor)
    # a snapshot directory off the main branch: the adapter records the id and the commit
    config = finetune(hub, str(v2), tmp / "by-snapshot")
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny", V2)
    got = peft_opens(hub, tmp / "by-snapshot", v2)
    assert got["layers"] == 1 and got["lora"] == 0.0 and got["embed"] == 0.0
    # merge finds the recorded base (id and revision) in the cache
    r = run(tmp / "hf", "merge", tmp / "by-snapshot", tmp / "merged", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp / "merged" / "config.json").read_text())["num_hidden_layers"] == 1


def test_a_path_base_is_recorded_as_given_and_the_default_by_its_hub_id(hub, tmp_path):
    from backends.peft_adapter import Adapter, peft_config
    from nf4core.hub import DEFAULT_MODEL_ID, base_spec, recorded_base

    model = hub[1]  # a snapshot whose refs/main points at it
    assert recorded_base(None) == (DEFAULT_MODEL_ID, None)
    assert recorded_base(str(model)) == ("org/tiny", None)
    plain = tiny_model_dir(tmp_path / "plain")
    assert recorded_base(str(plain)) == (str(plain), None)
    # what merge opens for a recorded base: the embedded model for its own id
    assert base_spec(DEFAULT_MODEL_ID) is None
    assert base_spec("org/tiny", V2) == f"org/tiny@{V2}"
    assert base_spec("runs/base") == "runs/base"
    adapter = Adapter({}, 4, 8.0, 0.0, ("q_proj",), "org/tiny", None, V2)
    assert (peft_config(adapter)["base_model_name_or_path"], peft_config(adapter)["revision"]) == (
        "org/tiny",
        V2,
    )


def test_hub_data_set_id_from_the_cache(hub):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    tmp = hub[0]
    files = tmp / "dataset-files" / "data"
    files.mkdir(parents=True)
    rows = [{"instruction": f"repeat {w}", "input": "", "output": w} for w in ("fox", "dog") * 4]
    pq.write_table(pa.Table.from_pylist(rows), files / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), files / "validation-00000-of-00001.parquet")
    snapshot = add_snapshot(
        tmp / "hf" / "hub", "org/words", files.parent, "c" * 40, repo_type="dataset"
    )
    out = tmp / "by-data-id"
    r = run(
        tmp / "hf",
        "finetune",
        "--model",
        hub[1],
        "--data",
        "org/words",
        "--out",
        out,
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--max-seq-len",
        "64",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert (
        f"data: {snapshot / 'data' / 'train-00000-of-00001.parquet'}, 8 examples; validation: "
        f"{snapshot / 'data' / 'validation-00000-of-00001.parquet'}, 2 examples (format: alpaca)"
    ) in r.stdout
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics)
    # the cache folder of the data set, as a path: its main snapshot's split files
    from nf4core.data_files import find_data

    files = find_data(tmp / "hf" / "hub" / "datasets--org--words")
    assert files.train == (snapshot / "data" / "train-00000-of-00001.parquet",)
    assert files.valid == (snapshot / "data" / "validation-00000-of-00001.parquet",)


HUB_MISSING = r"""
import sys
sys.modules["huggingface_hub"] = None  # `import huggingface_hub` now raises ImportError
from nf4core import ModelLoadError, open_model
try:
    open_model("org/tiny")
except ModelLoadError as exc:
    print("ERROR:" + str(exc))
"""


def test_a_hub_id_without_huggingface_hub_is_one_clear_line():
    r = subprocess.run(
        [sys.executable, "-c", HUB_MISSING], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.stdout.strip() == (
        "ERROR:reading Hugging Face Hub ids and caches needs huggingface_hub: "
        "pip install huggingface_hub"
    ), r.stderr
