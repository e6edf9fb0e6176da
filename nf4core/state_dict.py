"""The bitsandbytes state dict layout of a quantized linear weight.

Keys for a module `<m>`:
  <m>.weight                                    uint8 ((numel + 1) // 2, 1) packed codes
  <m>.weight.absmax                             float32 (n_blocks,), or uint8 when double-quantized
  <m>.weight.quant_map                          float32 (16,)
  <m>.weight.nested_absmax                      float32 (n_nested_blocks,)   [double quant only]
  <m>.weight.nested_quant_map                   float32 (256,)               [double quant only]
  <m>.weight.quant_state.bitsandbytes__nf4      uint8: UTF-8 JSON of blocksize, dtype, shape, ...
"""

from __future__ import annotations

import json

import numpy as np

from .errors import NF4FormatError
from .tensor import DoubleQuantAbsmax, NF4Tensor

QUANT_STATE_SUFFIX = "quant_state.bitsandbytes__"


def _weight_key(prefix: str) -> str:
    return f"{prefix}.weight" if prefix else "weight"


def nf4_to_state_dict(t: NF4Tensor, prefix: str) -> dict[str, np.ndarray]:
    key = _weight_key(prefix)
    state = {
        "quant_type": "nf4",
        "blocksize": t.blocksize,
        "dtype": t.dtype,
        "shape": list(t.shape),
    }
    out = {key: t.packed.reshape(-1, 1), f"{key}.quant_map": t.quant_map}
    if t.double_quant is None:
        out[f"{key}.absmax"] = t.absmax
    else:
        dq = t.double_quant
        out[f"{key}.absmax"] = dq.codes
        out[f"{key}.nested_absmax"] = dq.scales
        out[f"{key}.nested_quant_map"] = dq.quant_map
        state.update(nested_blocksize=dq.blocksize, nested_dtype="float32", nested_offset=dq.offset)
    out[f"{key}.{QUANT_STATE_SUFFIX}nf4"] = np.frombuffer(
        json.dumps(state).encode(), dtype=np.uint8
    )
    return out


def nf4_from_state_dict(state_dict: dict, prefix: str) -> NF4Tensor:
    key = _weight_key(prefix)
    state = _read_quant_state(state_dict, key)

    def tensor(suffix: str) -> np.ndarray:
        name = f"{key}.{suffix}" if suffix else key
        if name not in state_dict:
            raise NF4FormatError(f"state dict is missing {name!r}")
        return np.asarray(state_dict[name])

    packed = tensor("")
    if packed.dtype != np.uint8:
        raise NF4FormatError(
            f"{key!r} must be uint8 packed codes, got {packed.dtype} (other bnb_4bit_quant_storage "
            "dtypes are not supported)"
        )
    try:
        if "nested_offset" in state:
            absmax, double_quant = (
                None,
                DoubleQuantAbsmax(
                    codes=tensor("absmax").reshape(-1),
                    scales=tensor("nested_absmax").reshape(-1),
                    offset=state["nested_offset"],
                    quant_map=tensor("nested_quant_map").reshape(-1),
                    blocksize=state["nested_blocksize"],
                ),
            )
        else:
            absmax, double_quant = tensor("absmax").reshape(-1), None
        return NF4Tensor(
            packed=packed.reshape(-1),
            absmax=absmax,
            double_quant=double_quant,
            shape=tuple(state["shape"]),
            dtype=state["dtype"],
            blocksize=state["blocksize"],
            quant_map=tensor("quant_map").reshape(-1),
        )
    except NF4FormatError as exc:
        raise NF4FormatError(f"{key}: {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise NF4FormatError(f"{key}: invalid quant_state: {exc}") from None


_REQUIRED = {"quant_type": str, "blocksize": int, "dtype": str, "shape": list}
_NESTED = {"nested_blocksize": int, "nested_dtype": str, "nested_offset": (int, float)}


def _read_quant_state(state_dict: dict, key: str) -> dict:
    """The parsed JSON quant state of `key`, checked for the fields and types NF4 needs."""
    prefix = f"{key}.{QUANT_STATE_SUFFIX}"
    found = [k for k in state_dict if k.startswith(prefix)]
    if not found:
        raise NF4FormatError(f"state dict is missing {prefix + 'nf4'!r} (the JSON quant state)")
    name = found[0]
    quant_type = name[len(prefix) :]
    if quant_type != "nf4":
        raise NF4FormatError(f"{name!r}: quant type {quant_type!r} is not supported, only nf4")
    raw = np.asarray(state_dict[name])
    if raw.dtype != np.uint8:
        raise NF4FormatError(f"{name!r} must be a uint8 tensor of UTF-8 JSON, got {raw.dtype}")
    try:
        state = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NF4FormatError(f"{name!r} is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise NF4FormatError(f"{name!r} is not valid UTF-8 JSON: nested too deeply") from None
    if not isinstance(state, dict):
        raise NF4FormatError(f"{name!r} must hold a JSON object, got {type(state).__name__}")
    fields = dict(_REQUIRED)
    if any(k in state for k in _NESTED):
        fields.update(_NESTED)
    for field_name, kind in fields.items():
        if field_name not in state:
            raise NF4FormatError(f"{name!r} lacks the field {field_name!r}")
        value = state[field_name]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise NF4FormatError(f"{name!r}: field {field_name!r} has the wrong type: {value!r}")
    if state["quant_type"] != "nf4":
        raise NF4FormatError(
            f"{name!r}: quant_type {state['quant_type']!r} is not supported, only nf4"
        )
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in state["shape"]):
        raise NF4FormatError(f"{name!r}: shape must be a list of ints, got {state['shape']!r}")
    if "nested_dtype" in state and state["nested_dtype"] != "float32":
        raise NF4FormatError(f"{name!r}: nested_dtype {state['nested_dtype']!r} is not supported")
    return state
