"""Spec 1.2 conformance: the methods added after the v1.1 vectors (spec/vectors/v1.2).

- the second reader (written from spec/ alone) accepts every positive vector within its rtol and refuses
  every must-refuse vector with the class INDEX.json names;
- the package agrees: read_adapter + the method's ΔW / merged weight, the merge engine, and the CLI;
- the committed bytes are pinned (tests/spec/v1.2.sha256) and the generator reproduces them;
- the second reader's torch-cpu-mt19937 meets the spec's known answers and matches the package bit for bit.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

import independent_delta as idl
import independent_reader as ir
import spec_torch_rng as rng
from adapterfmt import merge, read_adapter
from adapterfmt.cli import main
from adapterfmt.errors import AdapterFmtError
from adapterfmt.methods import get_method

ROOT = Path(__file__).resolve().parents[2]
V12 = ROOT / "spec" / "vectors" / "v1.2"
INDEX = json.loads((V12 / "INDEX.json").read_text())
POSITIVE = {e["file"]: e for e in INDEX["positive"]}
INVALID = {e["file"]: e for e in INDEX["invalid"]}
PAYLOAD = "payload."


def pinned() -> dict[str, str]:
    lines = Path(__file__).with_name("v1.2.sha256").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def test_v12_vectors_are_pinned_and_indexed():
    files = {str(p.relative_to(V12)) for p in V12.rglob("*") if p.is_file()}
    pins = pinned()
    assert files == set(pins), files ^ set(pins)
    for name, digest in pins.items():
        assert hashlib.sha256((V12 / name).read_bytes()).hexdigest() == digest, \
            f"{name} changed: released vectors are frozen"
    listed = set(POSITIVE) | set(INVALID) | {e["expected"] for e in POSITIVE.values()} | {"base.safetensors"}
    assert files - {"INDEX.json"} == listed


def test_v12_generator_reproduces_the_committed_vectors(tmp_path):
    spec = importlib.util.spec_from_file_location("make_v12", ROOT / "tools" / "make_conformance_vectors_v12.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(tmp_path / "v1.2")
    for name, digest in pinned().items():
        assert hashlib.sha256((tmp_path / "v1.2" / name).read_bytes()).hexdigest() == digest, name


# ------------------------------------------------------------------ the generator, from the spec text
def spec_text(name: str) -> str:
    return (ROOT / "spec" / name).read_text()


def test_independent_torch_rng_meets_the_spec_known_answers():
    text = spec_text("torch-cpu-generator.md")
    gen = rng.Mt19937(0)
    words = [gen.random() for _ in range(625)]
    assert "`2357136044 2546248239 3071714933 3626093760`" in text and "is `341544762`" in text
    assert words[:4] == [2357136044, 2546248239, 3071714933, 3626093760] and words[624] == 341544762
    assert f"`{hex(rng.Mt19937(0).random64())}`" in text
    for seeds, pair in (((5, 2**32 + 5), "953453411 236996814"), ((-1, 2**64 - 1, 2**32 - 1), "419326371 479346978")):
        assert f"`{pair}`" in text
        for seed in seeds:
            gen = rng.Mt19937(seed)
            assert f"{gen.random()} {gen.random()}" == pair
    table = re.findall(r"\| `(fused|unfused)` \| `([^`]+)` \| `([^`]+)` \|", text)
    assert len(table) == 2
    for variant, a_hex, b_hex in table:
        a, b = rng.vera_projections(0, 2, 3, 2, variant)
        assert [float(v) for v in a.ravel()] == [float.fromhex(h) for h in a_hex.split()], variant
        assert [float(v) for v in b.ravel()] == [float.fromhex(h) for h in b_hex.split()], variant
    assert "`randperm(10)`, seed 5: `1 4 9 6 3 5 0 2 8 7`" in text
    assert rng.randperm_prefix(rng.Mt19937(5), 10, 10) == [1, 4, 9, 6, 3, 5, 0, 2, 8, 7]
    for seed, out, inn, n in ((777, 4, 5, 3), (777, 4096, 4096, 8)):
        pattern = rf"seed {seed}, {out} ?[x×] ?{inn}[^:]*n_frequency = {n}: rows `([0-9 ]+)`, cols\s+`([0-9 ]+)`"
        found = re.search(pattern, text.replace("out = 4, in = 5", "4 x 5"))
        rows, cols = rng.fourierft_positions(seed, out, inn, n)
        assert found and found[1].split() == [str(v) for v in rows] and found[2].split() == [str(v) for v in cols]


@pytest.mark.parametrize("variant", ["fused", "unfused"])
def test_independent_torch_rng_matches_the_package_bit_for_bit(variant):
    """The ΔW tolerance cannot see one ulp, so the two variants' projections are compared exactly."""
    from adapterfmt.methods.fourierft import spectral_positions
    from adapterfmt.methods.vera import shared_projections
    for seed, rank, max_in, max_out in ((0, 4, 8, 12), (2**64 - 1, 3, 12, 12), (1, 2, 6, 4), (777, 5, 33, 17)):
        ours = rng.vera_projections(seed, rank, max_in, max_out, variant)
        theirs = shared_projections(seed, rank, max_in, max_out, variant)
        for mine, package in zip(ours, theirs):
            assert mine.tobytes() == package.numpy().tobytes(), (seed, variant)
    for seed, out, inn, n in ((777, 8, 6, 10), (2**32 + 777, 12, 6, 20), (5, 4, 6, 24), (3, 97, 61, 500)):
        rows, cols = rng.fourierft_positions(seed, out, inn, n)
        assert np.array_equal(np.stack([rows, cols]), spectral_positions(seed, out, inn, n).numpy())


