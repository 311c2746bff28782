"""LoRA on Conv2d layers (1×1, 3×3, 4×4 and 7×7 kernels) through PEFT, against real PEFT.

Two tiny transformers vision models built from configs: ViT (the patch embedding is a 4×4 Conv2d with
stride 4, next to Linear query/value) and a bottleneck ResNet (1×1 and 3×3 convs, a 7×7 stem).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import adapterfmt
from adapterfmt.engine.unmerge import ulp_distance
from adapterfmt.errors import AdapterFmtError

from ..helpers import tiny_resnet

IMAGE = 16


def tiny_vit(path):
    from transformers import ViTConfig, ViTModel
    config = ViTConfig(image_size=IMAGE, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=37)
    return _save(ViTModel(config), path)


def _save(model, path):
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval().save_pretrained(path)
    return path


#: model -> (builder, PEFT target_modules, kernel sizes the Conv2d targets must include)
MODELS = {"vit": (tiny_vit, ["projection", "q_proj", "v_proj"], {(4, 4)}),
          "resnet": (tiny_resnet, ["convolution"], {(1, 1), (3, 3), (7, 7)})}


def load(base):
    from transformers import AutoModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModel.from_pretrained(base).eval()


def make_adapter(base, out, targets, **kwargs):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kwargs)
    model = get_peft_model(load(base), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


def peft_model(base, adapter_dir):
    from peft import PeftModel
    return PeftModel.from_pretrained(load(base), adapter_dir).eval()


def outputs(model) -> torch.Tensor:
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return out.last_hidden_state.float()


@pytest.fixture(scope="module", params=sorted(MODELS))
def vision(request, tmp_path_factory):
    build, targets, kernels = MODELS[request.param]
    work = tmp_path_factory.mktemp(request.param)
    base = build(work / "base")
    peft_dir = make_adapter(base, work / "peft", targets)
    ours = work / "a.safetensors"
    report = adapterfmt.convert(peft_dir, ours, base=base)
    assert report.worst == "lossless", report.lines()
    return request.param, base, peft_dir, ours, work, kernels


def test_peft_conv2d_imports_as_conv2d_layers_with_peft_shapes(vision):
    name, base, _, ours, _, kernels = vision
    adapter = adapterfmt.read_adapter(ours)
    convs = {t: e for t, e in adapter.manifest.modules.items() if e.layer == "conv2d"}
    linears = {t for t, e in adapter.manifest.modules.items() if e.layer == "linear"}
    assert len(linears) == (2 if name == "vit" else 0) and len(convs) == (1 if name == "vit" else 9)
    assert {tuple(e.shape[2:]) for e in convs.values()} >= kernels
    checkpoint = load_file(base / "model.safetensors")
    for target, entry in convs.items():
        out_f, in_f, kh, kw = entry.shape
        assert list(checkpoint[entry.base_weight].shape) == entry.shape
        assert entry.tensors["lora_A"].shape == [4, in_f, kh, kw]
        assert entry.tensors["lora_B"].shape == [out_f, 4, 1, 1]
        assert not entry.fan_in_fan_out
    result = adapterfmt.validate(ours, base=base)
    assert result.valid and result.base_checked, result.problems


def test_peft_conv2d_merge_equals_peft_merge_and_unload(vision):
    name, base, peft_dir, ours, work, _ = vision
    adapterfmt.merge(base, [(ours, 1.0)], work / "merged", overwrite=True)
    # Compared as transformers loads them (ViT's checkpoint names differ from its module names in v5).
    mine = load(work / "merged").state_dict()
    original = load(base).state_dict()
    reference = peft_model(base, peft_dir).merge_and_unload().state_dict()
    worst, changed = 0, []
    for key, ref in reference.items():
        assert key in mine, key
        worst = max(worst, int(ulp_distance(mine[key], ref.to(mine[key].dtype)).max()))
        if not torch.equal(mine[key], original[key]):
            changed.append(key)
    adapted = adapterfmt.read_adapter(ours).manifest.modules
    print(f"{name}: max ulp vs PEFT merge_and_unload = {worst}, {len(changed)} tensors changed")
    assert worst <= 1
    assert len(changed) == len(adapted) and all(k.endswith(".weight") for k in changed)


def test_peft_conv2d_round_trip_bit_exact_and_loads_in_peft(vision):
    _, base, peft_dir, ours, work, _ = vision
    back = work / "back"
    adapterfmt.convert(ours, back, to="peft", overwrite=True)
    original = load_file(peft_dir / "adapter_model.safetensors")
    again = load_file(back / "adapter_model.safetensors")
    assert sorted(original) == sorted(again)
    assert all(torch.equal(original[k], again[k]) for k in original)
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    expected = outputs(peft_model(base, peft_dir))
    got = outputs(peft_model(base, back))
    untouched = outputs(load(base))
    assert (expected - untouched).abs().max() > 1e-3  # the adapter changes the outputs
    assert (got - expected).abs().max() <= 1e-5


def test_peft_conv2d_refuses_what_the_format_cannot_hold(vision, tmp_path):
    name, base, peft_dir, ours, _, _ = vision
    if name != "resnet":
        pytest.skip("one model is enough")
    for to, suffix in (("gguf", "x.gguf"), ("mlx", "mlx_out"), ("kohya", "k.safetensors")):
        with pytest.raises(AdapterFmtError, match="conv2d"):
            adapterfmt.convert(ours, tmp_path / suffix, to=to, base=base)


def test_peft_conv2d_dora_merges_like_peft_and_round_trips(tmp_path):
    """DoRA on Conv2d (magnitude per output channel, norm over (in, kh, kw)): merge = merge_and_unload."""
    base = tiny_resnet(tmp_path / "base")
    peft_dir = make_adapter(base, tmp_path / "dora", ["convolution"], use_dora=True)
    with torch.no_grad():  # a trained-looking magnitude, not the init (the row norms of W + ΔW)
        state = load_file(peft_dir / "adapter_model.safetensors")
        for key in [k for k in state if k.endswith("lora_magnitude_vector")]:
            state[key] = state[key] * (1 + 0.1 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(3)))
        from safetensors.torch import save_file
        save_file(state, str(peft_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    ours = tmp_path / "a.safetensors"
    assert adapterfmt.convert(peft_dir, ours, base=base).worst == "lossless"
    adapter = adapterfmt.read_adapter(ours)
    convs = [e for e in adapter.manifest.modules.values() if e.layer == "conv2d"]
    assert convs and all(e.method == "dora" and e.tensors["magnitude"].shape == [e.shape[0]] for e in convs)
    adapterfmt.merge(base, [(ours, 1.0)], tmp_path / "merged")
    mine = load(tmp_path / "merged").state_dict()
    reference = peft_model(base, peft_dir).merge_and_unload().state_dict()
    worst = max(int(ulp_distance(mine[k], ref).max()) for k, ref in reference.items())
    print(f"conv2d DoRA: max ulp vs PEFT merge_and_unload = {worst}")
    assert worst <= 1
    adapterfmt.convert(ours, tmp_path / "back", to="peft")
    again = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(again) == sorted(state) and all(torch.equal(state[k], again[k]) for k in state)


def test_peft_conv2d_unmerge_restores_the_base_and_inspect_counts_the_factors(vision):
    name, base, _, ours, work, _ = vision
    merged, restored = work / "merged-u", work / "restored"
    adapterfmt.merge(base, [(ours, 1.0)], merged, overwrite=True)
    adapterfmt.unmerge(merged, [(ours, 1.0)], restored, base=base, overwrite=True)
    original = load_file(base / "model.safetensors")
    back, sums = load_file(restored / "model.safetensors"), load_file(merged / "model.safetensors")
    exact = 0
    for key, weight in original.items():
        # (W + ΔW) − ΔW can lose what W + ΔW rounded away: at most one ulp of the merged value.
        ulp = torch.nextafter(sums[key].abs(), torch.tensor(float("inf"))) - sums[key].abs()
        assert bool(((back[key] - weight).abs() <= ulp).all()), key
        exact += int((back[key] == weight).sum())
    total = sum(w.numel() for w in original.values())
    print(f"{name}: unmerge restored {exact / total:.2%} of the base bit-exactly, the rest within 1 merged ulp")
    assert exact > total // 2
    adapter = adapterfmt.read_adapter(ours)
    facts = adapterfmt.inspect_adapter(ours)
    stored = sum(t.numel() for t in adapter.tensors.values())
    assert str(stored) in str(facts) or f"{stored:,}" in str(facts), facts


def test_peft_conv2d_lora_bias_merges_and_round_trips_like_peft(tmp_path):
    base = tiny_vit(tmp_path / "base")
    peft_dir = make_adapter(base, tmp_path / "peft", ["projection", "q_proj"], lora_bias=True)
    original = load_file(peft_dir / "adapter_model.safetensors")
    assert any(k.endswith("projection.lora_B.bias") for k in original)
    ours = tmp_path / "a.safetensors"
    assert adapterfmt.convert(peft_dir, ours, base=base).worst == "lossless"
    adapterfmt.merge(base, [(ours, 1.0)], tmp_path / "merged")
    mine = load(tmp_path / "merged").state_dict()
    reference = peft_model(base, peft_dir).merge_and_unload().state_dict()
    assert max(int(ulp_distance(mine[k], ref).max()) for k, ref in reference.items()) <= 1
    adapterfmt.convert(ours, tmp_path / "back", to="peft")
    again = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(again) == sorted(original) and all(torch.equal(original[k], again[k]) for k in original)
    expected, got = outputs(peft_model(base, peft_dir)), outputs(peft_model(base, tmp_path / "back"))
    assert (got - expected).abs().max() <= 1e-5
