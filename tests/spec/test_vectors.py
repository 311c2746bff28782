"""Spec 1.1 conformance: two readers (the package and one written from spec/ alone) agree on every vector.

- positive vectors: both read them and reproduce the expected ΔW within the vector's rtol;
- must-refuse vectors (spec/vectors/v1.1/invalid/): both refuse with the refusal class INDEX.json names,
  and the CLI says so in one line with exit 1;
- the committed bytes are pinned, and the generator reproduces them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from adapterfmt.cli import main
from adapterfmt.errors import AdapterFmtError
from adapterfmt import read_adapter
from adapterfmt.methods import get_method
from safetensors.torch import load_file

import independent_delta as idl
import independent_reader as ir
import spec_philox

ROOT = Path(__file__).resolve().parents[2]
V11 = ROOT / "spec" / "vectors" / "v1.1"
V10 = ROOT / "spec" / "vectors" / "v1.0"
INDEX = json.loads((V11 / "INDEX.json").read_text())
POSITIVE = {e["file"]: e for e in INDEX["positive"]}
INVALID = {e["file"]: e for e in INDEX["invalid"]}

# Package bugs outside adapterfmt/format (the method files); strict, so a fix shows up as XPASS.
PACKAGE_KNOWN_BUGS: dict[str, str] = {}
CLI_KNOWN_BUGS = {k: v for k, v in PACKAGE_KNOWN_BUGS.items() if "unknown_generator" not in k}


def pinned() -> dict[str, str]:
    lines = (Path(__file__).with_name("v1.1.sha256")).read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def test_v11_vectors_are_pinned_and_indexed():
    files = {str(p.relative_to(V11)) for p in V11.rglob("*") if p.is_file()}
    pins = pinned()
    assert files == set(pins), files ^ set(pins)
    for name, digest in pins.items():
        assert hashlib.sha256((V11 / name).read_bytes()).hexdigest() == digest, \
            f"{name} changed: released vectors are frozen"
    listed = set(POSITIVE) | set(INVALID) | {e["expected"] for e in POSITIVE.values()} | {"base.safetensors"}
    assert files - {"INDEX.json"} == listed


def test_generator_reproduces_the_committed_vectors(tmp_path):
    spec = importlib.util.spec_from_file_location("make_v11", ROOT / "tools" / "make_conformance_vectors_v11.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(tmp_path / "v1.1")
    for name, digest in pinned().items():
        assert hashlib.sha256((tmp_path / "v1.1" / name).read_bytes()).hexdigest() == digest, name


def spec_text(name: str) -> str:
    return (ROOT / "spec" / name).read_text()


def test_independent_philox_matches_the_spec_known_answers():
    rows = re.findall(r"\| `([0-9a-f ]+)` \| `([0-9a-f ]+)` \| `([0-9a-f ]+)` \|", spec_text("nola-generator.md"))
    assert len(rows) == 3
    for counter, key, output in rows:
        words = np.array([[int(w, 16) for w in counter.split()]], dtype=np.uint64)
        k0, k1 = (int(w, 16) for w in key.split())
        assert [int(v) for v in spec_philox.philox4x32_10(words, (k0, k1))[0]] == [int(w, 16) for w in output.split()]


@pytest.mark.parametrize("seed, count, digest", [
    (0, 6, "2e00c97a0fd037cfeda51427a96b663ad572373627bd25d2af20d48232b228fb"),
    (2**40 + 12345, 5, "1b0d128d6411e922fa60b045fdc1c41cb33d5f55cc7b3de3b55a4bbfaef06467"),
    (2**64 - 1, 6, "a3e02d828a158052d0b6655c03cdc640f4fa121f1e34c035eb5e3682a844affc"),
])
def test_independent_basis_fingerprints_match_the_spec(seed, count, digest):
    assert digest in spec_text("nola-generator.md")
    assert spec_philox.basis_fingerprint(seed, count) == digest


def test_fingerprint_edge_cases_agree_with_the_package():
    import torch
    from adapterfmt.format.fingerprint import tensor_fingerprint
    scalar = np.array(1.5, dtype="<f4")
    assert idl.weight_fingerprint("F32", [], scalar.tobytes()) == \
        "sample1024-sha256:" + hashlib.sha256(b"F32::" + scalar.tobytes()).hexdigest()
    assert idl.weight_fingerprint("F32", [0, 4], b"") == "sample1024-sha256:" + hashlib.sha256(b"F32:0x4:").hexdigest()
    assert tensor_fingerprint(torch.tensor(1.5)) == idl.weight_fingerprint("F32", [], scalar.tobytes())
    assert tensor_fingerprint(torch.zeros(0, 4)) == idl.weight_fingerprint("F32", [0, 4], b"")
    big = torch.arange(3000, dtype=torch.float32).reshape(30, 100)
    assert tensor_fingerprint(big) == idl.weight_fingerprint("F32", [30, 100], big.numpy().tobytes())


def base_tensors(directory: Path) -> dict:
    return ir.parse_container((directory / "base.safetensors").read_bytes())[1]


def worst_relative_error(deltas: dict[str, np.ndarray], expected: dict) -> float:
    worst = 0.0
    for module, got in deltas.items():
        want = ir.to_array64(*expected[module])
        assert got.shape == want.shape, module
        worst = max(worst, float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()))
    return worst


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_independent_reader_accepts_positive_vectors(name):
    entry, base = POSITIVE[name], base_tensors(V11)
    adapter = ir.read(V11 / name)
    deltas = {m: idl.delta(adapter, m, idl.canonical_base(adapter, m, base)) for m in adapter.manifest["modules"]}
    expected = ir.parse_container((V11 / entry["expected"]).read_bytes())[1]
    assert set(deltas) == set(expected)
    assert worst_relative_error(deltas, expected) <= entry["rtol"]
    assert idl.validate(adapter, base) == []


@pytest.mark.parametrize("name", sorted(INVALID))
def test_independent_reader_refuses_invalid_vectors(name):
    with pytest.raises(ir.Refusal) as caught:
        ir.read(V11 / name)
    assert type(caught.value).__name__ == INVALID[name]["refusal"], caught.value


@pytest.mark.parametrize("name", ["dora.safetensors", "lora_bf16_conv1d_embedding_payload.safetensors",
                                  "lora_rank_alpha_rslora.safetensors", "nola_small.safetensors"])
def test_independent_reader_reads_v10_vectors(name):
    adapter, base = ir.read(V10 / name), base_tensors(V10)
    assert adapter.version == (1, 0)
    deltas = {m: idl.delta(adapter, m, idl.canonical_base(adapter, m, base) if e["method"] == "dora" else None)
              for m, e in adapter.manifest["modules"].items()}
    expected = ir.parse_container((V10 / name.replace(".safetensors", ".expected.safetensors")).read_bytes())[1]
    assert worst_relative_error(deltas, expected) <= 1e-5


def package_deltas(path: Path, base: dict) -> dict[str, np.ndarray]:
    """ΔW per module from the package: read_adapter + the method's delta against the canonical base."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1.9 vector warns by design
        adapter = read_adapter(path)
    deltas = {}
    for target, entry in adapter.manifest.modules.items():
        weight = base.get(entry.base_weight)
        canon = None if weight is None else (weight.float().t() if entry.fan_in_fan_out else weight.float())
        deltas[target] = get_method(entry.method).delta(entry, adapter.module_tensors(target), canon).numpy()
    return deltas


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_package_accepts_positive_vectors(name):
    entry = POSITIVE[name]
    deltas = package_deltas(V11 / name, load_file(str(V11 / "base.safetensors")))
    expected = ir.parse_container((V11 / entry["expected"]).read_bytes())[1]
    assert set(deltas) == set(expected)
    assert worst_relative_error(deltas, expected) <= entry["rtol"]


