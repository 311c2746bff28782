"""diffusers / PEFT-style LoRA files of pipelines: ``<component>.<module>.lora_A.weight`` and
``lora_B.weight`` per module, with the per-component PEFT ``LoraConfig`` in the header under
``lora_adapter_metadata`` (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``, …), as
``save_lora_weights`` writes them and ``load_lora_weights`` reads them.

Scales are exact: each module's alpha is written as ``scale·rank`` (``alpha_pattern`` for modules
off the component's most common value), and PEFT computes ``lora_alpha / r`` as we do. A file
without metadata means scale 1 (diffusers' rule). DoRA magnitudes and keys of no known component
are refused, never dropped. Conv2d LoRA (LoCon) is held as PEFT holds it (A (r, in, kh, kw),
B (out, r, 1, 1)); DoRA, LoHa, LoKr and full modules are refused by name (diffusers cannot load them).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_file
from ..conversion_report import EXACT_MATH, LOSSLESS
from ..errors import ForeignFormatError, UsageError
from ..format import Adapter, BaseWeight, Manifest, ModuleEntry, TensorRef
from ..format.dtypes import dtype_name
from ..methods.descriptor import CONV2D_LAYER
from ..format.components import COMPONENTS, join_components, split_components
from ..methods.lora import lora_params
from ._files import load_safetensors, safetensors_keys
from ._lowrank import add_lowrank_module, most_common
from .base import AdapterFormat
from .kohya_diffusion import resolve_in_base

METADATA_KEY = "lora_adapter_metadata"
KEY_RE = re.compile(r"^(?P<component>[a-z][a-z0-9_]*)\.(?P<module>.+)\.(?P<role>lora_A|lora_B)\.weight$")
ROLES = {"lora_A": "lora_A", "lora_B": "lora_B"}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: the first key that matches the end of the module path.

    Example:
        >>> pattern_value({"attn1.to_q": 8}, "down_blocks.0.attn1.to_q", 4)
        8
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class DiffusersLoraFormat(AdapterFormat):
    name = "diffusers"
    summary = "diffusers / PEFT-style pipeline LoRA (unet./text_encoder./transformer. keys, lora_adapter_metadata)"
    priority = 28
    suffixes = (".safetensors",)
    #: dora and full are "written" only to be refused with diffusers' reason (loha/lokr convert exactly to LoRA)
    writes_methods = ("lora", "dora", "full")

    def detect(self, path: Path) -> bool:
        found = safetensors_keys(path) if path.is_file() else None
        if not found or not found[0]:
            return False
        return all((m := KEY_RE.match(k)) and m["component"] in COMPONENTS for k in found[0])

    def read(self, path: Path, options, report) -> Adapter:
        state, metadata = load_safetensors(path)
        config = _metadata(metadata, path)
        grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = KEY_RE.match(key)
            if not match or match["component"] not in COMPONENTS:
                raise ForeignFormatError(f"key {key!r} is not a diffusers LoRA tensor of a known component",
                                         path=path, hint=f"keys are <{'|'.join(COMPONENTS)}>.<module>.lora_A|B.weight")
            grouped.setdefault((match["component"], match["module"]), {})[match["role"]] = tensor
        parts: dict[str, tuple[Manifest, dict]] = {}
        for (component, module), pair in sorted(grouped.items()):
            inner = resolve_in_base(component, module, options.base)
            if inner is None:
                raise ForeignFormatError(f"module {component}.{module} is not in the base", path=path,
                                         hint="check --base (the pipeline the LoRA was made for)")
            if set(pair) != {"lora_A", "lora_B"}:
                raise ForeignFormatError(f"{component}.{module} lacks lora_A or lora_B", path=path,
                                         hint="the file is incomplete")
            a, b = pair["lora_A"], pair["lora_B"]
            conv = a.dim() == 4 and b.dim() == 4 and tuple(b.shape[2:]) == (1, 1)
            if not conv and (a.dim() != 2 or b.dim() != 2) or a.shape[0] != b.shape[1]:
                raise ForeignFormatError(f"{component}.{module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are "
                                         "not a Linear or Conv2d low-rank pair", path=path,
                                         hint="only Linear and Conv2d (A (r, in, kh, kw), B (out, r, 1, 1)) targets "
                                              "are supported")
            alpha = _alpha(config.get(component), module, a.shape[0], path)
            manifest, tensors = parts.setdefault(component, (Manifest(), {}))
            params = lora_params(a.shape[0], alpha, False)
            (_add_conv if conv else add_lowrank_module)(manifest, tensors, inner, a, b, params)
            report.add(f"{component}.{inner}", LOSSLESS)
        if not parts:
            raise ForeignFormatError("no LoRA tensors found", path=path, hint="the file is empty")
        source = {"format": "diffusers", "metadata": {k: v for k, v in metadata.items() if k != METADATA_KEY}}
        if config:
            source[METADATA_KEY] = config
        return join_components({c: Adapter(m, t) for c, (m, t) in parts.items()}, source)

    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        if not adapter.manifest.components:
            target, entry = next(iter(adapter.manifest.modules.items()))
            raise UsageError(f"module {target!r} ({entry.layer} {entry.method}) belongs to no pipeline component; "
                             "diffusers pipeline LoRA files hold multi-component adapters (unet, text_encoder, ...)",
                             hint="read the source with --base pointing at the diffusers pipeline; for a single "
                                  "model use --to peft")
        state, config = {}, {}
        for component, view in split_components(adapter).items():
            ranks, alphas = {}, {}
            for inner, entry in view.manifest.modules.items():
                _require_loadable(f"{component}.{inner}", entry)
                tensors = view.module_tensors(inner)
                state[f"{component}.{inner}.lora_A.weight"] = tensors["lora_A"].contiguous()
                state[f"{component}.{inner}.lora_B.weight"] = tensors["lora_B"].contiguous()
                ranks[inner], alphas[inner] = _exact_alpha(entry, tensors, f"{component}.{inner}", report)
            config.update(_component_config(component, ranks, alphas))
        metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
        with atomic_file(path, overwrite=options.overwrite) as tmp:
            save_file(state, str(tmp), metadata=metadata)
        return path


#: method -> why diffusers' load_lora_weights cannot take it (measured with diffusers 0.42.1)
NOT_LOADABLE = {
    "dora": "diffusers drops kohya/LyCORIS dora_scale with a warning and loads PEFT DoRA only through "
            "use_dora (magnitude per output row, no eps)",
    "loha": "diffusers cannot load LoHa (hada_*): 'The following keys have not been correctly renamed'",
    "lokr": "diffusers cannot load LoKr (lokr_*): 'The following keys have not been correctly renamed'",
    "full": "diffusers cannot load a full ΔW (diff/diff_b): 'The following keys have not been correctly renamed'",
}


def _require_loadable(key: str, entry) -> None:
    """Refuse by name what a diffusers LoRA file cannot carry (nothing is dropped silently)."""
    if entry.method == "lora" and entry.layer in ("linear", CONV2D_LAYER):
        return
    why = NOT_LOADABLE.get(entry.method, f"this build writes Linear and Conv2d LoRA to diffusers, not {entry.layer} "
                                         f"{entry.method}")
    hint = ("convert the method to LoRA first (--method lora; exact for LoHa/LoKr at a higher rank), or merge it"
            if entry.method in ("loha", "lokr") else "merge it (adapterfmt merge), or keep the kohya/adapterfmt file")
    raise UsageError(f"module {key} is {entry.layer} {entry.method}: {why}", hint=hint)


def _add_conv(manifest: Manifest, tensors: dict, target: str, a: torch.Tensor, b: torch.Tensor, params: dict) -> None:
    """A Conv2d LoRA module: A (r, in, kh, kw), B (out, r, 1, 1), as PEFT stores it."""
    refs = {}
    for role, tensor in (("lora_A", a), ("lora_B", b)):
        tensors[f"{target}.{role}"] = tensor.contiguous()
        refs[role] = TensorRef(f"{target}.{role}", dtype_name(tensor.dtype), list(tensor.shape))
    shape = [b.shape[0], *a.shape[1:]]
    manifest.modules[target] = ModuleEntry(method="lora", base_weight=f"{target}.weight", shape=shape, params=params,
                                           tensors=refs, layer=CONV2D_LAYER)
    manifest.base.weights[f"{target}.weight"] = BaseWeight(shape=shape)


def _metadata(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    """{component: LoraConfig fields} from ``lora_adapter_metadata`` (empty when absent)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise ForeignFormatError(f"header {METADATA_KEY} is not valid JSON", path=path, hint="the file is damaged") from None
    if not isinstance(flat, dict):
        raise ForeignFormatError(f"header {METADATA_KEY} is not a JSON object", path=path, hint="the file is damaged")
    config: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if field in PATTERN_FIELDS:
            _check_patterns(key, value, path)
        config.setdefault(component, {})[field] = value
    return config


PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")


def _check_patterns(key: str, value, path: Path) -> None:
    """A pattern field is a JSON object of regular expressions (PEFT matches them against module paths)."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ForeignFormatError(f"{METADATA_KEY} field {key} is {type(value).__name__}, not an object", path=path,
                                 hint="the file is damaged")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ForeignFormatError(f"{METADATA_KEY} field {key}: {pattern!r} is not a regular expression ({exc})",
                                     path=path, hint="the file is damaged") from None


def _alpha(config: dict | None, module: str, rank: int, path: Path) -> float:
    """The module's alpha under PEFT's rules (rank and alpha patterns); scale 1 without metadata."""
    if not config:
        return float(rank)
    if config.get("use_rslora") or config.get("use_dora"):
        raise ForeignFormatError(f"{module}: rsLoRA/DoRA diffusers files are not supported by this build", path=path,
                                 hint="only plain LoRA is supported")
    want = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    if want != rank:
        raise ForeignFormatError(f"{module}: lora_A has rank {rank}, the metadata says {want}", path=path,
                                 hint="the file contradicts itself; diffusers would refuse it too")
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ForeignFormatError(f"{module}: lora_alpha {alpha!r} in lora_adapter_metadata is not a finite number",
                                 path=path, hint="the file is damaged")
    return float(alpha)


def _exact_alpha(entry, tensors, key: str, report) -> tuple[int, float]:
    rank, scale = int(entry.params["rank"]), float(entry.params["scale"])
    alpha = scale * rank
    if alpha / rank == scale:  # PEFT computes scaling = lora_alpha / r
        report.add(key, LOSSLESS)
    else:
        report.add(key, EXACT_MATH, f"scale {scale!r} -> {alpha / rank!r}")
    return rank, alpha


def _component_config(component: str, ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """One component's LoraConfig fields, prefixed as diffusers packs them (``unet.r``)."""
    r = most_common(list(ranks.values()))
    lora_alpha = most_common(list(alphas.values()))
    fields = {"r": r, "lora_alpha": lora_alpha, "target_modules": sorted(ranks),
              "rank_pattern": {m: v for m, v in ranks.items() if v != r},
              # full module paths: no pattern can match another module's path by suffix
              "alpha_pattern": {m: v for m, v in alphas.items() if v != lora_alpha},
              "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none"}
    return {f"{component}.{k}": v for k, v in fields.items()}
