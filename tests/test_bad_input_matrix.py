"""Bad inputs through the real CLI, one subprocess per case.

Every case must end with a non-zero exit code and exactly one line on stderr that names the problem
(the file, field or flag), with no traceback; nothing may be created outside the case's `out`, and
nothing that existed before (an `out` included) may be changed or removed. Each case runs in its
own directory holding copies of the inputs it spoils, and the cases run a few at a time (start-up,
not work, is most of their cost).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import nf4core
from backends.checkpoint import save_checkpoint
from backends.engine import TrainingState
from backends.finetune_config import FinetuneConfig
from backends.peft_adapter import PEFT_PREFIX, Adapter, save_adapter
from nf4core.sources.safetensors_io import save_safetensors
from tests.backends.finetune_fixtures import chat_records, tiny_model_dir, write_jsonl
from tests.nf4core.tiny_models import hf_config, random_weights, write_gguf

REPO = Path(__file__).resolve().parents[1]
MODULE = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class Inputs:
    """Good inputs, built once; cases copy and spoil them."""

    model: Path
    data: Path
    adapter: Path
    run: Path  # an adapter with checkpoints/ beside it, as finetune leaves it


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path, Inputs], list]  # builds the bad input in the case directory -> argv
    expect: str  # in the one stderr line; "{d}" is the case directory


# -- helpers that build bad inputs ----------------------------------------------------------------


def copy(src: Path, d: Path, name: str | None = None) -> Path:
    dst = d / (name or src.name)
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def edit_json(path: Path, **changes) -> Path:
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))
    return path


def model_with(d: Path, i: Inputs, **config) -> Path:
    model = copy(i.model, d, "model")
    edit_json(model / "config.json", **config)
    return model


def file(d: Path, name: str, content: str | bytes) -> Path:
    path = d / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def fifo(d: Path, name: str) -> Path:
    os.mkfifo(d / name)
    return d / name


def config_file(content: str) -> Callable[[Path, Inputs], list]:
    return lambda d, i: ["finetune", "--config", file(d, "c.yaml", content), "--out", d / "out"]


def rewrite_header(model: Path, change: Callable[[dict], bytes | None]) -> Path:
    """Rewrite model.safetensors' header with `change` (which may return extra data bytes)."""
    path = model / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    data += change(header) or b""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return model


def spoiled_model(change: Callable[[dict], bytes | None]) -> Callable[[Path, Inputs], list]:
    return lambda d, i: ["info", rewrite_header(copy(i.model, d, "model"), change)]


def overlap(header: dict) -> None:
    header["model.norm.weight"]["data_offsets"] = header["model.layers.1.input_layernorm.weight"][
        "data_offsets"
    ]


def sharded(d: Path, i: Inputs, shard_name: str) -> Path:
    """The model with an index whose weight_map points every tensor at `shard_name`."""
    model = copy(i.model, d, "model")
    names = nf4core.open_model(i.model).tensor_names()
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: shard_name for n in names}})
    )
    return model


def outside_shard(d: Path, i: Inputs, relative: bool) -> list:
    shard = copy(i.model / "model.safetensors", d, "elsewhere.safetensors")
    model = sharded(d, i, "../elsewhere.safetensors" if relative else str(shard))
    (model / "model.safetensors").unlink()
    return ["info", model]


def linked_shard(d: Path, i: Inputs) -> list:
    copy(i.model / "model.safetensors", d, "elsewhere.safetensors")
    model = sharded(d, i, "shard.safetensors")
    (model / "model.safetensors").unlink()
    os.symlink(d / "elsewhere.safetensors", model / "shard.safetensors")
    return ["info", model]


def nan_weight(d: Path, i: Inputs) -> list:
    model = copy(i.model, d, "model")
    path = model / "model.safetensors"
    source = nf4core.open_model(model)
    weights = {name: np.array(source.read(name)) for name in source.tensor_names()}
    weights["model.norm.weight"][3] = np.nan
    save_safetensors(path, weights)
    return ["quantize", model, d / "out"]


