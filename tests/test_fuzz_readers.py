"""Fuzzing of every reader of user files (hypothesis, bounded): whatever the bytes, the reader
either succeeds or raises our own error type with a one-line message, never anything else.

Readers: the safetensors header reader, the GGUF reader (metadata, tensors, tokenizer), the
bitsandbytes quant-state parser, the training-checkpoint loader and the adapter loader.
60 examples each by default; FUZZ_EXAMPLES=1000 for a longer search.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nf4core
from backends.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from backends.engine import TrainingState
from backends.finetune_config import FinetuneConfig
from backends.peft_adapter import PEFT_PREFIX, Adapter, AdapterError, load_adapter, save_adapter
from nf4core import ModelLoadError, NF4FormatError
from nf4core.sources.safetensors_io import DTYPES, SafetensorsFile
from nf4core.state_dict import nf4_from_state_dict
from tests.nf4core.tiny_models import hf_config, random_weights, tiny_tokenizer, write_gguf

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """`data` with a few bytes overwritten, cut short, or with bytes inserted."""

    @st.composite
    def build(draw) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["set", "cut", "insert", "word"]))
            at = draw(st.integers(0, max(0, len(out) - 1)))
            if kind == "set" and out:
                out[at] = draw(st.integers(0, 255))
            elif kind == "cut":
                del out[at:]
            elif kind == "insert":
                out[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "word" and len(out) >= at + 8:  # a length or an offset gone wrong
                out[at : at + 8] = struct.pack(
                    "<Q",
                    draw(st.sampled_from([0, 1, 7, 255, 2**31, 2**32 + 1, 2**63 - 1, 2**64 - 1])),
                )
        return bytes(out)

    return build()


def assert_one_line(error: Exception) -> None:
    assert "\n" not in str(error), str(error)


# -- safetensors ----------------------------------------------------------------------------------

entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPES, "F8_E4M3", 3]) | json_values,
        "shape": st.lists(st.integers(0, 5), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(0, 80), min_size=2, max_size=2) | json_values,
    }
)
headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=4)


@st.composite
def safetensors_bytes(draw) -> bytes:
    header = draw(headers)
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    raw = json.dumps(header).encode()
    length = draw(st.sampled_from([len(raw), len(raw) + 1, len(raw) - 1, 2**64 - 1]))
    return struct.pack("<Q", max(0, length)) + raw + draw(st.binary(max_size=80))


@FUZZ
@given(data=safetensors_bytes() | st.binary(max_size=64))
def test_safetensors_header_reader(tmp_path, data):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    try:
        file = SafetensorsFile(path)
        for name in file.names():
            np.asarray(file.read(name)).sum()
    except ModelLoadError as e:
        assert_one_line(e)


def test_safetensors_reader_takes_what_the_reference_writer_writes(tmp_path):
    from safetensors.numpy import save_file

    tensors = {
        "b": np.arange(6, dtype=np.float16).reshape(2, 3),
        "a": np.ones(0, np.float32),
        "c": np.arange(5, dtype=np.int64),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    file = SafetensorsFile(tmp_path / "x.safetensors")
    for name, value in tensors.items():
        assert np.array_equal(file.read(name), value)


# -- GGUF -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    config = hf_config("llama", vocab=300)
    path = write_gguf(
        tmp_path_factory.mktemp("gguf") / "m.gguf",
        config,
        random_weights(config),
        qtype="Q8_0",
        tokenizer=tiny_tokenizer(),
    )
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_gguf_reader(tmp_path, gguf_bytes, data):
    # most of the file is tensor data: aim the mutations at the header and metadata
    head = data.draw(mutated(gguf_bytes[:4096]))
    path = tmp_path / "m.gguf"
    path.write_bytes(head + gguf_bytes[4096:])
    try:
        source = nf4core.open_model(path)
        source.tokenizer()
        for name in source.tensor_names()[:3]:
            source.read(name)
    except ModelLoadError as e:
        assert_one_line(e)


# -- bitsandbytes quant state ---------------------------------------------------------------------

quant_states = st.fixed_dictionaries(
    {
        "quant_type": st.sampled_from(["nf4", "fp4"]) | json_values,
        "blocksize": st.sampled_from([64, 32, 0, -1, 64.0]) | json_values,
        "dtype": st.sampled_from(["bfloat16", "float32", "int8"]) | json_values,
        "shape": st.lists(st.integers(-2, 40), max_size=3) | json_values,
    },
    optional={
        "nested_blocksize": st.sampled_from([256, 3]) | json_values,
        "nested_dtype": st.sampled_from(["float32", "float16"]) | json_values,
        "nested_offset": st.floats() | st.integers(-(2**1100), 2**1100) | json_values,
    },
)


def _filled(dtype: type, n: int, fill: float) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.full(n, fill).astype(dtype)


small_arrays = st.builds(
    _filled,
    st.sampled_from([np.uint8, np.float32, np.float16, np.int64]),
    st.integers(0, 300),
    st.sampled_from([0, 1, 7, 255, np.nan, np.inf, -3.5]),
)


@FUZZ
@given(
    state=quant_states | json_values,
    raw=st.none() | st.binary(max_size=40),
    parts=st.dictionaries(
        st.sampled_from(["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"]),
        small_arrays,
    ),
)
def test_quant_state_parser(state, raw, parts):
    blob = raw if raw is not None else json.dumps(state).encode()
    state_dict = {f"m.weight{k}": v for k, v in parts.items()}
    state_dict["m.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(blob, np.uint8)
    try:
        t = nf4_from_state_dict(state_dict, "m")
        nf4core.dequantize(t)
    except NF4FormatError as e:
        assert_one_line(e)


# -- training checkpoints -------------------------------------------------------------------------

KEY = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj"


def tiny_adapters() -> dict[str, np.ndarray]:
    return {
        f"{KEY}.lora_A.weight": np.ones((2, 8), np.float32),
        f"{KEY}.lora_B.weight": np.zeros((8, 2), np.float32),
    }


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("ck") / "checkpoints"
    adapters = tiny_adapters()
    moments = {
        f"{k}.{m}": np.zeros_like(v) for k, v in adapters.items() for m in ("exp_avg", "exp_avg_sq")
    }
    config = FinetuneConfig(steps=4, lora_r=2).resolve(None).to_dict()
    path = save_checkpoint(
        root, TrainingState(adapters, moments, 2), config, {"micro_batches": 2}, "torch"
    )
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    files["latest.json"] = (root / "latest.json").read_bytes()
    load_checkpoint(root)  # the unmutated checkpoint loads
    return files


@FUZZ
@given(data=st.data())
def test_checkpoint_loader(tmp_path, checkpoint_files, data):
    files = dict(checkpoint_files)
    target = data.draw(st.sampled_from(sorted(files)))
    if target.endswith(".json") and data.draw(st.booleans()):
        value = json.loads(files[target])
        if isinstance(value, dict) and data.draw(st.booleans()):
            value[data.draw(st.sampled_from(sorted(value)))] = data.draw(json_values)
        else:
            value = data.draw(json_values)
        files[target] = json.dumps(value).encode()
    else:
        files[target] = data.draw(mutated(files[target]))
    root = tmp_path / "checkpoints"
    (root / "step-000002").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (root / name if name == "latest.json" else root / "step-000002" / name).write_bytes(content)
    try:
        load_checkpoint(root)
    except CheckpointError as e:
        assert_one_line(e)


# -- adapters -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(directory, Adapter(tiny_adapters(), 2, 4.0, 0.0, ("q_proj",)))
    load_adapter(directory)
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@FUZZ
@given(data=st.data())
def test_adapter_loader(tmp_path, adapter_files, data):
    files = dict(adapter_files)
    target = data.draw(st.sampled_from(sorted(files)))
    if target.endswith(".json"):
        value = json.loads(files[target])
        if data.draw(st.booleans()):
            value[data.draw(st.sampled_from(sorted(value) + ["use_dora", "fan_in_fan_out"]))] = (
                data.draw(json_values)
            )
        else:
            value = data.draw(json_values)
        files[target] = json.dumps(value).encode()
    else:
        files[target] = data.draw(mutated(files[target]))
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    try:
        load_adapter(tmp_path)
    except AdapterError as e:
        assert_one_line(e)


def test_fuzz_targets_reject_what_they_must(tmp_path):
    """The allowed outcome is 'success or our error': make sure the errors do happen."""
    path = tmp_path / "x.safetensors"
    header = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(ModelLoadError, match="'b': data_offsets \\[0, 4\\] overlaps tensor 'a'"):
        SafetensorsFile(path)
    with pytest.raises(NF4FormatError, match="not valid UTF-8 JSON"):
        nf4_from_state_dict(
            {"m.weight.quant_state.bitsandbytes__nf4": np.frombuffer(b"[" * 100000, np.uint8)}, "m"
        )
    assert Path(tmp_path).is_dir()