def known(bugs: dict, name: str):
    return pytest.param(name, marks=pytest.mark.xfail(reason=bugs[name], strict=True)) if name in bugs else name


@pytest.mark.parametrize("name", [known(PACKAGE_KNOWN_BUGS, n) for n in sorted(INVALID)])
def test_package_refuses_invalid_vectors_with_the_same_class(name):
    with pytest.raises(AdapterFmtError) as caught:
        package_deltas(V11 / name, {})
    assert type(caught.value).__name__ == INVALID[name]["refusal"], caught.value


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_cli_validates_positive_vectors(name):
    result = CliRunner().invoke(main, ["validate", str(V11 / name)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", [known(CLI_KNOWN_BUGS, n) for n in sorted(INVALID)])
def test_cli_refuses_invalid_vectors_in_one_line(name):
    result = CliRunner().invoke(main, ["validate", str(V11 / name)])
    assert result.exit_code == 1, result.output
    # A newer-minor file may add the version warning (spec §3: SHOULD warn) before the one error line.
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert "Traceback" not in result.output and len(errors) == 1, result.stderr
    assert Path(name).name in errors[0]


def test_convert_refuses_unknown_nola_generator(tmp_path):
    result = CliRunner().invoke(main, ["convert", str(V11 / "invalid" / "nola_unknown_generator.safetensors"),
                                       str(tmp_path / "out"), "--to", "peft"])
    assert result.exit_code == 1, result.output


def test_cli_process_prints_one_line_and_exits_1():
    """The real entry point (not click's runner): one stderr line, exit 1, never 3."""
    path = V11 / "invalid" / "huge_integer_literal.safetensors"
    done = subprocess.run([sys.executable, "-m", "adapterfmt.cli", "validate", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "out of range" in done.stderr


def test_independent_reader_imports_nothing_of_ours():
    """Its independence is the point: only the standard library's json/struct/hashlib/math/re/fractions and numpy."""
    import ast
    ours = {"independent_reader", "independent_delta", "spec_schema", "spec_philox", "spec_torch_rng",
            "method_rules", "independent_tuners", "rules_v13", "independent_v13"}
    imported = set()
    for name in ours:
        tree = ast.parse(Path(__file__).with_name(f"{name}.py").read_text())
        imported |= {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    allowed = {"__future__", "fractions", "hashlib", "json", "math", "re", "struct", "pathlib", "numpy"}
    assert imported <= allowed | ours, imported - allowed - ours
