"""NOLA method: storage size, validation, merge == materialised LoRA merge, conversions, chunking."""
import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import adapterfmt.methods.nola.bases as nb
from adapterfmt.cli import main
from adapterfmt.ops.convert import convert, convert_methods
from adapterfmt.checkpoint import BaseCheckpoint
from adapterfmt.engine.merge import merge
from adapterfmt.format import Adapter, Manifest, read_adapter, write_adapter
from adapterfmt.format.container import read_header
from adapterfmt.ops.inspection import inspect_adapter
from adapterfmt.methods import get_method
from adapterfmt.methods.nola import derive_seed, nola_module
from adapterfmt.methods.nola.generator import basis_fingerprint, nola_basis
from adapterfmt.conversion_report import ConversionReport
from adapterfmt.ops.validate import validate
from tests.helpers import tiny_llama

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
#: Manifest bytes per module and fixed, measured on this layout (asserted as an upper bound).
OVERHEAD_PER_MODULE, OVERHEAD_FIXED = 1500, 300


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base") / "llama")


def make_nola(base_dir, k=16, l=12, rank=4, offsets=False, seed=0) -> Adapter:
    ckpt = BaseCheckpoint(base_dir)
    manifest, tensors = Manifest(), {}
    gen = torch.Generator().manual_seed(seed)
    for i, target in enumerate(TARGETS):
        out_f, in_f = ckpt.shape(f"{target}.weight")
        parts = {"coef_A": torch.randn(k, generator=gen), "coef_B": torch.randn(l, generator=gen)}
        if offsets:
            parts["offset_A"] = torch.randn(rank, in_f, generator=gen) * 0.1
            parts["offset_B"] = torch.randn(out_f, rank, generator=gen) * 0.1
        sides = {"A": {"seed": 2**63 + 1000 * i + 1, "num_basis": k}, "B": {"seed": 1000 * i + 2, "num_basis": l}}
        entry, parts = nola_module(target, f"{target}.weight", [out_f, in_f], rank, 0.5, sides, parts)
        manifest.modules[target] = entry
        tensors.update({entry.tensors[r].name: t for r, t in parts.items()})
    return Adapter(manifest=manifest, tensors=tensors)


def test_delta_matches_fp64_formula(base):
    adapter = make_nola(base, offsets=True)
    method = get_method("nola")
    for target, entry in adapter.manifest.modules.items():
        t = adapter.module_tensors(target)
        out_f, in_f = entry.shape
        sa, sb = (entry.params[s] for s in "AB")
        basis_a = nola_basis(int(sa["seed"]), (16, 4, in_f)).double()
        basis_b = nola_basis(int(sb["seed"]), (12, out_f, 4)).double()
        a = t["offset_A"].double() + torch.einsum("k,kij->ij", t["coef_A"].double(), basis_a) / math.sqrt(16)
        b = t["offset_B"].double() + torch.einsum("k,kij->ij", t["coef_B"].double(), basis_b) / math.sqrt(12)
        ref = 0.5 * b @ a
        got = method.delta(entry, t).double()
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_seeds_are_decimal_strings_and_file_is_small(base, tmp_path):
    adapter = make_nola(base, offsets=True)
    path = write_adapter(adapter, tmp_path / "nola.safetensors")
    meta, _ = read_header(path)
    manifest = json.loads(meta["adapterfmt.manifest"])
    assert manifest["modules"][TARGETS[0]]["params"]["A"]["seed"] == str(2**63 + 1)
    payload = sum(t.numel() * t.element_size() for t in adapter.tensors.values())
    overhead = os.path.getsize(path) - payload
    # The file holds no basis: coefficients + offsets + a manifest of bounded size per module.
    assert overhead <= OVERHEAD_FIXED + OVERHEAD_PER_MODULE * len(TARGETS), overhead
    assert read_adapter(path).manifest.modules[TARGETS[0]].params["A"]["seed"] == str(2**63 + 1)


def test_validate_and_detect_wrong_generator(base, tmp_path):
    adapter = make_nola(base)
    path = write_adapter(adapter, tmp_path / "nola.safetensors")
    assert validate(path).valid
    adapter.manifest.modules[TARGETS[1]].params["B"]["seed"] = "5"  # fingerprint no longer matches
    bad = write_adapter(adapter, tmp_path / "bad.safetensors")
    result = validate(bad)
    assert not result.valid and "fingerprint" in result.problems[0] and TARGETS[1] in result.problems[0]


def test_fingerprint_matches_generator_module(base):
    entry = make_nola(base).manifest.modules[TARGETS[0]]
    info = entry.params["A"]
    assert info["fingerprint"] == "sha256:" + basis_fingerprint(int(info["seed"]), (16, 4, entry.shape[1]))


