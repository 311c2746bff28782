"""Atomic outputs: write to a temporary sibling, fsync, rename.

An interrupted run therefore leaves either nothing or a temporary name that no reader
mistakes for a finished file or model directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from .errors import InputIOError, UsageError

TEMP_PREFIX = ".adapterfmt-tmp-"
OLD_PREFIX = ".adapterfmt-old-"  # holds a replaced output for the instant between two renames
# Temp names carry the writer's host and pid, so that a later writer can remove what a killed
# one left (SIGKILL, power loss) without touching a live writer's temp on this or another host.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OWNED_RE = re.compile(rf"^{re.escape(TEMP_PREFIX)}([0-9a-f]{{8}})-([0-9]+)-")
# Errors of a failed write: the OS's, and safetensors' (its Rust writer wraps EFBIG, ENOSPC, ...).
WRITE_ERRORS = (OSError, SafetensorError)


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def sweep_stale_temps(parent: Path) -> list[Path]:
    """Remove temps in ``parent`` left by dead adapterfmt writers of this host; returns them.

    Example:
        >>> sweep_stale_temps(Path("."))  # doctest: +SKIP
        [PosixPath('.adapterfmt-tmp-1a2b3c4d-4242-k3j2h1')]
    """
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _OWNED_RE.match(entry.name)
        if not match or match.group(1) != _HOST or _alive(int(match.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def _write_failed(dest: Path, exc: BaseException) -> InputIOError:
    text = getattr(exc, "strerror", None) or str(exc)
    # safetensors: "Error while serializing: I/O error: File too large (os error 27)"
    match = re.search(r"I/O error: (.*?) \(os error \d+\)", text)
    return InputIOError(f"writing output failed: {match.group(1) if match else text}", path=dest,
                        hint="check free disk space and permissions; nothing was left behind")


def fsync_path(path: Path) -> None:
    """fsync a file or directory so a crash after rename cannot expose empty data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _normal_mode(path: Path, is_dir: bool) -> None:
    # mkstemp/mkdtemp create 0600/0700; outputs are ordinary user files.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask)


def check_output_path(out: Path, inputs: list[Path]) -> None:
    """Refuse outputs that would overwrite or live inside an input.

    Example:
        >>> check_output_path(Path("/tmp/out.safetensors"), [Path("/tmp/in.safetensors")])
    """
    out_r = out.resolve()
    for src in inputs:
        src_r = Path(src).resolve()
        if out_r == src_r:
            raise UsageError("output path is the input", path=out, hint="choose a different output path")
        if src_r.is_dir() and src_r in out_r.parents:
            raise UsageError(f"output is inside the input directory {src}", path=out,
                             hint="write the output somewhere outside the input")


@contextlib.contextmanager
def _creating(dest: Path, overwrite: bool) -> Iterator[Path]:
    """Refuse an existing ``dest`` unless ``overwrite``; yield its (created) parent; OSError -> our error."""
    if dest.exists() and not overwrite:
        raise UsageError("output already exists", path=dest, hint="remove it or pass --overwrite")
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(parent)
        yield parent
    except OSError as exc:
        raise InputIOError(f"cannot create output: {exc.strerror}", path=dest,
                           hint="check the directory exists and is writable") from None


@contextlib.contextmanager
def atomic_file(dest: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success fsync it and rename it to ``dest``.

    Example:
        >>> with atomic_file("out.bin") as tmp:
        ...     tmp.write_bytes(b"data")
    """
    dest = Path(dest)
    with _creating(dest, overwrite) as parent:
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(), dir=parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _normal_mode(tmp, False)
        fsync_path(tmp)
        os.replace(tmp, dest)
        fsync_path(parent)
    except WRITE_ERRORS as exc:
        raise _write_failed(dest, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(dest: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; on success fsync every file and rename it.

    An existing ``dest`` is refused unless ``overwrite`` (then it is replaced only after the
    new directory is complete).

    Example:
        >>> with atomic_directory("merged") as tmp:
        ...     (tmp / "config.json").write_text("{}")
    """
    dest = Path(dest)
    with _creating(dest, overwrite) as parent:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=parent))
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in files:
                _normal_mode(Path(root, name), False)
                fsync_path(Path(root, name))
            for name in dirs:
                _normal_mode(Path(root, name), True)
        _normal_mode(tmp, True)
        fsync_path(tmp)
        if dest.exists():
            # Not a sweepable temp name: if we die between the renames, the old output survives there.
            old = Path(tempfile.mkdtemp(prefix=OLD_PREFIX, dir=parent))
            os.replace(dest, old / "old")
            try:
                os.replace(tmp, dest)
            except OSError:
                os.replace(old / "old", dest)  # put the previous output back before reporting
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_path(parent)
    except WRITE_ERRORS as exc:
        raise _write_failed(dest, exc) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
