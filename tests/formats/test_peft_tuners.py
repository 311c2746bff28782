"""PEFT IA³ / LoHa / LoKr / AdaLoRA / OFT: import, merge against PEFT's merge_and_unload, PEFT round trip."""
from __future__ import annotations

import json

import pytest
import torch

import adapterfmt
from adapterfmt.engine.unmerge import ulp_distance
from adapterfmt.errors import AdapterFmtError
from adapterfmt.format import read_adapter
from tests.helpers import load_model, peft_logits, peft_merged_state
from tests.tuner_helpers import TUNER_METHODS, make_tuner_adapter


KINDS = list(TUNER_METHODS)


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    """A tiny Qwen2 (q/k/v carry biases, made non-zero so IA³'s bias scaling is visible)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("qwen2") / "base"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_second_architecture_merge_matches_peft(kind, qwen2_base, tmp_path):
    peft_dir = make_tuner_adapter(qwen2_base, tmp_path / "peft", kind)
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=qwen2_base)
    adapterfmt.merge(qwen2_base, [(native, 1.0)], tmp_path / "merged")
    got = load_model(tmp_path / "merged").state_dict()
    want = peft_merged_state(qwen2_base, peft_dir)
    base = load_model(qwen2_base).state_dict()
    for name, tensor in want.items():
        assert int(ulp_distance(got[name], tensor).max()) <= 1, name
    if kind == "ia3":  # output-axis vectors scale k/v biases too
        assert not torch.equal(want["model.layers.0.self_attn.k_proj.bias"], base["model.layers.0.self_attn.k_proj.bias"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merge_matches_peft_within_one_ulp(kind, dtype, llama_base, llama_base_bf16, tmp_path):
    base = llama_base if dtype == "fp32" else llama_base_bf16
    peft_dir = make_tuner_adapter(base, tmp_path / "peft", kind)
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=base)
    assert {e.method for e in read_adapter(native).manifest.modules.values()} == {kind}
    adapterfmt.merge(base, [(native, 1.0)], tmp_path / "merged")
    got = load_model(tmp_path / "merged").state_dict()
    want = peft_merged_state(base, peft_dir)
    changed = 0
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert int(ulp_distance(got[name], tensor).max()) <= 1, name
        changed += not torch.equal(tensor, load_model(base).state_dict()[name]) if name.endswith("proj.weight") else 0
    assert changed > 0


@pytest.mark.parametrize("kind", KINDS)
def test_peft_round_trip_logits(kind, llama_base, tmp_path):
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", kind)
    native, back = tmp_path / "a.safetensors", tmp_path / "back"
    adapterfmt.convert(peft_dir, native, base=llama_base)
    adapterfmt.convert(native, back, to="peft")
    assert json.loads((back / "adapter_config.json").read_text())["peft_type"] == kind.upper()
    torch.testing.assert_close(peft_logits(llama_base, back), peft_logits(llama_base, peft_dir), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["loha", "lokr", "adalora"])
def test_exact_conversion_to_lora(kind, llama_base, tmp_path):
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", kind)
    lora = tmp_path / "lora"
    report = adapterfmt.convert(peft_dir, lora, to="peft", method="lora")
    assert report.worst in ("lossless", "exact")
    torch.testing.assert_close(peft_logits(llama_base, lora), peft_logits(llama_base, peft_dir), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ia3", "oft"])
def test_import_without_base_is_refused_by_name(kind, llama_base, tmp_path):
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", kind)
    with pytest.raises(AdapterFmtError, match="--base"):
        adapterfmt.convert(peft_dir, tmp_path / "a.safetensors")


class _BlockDiagExtension:
    """CPU stand-in for PEFT's fbd_cuda extension: (N, D, H, H) -> (N, D·H, D·H) block diagonals."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*blocks[i]) for i in range(blocks.shape[0])])]


def test_boft_two_butterfly_factors_match_peft(llama_base_bf16, tmp_path, monkeypatch):
    import peft.tuners.boft.layer as boft_layer
    from peft import BOFTConfig, get_peft_model
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiagExtension())  # what a CUDA machine builds
    torch.manual_seed(1)
    model = get_peft_model(load_model(llama_base_bf16), BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                                   target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "peft")
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(tmp_path / "peft", native)
    assert {e.params["butterfly_factors"] for e in read_adapter(native).manifest.modules.values()} == {2}
    adapterfmt.merge(llama_base_bf16, [(native, 1.0)], tmp_path / "merged")
    got = load_model(tmp_path / "merged").state_dict()
    want = peft_merged_state(llama_base_bf16, tmp_path / "peft")
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "boft_n_butterfly_factor": 3}))
    with pytest.raises(AdapterFmtError, match="2 butterfly factor"):
        adapterfmt.convert(tmp_path / "peft", tmp_path / "b.safetensors")


