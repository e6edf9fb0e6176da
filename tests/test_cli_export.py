"""`export`, `merge --format gguf` and `finetune --export gguf` through the real CLI, checked by the
libraries on the other side: the gguf package's reader, transformers (the dense directory, and its
own GGUF loader), mlx-lm (our dense export + our mlx-lm adapter), and our own loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest

import nf4core
from tests.backends.finetune_fixtures import chat_records, tiny_model_dir, write_jsonl
from tests.nf4core.tiny_models import (
    CHATML,
    add_sentencepiece_metadata,
    hf_config,
    llama_cpp_permute,
    pack_q4_k,
    random_weights,
    tiny_tokenizer,
    write_gguf,
    write_hf_dir,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TEXT = "Hello world! <|im_start|>user 12345 naïve café"


def cli(*args: object, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NF4_BACKEND": "torch", "HF_HUB_OFFLINE": "1"}
    env.pop("NF4_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def core(config: nf4core.ModelConfig) -> dict:
    fields = dict(config.__dict__)
    fields.pop("extra")
    return fields


def rounded(w: np.ndarray, dtype: str) -> np.ndarray:
    kind = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    return w.astype(kind).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama HF directory, its NF4 quantization (by the CLI) and a 2-step run on that."""
    tmp = tmp_path_factory.mktemp("export")
    model = tiny_model_dir(tmp / "model")
    cli("quantize", model, tmp / "nf4")
    data = write_jsonl(tmp / "train.jsonl", chat_records())
    run = tmp / "run"
    cli(
        *("finetune", "--model", tmp / "nf4", "--data", data, "--out", run),
        *("--steps", 2, "--lr", 0.02, "--batch-size", 4, "--max-seq-len", 64, "--lora-r", 4),
        *("--export", "mlx-lm", "--export", "gguf", "--quiet"),
    )
    return model, tmp / "nf4", run


def _our_logits(model: Path, ids: np.ndarray, adapter: Path | None = None) -> np.ndarray:
    from backends import api

    loaded = api.load(
        model, adapter=adapter, backend="torch", device="cpu", compute_dtype="float32"
    )
    with torch.no_grad():
        return loaded.engine.model(torch.from_numpy(ids)).float().numpy()


def test_hf_export_of_an_nf4_model_loads_in_transformers_with_our_logits(tiny, tmp_path):
    _, nf4_dir, _ = tiny
    out = tmp_path / "dense"
    cli("export", nf4_dir, out, "--format", "hf", "--dtype", "float32")
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    ).eval()
    ids = np.random.default_rng(0).integers(0, 300, (2, 24))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, _our_logits(nf4_dir, ids), atol=2e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = nf4core.open_model(nf4_dir).tokenizer()
    assert tok(TEXT).input_ids == ours.encode(TEXT)
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        ours.apply_chat_template(chat, add_generation_prompt=True)
    )


@pytest.mark.parametrize("arch, tie", [("llama", False), ("qwen2", True)])
def test_gguf_export_reads_back_in_every_dtype(tmp_path, arch, tie):
    config = hf_config(arch, tie=tie)
    weights = random_weights(config, seed=3)
    model = write_hf_dir(tmp_path / "hf", config, weights, tiny_tokenizer())
    source = nf4core.open_model(model)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for dtype in ("float32", "bfloat16", "float16", "q8_0"):
        out = tmp_path / f"m-{dtype}.gguf"
        cli("export", model, out, "--format", "gguf", "--dtype", dtype)
        reader = gguf.GGUFReader(out)
        fields = {k: f.contents() for k, f in reader.fields.items()}
        assert fields["general.architecture"] == arch
        assert fields[f"{arch}.block_count"] == config["num_hidden_layers"]
        assert fields[f"{arch}.attention.head_count_kv"] == config["num_key_value_heads"]
        assert fields["tokenizer.ggml.model"] == "gpt2"
        assert fields["tokenizer.chat_template"] == CHATML
        assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
        kind = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}[dtype]
        stored = {t.name: t for t in reader.tensors}
        assert ("output.weight" in stored) is not tie
        for t in reader.tensors:
            assert t.tensor_type.name == (kind if len(t.shape) == 2 else "F32"), t.name
        back = nf4core.open_model(out)
        assert core(back.config) == core(source.config)
        for name, w in weights.items():
            got = back.read(name)
            if w.ndim == 1 or dtype == "float32":
                np.testing.assert_array_equal(got, w, err_msg=name)
            elif dtype != "q8_0":
                np.testing.assert_array_equal(got, rounded(w, dtype), err_msg=name)
            else:  # each row quantized on its own: the row order does not change its values
                qt = gguf.GGMLQuantizationType.Q8_0
                want = gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt)
                np.testing.assert_array_equal(got, want, err_msg=name)
                blocks = np.abs(w).reshape(w.shape[0], -1, 32).max(axis=2, keepdims=True)
                error = np.abs(got - w).reshape(blocks.shape[0], -1, 32)
                # half a step d = max|x| / 127, plus 127 times the float16 rounding of d
                assert (error <= blocks / 127 * (0.5 + 127 * 2**-11) + 1e-6).all(), name
            module = name.split(".")[-2]
            if dtype == "float32" and arch == "llama" and module in heads and w.ndim == 2:
                raw = stored[nf4core.sources.gguf_file.gguf_name(name)].data
                np.testing.assert_array_equal(raw, llama_cpp_permute(w, heads[module]))
        ours, theirs = source.tokenizer(), back.tokenizer()
        assert theirs.encode(TEXT) == ours.encode(TEXT)
        assert (theirs.bos_token, theirs.eos_token) == (ours.bos_token, ours.eos_token)


