"""finetune(cfg) on a tiny model: outputs, resume with dropout, atomic checkpoints, config precedence."""

import json

import pytest
import yaml

from backends import checkpoint as ckpt_mod
from backends.checkpoint import load_checkpoint
from backends.finetune import finetune
from backends.finetune_config import ConfigError, FinetuneConfig, learning_rate
from tests.backends.finetune_fixtures import tiny_setup

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("ft"))


def cfg(setup, out, **kw):
    model, data = setup
    base = dict(
        model=str(model),
        data=str(data),
        out=str(out),
        steps=4,
        batch_size=4,
        max_seq_len=64,
        lr=1e-2,
        backend="torch",
    )
    return FinetuneConfig(**{**base, **kw})


def test_outputs_and_resolved_config(setup, tmp_path):
    r = finetune(
        cfg(setup, tmp_path, export=("mlx-lm",), eval_every=2), echo=lambda s: None, progress=False
    )
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "checkpoints",
        "mlx-lm",
    } <= names
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["steps"] == 4 and saved["lora_r"] == 8 and saved["schedule"] == "cosine"
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert all(k in lines[0] for k in ("loss", "lr", "grad_norm", "tokens_per_s"))
    assert all(
        0 < x["target_tokens"] < x["tokens"] for x in lines if "loss" in x
    )  # prompts count too
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(tmp_path).state.step == 4 == r.steps
    peft_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 8 and peft_cfg["peft_type"] == "LORA"
    assert list(r.phases) == ["load", "train", "save"]  # no held-out set, no valid.jsonl
    assert 0 < sum(r.phases.values()) <= r.seconds


def test_resume_with_dropout_is_exact(setup, tmp_path):
    full = finetune(
        cfg(setup, tmp_path / "a", steps=6, save_every=3, lora_dropout=0.2),
        echo=lambda s: None,
        progress=False,
    )
    resumed = finetune(
        FinetuneConfig(resume=str(tmp_path / "a/checkpoints/step-000003"), out=str(tmp_path / "b")),
        echo=lambda s: None,
        progress=False,
    )
    assert resumed.losses == full.losses[3:]
    assert resumed.config.lora_dropout == 0.2


def test_resume_into_the_same_directory_logs_each_step_once(setup, tmp_path):
    finetune(cfg(setup, tmp_path, steps=6, save_every=3), echo=lambda s: None, progress=False)
    log = tmp_path / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 7, "lo')  # a crash in the middle of a line
    finetune(
        FinetuneConfig(resume=str(tmp_path / "checkpoints/step-000003"), out=str(tmp_path)),
        echo=lambda s: None,
        progress=False,
    )
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4, 5, 6]


def _edit_tensors(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "breakage,message",
    [
        (
            lambda d: _edit_tensors(
                d / "optimizer.safetensors",
                lambda t: t.pop(next(k for k in sorted(t) if k.endswith(".exp_avg"))),
            ),
            "optimizer.safetensors lacks .*exp_avg of shape",
        ),
        (
            lambda d: _edit_tensors(
                d / "adapters.safetensors",
                lambda t: t[sorted(t)[0]].__setitem__((0, 0), float("inf")),
            ),
            "NaN or infinite",
        ),
        (
            lambda d: _edit_tensors(
                d / "optimizer.safetensors",
                lambda t: t[sorted(t)[0]].__setitem__((0, 0), float("nan")),
            ),
            r"optimizer.safetensors: \S+\.exp_avg holds NaN or infinite",
        ),
        (
            lambda d: _edit_tensors(
                d / "optimizer.safetensors", lambda t: t[sorted(t)[1]].__setitem__((0, 0), -1.0)
            ),
            r"optimizer.safetensors: \S+\.exp_avg_sq holds negative values",
        ),
        (
            lambda d: (d / "trainer_state.json").write_text(
                json.dumps(
                    {
                        k: v
                        for k, v in json.loads((d / "trainer_state.json").read_text()).items()
                        if k != "step"
                    }
                )
            ),
            "missing or bad field",
        ),
    ],
)
def test_a_broken_checkpoint_is_refused_naming_it(setup, tmp_path, breakage, message):
    finetune(cfg(setup, tmp_path, steps=2), echo=lambda s: None, progress=False)
    directory = tmp_path / "checkpoints/step-000002"
    breakage(directory)
    with pytest.raises(ckpt_mod.CheckpointError, match=message) as e:
        finetune(FinetuneConfig(resume=str(tmp_path), steps=3), echo=lambda s: None, progress=False)
    assert str(directory) in str(e.value)


def test_a_checkpoint_of_another_shape_is_refused(setup, tmp_path):
    finetune(cfg(setup, tmp_path, steps=2), echo=lambda s: None, progress=False)
    _edit_tensors(
        tmp_path / "checkpoints/step-000002/adapters.safetensors",
        lambda t: t.update({k: v[:4] for k, v in t.items() if "lora_A" in k}),
    )
    _edit_tensors(
        tmp_path / "checkpoints/step-000002/optimizer.safetensors",
        lambda t: t.update({k: v[:4] for k, v in t.items() if "lora_A" in k}),
    )
    with pytest.raises(
        ckpt_mod.CheckpointError, match=r"is \[4, 64\] in the checkpoint but \[8, 64\]"
    ):
        finetune(FinetuneConfig(resume=str(tmp_path), steps=3), echo=lambda s: None, progress=False)


def test_a_failed_checkpoint_write_leaves_the_previous_one(setup, tmp_path, monkeypatch):
    finetune(cfg(setup, tmp_path, steps=2), echo=lambda s: None, progress=False)
    before = load_checkpoint(tmp_path)
    real = ckpt_mod._save_safetensors
    calls = []

    def failing(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:  # the optimizer file of the next checkpoint
            raise OSError(28, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt_mod, "_save_safetensors", failing)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(
            tmp_path / "checkpoints",
            before.state.__class__(before.state.adapters, before.state.moments, 3),
            before.config,
            {},
            "torch",
        )
    after = load_checkpoint(tmp_path)
    assert after.path == before.path and after.state.step == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest.json",
        "step-000002",
    ]


def test_precedence_explicit_over_file_over_recommended(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 7\nlr: 0.5\nlora-r: 4\n")
    c = FinetuneConfig.merged({"lr": 0.01, "steps": None}, FinetuneConfig.from_file(f))
    r = c.resolve({"steps": 150, "lr": 1e-3, "lora_r": 8, "batch_size": 8})
    assert (r.steps, r.lr, r.lora_r, r.batch_size, r.grad_accum) == (7, 0.01, 4, 8, 1)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"lora_r": 0}, "lora_r"),
        ({"lr": -1.0}, "lr"),
        ({"steps": 3, "epochs": 1.0}, "either"),
        ({"schedule": "zigzag"}, "schedule"),
        ({"export": "onnx"}, "export"),
    ],
)
def test_bad_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**kw)


def test_schedule_warms_up_and_decays():
    c = FinetuneConfig(lr=1.0, warmup_steps=2, schedule="cosine").resolve(None)
    lrs = [learning_rate(c, s, 10) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0 and lrs[-1] < 0.05 and min(lrs) > 0
