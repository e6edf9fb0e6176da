"""A smoke run of bench/quality.py on a tiny model (the real figures are in BENCHMARKS.md)."""

import pytest

pytest.importorskip("torch")

from bench import quality  # noqa: E402
from tests.backends.finetune_fixtures import tiny_model_dir  # noqa: E402


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_section_runs_on_a_tiny_model(tmp_path, capsys):
    model = str(tiny_model_dir(tmp_path / "model"))
    results = quality.main(
        [
            "--model",
            model,
            "--sections",
            "weights,perplexity,finetune-text",
            "--max-tensors",
            "3",
            "--window",
            "16",
            "--max-windows",
            "2",
            "--steps",
            "2",
        ]
    )
    weights = {(r["method"], r["double_quant"]): r for r in results["weights"]}
    error = {key: row["mean_rel_sq_error"] for key, row in weights.items()}
    assert error[("mse", True)] < error[("absmax", True)]
    assert [r["model"] for r in results["perplexity"]] == [
        "float32 base",
        "bfloat16 base",
        "NF4 absmax",
        "NF4 mse",
    ]
    assert all(r["perplexity"] > 1 for r in results["perplexity"])
    runs = results["finetune-text"]
    assert [r["run"] for r in runs] == [b[0] for b in quality.BASES]
    assert all(r["steps"] == 2 and r["final_eval_loss"] > 0 for r in runs)
    assert "| NF4 mse |" in capsys.readouterr().out


def test_an_unknown_section_is_refused_by_name():
    with pytest.raises(SystemExit):
        quality.main(["--sections", "weights,speed"])