@pytest.mark.parametrize("kind, field, value, message", [
    ("oft", "peft_version", "0.17.1", "PEFT before 0.18.0"),
    ("ia3", "feedforward_modules", [], "feedforward_modules says output"),
    ("loha", "use_effective_conv2d", True, None),  # training-only layout flag: accepted
    ("lokr", "some_future_field", 1, "not understood: some_future_field"),
])
def test_config_contradictions_are_refused_by_name(kind, field, value, message, llama_base, tmp_path):
    import shutil
    peft_dir = tmp_path / "peft"
    shutil.copytree(make_tuner_adapter(llama_base, tmp_path / "orig", kind), peft_dir)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    if message is None:
        adapterfmt.convert(peft_dir, tmp_path / "a.safetensors", base=llama_base)
        return
    with pytest.raises(AdapterFmtError, match=message):
        adapterfmt.convert(peft_dir, tmp_path / "a.safetensors", base=llama_base)


@pytest.mark.parametrize("kind", ["ia3", "adalora"])
def test_gpt2_conv1d_fan_in_fan_out(kind, gpt2_base, tmp_path):
    from peft import AdaLoraConfig, IA3Config, get_peft_model
    config = {"ia3": IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                               fan_in_fan_out=True),
              "adalora": AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=4, init_lora_weights=False,
                                       target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)}[kind]
    torch.manual_seed(2)
    model = get_peft_model(load_model(gpt2_base), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "peft")
    native, back = tmp_path / "a.safetensors", tmp_path / "back"
    adapterfmt.convert(tmp_path / "peft", native, base=gpt2_base)
    assert all(e.fan_in_fan_out and e.layer == "conv1d" for e in read_adapter(native).manifest.modules.values())
    adapterfmt.merge(gpt2_base, [(native, 1.0)], tmp_path / "merged")
    got = load_model(tmp_path / "merged").state_dict()
    for name, tensor in peft_merged_state(gpt2_base, tmp_path / "peft").items():
        assert int(ulp_distance(got[name], tensor).max()) <= 1, name
    adapterfmt.convert(native, back, to="peft")
    torch.testing.assert_close(peft_logits(gpt2_base, back), peft_logits(gpt2_base, tmp_path / "peft"),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ia3", "oft", "boft"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_multiplicative_unmerge_without_base(kind, dtype, llama_base, llama_base_bf16, tmp_path):
    """IA³ divides, OFT/BOFT apply the inverse rotation: the base comes back from the merged model alone."""
    from adapterfmt.engine.unmerge import unmerge
    base = llama_base if dtype == "fp32" else llama_base_bf16
    peft_dir = make_tuner_adapter(base, tmp_path / "peft", kind)
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=base)
    adapterfmt.merge(base, [(native, 1.0)], tmp_path / "merged")
    unmerge(tmp_path / "merged", [(native, 1.0)], tmp_path / "restored")
    got, want = load_model(tmp_path / "restored").state_dict(), load_model(base).state_dict()
    merged = load_model(tmp_path / "merged").state_dict()
    touched = [k for k in want if not torch.equal(merged[k], want[k])]
    assert touched
    for name in touched:
        # The merged value's rounding (an ulp of its largest entry, twice: in and out) plus the fp32 maths
        # of the inverse (a few fp32 ulps over a rotation's dot products).
        top = float(merged[name].float().abs().max())
        bound = 2 * torch.finfo(want[name].dtype).eps * top + 16 * 2.0 ** -24 * top
        assert float((got[name].float() - want[name].float()).abs().max()) <= bound, name


