"""`merge` streams: the merged directory equals the in-memory fold tensor for tensor (16-bit and NF4
again), its peak memory does not grow with the model, and a failure leaves nothing behind. Broken
adapters, and adapters for another model, are refused with one line naming the file."""

from __future__ import annotations

import json
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import nf4core
from backends import api, hf_dir_writer
from backends.merge import merge, merged_tensors
from backends.peft_adapter import PEFT_PREFIX, Adapter, AdapterError, load_adapter, save_adapter
from nf4core.model_quantize import DEFAULT_QUANT_METHOD
from tests.nf4core.tiny_models import hf_config, random_weights, tiny_tokenizer, write_hf_dir

TARGETS = ("q_proj", "v_proj", "down_proj")


def _model(directory, layers: int):
    config = hf_config(
        "llama",
        vocab=300,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    weights = random_weights(config, dtype=ml_dtypes.bfloat16, seed=1)
    return write_hf_dir(directory, config, weights, tiny_tokenizer())


def _adapter(source: nf4core.ModelSource) -> Adapter:
    rng = np.random.default_rng(2)
    tensors = {}
    for name in source.tensor_names():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = source.tensor_shape(name)
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = rng.standard_normal((4, in_f)).astype(
                np.float32
            )
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = rng.standard_normal(
                (out_f, 4)
            ).astype(np.float32)
    return Adapter(tensors, 4, 8.0, 0.0, TARGETS)


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    model = _model(tmp_path_factory.mktemp("merge") / "model", layers=6)
    source = nf4core.open_model(model)
    return model, _adapter(source), {n: source.tensor_shape(n) for n in source.tensor_names()}


def test_sixteen_bit_merge_equals_the_fold(model_and_adapter, tmp_path):
    model, adapter, _ = model_and_adapter
    want = dict(merged_tensors(nf4core.open_model(model), adapter, "bfloat16"))
    got = nf4core.open_model(merge(model, adapter, tmp_path / "m", dtype="bfloat16"))
    assert set(got.tensor_names()) == set(want)
    for name, value in want.items():
        assert np.array_equal(np.asarray(got.read(name)).view(np.uint16), value.view(np.uint16)), (
            name
        )
    q = want["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    plain = np.asarray(
        nf4core.open_model(model).read("model.layers.0.self_attn.q_proj.weight"), np.float32
    )
    assert np.abs(q - plain).max() > 1.0  # the adapter really changed the weight


def test_nf4_merge_requantizes_the_fold(model_and_adapter, tmp_path):
    """As if the merged model were saved in the base's 16-bit dtype and quantized like any model."""
    model, adapter, _ = model_and_adapter
    want = dict(merged_tensors(nf4core.open_model(model), adapter, "bfloat16"))
    got = nf4core.open_model(merge(model, adapter, tmp_path / "m", requantize=True))
    for name, value in want.items():
        stored = got.read(name)
        if isinstance(stored, nf4core.NF4Tensor):
            expect = nf4core.quantize(value, method=DEFAULT_QUANT_METHOD)
            assert np.array_equal(stored.packed, expect.packed), name
            assert np.array_equal(nf4core.dequantize(stored), nf4core.dequantize(expect)), name
        else:
            assert np.array_equal(np.asarray(stored).view(np.uint16), value.view(np.uint16)), name
    assert isinstance(got.read("model.layers.5.mlp.down_proj.weight"), nf4core.NF4Tensor)


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("requantize", [False, True])
def test_merge_memory_does_not_grow_with_the_model(model_and_adapter, tmp_path, requantize):
    """Peak traced memory for a 6-layer and a 24-layer model of the same width: it grows by less than
    a tenth of what the 18 added layers weigh in float32 (what grows is per-tensor bookkeeping)."""
    small, adapter, _ = model_and_adapter
    large = _model(tmp_path / "large", layers=24)
    source = nf4core.open_model(large)
    added = sum(
        int(np.prod(source.tensor_shape(n))) * 4
        for n in source.tensor_names()
        if n.startswith("model.layers.") and int(n.split(".")[2]) >= 6
    )
    peaks = [
        _peak_bytes(lambda: merge(m, a, tmp_path / f"out{i}", requantize=requantize))
        for i, (m, a) in enumerate([(small, adapter), (large, _adapter(source))])
    ]
    assert peaks[1] - peaks[0] < added / 10, (peaks, added)


def test_a_failed_merge_leaves_no_directory(model_and_adapter, tmp_path, monkeypatch):
    model, adapter, _ = model_and_adapter
    calls = []

    def fail_late(self, name, array):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full")
        real_add(self, name, array)

    real_add = hf_dir_writer.SafetensorsWriter.add
    monkeypatch.setattr(hf_dir_writer.SafetensorsWriter, "add", fail_late)
    with pytest.raises(OSError, match="disk full"):
        merge(model, adapter, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def _saved(tmp_path, adapter: Adapter, edit=None):
    directory = save_adapter(tmp_path / "adapter", adapter)
    if edit:
        edit(directory)
    return directory


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: _rewrite_config(d, r=2), "do not match r = 2"),
        (lambda d: _drop_tensor(d, "lora_B"), "lacks its lora_B.weight"),
        (lambda d: _poison(d), "NaN or infinite"),
    ],
)
def test_broken_adapters_are_refused_naming_the_file(model_and_adapter, tmp_path, edit, message):
    _, adapter, _ = model_and_adapter
    directory = _saved(tmp_path, adapter, edit)
    with pytest.raises(AdapterError, match=message) as e:
        load_adapter(directory)
    assert str(directory / "adapter_model.safetensors") in str(e.value)


