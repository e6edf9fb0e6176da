"""Every GGUF weight type the `gguf` package dequantizes is read: K-quants and IQ types too.

Q4_K and Q6_K are checked against golden blocks packed here by hand from the formats' byte layouts
(not through the gguf package); the other types against `gguf.quants.dequantize` on valid random
blocks, which tests the plumbing (shapes, row order, the q/k un-permutation).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from nf4core import ModelLoadError, open_model
from nf4core.sources.gguf_file import SUPPORTED_TYPES

from .tiny_models import (
    f16_bytes,
    hf_config,
    llama_cpp_permute,
    pack_q4_k,
    random_weights,
    write_gguf,
)

UP = "model.layers.0.mlp.up_proj.weight"  # (256, 256): one 256-value block a row, not permuted
QT = gguf.GGMLQuantizationType


def wide_config() -> dict:
    """Rows of 256 values everywhere, as K-quant and most IQ blocks need."""
    return hf_config(
        "llama",
        hidden_size=256,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=1,
    )


def test_supported_types_are_what_gguf_dequantizes():
    decodable = []
    for t in QT:
        block, size = gguf.GGML_QUANT_SIZES[t]
        if t.name in ("F64", "I8", "I16", "I32", "I64"):
            continue  # not weight types
        try:
            gguf.quants.dequantize(np.zeros((1, 256 // block * size), np.uint8), t)
        except NotImplementedError:
            continue
        decodable.append(t.name)
    assert sorted(SUPPORTED_TYPES) == sorted(decodable)
    for name in ("Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS"):
        assert name in SUPPORTED_TYPES


def test_q4_k_golden_blocks(tmp_path):
    """Q4_K block (256 values, 144 bytes): f16 d, f16 dmin, 12 bytes of eight 6-bit scales and
    mins, 128 bytes of 4-bit quants. Value = d * scale_j * q - dmin * min_j for sub-block j of 32;
    the 64 values 64i..64i+63 take the low then the high nibbles of bytes 32i..32i+31."""
    config = wide_config()
    rng = np.random.default_rng(5)
    rows = 256
    d = rng.integers(1, 64, rows) / 256.0  # exact in f16, and products exact in f32
    dmin = rng.integers(1, 64, rows) / 512.0
    sc = rng.integers(0, 64, (rows, 8))
    mn = rng.integers(0, 64, (rows, 8))
    q = rng.integers(0, 16, (rows, 256))
    blocks = pack_q4_k(d, dmin, sc, mn, q)
    assert blocks.shape == (rows, 144)
    sub = np.arange(256) // 32
    expected = d[:, None] * sc[:, sub] * q - dmin[:, None] * mn[:, sub]
    path = write_gguf(
        tmp_path / "k4.gguf", config, random_weights(config), raw={UP: ("Q4_K", blocks)}
    )
    got = open_model(path).read(UP)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_q6_k_golden_blocks(tmp_path):
    """Q6_K block (256 values, 210 bytes): 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8
    scales, f16 d. Value = d * scale[i // 16] * (q - 32). In each half of 128, value 32k + l
    (k = 0..3) takes the low nibble (k = 0, 1) or high nibble (k = 2, 3) of low-byte l + 32 * (k % 2)
    and bits 2k..2k+1 of high-byte l."""
    config = wide_config()
    rng = np.random.default_rng(6)
    rows = 256
    d = rng.integers(1, 64, rows) / 1024.0
    scales = rng.integers(-128, 128, (rows, 16))
    q = rng.integers(0, 64, (rows, 256))
    halves = q.reshape(rows, 2, 4, 32)  # (half, k, l)
    low, high = halves & 15, halves >> 4
    ql = np.concatenate(
        [low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], axis=2
    ).reshape(rows, 128)
    qh = (high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6).reshape(
        rows, 64
    )
    blocks = np.concatenate(
        [
            ql.astype(np.uint8),
            qh.astype(np.uint8),
            scales.astype(np.int8).view(np.uint8),
            f16_bytes(d),
        ],
        axis=1,
    )
    assert blocks.shape == (rows, 210)
    expected = d[:, None] * scales[:, np.arange(256) // 16] * (q - 32)
    path = write_gguf(
        tmp_path / "k6.gguf", config, random_weights(config), raw={UP: ("Q6_K", blocks)}
    )
    got = open_model(path).read(UP)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def random_blocks(rng: np.random.Generator, rows: int, qtype: str) -> np.ndarray:
    """Random blocks of `qtype` for rows of 256 values. Bit 6 of every byte is cleared, so no
    f16/E8M0/E4M3 scale in them is NaN or Inf."""
    block, size = gguf.GGML_QUANT_SIZES[QT[qtype]]
    return rng.integers(0, 256, (rows, 256 // block * size), dtype=np.uint8) & 0xBF


QUANTIZED = [t for t in SUPPORTED_TYPES if t not in ("F32", "F16", "BF16")]


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_every_type_reads_like_gguf_dequantize(tmp_path, qtype):
    config = wide_config()
    weights = random_weights(config)
    rng = np.random.default_rng(len(qtype))
    raw = {
        name: (qtype, random_blocks(rng, shape[0], qtype))
        for name, shape in ((n, w.shape) for n, w in weights.items())
        if len(shape) == 2
    }
    source = open_model(write_gguf(tmp_path / "m.gguf", config, weights, raw=raw))
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name, (_, blocks) in raw.items():
        expected = gguf.quants.dequantize(blocks, QT[qtype])
        got = source.read(name)
        assert got.dtype == np.float32 and got.shape == weights[name].shape
        module = name.split(".")[-2]
        if module in heads:  # stored permuted for llama.cpp's RoPE: ours is un-permuted
            got = llama_cpp_permute(got, heads[module])
        np.testing.assert_array_equal(got, expected, err_msg=name)


@pytest.mark.parametrize("qtype", ["Q8_1", "Q8_K", "Q1_0", "I32"])
def test_types_gguf_cannot_decode_are_refused_by_name(tmp_path, qtype):
    config = wide_config()
    block, size = gguf.GGML_QUANT_SIZES[QT[qtype]]
    blocks = np.zeros((256, 256 // block * size), np.uint8)
    path = write_gguf(
        tmp_path / "m.gguf", config, random_weights(config), raw={UP: (qtype, blocks)}
    )
    with pytest.raises(ModelLoadError, match=f"'blk.0.ffn_up.weight' has type {qtype}, not"):
        open_model(path)
