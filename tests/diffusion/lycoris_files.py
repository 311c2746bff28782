"""LyCORIS files for the tiny pipelines of models.py, made by lycoris-lora's own ``create_lycoris``.

Each component gets its own network with the kohya prefix (``lora_unet``, ``lora_te``, ``lora_te1``/
``lora_te2``) through a LyCORIS preset, exactly as sd-scripts' LyCORIS networks name modules; the trained
state is imitated by adding noise to every parameter (LoRA ``lora_up`` and LoHa/LoKr halves start at zero).
SDXL UNet names are then put on the original SGM block layout, as sd-scripts' SDXL UNet names them.
"""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

#: family -> (create_lycoris algo, extra kwargs, UNet module classes targeted)
CONV_BLOCKS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
FAMILIES = {
    "locon": ("lora", {}, CONV_BLOCKS),
    "loha": ("loha", {}, ["BasicTransformerBlock"]),
    "lokr": ("lokr", {"factor": 4}, ["BasicTransformerBlock"]),
    "full": ("full", {}, CONV_BLOCKS),
    "dora_out": ("lora", {"dora_wd": True, "wd_on_output": True}, ["Transformer2DModel", "ResnetBlock2D"]),
    "dora_in": ("lora", {"dora_wd": True, "wd_on_output": False}, ["Transformer2DModel", "ResnetBlock2D"]),
}
#: conv and Tucker forms (LoHa/LoKr on 1x1 and 3x3 convs, LoCon/LoHa with Tucker cores)
CONV_FAMILIES = {
    "loha_conv": ("loha", {}, CONV_BLOCKS),
    "lokr_conv": ("lokr", {"factor": 4}, CONV_BLOCKS),
    "locon_tucker": ("lora", {"use_tucker": True}, CONV_BLOCKS),
    "loha_tucker": ("loha", {"use_tucker": True}, CONV_BLOCKS),
}
TE_BLOCKS = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
PREFIXES = {"sd15": {"unet": "lora_unet", "text_encoder": "lora_te"},
            "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}
#: LycorisNetwork class attributes a preset sets
PRESET_STATE = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "MODULE_ALGO_MAP",
                "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
          "conv_shortcut": "skip_connection"}


def _preset(path: Path, prefix: str, modules: list[str]) -> str:
    import toml
    toml.dump({"enable_conv": True, "target_module": modules, "target_name": [], "lora_prefix": prefix},
              path.open("w"))
    return str(path)


def network_state(model, prefix: str, family: str, work: Path, seed: int) -> tuple[dict, dict[str, str]]:
    """(LyCORIS state dict, {kohya name: module path}) of one component."""
    from lycoris import create_lycoris
    algo, extra, unet_blocks = {**FAMILIES, **CONV_FAMILIES}[family]
    blocks = unet_blocks if prefix == "lora_unet" else TE_BLOCKS
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    from lycoris.wrapper import LycorisNetwork
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    # presets set class attributes of LycorisNetwork (the prefix too): restore them for other users
    saved = {k: getattr(LycorisNetwork, k) for k in PRESET_STATE}
    try:
        net = create_lycoris(model, 1.0, 4, 2.0, algo=algo, conv_dim=2, conv_alpha=1.0,
                             preset=_preset(work / f"{prefix}.toml", prefix, blocks), **extra)
    finally:
        for key, value in saved.items():
            setattr(LycorisNetwork, key, value)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    paths = {id(m): n for n, m in model.named_modules()}
    names = {lora.lora_name: paths[id(lora.org_module[0])] for lora in net.loras}
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, names


def sgm_unet_path(path: str, layers_per_block: int, attention_blocks: set[int]) -> str:
    """A diffusers UNet module path on SDXL's original SGM block layout (sd-scripts' SDXL names)."""
    per = layers_per_block + 1
    def resnet(rest):
        head, _, tail = rest.partition(".")
        return RESNET.get(head, head) + (f".{tail}" if tail else "")
    rules = ((r"^down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$",
              lambda b, l, r: f"input_blocks.{1 + b * per + l}.0.{resnet(r)}"),
             (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$",
              lambda b, l, r: f"input_blocks.{1 + b * per + l}.1.{r}"),
             (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$", lambda b: f"input_blocks.{(b + 1) * per}.0.op"),
             (r"^mid_block\.resnets\.(\d+)\.(.+)$", lambda i, r: f"middle_block.{2 * i}.{resnet(r)}"),
             (r"^mid_block\.attentions\.0\.(.+)$", lambda r: f"middle_block.1.{r}"),
             (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$",
              lambda b, l, r: f"output_blocks.{b * per + l}.0.{resnet(r)}"),
             (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", lambda b, l, r: f"output_blocks.{b * per + l}.1.{r}"),
             (r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$",
              lambda b: f"output_blocks.{b * per + per - 1}.{2 if b in attention_blocks else 1}.conv"))
    for pattern, make in rules:
        match = re.match(pattern, path)
        if match:
            groups = [int(g) if g.isdigit() else g for g in match.groups()]
            return make(*groups)
    raise AssertionError(f"no SGM name for {path}")


def lycoris_file(kind: str, family: str, models: dict, out: Path, *, seed: int = 0,
                 dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Write a LyCORIS pipeline file; returns {kohya name: "component.module path"}."""
    state, names = {}, {}
    for component, prefix in PREFIXES[kind].items():
        part, found = network_state(models[component], prefix, family, out.parent, seed)
        rename = {}
        if kind == "sdxl" and component == "unet":
            unet = models["unet"]
            attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
            for name, path in found.items():
                sgm = sgm_unet_path(path, unet.config.layers_per_block, attention)
                rename[name] = "lora_unet_" + sgm.replace(".", "_")
        for key, value in part.items():
            name, leaf = key.split(".", 1)
            state[f"{rename.get(name, name)}.{leaf}"] = value.to(dtype)
        names.update({rename.get(n, n): f"{component}.{p}" for n, p in found.items()})
    algo = {**FAMILIES, **CONV_FAMILIES}[family][0]
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{algo}"}}',
                "sshs_model_hash": "1" * 64, "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": f"{kind}/lycoris-{family}"}
    save_file(state, str(out), metadata=metadata)
    return names
