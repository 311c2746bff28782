"""Flux LoRA files (kohya sd-scripts, BFL / ComfyUI / ai-toolkit) <-> multi-component adapters on diffusers' modules.

Reading splits each fused module exactly: every part gets the fused A (a copy) and its own rows of
B, with the fused alpha, so each part's ΔW is bit-for-bit the fused ΔW's rows. Every tensor is
accounted for: a name no family places, or a pair that is not a Linear LoRA, is refused by name.

Writing fuses the parts back. When all parts are present with bit-identical A, one dtype and one
scale (always so for files read from these families), the fused module is the shared A and the
concatenated B: the file comes back bit-for-bit. Otherwise (diffusers files train separate
to_q/to_k/to_v) the fused module has rank Σrᵢ: A stacked, B block-diagonal, a missing part zero
rows; that is exact when the parts' scales differ by powers of two (folded into B), and refused
by name otherwise. diffusers' own kohya-Flux loader reads such block-diagonal files back exactly.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..conversion_report import EXACT_MATH, LOSSLESS
from ..errors import BaseMismatchError, ForeignFormatError, UsageError
from ..format import Adapter, Manifest
from ..format.components import join_components, split_components
from ..format.dtypes import dtype_name, torch_dtype
from ..methods.lora import lora_params
from ._lowrank import add_lowrank_module
from .flux_keys import FLUX_FAMILIES, STYLES, Target, generated_name, split_key, targets
from .flux_names import REFERENCE_ROWS, scaled_rows
from .kohya_diffusion import resolve_in_base

SOURCE_NAMES = "flux_names"  #: file names in file order
SOURCE_ROLES = "flux_roles"  #: [down suffix, up suffix] as read
SOURCE_ALPHA = "flux_alpha_layout"  #: {name: [dtype, shape]} for alphas that are not 0-d F32
SOURCE_NO_ALPHA = "flux_no_alpha"  #: names stored without alpha (scale 1)

def kept_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """A foreign file's whole header is provenance (written back as read), except adapterfmt's own keys."""
    return {k: v for k, v in metadata.items() if not k.startswith("adapterfmt.")}


def group_keys(state: dict[str, torch.Tensor], path: Path, families=FLUX_FAMILIES):
    """({name: {role: tensor}}, {role: suffix}); keys without a LoRA role suffix are refused by name."""
    grouped, suffixes, unmatched = {}, {}, []
    for key, tensor in state.items():
        split = split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        name, role, suffix = split
        grouped.setdefault(name, {})[role] = tensor
        if role != "alpha":
            suffixes.setdefault(role, set()).add(suffix)
    if unmatched:
        refuse_unmatched(unmatched, len(state), path, families,
                         "has no LoRA role (lora_A/lora_B/lora_down/lora_up/alpha)")
    if any(len(s) > 1 for s in suffixes.values()):
        raise ForeignFormatError("the file mixes lora_A/lora_B and lora_down/lora_up keys", path=path,
                                 hint="no known tool writes such files; nothing was read")
    return grouped, {role: next(iter(s)) for role, s in suffixes.items()}


#: T5-XXL text-encoder names of Flux files: sd-scripts ``lora_te3_``, OneTrainer ``lora_te2_``, ComfyUI ``text_encoders.t5xxl.``.
T5_PREFIXES = ("lora_te3_", "lora_te2_", "text_encoders.t5xxl.transformer.")


def refuse_unmatched(unmatched: list[str], total: int, path: Path, families, why: str):
    more = f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else ""
    raise ForeignFormatError(f"{len(unmatched)} of {total} keys {why}: {', '.join(unmatched[:3])}{more}", path=path,
                             hint=f"families tried: {'; '.join(families)}; nothing was read")


def read_flux_state(state: dict[str, torch.Tensor], metadata: dict[str, str], base, path: Path, report,
                    family: str) -> Adapter:
    """A multi-component adapter (transformer, text_encoder) from a Flux LoRA file's tensors.

    Example:
        >>> adapter = read_flux_state(state, {}, None, Path("x.safetensors"), report, "kohya")  # doctest: +SKIP
    """
    grouped, suffixes = group_keys(state, path)
    placed = targets(list(grouped))
    unplaced = [name for name in grouped if name not in placed]
    t5 = [name for name in unplaced if name.startswith(T5_PREFIXES)]
    if t5:
        raise ForeignFormatError(
            f"{len(t5)} of {len(grouped)} modules are T5-XXL text-encoder LoRAs ({', '.join(t5[:2])}"
            f"{' and more' if len(t5) > 2 else ''}): diffusers' Flux pipeline has no T5 LoRA loader (it filters "
            "them out), so there is no diffusers module to read them onto", path=path,
            hint=f"families tried: {'; '.join(FLUX_FAMILIES)}; adapterfmt does not read Flux T5 LoRAs yet "
                 "(ComfyUI applies them); nothing was read")
    if unplaced:
        refuse_unmatched(unplaced, len(grouped), path, FLUX_FAMILIES, "name no Flux module diffusers knows")
    source = {"format": family, SOURCE_NAMES: list(grouped),
              SOURCE_ROLES: [suffixes.get("lora_A"), suffixes.get("lora_B")],
              SOURCE_ALPHA: {}, SOURCE_NO_ALPHA: [],
              "metadata": kept_metadata(metadata)}
    parts: dict[str, tuple[Manifest, dict]] = {}
    for name, roles in grouped.items():
        a, b, alpha = _pair(name, roles, path, source, report)
        for module, rows in _placed_rows(name, placed[name], b.shape[0], a.shape[1], base, path):
            manifest, tensors = parts.setdefault(placed[name].component, (Manifest(), {}))
            if module in manifest.modules:
                raise ForeignFormatError(f"two names of the file target {placed[name].component}.{module}",
                                         path=path, hint="the file is ambiguous; nothing was read")
            part_b = b if rows is None else b.index_select(0, rows)
            add_lowrank_module(manifest, tensors, module, a.clone() if rows is not None else a, part_b,
                               lora_params(a.shape[0], alpha, False))
            note = "" if rows is None else f"rows {int(rows[0])}..{int(rows[-1])} of fused {name}"
            report.add(f"{placed[name].component}.{module}", LOSSLESS, note)
    for key in (SOURCE_ALPHA, SOURCE_NO_ALPHA):
        if not source[key]:
            source.pop(key)
    return join_components({c: Adapter(m, t) for c, (m, t) in sorted(parts.items())}, source)


def _placed_rows(name: str, target: Target, rows: int, in_features: int, base, path: Path):
    """[(module in the base, row indices or None for all rows)] for one file name."""
    if target.component == "text_encoder":
        module = resolve_in_base("text_encoder", target.parts[0].module, base)
        if module is None:
            raise BaseMismatchError(f"{name!r}: the base's text_encoder has no {target.parts[0].module}", path=path,
                                    hint="check --base")
        return [(module, None)]
    indices = scaled_rows(target.parts, rows)
    if indices is None:
        raise ForeignFormatError(f"{name!r}: lora_up has {rows} rows, which do not split into "
                                 f"{', '.join(p.module for p in target.parts)} as diffusers splits FLUX.1's "
                                 f"{REFERENCE_ROWS}", path=path, hint="the file is not for a Flux-shaped model")
    out = []
    for part, index in zip(target.parts, indices):
        module = resolve_in_base("transformer", part.module, base)
        shape = _base_shape(base, part.module)
        if module is None or (shape is not None and shape != [len(index), in_features]):
            has = f"has {shape}" if module is not None else f"has no {part.module}"
            raise BaseMismatchError(f"{name!r}: part {part.module} is {[len(index), in_features]} here, the base "
                                    f"{has}", path=path,
                                    hint="check --base (the Flux model the LoRA was made for)")
        whole = len(target.parts) == 1 and torch.equal(index, torch.arange(rows))
        out.append((module, None if whole else index))
    return out


def _base_shape(base, module: str):
    if base is None:
        return None
    checkpoint = base.components.get("transformer") if hasattr(base, "components") else base
    if checkpoint is None or f"{module}.weight" not in checkpoint:
        return None
    return list(checkpoint.shape(f"{module}.weight"))


def _pair(name: str, roles: dict[str, torch.Tensor], path: Path, source: dict, report):
    if "lora_A" not in roles or "lora_B" not in roles:
        raise ForeignFormatError(f"{name!r} lacks its down (A) or up (B) matrix", path=path,
                                 hint="the file is incomplete")
    a, b = roles["lora_A"], roles["lora_B"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.numel() == 0 or b.numel() == 0:
        raise ForeignFormatError(f"{name!r}: down {list(a.shape)} / up {list(b.shape)} are not a Linear low-rank pair",
                                 path=path, hint="only Linear LoRA is supported for Flux")
    if "alpha" not in roles:  # kohya, ComfyUI, BFL: no alpha means scale 1
        source[SOURCE_NO_ALPHA].append(name)
        report.notes.append(f"{name}: no alpha, scale 1 (alpha = rank)")
        return a, b, float(a.shape[0])
    alpha = roles["alpha"]
    value = float(alpha.double().reshape(-1)[0]) if alpha.numel() == 1 else math.nan
    if not math.isfinite(value):
        raise ForeignFormatError(f"{name!r}: alpha {list(alpha.shape)} is not one finite number", path=path,
                                 hint="the file is damaged")
    if value == 0:
        raise ForeignFormatError(f"{name!r}: alpha is 0, which sd-scripts reads as alpha = rank (scale 1) and "
                                 "diffusers and ComfyUI as scale 0", path=path,
                                 hint="the consumers disagree; set the module's alpha to the rank it was trained "
                                      "with, or remove the module")
    if alpha.dtype != torch.float32 or alpha.dim() != 0:
        source[SOURCE_ALPHA][name] = [dtype_name(alpha.dtype), list(alpha.shape)]
    return a, b, value


# ------------------------------------------------------------------------------------------ writing
def refuse_single_model(adapter: Adapter, what: str, hint: str) -> None:
    """Refuse an adapter of no pipeline component, naming its first module's layer and method."""
    target, entry = next(iter(adapter.manifest.modules.items()))
    raise UsageError(f"module {target!r} ({entry.layer} {entry.method}) belongs to no pipeline component; {what}",
                     hint=hint)


