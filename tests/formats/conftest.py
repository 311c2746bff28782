"""Shared fixtures: one tiny Llama and real PEFT adapters on it, converted to adapterfmt once per session."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterfmt.ops.convert import convert
from adapterfmt.format import read_adapter
from adapterfmt.methods import get_method
from tests.helpers import make_peft_adapter, tiny_llama

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    # rank/alpha patterns: v_proj has rank 2 (scale 4), o_proj alpha 3 (scale 0.75), others scale 2.
    "patterns": dict(r=4, lora_alpha=8, target_modules=ALL, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
    # rsLoRA with a rank-3 module: scale 8/sqrt(3) is not alpha/rank for any "nice" alpha.
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"],
                   rank_pattern={"v_proj": 3}),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "embed": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "embed_tokens", "lm_head"]),
}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("formats")


@pytest.fixture(scope="session")
def base(workdir) -> Path:
    return tiny_llama(workdir / "base")


@pytest.fixture(scope="session")
def base_weights(base) -> dict[str, torch.Tensor]:
    return load_file(str(base / "model.safetensors"))


@pytest.fixture(scope="session")
def peft_dirs(workdir, base) -> dict[str, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: make_peft_adapter(base, workdir / f"peft-{name}", **kw) for name, kw in ADAPTERS.items()}


@pytest.fixture(scope="session")
def native(workdir, base, peft_dirs) -> dict[str, Path]:
    """adapterfmt files made from the PEFT adapters (with --base: head counts and layer count recorded)."""
    out = {}
    for name, path in peft_dirs.items():
        out[name] = workdir / f"{name}.safetensors"
        convert(path, out[name], base=base)
    return out


def deltas(path: Path, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW (canonical (out, in), fp32) of every module of an adapterfmt file."""
    adapter = read_adapter(path)
    result = {}
    for target, entry in adapter.manifest.modules.items():
        weight = base_weights[entry.base_weight].float()
        weight = weight.t() if entry.fan_in_fan_out else weight
        result[target] = get_method(entry.method).delta(entry, adapter.module_tensors(target), weight)
    return result


def assert_round_trip(original: Path, back: Path, report, base_weights) -> None:
    """Lossless modules come back bit-exact; others within the error the export report measured."""
    a, b = read_adapter(original), read_adapter(back)
    assert set(a.manifest.modules) == set(b.manifest.modules)
    da, db = deltas(original, base_weights), deltas(back, base_weights)
    by_module = {m.module: m for m in report.modules}
    for target in a.manifest.modules:
        status = by_module[target]
        if status.status == "lossless":
            for role, tensor in a.module_tensors(target).items():
                assert torch.equal(tensor, b.module_tensors(target)[role]), (target, role)
            assert b.manifest.modules[target].params["scale"] == a.manifest.modules[target].params["scale"]
            assert torch.equal(da[target], db[target]), target
        else:
            # The report measured the ΔW change in fp64: fp32 rounding of the folded B only.
            assert status.status in ("scale_folded", "exact") and status.rel_error is not None
            assert status.rel_error < 1e-6, status
            rel = float(torch.linalg.norm(da[target].double() - db[target].double()) / torch.linalg.norm(da[target]))
            assert rel < 1e-6, (target, rel)
