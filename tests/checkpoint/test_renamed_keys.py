"""transformers 5 renames some checkpoint keys on load (ViT: ``encoder.layer.N.attention.attention.query``
is ``layers.N.attention.q_proj`` in the model); PEFT names modules by the live names. Binding and merging
go through transformers' own conversion mapping, never a table of ours."""
from __future__ import annotations

import pytest
import torch

import adapterfmt
from adapterfmt.checkpoint import BaseCheckpoint


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    path = tmp_path_factory.mktemp("vit") / "base"
    ViTForImageClassification(config).save_pretrained(path)
    return path


def vit_logits(model):
    torch.manual_seed(1)
    with torch.no_grad():
        return model(pixel_values=torch.randn(2, 3, 32, 32)).logits


def test_vit_lora_binds_and_merges_through_transformers_renaming(vit, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import ViTForImageClassification
    base = BaseCheckpoint(vit)
    stored = "vit.encoder.layer.0.attention.attention.query.weight"
    assert stored in base.names() and base.resolve("vit.layers.0.attention.q_proj.weight") == stored
    model = ViTForImageClassification.from_pretrained(vit)
    torch.manual_seed(2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    native = tmp_path / "a.safetensors"
    # Before: "base model has no parameter 'vit.layers.0.attention.q_proj.weight'" (made for a different model).
    adapterfmt.convert(tmp_path / "peft", native, base=vit)
    assert adapterfmt.validate(native, base=vit).valid
    adapterfmt.merge(vit, [native], tmp_path / "merged")
    reference = vit_logits(PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(vit), tmp_path / "peft"))
    merged = vit_logits(ViTForImageClassification.from_pretrained(tmp_path / "merged"))
    assert float((merged - reference).abs().max()) < 1e-5
    assert float((vit_logits(ViTForImageClassification.from_pretrained(vit)) - reference).abs().max()) > 1e-3
