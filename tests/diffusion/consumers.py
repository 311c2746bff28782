"""The real consumers: diffusers' load_lora_weights / fuse_lora on tiny pipelines built from models.py."""
from __future__ import annotations

import copy

import torch


def tiny_pipeline(kind: str, models: dict):
    """A pipeline object with diffusers' real LoRA loader mixin for ``kind`` and fresh copies of ``models``
    (only the components LoRA loading touches: no VAE, tokenizer or scheduler needed)."""
    from diffusers import DiffusionPipeline
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    # diffusers checks the __init__ signature against the registered components: spell them out.
    class TinySD(StableDiffusionLoraLoaderMixin, DiffusionPipeline):
        def __init__(self, unet, text_encoder):
            super().__init__()
            self.register_modules(unet=unet, text_encoder=text_encoder)

    class TinySDXL(StableDiffusionXLLoraLoaderMixin, DiffusionPipeline):
        def __init__(self, unet, text_encoder, text_encoder_2):
            super().__init__()
            self.register_modules(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)

    TinyPipeline = {"sd15": TinySD, "sdxl": TinySDXL}[kind]
    return TinyPipeline(**{name: copy.deepcopy(model) for name, model in models.items()})


def outputs(kind: str, pipe) -> dict[str, torch.Tensor]:
    """Every component's output on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 16, generator=gen)
    extra = {}
    if kind == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 8, generator=gen),
                                      "time_ids": torch.randn(1, 6, generator=gen)}
    ids = torch.tensor([[0, 5, 6, 7, 1]])
    with torch.no_grad():
        out = {"unet": pipe.unet(x, torch.tensor([3]), ctx, **extra).sample,
               "text_encoder": pipe.text_encoder(ids).last_hidden_state}
        if kind == "sdxl":
            out["text_encoder_2"] = pipe.text_encoder_2(ids).last_hidden_state
    return out


def lora_layer_count(pipe) -> dict[str, int]:
    """How many layers got a LoRA, per component (PEFT tuner layers)."""
    from peft.tuners.lora import LoraLayer
    return {name: sum(isinstance(m, LoraLayer) for m in getattr(pipe, name).modules())
            for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}


def tiny_flux_pipeline(transformer):
    """A pipeline object with diffusers' real FluxLoraLoaderMixin around a copy of ``transformer``."""
    from diffusers import DiffusionPipeline
    from diffusers.loaders import FluxLoraLoaderMixin

    class TinyFlux(FluxLoraLoaderMixin, DiffusionPipeline):
        def __init__(self, transformer, text_encoder):
            super().__init__()
            self.register_modules(transformer=transformer, text_encoder=text_encoder)

    return TinyFlux(copy.deepcopy(transformer), None)


def flux_output(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe.transformer(hidden_states=torch.randn(1, 16, 4, generator=gen),
                                encoder_hidden_states=torch.randn(1, 4, 16, generator=gen),
                                pooled_projections=torch.randn(1, 8, generator=gen), timestep=torch.tensor([0.5]),
                                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3)).sample