# ------------------------------------------------------------------ the second reader
def base_tensors() -> dict:
    return ir.parse_container((V12 / "base.safetensors").read_bytes())[1]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def expected_values(entry: dict) -> dict[str, np.ndarray]:
    tensors = ir.parse_container((V12 / entry["expected"]).read_bytes())[1]
    return {name: ir.to_array64(*t) for name, t in tensors.items()}


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_independent_reader_accepts_v12_positive_vectors(name):
    entry, base = POSITIVE[name], base_tensors()
    adapter = ir.read(V12 / name)
    assert adapter.version == tuple(int(v) for v in entry["version"].split("."))
    value = idl.merged if entry["expected_kind"] == "merged" else idl.delta
    expected = expected_values(entry)
    modules = adapter.manifest["modules"]
    assert set(expected) == set(modules) | {PAYLOAD + key for key, p in adapter.manifest["payloads"].items()
                                            if p["kind"] == "bias_delta"}
    for module in modules:
        got = value(adapter, module, idl.canonical_base(adapter, module, base))
        assert relative_error(got, expected[module]) <= entry["rtol"], module
    for key, payload in adapter.manifest["payloads"].items():
        merged_bias = ir.to_array64(*base[key]) + ir.to_array64(*adapter.tensors[payload["tensor"]["name"]])
        assert relative_error(merged_bias, expected[PAYLOAD + key]) <= entry["rtol"], key
    assert idl.validate(adapter, base) == []


@pytest.mark.parametrize("name", sorted(INVALID))
def test_independent_reader_refuses_v12_invalid_vectors(name):
    with pytest.raises(ir.Refusal) as caught:
        ir.read(V12 / name)
    assert type(caught.value).__name__ == INVALID[name]["refusal"], caught.value


