"""nf4core: the backend-neutral executable specification of the NF4 format (numpy only).

The format is bitsandbytes' 4-bit NormalFloat with optional double quantization, bit for bit.
"""

from .codebooks import (
    DYNAMIC_MAP_SIGNED,
    NF4_CODE,
    dynamic_map_from_definition,
    nf4_code_from_normal_quantiles,
)
from .errors import NF4FormatError
from .lora_init import lora_init
from .model_config import ModelConfig
from .tensor import FORMAT_VERSION, DoubleQuantAbsmax, NF4Tensor, dequantize, quantize

__all__ = [
    "DYNAMIC_MAP_SIGNED",
    "FORMAT_VERSION",
    "ModelConfig",
    "NF4_CODE",
    "DoubleQuantAbsmax",
    "NF4FormatError",
    "NF4Tensor",
    "dequantize",
    "lora_init",
    "dynamic_map_from_definition",
    "nf4_code_from_normal_quantiles",
    "quantize",
]
