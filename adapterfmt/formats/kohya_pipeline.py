"""kohya files of diffusion pipelines (SD 1.x, SDXL): read into multi-component adapters, written back.

Reading maps every name with diffusers' own conversion (kohya_diffusion.py) and accounts for every
tensor: a name that lands on no module of the base is refused, never dropped. What makes the file
bit-exact on the way back is kept in ``manifest.source``: the kohya name of each module, the
header metadata (``ss_*``, ``sshs_*``, ``modelspec.*``), each alpha's dtype and shape when they
are not kohya's usual 0-d float32, or its absence, and the ``dora_scale`` shapes. Modules of every
kohya/LyCORIS family are read and written by kohya_modules.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..conversion_report import EXACT_MATH, LOSSLESS
from ..errors import AdapterFmtError, ForeignFormatError, UsageError
from ..format import Adapter, BaseWeight, Manifest, ModuleEntry, TensorRef
from ..format.components import join_components, split_components
from ..format.dtypes import dtype_name
from ..methods.registry import get_method
from .kohya_diffusion import (DIFFUSION_PREFIXES, FAMILIES, _component_checkpoint, diffusers_modules, kohya_prefix,
                              resolve_in_base)
from .kohya_modules import family, module_state, read_module

SOURCE_NAMES = "kohya_names"
#: source key: {kohya name: [safetensors dtype, shape]} for alphas that are not 0-d F32.
SOURCE_ALPHA = "kohya_alpha_layout"
#: source key: kohya names stored without alpha (scale 1).
SOURCE_NO_ALPHA = "kohya_no_alpha"
#: source key: {kohya name: what the file stores differently (the dora_scale shape)}.
SOURCE_LAYOUT = "kohya_layout"
#: Header keys kept in the manifest and written back (adapterfmt's own keys are not provenance).
KEPT_METADATA = ("ss_", "sshs_", "modelspec.", "format")


def read_pipeline_file(grouped: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str], base, path: Path,
                       report) -> Adapter:
    """A multi-component adapter from a kohya/LyCORIS file's ``{name: {leaf: tensor}}``.

    Every family of kohya_modules.py (LoRA/LoCon, DoRA, LoHa, LoKr, full) is read.

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
    source = {"format": "kohya", SOURCE_NAMES: {}, SOURCE_ALPHA: {}, SOURCE_NO_ALPHA: [], SOURCE_LAYOUT: {},
              "metadata": {k: v for k, v in metadata.items() if k.startswith(KEPT_METADATA)}}
    seen: dict[tuple[str, str], str] = {}
    for name, (component, inner) in placed.items():
        manifest, tensors = parts.setdefault(component, (Manifest(), {}))
        # Without a base both CLIP spellings (lora_te_text_model_… and lora_te_encoder_…) stay as written,
        # yet they are one module of every CLIP text encoder: compare them without 'text_model.'.
        same = seen.setdefault((component, inner.removeprefix("text_model.")), name)
        if same != name:
            raise ForeignFormatError(f"{name!r} and {same!r} are the same module {component}.{inner}", path=path,
                                     hint="the file is ambiguous")
        _add_module(manifest, tensors, name, dict(grouped[name]), _base_shape(base, component, inner), inner, path,
                    source)
        source[SOURCE_NAMES][f"{component}.{inner}"] = name
        report.add(f"{component}.{inner}", LOSSLESS)
    for key in (SOURCE_ALPHA, SOURCE_NO_ALPHA, SOURCE_LAYOUT):
        if not source[key]:
            source.pop(key)
    return join_components({c: Adapter(m, t) for c, (m, t) in sorted(parts.items())}, source)


#: leaves whose module is scaled by alpha / rank (a LoKr of two full halves and a full diff ignore alpha)
SCALED_LEAVES = ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b")


def _base_shape(base, component: str, inner: str) -> list[int] | None:
    checkpoint = _component_checkpoint(base, component)
    return None if checkpoint is None else list(checkpoint.shape(f"{inner}.weight"))


