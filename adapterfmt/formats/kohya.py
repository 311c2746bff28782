"""kohya sd-scripts / A1111 / ComfyUI LoRA files: one safetensors with ``<name>.lora_down.weight``,
``<name>.lora_up.weight`` and a 0-d ``<name>.alpha`` (scale = alpha / rank; no alpha means scale 1).

Names are kohya's rule applied to a module path: prefix + "_" + path with every "." replaced by
"_". Because module names contain "_", mapping back needs the base's module list (``--base``) or
the name table adapterfmt writes into the header (``adapterfmt.kohya_names``). rsLoRA has no
kohya flag: alpha = scale·rank.

Exact or refuse: the consumers of kohya files (diffusers, ComfyUI, A1111) map only the names they
know for a diffusion pipeline's components, and silently apply nothing otherwise. So the writer
writes a module only under the kohya name it was read with (a kohya file round-trips exactly)
and refuses modules that have no such name (any LLM adapter: use peft, gguf or mlx). A file whose
names span several pipeline components (``lora_te1_`` and ``lora_te2_``, ``lora_unet_`` and
``lora_te_``) is read as a multi-component adapter (kohya_pipeline.py): SD 1.x and SDXL names are
mapped by diffusers' own conversion, with a diffusers pipeline or component as ``--base`` (or none
for SD 1.x names). Such pipeline files may hold every kohya/LyCORIS family (kohya_modules.py): LoCon on
Conv2d (1x1 and 3x3), DoRA ``dora_scale`` (either axis), LoHa, LoKr and full ``diff``/``diff_b``.
Outside pipeline files those families are refused by name.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_file
from ._files import load_safetensors, safetensors_keys
from ..errors import ForeignFormatError, UsageError
from ..format import Adapter, Manifest
from ..methods.lora import lora_params
from ..conversion_report import EXACT_MATH, LOSSLESS
from ._lowrank import add_lowrank_module, most_common, require_linear
from .base import AdapterFormat
from .kohya_diffusion import FAMILIES, unsupported_family
from .kohya_modules import KNOWN_LEAVES
from .kohya_pipeline import pipeline_kohya_state, read_pipeline_file
from .kohya_flux import is_flux_adapter, is_kohya_flux, read_kohya_flux, write_kohya_flux

READ_PREFIXES = ("lora_transformer", "lora_te", "lora_te1", "lora_te2", "lora_te3", "lora_unet", "lora_llm")
NAMES_KEY = "adapterfmt.kohya_names"
ROLES = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B", "alpha": "alpha"}
KEY_RE = re.compile(r"^(?P<name>lora_[A-Za-z0-9]+_.+?)\.(?P<suffix>lora_down\.weight|lora_up\.weight|alpha)$")
#: manifest.source key: module -> the kohya name it was read with.
SOURCE_NAMES = "kohya_names"
LYCORIS = ("hada_", "lokr_", "lora_mid", "dora_scale", "oft_", "diff")


def kohya_name(module: str, prefix: str) -> str:
    """kohya's name for a module: dots become underscores.

    Example:
        >>> kohya_name("text_model.encoder.layers.0.self_attn.q_proj", "lora_te")
        'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
    """
    return f"{prefix}_{module.replace('.', '_')}"


def alpha_tensor(alpha: float) -> torch.Tensor:
    """A 0-d alpha: float32 when that is exact (as kohya writes), float64 otherwise (consumers use .item())."""
    as32 = torch.tensor(alpha, dtype=torch.float32)
    return as32 if float(as32) == alpha else torch.tensor(alpha, dtype=torch.float64)


class KohyaFormat(AdapterFormat):
    suffixes = (".safetensors",)
    name = "kohya"
    summary = "kohya / A1111 / ComfyUI LoRA safetensors (lora_down/lora_up/alpha, underscored names)"
    priority = 30
    #: dora, loha, lokr, full (and lora_tucker, LyCORIS's Tucker LoCon, where the LyCORIS conv modules exist):
    #: diffusion pipeline files only (kohya_modules.py); other files refuse them by name.
    writes_methods = ("lora", "dora", "loha", "lokr", "full", "lora_tucker")

    def detect(self, path: Path) -> bool:
        if not (path.is_file() and path.suffix == ".safetensors"):
            return False
        found = safetensors_keys(path)
        if found is not None and found[0] and group_leaves(dict.fromkeys(found[0])) is not None:
            return True  # a diffusion pipeline file of any kohya/LyCORIS family
        # LyCORIS keys are claimed too, so that they are refused by name rather than "unknown format".
        return found is not None and any(k.endswith(".lora_down.weight") or
                                         (k.startswith("lora_") and unsupported_family(k)) for k in found[0])

    # ---------------------------------------------------------------- reading
    def read(self, path: Path, options, report) -> Adapter:
        state, metadata = load_safetensors(path)
        if is_kohya_flux(list(state)):  # kohya Flux: fused qkv/linear1 split by diffusers' own conversion
            return read_kohya_flux(state, metadata, path, options, report)
        by_leaf = group_leaves(state)
        if NAMES_KEY not in metadata and _pipeline_base(options.base) and by_leaf is not None:
            return read_pipeline_file(by_leaf, metadata, options.base, path, report)
        grouped = _group(state, path)
        _one_component(grouped, path)
        lookup = _name_table(metadata, options.base, path)
        manifest, tensors = Manifest(), {}
        for name, parts in sorted(grouped.items()):
            module = lookup.get(name)
            if module is None:
                raise ForeignFormatError(f"{name!r} matches no module of the base", path=path,
                                         hint="pass the base model the LoRA was trained on with --base")
            if "lora_A" not in parts or "lora_B" not in parts:
                raise ForeignFormatError(f"{name!r} lacks lora_down or lora_up", path=path, hint="the file is incomplete")
            a, b = parts["lora_A"], parts["lora_B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.numel() == 0 or b.numel() == 0:
                raise ForeignFormatError(f"{name!r}: lora_down {list(a.shape)} / lora_up {list(b.shape)} are not a "
                                         "linear low-rank pair (conv LoRA is not supported)", path=path,
                                         hint="only Linear targets are supported")
            rank = a.shape[0]
            # kohya, A1111, ComfyUI: scale = alpha / rank; a file without alpha means scale 1.
            alpha = _alpha(name, parts["alpha"], path) if "alpha" in parts else float(rank)
            if "alpha" not in parts:
                report.notes.append(f"{name}: no alpha, scale 1 (alpha = rank)")
            add_lowrank_module(manifest, tensors, module, a, b, lora_params(rank, alpha, False))
            report.add(module, LOSSLESS)
        if not manifest.modules:
            raise ForeignFormatError("no LoRA tensors found", path=path, hint="the file is empty")
        manifest.base.name_or_path = metadata.get("adapterfmt.base_name_or_path")
        manifest.source = {"format": "kohya", "metadata": {k: v for k, v in metadata.items() if k.startswith("ss_")},
                           SOURCE_NAMES: {lookup[name]: name for name in grouped}}
        adapter = Adapter(manifest=manifest, tensors=tensors)
        return adapter

    # ---------------------------------------------------------------- writing
    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        if is_flux_adapter(adapter):
            return write_kohya_flux(adapter, path, report, options)
        if adapter.manifest.components:
            state, metadata = pipeline_kohya_state(adapter, report)
            with atomic_file(path, overwrite=options.overwrite) as tmp:
                save_file(state, str(tmp), metadata=metadata)
            return path
        require_linear(adapter, "kohya", report, options.base)
        known = adapter.manifest.source.get(SOURCE_NAMES) or {}
        names, state = {}, {}
        for target, entry in adapter.manifest.modules.items():
            name = known.get(target)
            if not isinstance(name, str) or not KEY_RE.match(f"{name}.alpha"):
                raise UsageError(f"module {target!r} ({entry.layer} {entry.method}) has no kohya name that a kohya "
                                 "consumer (diffusers, ComfyUI, "
                                 "A1111) maps; they would silently apply nothing",
                                 hint="kohya files are for diffusion pipelines; for LLMs use --to peft, gguf or mlx")
            if name in names:
                raise UsageError(f"modules {names[name]!r} and {target!r} get the same kohya name {name!r}")
            names[name] = target
            rank, scale = int(entry.params["rank"]), float(entry.params["scale"])
            alpha = scale * rank
            tensors = adapter.module_tensors(target)
            state[f"{name}.lora_down.weight"] = tensors["lora_A"].contiguous()
            state[f"{name}.lora_up.weight"] = tensors["lora_B"].contiguous()
            state[f"{name}.alpha"] = alpha_tensor(alpha)
            note = "rsLoRA stored as alpha = scale*rank" if entry.params["use_rslora"] else ""
            back = float(state[f"{name}.alpha"]) / rank
            if back == scale:
                report.add(target, LOSSLESS, note)
            else:  # scale*rank/rank need not round-trip in floating point
                a, b = tensors["lora_A"].double(), tensors["lora_B"].double()
                report.add(target, EXACT_MATH, "; ".join(filter(None, [note, f"scale {scale!r} -> {back!r}"])),
                           reference=(b @ a) * scale, result=(b @ a) * back)
        entries = adapter.manifest.modules.values()
        metadata = {"format": "pt", "ss_network_module": "networks.lora",
                    "ss_network_dim": str(most_common([int(e.params["rank"]) for e in entries])),
                    "ss_network_alpha": str(most_common([e.params["scale"] * e.params["rank"] for e in entries])),
                    NAMES_KEY: json.dumps(names, sort_keys=True)}
        if adapter.manifest.base.name_or_path:
            metadata["adapterfmt.base_name_or_path"] = adapter.manifest.base.name_or_path
        with atomic_file(path, overwrite=options.overwrite) as tmp:
            save_file(state, str(tmp), metadata=metadata)
        return path


def _group(state: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya name: {role: tensor}}; keys of no kohya LoRA family are refused, the first ones named."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, tensor in state.items():
        match = KEY_RE.match(key)
        if match:
            grouped.setdefault(match["name"], {})[ROLES[match["suffix"]]] = tensor
        else:
            unmatched.append(key)
    if unmatched:
        first = unmatched[0]
        kind = next((m for m in LYCORIS if m in first), None)
        family = unsupported_family(first)
        named = f" (LyCORIS {kind.rstrip('_')} is not supported)" if kind else ""
        named += f" ({family} is not supported by this build)" if family else ""
        more = f"; {len(unmatched) - 1} more: {', '.join(unmatched[1:3])}" if len(unmatched) > 1 else ""
        raise ForeignFormatError(f"key {first!r} is not a kohya LoRA tensor{named}{more}", path=path,
                                 hint=f"only plain LoRA (lora_down/lora_up/alpha) is supported; families tried: "
                                      f"{'; '.join(FAMILIES)}")
    return grouped


PIPELINE_KEY_RE = re.compile(r"^(?P<name>lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+)\.(?P<leaf>[a-z0-9_.]+)$")


def group_leaves(state: dict) -> dict[str, dict] | None:
    """``{kohya name: {leaf: tensor}}`` when every key is ``<pipeline name>.<leaf>`` of a known
    kohya/LyCORIS family (see kohya_modules.py), else None.

    Example:
        >>> group_leaves({"lora_te_x.diff": 1, "lora_te_x.diff_b": 2})
        {'lora_te_x': {'diff': 1, 'diff_b': 2}}
    """
    grouped: dict[str, dict] = {}
    for key, tensor in state.items():
        match = PIPELINE_KEY_RE.match(key)
        if not match or match["leaf"] not in KNOWN_LEAVES:
            return None
        grouped.setdefault(match["name"], {})[match["leaf"]] = tensor
    return grouped or None


def _pipeline_base(base) -> bool:
    """No base, or a diffusers one: kohya diffusion names are mapped by diffusers' conversion."""
    return base is None or hasattr(base, "components") or type(base).__name__ == "DiffusersComponent"


