"""LyCORIS files (Tucker on) for a tiny SD 1.x UNet: Linear attention, 1×1 conv proj_in/proj_out, 3×3 resnet convs.

Made by LyCORIS itself on every Linear and Conv2d (norm layers left out: adapterfmt has no norm method), read
against the UNet component directory, written back bit for bit, and merged equal to LyCORIS's own forward pass.
"""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

import adapterfmt

pytest.importorskip("lycoris")
pytest.importorskip("diffusers")


def run_unet(model) -> torch.Tensor:
    torch.manual_seed(0)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    with torch.no_grad():
        return model(sample, 1, encoder_hidden_states=text).sample


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    from tests.diffusion.models import sd15_unet
    path = tmp_path_factory.mktemp("unet") / "unet"
    sd15_unet().save_pretrained(path)
    return path


def lycoris_unet_file(unet_dir, algo, out):
    """(LyCORIS file, LyCORIS's forward output) for ``algo`` with use_tucker on Linear and Conv2d layers."""
    from diffusers import UNet2DConditionModel
    from lycoris import create_lycoris
    from lycoris.wrapper import LycorisNetwork
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    model = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    default = LycorisNetwork.TARGET_REPLACE_MODULE
    LycorisNetwork.TARGET_REPLACE_MODULE = ["Linear", "Conv2d"]  # a class attribute: restored below
    try:
        network = create_lycoris(model, 1.0, linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0, algo=algo,
                                 use_tucker=True, factor=-1)
    finally:
        LycorisNetwork.TARGET_REPLACE_MODULE = default
    network.apply_to()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in network.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    network.save_weights(str(out), torch.float32, None)
    return out, run_unet(model)


@pytest.mark.parametrize("algo, core", [("loha", "t1"), ("lokr", "t2"), ("lora", "lora_mid")])
def test_unet_lycoris_file_reads_merges_and_writes_back(unet_dir, tmp_path, algo, core):
    from diffusers import UNet2DConditionModel
    path, want = lycoris_unet_file(unet_dir, algo, tmp_path / "lyco.safetensors")
    native = tmp_path / "a.safetensors"
    report = adapterfmt.convert(path, native, base=unet_dir)
    assert report.worst == "lossless"
    entries = adapterfmt.read_adapter(native).manifest.modules.values()
    forms = {(e.layer, core in e.tensors) for e in entries}
    assert forms == {("linear", False), ("conv2d", False), ("conv2d", True)}  # 1×1 convs stay flattened
    assert any(e.layer == "conv2d" and e.shape[2:] == [1, 1] for e in entries)  # SD 1.x conv proj_in/proj_out
    state = load_file(path)
    assert sum(len(e.tensors) for e in entries) + len(entries) == len(state)  # every factor, one alpha each
    back = tmp_path / "back.safetensors"
    adapterfmt.convert(native, back, to="lycoris")
    again = load_file(back)
    assert set(again) == set(state) and all(torch.equal(again[k], v) for k, v in state.items())
    adapterfmt.merge(unet_dir, [(native, 1.0)], tmp_path / "merged")
    got = run_unet(UNet2DConditionModel.from_pretrained(tmp_path / "merged").eval())
    assert (want - run_unet(UNet2DConditionModel.from_pretrained(unet_dir).eval())).abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-5
