"""The checks the v1.2 and v1.3 conformance tests share: one released vector directory (spec/vectors/vX.Y),
its INDEX.json entries and pinned digests, read by the package (read_adapter + the method, the merge
engine, the CLI) and compared with the expected files.

The package side lives here, not in the independent reader modules: they import nothing of ours
(test_vectors.py checks that), this module may import both.

Example:
    >>> vectors = VectorSet("1.2", "payload.")
    >>> package_agrees(vectors, "lora_bias.safetensors")
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

import independent_reader as ir
from adapterfmt import merge, read_adapter
from adapterfmt.cli import main
from adapterfmt.errors import AdapterFmtError
from adapterfmt.methods import get_method

ROOT = Path(__file__).resolve().parents[2]


def pinned(version: str) -> dict[str, str]:
    """{file: sha256} from tests/spec/v<version>.sha256."""
    lines = Path(__file__).with_name(f"v{version}.sha256").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


@dataclass(frozen=True)
class VectorSet:
    """spec/vectors/v<version> and its INDEX.json; ``prefix`` starts the expected files' keys of the biases
    a vector changes ("payload.<key>" in v1.2, "bias.<key>" in v1.3), the other keys are module names."""
    version: str
    prefix: str
    directory: Path = field(init=False)
    positive: dict = field(init=False)
    invalid: dict = field(init=False)

    def __post_init__(self):
        directory = ROOT / "spec" / "vectors" / f"v{self.version}"
        index = json.loads((directory / "INDEX.json").read_text())
        object.__setattr__(self, "directory", directory)
        object.__setattr__(self, "positive", {e["file"]: e for e in index["positive"]})
        object.__setattr__(self, "invalid", {e["file"]: e for e in index["invalid"]})


def pinned_and_indexed(vectors: VectorSet) -> None:
    """Every file is pinned with its frozen digest, and INDEX.json lists exactly the files there are."""
    root = vectors.directory
    files = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    pins = pinned(vectors.version)
    assert files == set(pins), files ^ set(pins)
    for name, digest in pins.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, \
            f"{name} changed: released vectors are frozen"
    listed = set(vectors.positive) | set(vectors.invalid) | {e["expected"] for e in vectors.positive.values()}
    assert files - {"INDEX.json"} == listed | {"base.safetensors"}


def generator_reproduces(version: str, tmp_path: Path) -> None:
    """tools/make_conformance_vectors_v<XY>.py writes the committed bytes again."""
    name = f"make_conformance_vectors_v{version.replace('.', '')}"
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(tmp_path / version)
    for name, digest in pinned(version).items():
        assert hashlib.sha256((tmp_path / version / name).read_bytes()).hexdigest() == digest, name


def base_tensors(vectors: VectorSet) -> dict:
    """The vectors' base.safetensors as the second reader parses it."""
    return ir.parse_container((vectors.directory / "base.safetensors").read_bytes())[1]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def expected_values(vectors: VectorSet, entry: dict) -> dict[str, np.ndarray]:
    """An INDEX entry's expected file, float64 per key, read by the second reader."""
    tensors = ir.parse_container((vectors.directory / entry["expected"]).read_bytes())[1]
    return {name: ir.to_array64(*t) for name, t in tensors.items()}


# ------------------------------------------------------------------ the package
def package_values(vectors: VectorSet, path: Path, kind: str) -> dict[str, np.ndarray]:
    """Per module: ΔW (kind "delta") or the merged weight (kind "merged"), from read_adapter + the method;
    per changed bias (v1.2 payloads, v1.3 full's diff_b): the merged bias under ``vectors.prefix``."""
    base = load_file(str(vectors.directory / "base.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = read_adapter(path)
    values = {}
    for target, entry in adapter.manifest.modules.items():
        method, tensors = get_method(entry.method), adapter.module_tensors(target)
        canon = entry.canonical(base[entry.base_weight].float())
        value = method.merged(entry, tensors, canon) if kind == "merged" else method.delta(entry, tensors, canon)
        values[target] = value.double().numpy()
        if "diff_b" in tensors:  # methods-full.md: the layer's bias is <base_weight without .weight>.bias
            bias = entry.base_weight.removesuffix(".weight") + ".bias"
            values[vectors.prefix + bias] = (base[bias].double() + tensors["diff_b"].double()).numpy()
    for key, payload in adapter.manifest.payloads.items():
        values[vectors.prefix + key] = (base[key].double() + adapter.tensors[payload.tensor.name].double()).numpy()
    return values


def package_agrees(vectors: VectorSet, name: str) -> None:
    """A positive vector's values, as the package computes them, are the expected ones within its rtol."""
    entry = vectors.positive[name]
    got = package_values(vectors, vectors.directory / name, entry["expected_kind"])
    expected = expected_values(vectors, entry)
    assert set(got) == set(expected)
    for key in expected:
        assert relative_error(got[key], expected[key]) <= entry["rtol"], key


def package_refuses(vectors: VectorSet, name: str) -> None:
    """A must-refuse vector raises the error class INDEX.json names."""
    with pytest.raises(AdapterFmtError) as caught:
        package_values(vectors, vectors.directory / name, "delta")
    assert type(caught.value).__name__ == vectors.invalid[name]["refusal"], caught.value


def base_model_dir(vectors: VectorSet, directory: Path) -> Path:
    """``directory`` holding the vectors' base as model.safetensors, the merge engine's input."""
    shutil.copy(vectors.directory / "base.safetensors", directory / "model.safetensors")
    return directory


def merge_engine_applies(vectors: VectorSet, name: str, base_dir: Path, out: Path) -> None:
    """adapterfmt.merge: every base tensor the vector changes equals the expected value, rounded once."""
    entry, prefix = vectors.positive[name], vectors.prefix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(base_dir, [vectors.directory / name], out)
        manifest = read_adapter(vectors.directory / name).manifest
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(vectors.directory / "base.safetensors"))
    for key, want in expected_values(vectors, entry).items():
        if key.startswith(prefix):
            target, fifo, start = key[len(prefix):], False, 0.0
        else:
            module = manifest.modules[key]
            target, fifo = module.base_weight, module.fan_in_fan_out
            start = 0.0 if entry["expected_kind"] == "merged" else base[target].double().numpy()
            start = start.T if fifo and entry["expected_kind"] == "delta" else start
        got = merged[target].double().numpy()
        got = got.T if fifo else got
        want = want + start
        # one rounding to the base dtype: half an ulp, at most 2^-8 of the value for BF16, 2^-24 for F32
        half_ulp = 2.0**-8 if base[target].dtype.itemsize == 2 else 2.0**-24
        limit = entry["rtol"] * np.abs(want).max() + half_ulp * np.abs(want)
        assert (np.abs(got - want) <= limit).all(), key


def cli_validates(vectors: VectorSet, name: str) -> None:
    """``adapterfmt validate`` accepts a positive vector."""
    result = CliRunner().invoke(main, ["validate", str(vectors.directory / name)])
    assert result.exit_code == 0, result.output


def cli_refuses_in_one_line(vectors: VectorSet, name: str):
    """``adapterfmt validate`` refuses a must-refuse vector with one error line naming the file; returns the
    click result (for a caller that checks the exit status further)."""
    result = CliRunner().invoke(main, ["validate", str(vectors.directory / name)])
    assert result.exit_code != 0, result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert "Traceback" not in result.output and len(errors) == 1, result.stderr
    assert Path(name).name in errors[0]
    return result
