"""One fuzz input -> one read of the container/manifest reader. Shared by the hypothesis test
(``test_fuzz_reader.py``) and the atheris target (``fuzz/fuzz_reader.py``).

The first byte picks what the rest replaces in a valid seed file:
0 the whole file, 1 the manifest JSON text, 2 the safetensors header JSON (length prefix fixed up).
The only exceptions allowed out of the reader are :class:`AdapterFmtError` subclasses.
"""
from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

from adapterfmt.errors import AdapterFmtError
from adapterfmt.format import read_adapter
from adapterfmt.ops.inspection import inspect_adapter

SEED = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "v1.0" / "lora_rank_alpha_rslora.safetensors"
MODES = 3


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header_text: bytes, data: bytes) -> bytes:
    header_text += b" " * (-len(header_text) % 8)
    return struct.pack("<Q", len(header_text)) + header_text + data


def seed_inputs(seed: Path = SEED) -> list[bytes]:
    """One valid input per mode (what mutations start from)."""
    raw = seed.read_bytes()
    header, data = split(raw)
    return [b"\x00" + raw, b"\x01" + header["__metadata__"]["adapterfmt.manifest"].encode(),
            b"\x02" + json.dumps(header).encode()]


def materialise(fuzz: bytes, seed: Path = SEED) -> bytes:
    """The file bytes a fuzz input stands for."""
    if not fuzz:
        return b""
    mode, body = fuzz[0] % MODES, fuzz[1:]
    if mode == 0:
        return body
    header, data = split(seed.read_bytes())
    if mode == 1:
        header["__metadata__"]["adapterfmt.manifest"] = body.decode("utf-8", "replace")
        return join(json.dumps(header).encode(), data)
    return join(body, data)


def check_one(fuzz: bytes, path: Path) -> str:
    """Read ``fuzz`` as a file; 'ok' or the AdapterFmtError class name. Anything else propagates."""
    path.write_bytes(materialise(fuzz))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer-minor warnings are expected outcomes
        try:
            read_adapter(path)
            inspect_adapter(path)
        except AdapterFmtError as exc:
            assert exc.one_line() and "\n" not in exc.one_line()
            return type(exc).__name__
    return "ok"
