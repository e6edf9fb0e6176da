"""The README's main job: `python cli.py finetune` with no arguments, as a real process on the embedded
SmolLM2-135M-Instruct. The held-out metric must rise from near zero, and the adapter it leaves must
carry the skill into peft + transformers on the unquantized model (a client that never saw NF4)."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nf4core
from nf4core.default_task import default_task, exact_match

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    try:
        nf4core.default_model_path()
    except nf4core.DefaultModelMissing as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("default-run") / "out"
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "cli.py", "finetune", "--out", str(out), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"default run: {time.perf_counter() - start:.0f} s\n{r.stdout}")
    return out, r.stdout


def test_default_finetune_teaches_the_held_out_skill(default_run):
    out, stdout = default_run
    m = re.search(r"held-out exact match: ([\d.]+)% before -> ([\d.]+)% after", stdout)
    assert m, stdout
    before, after = float(m[1]), float(m[2])
    assert before <= 10.0 and after >= 80.0, (before, after)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "config.yaml",
    ):
        assert (out / name).is_file(), name


def test_peft_on_the_unquantized_model_answers_with_our_adapter(default_run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("gguf")
    out, _ = default_run
    path = nf4core.default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    model = peft.PeftModel.from_pretrained(base, out).eval()

    def score(m, records) -> int:
        hits = 0
        for rec in records:
            ids = tok.apply_chat_template(
                rec["messages"][:-1],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
            answer = rec["messages"][-1]["content"]
            budget = len(tok(answer)["input_ids"]) + 4  # room for the answer and its end token
            with torch.no_grad():
                new = m.generate(ids, max_new_tokens=budget, do_sample=False)[0, ids.shape[1] :]
            hits += exact_match(tok.decode(new, skip_special_tokens=True), answer)
        return hits

    held = default_task(0).heldout[:10]
    with_adapter = score(model, held)
    with model.disable_adapter():
        without = score(model, held)
    assert without <= 1 and with_adapter >= 6, (without, with_adapter)