def _one_component(grouped: dict[str, dict], path: Path) -> None:
    """Refuse names from several pipeline components: one base module list cannot resolve them all."""
    prefixes = sorted({name.split("_", 2)[0] + "_" + name.split("_", 2)[1] for name in grouped})
    if len(prefixes) > 1:
        raise ForeignFormatError(f"the file holds modules of several pipeline components ({', '.join(prefixes)})",
                                 path=path, hint="multi-component (UNet + text encoders) kohya files are not "
                                                 "supported yet; nothing was written")


def _alpha(name: str, tensor: torch.Tensor, path: Path) -> float:
    """The alpha of one module: a single finite number (kohya writes 0-d; some tools write shape [1])."""
    if tensor.numel() != 1:
        raise ForeignFormatError(f"{name!r}: alpha has shape {list(tensor.shape)}, expected a single number",
                                 path=path, hint="the file is damaged")
    alpha = float(tensor.double().reshape(()))
    if not math.isfinite(alpha):
        raise ForeignFormatError(f"{name!r}: alpha {alpha} is not a finite number", path=path,
                                 hint="the file is damaged or training diverged")
    return alpha


def _name_table(metadata: dict[str, str], base, path: Path,
                prefixes: tuple[str, ...] = READ_PREFIXES) -> dict[str, str]:
    """kohya name -> module path, from the header table adapterfmt writes, else from the base's modules."""
    if NAMES_KEY in metadata:
        try:
            table = json.loads(metadata[NAMES_KEY])
        except ValueError:
            raise ForeignFormatError(f"header {NAMES_KEY} is not valid JSON", path=path,
                                     hint="the file was damaged") from None
        if isinstance(table, dict) and all(isinstance(v, str) for v in table.values()):
            return table
    if base is None:
        raise UsageError("kohya names replace '.' by '_', so the module names cannot be recovered without the "
                         "base model", path=path, hint="pass --base (the model the LoRA was trained on)")
    table: dict[str, str] = {}
    modules = {n.removesuffix(".weight") for n in base.names() if n.endswith(".weight")}
    for module in sorted(modules):
        for prefix in prefixes:
            name = kohya_name(module, prefix)
            if table.get(name, module) != module:
                raise ForeignFormatError(f"base modules {table[name]!r} and {module!r} share the kohya name "
                                         f"{name!r}", path=path, hint="the mapping is ambiguous for this base")
            table[name] = module
    return table


