"""PEFT config fields and bias tensors through adapterfmt and back, with real PEFT as the reference."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from adapterfmt.engine.merge import merge
from adapterfmt.engine.unmerge import ulp_distance
from adapterfmt.errors import ForeignFormatError, UsageError
from adapterfmt.format import read_adapter, write_adapter
from adapterfmt.ops.convert import convert

from ..helpers import make_peft_adapter, peft_logits, peft_merged_state


def tiny_qwen2(path, seed: int = 0):
    """A 2-layer Qwen2 (q/k/v have biases), biases non-zero so that they matter."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    return tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "base")


def trained_bias_adapter(base, out, bias, **kwargs):
    """A PEFT adapter saved with ``bias`` whose biases moved away from the base (as after training)."""
    from peft import LoraConfig, get_peft_model
    from ..helpers import load_model
    torch.manual_seed(3)
    kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, bias=bias, init_lora_weights=False,
                                                        task_type="CAUSAL_LM", **kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.add_(torch.randn_like(param))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


def round_trip(peft_dir, base, work):
    ours, back = work / "a.safetensors", work / "back"
    report = convert(peft_dir, ours, base=base)
    assert report.worst == "lossless", report.lines()
    report = convert(ours, back, to="peft", overwrite=True)
    assert report.worst == "lossless", report.lines()
    return ours, back


def config_of(path):
    return json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_bias_all_round_trip_loads_in_peft(tmp_path, qwen2_base, bias):
    peft_dir = trained_bias_adapter(qwen2_base, tmp_path / "peft", bias)
    ours, back = round_trip(peft_dir, qwen2_base, tmp_path)
    adapter = read_adapter(ours)
    kinds = {p.target: p.kind for p in adapter.manifest.payloads.values()}
    # bias="all" also saved k_proj's bias (not a LoRA target): a full replacement, not modules_to_save.
    expected = {f"model.layers.{i}.self_attn.{m}.bias" for i in (0, 1)
                for m in (("q_proj", "k_proj", "v_proj") if bias == "all" else ("q_proj", "v_proj"))}
    assert kinds == {t: "full_weight" for t in expected}
    cfg = config_of(back)
    assert cfg["bias"] == bias and cfg["modules_to_save"] is None
    original = load_file(peft_dir / "adapter_model.safetensors")
    exported = load_file(back / "adapter_model.safetensors")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    reference = peft_logits(qwen2_base, peft_dir)
    assert float((reference - peft_logits(qwen2_base, back)).abs().max()) <= 1e-5
    # The biases matter: without them the logits move (so the comparison above can fail).
    no_bias = tmp_path / "no-bias"
    convert(peft_dir, tmp_path / "plain.safetensors", base=qwen2_base)
    plain = read_adapter(tmp_path / "plain.safetensors")
    plain.manifest.payloads.clear()
    plain.tensors = {k: v for k, v in plain.tensors.items() if not k.startswith("payload.")}
    write_adapter(plain, tmp_path / "plain2.safetensors")
    convert(tmp_path / "plain2.safetensors", no_bias, to="peft")
    assert float((reference - peft_logits(qwen2_base, no_bias)).abs().max()) > 1e-3


def test_peft_bias_all_merge_equals_peft(tmp_path, qwen2_base):
    peft_dir = trained_bias_adapter(qwen2_base, tmp_path / "peft", "all")
    ours = tmp_path / "a.safetensors"
    convert(peft_dir, ours, base=qwen2_base)
    merge(qwen2_base, [(ours, 1.0)], tmp_path / "merged")
    mine = load_file(tmp_path / "merged" / "model.safetensors")
    reference = peft_merged_state(qwen2_base, peft_dir)
    worst = max(int(ulp_distance(mine[k], ref.to(mine[k].dtype)).max()) for k, ref in reference.items() if k in mine)
    assert worst <= 1
    assert torch.equal(mine["model.layers.0.self_attn.k_proj.bias"], reference["model.layers.0.self_attn.k_proj.bias"])


def test_peft_bias_key_without_bias_all_is_refused_by_name(tmp_path, qwen2_base):
    peft_dir = trained_bias_adapter(qwen2_base, tmp_path / "peft", "all")
    cfg = config_of(peft_dir)
    cfg["bias"] = "none"
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ForeignFormatError, match="k_proj.bias"):
        convert(peft_dir, tmp_path / "a.safetensors", base=qwen2_base)


def test_peft_task_type_preserved(tmp_path, llama_base):
    from peft import PeftModel, PeftModelForCausalLM
    from ..helpers import load_model
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    _, back = round_trip(peft_dir, llama_base, tmp_path)
    assert config_of(back)["task_type"] == "CAUSAL_LM"
    model = PeftModel.from_pretrained(load_model(llama_base), back)
    assert isinstance(model, PeftModelForCausalLM)


