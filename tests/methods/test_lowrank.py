"""Rank compaction (exact), resize (lossy) and extraction from a full fine-tune."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adapterfmt.cli import main
from adapterfmt.ops.convert import convert
from adapterfmt.format import read_adapter
from adapterfmt.methods.linalg import compact
from adapterfmt.methods import get_method
from adapterfmt.ops.extract import extract
from tests.helpers import make_peft_adapter, tiny_llama


def test_compact_rank_2r_with_true_rank_r():
    torch.manual_seed(0)
    out_f, in_f, r = 48, 40, 4
    a, b = torch.randn(r, in_f), torch.randn(out_f, r)
    # [A; A0], [B, -B0] where B0·A0 lies in the span of B·A: true rank r.
    mix = torch.randn(r, r)
    a2 = torch.cat([a, mix @ a]); b2 = torch.cat([b, -0.5 * b @ torch.linalg.inv(mix)], 1)
    a3, b3, keep, exact = compact(a2, b2)
    assert keep == r and exact
    ref = (b2.double() @ a2.double())
    assert float((b3.double() @ a3.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base") / "llama")


def test_convert_compact_and_resize(base, tmp_path):
    make_peft_adapter(base, tmp_path / "peft", r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"])
    state = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    # Make every module's true rank 3 (duplicate directions), stored at rank 6.
    for k in state:
        if "lora_A" in k:
            state[k][3:] = state[k][:3]
    save_file(state, str(tmp_path / "peft" / "adapter_model.safetensors"))
    convert(tmp_path / "peft", tmp_path / "a.safetensors", base=base)
    report = convert(tmp_path / "a.safetensors", tmp_path / "c.safetensors", resize={})
    assert report.worst == "exact" and max(m.max_abs_error for m in report.modules) < 1e-6
    small, orig = read_adapter(tmp_path / "c.safetensors"), read_adapter(tmp_path / "a.safetensors")
    lora = get_method("lora")
    for target, entry in small.manifest.modules.items():
        assert entry.params["rank"] == 3
        assert entry.params["scale"] == pytest.approx(orig.manifest.modules[target].params["scale"])
        d0 = lora.delta(orig.manifest.modules[target], orig.module_tensors(target))
        d1 = lora.delta(entry, small.module_tensors(target))
        assert float((d0 - d1).abs().max()) < 1e-6
    lossy = convert(tmp_path / "a.safetensors", tmp_path / "r.safetensors", resize={"rank": 1})
    assert lossy.worst == "lossy" and all(m.rel_error > 0 for m in lossy.modules)
    energy = convert(tmp_path / "a.safetensors", tmp_path / "e.safetensors", resize={"energy": 1.0})
    assert energy.worst == "exact"


def test_extract_error_falls_with_rank(base, tmp_path):
    state = load_file(str(base / "model.safetensors"))
    torch.manual_seed(1)
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    for k, v in state.items():
        if v.dim() == 2 and "embed" not in k and "lm_head" not in k:
            state[k] = v + 0.01 * torch.randn(v.shape[0], 6) @ torch.randn(6, v.shape[1]) + 1e-4 * torch.randn_like(v)
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    errors = []
    for rank in (1, 4, 16):
        report = extract(base, tuned, tmp_path / f"x{rank}.safetensors", rank=rank, device="auto")
        assert report.worst == "lossy" and len(report.modules) == 14
        errors.append(max(m.rel_error for m in report.modules))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05
    result = CliRunner().invoke(main, ["extract", "--base", str(base), "--tuned", str(tuned), "--rank", "4",
                                       str(tmp_path / "cli.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["modules"]) == 14


def test_cli_compact_from_pissa_like(base, tmp_path):
    make_peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["q_proj"])
    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(tmp_path / "peft"), str(tmp_path / "a.safetensors"), "--compact"])
    assert res.exit_code == 0, res.output
    assert "exact" in res.output
    res = runner.invoke(main, ["convert", str(tmp_path / "peft"), str(tmp_path / "b.safetensors"), "--compact",
                               "--rank", "2"])
    assert res.exit_code == 2
