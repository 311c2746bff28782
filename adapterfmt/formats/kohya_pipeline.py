"""kohya files of diffusion pipelines (SD 1.x, SDXL): read into multi-component adapters, written back.

Reading maps every name with diffusers' own conversion (kohya_diffusion.py) and accounts for every
tensor: a name that lands on no module of the base is refused, never dropped. What makes the file
bit-exact on the way back is kept in ``manifest.source``: the kohya name of each module, the
header metadata (``ss_*``, ``sshs_*``, ``modelspec.*``), and each alpha's dtype and shape when they
are not kohya's usual 0-d float32, or its absence.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..conversion_report import EXACT_MATH, LOSSLESS
from ..errors import ForeignFormatError, UsageError
from ..format import Adapter, Manifest
from ..format.components import join_components, split_components
from ..format.dtypes import dtype_name
from ..methods.lora import lora_params
from ._lowrank import add_lowrank_module
from .kohya_diffusion import DIFFUSION_PREFIXES, FAMILIES, diffusers_modules, kohya_prefix, resolve_in_base

SOURCE_NAMES = "kohya_names"
#: source key: {kohya name: [safetensors dtype, shape]} for alphas that are not 0-d F32.
SOURCE_ALPHA = "kohya_alpha_layout"
#: source key: kohya names stored without alpha (scale 1).
SOURCE_NO_ALPHA = "kohya_no_alpha"
#: Header keys kept in the manifest and written back (adapterfmt's own keys are not provenance).
KEPT_METADATA = ("ss_", "sshs_", "modelspec.", "format")


def read_pipeline_file(grouped: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str], base, path: Path,
                       report) -> Adapter:
    """A multi-component adapter from a kohya file's ``{name: {role: tensor}}``.

    Example:
        >>> adapter = read_pipeline_file(grouped, metadata, DiffusersPipeline("sdxl"), path, report)  # doctest: +SKIP
    """
    names = sorted(grouped)
    mapped = diffusers_modules(names, base, path)
    placed, unmatched = {}, []
    for name in names:
        component, module = mapped.get(name, (DIFFUSION_PREFIXES[kohya_prefix(name)], None))
        inner = resolve_in_base(component, module, base) if module is not None else None
        (unmatched.append(name) if inner is None else placed.__setitem__(name, (component, inner)))
    if unmatched:
        raise ForeignFormatError(f"{len(unmatched)} kohya name(s) match no module of the base (first: "
                                 f"{', '.join(unmatched[:3])})", path=path,
                                 hint=f"families tried: {'; '.join(FAMILIES)}; check --base")
    parts: dict[str, tuple[Manifest, dict]] = {}
    source = {"format": "kohya", SOURCE_NAMES: {}, SOURCE_ALPHA: {}, SOURCE_NO_ALPHA: [],
              "metadata": {k: v for k, v in metadata.items() if k.startswith(KEPT_METADATA)}}
    for name, (component, inner) in placed.items():
        a, b, alpha = _pair(name, grouped[name], path, source, report)
        manifest, tensors = parts.setdefault(component, (Manifest(), {}))
        if inner in manifest.modules:
            raise ForeignFormatError(f"{name!r} and {source[SOURCE_NAMES][component + '.' + inner]!r} are the same "
                                     f"module {component}.{inner}", path=path, hint="the file is ambiguous")
        add_lowrank_module(manifest, tensors, inner, a, b, lora_params(a.shape[0], alpha, False))
        source[SOURCE_NAMES][f"{component}.{inner}"] = name
        report.add(f"{component}.{inner}", LOSSLESS)
    for key in (SOURCE_ALPHA, SOURCE_NO_ALPHA):
        if not source[key]:
            source.pop(key)
    return join_components({c: Adapter(m, t) for c, (m, t) in sorted(parts.items())}, source)


def _pair(name: str, parts: dict[str, torch.Tensor], path: Path, source: dict, report) -> tuple:
    """(lora_down, lora_up, alpha) of one module, refusing what is not a Linear low-rank pair."""
    if "lora_A" not in parts or "lora_B" not in parts:
        raise ForeignFormatError(f"{name!r} lacks lora_down or lora_up", path=path, hint="the file is incomplete")
    a, b = parts["lora_A"], parts["lora_B"]
    if a.dim() == 4 or b.dim() == 4:
        raise ForeignFormatError(f"{name!r}: conv LoRA (lora_down {list(a.shape)}) is not supported by this build",
                                 path=path, hint="only Linear targets are supported; conv LoRA/LoCon comes with the "
                                                 "conv-layer methods")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ForeignFormatError(f"{name!r}: lora_down {list(a.shape)} / lora_up {list(b.shape)} are not a low-rank "
                                 "pair", path=path, hint="the file is damaged")
    if "alpha" not in parts:  # kohya, A1111, ComfyUI: no alpha means scale 1
        source[SOURCE_NO_ALPHA].append(name)
        report.notes.append(f"{name}: no alpha, scale 1 (alpha = rank)")
        return a, b, float(a.shape[0])
    alpha = parts["alpha"]
    if alpha.numel() != 1 or not math.isfinite(float(alpha.double().reshape(()))):
        raise ForeignFormatError(f"{name!r}: alpha {list(alpha.shape)} is not one finite number", path=path,
                                 hint="the file is damaged")
    if alpha.dtype != torch.float32 or alpha.dim() != 0:
        source[SOURCE_ALPHA][name] = [dtype_name(alpha.dtype), list(alpha.shape)]
    return a, b, float(alpha.double().reshape(()))


def pipeline_kohya_state(adapter: Adapter, report) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a multi-component adapter in kohya layout.

    Modules read from kohya keep their names, alpha layout and header; others get sd-scripts'
    names on diffusers' blocks (``lora_unet_…``, ``lora_te_text_model_…``; ``lora_te1_``/``lora_te2_``
    when there is a second text encoder), which diffusers, ComfyUI and A1111 map.

    Example:
        >>> state, metadata = pipeline_kohya_state(adapter, report)  # doctest: +SKIP
    """
    source = adapter.manifest.source
    known = source.get(SOURCE_NAMES) or {}
    layouts, no_alpha = source.get(SOURCE_ALPHA) or {}, set(source.get(SOURCE_NO_ALPHA) or [])
    two_encoders = "text_encoder_2" in adapter.manifest.components
    state, names = {}, {}
    for component, view in split_components(adapter).items():
        for inner, entry in view.manifest.modules.items():
            key = f"{component}.{inner}"
            name = known.get(key) or _generated_name(component, inner, two_encoders)
            if entry.method != "lora" or entry.layer != "linear":
                raise UsageError(f"module {key!r} is {entry.layer} {entry.method}; this build writes Linear LoRA to "
                                 "kohya", hint="merge it, or convert the method to LoRA first")
            if name in names:
                raise UsageError(f"modules {names[name]!r} and {key!r} get the same kohya name {name!r}")
            names[name] = key
            tensors = view.module_tensors(inner)
            state[f"{name}.lora_down.weight"] = tensors["lora_A"].contiguous()
            state[f"{name}.lora_up.weight"] = tensors["lora_B"].contiguous()
            _write_alpha(state, name, entry, tensors, layouts.get(name), name in no_alpha, key, report)
    if source.get("format") == "kohya":  # the header as read, nothing added: the file round-trips exactly
        return state, dict(source.get("metadata") or {})
    return state, {"format": "pt", "ss_network_module": "networks.lora"}


