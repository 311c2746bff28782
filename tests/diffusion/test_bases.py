"""--base accepts diffusers pipeline and component directories; multi-component manifests bind per component."""
import json

import pytest
import torch
from safetensors.torch import save_file

from adapterfmt.checkpoint import DiffusersComponent, DiffusersPipeline
from adapterfmt.engine.base import bind_base
from adapterfmt.errors import BaseMismatchError, InputIOError, ManifestError
from adapterfmt.format import Adapter, Manifest, read_adapter, write_adapter
from adapterfmt.format.components import join_components, split_components
from adapterfmt.formats._lowrank import add_lowrank_module
from adapterfmt.methods.lora import lora_params
from adapterfmt.ops.load import load_base

from .models import save_component, sd15_unet


def test_pipeline_dir_names_are_component_prefixed(sd15):
    path, models = sd15
    base = load_base(path)
    assert isinstance(base, DiffusersPipeline) and sorted(base.components) == ["text_encoder", "unet"]
    assert base.architecture == "StableDiffusionPipeline"
    assert base.components["unet"].architecture == "UNet2DConditionModel"
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert name in base and torch.equal(base.get(name), models["unet"].state_dict()[name[5:]])
    assert len(base.names()) == sum(len(m.state_dict()) for m in models.values())


def test_component_dirs_plain_and_sharded(tmp_path):
    unet = sd15_unet()
    plain = load_base(save_component(unet, tmp_path / "plain"))
    sharded = load_base(save_component(unet, tmp_path / "sharded", max_shard_size="50KB"))
    assert isinstance(sharded, DiffusersComponent) and len(sharded.shard_files) > 1
    assert plain.names() and sorted(plain.names()) == sorted(sharded.names())
    name = "conv_in.weight"
    assert plain.fingerprint(name) == sharded.fingerprint(name)
    assert torch.equal(sharded.get(name), unet.state_dict()[name])


def test_single_file_ldm_checkpoint_is_refused(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(InputIOError, match="no UNet or CLIP text encoder found in the single-file"):
        load_base(path)


def _two_component_adapter(sd15) -> Adapter:
    parts = {}
    for component, module, (out_f, in_f) in (("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (8, 8)),
                                             ("text_encoder", "encoder.layers.0.self_attn.q_proj", (16, 16))):
        manifest, tensors = Manifest(), {}
        add_lowrank_module(manifest, tensors, module, torch.randn(2, in_f), torch.randn(out_f, 2), lora_params(2, 4.0, False))
        parts[component] = Adapter(manifest, tensors)
    return join_components(parts)


def test_multi_component_round_trip_and_binding(sd15, tmp_path):
    adapter = _two_component_adapter(sd15)
    base = load_base(sd15[0])
    bind_base(adapter, base)
    identity = adapter.manifest.components["unet"]
    assert identity.architecture == "UNet2DConditionModel"
    weight = identity.weights["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert weight.fingerprint == base.components["unet"].fingerprint(
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")
    out = write_adapter(adapter, tmp_path / "multi.safetensors")
    back = read_adapter(out)
    assert back.manifest.to_json() == adapter.manifest.to_json()
    assert sorted(split_components(back)) == ["text_encoder", "unet"]
    data = json.loads(back.manifest.to_json())
    assert data["modules"]["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]["component"] == "unet"
    bind_base(back, base, check_only=True)
    # a component bound against another component's weights is refused, not silently accepted
    wrong = back.manifest.components["text_encoder"].weights["encoder.layers.0.self_attn.q_proj.weight"]
    wrong.fingerprint = weight.fingerprint
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        bind_base(back, base, check_only=True)


def test_multi_component_needs_a_pipeline_base(sd15):
    adapter = _two_component_adapter(sd15)
    with pytest.raises(BaseMismatchError, match="pipeline directory"):
        bind_base(adapter, DiffusersComponent(sd15[0] / "unet"))


def test_single_model_manifest_has_no_component_members(tmp_path):
    manifest, tensors = Manifest(), {}
    add_lowrank_module(manifest, tensors, "model.q_proj", torch.ones(1, 2), torch.ones(2, 1), lora_params(1, 1.0, False))
    data = json.loads(manifest.to_json())
    assert "components" not in data and "component" not in data["modules"]["model.q_proj"]


def test_module_with_unknown_component_is_refused(sd15):
    data = json.loads(_two_component_adapter(sd15).manifest.to_json())
    data["modules"]["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]["component"] = "vae"
    with pytest.raises(ManifestError, match="not in components"):
        Manifest.from_dict(data)


def test_files_without_components_reserialise_byte_identically():
    """Every conformance vector's manifest comes back as the same bytes (the 1.1 fields stay absent)."""
    from pathlib import Path

    from safetensors import safe_open

    from adapterfmt.format.container import parse_manifest
    vectors = sorted(Path(__file__).resolve().parents[2].glob("spec/vectors/*/*.safetensors"))
    checked = 0
    for path in vectors:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        # newer-minor vectors carry fields this reader ignores; invalid ones are refused
        if "adapterfmt.manifest" not in metadata or "invalid" in path.parts or \
                metadata.get("adapterfmt.version") not in ("1.0", "1.1"):
            continue
        manifest, _ = parse_manifest(metadata, str(path))
        assert manifest.to_json() == metadata["adapterfmt.manifest"], path
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["components"].__setitem__("UNet", d["components"].pop("unet")), "UNet"),
    (lambda d: d["base"]["weights"].__setitem__("x.weight", {"shape": [1], "dtype": None, "fingerprint": None}),
     "base.weights"),
    (lambda d: d["modules"].__setitem__("other.name", d["modules"].pop(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")), "is not keyed"),
])
def test_component_rules_are_enforced_on_read(sd15, edit, message):
    from adapterfmt.format.schema import validate_manifest_dict
    data = json.loads(_two_component_adapter(sd15).manifest.to_json())
    edit(data)
    with pytest.raises(ManifestError, match=message):
        validate_manifest_dict(data, "x")
        Manifest.from_dict(data)
