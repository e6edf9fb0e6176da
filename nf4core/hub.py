"""Models and data sets named by Hugging Face Hub id (`org/name` or `org/name@revision`), and the
Hub's cache directories given as paths (a repository folder `models--org--name` or one of its
snapshots).

The Hub's own library finds them: the cache first (`HF_HOME`, `HF_HUB_CACHE`); a download only
where the environment allows it (`HF_HUB_OFFLINE` unset). huggingface_hub is imported when a Hub id
or a cache directory is met, so plain paths work without it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub id of the embedded model
# what a download fetches: weights, configs and tokenizers; data files (never pickles)
DOWNLOAD_PATTERNS = {
    "model": ["*.json", "*.safetensors", "*.jinja", "tokenizer*"],
    "dataset": ["*.json", "*.jsonl", "*.parquet", "*.arrow", "**/*.json", "**/*.jsonl"]
    + ["**/*.parquet", "**/*.arrow"],
}
# a name ending so is a file's path, never a Hub id
FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".arrow", ".gguf", ".safetensors", ".yaml", ".txt"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # the Hub's name rules, loosely


class HubError(ModelLoadError):
    """A Hub id cannot be resolved, or a cache directory is not a repository or snapshot."""


@dataclass(frozen=True)
class HubRef:
    """A local directory or file and, when it is a Hub repository's snapshot, which one."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # None: the repository's main branch


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` reads as a Hub id (`name`, `org/name`, with an
    optional `@revision`); None when it reads as a path."""
    name, _, revision = spec.partition("@")
    if not _HUB_ID.match(name) or ".." in name or name.endswith((".", "-")):
        return None
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        return None
    if "@" in spec and not revision:
        return None
    return name, revision or None


def resolve(spec: str | os.PathLike, repo_type: str = "model") -> HubRef:
    """Where `spec` lives on disk: an existing path (a cache repository folder becomes its main
    snapshot), else the snapshot of the Hub id it names. A spec that is neither an existing path
    nor a Hub id comes back as its path, for the caller's "no such file" message."""
    path = Path(spec)
    if path.exists():
        return _cache_path(path, repo_type) or HubRef(path)
    parsed = parse_hub_id(os.fspath(spec))
    if parsed is None:
        return HubRef(path)
    repo_id, revision = parsed
    return HubRef(_snapshot(os.fspath(spec), repo_id, revision, repo_type), repo_id, revision)


def recorded_base(spec: str | None) -> tuple[str, str | None]:
    """(name, revision) an adapter records as its base: the Hub id when known (the embedded
    model's for None), else the path as the user gave it."""
    if spec is None:
        return DEFAULT_MODEL_ID, None
    try:
        ref = resolve(spec)
    except HubError:
        return spec, None
    return (ref.repo_id, ref.revision) if ref.repo_id else (spec, None)


def base_spec(name: str | None, revision: str | None = None) -> str | None:
    """What to open for an adapter's recorded base: None (the embedded model) for the embedded
    model's Hub id, else the name, with `@revision` when one is recorded."""
    if name is None or (name == DEFAULT_MODEL_ID and revision is None):
        return None
    return f"{name}@{revision}" if revision else name


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
    except ImportError:
        raise HubError(
            "reading Hugging Face Hub ids and caches needs huggingface_hub: "
            "pip install huggingface_hub"
        ) from None
    return huggingface_hub


def offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids downloads (read now, and as huggingface_hub read it)."""
    now = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return now or bool(_hub().constants.HF_HUB_OFFLINE)


def _snapshot(spec: str, repo_id: str, revision: str | None, repo_type: str) -> Path:
    hub = _hub()
    what = f"{'model' if repo_type == 'model' else 'data set'} {repo_id}"
    what += f" at revision {revision}" if revision else ""
    cache = hub.constants.HF_HUB_CACHE
    local_errors = (hub.errors.LocalEntryNotFoundError, hub.errors.HFValidationError, OSError)
    try:
        return Path(
            hub.snapshot_download(
                repo_id, repo_type=repo_type, revision=revision, local_files_only=True
            )
        )
    except local_errors:
        pass
    if offline():
        raise HubError(
            f"{spec}: no such file or directory, and the Hub {what} is not in the Hugging Face "
            f"cache ({cache}); HF_HUB_OFFLINE is set, so it is not downloaded"
        ) from None
    try:
        return Path(
            hub.snapshot_download(
                repo_id,
                repo_type=repo_type,
                revision=revision,
                allow_patterns=DOWNLOAD_PATTERNS[repo_type],
            )
        )
    except (hub.errors.HfHubHTTPError, hub.errors.HFValidationError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300]
        raise HubError(
            f"{spec}: no such file or directory, and the Hub {what} is not in the Hugging Face "
            f"cache ({cache}) and could not be downloaded ({type(e).__name__}: {reason})"
        ) from None


def _cache_path(path: Path, repo_type: str) -> HubRef | None:
    """The snapshot (with its repository id) that a cache repository folder or snapshot folder
    stands for; None for any other path."""
    prefix = f"{repo_type}s--"
    if path.is_dir() and path.name.startswith(prefix) and (path / "snapshots").is_dir():
        root, snapshot = path, None
    elif path.parent.name == "snapshots" and path.parent.parent.name.startswith(prefix):
        root, snapshot = path.parent.parent, path.name
    else:
        return None
    hub = _hub()
    try:
        info = hub.scan_cache_dir(root.parent)
    except (hub.errors.CacheNotFound, OSError) as e:
        raise HubError(f"{root}: not a readable Hugging Face cache repository ({e})") from None
    repo = next((r for r in info.repos if Path(r.repo_path).resolve() == root.resolve()), None)
    if repo is None:
        raise HubError(f"{root}: not a Hugging Face cache repository (refs/, snapshots/, blobs/)")
    revisions = {r.commit_hash: r for r in repo.revisions}
    if snapshot is not None:
        rev = revisions.get(snapshot)
        on_main = rev is not None and "main" in rev.refs
        return HubRef(path, repo.repo_id, None if on_main else snapshot)
    main = next((r for r in repo.revisions if "main" in r.refs), None)
    if main is not None:
        return HubRef(Path(main.snapshot_path), repo.repo_id)
    if len(revisions) == 1:
        (only,) = revisions.values()
        return HubRef(Path(only.snapshot_path), repo.repo_id, only.commit_hash)
    raise HubError(
        f"{root}: no refs/main and {len(revisions)} snapshots; give the snapshot directory "
        f"({root / 'snapshots'}/<commit>) instead"
    )