def test_ia3_zero_scale_unmerge_is_refused_by_name(llama_base, tmp_path):
    from adapterfmt.engine.unmerge import unmerge
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", "ia3")
    adapterfmt.convert(peft_dir, tmp_path / "a.safetensors", base=llama_base)
    adapter = read_adapter(tmp_path / "a.safetensors")
    target = "model.layers.0.self_attn.k_proj"
    adapter.tensors[adapter.manifest.modules[target].tensors["scale"].name][3] = 0.0
    adapterfmt.write_adapter(adapter, tmp_path / "z.safetensors")
    adapterfmt.merge(llama_base, [(tmp_path / "z.safetensors", 1.0)], tmp_path / "merged")
    with pytest.raises(AdapterFmtError, match=f"{target}.*1 zero entry"):
        unmerge(tmp_path / "merged", [(tmp_path / "z.safetensors", 1.0)], tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_bias_merges_like_peft_and_round_trips(dtype, qwen2_base, tmp_path):
    """PEFT lora_bias=True: lora_B.bias·scale is added to the layer's bias (Qwen2 q/v carry biases)."""
    from peft import LoraConfig, get_peft_model
    base = tmp_path / "base"
    load_model(qwen2_base).to(dtype).save_pretrained(base)
    torch.manual_seed(4)
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        lora_bias=True, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.default.bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "peft")
    native, back = tmp_path / "a.safetensors", tmp_path / "back"
    adapterfmt.convert(tmp_path / "peft", native, base=base)
    assert any(p.kind == "bias_delta" for p in read_adapter(native).manifest.payloads.values())
    adapterfmt.merge(base, [(native, 1.0)], tmp_path / "merged")
    got, want = load_model(tmp_path / "merged").state_dict(), peft_merged_state(base, tmp_path / "peft")
    assert not torch.equal(want["model.layers.0.self_attn.q_proj.bias"],
                           load_model(base).state_dict()["model.layers.0.self_attn.q_proj.bias"])
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    adapterfmt.convert(native, back, to="peft")
    assert json.loads((back / "adapter_config.json").read_text())["lora_bias"] is True
    if dtype == torch.float32:
        torch.testing.assert_close(peft_logits(base, back), peft_logits(base, tmp_path / "peft"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ia3", "oft", "fourierft"])
def test_no_exact_lora_form_converts_lossy_with_rank_and_reports_the_error(kind, llama_base, tmp_path):
    """IA³ / OFT (multiplicative) and FourierFT (full rank) have no exact LoRA: without --rank the conversion
    is refused by name; with --rank it is the truncated SVD of ΔW, reported lossy with the measured error,
    and the LoRA's ΔW is compared here with the method's ΔW from real PEFT (merged − base)."""
    import adapterfmt
    from adapterfmt.errors import AdapterFmtError
    from tests.helpers import peft_merged_state
    from tests.tuner_helpers import make_tuner_adapter
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", kind)
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=llama_base)
    with pytest.raises(AdapterFmtError):
        adapterfmt.convert(native, tmp_path / "refused.safetensors", method="lora", base=llama_base)
    full = 64  # every module of the tiny Llama has min(out, in) <= 64: rank 64 keeps all of ΔW
    report = adapterfmt.convert(native, tmp_path / "lora.safetensors", method="lora", base=llama_base,
                                resize={"rank": full})
    assert report.worst == "lossy" and all(m.rel_error is not None for m in report.modules)
    assert max(m.rel_error for m in report.modules) < 1e-5  # full rank: only fp32 rounding
    small = adapterfmt.convert(native, tmp_path / "lora2.safetensors", method="lora", base=llama_base,
                               resize={"rank": 2})
    assert max(m.rel_error for m in small.modules) > 1e-3  # the measured loss is reported, not hidden
    small_file = adapterfmt.read_adapter(tmp_path / "lora2.safetensors")  # the file says the rank it holds
    assert {(e.params["rank"], e.params["scale"]) for e in small_file.manifest.modules.values()} == {(2, 1.0)}
    assert all("at rank 2" in m.note for m in small.modules)
    merged = peft_merged_state(llama_base, peft_dir)
    from safetensors.torch import load_file
    base = load_file(str(llama_base / "model.safetensors"))
    lora = adapterfmt.read_adapter(tmp_path / "lora.safetensors")
    for target, entry in lora.manifest.modules.items():
        t = lora.module_tensors(target)
        ours = (t["lora_B"].double() @ t["lora_A"].double()) * entry.params["scale"]
        peft_delta = merged[entry.base_weight].double() - base[entry.base_weight].double()
        assert float((ours - peft_delta).abs().max()) <= 1e-4 * max(float(peft_delta.abs().max()), 1e-6), target
