"""Read a JSON object from a model's files: one clear line naming the file for any problem."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError
from .regular_file import check_regular_file


def read_json(path: Path) -> dict:
    check_regular_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