def test_transformers_gguf_loader_reads_our_gguf(tmp_path):
    config = hf_config("llama")
    weights = random_weights(config, seed=4)
    model = write_hf_dir(tmp_path / "hf", config, weights, tiny_tokenizer())
    cli("export", model, tmp_path / "m.gguf", "--format", "gguf", "--dtype", "float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    )
    state = hf.state_dict()
    for name, w in weights.items():
        np.testing.assert_array_equal(state[name].numpy(), w, err_msg=name)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert tok(TEXT).input_ids == nf4core.open_model(model).tokenizer().encode(TEXT)


def test_a_gguf_source_keeps_its_tokenizer_metadata(tmp_path):
    """A GGUF source's tokenizer keys (here a SentencePiece vocabulary) and descriptive general.*
    keys are copied as they are, value types included."""
    config = hf_config("llama")
    weights = random_weights(config, seed=5)

    def metadata(writer):
        add_sentencepiece_metadata(writer)
        writer.add_license("apache-2.0")
        writer.add_languages(["en", "fr"])

    source_path = write_gguf(tmp_path / "src.gguf", config, weights, "Q4_0", add_metadata=metadata)
    out = tmp_path / "out.gguf"
    cli("export", source_path, out, "--format", "gguf", "--dtype", "float32")

    def copied_keys(path):
        fields = gguf.GGUFReader(path).fields
        return {
            k: (f.contents(), f.types)
            for k, f in fields.items()
            if k.startswith("tokenizer.") or k in ("general.license", "general.languages")
        }

    assert copied_keys(out) == copied_keys(source_path)
    assert copied_keys(out)["general.languages"][0] == ["en", "fr"]
    source, back = nf4core.open_model(source_path), nf4core.open_model(out)
    for name in weights:
        np.testing.assert_array_equal(back.read(name), source.read(name), err_msg=name)
    assert back.tokenizer().encode(TEXT) == source.tokenizer().encode(TEXT)


def test_merge_format_gguf_equals_the_merged_directory(tiny, tmp_path):
    _, nf4_dir, run = tiny
    cli("merge", run, tmp_path / "m.gguf", "--format", "gguf", "--dtype", "float32")
    cli("merge", run, tmp_path / "dir", "--dtype", "float32")
    got, want = nf4core.open_model(tmp_path / "m.gguf"), nf4core.open_model(tmp_path / "dir")
    for name in want.tensor_names():
        np.testing.assert_array_equal(got.read(name), want.read(name), err_msg=name)
    # finetune --export gguf wrote the same merge, in bfloat16
    exported = nf4core.open_model(run / "model.gguf")
    for name in want.tensor_names():
        w = want.read(name)
        expect = w if w.ndim == 1 else rounded(w, "bfloat16")
        np.testing.assert_array_equal(exported.read(name), expect, err_msg=name)


def test_mlx_lm_loads_our_dense_base_and_adapter_to_our_logits(tiny, tmp_path):
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import load

    _, nf4_dir, run = tiny
    cli("export", nf4_dir, tmp_path / "base", "--dtype", "float32")
    model, _ = load(str(tmp_path / "base"), adapter_path=str(run / "mlx-lm"))
    ids = np.random.default_rng(1).integers(0, 300, (2, 24))
    theirs = np.array(model(mx.array(ids)).astype(mx.float32))
    ours = _our_logits(nf4_dir, ids, adapter=run)
    assert np.abs(ours - _our_logits(nf4_dir, ids)).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)


