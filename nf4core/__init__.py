"""nf4core: the backend-neutral executable specification of the NF4 format (numpy only).

The format is bitsandbytes' 4-bit NormalFloat with optional double quantization, bit for bit.
"""

from .codebooks import (
    DYNAMIC_MAP_SIGNED,
    NF4_CODE,
    dynamic_map_from_definition,
    nf4_code_from_normal_quantiles,
)
from .dataset import Batch, DataConfig, Dataset, Example, batches, load_dataset
from .default_model import DefaultModelMissing, default_model_path
from .errors import ModelLoadError, NF4FormatError
from .jsonl import DataFormatError
from .lora_init import lora_init
from .model_config import ModelConfig
from .model_quantize import iter_quantized, quantize_model
from .sources import ModelSource, open_model
from .state_dict import nf4_from_state_dict, nf4_to_state_dict
from .tensor import FORMAT_VERSION, DoubleQuantAbsmax, NF4Tensor, dequantize, quantize
from .tokenizer import Tokenizer

__all__ = [
    "DYNAMIC_MAP_SIGNED",
    "FORMAT_VERSION",
    "NF4_CODE",
    "Batch",
    "DataConfig",
    "DataFormatError",
    "Dataset",
    "DefaultModelMissing",
    "DoubleQuantAbsmax",
    "Example",
    "ModelConfig",
    "ModelLoadError",
    "ModelSource",
    "NF4FormatError",
    "NF4Tensor",
    "Tokenizer",
    "batches",
    "default_model_path",
    "dequantize",
    "dynamic_map_from_definition",
    "iter_quantized",
    "load_dataset",
    "lora_init",
    "nf4_code_from_normal_quantiles",
    "nf4_from_state_dict",
    "nf4_to_state_dict",
    "open_model",
    "quantize",
    "quantize_model",
]
