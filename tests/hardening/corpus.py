"""The bad-input corpus machinery: one :class:`Case` per row, run through the real CLI.

A row is ``Case(name, build, code, message)``: ``build(env)`` creates the bad input under
``env.tmp`` and returns the CLI arguments; the run must exit with ``code`` and print one line
matching ``message`` (plus ``;`` and a hint when ``code`` is not 0), no traceback, leave no output
or ``.adapterfmt-tmp-*`` file behind and leave every input byte-identical.

Rows live in ``cases_*.py`` modules next to this one (``CASES = [...]``); a new reader adds a
``cases_<reader>.py`` and :func:`all_cases` picks it up. ``python -m tests.hardening.corpus``
rewrites ``CORPUS.md`` (the table of case, exit code and message).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from adapterfmt.atomic import TEMP_PREFIX

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass
class Shared:
    """Inputs built once per session; builders copy them into their own ``tmp``."""

    root: Path
    base: Path  # tiny Llama directory
    peft: Path  # PEFT LoRA directory for ``base`` (q_proj, v_proj; r=4)
    adapter: Path  # that adapter converted to adapterfmt with --base


@dataclass
class Env:
    tmp: Path
    shared: Shared

    def copy(self, src: Path, name: str | None = None) -> Path:
        """Copy a shared file or directory into ``tmp`` (the case may then damage the copy)."""
        dst = self.tmp / (name or src.name)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        return dst


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@dataclass
class Case:
    """One row. ``runner`` defaults to click's CliRunner; ``check`` adds case-specific asserts."""

    name: str
    build: Callable[[Env], list]
    code: int
    message: str
    runner: Callable[[Env, list[str]], Result] | None = None
    check: Callable[[Env, Result], None] | None = None
    #: Paths (relative to tmp) that a successful (code 0) run is expected to create.
    creates: tuple[str, ...] = ()
    #: The case itself leaves a stale temp behind on purpose (SIGKILL); checked by ``check``.
    allow_temp: bool = False
    notes: str = ""
    id: str = field(init=False)

    def __post_init__(self):
        self.id = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


