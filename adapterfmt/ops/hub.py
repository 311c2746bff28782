"""Hugging Face Hub inputs: ``hf://owner/repo[@revision][/subfolder-or-file]`` resolved to a local path.

Files come through ``huggingface_hub.snapshot_download`` (its cache; ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` are read at call time), fetching only adapter/model files, never pickles.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputIOError, UsageError

PREFIXES = ("hf://", "hf:/")  # pathlib collapses "//", so "hf:/" is what a Path turns it into
#: What an adapter or base model directory needs; weights only as safetensors/GGUF.
PATTERNS = ("*.json", "*.safetensors", "*.gguf")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub(spec: str | os.PathLike) -> bool:
    """True for ``hf://...`` (also after pathlib collapsed it to ``hf:/...``).

    Example:
        >>> is_hub("hf://org/adapter"), is_hub("./adapter")
        (True, False)
    """
    return str(spec).startswith(PREFIXES)


def parse_hub(spec: str | os.PathLike) -> tuple[str, str | None, str]:
    """Split a hub spec into (repo_id, revision, subpath) with huggingface_hub's own URI parser.

    Example:
        >>> parse_hub("hf://org/repo@v1/adapters/a")
        ('org/repo', 'v1', 'adapters/a')
        >>> parse_hub("hf://org/repo@refs/pr/3/sub")
        ('org/repo', 'refs/pr/3', 'sub')
    """
    from huggingface_hub import parse_hf_uri
    text = str(spec)
    uri = "hf://" + text[len(next(p for p in PREFIXES if text.startswith(p))):].lstrip("/")
    usage = UsageError(f"{text!r} is not hf://owner/repo[@revision][/subfolder]")
    try:
        parsed = parse_hf_uri(uri)
    except Exception:  # HfUriError, and ValueError from older releases
        raise usage from None
    sub = parsed.path_in_repo.strip("/")
    if parsed.type != "model" or not _REPO_RE.match(parsed.id or "") or ".." in sub.split("/"):
        raise usage
    return parsed.id, parsed.revision or None, sub


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value:
        return value.strip().lower() in ("1", "true", "yes", "on")
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def resolve_path(spec: str | os.PathLike | None) -> Path | None:
    """A local path for ``spec``: unchanged unless it is ``hf://...``, which is fetched (or found in the cache).

    Example:
        >>> resolve_path("adapter.safetensors")
        PosixPath('adapter.safetensors')
        >>> resolve_path("hf://org/lora@main/sub")  # doctest: +SKIP
        PosixPath('/home/me/.cache/huggingface/hub/models--org--lora/snapshots/<commit>/sub')
    """
    if spec is None or not is_hub(spec):
        return None if spec is None else Path(spec)
    repo_id, revision, sub = parse_hub(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise UsageError("hf:// inputs need huggingface_hub", hint="pip install huggingface_hub") from None
    patterns = list(PATTERNS) if not sub else [sub] + [f"{sub}/{p}" for p in PATTERNS]
    where = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                 cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=_offline())
    except Exception as exc:  # the hub client raises many types (HTTP, offline, cache, validation)
        if _offline():
            detail = "HF_HUB_OFFLINE is set and it is not in the cache"
        else:  # first sentence only: hub errors run to several lines
            detail = f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise InputIOError(f"cannot get {repo_id}{'@' + revision if revision else ''} from the Hub ({detail})",
                           path=where, hint="check the repo id, revision and your network or cache") from None
    path = Path(root) / sub if sub else Path(root)
    if not path.exists():
        raise InputIOError(f"{sub!r} is not in the repo (snapshot {Path(root).name[:12]})", path=where,
                           hint="check the subfolder/file name; only .json/.safetensors/.gguf files are fetched")
    return path


def push_to_hub(path: str | os.PathLike, repo_id: str) -> str:
    """Upload a converted file or directory to a Hub model repo (created if missing); returns its URL.

    Example:
        >>> push_to_hub("adapter.gguf", "me/my-lora-gguf")  # doctest: +SKIP
        'https://huggingface.co/me/my-lora-gguf'
    """
    path = Path(path)
    if not _REPO_RE.match(repo_id):
        raise UsageError(f"{repo_id!r} is not a repo id (owner/name)")
    if _offline():
        raise UsageError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set", path=path)
    from huggingface_hub import HfApi
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        if path.is_dir():
            api.upload_folder(repo_id=repo_id, folder_path=str(path), commit_message="Upload adapter (adapterfmt)")
        else:
            api.upload_file(repo_id=repo_id, path_or_fileobj=str(path), path_in_repo=path.name,
                            commit_message="Upload adapter (adapterfmt)")
    except Exception as exc:  # HTTP, auth and validation errors from the hub client
        line = (str(exc).strip().splitlines() or [""])[0][:160]
        raise InputIOError(f"upload to {repo_id} failed ({type(exc).__name__}: {line})", path=path,
                           hint="check `huggingface-cli login` and the repo name; the local output is kept") from None
    return f"https://huggingface.co/{repo_id}"
