"""LyCORIS LoHa / LoKr safetensors (kohya-style names, one 0-d ``alpha`` per module).

Keys: ``<name>.hada_w1_a`` … ``hada_w2_b`` (LoHa) or ``<name>.lokr_w1`` / ``lokr_w1_a``+``lokr_w1_b``,
``lokr_w2`` / ``lokr_w2_a``+``lokr_w2_b`` (LoKr), ``<name>.alpha``; plain ``lora_down``/``lora_up`` modules
may sit in the same file. Names follow kohya's rule (see :mod:`.kohya`); LyCORIS's own wrapper uses the
prefix ``lycoris``. Scale convention (LyCORIS modules, 4.1.3): alpha missing or 0 means alpha = rank; LoHa
scale = alpha/r with r = ``hada_w1_b.shape[0]``; LoKr scale = alpha/r with r the factor rank
(``lokr_w1_b``/``lokr_w2_b`` rows), and **1 when both halves are full matrices**, whatever alpha says.
Convolution (Tucker) cores and DoRA scales are refused by name.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_file
from ..conversion_report import EXACT_MATH, LOSSLESS, SCALE_FOLDED
from ..errors import ForeignFormatError, UsageError
from ..format import Adapter, BaseWeight, Manifest, ModuleEntry, TensorRef
from ..format.dtypes import dtype_name
from ..methods.lokr import lokr_scale
from ..methods.lora import lora_params
from ._files import load_safetensors, safetensors_keys
from ._lowrank import add_lowrank_module
from .base import AdapterFormat
from .kohya import (NAMES_KEY, READ_PREFIXES, KohyaFormat, _alpha, _name_table, _pipeline_base, alpha_tensor,
                    group_leaves, kohya_name)

PREFIX = "lycoris"
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
PLAIN = ("lora_down.weight", "lora_up.weight")
REFUSED = {"hada_t1": "LoHa Tucker cores (convolutions)", "hada_t2": "LoHa Tucker cores (convolutions)",
           "lokr_t2": "LoKr Tucker cores (convolutions)", "lora_mid.weight": "LoCon Tucker cores (convolutions)",
           "dora_scale": "DoRA-style weight decomposition"}
KEY_RE = re.compile(r"^(?P<name>[A-Za-z0-9]+_.+?)\.(?P<leaf>" + "|".join(
    re.escape(k) for k in sorted(LOHA + LOKR + PLAIN + tuple(REFUSED) + ("alpha",), key=len, reverse=True)) + r")$")


class LycorisFormat(AdapterFormat):
    suffixes = (".safetensors",)
    name = "lycoris"
    summary = "LyCORIS LoHa/LoKr safetensors (hada_*/lokr_* + alpha, kohya-style names)"
    priority = 29  # before kohya: a LyCORIS file may also hold plain lora_down/lora_up modules
    writes_methods = ("lora", "loha", "lokr")

    def detect(self, path: Path) -> bool:
        if not (path.is_file() and path.suffix == ".safetensors"):
            return False
        found = safetensors_keys(path)
        leaves = tuple(f".{leaf}" for leaf in LOHA + LOKR + tuple(REFUSED))
        # LyCORIS-only leaves, or LyCORIS's own prefix (a file of plain LoRA modules written by LyCORIS).
        return found is not None and any(k.endswith(leaves) or k.startswith(f"{PREFIX}_") for k in found[0])

    def read(self, path: Path, options, report) -> Adapter:
        state, metadata = load_safetensors(path)
        if NAMES_KEY not in metadata and _pipeline_base(options.base) and group_leaves(state) is not None:
            return KohyaFormat().read(path, options, report)  # SD 1.x/SDXL pipeline names: kohya_pipeline.py
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = KEY_RE.match(key)
            if not match:
                raise ForeignFormatError(f"key {key!r} is not a LyCORIS LoHa/LoKr/LoRA tensor", path=path,
                                         hint="only Linear LoHa, LoKr and LoRA modules are supported")
            if match["leaf"] in REFUSED:
                raise ForeignFormatError(f"{key!r}: {REFUSED[match['leaf']]} are not supported", path=path,
                                         hint="merge it with LyCORIS, or keep the original file")
            grouped.setdefault(match["name"], {})[match["leaf"]] = tensor
        lookup = _name_table(metadata, options.base, path, prefixes=(PREFIX,) + READ_PREFIXES)
        manifest, tensors = Manifest(), {}
        for name, parts in sorted(grouped.items()):
            module = lookup.get(name)
            if module is None:
                raise ForeignFormatError(f"{name!r} matches no module of the base", path=path,
                                         hint="pass the base model the adapter was trained on with --base")
            if any(t.dim() != 2 for k, t in parts.items() if k != "alpha"):
                raise ForeignFormatError(f"{name!r}: tensors are not matrices (convolutions are not supported)",
                                         path=path, hint="only Linear targets are supported")
            alpha = _alpha(name, parts.pop("alpha"), path) if "alpha" in parts else None
            _add_module(manifest, tensors, module, name, parts, alpha, path)
            report.add(module, LOSSLESS)
        manifest.base.name_or_path = metadata.get("adapterfmt.base_name_or_path")
        manifest.source = {"format": "lycoris", "metadata": {k: v for k, v in metadata.items() if k.startswith("ss_")}}
        return Adapter(manifest=manifest, tensors=tensors)

    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        names, state = {}, {}
        for target, entry in adapter.manifest.modules.items():
            if entry.layer != "linear" or entry.fan_in_fan_out:
                raise UsageError(f"module {target!r} is a {entry.layer} layer; this LyCORIS writer holds Linear "
                                 "layers only", hint="export it with --to peft or keep the adapterfmt file")
            name = kohya_name(target, PREFIX)
            names[name] = target
            tensors = adapter.module_tensors(target)
            state.update(_module_state(name, target, entry, tensors, report))
        metadata = {"format": "pt", NAMES_KEY: json.dumps(names, sort_keys=True)}
        if adapter.manifest.base.name_or_path:
            metadata["adapterfmt.base_name_or_path"] = adapter.manifest.base.name_or_path
        with atomic_file(path, overwrite=options.overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        return path


def _add_module(manifest, tensors, module, name, parts, alpha, path) -> None:
    leaves = set(parts)
    if leaves == set(PLAIN):
        a, b = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = a.shape[0]
        add_lowrank_module(manifest, tensors, module, a, b, lora_params(rank, alpha or rank, False))
        return
    if leaves == set(LOHA):
        roles = {k[len("hada_"):]: v for k, v in parts.items()}
        rank = roles["w1_b"].shape[0]
        alpha = alpha or float(rank)  # LyCORIS: missing or 0 means alpha = rank
        params = {"rank": rank, "alpha": alpha, "scale": alpha / rank}
        out_f, in_f = roles["w1_a"].shape[0], roles["w1_b"].shape[1]
        method = "loha"
    elif leaves <= set(LOKR) and _one_of(leaves, "w1") and _one_of(leaves, "w2"):
        roles = {k[len("lokr_"):]: v for k, v in parts.items()}
        low = roles.get("w1_b", roles.get("w2_b"))
        both_full = low is None
        # Two full halves: LyCORIS saves alpha = lora_dim and applies scale 1; keep that dim as the rank.
        rank = (int(alpha) if alpha and float(alpha).is_integer() and alpha >= 1 else 1) if both_full \
            else low.shape[0]
        alpha = alpha or float(rank)
        (a, c) = roles["w1"].shape if "w1" in roles else (roles["w1_a"].shape[0], roles["w1_b"].shape[1])
        (b, d) = roles["w2"].shape if "w2" in roles else (roles["w2_a"].shape[0], roles["w2_b"].shape[1])
        params = {"w1_shape": [a, c], "w2_shape": [b, d], "rank": rank, "alpha": alpha, "convention": "lycoris",
                  "scale": lokr_scale("lycoris", rank, alpha, both_full)}
        out_f, in_f, method = a * b, c * d, "lokr"
    else:
        raise ForeignFormatError(f"{name!r} has {sorted(leaves)}: not one LoHa, LoKr or LoRA module", path=path,
                                 hint="the file is incomplete or mixes algorithms within a module")
    refs = {}
    for role, tensor in roles.items():
        tensors[f"{module}.{role}"] = tensor.contiguous()
        refs[role] = TensorRef(f"{module}.{role}", dtype_name(tensor.dtype), list(tensor.shape))
    manifest.modules[module] = ModuleEntry(method=method, base_weight=f"{module}.weight", shape=[out_f, in_f],
                                           params=params, tensors=refs)
    manifest.base.weights[f"{module}.weight"] = BaseWeight(shape=[out_f, in_f])


def _one_of(leaves: set[str], half: str) -> bool:
    """Exactly the full matrix, or exactly both factors, of one Kronecker half."""
    full, pair = f"lokr_{half}" in leaves, {f"lokr_{half}_a", f"lokr_{half}_b"} <= leaves
    return full != pair and not (full and leaves & {f"lokr_{half}_a", f"lokr_{half}_b"})


def _module_state(name, target, entry, tensors, report) -> dict[str, torch.Tensor]:
    params = entry.params
    if entry.method == "loha":
        state = {f"{name}.hada_{role}": t for role, t in tensors.items()}
        state[f"{name}.alpha"] = alpha_tensor(params["scale"] * params["rank"])
        report.add(target, LOSSLESS if float(state[f"{name}.alpha"]) / params["rank"] == params["scale"]
                   else EXACT_MATH)
        return state
    if entry.method == "lora":
        rank, scale = int(params["rank"]), float(params["scale"])
        alpha = alpha_tensor(scale * rank)
        exact = float(alpha) / rank == scale
        report.add(target, LOSSLESS if exact and not params["use_rslora"] else EXACT_MATH,
                   "" if exact else f"scale {scale!r} -> {float(alpha) / rank!r}")
        return {f"{name}.lora_down.weight": tensors["lora_A"], f"{name}.lora_up.weight": tensors["lora_B"],
                f"{name}.alpha": alpha}
    if entry.method != "lokr":
        raise UsageError(f"module {target!r} is {entry.method}; the LyCORIS writer holds LoRA, LoHa and LoKr",
                         hint="convert it with --method lora first")
    both_full = "w1" in tensors and "w2" in tensors
    state = {f"{name}.lokr_{role}": t for role, t in tensors.items()}
    if both_full:
        # LyCORIS applies scale 1 to two full halves: fold our scale into w2.
        state[f"{name}.alpha"] = alpha_tensor(float(params["rank"]))
        if params["scale"] != 1.0:
            state[f"{name}.lokr_w2"] = tensors["w2"].float() * params["scale"]
            report.add(target, SCALE_FOLDED, f"scale {params['scale']:g} folded into w2 (LyCORIS applies 1)")
            return state
    else:
        state[f"{name}.alpha"] = alpha_tensor(params["scale"] * params["rank"])
    report.add(target, LOSSLESS)
    return state
