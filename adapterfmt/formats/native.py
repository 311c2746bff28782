"""adapterfmt itself, as a format of the registry (so convert treats every format alike)."""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..format import Adapter
from ..methods import read_checked_adapter, write_checked_adapter
from ..format.versions import KEY_FORMAT
from ..conversion_report import LOSSLESS
from .base import AdapterFormat


class NativeFormat(AdapterFormat):
    name = "adapterfmt"
    summary = "adapterfmt v1: one safetensors file with the manifest in its metadata"
    priority = 10
    suffixes = (".safetensors",)
    writes_methods = None  # every method

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                return KEY_FORMAT in (handle.metadata() or {})
        except (SafetensorError, OSError):
            return path.suffix == ".safetensors" and _looks_like_ours(path)

    def read(self, path, options, report):
        return read_checked_adapter(path)

    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        for target in adapter.manifest.modules:
            report.add(target, LOSSLESS)
        return write_checked_adapter(adapter, path, overwrite=options.overwrite)


def _looks_like_ours(path: Path) -> bool:
    # A damaged file should still be routed to our reader, which explains what is wrong.
    try:
        with open(path, "rb") as handle:
            return b"adapterfmt.format" in handle.read(1 << 16)
    except OSError:
        return False