def test_out_is_moved_aside_only_with_overwrite_and_bad_options_are_named(tiny, tmp_path):
    model, _, _ = tiny
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    r = cli("export", model, out, "--format", "gguf", ok=False)
    assert r.returncode == 1 and "m.gguf: the output file exists; pass --overwrite" in r.stderr
    assert out.read_text() == "keep me"
    r = cli("export", model, out, "--format", "gguf", "--overwrite")
    assert "moved the existing" in r.stdout
    assert (tmp_path / "m.gguf.old-1").read_text() == "keep me"
    assert nf4core.open_model(out).config.num_hidden_layers == 2
    r = cli("export", model, tmp_path / "d", "--dtype", "q8_0", ok=False)
    assert "dtype 'q8_0' cannot be written as format hf" in r.stderr
    assert not (tmp_path / "d").exists()
    r = cli("merge", tiny[2], tmp_path / "n.gguf", "--format", "gguf", "--nf4", ok=False)
    assert "--nf4 writes a bitsandbytes directory" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.old-1"]


def test_a_tokenizer_without_a_gguf_form_is_refused_by_name(tmp_path):
    config = hf_config("llama")
    tok = tiny_tokenizer()
    from tokenizers import pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = write_hf_dir(tmp_path / "hf", config, random_weights(config), tok)
    r = cli("export", model, tmp_path / "m.gguf", "--format", "gguf", ok=False)
    assert "pre-tokenizer (Whitespace) has no GGUF name" in r.stderr
    assert not (tmp_path / "m.gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    data = json.loads((model / "tokenizer_config.json").read_text())
    assert data["chat_template"] == CHATML


def test_finetune_export_gguf_refuses_a_base_merge_would_not_rebuild(tiny, tmp_path):
    model, _, _ = tiny
    data = write_jsonl(tmp_path / "train.jsonl", chat_records())
    out = tmp_path / "run"
    r = cli(
        *("finetune", "--model", model, "--data", data, "--out", out, "--steps", 1),
        *("--base-dtype", "float32", "--export", "gguf", "--quiet"),
        ok=False,
    )
    assert (
        r.returncode == 1 and "export gguf merges the adapter into the absmax NF4 base" in r.stderr
    )
    assert not out.exists()


def test_round_trip_from_a_k_quant_gguf_to_a_merged_gguf(tmp_path):
    """What users do: download a Q4_K GGUF, fine-tune on it, get the merged model as GGUF."""
    config = hf_config(
        "llama",
        hidden_size=256,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=1,
    )
    weights = random_weights(config)
    rng = np.random.default_rng(7)
    raw = {}
    for name, w in weights.items():
        if w.ndim == 2:
            n = w.shape[0]
            d, dmin = np.full(n, 2.0**-12), np.full(n, 2.0**-9)
            scales, mins = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8))
            raw[name] = ("Q4_K", pack_q4_k(d, dmin, scales, mins, rng.integers(0, 16, (n, 256))))
        else:
            weights[name] = np.ones_like(w)
    model = write_gguf(tmp_path / "k.gguf", config, weights, tokenizer=tiny_tokenizer(), raw=raw)
    data = write_jsonl(tmp_path / "train.jsonl", chat_records())
    run = tmp_path / "run"
    cli(
        *("finetune", "--model", model, "--data", data, "--out", run, "--steps", 2),
        *("--lr", 0.02, "--batch-size", 4, "--max-seq-len", 64, "--lora-r", 4),
        *("--export", "gguf", "--quiet"),
    )
    fields = gguf.GGUFReader(run / "model.gguf").fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.chat_template"].contents() == CHATML
    cli("merge", run, tmp_path / "merged", "--dtype", "float32")
    merged, exported = (
        nf4core.open_model(tmp_path / "merged"),
        nf4core.open_model(run / "model.gguf"),
    )
    for name in merged.tensor_names():
        w = merged.read(name)
        want = w if w.ndim == 1 else rounded(w, "bfloat16")
        np.testing.assert_array_equal(exported.read(name), want, err_msg=name)
    r = cli("generate", "hi", "--model", run / "model.gguf", "--max-new-tokens", 3)
    assert r.returncode == 0