def nan_quant_map(d: Path, i: Inputs) -> list:
    bnb = nf4core.quantize_model(i.model, d / "nf4")
    path = bnb / "model.safetensors"
    file_ = nf4core.sources.safetensors_io.SafetensorsFile(path)
    tensors = {k: np.array(file_.read(k)) for k in file_.names()}
    tensors["model.layers.0.mlp.up_proj.weight.quant_map"][5] = np.inf
    save_safetensors(path, tensors)
    return ["quantize", bnb, d / "out"]


def gguf_with_extra_layer(d: Path, i: Inputs) -> list:
    config = hf_config("llama")
    path = write_gguf(d / "m.gguf", {**config, "num_hidden_layers": 1}, random_weights(config))
    return ["info", path]


def adapter_with(**config) -> Callable[[Path, Inputs], list]:
    def setup(d: Path, i: Inputs) -> list:
        adapter = copy(i.adapter, d, "adapter")
        edit_json(adapter / "adapter_config.json", **config)
        return ["info", adapter]

    return setup


def adapter_config_is(content: str) -> Callable[[Path, Inputs], list]:
    def setup(d: Path, i: Inputs) -> list:
        adapter = copy(i.adapter, d, "adapter")
        (adapter / "adapter_config.json").write_text(content)
        return ["info", adapter]

    return setup


