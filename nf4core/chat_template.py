"""Chat templates (the model's own jinja2 template) rendered the way Hugging Face renders them.

A template comes from a file the user downloaded, so it runs sandboxed and bounded: no include,
import or extends; at most MAX_CALL_DEPTH nested calls (recursive macros); strings and lists built
with `*` or `+` at most MAX_SIZE long; RENDER_SECONDS of run time (enforced with a timer signal in
the main thread, and at every call elsewhere).
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_CALL_DEPTH = 64
MAX_SIZE = 1 << 20  # characters or items of one value built by the template, and of the output
RENDER_SECONDS = 5.0


class ChatTemplateError(ValueError):
    """A chat template is invalid, or raised an error for the given messages."""


class _Timeout(Exception):
    pass


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: object, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


class _Limits(threading.local):
    depth = 0
    deadline = float("inf")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus limits on call depth, run time and the size of built values."""

    intercepted_binops = frozenset({"*", "**", "+"})
    limits = _Limits()

    def call(self, context, obj, /, *args, **kwargs):
        limits = self.limits
        if time.monotonic() > limits.deadline:
            raise _Timeout
        if limits.depth >= MAX_CALL_DEPTH:
            raise ChatTemplateError(
                f"chat template nests calls more than {MAX_CALL_DEPTH} deep (recursion?)"
            )
        limits.depth += 1
        try:
            return super().call(context, obj, *args, **kwargs)
        finally:
            limits.depth -= 1

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise ChatTemplateError(f"chat template: exponent {right} is too large")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    _check_size(len(seq) * count)
        if (
            operator == "+"
            and isinstance(left, (str, list, tuple))
            and isinstance(right, (str, list, tuple))
        ):
            _check_size(len(left) + len(right))
        return super().call_binop(context, operator, left, right)


def _check_size(size: int) -> None:
    if size > MAX_SIZE:
        raise ChatTemplateError(f"chat template builds a value of {size} items (limit {MAX_SIZE})")


_UNSUPPORTED_TAGS = {
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "import",
    nodes.Extends: "extends",
}


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        tree = env.parse(source)
        for kind, tag in _UNSUPPORTED_TAGS.items():
            node = next(tree.find_all(kind), None)
            if node is not None:
                raise ChatTemplateError(
                    f"chat template line {node.lineno}: {{% {tag} %}} is not "
                    "supported (a template must be self-contained)"
                )
        return env.from_string(tree)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template line {exc.lineno}: {exc.message}") from None
    except RecursionError:
        raise ChatTemplateError("chat template is nested too deeply to parse") from None


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _Timeout in this thread after `seconds` (a timer signal in the main thread; elsewhere
    only the per-call deadline applies)."""
    limits = _BoundedEnvironment.limits
    limits.deadline, limits.depth = time.monotonic() + seconds, 0
    use_signal = threading.current_thread() is threading.main_thread() and hasattr(
        signal, "setitimer"
    )
    previous = None
    if use_signal:

        def on_alarm(signum, frame):
            raise _Timeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        limits.deadline = float("inf")
        if use_signal:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def render_chat(
    template: str, messages: list[dict], add_generation_prompt: bool = False, **variables: object
) -> str:
    """The conversation as one prompt string, e.g. ChatML for SmolLM2."""
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template must be a string, got {type(template).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatTemplateError(f"message {i} must be an object with a 'role', got {message!r}")
    compiled = _compile(template)
    try:
        with _time_limit(RENDER_SECONDS):
            text = compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
    except ChatTemplateError:
        raise
    except _Timeout:
        raise ChatTemplateError(f"chat template ran longer than {RENDER_SECONDS:g}s") from None
    except RecursionError:
        raise ChatTemplateError("chat template recursed too deeply") from None
    except Exception as exc:  # jinja2's errors, and whatever the template's own code raised
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None
    _check_size(len(text))
    return text