def _write_alpha(state, name, entry, tensors, layout, absent, key, report) -> None:
    rank, scale = int(entry.params["rank"]), float(entry.params["scale"])
    alpha = scale * rank
    if absent and scale == 1.0:
        report.add(key, LOSSLESS, "no alpha (scale 1), as read")
        return
    stored = torch.tensor(alpha, dtype=torch.float32)
    if layout is not None:
        from ..format.dtypes import torch_dtype
        candidate = torch.tensor(alpha, dtype=torch.float64).to(torch_dtype(layout[0])).reshape(layout[1])
        if float(candidate.double().reshape(())) == alpha:
            stored = candidate
    if float(stored.double().reshape(())) != alpha:
        stored = torch.tensor(alpha, dtype=torch.float64)
    state[f"{name}.alpha"] = stored
    back = float(stored.double().reshape(())) / rank
    if back == scale:
        report.add(key, LOSSLESS)
    else:
        a, b = tensors["lora_A"].double(), tensors["lora_B"].double()
        report.add(key, EXACT_MATH, f"scale {scale!r} -> {back!r}", reference=(b @ a) * scale, result=(b @ a) * back)


#: component -> (kohya prefix with one text encoder, with two)
PREFIXES = {"unet": ("lora_unet", "lora_unet"), "text_encoder": ("lora_te", "lora_te1"),
            "text_encoder_2": ("lora_te2", "lora_te2")}


def _generated_name(component: str, inner: str, two_encoders: bool) -> str:
    if component not in PREFIXES:
        raise UsageError(f"component {component!r} has no kohya prefix this build writes",
                         hint="kohya SD 1.x/SDXL files hold unet, text_encoder and text_encoder_2")
    prefix = PREFIXES[component][two_encoders]
    # sd-scripts names CLIP modules with transformers' 'text_model.' path, which every consumer maps.
    if component.startswith("text_encoder") and not inner.startswith("text_model."):
        inner = f"text_model.{inner}"
    return f"{prefix}_{inner.replace('.', '_')}"