def integer_adapter(d: Path, i: Inputs) -> list:
    from safetensors.numpy import load_file, save_file

    adapter = copy(i.adapter, d, "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[f"{MODULE}.lora_A.weight"] = tensors[f"{MODULE}.lora_A.weight"].astype(np.int32)
    save_file(tensors, adapter / "adapter_model.safetensors")
    return ["info", adapter]


def fifo_adapter(d: Path, i: Inputs) -> list:
    adapter = copy(i.adapter, d, "adapter")
    (adapter / "adapter_config.json").unlink()
    fifo(adapter, "adapter_config.json")
    return ["generate", "hi", "--model", i.model, "--adapter", adapter]


def run_with(latest: str | None = None, **state) -> Callable[[Path, Inputs], list]:
    """A copy of the run with latest.json replaced or trainer_state.json fields changed; resumed."""

    def setup(d: Path, i: Inputs) -> list:
        run = copy(i.run, d, "run")
        if latest is not None:
            (run / "checkpoints/latest.json").write_text(latest)
        if state:
            edit_json(run / "checkpoints/step-000002/trainer_state.json", **state)
        return [
            "finetune",
            "--model",
            i.model,
            "--data",
            i.data,
            "--resume",
            run,
            "--out",
            d / "out",
            "--steps",
            "4",
        ]

    return setup


def state_is(content: str) -> Callable[[Path, Inputs], list]:
    def setup(d: Path, i: Inputs) -> list:
        run = copy(i.run, d, "run")
        (run / "checkpoints/step-000002/trainer_state.json").write_text(content)
        return ["info", run / "checkpoints"]

    return setup


def template(source: str) -> Callable[[Path, Inputs], list]:
    def setup(d: Path, i: Inputs) -> list:
        model = copy(i.model, d, "model")
        edit_json(model / "tokenizer_config.json", chat_template=source)
        return ["generate", "hi", "--model", model, "--max-new-tokens", "1"]

    return setup


CASES = [
    # settings files
    Case("config-integer-key", config_file("1: 3\n"), "{d}/c.yaml: setting names must be strings"),
    Case("config-list-path", config_file("data: [1, 2]\n"), "{d}/c.yaml: data must be a string"),
    Case(
        "config-string-steps",
        config_file('steps: "3"\n'),
        "{d}/c.yaml: steps must be an integer >= 1, got '3'",
    ),
    Case(
        "config-string-bool",
        config_file('grad_checkpoint: "yes"\n'),
        "{d}/c.yaml: grad_checkpoint must be true or false",
    ),
    Case(
        "config-huge-seed",
        config_file("seed: 99999999999999999999999\n"),
        "{d}/c.yaml: seed must be at most",
    ),
    Case(
        "config-python-tag",
        config_file("steps: !!python/object:os.system {}\n"),
        "{d}/c.yaml: not valid YAML",
    ),
    Case(
        "config-not-utf8",
        lambda d, i: ["finetune", "--config", file(d, "c.yaml", b"\xff\xfe"), "--out", d / "out"],
        "{d}/c.yaml: not UTF-8",
    ),
    Case(
        "config-fifo",
        lambda d, i: ["finetune", "--config", fifo(d, "c.yaml"), "--out", d / "out"],
        "{d}/c.yaml: not a regular file (a FIFO)",
    ),
    # data
    Case(
        "data-lone-surrogate",
        lambda d, i: ["eval", file(d, "s.jsonl", '{"text": "a\\ud800b"}\n'), "--model", i.model],
        "{d}/s.jsonl:1: a string holds a lone surrogate",
    ),
    Case(
        "data-fifo",
        lambda d, i: ["eval", fifo(d, "f.jsonl"), "--model", i.model],
        "{d}/f.jsonl: not a regular file (a FIFO)",
    ),
    Case(
        "finetune-data-fifo",
        lambda d, i: [
            "finetune",
            "--model",
            i.model,
            "--data",
            fifo(d, "t.jsonl"),
            "--out",
            d / "out",
        ],
        "{d}/t.jsonl: not a regular file (a FIFO)",
    ),
    Case(
        "data-bad-json",
        lambda d, i: ["eval", file(d, "b.jsonl", '{"text": "ok"}\n{oops\n'), "--model", i.model],
        "{d}/b.jsonl:2: not valid JSON",
    ),
    # model config
    Case(
        "config-gelu",
        lambda d, i: ["info", model_with(d, i, hidden_act="gelu")],
        "{d}/model/config.json: hidden_act 'gelu' is not supported",
    ),
    Case(
        "config-tie-string",
        lambda d, i: ["info", model_with(d, i, tie_word_embeddings="false")],
        "{d}/model/config.json: tie_word_embeddings must be true or false, got 'false'",
    ),
    Case(
        "config-rope-theta-0",
        lambda d, i: ["info", model_with(d, i, rope_theta=0)],
        "{d}/model/config.json: rope_theta must be a finite number > 0",
    ),
    Case(
        "config-fewer-layers",
        lambda d, i: ["info", model_with(d, i, num_hidden_layers=1)],
        "{d}/model/config.json: num_hidden_layers is 1, but the weights hold "
        "'model.layers.1.input_layernorm.weight'",
    ),
    Case(
        "config-float-size",
        lambda d, i: ["info", model_with(d, i, hidden_size=64.0)],
        "{d}/model/config.json: hidden_size must be a positive int, got 64.0",
    ),
    Case(
        "config-yarn",
        lambda d, i: ["info", model_with(d, i, rope_scaling={"rope_type": "yarn", "factor": 2.0})],
        "{d}/model/config.json: rope_scaling type 'yarn' is not supported",
    ),
    Case(
        "config-is-a-list",
        lambda d, i: ["info", file(copy(i.model, d, "model"), "config.json", "[1]").parent],
        "{d}/model/config.json: expected a JSON object, got list",
    ),
    Case(
        "config-json-fifo",
        lambda d, i: ["info", fifo_in_model(d, i, "config.json")],
        "{d}/model/config.json: not a regular file (a FIFO)",
    ),
    Case(
        "model-dev-null",
        lambda d, i: ["info", "/dev/null"],
        "/dev/null: not a regular file (a character device)",
    ),
    # safetensors
    Case("safetensors-overlap", spoiled_model(overlap), "{d}/model/model.safetensors: tensor "),
    Case(
        "safetensors-float-offsets",
        spoiled_model(
            lambda h: h["model.norm.weight"].update(
                data_offsets=[float(x) for x in h["model.norm.weight"]["data_offsets"]]
            )
        ),
        "{d}/model/model.safetensors: tensor 'model.norm.weight' has a malformed",
    ),
    Case(
        "safetensors-float-shape",
        spoiled_model(lambda h: h["model.norm.weight"].update(shape=[64.0])),
        "{d}/model/model.safetensors: tensor 'model.norm.weight' has a malformed",
    ),
    Case(
        "safetensors-trailing-bytes",
        spoiled_model(lambda h: b"\0" * 16),
        "{d}/model/model.safetensors: 16 bytes after the last tensor belong to none",
    ),
    Case(
        "safetensors-dtype-size",
        spoiled_model(lambda h: h["model.norm.weight"].update(dtype="F16")),
        "{d}/model/model.safetensors: tensor 'model.norm.weight': 256 bytes do not",
    ),
    Case(
        "index-parent-dir",
        lambda d, i: outside_shard(d, i, relative=True),
        "{d}/model/model.safetensors.index.json: shard '../elsewhere.safetensors' lies outside",
    ),
    Case(
        "index-absolute",
        lambda d, i: outside_shard(d, i, relative=False),
        "{d}/model/model.safetensors.index.json: shard '{d}/elsewhere.safetensors' lies outside",
    ),
    Case(
        "index-symlink-out",
        linked_shard,
        "{d}/model/model.safetensors.index.json: shard 'shard.safetensors' links outside",
    ),
    Case(
        "tensor-in-two-shards",
        lambda d, i: [
            "info",
            copy(
                i.model / "model.safetensors", copy(i.model, d, "model"), "more.safetensors"
            ).parent,
        ],
        "{d}/model: tensor 'model.embed_tokens.weight' is stored twice",
    ),
    Case(
        "weights-nan",
        nan_weight,
        "{d}/model/model.safetensors: tensor 'model.norm.weight' "
        "holds 1 NaN and 0 Inf values (first at index (3,))",
    ),
    Case(
        "quant-map-inf",
        nan_quant_map,
        "{d}/nf4/model.safetensors: model.layers.0.mlp.up_proj.weight: quant_map holds",
    ),
    Case(
        "gguf-extra-layer",
        gguf_with_extra_layer,
        "{d}/m.gguf: llama.block_count is 1, but the file holds 'blk.1.",
    ),
    # adapters
    Case(
        "adapter-config-list",
        adapter_config_is("[1]"),
        "{d}/adapter/adapter_config.json: expected a JSON object, got list",
    ),
    Case(
        "adapter-dora",
        adapter_with(use_dora=True),
        f"{{d}}/adapter/adapter_model.safetensors: {MODULE.removeprefix('base_model.model.')} "
        "lacks its lora_magnitude_vector (use_dora is true in adapter_config.json)",
    ),
    Case(
        "adapter-fan-in-fan-out",
        adapter_with(fan_in_fan_out=True),
        "{d}/adapter/adapter_config.json: fan_in_fan_out: True",
    ),
    Case(
        "adapter-alpha-infinity",
        adapter_config_is(
            '{"peft_type": "LORA", "r": 2, "lora_alpha": Infinity, "target_modules": ["q_proj"]}'
        ),
        "{d}/adapter/adapter_config.json: lora_alpha must be a finite number, got inf",
    ),
    Case(
        "adapter-integer-tensor",
        integer_adapter,
        f"{{d}}/adapter/adapter_model.safetensors: tensor '{MODULE}.lora_A.weight' is int32",
    ),
    Case("adapter-fifo", fifo_adapter, "{d}/adapter/adapter_config.json: not a regular file"),
    # checkpoints
    Case(
        "latest-is-a-list",
        run_with(latest='["step-000002"]'),
        "{d}/run/checkpoints/latest.json: expected a JSON object",
    ),
    Case(
        "latest-leaves-the-run",
        run_with(latest='{"checkpoint": "../../model"}'),
        "{d}/run/checkpoints/latest.json: field 'checkpoint' must name a checkpoint beside it",
    ),
    Case(
        "step-beyond-the-run",
        run_with(step=99),
        "{d}/run/checkpoints/step-000002/trainer_state.json: step 99 is beyond the run's 4 steps",
    ),
    Case(
        "state-bad-config",
        run_with(config={"config_version": 1, "lora_r": "x"}),
        "{d}/run/checkpoints/step-000002/trainer_state.json: config: lora_r must be an integer",
    ),
    Case(
        "state-is-a-list",
        state_is("[]"),
        "{d}/run/checkpoints/step-000002/trainer_state.json: expected a JSON object, got list",
    ),
    # flags and arguments
    Case(
        "temperature-nan",
        lambda d, i: ["generate", "hi", "--temperature", "nan"],
        "Invalid value for '--temperature': nan is not a finite number",
    ),
    Case(
        "top-p-zero", lambda d, i: ["generate", "hi", "--top-p", "0"], "Invalid value for '--top-p'"
    ),
    Case(
        "seed-too-big",
        lambda d, i: ["generate", "hi", "--seed", str(2**64)],
        "Invalid value for '--seed'",
    ),
    Case(
        "max-examples-negative",
        lambda d, i: ["eval", i.data, "--max-examples", "-1"],
        "Invalid value for '--max-examples'",
    ),
    Case(
        "seq-len-zero",
        lambda d, i: ["info", i.model, "--seq-len", "0"],
        "Invalid value for '--seq-len'",
    ),
    Case(
        "steps-not-a-number",
        lambda d, i: ["finetune", "--steps", "abc", "--out", d / "out"],
        "Invalid value for '--steps'",
    ),
    Case(
        "prompt-not-utf8",
        lambda d, i: ["generate", b"hi \xff", "--model", i.model],
        "Invalid value for PROMPT: not valid UTF-8 text",
    ),
    Case("unknown-command", lambda d, i: ["fintune"], "No such command 'fintune'"),
    Case(
        "quantize-into-a-file",
        lambda d, i: ["quantize", i.model, file(d, "out", "keep me")],
        "{d}/out: exists and is not an empty directory",
    ),
    Case(
        "export-gguf-into-a-directory",
        lambda d, i: [
            "export",
            i.model,
            copy(i.adapter, d, "out"),
            "--format",
            "gguf",
        ],
        "{d}/out: is a directory; the GGUF export writes one file",
    ),
    Case(
        "export-hf-q8_0",
        lambda d, i: ["export", i.model, d / "out", "--dtype", "q8_0"],
        "dtype 'q8_0' cannot be written as format hf (q8_0 is a GGUF type: use --format gguf)",
    ),
    Case(
        "export-over-a-file",
        lambda d, i: ["export", i.model, file(d, "out", "keep me"), "--format", "gguf"],
        "{d}/out: the output file exists; pass --overwrite",
    ),
    Case(
        "merge-gguf-over-a-file",
        lambda d, i: [
            "merge",
            i.adapter,
            file(d, "out", "keep"),
            "--model",
            i.model,
            "--format",
            "gguf",
        ],
        "{d}/out: the output exists (merge writes a new OUT only)",
    ),
    Case(
        "merge-gguf-nf4",
        lambda d, i: [
            "merge",
            i.adapter,
            d / "out",
            "--model",
            i.model,
            "--format",
            "gguf",
            "--nf4",
        ],
        "--nf4 writes a bitsandbytes directory, not a GGUF file",
    ),
    # chat templates
    Case(
        "template-include",
        template("{% include 'other.jinja' %}"),
        "{d}/model/tokenizer_config.json (chat_template): chat template line 1: {% include %} is "
        "not supported",
    ),
    Case(
        "template-recursion",
        template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
        "{d}/model/tokenizer_config.json (chat_template): chat template nests calls more than",
    ),
]


def fifo_in_model(d: Path, i: Inputs, name: str) -> Path:
    model = copy(i.model, d, "model")
    (model / name).unlink()
    fifo(model, name)
    return model


# -- running the cases ----------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (symlinks not followed) with its kind and content hash. Cases run
    side by side, so another case's temporary files may vanish during the walk: they are skipped
    (a case's own directory is still, its command having ended)."""
    seen = {}
    for top, dirs, files in os.walk(root):  # os.walk skips directories that vanish
        for name in dirs + files:
            path = Path(top, name)
            rel = str(path.relative_to(root))
            try:
                if path.is_symlink():
                    seen[rel] = f"link {os.readlink(path)}"
                elif path.is_fifo():
                    seen[rel] = "fifo"
                elif path.is_dir():
                    seen[rel] = "dir"
                else:
                    seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                continue
    return dict(sorted(seen.items()))


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stderr: str
    changed_outside_out: list[str]


def run_case(case: Case, root: Path, inputs: Inputs) -> Outcome:
    d = root / case.id
    d.mkdir()
    argv = [a if isinstance(a, bytes) else str(a) for a in case.setup(d, inputs)]
    before = snapshot(root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NF4_BACKEND": "torch"}
    env.pop("NF4_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *argv],
        cwd=d,
        env=env,
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    after = snapshot(root)
    out = f"{case.id}/out"
    created_in_out = {p for p in set(after) - set(before) if p == out or p.startswith(out + "/")}
    changed = sorted(
        p
        for p in set(before) | set(after)
        if before.get(p) != after.get(p) and p not in created_in_out
    )
    return Outcome(proc.returncode, proc.stderr.decode("utf-8", "replace"), changed)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    pytest.importorskip("torch")
    base = tmp_path_factory.mktemp("inputs")
    model = tiny_model_dir(base / "model")
    data = write_jsonl(base / "train.jsonl", chat_records(4))
    source = nf4core.open_model(model)
    adapters = {
        f"{MODULE}.lora_A.weight": np.full((2, 64), 0.01, np.float32),
        f"{MODULE}.lora_B.weight": np.zeros((64, 2), np.float32),
    }
    assert source.tensor_shape("model.layers.0.self_attn.q_proj.weight") == (64, 64)
    adapter = save_adapter(base / "adapter", Adapter(adapters, 2, 4.0, 0.0, ("q_proj",)))
    run = save_adapter(base / "run", Adapter(adapters, 2, 4.0, 0.0, ("q_proj",)))
    moments = {
        f"{k}.{m}": np.zeros_like(v) for k, v in adapters.items() for m in ("exp_avg", "exp_avg_sq")
    }
    config = (
        FinetuneConfig(
            model=str(model),
            data=str(data),
            steps=4,
            lora_r=2,
            lora_alpha=4.0,
            targets=("q_proj",),
            out=str(run),
        )
        .resolve(None)
        .to_dict()
    )
    save_checkpoint(
        run / "checkpoints",
        TrainingState(adapters, moments, 2),
        config,
        {"micro_batches": 2},
        "torch",
    )
    return Inputs(model, data, adapter, run)


@pytest.fixture(scope="module")
def outcomes(inputs, tmp_path_factory) -> tuple[Path, dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("cases")
    inputs_before = snapshot(inputs.model.parent)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = {c.id: pool.submit(run_case, c, root, inputs) for c in CASES}
        results = {name: f.result() for name, f in futures.items()}
    assert snapshot(inputs.model.parent) == inputs_before, "a case changed the shared inputs"
    return root, {name: _only_own_changes(name, r) for name, r in results.items()}


def _only_own_changes(name: str, outcome: Outcome) -> Outcome:
    """Cases run side by side: a change in another case's directory is that case's, not this one's
    (each case's snapshot sees the whole root)."""
    own = [p for p in outcome.changed_outside_out if p == name or p.startswith(name + "/")]
    return Outcome(outcome.returncode, outcome.stderr, own)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_naming_the_problem(case, outcomes):
    root, results = outcomes
    outcome = results[case.id]
    lines = outcome.stderr.strip().splitlines()
    assert outcome.returncode not in (0, None), outcome.stderr
    assert len(lines) == 1 and "Traceback" not in outcome.stderr, outcome.stderr
    expected = case.expect.replace("{d}", str(root / case.id))
    assert lines[0].startswith("Error: ") and expected in lines[0], (expected, lines[0])
    assert not outcome.changed_outside_out, outcome.changed_outside_out


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("1: 3\n")
    base = [sys.executable, str(REPO / "cli.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NF4_DEBUG", None)
    for argv, extra in (
        (["--debug", "finetune", "--config", str(bad)], {}),
        (["finetune", "--config", str(bad)], {"NF4_DEBUG": "1"}),
    ):
        proc = subprocess.run(
            base + argv,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode != 0
        assert "Traceback" in proc.stderr and "setting names must be strings" in proc.stderr
