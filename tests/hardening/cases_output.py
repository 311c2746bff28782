"""Corpus rows for the writers: output collisions, unwritable locations, disk full, SIGKILL."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapterfmt.atomic import TEMP_PREFIX

from .corpus import Case, Env, Result, cli_command, run_subprocess, subprocess_env


def adapter(env: Env) -> Path:
    return env.copy(env.shared.adapter, "in.safetensors")


def out_is_input(env):
    src = adapter(env)
    return ["convert", src, src, "--overwrite"]


def out_symlink_to_input(env):
    src = adapter(env)
    (env.tmp / "out.safetensors").symlink_to(src)
    return ["convert", src, env.tmp / "out.safetensors", "--overwrite"]


def out_inside_peft_input(env):
    src = env.copy(env.shared.peft, "peft")
    return ["convert", src, src / "out.safetensors"]


def merge_into(where):
    def build(env):
        base = env.copy(env.shared.base, "base")
        return ["merge", "--base", base, "--adapter", env.shared.adapter, "--out", where(base)]
    return build


def out_exists(env):
    src = adapter(env)
    (env.tmp / "peft-out").mkdir()
    (env.tmp / "peft-out" / "keep.txt").write_text("mine")
    return ["convert", src, env.tmp / "peft-out", "--to", "peft"]


def read_only_location(env):
    src = adapter(env)
    if os.geteuid() != 0:
        locked = env.tmp / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return ["convert", src, locked / "out.safetensors"]
    # root ignores permission bits; /sys is a read-only mount even for root.
    return ["convert", src, "/sys/adapterfmt-hardening-out.safetensors"]


def parent_is_a_file(env):
    src = adapter(env)
    (env.tmp / "afile").write_text("not a directory")
    return ["convert", src, env.tmp / "afile" / "out.safetensors"]


# ---------------------------------------------------------------- disk full (RLIMIT_FSIZE)
def disk_full(limit_bytes: int):
    def limit():
        # Ignoring SIGXFSZ turns "file too large" into an EFBIG write error instead of a kill.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    def runner(env: Env, args: list[str]) -> Result:
        return run_subprocess(env, args, preexec_fn=limit)
    return runner


def convert_to(target: str, fmt: str = "adapterfmt"):
    def build(env):
        src = env.copy(env.shared.peft if fmt == "adapterfmt" else env.shared.adapter,
                       "peft" if fmt == "adapterfmt" else "in.safetensors")
        return ["convert", src, env.tmp / target, "--to", fmt]
    return build


def merge_out(env):
    return ["merge", "--base", env.shared.base, "--adapter", env.shared.adapter, "--out", env.tmp / "merged"]


# ---------------------------------------------------------------- SIGKILL mid-write
BIG = "zz.big.weight"  # sorted last, so the merge is writing when we kill it


def big_base(env):
    base = env.copy(env.shared.base, "base")
    tensors = load_file(str(base / "model.safetensors"))
    tensors[BIG] = torch.ones(4096, 4096)  # 64 MiB: writing it takes long enough to be caught
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    return ["merge", "--base", base, "--adapter", env.shared.adapter, "--out", env.tmp / "merged"]


def _partial_temp(parent: Path) -> Path | None:
    try:  # entries come and go while the writer runs
        for entry in parent.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and entry.is_dir():
                for item in entry.iterdir():
                    if item.stat().st_size > 0:
                        return item
    except OSError:
        pass
    return None


def kill_mid_write(env: Env, args: list[str]) -> Result:
    """Kill -9 as soon as the output's temp directory holds data; then rerun to completion."""
    out = Path(args[args.index("--out") + 1])
    proc = subprocess.Popen(cli_command(args), cwd=env.tmp, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, caught = time.monotonic() + 120, None
    while proc.poll() is None and time.monotonic() < deadline and caught is None:
        caught = _partial_temp(out.parent)
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert caught is not None, "the merge finished before a partial write was seen"
    assert not out.exists(), "a killed merge left something at the output path"
    assert any(p.name.startswith(TEMP_PREFIX) for p in out.parent.iterdir())
    return run_subprocess(env, args)


def no_stale_temp(env: Env, result: Result) -> None:
    left = [p.name for p in env.tmp.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert not left, f"the rerun did not sweep the killed run's temp: {left}"
    assert (env.tmp / "merged" / "model.safetensors").is_file()


CASES = [
    Case("output path is the input", out_is_input, 2, r"in\.safetensors: output path is the input; choose"),
    Case("output is a symlink to the input", out_symlink_to_input, 2, r"out\.safetensors: output path is the input"),
    Case("output inside the input directory", out_inside_peft_input, 2,
         r"out\.safetensors: output is inside the input directory .*peft; write the output somewhere outside"),
    Case("merge output is the base", merge_into(lambda base: base), 2, r"base: output path is the input"),
    Case("merge output inside the base", merge_into(lambda base: base / "merged"), 2,
         r"merged: output is inside the input directory"),
    Case("output exists without --overwrite", out_exists, 2, r"peft-out: output already exists; remove it or pass"),
    Case("read-only output location", read_only_location, 2,
         r"out\.safetensors: cannot create output: Permission denied; check the directory"),
    Case("output parent is a file", parent_is_a_file, 2, r"out\.safetensors: cannot create output: .*; check"),
    Case("disk full: convert to adapterfmt", convert_to("out.safetensors"), 2,
         r"out\.safetensors: writing output failed: File too large; check free disk space",
         runner=disk_full(4096)),
    Case("disk full: convert to peft", convert_to("peft-out", "peft"), 2,
         r"peft-out: writing output failed: File too large; check free disk space", runner=disk_full(4096)),
    Case("disk full: merge", merge_out, 2, r"merged: writing output failed: File too large",
         runner=disk_full(64 * 1024)),
    Case("SIGKILL mid-merge, then rerun", big_base, 0, r"merged 4 of 22 tensors", runner=kill_mid_write,
         creates=("merged",), check=no_stale_temp),
]
