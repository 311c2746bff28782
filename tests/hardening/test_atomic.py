"""Atomic writers: stale-temp sweeping and the overwrite path's failure handling."""
import os
import subprocess
import sys

import pytest

from adapterfmt import atomic
from adapterfmt.errors import InputIOError


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_dead_writers_of_this_host(tmp_path):
    dead = tmp_path / f"{atomic.TEMP_PREFIX}{atomic._HOST}-{dead_pid()}-abc"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f"{atomic._temp_prefix()}live"
    live.write_bytes(b"")
    other_host = tmp_path / f"{atomic.TEMP_PREFIX}00000000-{dead_pid()}-x"
    other_host.write_bytes(b"")
    old = tmp_path / f"{atomic.OLD_PREFIX}keep"
    old.mkdir()
    legacy = tmp_path / f"{atomic.TEMP_PREFIX}xyz"
    legacy.write_bytes(b"")
    assert atomic.sweep_stale_temps(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other_host, old, legacy))


def test_overwrite_restores_old_output_when_final_rename_fails(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the rename of the new directory into place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(InputIOError, match="writing output failed: No space left on device"):
        with atomic.atomic_directory(dest, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (dest / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
