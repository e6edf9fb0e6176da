"""DoRA through the command line: the adapter a `finetune --use-dora` run writes loads in peft onto
the same (NF4-dequantized) base to our logits; merge folds it as peft's merge does; MLX computes the
same forward and resumes a torch DoRA checkpoint; what we do not support with DoRA is refused by name."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import nf4core
from backends import api
from backends.finetune_config import ConfigError, FinetuneConfig
from backends.peft_adapter import AdapterError, load_adapter
from cli import main
from tests.backends.finetune_fixtures import tiny_setup
from tests.backends.test_peft_adapter import hf_model_of_nf4_base

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = [[5, 17, 42, 99, 3, 250, 7, 12, 80]]
TARGETS = "q_proj,v_proj,down_proj"


def _finetune(*args: str) -> str:
    r = CliRunner().invoke(main, ["finetune", "--quiet", *args])
    assert r.exit_code == 0, r.output
    return r.output


def _losses(out) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r and "step" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dora")
    model, data = tiny_setup(tmp)
    out = tmp / "run"
    common = ["--model", str(model), "--data", str(data), "--batch-size", "4"]
    common += ["--max-seq-len", "64", "--lr", "2e-2", "--lora-r", "4", "--lora-alpha", "8"]
    common += ["--targets", TARGETS, "--backend", "torch"]
    _finetune(
        *common,
        *("--out", str(out), "--steps", "4", "--save-every", "2", "--use-dora"),
        *("--export", "mlx-lm"),
    )
    return model, data, out


def test_the_adapter_is_peft_dora_and_peft_loads_it_to_our_logits(trained):
    model_dir, _, out = trained
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    info = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert json.loads(info.output)["use_dora"] is True
    tensors = load_file(str(out / "adapter_model.safetensors"))
    magnitudes = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector")}
    assert len(magnitudes) == 3 * 2  # three targets, two layers
    source = nf4core.open_model(model_dir)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    w = nf4core.dequantize(
        nf4core.quantize(np.asarray(source.read("model.layers.0.self_attn.q_proj.weight"))),
        np.float32,
    )
    moved = np.abs(magnitudes[key] - np.linalg.norm(w, axis=1)).max()
    assert moved > 1e-4  # trained away from its initial ||W||_row

    hf = peft.PeftModel.from_pretrained(hf_model_of_nf4_base(model_dir), str(out)).eval()
    assert hf.peft_config["default"].use_dora
    ours = api.load(model_dir, adapter=out, backend="torch")
    ids = torch.tensor(IDS)
    with torch.no_grad():
        want = hf(ids).logits
        got = ours.engine.model(ids)
        with hf.disable_adapter():
            plain = hf(ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_merge_folds_dora_as_peft_does_and_gives_the_adapted_logits(trained, tmp_path):
    model_dir, _, out = trained
    path = api.merge_adapter(model_dir, out, tmp_path / "merged", dtype="float32")
    peft_merged = peft.PeftModel.from_pretrained(
        hf_model_of_nf4_base(model_dir), str(out)
    ).merge_and_unload()
    source = nf4core.open_model(path)
    for name, value in peft_merged.state_dict().items():
        np.testing.assert_allclose(source.read(name), value.numpy(), atol=2e-6, rtol=1e-5)
    merged = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = api.load(model_dir, adapter=out, backend="torch")
    ids = torch.tensor(IDS)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours.engine.model(ids), atol=1e-4, rtol=1e-4)


def test_mlx_computes_the_same_dora_forward_as_torch(trained):
    pytest.importorskip("mlx.core")
    model_dir, _, out = trained
    t = api.load(model_dir, adapter=out, backend="torch").engine
    m = api.load(model_dir, adapter=out, backend="mlx").engine
    want = t.model(torch.tensor(IDS)).detach().numpy()
    import mlx.core as mx

    got = np.array(m.model(mx.array(IDS)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_torch_dora_checkpoint_resumes_on_mlx(trained, tmp_path):
    pytest.importorskip("mlx.core")
    _, _, out = trained
    resumed = tmp_path / "mlx"
    _finetune(
        "--resume", str(out / "checkpoints/step-000002"), "--out", str(resumed), "--backend", "mlx"
    )
    assert yaml_config(resumed)["use_dora"] is True
    np.testing.assert_allclose(_losses(resumed)[-2:], _losses(out)[-2:], rtol=2e-3)
    a, b = load_adapter(out), load_adapter(resumed)
    assert a.use_dora and b.use_dora and a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        np.testing.assert_allclose(b.tensors[k], a.tensors[k], atol=2e-3, rtol=2e-3)


def yaml_config(out) -> dict:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())


def test_use_dora_is_fixed_on_resume(trained, tmp_path):
    _, _, out = trained
    with pytest.raises(ConfigError, match="--use-dora False"):
        api.finetune(
            FinetuneConfig(resume=str(out), use_dora=False, out=str(tmp_path / "x")),
            echo=lambda s: None,
            progress=False,
        )


def test_mlx_lm_loads_our_dora_export_to_our_logits(trained, tmp_path):
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import load

    model_dir, _, out = trained
    config = json.loads((out / "mlx-lm" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora"
    runner = CliRunner()
    for args in (
        ["quantize", str(model_dir), str(tmp_path / "nf4")],
        ["export", str(tmp_path / "nf4"), str(tmp_path / "base"), "--dtype", "float32"],
    ):
        r = runner.invoke(main, args)
        assert r.exit_code == 0, r.output
    model, _ = load(str(tmp_path / "base"), adapter_path=str(out / "mlx-lm"))
    theirs = np.array(model(mx.array(IDS)).astype(mx.float32))
    ours = api.load(tmp_path / "nf4", adapter=out, backend="torch")  # the base mlx-lm has
    ours = ours.engine.model(torch.tensor(IDS))
    np.testing.assert_allclose(theirs, ours.detach().numpy(), atol=2e-4, rtol=1e-4)


def _edited(tmp_path, out, config=None, drop_magnitude=False):
    d = tmp_path / "edited"
    d.mkdir()
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(config or {})
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    if drop_magnitude:
        tensors = {k: v for k, v in tensors.items() if "magnitude" not in k}
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


@pytest.mark.parametrize(
    "config, drop, message",
    [
        ({"use_rslora": True}, False, "use_rslora: True: rank-stabilised scaling"),
        ({"use_dora": False}, False, "has a lora_magnitude_vector but use_dora is not true"),
        ({}, True, "lacks its lora_magnitude_vector"),
        ({"use_dora": "yes"}, False, "use_dora must be true or false"),
    ],
)
def test_bad_dora_adapters_are_refused_by_name(trained, tmp_path, config, drop, message):
    _, _, out = trained
    with pytest.raises(AdapterError, match=message):
        load_adapter(_edited(tmp_path, out, config, drop))


def test_a_plain_lora_adapter_still_loads_without_magnitudes(trained, tmp_path):
    model_dir, _, out = trained
    d = _edited(tmp_path, out, {"use_dora": False}, drop_magnitude=True)
    adapter = load_adapter(d)
    assert not adapter.use_dora
    loaded = api.load(model_dir, adapter=d, backend="torch")
    assert not any("magnitude" in k for k in loaded.engine.adapters())


def test_eval_of_a_dora_adapter_agrees_across_backends(trained):
    """torch evaluates on dense copies of the base (its inference path), MLX on NF4: the DoRA norm
    must come out the same from either base."""
    pytest.importorskip("mlx.core")
    model_dir, data, out = trained
    t = api.load(model_dir, adapter=out, backend="torch").evaluate(data, max_seq_len=64)
    m = api.load(model_dir, adapter=out, backend="mlx").evaluate(data, max_seq_len=64)
    plain = api.load(model_dir, backend="torch").evaluate(data, max_seq_len=64)
    assert abs(t["loss"] - plain["loss"]) > 1e-3
    np.testing.assert_allclose(t["loss"], m["loss"], rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_dora_with_dropout_trains_the_same_with_gradient_checkpointing(trained, tmp_path, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model_dir, data, _ = trained
    losses = []
    for checkpointing in (False, True):
        cfg = FinetuneConfig(
            model=str(model_dir),
            data=str(data),
            out=str(tmp_path / f"run-{checkpointing}"),
            steps=3,
            batch_size=4,
            max_seq_len=64,
            lr=2e-2,
            lora_r=4,
            lora_dropout=0.2,
            targets=("q_proj", "down_proj"),
            use_dora=True,
            grad_checkpoint=checkpointing,
            backend=backend,
        )
        losses.append(api.finetune(cfg, echo=lambda s: None, progress=False).losses)
    assert all(np.isfinite(losses[0]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_an_mlx_dora_checkpoint_resumes_on_torch(trained, tmp_path):
    pytest.importorskip("mlx.core")
    model_dir, data, _ = trained
    first, resumed = tmp_path / "mlx", tmp_path / "torch"
    common = ["--batch-size", "4", "--max-seq-len", "64", "--lr", "2e-2", "--lora-r", "4"]
    _finetune(
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(first),
        *common,
        "--targets",
        TARGETS,
        "--steps",
        "4",
        "--save-every",
        "2",
        "--use-dora",
        "--backend",
        "mlx",
    )
    _finetune(
        "--resume",
        str(first / "checkpoints/step-000002"),
        "--out",
        str(resumed),
        "--backend",
        "torch",
    )
    np.testing.assert_allclose(_losses(resumed)[-2:], _losses(first)[-2:], rtol=2e-3)
    assert yaml_config(resumed)["backend"] == "torch"
    a, b = load_adapter(first), load_adapter(resumed)
    assert b.use_dora and a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        np.testing.assert_allclose(b.tensors[k], a.tensors[k], atol=2e-3, rtol=2e-3)
