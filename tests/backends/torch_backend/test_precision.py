import pytest
import torch

from backends.torch_backend import precision


def test_cpu_follows_the_bf16_capability(monkeypatch):
    monkeypatch.delenv("NF4_QLORA_COMPUTE_DTYPE", raising=False)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.default_compute_dtype("cpu") == torch.float32
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.default_compute_dtype(torch.device("cpu")) == torch.bfloat16


def test_override(monkeypatch):
    monkeypatch.setenv("NF4_QLORA_COMPUTE_DTYPE", "float16")
    assert precision.default_compute_dtype("cpu") == torch.float16
    monkeypatch.setenv("NF4_QLORA_COMPUTE_DTYPE", "fp8")
    with pytest.raises(ValueError, match="NF4_QLORA_COMPUTE_DTYPE"):
        precision.default_compute_dtype("cpu")
