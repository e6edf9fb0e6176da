"""The record shapes people's data comes in, mapped to the three we train on.

Ours: "text" `{"text"}`, "completion" `{"prompt", "completion"}` (strings) and "chat"
`{"messages", "first_target", "tools"?}`, where the loss covers the assistant turns from message
`first_target` on. Theirs, by name (`--data-format`):

- messages: `{"messages": [{"role", "content"}]}` as OpenAI and TRL write them: `content` a string,
  a list of parts (the text parts joined by newlines; any other part is refused by its type), or
  null in an assistant turn that makes `tool_calls`; `tool` turns; `tools` beside `messages`; an
  assistant turn's `weight` (OpenAI's: 0 leaves the turn out of the loss, 1 keeps it).
- sharegpt: `{"conversations": [{"from", "value"}]}` (human/user, gpt/assistant, system, tool).
- alpaca: `{"instruction", "input"?, "output", "system"?}`: the user turn is the instruction, then a
  blank line and the input when there is one.
- prompt-completion: strings, or TRL's conversational form (lists of messages; the loss covers the
  completion only).
- text: `{"text"}`.

"auto" names each record's format by its keys, in that order. A key whose value is null counts as
absent (columnar files fill missing keys with nulls).
"""

from __future__ import annotations

FORMATS = ("messages", "sharegpt", "alpaca", "prompt-completion", "text")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}


class RecordShapeError(ValueError):
    """A record is not of the shape its format needs (the message says what is wrong)."""


def detect(value: dict) -> str:
    """The format a record is in, by its keys (RecordShapeError naming the keys when none fits)."""
    keys = {k for k, v in value.items() if v is not None}
    if "messages" in keys:
        messages = value["messages"]
        sharegpt = isinstance(messages, list) and messages and isinstance(messages[0], dict)
        return "sharegpt" if sharegpt and "from" in messages[0] else "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"chosen", "rejected"} <= keys:
        raise RecordShapeError(
            "a preference record ('chosen'/'rejected', for DPO-style training) is not supported"
        )
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if "prompt" in keys and "text" not in keys:
        raise RecordShapeError("a 'prompt' without a 'completion' has nothing to learn from")
    if "text" in keys:
        return "text"
    raise RecordShapeError(
        f"no known record shape (keys: {sorted(value)}); expected 'messages', 'conversations', "
        "'instruction'/'output', 'prompt'/'completion' or 'text'"
    )


def to_record(value: object, data_format: str = "auto") -> tuple[str, dict, str]:
    """(kind, fields, format) of one record; RecordShapeError says what is wrong."""
    if not isinstance(value, dict):
        raise RecordShapeError(f"expected a JSON object, got {type(value).__name__}")
    fmt = detect(value) if data_format == "auto" else data_format
    if fmt == "messages":
        return "chat", _chat(_messages(value, "messages"), value), fmt
    if fmt == "sharegpt":
        key = "messages" if value.get("messages") is not None else "conversations"
        return "chat", _chat(_sharegpt(value, key), value), fmt
    if fmt == "alpaca":
        return "chat", _chat(_alpaca(value), value), fmt
    if fmt == "prompt-completion":
        return _prompt_completion(value) + (fmt,)
    if fmt == "text":
        if not isinstance(value.get("text"), str):
            raise RecordShapeError("'text' must be a string")
        return "text", {"text": value["text"]}, fmt
    raise ValueError(f"unknown data format {data_format!r}; choose from auto, {', '.join(FORMATS)}")


def _chat(messages: list[dict], value: dict, first_target: int = 0) -> dict:
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages[first_target:]):
        raise RecordShapeError("no assistant message to learn from")
    fields = {"messages": messages, "first_target": first_target}
    tools = value.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RecordShapeError("'tools' must be a list of objects")
        fields["tools"] = tools
    return fields


def _messages(value: dict, key: str) -> list[dict]:
    messages = value.get(key)
    if not isinstance(messages, list) or not messages:
        raise RecordShapeError(f"'{key}' must be a non-empty list")
    return [_message(m, f"{key}[{i}]") for i, m in enumerate(messages)]


def _message(m: object, where: str) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RecordShapeError(f"{where} must be an object with a string 'role'")
    out = {k: v for k, v in m.items() if v is not None}
    content = m.get("content")
    if isinstance(content, list):
        out["content"] = _joined_text(content, f"{where}.content")
    elif content is None:
        if m["role"] != "assistant" or not m.get("tool_calls"):
            raise RecordShapeError(
                f"{where}.content must be a string (null only in an assistant turn with tool_calls)"
            )
        out["content"] = ""
    elif not isinstance(content, str):
        raise RecordShapeError(f"{where}.content must be a string or a list of parts")
    weight = out.get("weight")
    if weight is not None and (m["role"] != "assistant" or weight not in (0, 1)):
        raise RecordShapeError(f"{where}.weight must be 0 or 1, in an assistant turn")
    calls = out.get("tool_calls")
    if calls is not None and (
        m["role"] != "assistant"
        or not isinstance(calls, list)
        or not all(isinstance(c, dict) for c in calls)
    ):
        raise RecordShapeError(f"{where}.tool_calls must be a list of objects in an assistant turn")
    return out


def _joined_text(parts: list, where: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"type {kind!r}" if kind is not None else "no 'type'"
            raise RecordShapeError(f"{where}[{i}]: a content part of {what} (only text parts)")
        if not isinstance(part.get("text"), str):
            raise RecordShapeError(f"{where}[{i}].text must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def _sharegpt(value: dict, key: str) -> list[dict]:
    turns = value.get(key)
    if not isinstance(turns, list) or not turns:
        raise RecordShapeError(f"'{key}' must be a non-empty list")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordShapeError(f"{key}[{i}] must be an object")
        speaker, text = t.get("from"), t.get("value")
        if speaker is None and "role" in t:  # role/content turns under 'conversations'
            messages.append(_message(t, f"{key}[{i}]"))
            continue
        if speaker not in SHAREGPT_ROLES:
            raise RecordShapeError(
                f"{key}[{i}].from: unknown speaker {speaker!r} (known: {', '.join(SHAREGPT_ROLES)})"
            )
        if not isinstance(text, str):
            raise RecordShapeError(f"{key}[{i}].value must be a string")
        message = {"role": SHAREGPT_ROLES[speaker], "content": text}
        if t.get("weight") is not None:
            message["weight"] = t["weight"]
        messages.append(_message(message, f"{key}[{i}]"))
    return messages


def _alpaca(value: dict) -> list[dict]:
    fields = {k: value.get(k) for k in ("instruction", "input", "output", "system")}
    for name, v in fields.items():
        if v is not None and not isinstance(v, str):
            raise RecordShapeError(f"'{name}' must be a string")
    if fields["instruction"] is None or fields["output"] is None:
        raise RecordShapeError("an alpaca record needs 'instruction' and 'output'")
    user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    system = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
    return system + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": fields["output"]},
    ]


def _prompt_completion(value: dict) -> tuple[str, dict]:
    prompt, completion = value.get("prompt"), value.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return "completion", {"prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        head = _messages(value, "prompt")
        return "chat", _chat(head + _messages(value, "completion"), value, len(head))
    raise RecordShapeError(
        "'prompt' and 'completion' must both be strings, or both lists of messages"
    )
