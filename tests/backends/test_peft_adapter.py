"""The oracle: the adapter `finetune` writes loads with peft onto the transformers model of the same
(NF4-dequantized) base weights, and its logits equal ours. Also: merge folds it in exactly."""

import json

import numpy as np
import pytest

import nf4core
from backends import api
from backends.finetune import finetune
from backends.finetune_config import FinetuneConfig
from backends.merge import merged_tensors
from backends.peft_adapter import load_adapter
from nf4core.model_quantize import DEFAULT_QUANT_METHOD
from tests.backends.finetune_fixtures import tiny_setup

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peft")
    model, data = tiny_setup(tmp)
    out = tmp / "run"
    finetune(
        FinetuneConfig(
            model=str(model),
            data=str(data),
            out=str(out),
            steps=4,
            batch_size=4,
            max_seq_len=64,
            lr=2e-2,
            backend="torch",
            lora_r=4,
            lora_alpha=8,
            targets=("q_proj", "v_proj", "down_proj"),
        ),
        echo=lambda s: None,
        progress=False,
    )
    return model, out


def hf_model_of_nf4_base(model_dir):
    source = nf4core.open_model(model_dir)
    hf_cfg = transformers.AutoConfig.for_model(**source.config.to_hf_config())
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    state = {}
    for name in source.tensor_names():
        w = np.array(source.read(name), np.float32)
        if name.endswith("proj.weight"):  # the base we trained on: NF4, dequantized
            w = nf4core.dequantize(nf4core.quantize(w, method=DEFAULT_QUANT_METHOD), np.float32)
        state[name] = torch.from_numpy(w)
    hf.load_state_dict(state, strict=True)
    return hf


def test_peft_loads_our_adapter_and_its_logits_equal_ours(trained):
    model_dir, out = trained
    adapter = load_adapter(out)
    assert any(np.abs(v).max() > 0 for k, v in adapter.tensors.items() if "lora_B" in k)
    hf = peft.PeftModel.from_pretrained(hf_model_of_nf4_base(model_dir), str(out)).eval()
    ours = api.load(model_dir, adapter=out, backend="torch")
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        want = hf(ids).logits
        got = ours.engine.model(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"] and cfg["r"] == 4


def test_merge_folds_the_adapter_into_the_nf4_base(trained, tmp_path):
    model_dir, out = trained
    adapter = load_adapter(out)
    merged = dict(merged_tensors(nf4core.open_model(model_dir), adapter, "float32"))
    hf = peft.PeftModel.from_pretrained(
        hf_model_of_nf4_base(model_dir), str(out)
    ).merge_and_unload()
    for name, value in hf.state_dict().items():
        np.testing.assert_allclose(merged[name], value.numpy(), atol=1e-6, rtol=1e-6)
    path = api.merge_adapter(model_dir, out, tmp_path / "merged", dtype="float32")
    source = nf4core.open_model(path)
    np.testing.assert_array_equal(
        source.read("model.layers.0.self_attn.q_proj.weight"),
        merged["model.layers.0.self_attn.q_proj.weight"],
    )
