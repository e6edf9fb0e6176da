"""Tokenizers from a Hugging Face `tokenizer.json` or rebuilt from GGUF metadata."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from .atomic import write_text_atomic
from .chat_template import ChatTemplateError, render_chat
from .errors import ModelLoadError
from .json_file import read_json
from .regular_file import check_regular_file

# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre` (facts of the models' own tokenizers).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_GPT2_PRE = ("default", "gpt-2", "gpt2")
_IGNORE_MERGES = ("llama-bpe", "llama3")
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
SPIECE_SPACE = "\u2581"


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` with the model's special tokens and chat template."""

    backend: tokenizers.Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    extra_config: dict = field(default_factory=dict)
    chat_template_source: str | None = None  # the file the template came from, for messages

    def __post_init__(self) -> None:
        for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, role)
            if token is not None and self.backend.token_to_id(token) is None:
                raise ValueError(f"{role} {token!r} is not in the vocabulary")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special tokens written in the text are recognised as such."""
        return self.backend.encode(check_text(text), add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """The pad token's id, else the eos token's."""
        return self.token_id(self.pad_token) if self.pad_token else self.eos_token_id

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, **variables: object
    ) -> str:
        """The conversation rendered with the model's own chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        try:
            return render_chat(
                self.chat_template,
                messages,
                add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **variables,
            )
        except ChatTemplateError as exc:
            if self.chat_template_source is None:
                raise
            raise ChatTemplateError(f"{self.chat_template_source}: {exc}") from None

    def save(self, directory: str | Path) -> None:
        """tokenizer.json and tokenizer_config.json, readable by transformers' AutoTokenizer."""
        directory = Path(directory)
        write_text_atomic(directory / "tokenizer.json", self.backend.to_str())
        config = {
            **self.extra_config,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        write_text_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """From tokenizer.json (+ tokenizer_config.json and chat_template.jinja when present)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if path.exists():
            check_regular_file(path)
        if not path.is_file():
            raise ModelLoadError(
                f"{path}: file not found (SentencePiece tokenizer.model files are "
                "not supported; a tokenizer.json is needed)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type for malformed files
            raise ModelLoadError(f"{path}: not a valid tokenizer.json: {exc}") from None
        config: dict = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            config = read_json(config_path)
        template = config.get("chat_template")
        source = f"{config_path} (chat_template)"
        if isinstance(template, list):  # named templates: take the default one
            named = [t for t in template if isinstance(t, dict)]
            template = next((t.get("template") for t in named if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise ModelLoadError(
                f"{config_path}: chat_template must be a string or a list of "
                f"named templates, got {type(template).__name__}"
            )
        jinja_path = directory / "chat_template.jinja"
        if template is None and jinja_path.exists():
            check_regular_file(jinja_path)
            try:
                template = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelLoadError(f"{jinja_path}: cannot read: {exc}") from None
            source = str(jinja_path)
        try:
            return cls(
                backend,
                _token(config.get("bos_token")),
                _token(config.get("eos_token")),
                _token(config.get("pad_token")),
                _token(config.get("unk_token")),
                template,
                chat_template_source=source,
            )
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"{config_path}: {exc}") from None

    @classmethod
    def from_gguf(cls, path: str | Path, get: Callable[[str, object], object]) -> Tokenizer:
        """Rebuilt from a GGUF file's `tokenizer.ggml.*` metadata (`get(key, default)` reads it)."""
        kind = get("tokenizer.ggml.model", None)
        tokens = get("tokenizer.ggml.tokens", None)
        if not tokens:
            raise ModelLoadError(f"{path}: has no tokenizer (tokenizer.ggml.tokens is missing)")
        types = get("tokenizer.ggml.token_type", None) or [1] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(
                path,
                tokens,
                get("tokenizer.ggml.merges", None),
                get("tokenizer.ggml.pre", "default"),
            )
            default_add_bos = False
        elif kind == "llama":
            backend = _sentencepiece_bpe(
                tokens,
                get("tokenizer.ggml.scores", None),
                types,
                get("tokenizer.ggml.add_space_prefix", True),
            )
            default_add_bos = True
        else:
            raise ModelLoadError(
                f"{path}: tokenizer model {kind!r} is not supported "
                "(supported: gpt2 byte-level BPE, llama SentencePiece BPE)"
            )
        backend.add_tokens(
            [
                AddedToken(tokens[i], special=False, normalized=False)
                for i, t in enumerate(types)
                if t == _TOKEN_USER_DEFINED
            ]
        )
        backend.add_special_tokens(
            [
                AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(types)
                if t == _TOKEN_CONTROL
            ]
        )

        def token_id(key: str) -> int | None:
            index = get(f"tokenizer.ggml.{key}_token_id", None)
            return index if index is not None and 0 <= index < len(tokens) else None

        def token(key: str) -> str | None:
            index = token_id(key)
            return None if index is None else tokens[index]

        bos, eos = token("bos"), token("eos")
        add_bos = bool(get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos is not None
        add_eos = bool(get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = (
            single
            + ([f"{bos}:1"] if add_bos else [])
            + ["$B:1"]
            + ([f"{eos}:1"] if add_eos else [])
        )
        specials = ([(bos, token_id("bos"))] if add_bos else []) + (
            [(eos, token_id("eos"))] if add_eos and not (add_bos and eos == bos) else []
        )
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )
        template = get("tokenizer.chat_template", None)
        if template is not None and not isinstance(template, str):
            raise ModelLoadError(f"{path}: tokenizer.chat_template must be a string")
        return cls(
            backend,
            bos,
            eos,
            token("padding"),
            token("unknown"),
            template,
            chat_template_source=f"{path} (tokenizer.chat_template)",
        )


def _token(value: object) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _byte_level_bpe(
    path: str | Path, tokens: list[str], merges: list[str] | None, pre: str
) -> tokenizers.Tokenizer:
    if not merges:
        raise ModelLoadError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # Llama 3's tokenizer.json takes a pre-token found whole in the vocabulary without merging
    backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _GPT2_PRE:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if pre == "qwen2":  # Qwen2's tokenizer.json normalizes to NFC first
            backend.normalizer = normalizers.NFC()
    else:
        raise ModelLoadError(
            f"{path}: pre-tokenizer {pre!r} is not supported (supported: "
            f"{', '.join(sorted({*_GPT2_PRE, 'smollm', *_SPLIT_PRE}))})"
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float] | None, types: list[int], add_space_prefix: bool
) -> tokenizers.Tokenizer:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral, TinyLlama) as a `tokenizers` BPE.

    GGUF stores no merges for it: a merge (a, b) exists where a, b and a+b are all pieces, ranked
    by the score of a+b (higher first), as SentencePiece's own BPE merges pieces.
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    scores = scores or [-float(i) for i in range(len(tokens))]
    found = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((-scores[piece_id], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(found)]
    unk = next((tokens[i] for i, t in enumerate(types) if t == 2), None)
    backend = tokenizers.Tokenizer(
        models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    steps = [normalizers.Prepend(SPIECE_SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPIECE_SPACE)])
    decode = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode)
    return backend


def check_text(text: object) -> str:
    """`text` if it is a string of valid Unicode; ValueError for a lone surrogate or a
    non-string."""
    if not isinstance(text, str):
        raise ValueError(f"expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text holds a lone surrogate ({text[exc.start]!r} at character "
            f"{exc.start}), which is not valid Unicode"
        ) from None
    return text


def encode_with_offsets(
    tokenizer: Tokenizer, text: str, add_special_tokens: bool = True
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and, for each, its (start, end) character span in `text` ((0, 0) for added ones)."""
    encoding = tokenizer.backend.encode(check_text(text), add_special_tokens=add_special_tokens)
    return encoding.ids, encoding.offsets
