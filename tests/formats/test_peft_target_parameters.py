"""LoRA on MoE experts through PEFT ``target_parameters`` (3-D nn.Parameters), against real PEFT.

Two tiny transformers-5 MoE models whose checkpoints store the experts as one 3-D tensor:
GPT-OSS (``is_transposed``: (experts, in, out)) and Llama 4 (PEFT reads (experts, out, in)).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from adapterfmt.engine.merge import merge
from adapterfmt.engine.unmerge import ulp_distance
from adapterfmt.errors import ForeignFormatError, UsageError
from adapterfmt.format import read_adapter
from adapterfmt.methods import get_method
from adapterfmt.ops.convert import convert
from adapterfmt.ops.validate import validate

from ..helpers import logits


def tiny_gpt_oss(path, dtype=torch.float32):
    from transformers import GptOssConfig, GptOssForCausalLM
    torch.manual_seed(0)
    config = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
                          layer_types=["full_attention", "sliding_attention"],
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return _save(GptOssForCausalLM(config), path, dtype)


def tiny_llama4(path, dtype=torch.float32):
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    torch.manual_seed(0)
    config = Llama4TextConfig(hidden_size=32, intermediate_size=24, intermediate_size_mlp=40, num_local_experts=4,
                              num_experts_per_tok=1, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64,
                              tie_word_embeddings=False, interleave_moe_layer_step=1)
    return _save(Llama4ForCausalLM(config), path, dtype)


def _save(model, path, dtype):
    with torch.no_grad():
        for param in model.parameters():  # the configs' inits leave some experts at zero
            param.normal_(0, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.to(dtype).save_pretrained(path)
    return path


MODELS = {"gpt_oss": (tiny_gpt_oss, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
          "llama4": (tiny_llama4, ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"])}


def load(base):
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(base, dtype="auto")


def make_adapter(base, out, targets, **kwargs):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    kwargs = {"r": 2, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": False,
              "task_type": "CAUSAL_LM", **kwargs}
    model = get_peft_model(load(base), LoraConfig(target_parameters=targets, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=sorted(MODELS))
def moe(request, tmp_path_factory):
    build, targets = MODELS[request.param]
    work = tmp_path_factory.mktemp(request.param)
    base = build(work / "base")
    peft_dir = make_adapter(base, work / "peft", targets, rank_pattern={targets[1]: 3})
    ours = work / "a.safetensors"
    report = convert(peft_dir, ours, base=base)
    assert report.worst == "lossless", report.lines()
    return request.param, base, peft_dir, ours, work


def peft_model(base, adapter_dir):
    from peft import PeftModel
    return PeftModel.from_pretrained(load(base), adapter_dir).eval()


def test_peft_target_parameters_stored_as_experts_equal_peft_delta(moe):
    name, base, peft_dir, ours, _ = moe
    from peft.tuners.lora.layer import ParamWrapper
    adapter = read_adapter(ours)
    experts = {t: e for t, e in adapter.manifest.modules.items() if e.layer == "experts"}
    assert len(experts) == 4
    model = peft_model(base, peft_dir)
    checked = 0
    for module_name, module in model.base_model.model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        owner = module_name.replace(".base_layer", "")
        target = f"{owner}.{module.parameter_name}"
        entry = experts[target]
        with torch.no_grad():
            reference = module.get_delta_weight("default")  # PEFT's own ΔW, stored layout
            mine = get_method("lora").delta(entry, adapter.module_tensors(target))
        mine = mine.transpose(-2, -1) if entry.fan_in_fan_out else mine
        assert entry.fan_in_fan_out == (name == "gpt_oss")
        assert torch.equal(mine, reference), target
        checked += 1
    assert checked == 4


def test_peft_target_parameters_moe_merge_equals_peft(moe):
    name, base, peft_dir, ours, work = moe
    merge(base, [(ours, 1.0)], work / "merged", overwrite=True)
    mine = load_file(work / "merged" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    reference = peft_model(base, peft_dir).merge_and_unload().state_dict()
    worst, changed = 0, []
    for key, ref in reference.items():
        if key in mine:
            worst = max(worst, int(ulp_distance(mine[key], ref.to(mine[key].dtype)).max()))
            if not torch.equal(mine[key], original[key]):
                changed.append(key)
    print(f"{name}: max ulp vs PEFT merge_and_unload = {worst}")
    assert worst <= 1
    assert sum(".experts." in k for k in changed) == 4 and len(changed) == 6


def test_peft_target_parameters_round_trip_loads_in_peft(moe):
    name, base, peft_dir, ours, work = moe
    back = work / "back"
    report = convert(ours, back, to="peft", overwrite=True)
    assert report.worst == "lossless", report.lines()
    original = load_file(peft_dir / "adapter_model.safetensors")
    exported = load_file(back / "adapter_model.safetensors")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    cfg_in = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg_out = json.loads((back / "adapter_config.json").read_text())
    for key in ("target_parameters", "target_modules", "rank_pattern", "task_type"):
        assert cfg_out[key] == cfg_in[key], key
    reference = logits(peft_model(base, peft_dir))
    diff = float((reference - logits(peft_model(base, back))).abs().max())
    print(f"{name}: logits max |Δ| after round trip = {diff:.3g}")
    assert diff <= 1e-5
    assert float((reference - logits(load(base))).abs().max()) > 1e-4  # the adapter changes the model


def test_peft_target_parameters_subset_export_nests_like_peft(moe, tmp_path):
    """Only one parameter per expert module written: PEFT then nests nothing (new keys, same ΔW)."""
    name, base, peft_dir, ours, work = moe
    from adapterfmt.format import write_adapter
    adapter = read_adapter(ours)
    drop = [t for t in adapter.manifest.modules if t.endswith("down_proj")]
    for target in drop:
        for ref in adapter.manifest.modules.pop(target).tensors.values():
            adapter.tensors.pop(ref.name)
        adapter.manifest.base.weights.pop(target)
    write_adapter(adapter, tmp_path / "subset.safetensors")
    convert(tmp_path / "subset.safetensors", tmp_path / "back", to="peft")
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(t for t in adapter.manifest.modules if ".experts." in t)
    merge(base, [(tmp_path / "subset.safetensors", 1.0)], tmp_path / "merged")
    mine = load_file(tmp_path / "merged" / "model.safetensors")
    reference = peft_model(base, tmp_path / "back").merge_and_unload().state_dict()
    assert max(int(ulp_distance(mine[k], v).max()) for k, v in reference.items() if k in mine) <= 1


@pytest.mark.parametrize("fmt", ["gguf", "mlx", "kohya"])
def test_experts_modules_refused_by_other_writers(moe, tmp_path, fmt):
    name, base, peft_dir, ours, work = moe
    suffix = {"gguf": "out.gguf", "mlx": "mlx-out", "kohya": "out-kohya.safetensors"}[fmt]
    with pytest.raises(UsageError, match=r"experts"):
        convert(ours, tmp_path / suffix, to=fmt, base=base)
    assert not (tmp_path / suffix).exists()


def test_peft_target_parameters_without_base_refused(moe, tmp_path):
    name, base, peft_dir, ours, work = moe
    with pytest.raises(ForeignFormatError, match="--base"):
        convert(peft_dir, tmp_path / "a.safetensors")


def test_experts_adapter_validates(moe):
    name, base, peft_dir, ours, work = moe
    result = validate(ours, base=base)
    assert not result.problems, result.problems


@pytest.mark.parametrize("name", sorted(MODELS))
def test_peft_target_parameters_bf16_merge_rounds_once(tmp_path, name):
    """bf16 base: our merge is PEFT's fp32 merge rounded once to bf16 (0 ulp measured).

    PEFT's own bf16 merge of a ParamWrapper rounds ΔW (einsum and scaling in bf16) before the add,
    so it differs from the single rounding by up to an ulp of |ΔW|; PEFT in fp32 is the reference.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    build, targets = MODELS[name]
    base = build(tmp_path / "base", torch.bfloat16)
    peft_dir = make_adapter(base, tmp_path / "peft", targets)
    convert(peft_dir, tmp_path / "a.safetensors", base=base)
    merge(base, [(tmp_path / "a.safetensors", 1.0)], tmp_path / "merged")
    mine = load_file(tmp_path / "merged" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    reference = PeftModel.from_pretrained(model, peft_dir).merge_and_unload().state_dict()
    worst = max(int(ulp_distance(mine[k], v.to(torch.bfloat16)).max()) for k, v in reference.items() if k in mine)
    assert mine["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert worst <= 1


def test_peft_target_parameters_on_per_expert_checkpoint_refused_by_name(tmp_path):
    """Qwen3-MoE checkpoints store experts one by one; transformers stacks them at load."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                            num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    base = _save(Qwen3MoeForCausalLM(config), tmp_path / "base", torch.float32)
    peft_dir = make_adapter(base, tmp_path / "peft", ["mlp.experts.gate_up_proj"])
    with pytest.raises(ForeignFormatError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj.*not stored"):
        convert(peft_dir, tmp_path / "a.safetensors", base=base)
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.parametrize("options", [dict(resize={"rank": 1}), dict(method="nola")], ids=["resize", "to-nola"])
def test_experts_refused_by_ops_for_matrices(moe, tmp_path, options):
    name, base, peft_dir, ours, work = moe
    with pytest.raises(UsageError, match=r"experts\.(down|gate_up)_proj.*experts layer"):
        convert(ours, tmp_path / "out.safetensors", **options)
    assert not (tmp_path / "out.safetensors").exists()


def test_peft_target_parameters_2d_round_trip_and_merge(tmp_path, llama_base):
    """A 2-D targeted parameter is plain LoRA on it: the module is named as the parameter."""
    from ..helpers import make_peft_adapter, peft_logits, peft_merged_state
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj"],
                                 target_parameters=["mlp.down_proj.weight"])
    ours = tmp_path / "a.safetensors"
    assert convert(peft_dir, ours, base=llama_base).worst == "lossless"
    entry = read_adapter(ours).manifest.modules["model.layers.1.mlp.down_proj.weight"]
    assert entry.layer == "linear" and entry.base_weight == "model.layers.1.mlp.down_proj.weight"
    assert convert(ours, tmp_path / "back", to="peft").worst == "lossless"
    original = load_file(peft_dir / "adapter_model.safetensors")
    exported = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(original) == sorted(exported) and all(torch.equal(original[k], exported[k]) for k in original)
    assert float((peft_logits(llama_base, peft_dir) - peft_logits(llama_base, tmp_path / "back")).abs().max()) <= 1e-5
    merge(llama_base, [(ours, 1.0)], tmp_path / "merged")
    mine = load_file(tmp_path / "merged" / "model.safetensors")
    reference = peft_merged_state(llama_base, peft_dir)
    assert max(int(ulp_distance(mine[k], v).max()) for k, v in reference.items() if k in mine) <= 1
    assert not torch.equal(mine["model.layers.1.mlp.down_proj.weight"],
                           load_file(llama_base / "model.safetensors")["model.layers.1.mlp.down_proj.weight"])
