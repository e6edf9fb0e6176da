"""Chat templates (the model's own jinja2 template) rendered the way Hugging Face renders them."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template is invalid, or raised an error for the given messages."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: object, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])  # fmt: skip
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template line {exc.lineno}: {exc.message}") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False,
                **variables: object) -> str:  # fmt: skip
    """The conversation as one prompt string, e.g. ChatML for SmolLM2."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"message {i} must be an object with a 'role', got {message!r}")
    try:
        return _compile(template).render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from None
