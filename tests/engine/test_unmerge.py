"""Unmerge: one rounding beats PEFT's double rounding; DoRA needs the base; verification numbers."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from adapterfmt.cli import main
from adapterfmt.engine.merge import merge
from adapterfmt.engine.unmerge import ulp_distance, unmerge
from adapterfmt.errors import UsageError
from adapterfmt.methods import get_method
from tests.engine.common import LLAMA_LINEAR, load_dir, peft_to_native, synthetic_lora
from tests.helpers import tiny_llama


def spacing(values: torch.Tensor) -> torch.Tensor:
    """ulp of each bf16 value: the gap to the next representable magnitude."""
    mag = values.view(torch.int16) & 0x7FFF
    return (mag + 1).view(torch.bfloat16).float() - mag.view(torch.bfloat16).float()


@pytest.mark.parametrize("rel_norm", [1e-2, 1e-3])
def test_single_rounding_unmerge_beats_peft_and_stays_within_one_merged_ulp(tmp_path, rel_norm):
    gen = torch.Generator().manual_seed(0)
    weights = {f"layers.{i}.weight": (torch.randn(512, 512, generator=gen) * 0.02).bfloat16() for i in range(4)}
    (tmp_path / "base").mkdir()
    save_file(weights, str(tmp_path / "base" / "model.safetensors"))
    adapter = synthetic_lora(weights, rank=16, rel_norm=rel_norm)
    merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "merged")
    summary = unmerge(tmp_path / "merged", [(adapter, 1.0)], tmp_path / "restored", base=tmp_path / "base")
    merged, restored = load_dir(tmp_path / "merged"), load_dir(tmp_path / "restored")
    ours = peft = total = 0
    for name, original in weights.items():
        entry = adapter.manifest.modules[name.removesuffix(".weight")]
        delta = get_method("lora").delta(entry, adapter.module_tensors(name.removesuffix(".weight")))
        peft_restored = merged[name] - delta.to(torch.bfloat16)  # PEFT: W -= ΔW.to(W.dtype)
        ours += int((restored[name] == original).sum())
        peft += int((peft_restored == original).sum())
        total += original.numel()
        error = (restored[name].float() - original.float()).abs()
        assert bool((error <= spacing(merged[name]) * (1 + 2**-10)).all()), name
    print(f"\nΔW/W = {rel_norm:g}: restored bit-exactly: adapterfmt {ours / total:.2%}, "
          f"PEFT-style {peft / total:.2%}")
    assert ours > peft
    v = summary.verification
    assert v["elements_compared"] == total and v["elements_exact"] == ours
    assert v["fraction_exact"] == pytest.approx(ours / total)
    assert v["max_error_ulps"] >= 1


def test_lora_fp32_unmerge_and_cli(tmp_path):
    base = tiny_llama(tmp_path / "base", dtype=torch.float32)
    _, native = peft_to_native(base, tmp_path, "lora", target_modules=LLAMA_LINEAR, r=4, lora_alpha=8)
    merge(base, [(native, 1.0)], tmp_path / "merged")
    result = CliRunner().invoke(main, ["unmerge", "--merged", str(tmp_path / "merged"), "--adapter", str(native),
                                       "--out", str(tmp_path / "restored"), "--base", str(base), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["tensors_changed"] == 14 and summary["verification"]["fraction_exact"] > 0.2
    got, want = load_dir(tmp_path / "restored"), load_dir(base)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-6
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == sorted(
        p.name for p in (tmp_path / "merged").iterdir())


def test_dora_unmerge_needs_base(tmp_path):
    base = tiny_llama(tmp_path / "base", dtype=torch.bfloat16)
    _, native = peft_to_native(base, tmp_path, "dora", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                               use_dora=True)
    merge(base, [(native, 1.0)], tmp_path / "merged")
    with pytest.raises(UsageError, match="not invertible"):
        unmerge(tmp_path / "merged", [(native, 1.0)], tmp_path / "restored")
    assert not (tmp_path / "restored").exists()
    summary = unmerge(tmp_path / "merged", [(native, 1.0)], tmp_path / "restored", base=base)
    got, want, merged = load_dir(tmp_path / "restored"), load_dir(base), load_dir(tmp_path / "merged")
    for name in want:
        error = (got[name].float() - want[name].float()).abs()
        assert bool((error <= spacing(merged[name]) * 1.01).all()), name
    assert summary.verification["fraction_exact"] > 0.2


def test_ulp_distance_crosses_zero_and_signs():
    a = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=torch.bfloat16)
    step = torch.tensor([0.0, 0.0, 2**-7, -(2**-7)], dtype=torch.bfloat16)
    assert ulp_distance(a, a + step).tolist() == [0, 0, 1, 1]
    tiny = torch.tensor([2**-133], dtype=torch.bfloat16)  # smallest subnormal
    assert ulp_distance(tiny, -tiny).tolist() == [2]
