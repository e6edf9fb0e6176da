"""`base_dtype`: plain LoRA on the unquantized base (a baseline for QLoRA) on both backends, and
`quant_method` of quantize-on-load: the forward equals transformers', training lowers the loss, a
resume keeps the base it was trained on."""

from __future__ import annotations

import numpy as np
import pytest

from backends.engine import BaseWeights, LoRASettings
from backends.finetune import finetune
from backends.finetune_config import ConfigError, FinetuneConfig
from backends.registry import build_engine, select_backend
from tests.backends.finetune_fixtures import tiny_setup

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import nf4core  # noqa: E402

BACKENDS = [
    "torch",
    pytest.param(
        "mlx",
        marks=pytest.mark.skipif(
            not __import__("importlib").util.find_spec("mlx"), reason="mlx not installed"
        ),
    ),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("base"))


def _logits(engine, ids: np.ndarray) -> np.ndarray:
    if engine.choice.backend == "torch":
        with torch.no_grad():
            return engine.model(torch.from_numpy(ids)).float().numpy()
    from backends.mlx_backend._mlx import mx

    return np.array(engine.model(mx.array(ids)).astype(mx.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float32_base_gives_transformers_logits(setup, backend):
    model_dir, _ = setup
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = np.random.default_rng(0).integers(0, 300, (2, 24))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    choice = select_backend(backend, "cpu", "float32")
    source = nf4core.open_model(model_dir)
    got = {
        dtype: _logits(
            build_engine(choice, source, LoRASettings(), None, 1e-4, BaseWeights(dtype)), ids
        )
        for dtype in ("float32", "nf4")
    }
    np.testing.assert_allclose(got["float32"], want, atol=2e-4, rtol=1e-4)
    assert np.abs(got["nf4"] - want).max() > 100 * np.abs(got["float32"] - want).max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base_dtype", ["bfloat16", "float32"])
def test_plain_lora_trains(setup, tmp_path, backend, base_dtype):
    model_dir, data = setup
    cfg = FinetuneConfig(
        model=str(model_dir),
        data=str(data),
        out=str(tmp_path),
        steps=8,
        batch_size=4,
        max_seq_len=64,
        lr=1e-2,
        backend=backend,
        device="cpu",
        compute_dtype="float32",
        base_dtype=base_dtype,
    )
    r = finetune(cfg, echo=lambda s: None, progress=False)
    assert r.config.base_dtype == base_dtype
    assert np.mean(r.losses[-2:]) < 0.8 * np.mean(r.losses[:2]), r.losses


def test_quant_method_chooses_the_scales_quantized_on_load(setup):
    model_dir, _ = setup
    choice = select_backend("torch", "cpu", "float32")
    source = nf4core.open_model(model_dir)
    name = "model.layers.0.mlp.down_proj"
    w = np.asarray(source.read(f"{name}.weight"), np.float32)
    for method in ("absmax", "mse"):
        engine = build_engine(choice, source, None, None, 1e-4, BaseWeights("nf4", method))
        stored = engine.model.get_submodule(name).to_nf4()
        assert np.array_equal(stored.packed, nf4core.quantize(w, 64, True, method).packed)


def test_a_resume_refuses_another_base(setup, tmp_path):
    model_dir, data = setup
    finetune(
        FinetuneConfig(
            model=str(model_dir),
            data=str(data),
            out=str(tmp_path / "a"),
            steps=2,
            batch_size=4,
            max_seq_len=64,
            backend="torch",
            base_dtype="bfloat16",
        ),
        echo=lambda s: None,
        progress=False,
    )
    with pytest.raises(ConfigError, match=r"--base-dtype nf4 \(checkpoint: bfloat16\)"):
        finetune(
            FinetuneConfig(resume=str(tmp_path / "a"), out=str(tmp_path / "b"), base_dtype="nf4"),
            echo=lambda s: None,
            progress=False,
        )
    r = finetune(
        FinetuneConfig(resume=str(tmp_path / "a"), out=str(tmp_path / "c"), steps=3),
        echo=lambda s: None,
        progress=False,
    )
    assert r.config.base_dtype == "bfloat16"


@pytest.mark.filterwarnings("ignore:no tokenizer saved")
def test_an_nf4_model_is_refused_as_a_16_bit_base(setup, tmp_path):
    model_dir, data = setup
    bnb_dir = nf4core.quantize_model(model_dir, tmp_path / "nf4")
    with pytest.raises(ConfigError, match="already NF4"):
        finetune(
            FinetuneConfig(
                model=str(bnb_dir),
                data=str(data),
                out=str(tmp_path / "o"),
                steps=1,
                base_dtype="float32",
            ),
            echo=lambda s: None,
            progress=False,
        )


@pytest.mark.parametrize(
    "kw,match", [({"base_dtype": "int8"}, "base_dtype"), ({"quant_method": "gptq"}, "quant_method")]
)
def test_bad_settings_are_refused_by_name(kw, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**kw)
