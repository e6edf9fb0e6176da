"""A directory quantized with method="mse" is an ordinary bitsandbytes-4bit directory:
transformers + bitsandbytes load it to the logits our model computes from it."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

import nf4core
from backends.torch_backend.model import CausalLM
from tests.nf4core.test_transformers_oracle import _save_tiny


def _logits(directory, ids):
    ours = CausalLM.from_source(nf4core.open_model(directory), compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        directory, device_map="cpu", attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return ours(ids).float(), hf(ids).logits.float()


@pytest.mark.filterwarnings("ignore:no tokenizer saved")
@pytest.mark.parametrize("double_quant", [False, True])
def test_transformers_loads_an_mse_directory_to_our_logits(tmp_path, double_quant):
    _save_tiny(tmp_path / "hf", "llama")  # rows of whole blocks: bitsandbytes' CPU path needs them
    hf_dir = tmp_path / "hf"
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for method in ("absmax", "mse"):
        out = nf4core.quantize_model(
            hf_dir, tmp_path / method, double_quant=double_quant, method=method
        )
        logits[method] = _logits(out, ids)
    ours, theirs = logits["mse"]
    gap = (ours - theirs).abs().max().item()
    # transformers computes in the directory's dtype; the methods' logits differ far more than that
    assert gap < 0.01 * ours.abs().max().item(), gap
    assert (logits["mse"][0] - logits["absmax"][0]).abs().max().item() > 5 * gap
