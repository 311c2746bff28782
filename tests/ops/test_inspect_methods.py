"""``inspect`` shows each method's trainable parameter count and its compression against a rank-1 LoRA on
the same modules, with the counts written out by hand from each method's definition (spec tables)."""
from __future__ import annotations

import torch

import adapterfmt
from adapterfmt.format import Adapter, Manifest, write_adapter
from adapterfmt.ops.inspection import format_inspection
from tests.matrix.builders import Target, build_adapter

LINEAR = [Target("model.layers.0.self_attn.q_proj", [16, 16]), Target("model.layers.0.mlp.down_proj", [16, 24])]
CONV = [Target("encoder.conv", [24, 16, 3, 3], "conv2d")]


def combined(tmp_path):
    """One file with LoRA, IA³ and AdaLoRA on disjoint modules, and LoRA on a Conv2d."""
    manifest, tensors = Manifest(created_by="tests"), {}
    gen = torch.Generator().manual_seed(0)
    for variant, targets in (("lora", [LINEAR[0]]), ("ia3", [LINEAR[1]]),
                             ("adalora", [Target("model.layers.1.mlp.up_proj", [24, 16])]), ("lora", CONV)):
        part = build_adapter(variant, targets, gen)
        manifest.modules.update(part.manifest.modules)
        manifest.base.weights.update(part.manifest.base.weights)
        tensors.update(part.tensors)
    return write_adapter(Adapter(manifest=manifest, tensors=tensors), tmp_path / "mix.safetensors")


def test_per_method_counts_and_compression(tmp_path):
    info = adapterfmt.inspect_adapter(combined(tmp_path))
    groups = info["by_method"]
    # lora: q_proj r=2 (2·(16+16) = 64) + conv r=2: A (2, 16, 3, 3) + B (24, 2) = 288 + 48 = 336.
    assert groups["lora"] == {"modules": 2, "parameter_count": 64 + 336,
                              "rank1_lora_parameter_count": (16 + 16) + (24 + 16 * 9),
                              "compression_vs_rank1_lora": (32 + 168) / 400}
    # ia3 on down_proj: one vector, 16 (axis out) or 24 (axis in).
    axis = info["modules"][1]["params"]["axis"]
    assert groups["ia3"]["parameter_count"] == (16 if axis == "out" else 24)
    assert groups["ia3"]["compression_vs_rank1_lora"] == 40 / groups["ia3"]["parameter_count"]
    # adalora (rank 2 on up_proj 24x16): A (2, 16) + E (2) + B (24, 2).
    assert groups["adalora"]["parameter_count"] == 32 + 2 + 48
    assert info["parameter_count"] == sum(g["parameter_count"] for g in groups.values())
    assert info["rank1_lora_parameter_count"] == sum(g["rank1_lora_parameter_count"] for g in groups.values())
    lines = format_inspection(info)
    assert any(line.strip().startswith("ia3: 1 module(s)") and "rank-1 LoRA 40" in line for line in lines)
    assert any(line.strip().startswith("lora: 2 module(s), 400 params; rank-1 LoRA 200 (0.5x)") for line in lines)


def test_trained_roles_only_and_conv_rank1(tmp_path):
    vera = build_adapter("vera", LINEAR, torch.Generator().manual_seed(1))
    info = adapterfmt.inspect_adapter(write_adapter(vera, tmp_path / "v.safetensors"))
    # λ_d (r = 4) and λ_b (out = 16) per module; the regenerated projections are not parameters.
    assert info["by_method"]["vera"]["parameter_count"] == 2 * (4 + 16)
    assert info["by_method"]["vera"]["rank1_lora_parameter_count"] == (16 + 16) + (16 + 24)
