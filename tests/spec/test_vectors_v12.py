"""Spec 1.2 conformance: the methods added after the v1.1 vectors (spec/vectors/v1.2).

- the second reader (written from spec/ alone) accepts every positive vector within its rtol and refuses
  every must-refuse vector with the class INDEX.json names;
- the package agrees: read_adapter + the method's ΔW / merged weight, the merge engine, and the CLI;
- the committed bytes are pinned (tests/spec/v1.2.sha256) and the generator reproduces them;
- the second reader's torch-cpu-mt19937 meets the spec's known answers and matches the package bit for bit.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import independent_delta as idl
import independent_reader as ir
import package_checks as checks
import spec_torch_rng as rng
from adapterfmt import read_adapter

VECTORS = checks.VectorSet("1.2", "payload.")
V12, POSITIVE, INVALID, PAYLOAD = VECTORS.directory, VECTORS.positive, VECTORS.invalid, VECTORS.prefix
ROOT = checks.ROOT
relative_error = checks.relative_error


def test_v12_vectors_are_pinned_and_indexed():
    checks.pinned_and_indexed(VECTORS)


def test_v12_generator_reproduces_the_committed_vectors(tmp_path):
    checks.generator_reproduces("1.2", tmp_path)


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
def expected_values(entry: dict) -> dict[str, np.ndarray]:
    return checks.expected_values(VECTORS, entry)


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_independent_reader_accepts_v12_positive_vectors(name):
    entry, base = POSITIVE[name], checks.base_tensors(VECTORS)
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
@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_package_agrees_on_v12_positive_vectors(name):
    checks.package_agrees(VECTORS, name)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_package_refuses_v12_invalid_vectors_with_the_same_class(name):
    checks.package_refuses(VECTORS, name)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return checks.base_model_dir(VECTORS, tmp_path_factory.mktemp("v12-base"))


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_merge_engine_applies_v12_positive_vectors(name, base_dir, tmp_path):
    checks.merge_engine_applies(VECTORS, name, base_dir, tmp_path / "out")


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_cli_validates_v12_positive_vectors(name):
    checks.cli_validates(VECTORS, name)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_cli_refuses_v12_invalid_vectors_in_one_line(name):
    assert checks.cli_refuses_in_one_line(VECTORS, name).exit_code == 1


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
