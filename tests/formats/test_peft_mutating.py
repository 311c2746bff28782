"""Raw PEFT OLoRA/PiSSA adapters (saved without conversion) against PEFT's own conversion."""
from __future__ import annotations

import pytest
import torch

from adapterfmt.ops.convert import convert
from adapterfmt.engine.merge import merge
from adapterfmt.errors import ForeignFormatError
from adapterfmt.format import read_adapter
from adapterfmt.ops.validate import validate
from tests.helpers import load_model, logits, peft_logits, peft_merged_state, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base") / "llama")


def make_raw(base, root, init, rslora=False):
    """get_peft_model with a mutating init; save init, perturb A/B ("train"), save raw and converted."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(3)
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         init_lora_weights=init, use_rslora=rslora))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(root / "init")
    model.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(root / "raw")
    model.save_pretrained(root / "converted", path_initial_model_for_weight_conversion=str(root / "init"))
    return root


@pytest.mark.parametrize("init,rslora", [("olora", False), ("pissa", False), ("pissa", True)])
def test_raw_matches_peft_conversion(base, tmp_path, init, rslora):
    root = make_raw(base, tmp_path, init, rslora)
    report = convert(root / "raw", tmp_path / "a.safetensors", base=base)
    adapter = read_adapter(tmp_path / "a.safetensors")
    assert adapter.manifest.methods() == [init]
    entry = next(iter(adapter.manifest.modules.values()))
    assert entry.params["max_abs_residual_error"] == 0.0 and entry.params["residual_dtype"] == "F32"
    assert all(w.fingerprint for w in adapter.manifest.base.weights.values())
    assert validate(tmp_path / "a.safetensors", base).valid
    merge(base, [(tmp_path / "a.safetensors", 1.0)], tmp_path / "merged")
    ours = load_model(tmp_path / "merged").state_dict()
    reference = peft_merged_state(base, root / "converted")
    worst = max(float((ours[k] - reference[k]).abs().max()) for k in reference)
    assert worst < 1e-5, worst
    # Export as plain PEFT LoRA (rank 2r): same logits as PEFT's own loading of the raw adapter.
    rep = convert(tmp_path / "a.safetensors", tmp_path / "peft", to="peft")
    assert rep.worst == "exact"
    assert all(m.max_abs_error is not None and m.max_abs_error < 1e-6 for m in rep.modules)
    expected = peft_logits(base, root / "raw")
    assert float((peft_logits(base, tmp_path / "peft") - expected).abs().max()) < 1e-5
    assert float((peft_logits(base, root / "converted") - expected).abs().max()) < 1e-5


def test_converted_imports_as_lora(base, tmp_path):
    root = make_raw(base, tmp_path, "pissa")
    convert(root / "converted", tmp_path / "c.safetensors", base=base)
    adapter = read_adapter(tmp_path / "c.safetensors")
    assert adapter.manifest.methods() == ["lora"]
    assert {e.params["rank"] for e in adapter.manifest.modules.values()} == {8}


def test_refusals_and_snapshot(base, tmp_path):
    root = make_raw(base, tmp_path, "pissa_niter_2")
    with pytest.raises(ForeignFormatError, match="seed"):
        convert(root / "raw", tmp_path / "x.safetensors", base=base)
    with pytest.raises(ForeignFormatError, match="residual base"):
        convert(root / "raw", tmp_path / "x.safetensors")
    convert(root / "raw", tmp_path / "s.safetensors", base=base,
            format_options={"init_snapshot": root / "init"})
    assert read_adapter(tmp_path / "s.safetensors").manifest.modules[
        "model.layers.0.self_attn.q_proj"].params["init_source"] == "snapshot"
    merge(base, [(tmp_path / "s.safetensors", 1.0)], tmp_path / "merged")
    ours = load_model(tmp_path / "merged").state_dict()
    reference = peft_merged_state(base, root / "converted")
    assert max(float((ours[k] - reference[k]).abs().max()) for k in reference) < 1e-5


def test_bf16_base_records_residual_error(tmp_path):
    base = tiny_llama(tmp_path / "b16", dtype=torch.bfloat16)
    root = make_raw(base, tmp_path, "olora")
    convert(root / "raw", tmp_path / "a.safetensors", base=base)
    entry = read_adapter(tmp_path / "a.safetensors").manifest.modules["model.layers.0.self_attn.q_proj"]
    assert entry.params["residual_dtype"] == "BF16"
    assert 0 < entry.params["max_abs_residual_error"] < 1e-2