def test_an_adapter_for_another_model_is_refused_before_anything_is_written(
    model_and_adapter, tmp_path
):
    model, _, _ = model_and_adapter
    other = _model(tmp_path / "other", layers=2)
    wide = _adapter(nf4core.open_model(_wider_model(tmp_path / "wide")))
    for adapter_of, expect in (
        (_adapter(nf4core.open_model(model)), "the model has no model.layers.2"),
        (wide, "down_proj is \\[128, 512\\] in the model but \\[256, 512\\]"),
    ):
        directory = save_adapter(tmp_path / f"a{len(expect)}", adapter_of)
        with pytest.raises(AdapterError, match=expect) as e:
            api.merge_adapter(other, directory, tmp_path / "merged")
        assert str(directory) in str(e.value)
        assert not (tmp_path / "merged").exists()
        with pytest.raises(AdapterError, match=expect):
            api.load(
                other, adapter=directory, backend="mlx", device="cpu"
            )  # before building a model


def _wider_model(directory):
    config = hf_config(
        "llama",
        vocab=300,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    return write_hf_dir(directory, config, random_weights(config, seed=3), tiny_tokenizer())


def _rewrite_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _drop_tensor(directory, which):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    del tensors[next(k for k in sorted(tensors) if f".{which}." in k)]
    save_file(tensors, str(path))


def _poison(directory):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[sorted(tensors)[0]][0, 0] = np.nan
    save_file(tensors, str(path))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_the_merged_model_computes_what_the_adapted_one_does(tmp_path, backend):
    """The one merge (this module's) against each backend's forward with the adapters attached."""
    pytest.importorskip("torch" if backend == "torch" else "mlx.core")
    from backends.engine import BaseWeights, LoRASettings
    from backends.registry import build_engine, select_backend

    model = _model(tmp_path / "model", layers=2)
    source = nf4core.open_model(model)
    adapter = _adapter(source)
    adapter = Adapter(
        {k: v * 0.05 for k, v in adapter.tensors.items()}, 4, 8.0, 0.0, adapter.targets
    )
    merged = merge(model, adapter, tmp_path / "merged", dtype="float32")
    choice = select_backend(backend, "cpu", "float32")
    settings = LoRASettings(adapter.r, adapter.alpha, 0.0, adapter.targets)
    adapted = build_engine(choice, source, settings, None)  # NF4 base + adapters
    adapted.load_adapters(adapter.tensors)
    # the fold W_nf4 + scale * B @ A, kept dense
    folded = build_engine(
        choice, nf4core.open_model(merged), None, None, base=BaseWeights("float32")
    )
    ids = np.random.default_rng(3).integers(0, 300, size=(2, 12)).astype(np.int32)
    ones = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(12, dtype=np.int32), ids.shape).copy()
    batch = nf4core.Batch(ids, ones.astype(bool), ones.astype(bool), positions, ones)
    (want, n), (got, m) = adapted.eval_loss([batch]), folded.eval_loss([batch])
    plain = build_engine(choice, source, None, None).eval_loss([batch])[0]
    assert n == m and abs(want - plain) > 1e-2 * abs(plain)  # the adapters change the loss
    assert got == pytest.approx(want, rel=1e-5)
