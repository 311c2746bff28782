"""PEFT import/export against real PEFT: bit-exact round trips, merges, logits."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterfmt.ops.convert import convert
from adapterfmt.engine.unmerge import ulp_distance
from adapterfmt.engine.merge import merge
from adapterfmt.errors import ForeignFormatError, PickleRefusedError
from adapterfmt.format import read_adapter
from adapterfmt.formats.peft.config import resolve_rank_alpha

from ..helpers import make_peft_adapter, peft_logits, peft_merged_state

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
CASES = {
    "llama-lora-qkvo": ("llama_base", dict(r=4, lora_alpha=8, target_modules=QKVO)),
    "llama-patterns-mlp": ("llama_base", dict(r=4, lora_alpha=8, target_modules=QKVO + ["gate_proj", "up_proj", "down_proj"],
                                              rank_pattern={"up_proj": 2, "down_proj": 6},
                                              alpha_pattern={"gate_proj": 3, "model.layers.1.mlp.down_proj": 5})),
    "llama-rslora": ("llama_base", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "llama-dora": ("llama_base", dict(r=4, lora_alpha=8, use_dora=True, target_modules=QKVO)),
    "llama-embed-modules-to-save": ("llama_base", dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                                       modules_to_save=["lm_head"])),
    "llama-bf16-lora": ("llama_base_bf16", dict(r=4, lora_alpha=16, target_modules=QKVO + ["up_proj"])),
    "gpt2-conv1d": ("gpt2_base", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                      fan_in_fan_out=True)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    base_fixture, kwargs = CASES[request.param]
    base = request.getfixturevalue(base_fixture)
    work = tmp_path_factory.mktemp(request.param)
    peft_dir = make_peft_adapter(base, work / "peft", **kwargs)
    ours = work / "adapter.safetensors"
    report = convert(peft_dir, ours, base=base)
    assert report.worst == "lossless", report.lines()
    return request.param, base, peft_dir, ours, work


def test_round_trip_is_bit_exact_and_keeps_scales(case):
    name, base, peft_dir, ours, work = case
    back = work / "peft-back"
    report = convert(ours, back, to="peft", overwrite=True)
    assert report.worst == "lossless", report.lines()
    original, exported = load_file(peft_dir / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert sorted(original) == sorted(exported)
    for key in original:
        assert original[key].dtype == exported[key].dtype
        assert torch.equal(original[key].view(torch.uint8), exported[key].view(torch.uint8)), key
    cfg_in = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg_out = json.loads((back / "adapter_config.json").read_text())
    adapter = read_adapter(ours)
    for target, entry in adapter.manifest.modules.items():
        assert resolve_rank_alpha(cfg_in, target) == resolve_rank_alpha(cfg_out, target)
        assert cfg_in.get("use_rslora", False) == cfg_out["use_rslora"]


def test_merge_matches_peft_merge_and_unload(case):
    name, base, peft_dir, ours, work = case
    out = work / "merged"
    merge(base, [(ours, 1.0)], out, overwrite=True)
    mine = load_file(out / "model.safetensors")
    reference = peft_merged_state(base, peft_dir)
    worst = 0
    for key, ref in reference.items():
        if key not in mine:  # tied weights are saved once
            continue
        worst = max(worst, int(ulp_distance(mine[key], ref.to(mine[key].dtype)).max()))
    print(f"{name}: max ulp difference vs PEFT merge_and_unload = {worst}")
    assert worst <= 1


def test_exported_peft_gives_same_logits(case):
    name, base, peft_dir, ours, work = case
    back = work / "peft-logits"
    convert(ours, back, to="peft", overwrite=True)
    diff = (peft_logits(base, peft_dir) - peft_logits(base, back)).abs().max()
    assert float(diff) <= 1e-5


def test_unknown_state_dict_key_is_named(tmp_path, llama_base):
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj"])
    weights = load_file(peft_dir / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(2, 2)
    save_file(weights, str(peft_dir / "adapter_model.safetensors"))
    # An unknown key that is not a base parameter cannot be a payload either.
    with pytest.raises(Exception) as info:
        convert(peft_dir, tmp_path / "out.safetensors", base=llama_base)
    assert "lora_C" in str(info.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_unknown_config_field_is_named(tmp_path, llama_base):
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj"])
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg["use_quantum_lora"] = True
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ForeignFormatError, match="use_quantum_lora"):
        convert(peft_dir, tmp_path / "out.safetensors")


def test_dora_weights_without_use_dora_are_an_error(tmp_path, llama_base):
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj"], use_dora=True)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ForeignFormatError, match="lora_magnitude_vector present"):
        convert(peft_dir, tmp_path / "out.safetensors")


def test_pickle_adapter_needs_flag(tmp_path, llama_base):
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj"])
    weights = load_file(peft_dir / "adapter_model.safetensors")
    (peft_dir / "adapter_model.safetensors").unlink()
    torch.save(weights, peft_dir / "adapter_model.bin")
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        convert(peft_dir, tmp_path / "out.safetensors")
    report = convert(peft_dir, tmp_path / "out.safetensors", allow_pickle=True)
    assert report.worst == "lossless"


def test_convert_with_a_different_base_is_refused(tmp_path, llama_base):
    from adapterfmt.errors import BaseMismatchError
    from ..helpers import tiny_llama
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj"])
    ours = tmp_path / "a.safetensors"
    convert(peft_dir, ours, base=llama_base)
    other = tiny_llama(tmp_path / "other", seed=7)
    with pytest.raises(BaseMismatchError, match="fingerprint mismatch"):
        convert(ours, tmp_path / "back", to="peft", base=other)
    assert not (tmp_path / "back").exists()
