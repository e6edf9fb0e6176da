"""A Hugging Face Hub cache built by hand in the Hub's real layout, for offline tests:
`<cache>/<type>s--<org>--<name>/` with `blobs/<hash>` (the bytes), `snapshots/<commit>/<path>`
(relative symlinks into blobs/) and `refs/<branch>` (the commit)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_snapshot(
    cache: Path,
    repo_id: str,
    files: Path,
    commit: str,
    *,
    repo_type: str = "model",
    ref: str | None = "main",
) -> Path:
    """Copy every file under `files` into the cache as the snapshot `commit` of `repo_id` (with
    `refs/<ref>` pointing at it); returns the snapshot directory."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for source in sorted(p for p in files.rglob("*") if p.is_file()):
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / source.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


def hub_env(hf_home: Path) -> dict[str, str]:
    """Environment variables that point huggingface_hub at `hf_home` and forbid the network."""
    return {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1"}
