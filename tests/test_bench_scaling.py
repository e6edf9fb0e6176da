"""bench/scaling.py: its byte counts match the tensors a built model really holds, and --quick runs
(no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import nf4core  # noqa: E402
from backends.torch_backend.model import CausalLM  # noqa: E402
from backends.torch_backend.nf4_linear import NF4Linear  # noqa: E402
from bench import scaling_counts as counts  # noqa: E402
from bench.random_llama import random_llama_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _model(double_quant: bool, blocksize: int) -> CausalLM:
    # 200 x 96 = 300 blocks of 64: more than one nested block of 256, and a partial one
    cfg = nf4core.ModelConfig(
        "llama",
        vocab_size=160,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    state = random_llama_state(cfg)
    return CausalLM.from_state(cfg, state, blocksize=blocksize, double_quant=double_quant)


@pytest.mark.parametrize("double_quant,blocksize", [(True, 64), (False, 64), (True, 128)])
def test_decode_bytes_match_the_models_tensors(double_quant, blocksize):
    model = _model(double_quant, blocksize)
    layer = model.model.layers[0]
    linears = [m for m in layer.modules() if isinstance(m, NF4Linear)]
    assert len(linears) == 7
    assert sorted(counts.linear_shapes(model.config)) == sorted(
        tuple(m.weight.shape) for m in linears
    )
    nf4 = sum(m.weight.nbytes for m in linears)
    assert counts.layer_weight_bytes(model.config, "nf4", blocksize, double_quant) == nf4
    dense = sum(4 * m.weight.numel for m in linears)
    assert counts.layer_weight_bytes(model.config, "fp32", blocksize, double_quant) == dense
    head = model.lm_head.weight
    row = model.model.embed_tokens.weight[0]
    assert counts.fixed_decode_bytes(model.config) == (
        head.numel() * head.element_size() + row.numel() * row.element_size()
    )


def test_unknown_weight_format_is_refused():
    with pytest.raises(ValueError, match="weights must be 'nf4' or 'fp32'"):
        counts.layer_weight_bytes(_model(True, 64).config, "int8")


def test_quick_run_prints_both_tables():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scaling.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Training step:" in out and "Decoding:" in out and "What bounds what" in out
    rows = [line for line in out.splitlines() if line.startswith("| small, modelled | 16 |")]
    assert len(rows) == 2, out
