"""cli.py through click's CliRunner on a tiny model: every subcommand, precedence, clear errors."""

import json

import pytest
import yaml
from click.testing import CliRunner

from cli import main
from tests.backends.finetune_fixtures import tiny_setup

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model, data = tiny_setup(tmp)
    conf = tmp / "conf.yaml"
    conf.write_text(
        yaml.safe_dump({"steps": 99, "lr": 0.02, "batch_size": 4, "max_seq_len": 64, "lora_r": 4})
    )
    out = tmp / "out"
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--config",
            str(conf),
            "--steps",
            "3",
            "--backend",
            "torch",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    return model, data, out, r.output


def test_finetune_prints_the_backend_and_applies_precedence(run_dir):
    model, data, out, output = run_dir
    assert output.startswith("backend torch, device cpu, compute float32 (")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["steps"], saved["lr"], saved["lora_r"]) == (3, 0.02, 4)  # CLI > file > defaults


def test_generate_eval_info_merge_quantize(run_dir, tmp_path):
    model, data, out, _ = run_dir
    runner = CliRunner()
    r = runner.invoke(
        main,
        [
            "generate",
            "hello",
            "--model",
            str(model),
            "--adapter",
            str(out),
            "--max-new-tokens",
            "5",
            "--backend",
            "torch",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        main,
        [
            "eval",
            str(data),
            "--model",
            str(model),
            "--adapter",
            str(out),
            "--max-examples",
            "2",
            "--backend",
            "torch",
        ],
    )
    assert r.exit_code == 0 and "perplexity" in r.output and "exact match" in r.output, r.output
    r = runner.invoke(main, ["info", str(model), "--json", "--seq-len", "128"])
    info = json.loads(r.output)
    assert info["architecture"] == "llama" and info["memory_estimate_bytes"] > 0
    assert json.loads(runner.invoke(main, ["info", str(out), "--json"]).output)["kind"] == "adapter"
    ck = json.loads(runner.invoke(main, ["info", str(out / "checkpoints"), "--json"]).output)
    assert ck["kind"] == "checkpoint" and ck["step"] == 3
    r = runner.invoke(
        main, ["merge", str(out), str(tmp_path / "m"), "--model", str(model), "--nf4"]
    )
    assert r.exit_code == 0, r.output
    assert "quantization_config" in json.loads((tmp_path / "m/config.json").read_text())
    r = runner.invoke(main, ["quantize", str(model), str(tmp_path / "q")])
    assert r.exit_code == 0 and (tmp_path / "q/model.safetensors").exists(), r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["finetune", "--data", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl: no such data file"),
        (["finetune", "--lora-r", "0"], "lora_r must be an integer >= 1"),
        (["finetune", "--resume", "/nonexistent"], "/nonexistent: no training checkpoint"),
        (["finetune", "--config", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read"),
        (["generate", "hi", "--adapter", "/nonexistent"], "/nonexistent: not an adapter directory"),
    ],
)
def test_user_mistakes_give_one_clear_line(args, message, tmp_path):
    r = CliRunner().invoke(
        main, [*args, "--out", str(tmp_path / "o")] if args[0] == "finetune" else args
    )
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and message in r.output, r.output


def test_bad_data_line_names_the_file(run_dir, tmp_path):
    model = run_dir[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            "--model",
            str(model),
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "o"),
            "--backend",
            "torch",
        ],
    )
    assert r.exit_code == 1 and str(bad) in r.output and "Traceback" not in r.output, r.output


def test_unknown_setting_in_config_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stepz: 3\n")
    r = CliRunner().invoke(main, ["finetune", "--config", str(f)])
    assert r.exit_code == 1 and "unknown setting 'stepz'" in r.output


def test_help_reads_well():
    r = CliRunner().invoke(main, ["--help"])
    for cmd in ("finetune", "generate", "eval", "quantize", "merge", "info"):
        assert cmd in r.output
    assert (
        "--paged-optimizer / --no-paged-optimizer"
        in CliRunner().invoke(main, ["finetune", "--help"]).output
    )
