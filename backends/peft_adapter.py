"""Adapters in PEFT's format (adapter_model.safetensors + adapter_config.json), and mlx-lm's.

PEFT keys: `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), float32,
and with DoRA (`use_dora`) `.lora_magnitude_vector` (out,) (no `.weight`: peft names it so);
`PeftModel.from_pretrained(transformers_model, dir)` loads them onto the unquantized base.
mlx-lm keys: `<module>.lora_a` (in, r) and `.lora_b` (r, out), scale alpha / r in its config; with
DoRA (fine_tune_type "dora") also `<module>.m` (out,), the magnitude. Note: mlx-lm's DoRA applies
dropout to the adapter path only, so training on there with dropout differs from peft's (and ours);
the forward without dropout is the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nf4core.atomic import atomic_file, write_text_atomic
from nf4core.regular_file import check_regular_file

WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
MLX_LM_DIR = "mlx-lm"
MAGNITUDE = "lora_magnitude_vector"


def peft_key(path: str) -> str:
    """The PEFT key of an adapter parameter at `path` ("model.layers.0.mlp.up_proj.lora_A")."""
    return f"{PEFT_PREFIX}{path}" + ("" if path.endswith(MAGNITUDE) else ".weight")


class AdapterError(ValueError):
    """An adapter directory is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class Adapter:
    tensors: dict[str, np.ndarray]  # PEFT keys
    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    base_model: str | None = None  # a Hugging Face Hub id when known, else a path
    directory: Path | None = None  # where it was loaded from, for messages
    base_revision: str | None = None  # the base's Hub revision, when not its main branch
    use_dora: bool = False  # DoRA: each module also has a magnitude vector (out,)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def modules(self) -> list[str]:
        return sorted({k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in self.tensors})

    def delta(self, module: str) -> np.ndarray:
        """scale * B @ A, (out, in) float32."""
        a = self.tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].astype(np.float32)
        b = self.tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"].astype(np.float32)
        return (b @ a) * np.float32(self.scale)

    def merged_weight(self, module: str, w: np.ndarray) -> np.ndarray:
        """The base weight `w` (out, in) float32 with this adapter folded in: W + scale * B @ A, and
        with DoRA each output row then rescaled to the magnitude m: m * V / ||V||_row."""
        v = w + self.delta(module)
        if not self.use_dora:
            return v
        m = self.tensors[f"{PEFT_PREFIX}{module}.{MAGNITUDE}"].astype(np.float32)
        return v * (m / np.linalg.norm(v, axis=1))[:, None]


def peft_config(adapter: Adapter) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.r,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "use_rslora": False,
        "use_dora": adapter.use_dora,
        "bias": "none",
        "target_modules": sorted(adapter.targets),
        "base_model_name_or_path": adapter.base_model,
        "revision": adapter.base_revision,
        "inference_mode": True,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }


def save_adapter(directory: str | Path, adapter: Adapter, export: tuple[str, ...] = ()) -> Path:
    """Write PEFT's two files atomically (and mlx-lm's under `mlx-lm/` when asked)."""
    from safetensors.numpy import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = save(
        {k: np.ascontiguousarray(v, np.float32) for k, v in adapter.tensors.items()},
        metadata={"format": "pt"},
    )
    with atomic_file(directory / WEIGHTS_NAME) as f:
        f.write(blob)
    write_text_atomic(directory / CONFIG_NAME, json.dumps(peft_config(adapter), indent=2) + "\n")
    if "mlx-lm" in export:
        save_mlx_lm(directory / MLX_LM_DIR, adapter)
    return directory


def save_mlx_lm(directory: Path, adapter: Adapter) -> None:
    from safetensors.numpy import save

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module in adapter.modules():
        tensors[f"{module}.lora_a"] = adapter.tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].T
        tensors[f"{module}.lora_b"] = adapter.tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"].T
        if adapter.use_dora:
            tensors[f"{module}.m"] = adapter.tensors[f"{PEFT_PREFIX}{module}.{MAGNITUDE}"]
    layers = {int(m.split(".")[2]) for m in adapter.modules() if m.startswith("model.layers.")}
    keys = sorted({".".join(m.split(".")[3:]) for m in adapter.modules()})
    with atomic_file(directory / "adapters.safetensors") as f:
        f.write(save({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}))
    config = {
        "fine_tune_type": "dora" if adapter.use_dora else "lora",
        "num_layers": len(layers),
        "lora_parameters": {
            "rank": adapter.r,
            "scale": adapter.scale,
            "dropout": adapter.dropout,
            "keys": keys,
        },
    }
    write_text_atomic(directory / "adapter_config.json", json.dumps(config, indent=2) + "\n")