def _add_module(manifest, tensors, name, parts, base_shape, inner, path, source) -> None:
    """One module of any family, checked against its method's descriptor and the base's shape."""
    alpha = _alpha(name, parts.pop("alpha", None), path, source)
    if alpha == 0 and any(leaf.endswith(SCALED_LEAVES) for leaf in parts):
        raise ForeignFormatError(f"{name!r}: alpha is 0, which sd-scripts and LyCORIS read as alpha = rank (scale 1) "
                                 "and diffusers, ComfyUI and A1111 as scale 0", path=path,
                                 hint="the consumers disagree; set the module's alpha to the rank it was trained "
                                      "with, or remove the module")
    if alpha is None and "diff" not in parts:  # kohya, A1111, ComfyUI, LyCORIS: no alpha means scale 1
        source[SOURCE_NO_ALPHA].append(name)
    method, params, roles, shape, layer, layout = read_module(name, parts, alpha, base_shape, path)
    if base_shape is not None and list(shape) != list(base_shape):
        raise ForeignFormatError(f"{name!r}: the {family(parts)} tensors give a {list(shape)} weight, the base's is "
                                 f"{list(base_shape)}", path=path, hint="check --base (the model the file is for)")
    refs = {}
    for role, tensor in roles.items():
        tensors[f"{inner}.{role}"] = tensor.contiguous()
        refs[role] = TensorRef(f"{inner}.{role}", dtype_name(tensor.dtype), list(tensor.shape))
    entry = ModuleEntry(method=method, base_weight=f"{inner}.weight", shape=list(shape), params=params,
                        tensors=refs, layer=layer)
    try:
        get_method(method).check_entry(inner, entry)
    except AdapterFmtError as exc:
        raise ForeignFormatError(f"{name!r} ({family(parts)}, {layer}): {exc.message}", path=path,
                                 hint="this build does not hold the module in that form") from None
    manifest.modules[inner] = entry
    manifest.base.weights[entry.base_weight] = BaseWeight(shape=list(shape))
    if layout:
        source[SOURCE_LAYOUT][name] = layout


def _alpha(name: str, alpha: torch.Tensor | None, path: Path, source: dict) -> float | None:
    """The module's alpha as a number (None when absent); a non-0-d-F32 layout is recorded."""
    if alpha is None:
        return None
    if alpha.numel() != 1 or not math.isfinite(float(alpha.double().reshape(()))):
        raise ForeignFormatError(f"{name!r}: alpha {list(alpha.shape)} is not one finite number", path=path,
                                 hint="the file is damaged")
    if alpha.dtype != torch.float32 or alpha.dim() != 0:
        source[SOURCE_ALPHA][name] = [dtype_name(alpha.dtype), list(alpha.shape)]
    return float(alpha.double().reshape(()))


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
    module_layouts = source.get(SOURCE_LAYOUT) or {}
    two_encoders = "text_encoder_2" in adapter.manifest.components
    state, names = {}, {}
    for component, view in split_components(adapter).items():
        for inner, entry in view.manifest.modules.items():
            key = f"{component}.{inner}"
            name = known.get(key) or _generated_name(component, inner, two_encoders)
            if name in names:
                raise UsageError(f"modules {names[name]!r} and {key!r} get the same kohya name {name!r}")
            names[name] = key
            tensors = view.module_tensors(inner)
            part, alpha = module_state(name, key, entry, tensors, module_layouts.get(name) or {}, report)
            state.update(part)
            if alpha is not None:
                own = entry.method in ("lora", "dora")
                _write_alpha(state, name, alpha, entry, layouts.get(name), name in no_alpha, key,
                             report if own else None)
    if source.get("format") == "kohya":  # the header as read, nothing added: the file round-trips exactly
        return state, dict(source.get("metadata") or {})
    return state, {"format": "pt", "ss_network_module": "networks.lora"}


def _write_alpha(state, name, alpha, entry, layout, absent, key, report) -> None:
    """The alpha as read (dtype, shape, or absent) when that holds the value exactly, else F32/F64."""
    rank = int(entry.params["rank"])
    if absent and alpha == float(rank):
        if report is not None:
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
    if report is None:
        return
    scale = float(entry.params["scale"])
    back = float(stored.double().reshape(())) / rank
    if back == scale:
        report.add(key, LOSSLESS)
    else:  # scale·rank/rank need not round-trip in floating point
        report.add(key, EXACT_MATH, f"scale {scale!r} -> {back!r}")


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
