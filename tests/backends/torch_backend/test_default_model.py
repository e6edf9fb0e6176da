"""The embedded SmolLM2-135M-Instruct (GGUF Q4_1) on the torch backend: quantized to NF4 on load,
logits equal transformers on the same dequantized weights, it answers a chat prompt, and a few QLoRA
steps lower the loss on a fixed example. Skipped when the model package is not installed."""

import numpy as np
import pytest
import torch

import nf4core
from backends.engine import LoRASettings
from backends.torch_backend.generate import SamplingConfig, generate
from backends.torch_backend.lora import apply_lora
from backends.torch_backend.model import CausalLM
from backends.torch_backend.nf4_linear import NF4Linear
from backends.torch_backend.train_step import Batch, TrainConfig, Trainer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def loaded():
    try:
        source = nf4core.open_model(nf4core.default_model_path())
    except (FileNotFoundError, nf4core.DefaultModelMissing) as exc:
        pytest.skip(str(exc))
    return source, CausalLM.from_source(source)


def test_logits_match_transformers(loaded):
    source, ours = loaded
    hf_cfg = transformers.AutoConfig.for_model(**source.config.to_hf_config())
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    state = {
        n: torch.from_numpy(np.array(source.read(n), dtype=np.float32))
        for n in source.tensor_names()
        if "layers" not in n or "norm" in n
    }
    state.update(
        {f"{n}.weight": m.dequantize() for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    )
    hf.load_state_dict(state, strict=False)
    if source.config.tie_word_embeddings:
        hf.tie_weights()
    ids = torch.tensor([source.tokenizer().encode("The capital of France is")])
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3), (got - want).abs().max()


def test_chat_answer_and_short_training(loaded):
    source, ours = loaded
    tok = source.tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = tok.encode(prompt)
    eos = tuple(i for i in (tok.eos_token_id, tok.token_id("<|im_end|>")) if i is not None)
    answer = tok.decode(generate(ours, ids, SamplingConfig(max_new_tokens=12, eos_token_ids=eos)))
    assert "Paris" in answer, answer
    apply_lora(ours, LoRASettings(r=8, alpha=16, targets=("q_proj", "v_proj")))
    trainer = Trainer(ours, TrainConfig())
    text = torch.tensor([tok.encode("The answer to everything is forty-two, said the computer.")])
    losses = [trainer.train_step([Batch(text)], 2e-3).loss for _ in range(4)]
    assert losses[-1] < losses[0], losses


def test_fast_decode_gives_the_previous_paths_greedy_tokens(loaded, monkeypatch):
    """The fast decode path, the GEMV kernel through the modules and the previous default (the
    kernel off: dequantized weights) pick the same 48 greedy tokens (bench/decode_vs_transformers.py
    checks 128)."""
    from backends.torch_backend import dequant_cache, fast_decode

    source, _ = loaded
    model = CausalLM.from_source(source)  # without the adapters another test adds to the shared one
    ids = source.tokenizer().encode("Write a short story about a robot who learns to paint.")
    sampling = SamplingConfig(max_new_tokens=48)
    made = []
    real = fast_decode.decoder_for
    monkeypatch.setattr(fast_decode, "decoder_for", lambda *a: made.append(real(*a)) or made[-1])
    fast = generate(model, ids, sampling)
    assert made and made[-1] is not None
    assert {type(layer) for layer in made[-1].layers} == {fast_decode._FusedLayer}
    monkeypatch.setenv("NF4_QLORA_FAST_DECODE", "0")
    assert generate(model, ids, sampling) == fast
    monkeypatch.setattr(dequant_cache, "gemv_covers", lambda x: False)
    assert generate(model, ids, sampling) == fast