# ------------------------------------------------------------------ the package
def package_values(path: Path, kind: str) -> dict[str, np.ndarray]:
    """Per module: ΔW (kind "delta") or the merged weight (kind "merged"), from read_adapter + the method."""
    base = load_file(str(V12 / "base.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = read_adapter(path)
    values = {}
    for target, entry in adapter.manifest.modules.items():
        method, tensors = get_method(entry.method), adapter.module_tensors(target)
        canon = entry.canonical(base[entry.base_weight].float())
        value = method.merged(entry, tensors, canon) if kind == "merged" else method.delta(entry, tensors, canon)
        values[target] = value.double().numpy()
    for key, payload in adapter.manifest.payloads.items():
        values[PAYLOAD + key] = (base[key].double() + adapter.tensors[payload.tensor.name].double()).numpy()
    return values


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_package_agrees_on_v12_positive_vectors(name):
    entry = POSITIVE[name]
    got, expected = package_values(V12 / name, entry["expected_kind"]), expected_values(entry)
    assert set(got) == set(expected)
    for key in expected:
        assert relative_error(got[key], expected[key]) <= entry["rtol"], key


@pytest.mark.parametrize("name", sorted(INVALID))
def test_package_refuses_v12_invalid_vectors_with_the_same_class(name):
    with pytest.raises(AdapterFmtError) as caught:
        package_values(V12 / name, "delta")
    assert type(caught.value).__name__ == INVALID[name]["refusal"], caught.value


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("v12-base")
    shutil.copy(V12 / "base.safetensors", directory / "model.safetensors")
    return directory


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_merge_engine_applies_v12_positive_vectors(name, base_dir, tmp_path):
    """adapterfmt.merge: every base tensor the vector changes equals the expected value, rounded once."""
    entry = POSITIVE[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(base_dir, [V12 / name], tmp_path / "out")
        manifest = read_adapter(V12 / name).manifest
    merged, base = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(V12 / "base.safetensors"))
    for key, want in expected_values(entry).items():
        if key.startswith(PAYLOAD):
            target, fifo, start = key[len(PAYLOAD):], False, 0.0
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


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_cli_validates_v12_positive_vectors(name):
    result = CliRunner().invoke(main, ["validate", str(V12 / name)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", sorted(INVALID))
def test_cli_refuses_v12_invalid_vectors_in_one_line(name):
    result = CliRunner().invoke(main, ["validate", str(V12 / name)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert "Traceback" not in result.output and len(errors) == 1, result.stderr
    assert Path(name).name in errors[0]


class CpuBlockDiag:
    """Stand-in for PEFT's BOFT CUDA extension (fbd_cuda): (N, D, H, H) blocks -> (N, D·H, D·H) block diagonals."""

    @staticmethod
    def forward(blocks):
        import torch
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


def test_boft_vector_matches_peft_with_butterfly_factors(monkeypatch):
    """PEFT itself, with only its CUDA block-diagonal primitive emulated on CPU (without it PEFT silently
    builds one factor), merges the boft vector's modules (3, 2 and 1 factors) to the expected weights."""
    import torch
    import peft.tuners.boft.layer as boft_layer
    from peft import BOFTConfig, get_peft_model
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", CpuBlockDiag())
    entry = POSITIVE["boft.safetensors"]
    adapter, expected = read_adapter(V12 / "boft.safetensors"), expected_values(entry)
    base = load_file(str(V12 / "base.safetensors"))
    for target, module in adapter.manifest.modules.items():
        layer = torch.nn.Linear(module.shape[1], module.shape[0], bias=False)
        layer.weight.data = base[module.base_weight].clone()
        config = BOFTConfig(boft_block_size=module.params["block_size"], target_modules=["proj"],
                            boft_n_butterfly_factor=module.params["butterfly_factors"])
        wrapper = torch.nn.Module()
        wrapper.proj = layer
        model = get_peft_model(wrapper, config)
        boft = model.base_model.model.proj
        assert boft.boft_R["default"].shape[0] == module.params["butterfly_factors"]
        tensors = adapter.module_tensors(target)
        boft.boft_R["default"].data = tensors["rotations"].clone()
        boft.boft_s["default"].data = tensors["scale"].clone().view(-1, 1)
        merged = model.merge_and_unload().proj.weight.detach().double().numpy()
        assert relative_error(merged, expected[target]) <= entry["rtol"], target
