import pytest

from nf4core import ModelConfig

LLAMA = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


def test_from_and_to_hf_config():
    config = ModelConfig.from_hf_config(LLAMA)
    assert config.architecture == "llama" and config.resolved_head_dim == 16
    assert config.rope_scaling["rope_type"] == "llama3" and config.extra == {
        "torch_dtype": "bfloat16"
    }
    again = ModelConfig.from_hf_config(config.to_hf_config())
    assert again == config


def test_transformers_reads_our_config_to_the_same_model():
    transformers = pytest.importorskip("transformers")
    for model_type in ("llama", "qwen2"):
        ours = ModelConfig.from_hf_config({**LLAMA, "model_type": model_type})
        theirs = transformers.AutoConfig.for_model(**ours.to_hf_config())
        assert theirs.num_key_value_heads == 2 and theirs.hidden_size == 64
        assert ModelConfig.from_hf_config(theirs.to_dict()).attention_bias == (
            model_type == "qwen2"
        )


def test_qwen2_has_qkv_bias_and_missing_kv_heads_default_to_heads():
    config = ModelConfig.from_hf_config(
        {**LLAMA, "model_type": "qwen2", "num_key_value_heads": None}
    )
    assert config.attention_bias and config.num_key_value_heads == 4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_size": 0}, "hidden_size must be a positive int"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
        ({"hidden_size": 66}, "hidden_size must divide"),
    ],
)
def test_bad_configs(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config({**LLAMA, **change})
