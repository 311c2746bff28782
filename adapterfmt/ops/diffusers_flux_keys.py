"""What diffusers' Flux loader does with a Flux LoRA file's keys (kohya-Flux, BFL, ai-toolkit, ComfyUI,
diffusers), found by running diffusers itself on a probe.

``FluxLoraLoaderMixin.lora_state_dict`` (the conversion ``load_lora_weights`` runs) gets one tensor per
key whose value is the key's index: a down factor 1x1, an up factor with the file's own row count
(diffusers' kohya loader splits fused rows, at fixed FLUX.1 sizes for ``linear1``) and rank 1, an
``.alpha`` of 1 (so the alpha/rank scale diffusers folds in is 1 and the values survive). Where each
value lands says which key diffusers applied to which module:

- under ``transformer.`` / ``text_encoder.``: loaded (``load_lora_weights`` keeps only those prefixes);
- under any other name (the top-level Flux layers diffusers' kohya conversion names without
  ``transformer.``, or a ``diffusion_model.``/bare-BFL ``lora_A``/``lora_B`` file it leaves as is):
  silently not loaded;
- nowhere: dropped while converting.
"""
from __future__ import annotations

import logging

import torch

from .diffusers_keys import COMPONENTS, DiffusersOutcome, _Collect, _check_in_base, _peft_keys
from .diffusion_keys import DiffusionKeys, split_key

#: The rows diffusers' kohya-Flux loader splits a single block's linear1 into (FLUX.1: 3·3072 + 12288).
LINEAR1_ROWS = (3072, 3072, 3072, 12288)
DOWN = (".lora_down.weight", ".lora_A.weight")
UP = (".lora_up.weight", ".lora_B.weight")
FLUX_COMPONENTS = ("transformer", "text_encoder")


def _probe(facts: DiffusionKeys) -> dict[str, torch.Tensor]:
    probe = {}
    for index, key in enumerate(facts.keys):
        _, suffix = split_key(key)
        if suffix == ".alpha":
            probe[key] = torch.tensor(1.0)
        elif suffix in UP:
            probe[key] = torch.full((facts.shapes[key][0], 1), float(index))
        else:
            probe[key] = torch.full((1, 1), float(index))
    return probe


def linear1_rows(facts: DiffusionKeys) -> dict[str, int]:
    """{module: up rows} of kohya/ComfyUI ``linear1`` LoRAs whose rows are not FLUX.1's (diffusers asserts)."""
    out = {}
    for module, keys in facts.modules.items():
        up = keys.get(".lora_up.weight")
        if up and module.replace(".", "_").endswith("_linear1") and facts.shapes[up][0] != sum(LINEAR1_ROWS):
            out[module] = facts.shapes[up][0]
    return out


def run_diffusers_flux(facts: DiffusionKeys) -> DiffusersOutcome:
    """diffusers' verdict on every module of a Flux LoRA file.

    Example:
        >>> run_diffusers_flux(read_diffusion_keys("kohya_flux.safetensors")).outside  # doctest: +SKIP
        {'lora_unet_img_in': 'x_embedder'}
    """
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    outcome = DiffusersOutcome()
    logger, collect = logging.getLogger("diffusers"), _Collect()
    handlers, logger.handlers = logger.handlers, [collect]
    try:
        state, _ = FluxLoraLoaderMixin.lora_state_dict(_probe(facts), return_alphas=True)
    except AssertionError:
        outcome.refused = "AssertionError (an empty assert in _convert_kohya_flux_lora_to_diffusers)"
        outcome.fixed_rows = linear1_rows(facts)
        return outcome
    except (ValueError, KeyError, IndexError, AttributeError, RuntimeError, UnboundLocalError) as exc:
        outcome.refused = f"{type(exc).__name__}: " + " ".join(str(exc).split())[:300]
        return outcome
    finally:
        logger.handlers = handlers
    outcome.warnings = collect.messages
    _place(facts, state, outcome)
    _check_in_base(facts, outcome)
    return outcome


def _place(facts: DiffusionKeys, state: dict, outcome: DiffusersOutcome) -> None:
    """Sort every file module into applied / outside (converted to a name load_lora_weights skips) / dropped."""
    landed: dict[int, list[str]] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.numel():
            landed.setdefault(int(value.reshape(-1)[0]), []).append(key)
    for component in FLUX_COMPONENTS:
        peft = state if component == "transformer" else _te_only(state)
        for key, value in _peft_keys(peft, component).items():
            if key.endswith(".lora_A.weight"):
                module = split_key(facts.keys[int(value.reshape(-1)[0])])[0]
                path = key[: -len(".lora_A.weight")]
                outcome.layers.setdefault(module, []).append(f"{component}.{path}")
                outcome.applied.setdefault(module, (component, path))
    for module, keys in facts.modules.items():
        if module in outcome.applied:
            continue
        weights = [k for s, k in keys.items() if s in DOWN + UP]
        names = [name for k in weights for name in landed.get(facts.keys.index(k), [])]
        if names:
            outcome.outside[module] = names[0].rsplit(".lora_", 1)[0]
        lost = [s for s, k in keys.items() if s in DOWN + UP and facts.keys.index(k) not in landed]
        if lost:
            outcome.dropped[module] = lost


def _te_only(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(COMPONENTS[1] + ".")}
