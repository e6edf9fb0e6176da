"""The command line of the quantizer choice and the 16-bit baseline: quantize --method, finetune
--base-dtype / --quant-method, and a resume that would change the base."""

import pytest
from click.testing import CliRunner

import nf4core
from cli import main
from nf4core.dtypes import float_dtype
from nf4core.model_quantize import DEFAULT_QUANT_METHOD
from tests.backends.finetune_fixtures import tiny_setup

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("cliq"))


@pytest.mark.filterwarnings("ignore:no tokenizer saved")
def test_quantize_method_writes_that_methods_bytes(setup, tmp_path):
    model, _ = setup
    name = "model.layers.0.self_attn.q_proj.weight"
    source = nf4core.open_model(model)  # quantize_model rounds to the source's 16-bit dtype first
    dense = source.read(name).astype(float_dtype(source.dtype))
    for method in ("absmax", "mse"):
        r = CliRunner().invoke(
            main, ["quantize", str(model), str(tmp_path / method), "--method", method]
        )
        assert r.exit_code == 0, r.output
        stored = nf4core.open_model(tmp_path / method).read(name)
        assert (stored.packed == nf4core.quantize(dense, 64, True, method).packed).all()


def test_finetune_base_dtype_and_a_resume_that_changes_it(setup, tmp_path):
    model, data = setup
    other = "absmax" if DEFAULT_QUANT_METHOD == "mse" else "mse"  # not what run "a" recorded
    common = [
        "--model",
        str(model),
        "--data",
        str(data),
        "--batch-size",
        "4",
        "--max-seq-len",
        "64",
        "--backend",
        "torch",
        "--quiet",
    ]
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            *common,
            "--out",
            str(tmp_path / "a"),
            "--steps",
            "2",
            "--base-dtype",
            "float32",
        ],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main,
        [
            "finetune",
            "--resume",
            str(tmp_path / "a"),
            "--out",
            str(tmp_path / "b"),
            "--quant-method",
            other,
        ],
    )
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"--quant-method {other} (checkpoint: {DEFAULT_QUANT_METHOD})" in r.output, r.output