# ---------------------------------------------------------------- safetensors bytes by hand
def st_bytes(header: dict, data: bytes = b"", *, length: int | None = None, raw_header: bytes | None = None) -> bytes:
    """8-byte little-endian header length + JSON header (space padded to 8) + data."""
    text = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def split_file(path: Path) -> tuple[dict, bytes]:
    """(header JSON, data buffer) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def edit_manifest(path: Path, edit: Callable[[dict], None], *, version: str | None = None) -> Path:
    """Rewrite the manifest JSON of an adapterfmt file in place (tensors untouched)."""
    header, data = split_file(path)
    meta = header["__metadata__"]
    manifest = json.loads(meta["adapterfmt.manifest"])
    edit(manifest)
    # "ALPHA" stands for a literal JSON number Python cannot produce (1e400).
    meta["adapterfmt.manifest"] = json.dumps(manifest).replace('"ALPHA"', "1e400")
    if version is not None:
        meta["adapterfmt.version"] = version
    path.write_bytes(st_bytes(header, data))
    return path


def set_tensor(path: Path, name_suffix: str, value: torch.Tensor) -> Path:
    """Overwrite the data of the first tensor whose name ends with ``name_suffix`` (same dtype/shape)."""
    header, data = split_file(path)
    name = next(k for k in header if k.endswith(name_suffix))
    start, end = header[name]["data_offsets"]
    blob = value.contiguous().view(torch.uint8).numpy().tobytes()
    assert len(blob) == end - start, (name, len(blob), end - start)
    path.write_bytes(st_bytes(header, data[:start] + blob + data[end:]))
    return path


# ---------------------------------------------------------------- running
def run_inproc(env: Env, args: list[str]) -> Result:
    from click.testing import CliRunner

    from adapterfmt.cli import main
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        stderr += "Traceback (escaped the CLI):\n" + "".join(traceback.format_exception(result.exception))
    return Result(result.exit_code, result.stdout, stderr)


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "adapterfmt.cli", *args]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("ADAPTERFMT_DEBUG", None)
    return env


def run_subprocess(env: Env, args: list[str], preexec_fn=None, timeout: float = 120) -> Result:
    proc = subprocess.run(cli_command(args), capture_output=True, text=True, cwd=env.tmp, env=subprocess_env(),
                          preexec_fn=preexec_fn, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (directories as entries too, so new empty dirs show)."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                out[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                out[str(path)] = "dir"
    return out


def run_case(case: Case, env: Env) -> Result:
    """Build, run and check one row; raises AssertionError naming what went wrong."""
    args = [str(a) for a in case.build(env)]
    before = snapshot(env.tmp, env.shared.root)
    result = (case.runner or run_inproc)(env, args)
    after = snapshot(env.tmp, env.shared.root)
    where = f"[{case.name}] args={args}\nstdout={result.stdout!r}\nstderr={result.stderr!r}"
    assert "Traceback" not in result.stderr + result.stdout, where
    assert result.code == case.code, f"exit {result.code}, expected {case.code} {where}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.code != 0:
        assert len(lines) == 1, f"expected one stderr line {where}"
        assert not result.stdout.strip() or args[0] == "validate" and "--json" in args, where
        assert ";" in lines[0], f"message has no hint {where}"
    assert any(re.search(case.message, line) for line in lines + result.stdout.splitlines()), \
        f"no line matches {case.message!r} {where}"
    changed = {p for p in before if after.get(p) != before[p]}
    assert not changed, f"inputs changed: {sorted(changed)} {where}"
    created = set(after) - set(before)
    allowed = {str(env.tmp / c) for c in case.creates} if case.code == 0 else set()
    created = {p for p in created if not any(p == a or p.startswith(a + os.sep) for a in allowed)}
    if case.allow_temp:
        created = {p for p in created if TEMP_PREFIX not in p}
    assert not created, f"left behind: {sorted(created)} {where}"
    if case.check is not None:
        case.check(env, result)
    return result


# ---------------------------------------------------------------- shared inputs and the table
def build_shared(root: Path) -> Shared:
    from adapterfmt.ops.convert import convert

    from ..helpers import make_peft_adapter, tiny_llama
    root.mkdir(parents=True, exist_ok=True)
    base = tiny_llama(root / "base")
    peft = make_peft_adapter(base, root / "peft", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapter = root / "adapter.safetensors"
    convert(peft, adapter, base=base)
    return Shared(root=root, base=base, peft=peft, adapter=adapter)


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for path in sorted(HERE.glob("cases_*.py")):
        cases += importlib.import_module(f"{__package__}.{path.stem}").CASES
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case names"
    return cases


def markdown_row(case: Case, result: Result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()] or result.stdout.splitlines()[:1]
    message = re.sub(r"/tmp/[^ :']*/", "…/", lines[0] if lines else "").replace("|", r"\|")
    message = re.sub(r" in [0-9.]+s(, peak RSS [0-9]+ MiB)?$", " in …s", message)  # timings would make the table churn
    return f"| {case.name} | {result.code} | {message} |"


def write_table(target: Path = HERE / "CORPUS.md") -> None:
    """Run every case and write the markdown table (``python -m tests.hardening.corpus``)."""
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        shared = build_shared(Path(work) / "shared")
        rows = []
        for case in all_cases():
            tmp = Path(work) / case.id
            tmp.mkdir()
            rows.append(markdown_row(case, run_case(case, Env(tmp, shared))))
    text = ["# Bad-input corpus", "",
            "Generated by `python -m tests.hardening.corpus`; every row is a test in",
            "`tests/hardening/test_bad_inputs.py` (exit codes: 0 ok, 1 invalid input, 2 usage/IO).", "",
            "| case | exit | message (one line, stderr) |", "|---|---|---|", *rows, ""]
    target.write_text("\n".join(text))
    print(f"wrote {target} ({len(rows)} cases)")


if __name__ == "__main__":
    write_table()