def flux_state(adapter: Adapter, report, family: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header) of a multi-component Flux adapter in ``family``'s layout (``kohya`` or ``bfl``).

    Example:
        >>> state, metadata = flux_state(adapter, report, "kohya")  # doctest: +SKIP
    """
    source = adapter.manifest.source
    same = source.get("format") == family
    modules = {}
    for component, view in split_components(adapter).items():
        for inner, entry in view.manifest.modules.items():
            if entry.method != "lora" or entry.layer != "linear":
                raise UsageError(f"module {component}.{inner} is {entry.layer} {entry.method}; Flux LoRA files hold "
                                 "Linear LoRA", hint="merge it, or convert the method to LoRA first (--method lora)")
            modules[(component, inner)] = (entry, view.module_tensors(inner))
    groups = _groups(modules, source if same else {}, family)
    roles = source.get(SOURCE_ROLES) if same else None
    down, up = roles if roles and all(roles) else (STYLES[family].down, STYLES[family].up)
    layouts = (source.get(SOURCE_ALPHA) or {}) if same else {}
    no_alpha = set(source.get(SOURCE_NO_ALPHA) or []) if same else set()
    state = {}
    for name, (target, present) in groups.items():
        missing = [p.module for p in target.parts if p.module not in present]
        if missing:
            report.notes.append(f"{name}: {', '.join(missing)} have no LoRA; "
                                "their rows of the fused up matrix are zero")
        a, b, scale, alpha = _fuse(name, target, present, modules)
        state[f"{name}.{down}"], state[f"{name}.{up}"] = a.contiguous(), b.contiguous()
        _alpha(state, name, scale, alpha, a.shape[0], layouts.get(name), name in no_alpha,
               [f"{target.component}.{m}" for m in present], report)
    if same:
        return state, dict(source.get("metadata") or {})
    header = {"format": "pt"} | ({"ss_network_module": "networks.lora_flux"} if family == "kohya" else {})
    return state, header


def _groups(modules: dict, source: dict, family: str) -> dict[str, tuple[Target, list[str]]]:
    """{file name: (target, present modules)}: names as read first, generated names for the rest."""
    groups, claimed = {}, set()
    names = source.get(SOURCE_NAMES) or []
    for name, target in targets(names).items():
        present = [p.module for p in target.parts if (target.component, p.module) in modules]
        groups[name] = (target, present)
        claimed.update((target.component, m) for m in present)
    for (component, module) in modules:
        if (component, module) in claimed:
            continue
        made = generated_name(component, module, STYLES[family])
        if made is None:
            raise UsageError(f"module {component}.{module} has no {family} Flux name that diffusers or ComfyUI map; "
                             "they would silently apply nothing", hint="Flux LoRA files hold the transformer's blocks "
                                                                       "and the CLIP text encoder; use --to diffusers")
        name, parts = made
        target = Target(component, parts)
        present = groups.get(name, (target, []))[1] + [module]
        groups[name] = (target, present)
    return groups


def _fuse(name: str, target: Target, present: list[str], modules: dict):
    """(A, B, scale, alpha) of one file name from its present parts (taken in diffusers' row order)."""
    component = target.component
    present = [p.module for p in target.parts if p.module in present]
    entries = [modules[(component, m)] for m in present]
    if component == "text_encoder":
        entry, tensors = entries[0]
        return tensors["lora_A"], tensors["lora_B"], float(entry.params["scale"]), _alpha_of(entry)
    rows = _fused_rows(name, target, present, modules)
    index = dict(zip((p.module for p in target.parts), scaled_rows(target.parts, rows)))
    a_list = [t["lora_A"] for _, t in entries]
    b_list = [t["lora_B"] for _, t in entries]
    scales = [float(e.params["scale"]) for e, _ in entries]
    shared = (len(present) == len(target.parts) and len(set(scales)) == 1
              and all(a.dtype == a_list[0].dtype and torch.equal(a, a_list[0]) for a in a_list)
              and len({b.dtype for b in b_list}) == 1)
    if shared:
        b = torch.zeros(rows, a_list[0].shape[0], dtype=b_list[0].dtype)
        for module, part_b in zip(present, b_list):
            b[index[module]] = part_b
        return a_list[0], b, scales[0], _alpha_of(entries[0][0])
    return _block_diagonal(name, present, index, a_list, b_list, scales, rows)


def _block_diagonal(name, present, index, a_list, b_list, scales, rows):
    dtype = a_list[0].dtype if len({t.dtype for t in a_list + b_list}) == 1 else torch.promote_types(
        torch.float32, max((t.dtype for t in a_list + b_list), key=lambda d: torch.finfo(d).bits))
    scale = max(scales)
    ranks = [a.shape[0] for a in a_list]
    a = torch.cat([t.to(dtype) for t in a_list])
    b = torch.zeros(rows, sum(ranks), dtype=dtype)
    offset = 0
    for module, part_b, part_scale, rank in zip(present, b_list, scales, ranks):
        ratio = part_scale / scale
        folded = part_b.to(dtype) * ratio
        if math.frexp(ratio)[0] != 0.5 or not torch.equal(folded / ratio, part_b.to(dtype)):
            raise UsageError(f"{name}: parts {', '.join(present)} have scales {scales}; one fused alpha holds them "
                             "only when their ratios are powers of two", hint="use --to diffusers (separate modules), "
                                                                               "or resize to one alpha first")
        b[index[module], offset:offset + rank] = folded
        offset += rank
    return a, b, scale, scale * sum(ranks)


def _alpha_of(entry) -> float:
    """The module's alpha as read (so it is stored back bit-for-bit) when it gives its scale, else scale·rank."""
    rank, scale = int(entry.params["rank"]), float(entry.params["scale"])
    alpha = entry.params.get("alpha")
    return float(alpha) if alpha is not None and float(alpha) / rank == scale else scale * rank


def _fused_rows(name: str, target: Target, present: list[str], modules: dict) -> int:
    """Row count of the fused B, from the present parts' rows and diffusers' split (which gives absent parts')."""
    totals = set()
    for part in target.parts:
        if part.module in present:
            rows = modules[(target.component, part.module)][1]["lora_B"].shape[0]
            share = sum(length for _, length in part.runs)
            totals.add(rows * REFERENCE_ROWS / share)
    if len(totals) != 1 or not float(next(iter(totals))).is_integer():
        raise UsageError(f"{name}: the parts' sizes {present} do not fit diffusers' split of this fused module",
                         hint="the adapter is not for a Flux-shaped model")
    rows = int(next(iter(totals)))
    if scaled_rows(target.parts, rows) is None:
        raise UsageError(f"{name}: {rows} rows do not split as diffusers splits this fused module",
                         hint="the adapter is not for a Flux-shaped model")
    return rows


def _alpha(state, name: str, scale: float, alpha: float, rank: int, layout, absent: bool, keys: list[str],
           report) -> None:
    """Store alpha exactly (in the dtype and shape read, when recorded) and report each module."""
    if absent and scale == 1.0:
        for key in keys:
            report.add(key, LOSSLESS, f"in {name}, no alpha (scale 1), as read")
        return
    stored = torch.tensor(alpha, dtype=torch.float32)
    if layout is not None:
        candidate = torch.tensor(alpha, dtype=torch.float64).to(torch_dtype(layout[0])).reshape(layout[1])
        if float(candidate.double().reshape(-1)[0]) == alpha:
            stored = candidate
    if float(stored.double().reshape(-1)[0]) != alpha:
        stored = torch.tensor(alpha, dtype=torch.float64)
    state[f"{name}.alpha"] = stored
    back = float(stored.double().reshape(-1)[0]) / rank
    for key in keys:
        if back == scale:
            report.add(key, LOSSLESS, f"in {name}" if len(keys) > 1 else "")
        else:
            report.add(key, EXACT_MATH, f"scale {scale!r} -> {back!r}")
