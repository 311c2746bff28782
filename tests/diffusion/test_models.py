"""The tiny diffusion models run and reload with diffusers / transformers from their directories."""
import json

import torch


def test_sd15_pipeline_dir_reloads(sd15):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    path, models = sd15
    assert json.loads((path / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    text = CLIPTextModel.from_pretrained(path / "text_encoder")
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 4, 16)
    saved = models["unet"].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in unet.state_dict().items())
    # the reloaded model may pick another attention kernel: equal weights, outputs within fp32 noise
    torch.testing.assert_close(unet(x, t, ctx).sample, models["unet"](x, t, ctx).sample, rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[0, 5, 6, 1]])
    torch.testing.assert_close(text(ids).last_hidden_state, models["text_encoder"](ids).last_hidden_state)


def test_sdxl_and_flux_forward(sdxl, flux):
    unet = sdxl[1]["unet"]
    cond = {"text_embeds": torch.randn(1, 8), "time_ids": torch.randn(1, 6)}
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 4, 16), added_cond_kwargs=cond)
    assert out.sample.shape == (1, 4, 8, 8)
    names = [n for n, _ in sdxl[1]["text_encoder_2"].named_parameters()]
    assert any(n.startswith("text_projection") for n in names)
    flux_model = flux[1]["transformer"]
    out = flux_model(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 4, 16),
                     pooled_projections=torch.randn(1, 8), timestep=torch.tensor([0.5]),
                     img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))
    assert out.sample.shape == (1, 16, 4)