def load_adapter(directory: str | Path) -> Adapter:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.exists() or not w_path.exists():
        raise AdapterError(
            f"{directory}: not an adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    check_regular_file(cfg_path, AdapterError)
    check_regular_file(w_path, AdapterError)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise AdapterError(f"{cfg_path}: cannot read: {e.strerror or e}") from e
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from e
    r, alpha, dropout, targets, use_dora = _check_config(cfg_path, cfg)
    try:
        tensors = load_file(str(w_path))
    except (OSError, SafetensorError, ValueError, TypeError) as e:  # numpy refuses some dtypes
        raise AdapterError(f"{w_path}: cannot read the adapter weights ({e})") from e
    bad = [k for k in tensors if not k.startswith(PEFT_PREFIX) or ".lora_" not in k]
    if bad:
        raise AdapterError(f"{w_path}: unexpected key {bad[0]!r} (expected PEFT LoRA keys)")
    for key, value in tensors.items():
        if value.dtype.kind != "f":
            raise AdapterError(
                f"{w_path}: tensor {key!r} is {value.dtype}, not a float tensor (not supported)"
            )
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{cfg_path}: base_model_name_or_path must be a string, got {base!r}")
    revision = cfg.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise AdapterError(f"{cfg_path}: revision must be a string, got {revision!r}")
    adapter = Adapter(tensors, r, alpha, dropout, targets, base, directory, revision, use_dora)
    problem = _shape_problem(adapter)
    if problem:
        raise AdapterError(f"{w_path}: {problem}")
    return adapter


# PEFT options that change what the adapter computes; we implement the value on the right only.
_UNSUPPORTED_OPTIONS = {
    "use_rslora": "rank-stabilised scaling",
    "fan_in_fan_out": "transposed (fan_in_fan_out) weights",
    "lora_bias": "LoRA biases",
    "use_qalora": "QA-LoRA",
}
_MUST_BE_EMPTY = (
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
)


def _check_config(cfg_path: Path, cfg: object) -> tuple[int, float, float, tuple[str, ...], bool]:
    """(r, alpha, dropout, targets, use_dora) of a LoRA or DoRA adapter_config.json; AdapterError
    naming the field for anything else."""
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported "
            "(only plain LoRA adapters)"
        )
    for name, what in _UNSUPPORTED_OPTIONS.items():
        value = cfg.get(name, False)
        if value not in (False, None):
            raise AdapterError(
                f"{cfg_path}: {name}: {value!r}: {what} is not supported (only plain LoRA adapters)"
            )
    use_dora = cfg.get("use_dora", False)
    if use_dora is not None and not isinstance(use_dora, bool):
        raise AdapterError(f"{cfg_path}: use_dora must be true or false, got {use_dora!r}")
    for name in _MUST_BE_EMPTY:
        if cfg.get(name) not in (None, [], {}, ""):
            raise AdapterError(f"{cfg_path}: {name} is not supported (only plain LoRA adapters)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias {cfg.get('bias')!r} is not supported (only 'none')")
    r, alpha, dropout = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{cfg_path}: r must be a positive integer, got {r!r}")
    if not _finite_number(alpha):
        raise AdapterError(f"{cfg_path}: lora_alpha must be a finite number, got {alpha!r}")
    dropout = 0.0 if dropout is None else dropout
    if not _finite_number(dropout) or not 0 <= dropout < 1:
        raise AdapterError(f"{cfg_path}: lora_dropout must be in [0, 1), got {dropout!r}")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise AdapterError(
            f"{cfg_path}: target_modules must be module names, got {cfg.get('target_modules')!r}"
        )
    return r, float(alpha), float(dropout), tuple(targets), bool(use_dora)


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shape_problem(adapter: Adapter) -> str | None:
    """What is wrong with the pairs of matrices, if anything (r from the config)."""
    for module in adapter.modules():
        a = adapter.tensors.get(f"{PEFT_PREFIX}{module}.lora_A.weight")
        b = adapter.tensors.get(f"{PEFT_PREFIX}{module}.lora_B.weight")
        if a is None or b is None:
            return f"{module} lacks its lora_{'A' if a is None else 'B'}.weight"
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != adapter.r or b.shape[1] != adapter.r:
            return (
                f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not match "
                f"r = {adapter.r} of {CONFIG_NAME}"
            )
        m = adapter.tensors.get(f"{PEFT_PREFIX}{module}.{MAGNITUDE}")
        if (m is not None) != adapter.use_dora:
            return (
                f"{module} lacks its {MAGNITUDE} (use_dora is true in {CONFIG_NAME})"
                if adapter.use_dora
                else f"{module} has a {MAGNITUDE} but use_dora is not true in {CONFIG_NAME}"
            )
        if m is not None and m.shape != (b.shape[0],):
            return f"{module}: {MAGNITUDE} {list(m.shape)} does not match lora_B {list(b.shape)}"
        if not all(np.isfinite(t).all() for t in (a, b) + (() if m is None else (m,))):
            return f"{module} holds NaN or infinite values"
    return None


def check_adapter_fits(adapter: Adapter, source) -> None:
    """AdapterError unless every adapted module is a weight of `source` (a ModelSource) with the
    shape the adapter's matrices imply."""
    where = adapter.directory or "the adapter"
    names = set(source.tensor_names())
    for module in adapter.modules():
        if f"{module}.weight" not in names:
            raise AdapterError(
                f"{where}: the model has no {module} (an adapter for another model?)"
            )
        out_f = adapter.tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"].shape[0]
        in_f = adapter.tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].shape[1]
        shape = tuple(source.tensor_shape(f"{module}.weight"))
        if shape != (out_f, in_f):
            raise AdapterError(
                f"{where}: {module} is {list(shape)} in the model but "
                f"{[out_f, in_f]} in the adapter (an adapter for another model?)"
            )
