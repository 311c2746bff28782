"""One module of a kohya / LyCORIS diffusion pipeline file <-> one adapterfmt module, for every family.

A module is its kohya name plus leaves (``<name>.<leaf>``). The family follows from the leaves:

| family | leaves | method, layer |
|---|---|---|
| LoRA / LoCon | ``lora_down.weight`` (r, in[, kh, kw]), ``lora_up.weight`` (out, r[, 1, 1]) | ``lora``, linear/conv2d |
| DoRA | the above + ``dora_scale`` (out, 1[, 1, 1]) or (1, in[, 1, 1]) | ``dora``, magnitude axis from the shape |
| LoHa, LoKr | ``hada_*``, ``lokr_*`` (LyCORIS) | ``loha``, ``lokr`` |
| full | ``diff`` (the weight's shape), optional ``diff_b`` (out) | ``full`` |

``dora_scale`` is LyCORIS's: the norm it divides by gets fp32's machine epsilon added
(lycoris/functional/general.py ``_weight_decompose``), recorded as ``norm_eps``. Its stored shape is kept in
the source so that the file is written back bit for bit.

LoHa/LoKr (and the LoCon Tucker core ``lora_mid``) are read by the LyCORIS module reader
(``lycoris_modules.read_module`` when this build has it: conv and Tucker forms), else by the Linear
reader below; both return ``(method, params, tensors by role, shape, layer)``.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

import torch

from ..conversion_report import LOSSLESS
from ..errors import ForeignFormatError, UsageError
from ..methods.descriptor import CONV2D_LAYER
from ..methods.lokr import lokr_scale
from ..methods.lora import lora_params



def lycoris_modules():
    """The LyCORIS module reader/writer (conv and Tucker LoHa, LoKr, LoCon) when this build has it, else None
    (then Linear LoHa/LoKr and plain LoCon are read below). Imported on use: it imports kohya.py itself."""
    if importlib.util.find_spec(f"{__package__}.lycoris_modules") is None:
        return None
    return importlib.import_module(f"{__package__}.lycoris_modules")

#: LyCORIS adds finfo(float32).eps to every DoRA norm (its dora_scale parameter is fp32).
LYCORIS_DORA_EPS = float(torch.finfo(torch.float32).eps)
PLAIN_ROLES = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B"}
FULL_ROLES = {"diff": "diff", "diff_b": "diff_b"}
#: leaf prefix -> family, for refusals and detection
FAMILY_OF_LEAF = (("hada_", "LyCORIS LoHa"), ("lokr_", "LyCORIS LoKr"), ("lora_mid", "LyCORIS LoCon (Tucker)"),
                  ("dora_scale", "DoRA (dora_scale)"), ("diff", "LyCORIS full"), ("lora_", "LoRA / LoCon"))
KNOWN_LEAVES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "dora_scale", "alpha", "diff", "diff_b",
                "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def family(leaves) -> str:
    """The family name of a module's leaves (for messages).

    Example:
        >>> family({"hada_w1_a", "alpha"})
        'LyCORIS LoHa'
    """
    for prefix, name in FAMILY_OF_LEAF:
        if any(leaf.startswith(prefix) for leaf in leaves):
            return name
    return "unknown"


def read_module(name: str, parts: dict[str, torch.Tensor], alpha: float | None, base_shape: list[int] | None,
                path: Path) -> tuple[str, dict, dict[str, torch.Tensor], list[int], str, dict]:
    """(method, params, tensors by role, shape, layer, layout) of one module; ``layout`` is what the
    file stores differently from adapterfmt (the ``dora_scale`` shape), for writing it back.

    Example:
        >>> read_module("lora_unet_x", {"diff": torch.zeros(4, 2)}, None, [4, 2], Path("f"))[0]
        'full'
    """
    parts = dict(parts)
    check_leaves(name, parts, path)
    if "diff" in parts or "diff_b" in parts:
        return (*_full(name, parts, base_shape, path), {})
    dora_scale = parts.pop("dora_scale", None)
    plugged = lycoris_modules()
    reader = plugged.read_module if plugged is not None else _linear_lycoris
    method, params, roles, shape, layer = reader(name, parts, alpha, base_shape, path)
    if dora_scale is None:
        return method, params, roles, shape, layer, {}
    if method != "lora":
        raise ForeignFormatError(f"{name!r}: dora_scale on a {family(parts)} module is not supported", path=path,
                                 hint="DoRA is read on plain LoRA/LoCon modules only")
    axis = _dora_axis(name, dora_scale, shape, path)
    params = dict(params, magnitude_axis=axis, norm_eps=LYCORIS_DORA_EPS)
    roles["magnitude"] = dora_scale.reshape(-1)
    return "dora", params, roles, shape, layer, {"dora_scale": list(dora_scale.shape)}


#: leaves that are not a Linear (2-D) or Conv2d (4-D) factor: a bias delta and the DoRA magnitude
ANY_RANK_LEAVES = ("diff_b", "dora_scale")


def check_leaves(name: str, parts: dict[str, torch.Tensor], path: Path) -> None:
    """Every leaf a non-empty floating-point tensor, every factor 2-D or 4-D, before any family reads it.

    Example:
        >>> check_leaves("m", {"lora_down.weight": torch.zeros(2, 4), "lora_up.weight": torch.zeros(4, 2)}, Path("f"))
    """
    for leaf, tensor in sorted(parts.items()):
        problem = ("is not floating point" if not tensor.is_floating_point() else
                   "has an empty dimension (rank 0?)" if tensor.numel() == 0 else
                   "is neither 2-D (Linear) nor 4-D (Conv2d)" if leaf not in ANY_RANK_LEAVES and
                   tensor.dim() not in (2, 4) else None)
        if problem:
            raise ForeignFormatError(f"{name!r}: {leaf} {str(tensor.dtype).removeprefix('torch.')} "
                                     f"{list(tensor.shape)} {problem}", path=path, hint="the file is damaged")


def _dora_axis(name: str, scale: torch.Tensor, shape: list[int], path: Path) -> str:
    """``out`` for (out, 1, …), ``in`` for (1, in, …): the axis LyCORIS kept (``wd_on_out``)."""
    dims = list(scale.shape)
    if len(dims) == len(shape) and dims[0] == shape[0] and all(d == 1 for d in dims[1:]):
        return "out"
    if len(dims) == len(shape) and dims[1] == shape[1] and all(d == 1 for i, d in enumerate(dims) if i != 1):
        return "in"
    raise ForeignFormatError(f"{name!r}: dora_scale has shape {dims}, neither (out, 1, …) nor (1, in, …) of a "
                             f"{shape} weight", path=path, hint="the file is damaged")


def _full(name, parts, base_shape, path):
    unknown = set(parts) - set(FULL_ROLES)
    if unknown or "diff" not in parts:
        raise ForeignFormatError(f"{name!r} has {sorted(parts)}: a full module is diff with an optional diff_b",
                                 path=path, hint="the file is incomplete or mixes algorithms within a module")
    diff = parts["diff"]
    shape = list(diff.shape)
    if "diff_b" in parts and list(parts["diff_b"].shape) != shape[:1]:
        raise ForeignFormatError(f"{name!r}: diff_b {list(parts['diff_b'].shape)} does not match diff {shape}",
                                 path=path, hint="the file is damaged")
    layer = {2: "linear", 4: CONV2D_LAYER}.get(diff.dim())
    if layer is None:
        raise ForeignFormatError(f"{name!r}: diff of shape {shape} is neither a Linear nor a Conv2d weight",
                                 path=path, hint="only Linear and Conv2d layers are supported")
    return "full", {}, dict(parts), shape, layer


def _linear_lycoris(name, parts, alpha, base_shape, path):
    """LoRA/LoCon (Linear, Conv2d) and Linear LoHa/LoKr, when the LyCORIS module reader is absent."""
    leaves = set(parts)
    conv_base = base_shape is not None and len(base_shape) == 4
    if leaves == set(PLAIN_ROLES):
        roles = {PLAIN_ROLES[k]: v for k, v in parts.items()}
        down, up = roles["lora_A"], roles["lora_B"]
        params = lora_params(down.shape[0], alpha or down.shape[0], False)
        if down.dim() == 4 and up.dim() == 4:
            return "lora", params, roles, [up.shape[0], *down.shape[1:]], CONV2D_LAYER
        return "lora", params, roles, [up.shape[0], down.shape[1]], "linear"
    if conv_base or any(t.dim() != 2 for t in parts.values()) or not leaves <= set(KNOWN_LEAVES) - {"lora_mid.weight"}:
        raise ForeignFormatError(f"{name!r}: {family(leaves)} on this layer ({sorted(leaves)}, base "
                                 f"{base_shape}) is not supported by this build", path=path,
                                 hint="conv and Tucker LoHa/LoKr/LoCon need the LyCORIS conv modules")
    if leaves == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        roles = {k[len("hada_"):]: v for k, v in parts.items()}
        rank = roles["w1_b"].shape[0]
        alpha = alpha or float(rank)  # LyCORIS: missing or 0 means alpha = rank
        return ("loha", {"rank": rank, "alpha": alpha, "scale": alpha / rank}, roles,
                [roles["w1_a"].shape[0], roles["w1_b"].shape[1]], "linear")
    if leaves and all(k.startswith("lokr_") for k in leaves) and _one_of(leaves, "w1") and _one_of(leaves, "w2"):
        roles = {k[len("lokr_"):]: v for k, v in parts.items()}
        low = roles.get("w1_b", roles.get("w2_b"))
        both_full = low is None
        rank = (int(alpha) if alpha and float(alpha).is_integer() and alpha >= 1 else 1) if both_full \
            else low.shape[0]
        alpha = alpha or float(rank)
        a, c = roles["w1"].shape if "w1" in roles else (roles["w1_a"].shape[0], roles["w1_b"].shape[1])
        b, d = roles["w2"].shape if "w2" in roles else (roles["w2_a"].shape[0], roles["w2_b"].shape[1])
        params = {"w1_shape": [a, c], "w2_shape": [b, d], "rank": rank, "alpha": alpha, "convention": "lycoris",
                  "scale": lokr_scale("lycoris", rank, alpha, both_full)}
        return "lokr", params, roles, [a * b, c * d], "linear"
    raise ForeignFormatError(f"{name!r} has {sorted(leaves)} ({family(leaves)} leaves): not one LoRA, LoHa, LoKr "
                             "or full module", path=path,
                             hint="the file is incomplete or mixes algorithms within a module")


def _one_of(leaves: set[str], half: str) -> bool:
    """Exactly the full matrix, or exactly both factors, of one Kronecker half."""
    full, pair = f"lokr_{half}" in leaves, {f"lokr_{half}_a", f"lokr_{half}_b"} <= leaves
    return full != pair and not (full and leaves & {f"lokr_{half}_a", f"lokr_{half}_b"})


# ---------------------------------------------------------------------------- writing
def module_state(name: str, key: str, entry, tensors: dict[str, torch.Tensor], layout: dict,
                 report) -> tuple[dict[str, torch.Tensor], float | None]:
    """(the module's keys except alpha, the alpha value to write or None) in kohya/LyCORIS layout.

    Example:
        >>> module_state("lora_unet_x", "unet.x", entry, tensors, {}, report)  # doctest: +SKIP
    """
    method = entry.method
    if method == "full":
        report.add(key, LOSSLESS)
        return {f"{name}.{leaf}": tensors[role].contiguous() for leaf, role in FULL_ROLES.items()
                if role in tensors}, None
    if method == "dora":
        return _dora_state(name, key, entry, tensors, layout, report)
    if method == "lora" and entry.layer in ("linear", CONV2D_LAYER):
        return {f"{name}.lora_down.weight": tensors["lora_A"].contiguous(),
                f"{name}.lora_up.weight": tensors["lora_B"].contiguous()}, entry.params["scale"] * entry.params["rank"]
    plugged = lycoris_modules()
    if plugged is not None:
        state = plugged.module_state(name, key, entry, tensors, report)
        alpha = state.pop(f"{name}.alpha", None)
        return {k: v.contiguous() for k, v in state.items()}, None if alpha is None else float(alpha)
    if method in ("loha", "lokr") and entry.layer == "linear":
        return _linear_lycoris_state(name, key, entry, tensors, report)
    raise UsageError(f"module {key!r} is {entry.layer} {entry.method}; kohya/LyCORIS files hold LoRA/LoCon, DoRA, "
                     "LoHa, LoKr and full modules", hint="merge it, or convert the method to LoRA first")


def _dora_state(name, key, entry, tensors, layout, report):
    params = entry.params
    if params.get("norm_eps", 0.0) != LYCORIS_DORA_EPS:
        raise UsageError(f"module {key!r}: DoRA with norm_eps {params.get('norm_eps', 0.0)!r}; kohya/LyCORIS "
                         f"dora_scale means LyCORIS's norm + {LYCORIS_DORA_EPS!r}, so the file would compute "
                         "another weight", hint="merge it, or keep the adapterfmt file (--to peft for PEFT DoRA)")
    magnitude = tensors["magnitude"]
    shape = layout.get("dora_scale") or _dora_shape(entry)
    if math.prod(shape) != magnitude.numel():
        raise UsageError(f"module {key!r}: recorded dora_scale shape {shape} does not hold {magnitude.numel()} "
                         "values", hint="the manifest source was edited; remove source.kohya_layout")
    state = {f"{name}.lora_down.weight": tensors["lora_A"].contiguous(),
             f"{name}.lora_up.weight": tensors["lora_B"].contiguous(),
             f"{name}.dora_scale": magnitude.reshape(shape).contiguous()}
    return state, params["scale"] * params["rank"]


def _dora_shape(entry) -> list[int]:
    """LyCORIS's dora_scale shape: (out, 1, …) for wd_on_out, else (1, in, …)."""
    dims = [1] * len(entry.shape)
    axis = 0 if entry.params["magnitude_axis"] == "out" else 1
    dims[axis] = entry.shape[axis]
    return dims


def _linear_lycoris_state(name, key, entry, tensors, report):
    prefix = {"loha": "hada_", "lokr": "lokr_"}[entry.method]
    params = entry.params
    state = {f"{name}.{prefix}{role}": t.contiguous() for role, t in tensors.items()}
    if entry.method == "lokr" and "w1" in tensors and "w2" in tensors:
        if params["scale"] != 1.0:
            raise UsageError(f"module {key!r}: LoKr with two full halves and scale {params['scale']!r}; LyCORIS "
                             "applies scale 1 to such modules", hint="use --to lycoris, which folds the scale")
    report.add(key, LOSSLESS)
    return state, float(params["alpha"])
