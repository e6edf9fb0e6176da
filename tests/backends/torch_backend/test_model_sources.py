"""The torch model built from files through nf4core.open_model: a Hugging Face directory (checked
against transformers loading the same directory), a GGUF file and a bitsandbytes directory."""

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import nf4core
from backends.torch_backend.model import CausalLM
from backends.torch_backend.nf4_linear import NF4Linear
from tests.backends.torch_backend.conftest import bits
from tests.backends.torch_backend.test_model import load_dequantized_into
from tests.nf4core.tiny_models import hf_config, random_weights, write_gguf, write_hf_dir

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def scaled(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Random N(0, 1) weights scaled like a trained network, so logits stay finite and meaningful."""
    out = {
        k: (v * 0.1 + 1 if v.ndim == 1 and "norm" in k else v / np.sqrt(v.shape[-1]))
        for k, v in weights.items()
    }
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    config = hf_config("llama", rope_scaling=LLAMA3)
    return write_hf_dir(tmp_path_factory.mktemp("hf") / "m", config, scaled(random_weights(config)))


def test_hf_dir_logits_match_transformers(hf_dir):
    ours = CausalLM.from_source(nf4core.open_model(hf_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager"
    ).eval()
    load_dequantized_into(hf, ours)
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


def test_gguf_gives_the_same_model_as_the_hf_dir(tmp_path):
    config = hf_config("llama")
    weights = scaled(random_weights(config, seed=4))
    from_hf = CausalLM.from_source(
        nf4core.open_model(write_hf_dir(tmp_path / "hf", config, weights)), quantize=False
    )
    from_gguf = CausalLM.from_source(
        nf4core.open_model(write_gguf(tmp_path / "m.gguf", config, weights)), quantize=False
    )
    ids = torch.randint(0, config["vocab_size"], (1, 24))
    with torch.no_grad():
        assert torch.allclose(from_gguf(ids), from_hf(ids), atol=1e-5)


@pytest.mark.filterwarnings("ignore:no tokenizer saved")
def test_bnb_dir_loads_nf4_without_requantizing(hf_dir, tmp_path):
    bnb_dir = nf4core.quantize_model(hf_dir, tmp_path / "bnb", blocksize=128)
    source = nf4core.open_model(bnb_dir)
    model = CausalLM.from_source(source, blocksize=64)  # blocksize applies to dense weights only
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        stored = source.read(f"{name}.weight")
        assert isinstance(stored, nf4core.NF4Tensor) and layer.weight.blocksize == 128
        assert np.array_equal(layer.to_nf4().packed, stored.packed)
        assert np.array_equal(bits(layer.dequantize()), bits(nf4core.dequantize(stored)))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()