def test_merge_equals_materialised_lora_merge(base, tmp_path):
    nola_path = write_adapter(make_nola(base, offsets=True), tmp_path / "nola.safetensors")
    report = convert(nola_path, tmp_path / "lora.safetensors", method="lora")
    assert report.worst == "exact" and "materialised" in report.modules[0].note
    merge(base, [(nola_path, 1.0)], tmp_path / "m_nola")
    merge(base, [(tmp_path / "lora.safetensors", 1.0)], tmp_path / "m_lora")
    a, b = load_file(tmp_path / "m_nola/model.safetensors"), load_file(tmp_path / "m_lora/model.safetensors")
    changed = 0
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
        changed += not torch.equal(a[name], load_file(base / "model.safetensors")[name])
    assert changed == len(TARGETS)


def test_export_to_peft_goes_through_lora(base, tmp_path):
    nola_path = write_adapter(make_nola(base), tmp_path / "nola.safetensors")
    report = convert(nola_path, tmp_path / "peft", to="peft")
    assert any("materialised as LoRA" in n for n in report.notes)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_chunked_reconstruction_matches(base, monkeypatch):
    adapter = make_nola(base, k=40, l=40)
    target = TARGETS[2]
    entry, t = adapter.manifest.modules[target], adapter.module_tensors(target)
    whole = get_method("nola").delta(entry, t)
    monkeypatch.setattr(nb, "CHUNK_ELEMENTS", 7 * 4 * 96)  # 7 basis matrices per chunk
    chunked = get_method("nola").delta(entry, t)
    assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-6)
    assert nb.fingerprint(entry.params["generator"], entry.params["A"], (4, 96)) == entry.params["A"]["fingerprint"]


def test_lora_to_nola_projection(base, tmp_path):
    lora_path = tmp_path / "lora.safetensors"
    convert(write_adapter(make_nola(base, offsets=True), tmp_path / "n.safetensors"), lora_path, method="lora")
    lora = read_adapter(lora_path)
    # k >= r*in spans every A (and l >= out*r every B): the projection is exact up to fp rounding.
    report = ConversionReport()
    big = convert_methods(read_adapter(lora_path), "nola", {"nola_basis": (4 * 96 + 8, 4 * 64 + 8), "seed": 3},
                          report)
    for target in TARGETS:
        ref = get_method("lora").delta(lora.manifest.modules[target], lora.module_tensors(target))
        got = get_method("nola").delta(big.manifest.modules[target], big.module_tensors(target))
        assert torch.linalg.norm(got - ref) / torch.linalg.norm(ref) < 1e-4
        params = big.manifest.modules[target].params
        assert params["A"]["seed"] == str(derive_seed(3, target, "A"))
    assert {m.status for m in report.modules} == {"lossy"} and "rel ΔW error" in report.modules[0].note


def test_cli_convert_to_nola_and_inspect(base, tmp_path):
    lora_path = tmp_path / "lora.safetensors"
    convert(write_adapter(make_nola(base), tmp_path / "n.safetensors"), lora_path, method="lora")
    runner = CliRunner()
    out = tmp_path / "nola.safetensors"
    res = runner.invoke(main, ["convert", str(lora_path), str(out), "--method", "nola", "--nola-basis", "32,24",
                               "--seed", "11"])
    assert res.exit_code == 0, res.output
    assert "rel ΔW error" in res.output and "lossy" in res.output
    info = inspect_adapter(out)
    # coefficients (32 + 24) + one scalar per seed (2), per module
    assert info["parameter_count"] == len(TARGETS) * (32 + 24 + 2)
    assert info["compression_vs_rank1_lora"] > 1
    assert info["modules"][0]["params"]["A"]["num_basis"] == 32
    res = runner.invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0 and "k=32" in res.output and "l=24" in res.output, res.output
    bad = runner.invoke(main, ["convert", str(lora_path), str(tmp_path / "x.safetensors"), "--method", "nola"])
    assert bad.exit_code == 2 and "--nola-basis" in bad.output


def test_kaiming_generator_validates(base, tmp_path):
    adapter = make_nola(base)
    gen = {"id": "torch-cpu-kaiming-uniform", "version": 1}
    target = TARGETS[0]
    old = adapter.manifest.modules[target]
    out_f, in_f = old.shape
    sides = {"A": {"seed": 0, "num_basis": 16, "basis_scale": 1.0, "draw_shape": [16, in_f, 4]},
             "B": {"seed": 0, "num_basis": 12, "basis_scale": 1.0, "draw_shape": [12, 4, out_f],
                   "draw_after": [[16, in_f, 4]]}}
    entry, _ = nola_module(target, old.base_weight, old.shape, 4, 0.25, sides, {}, generator=gen,
                           provenance={"id": "torch-cpu-mt19937-kaiming"})
    entry.tensors = old.tensors
    adapter.manifest.modules[target] = entry
    path = write_adapter(adapter, tmp_path / "k.safetensors")
    assert validate(path).valid
