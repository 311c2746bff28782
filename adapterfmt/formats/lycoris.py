"""LyCORIS safetensors: LoCon (plain and Tucker), LoHa and LoKr on Linear and Conv2d layers (kohya-style names).

Keys: ``<name>.<leaf>`` with one 0-d ``<name>.alpha`` per module; the leaves per algorithm and layer are in
:mod:`.lycoris_modules`. Names follow kohya's rule (see :mod:`.kohya`); LyCORIS's own wrapper uses the
prefix ``lycoris``. Scale convention (LyCORIS modules, 4.1.3, their forward pass): alpha missing or 0 means
alpha = rank; scale = alpha/r with r the factor rank (LoCon ``lora_down`` rows, LoHa ``hada_w1_b`` rows, LoKr
``lokr_w1_b``/``lokr_w2_b`` rows), and for LoKr **1 when both halves are full matrices**, whatever alpha says.
DoRA scales (``dora_scale``) are refused by name.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_file
from ..conversion_report import LOSSLESS
from ..errors import ForeignFormatError, UsageError
from ..format import Adapter, BaseWeight, Manifest, ModuleEntry, TensorRef
from ..format.dtypes import dtype_name
from ..methods.descriptor import CONV2D_LAYER
from ._files import load_safetensors, safetensors_keys
from .base import AdapterFormat
from .kohya import (NAMES_KEY, READ_PREFIXES, KohyaFormat, _alpha, _name_table, _pipeline_base, alpha_tensor,
                    group_leaves, kohya_name)
from .kohya_modules import check_leaves
from .lycoris_modules import LEAVES, LOHA, LOHA_CORES, LOKR, LOKR_CORES, PLAIN_CORE, module_state, read_module

PREFIX = "lycoris"
#: Header of files adapterfmt writes: LyCORIS name -> conv weight shape (a flattened factor hides the kernel).
CONV_SHAPES_KEY = "adapterfmt.conv_shapes"
REFUSED = {"dora_scale": "DoRA-style weight decomposition"}
KEY_RE = re.compile(r"^(?P<name>[A-Za-z0-9]+_.+?)\.(?P<leaf>" + "|".join(
    re.escape(k) for k in sorted(LEAVES + tuple(REFUSED) + ("alpha",), key=len, reverse=True)) + r")$")
#: Leaves only LyCORIS writes (kohya's LoRA files have lora_down/lora_up only).
LYCORIS_ONLY = LOHA + LOHA_CORES + LOKR + LOKR_CORES + PLAIN_CORE + tuple(REFUSED)


class LycorisFormat(AdapterFormat):
    suffixes = (".safetensors",)
    name = "lycoris"
    summary = "LyCORIS LoCon/LoHa/LoKr safetensors, Linear and Conv2d, Tucker cores (kohya-style names)"
    priority = 29  # before kohya: a LyCORIS file may also hold plain lora_down/lora_up modules
    writes_methods = ("lora", "lora_tucker", "loha", "lokr")

    def detect(self, path: Path) -> bool:
        if not (path.is_file() and path.suffix == ".safetensors"):
            return False
        found = safetensors_keys(path)
        leaves = tuple(f".{leaf}" for leaf in LYCORIS_ONLY)
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
                raise ForeignFormatError(f"key {key!r} is not a LyCORIS LoCon/LoHa/LoKr tensor", path=path,
                                         hint="only LoRA/LoCon, LoHa and LoKr modules are supported")
            if match["leaf"] in REFUSED:
                raise ForeignFormatError(f"{key!r}: {REFUSED[match['leaf']]} are not supported", path=path,
                                         hint="merge it with LyCORIS, or keep the original file")
            grouped.setdefault(match["name"], {})[match["leaf"]] = tensor
        lookup = _name_table(metadata, options.base, path, prefixes=(PREFIX,) + READ_PREFIXES)
        conv_shapes = _conv_shapes(metadata, path)
        manifest, tensors = Manifest(), {}
        for name, parts in sorted(grouped.items()):
            module = lookup.get(name)
            if module is None:
                raise ForeignFormatError(f"{name!r} matches no module of the base", path=path,
                                         hint="pass the base model the adapter was trained on with --base")
            alpha = _alpha(name, parts.pop("alpha"), path) if "alpha" in parts else None
            base_shape = conv_shapes.get(name) or _base_shape(options.base, module)
            check_leaves(name, parts, path)  # rank 0, 1-D halves, integer factors: refused by name
            method, params, roles, shape, layer = read_module(name, parts, alpha, base_shape, path)
            _check_conv_shape(name, shape, layer, base_shape, path)
            _add_entry(manifest, tensors, module, method, params, roles, shape, layer)
            report.add(module, LOSSLESS)
        manifest.base.name_or_path = metadata.get("adapterfmt.base_name_or_path")
        manifest.source = {"format": "lycoris", "metadata": {k: v for k, v in metadata.items() if k.startswith("ss_")}}
        return Adapter(manifest=manifest, tensors=tensors)

    def write(self, adapter: Adapter, path: Path, report, options) -> Path:
        names, state, conv_shapes = {}, {}, {}
        for target, entry in adapter.manifest.modules.items():
            if entry.layer not in ("linear", CONV2D_LAYER) or entry.fan_in_fan_out:
                raise UsageError(f"module {target!r} is a {entry.layer} layer; this LyCORIS writer holds Linear "
                                 "and Conv2d layers only", hint="export it with --to peft or keep the adapterfmt file")
            name = kohya_name(target, PREFIX)
            names[name] = target
            if entry.layer == CONV2D_LAYER:
                conv_shapes[name] = list(entry.shape)
            state.update(module_state(name, target, entry, adapter.module_tensors(target), report))
        metadata = {"format": "pt", NAMES_KEY: json.dumps(names, sort_keys=True)}
        if conv_shapes:
            metadata[CONV_SHAPES_KEY] = json.dumps(conv_shapes, sort_keys=True)
        if adapter.manifest.base.name_or_path:
            metadata["adapterfmt.base_name_or_path"] = adapter.manifest.base.name_or_path
        with atomic_file(path, overwrite=options.overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        return path


def _conv_shapes(metadata: dict[str, str], path: Path) -> dict[str, list[int]]:
    """The conv weight shapes adapterfmt recorded in the header ({} when absent)."""
    if CONV_SHAPES_KEY not in metadata:
        return {}
    try:
        table = json.loads(metadata[CONV_SHAPES_KEY])
    except ValueError:
        table = None
    if not (isinstance(table, dict) and all(isinstance(v, list) and len(v) == 4 and
                                            all(isinstance(d, int) and d > 0 for d in v) for v in table.values())):
        raise ForeignFormatError(f"header {CONV_SHAPES_KEY} is not a table of conv weight shapes", path=path,
                                 hint="the file was damaged")
    return table


def _base_shape(base, module: str) -> list[int] | None:
    """The base weight's shape, when a base is given and has it."""
    name = f"{module}.weight"
    if base is None or name not in base:
        return None
    return list(base.shape(name))


def _check_conv_shape(name: str, shape: list[int], layer: str, base_shape: list[int] | None, path: Path) -> None:
    """A convolution module (by its tensors or by its base weight) must give the base weight's shape."""
    if base_shape is None or (layer != CONV2D_LAYER and len(base_shape) != 4) or list(shape) == list(base_shape):
        return
    raise ForeignFormatError(f"{name!r}: the tensors describe a {layer} weight {list(shape)}, the base weight is "
                             f"{list(base_shape)}", path=path,
                             hint="pass the base model the adapter was trained on with --base")


def _add_entry(manifest, tensors, module, method, params, roles, shape, layer) -> None:
    refs = {}
    for role, tensor in roles.items():
        tensors[f"{module}.{role}"] = tensor.contiguous()
        refs[role] = TensorRef(f"{module}.{role}", dtype_name(tensor.dtype), list(tensor.shape))
    manifest.modules[module] = ModuleEntry(method=method, base_weight=f"{module}.weight", shape=list(shape),
                                           params=params, tensors=refs, layer=layer)
    manifest.base.weights[f"{module}.weight"] = BaseWeight(shape=list(shape))