SELECTIONS = {
    "regex": dict(target_modules=r".*\.layers\.1\..*(q|v)_proj"),
    "layers-to-transform": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                                layers_pattern="layers"),
    "exclude": dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
}


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_peft_target_modules_as_written_preserved(tmp_path, llama_base, name):
    kwargs = SELECTIONS[name]
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=4, lora_alpha=8, **kwargs)
    _, back = round_trip(peft_dir, llama_base, tmp_path)
    original, written = config_of(peft_dir), config_of(back)
    for key in ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules", "bias", "task_type",
                "r", "lora_alpha", "rank_pattern", "alpha_pattern"):
        assert written[key] == original[key], key
    assert float((peft_logits(llama_base, peft_dir) - peft_logits(llama_base, back)).abs().max()) <= 1e-5


def test_peft_patterns_restored_as_written(tmp_path, llama_base):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                  rank_pattern={"^model.layers.1.*v_proj": 2}, alpha_pattern={"up_proj": 3})
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", **kwargs)
    _, back = round_trip(peft_dir, llama_base, tmp_path)
    for key in ("rank_pattern", "alpha_pattern", "r", "lora_alpha"):
        assert config_of(back)[key] == config_of(peft_dir)[key], key


def test_peft_selection_rewritten_when_modules_change(tmp_path, llama_base):
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj", "v_proj"],
                                 task_type="CAUSAL_LM")
    ours = tmp_path / "a.safetensors"
    convert(peft_dir, ours, base=llama_base)
    adapter = read_adapter(ours)
    dropped = "model.layers.0.self_attn.v_proj"
    for ref in adapter.manifest.modules.pop(dropped).tensors.values():
        adapter.tensors.pop(ref.name)
    adapter.manifest.base.weights.pop(f"{dropped}.weight")
    write_adapter(adapter, tmp_path / "b.safetensors")
    report = convert(tmp_path / "b.safetensors", tmp_path / "back", to="peft")
    cfg = config_of(tmp_path / "back")
    # ["q_proj", "v_proj"] would make PEFT add a LoRA layer on the dropped module too.
    assert sorted(cfg["target_modules"]) == sorted(adapter.manifest.modules)
    assert cfg["task_type"] == "CAUSAL_LM"
    assert any("target_modules" in note for note in report.notes)


def test_peft_unknown_source_config_field_refused_by_name(tmp_path, llama_base):
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj"])
    ours = tmp_path / "a.safetensors"
    convert(peft_dir, ours, base=llama_base)
    adapter = read_adapter(ours)
    adapter.manifest.source["config"]["use_quantum_lora"] = True
    write_adapter(adapter, tmp_path / "b.safetensors")
    with pytest.raises(UsageError, match="use_quantum_lora"):
        convert(tmp_path / "b.safetensors", tmp_path / "back", to="peft")
    assert not (tmp_path / "back").exists()


def test_peft_layer_replication_refused(tmp_path, llama_base):
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj"])
    cfg = config_of(peft_dir)
    cfg["layer_replication"] = [[0, 2], [1, 2]]
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ForeignFormatError, match="layer_replication"):
        convert(peft_dir, tmp_path / "a.safetensors")


def test_peft_bias_and_task_type_derived_without_source_config(tmp_path, qwen2_base):
    """An adapter that did not come from PEFT (no source config): bias from its payloads, task from the base."""
    from peft import PeftModel, PeftModelForCausalLM
    from ..helpers import load_model
    peft_dir = trained_bias_adapter(qwen2_base, tmp_path / "peft", "all")
    convert(peft_dir, tmp_path / "a.safetensors", base=qwen2_base)
    adapter = read_adapter(tmp_path / "a.safetensors")
    adapter.manifest.source = {}
    write_adapter(adapter, tmp_path / "b.safetensors")
    convert(tmp_path / "b.safetensors", tmp_path / "back", to="peft")
    cfg = config_of(tmp_path / "back")
    assert cfg["bias"] == "all" and cfg["task_type"] == "CAUSAL_LM"
    model = PeftModel.from_pretrained(load_model(qwen2_base), tmp_path / "back")
    assert isinstance(model, PeftModelForCausalLM)
    assert float((peft_logits(qwen2_base, peft_dir) - peft_logits(qwen2_base, tmp_path / "back")).abs().max()) <= 1e-5


def test_peft_weights_of_unselected_module_refused_by_name(tmp_path, llama_base):
    """PEFT silently skips saved LoRA weights of modules its config does not select; we refuse them."""
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", r=2, target_modules=["q_proj", "v_proj"])
    full = peft_logits(llama_base, peft_dir)
    cfg = config_of(peft_dir)
    cfg["target_modules"] = ["q_proj"]
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    assert float((full - peft_logits(llama_base, peft_dir)).abs().max()) > 1e-3  # PEFT dropped v_proj
    with pytest.raises(ForeignFormatError, match=r"v_proj.*do not select"):
        convert(peft_dir, tmp_path / "a.safetensors", base=llama_base)
    assert not (tmp_path / "a.safetensors").exists()
