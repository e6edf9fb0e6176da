"""The public Python API: everything the CLI does, as functions (the CLI calls only these).

from backends import api
model = api.load("path/or/None", adapter="runs/x")          # base (+ adapter), backend chosen
print(model.chat("Shift every digit up by one ...\\n1 2 3"))
result = api.finetune(api.FinetuneConfig(steps=20, out="runs/x"))
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import nf4core
from nf4core.data_files import read_records
from nf4core.hub import recorded_base

from .engine import Engine, LoRASettings
from .evaluate import ExactMatch, exact_match_score, perplexity, stop_ids
from .export import check_export_options
from .export import export as export_model
from .finetune import FinetuneResult, RunInterrupted, finetune
from .finetune_config import ConfigError, FinetuneConfig
from .merge import merge
from .model_info import describe
from .nonfinite import NonFiniteError
from .peft_adapter import Adapter, check_adapter_fits, load_adapter, save_adapter
from .registry import BackendChoice, build_engine, select_backend
from .run_log import PhaseDisplay


@dataclass
class LoadedModel:
    """A model (NF4 base, adapters when loaded or attached) on the chosen backend."""

    engine: Engine
    tokenizer: nf4core.Tokenizer
    choice: BackendChoice
    path: str
    adapter: str | None = None  # the adapter directory loaded, for messages
    base: str | None = None  # the model as the caller named it (None: the embedded model)

    def stream(
        self,
        prompt: str,
        *,
        chat: bool = True,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Iterator[str]:
        """Yield the decoded text of new tokens as they come (chat template applied when `chat`)."""
        check_sampling(max_new_tokens, temperature, top_p)
        if chat and self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True
            )
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(prompt)
        eos = stop_ids(self.tokenizer)
        out: list[int] = []
        shown = ""
        with self.engine.inference():
            for token in self.engine.generate(ids, max_new_tokens, temperature, top_p, seed, eos):
                if token in eos:
                    break
                out.append(token)
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits
                    yield text[len(shown) :]
                    shown = text

    def chat(self, prompt: str, **kw) -> str:
        return "".join(self.stream(prompt, **kw))

    def evaluate(
        self,
        data: str | os.PathLike,
        batch_size: int = 4,
        max_seq_len: int = 2048,
        max_examples: int = 0,
        progress: bool = False,
    ) -> dict:
        """Perplexity on a data file (any format of nf4core.data_files), and exact match on its
        chat / prompt-completion records; `progress` shows each phase on stderr."""
        ds, _ = nf4core.load_dataset(
            nf4core.DataConfig(train=data, max_length=max_seq_len), self.tokenizer
        )
        pad = self.tokenizer.pad_token_id or 0
        display = PhaseDisplay(enabled=progress)
        with display.phase(f"loss on {len(ds)} examples") as c:
            loss, ppl = perplexity(self.engine, ds, batch_size, pad, progress=c.update)
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"{self.adapter or self.path}: the loss on {data} is {loss} (not "
                "finite); check the adapter's weights and lora_alpha"
            )
        records = [r.fields for r in read_records(data)[0] if _has_reference_answer(r)]
        if max_examples:
            records = records[:max_examples]
        em = None
        if records:
            with display.phase(f"exact match on {len(records)} examples") as c:
                em = exact_match_score(self.engine, self.tokenizer, records, progress=c.update)
        return {
            "loss": loss,
            "perplexity": ppl,
            "examples": len(ds),
            "exact_match": None if em is None else em.score,
            "exact_match_examples": 0 if em is None else em.total,
        }

    def save_adapter(self, directory: str | os.PathLike, lora: LoRASettings) -> Path:
        name, revision = recorded_base(self.base)
        adapter = Adapter(
            self.engine.adapters(),
            lora.r,
            lora.alpha,
            lora.dropout,
            lora.targets,
            use_dora=lora.use_dora,
        )
        return save_adapter(directory, replace(adapter, base_model=name, base_revision=revision))


def _has_reference_answer(record) -> bool:
    """Whether exact match can score the record: a completion, or a chat ending in an assistant
    turn of plain text (no tools)."""
    if record.kind == "completion":
        return True
    last = record.fields.get("messages", [{}])[-1]
    return (
        record.kind == "chat"
        and last["role"] == "assistant"
        and "tool_calls" not in last
        and "tools" not in record.fields
    )


def check_sampling(max_new_tokens: object, temperature: object, top_p: object) -> None:
    """ValueError naming the first sampling setting out of range (nan and inf included)."""
    count = max_new_tokens
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def load(
    model: str | os.PathLike | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    lora: LoRASettings | None = None,
    backend: str | None = None,
    device: str | None = None,
    compute_dtype: str | None = None,
) -> LoadedModel:
    """Open `model` (default: the embedded SmolLM2-135M-Instruct) as NF4 on the chosen backend, with
    the PEFT adapter in `adapter` loaded, or fresh adapters from `lora` attached."""
    path = str(model) if model is not None else str(nf4core.default_model_path())
    loaded = load_adapter(adapter) if adapter is not None else None
    if loaded is not None:
        modules = {m.rsplit(".", 1)[-1] for m in loaded.modules()}
        lora = LoRASettings(
            loaded.r, loaded.alpha, 0.0, tuple(sorted(modules)), use_dora=loaded.use_dora
        )
    choice = select_backend(backend, device, compute_dtype)
    source = nf4core.open_model(path)
    if loaded is not None:
        check_adapter_fits(loaded, source)
    engine = build_engine(choice, source, lora, None)
    if loaded is not None:
        engine.load_adapters(loaded.tensors)
    adapter_dir = None if adapter is None else str(adapter)
    base = None if model is None else str(model)
    return LoadedModel(engine, source.tokenizer(), choice, path, adapter_dir, base)


def quantize(
    model: str | os.PathLike,
    out: str | os.PathLike,
    blocksize: int = 64,
    double_quant: bool = True,
    method: str | None = None,
) -> Path:
    """Any source -> a bitsandbytes-format NF4 Hugging Face directory. `method` chooses the block
    scales ("absmax": bitsandbytes' own; "mse": least error; default DEFAULT_QUANT_METHOD)."""
    method = method or nf4core.model_quantize.DEFAULT_QUANT_METHOD
    return nf4core.quantize_model(model, out, blocksize, double_quant, method)


def merge_adapter(
    model: str | os.PathLike | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "bfloat16",
    requantize: bool = False,
    fmt: str = "hf",
) -> Path:
    """Adapter + base -> a merged directory (16-bit, or NF4 again with `requantize`), or a merged
    GGUF file (`fmt="gguf"`)."""
    path = str(model) if model is not None else str(nf4core.default_model_path())
    check_export_options(fmt, dtype)
    if fmt == "gguf":
        if requantize:
            raise ValueError("--nf4 writes a bitsandbytes directory, not a GGUF file: drop one")
        if Path(out).exists() and not (Path(out).is_dir() and not any(Path(out).iterdir())):
            raise FileExistsError(f"{out}: the output exists (merge writes a new OUT only)")
        return export_model(path, out, "gguf", dtype, load_adapter(adapter))
    return merge(path, load_adapter(adapter), out, dtype, requantize)


def export(
    model: str | os.PathLike | None,
    out: str | os.PathLike,
    fmt: str = "hf",
    dtype: str = "bfloat16",
    adapter: str | os.PathLike | None = None,
    overwrite: bool = False,
    echo=print,
) -> Path:
    """Any model (+ a PEFT adapter merged in) -> a dense Hugging Face directory (`fmt="hf"`) or a
    GGUF file for llama.cpp (`fmt="gguf"`, also `dtype="q8_0"`)."""
    path = str(model) if model is not None else str(nf4core.default_model_path())
    loaded = load_adapter(adapter) if adapter is not None else None
    return export_model(path, out, fmt, dtype, loaded, overwrite, echo)


def info(
    path: str | os.PathLike | None,
    seq_len: int = 512,
    batch_size: int = 1,
    lora_r: int = 8,
    nproc: int | None = None,
) -> dict:
    """Architecture, parameter counts, bits per weight and a training-memory estimate (models);
    rank and targets (adapters); step, backend and config (checkpoints). With `nproc` (models), each
    rank's memory in a run of that many processes with a global batch of `batch_size` rows."""
    path = path if path is not None else nf4core.default_model_path()
    return describe(path, seq_len, batch_size, lora_r, nproc)


__all__ = [
    "ConfigError",
    "ExactMatch",
    "export",
    "FinetuneConfig",
    "FinetuneResult",
    "LoRASettings",
    "LoadedModel",
    "NonFiniteError",
    "RunInterrupted",
    "finetune",
    "info",
    "load",
    "merge_adapter",
    "quantize",
]
