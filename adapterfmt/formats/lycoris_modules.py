"""One LyCORIS module <-> one adapterfmt module: LoCon (plain and Tucker), LoHa and LoKr, Linear and Conv2d.

LyCORIS 4.1.3 stores (``<name>.`` prefix omitted):

| algo | Linear | Conv2d, flattened | Conv2d, Tucker (``use_tucker``, kernel > 1×1) |
|---|---|---|---|
| LoCon | ``lora_down.weight`` (r, in), ``lora_up.weight`` (out, r) | down (r, in, kh, kw), up (out, r, 1, 1) | down (r, in, 1, 1), ``lora_mid.weight`` (r, r, kh, kw), up (out, r, 1, 1) |
| LoHa | ``hada_w{1,2}_a`` (out, r), ``hada_w{1,2}_b`` (r, in) | ``hada_w{1,2}_b`` (r, in·kh·kw) | ``hada_t{1,2}`` (r, r, kh, kw), ``hada_w{1,2}_a`` (r, out), ``hada_w{1,2}_b`` (r, in) |
| LoKr | ``lokr_w1`` (a, c) or ``lokr_w1_a``/``_b``; ``lokr_w2`` (b, d) or ``lokr_w2_a`` (b, r)/``_b`` (r, d) | ``lokr_w2`` (b, d, kh, kw) or ``lokr_w2_b`` (r, d·kh·kw) | ``lokr_t2`` (r, r, kh, kw), ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d) |

A flattened conv factor does not say its kernel: the reader takes it from the base weight's shape (or, for
files adapterfmt wrote, from the ``adapterfmt.conv_shapes`` header) and stores the factor with its kernel
axes (spec/methods-tuners.md §6); the writer flattens it back, so a LyCORIS file round-trips bit for bit.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..conversion_report import EXACT_MATH, LOSSLESS, SCALE_FOLDED
from ..errors import ForeignFormatError, UsageError
from ..methods.descriptor import CONV2D_LAYER
from ..methods.lokr import lokr_scale
from ..methods.lora import lora_params
from .kohya import alpha_tensor

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOHA_CORES = ("hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOKR_CORES = ("lokr_t2",)
PLAIN = ("lora_down.weight", "lora_up.weight")
PLAIN_CORE = ("lora_mid.weight",)
LEAVES = LOHA + LOHA_CORES + LOKR + LOKR_CORES + PLAIN + PLAIN_CORE
#: Roles of the lora and lora_tucker methods by LyCORIS leaf.
PLAIN_ROLES = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B", "lora_mid.weight": "lora_mid"}


def read_module(name: str, parts: dict[str, torch.Tensor], alpha: float | None, base_shape: list[int] | None,
                path: Path) -> tuple[str, dict, dict[str, torch.Tensor], list[int], str]:
    """(method, params, tensors by role, canonical shape, layer) of one LyCORIS module.

    ``base_shape``: the base weight's shape when known (needed for flattened conv factors).

    Example:
        >>> read_module("lycoris_fc", {"lora_down.weight": a, "lora_up.weight": b}, 4.0, None, p)  # doctest: +SKIP
    """
    leaves = set(parts)
    conv = base_shape if base_shape is not None and len(base_shape) == 4 else None
    if leaves <= set(PLAIN + PLAIN_CORE) and set(PLAIN) <= leaves:
        return _plain(name, parts, alpha, path)
    if leaves <= set(LOHA + LOHA_CORES) and set(LOHA) <= leaves and _cores_complete(leaves, LOHA_CORES):
        return _loha(name, parts, alpha, conv, path)
    if leaves <= set(LOKR + LOKR_CORES) and _one_of(leaves, "w1") and _one_of(leaves, "w2") and \
            not ({"lokr_t2", "lokr_w2"} <= leaves):
        return _lokr(name, parts, alpha, conv, path)
    raise ForeignFormatError(f"{name!r} has {sorted(leaves)}: not one LoHa, LoKr or LoRA module", path=path,
                             hint="the file is incomplete or mixes algorithms within a module")


def _cores_complete(leaves: set[str], cores: tuple[str, ...]) -> bool:
    return not (leaves & set(cores)) or set(cores) <= leaves


def _one_of(leaves: set[str], half: str) -> bool:
    """Exactly the full matrix, or exactly both factors, of one Kronecker half."""
    full, pair = f"lokr_{half}" in leaves, {f"lokr_{half}_a", f"lokr_{half}_b"} <= leaves
    return full != pair and not (full and leaves & {f"lokr_{half}_a", f"lokr_{half}_b"})


def _plain(name, parts, alpha, path):
    roles = {PLAIN_ROLES[k]: v for k, v in parts.items()}
    down, up = roles["lora_A"], roles["lora_B"]
    # Linear: every leaf 2-D; Conv2d: every leaf 4-D (a Tucker lora_mid only there). Anything else has no layer.
    dims = {t.dim() for t in roles.values()}
    if dims not in ({2}, {4}) or ("lora_mid" in roles and dims != {4}):
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(parts.items()))
        raise ForeignFormatError(f"{name!r}: {shapes} are neither a Linear (all 2-D) nor a Conv2d (all 4-D, "
                                 "lora_mid only there) LoCon module", path=path, hint="the file is damaged")
    rank = down.shape[0]
    params = lora_params(rank, alpha or rank, False)
    if "lora_mid" in roles:
        return "lora_tucker", params, roles, [up.shape[0], down.shape[1], *roles["lora_mid"].shape[2:]], CONV2D_LAYER
    if down.dim() == 4:
        return "lora", params, roles, [up.shape[0], *down.shape[1:]], CONV2D_LAYER
    return "lora", params, roles, [up.shape[0], down.shape[1]], "linear"


def _loha(name, parts, alpha, conv, path):
    roles = {k[len("hada_"):]: v for k, v in parts.items()}
    rank = roles["w1_b"].shape[0]
    alpha = alpha or float(rank)  # LyCORIS: missing or 0 means alpha = rank
    params = {"rank": rank, "alpha": alpha, "scale": alpha / rank}
    if "t1" in roles:
        shape = [roles["w1_a"].shape[1], roles["w1_b"].shape[1], *roles["t1"].shape[2:]]
        return "loha", params, roles, shape, CONV2D_LAYER
    out_f, flat_in = roles["w1_a"].shape[0], roles["w1_b"].shape[1]
    if conv is None:
        return "loha", params, roles, [out_f, flat_in], "linear"
    for key in ("w1_b", "w2_b"):
        roles[key] = _with_kernel(name, key, roles[key], conv[1:], path)
    return "loha", params, roles, [out_f, *conv[1:]], CONV2D_LAYER


def _with_kernel(name: str, key: str, tensor: torch.Tensor, axes: list[int], path: Path) -> torch.Tensor:
    """A flattened conv factor (r, n·kh·kw) as (r, n, kh, kw); ``axes`` = [n, kh, kw] from the base."""
    if tensor.dim() != 2 or tensor.shape[1] != math.prod(axes):
        raise ForeignFormatError(f"{name!r}: {key} has shape {list(tensor.shape)}, which does not flatten a "
                                 f"{axes} kernel of the base", path=path,
                                 hint="pass the base model the adapter was trained on with --base")
    return tensor.reshape(tensor.shape[0], *axes)


def _lokr(name, parts, alpha, conv, path):
    roles = {k[len("lokr_"):]: v for k, v in parts.items()}
    tucker = "t2" in roles
    low = roles.get("w1_b", roles.get("w2_b"))
    both_full = low is None
    # Two full halves: LyCORIS saves alpha = lora_dim and applies scale 1; keep that dim as the rank.
    rank = (int(alpha) if alpha and float(alpha).is_integer() and alpha >= 1 else 1) if both_full \
        else low.shape[0]
    alpha = alpha or float(rank)
    (a, c) = roles["w1"].shape if "w1" in roles else (roles["w1_a"].shape[0], roles["w1_b"].shape[1])
    if "w2" in roles:
        b, d = roles["w2"].shape[:2]
    elif tucker:
        b, d = roles["w2_a"].shape[1], roles["w2_b"].shape[1]
    else:
        b, d = roles["w2_a"].shape[0], roles["w2_b"].shape[1]
    kernel = _lokr_kernel(roles, conv)
    if kernel is not None and "w2_b" in roles and not tucker:  # flattened: d is the flat size
        d = d // math.prod(kernel)
        roles["w2_b"] = _with_kernel(name, "w2_b", roles["w2_b"], [d, *kernel], path)
    params = {"w1_shape": [a, c], "w2_shape": [b, d], "rank": rank, "alpha": alpha, "convention": "lycoris",
              "scale": lokr_scale("lycoris", rank, alpha, both_full)}
    if kernel is None:
        return "lokr", params, roles, [a * b, c * d], "linear"
    return "lokr", params, roles, [a * b, c * d, *kernel], CONV2D_LAYER


def _lokr_kernel(roles, conv) -> list[int] | None:
    """(kh, kw) of a conv LoKr: from the core, the full 4-D w2, or the base; None for a Linear module."""
    if "t2" in roles:
        return list(roles["t2"].shape[2:])
    if "w2" in roles and roles["w2"].dim() == 4:
        return list(roles["w2"].shape[2:])
    return list(conv[2:]) if conv is not None and "w2" not in roles else None


# ---------------------------------------------------------------------------- writing
def module_state(name: str, target: str, entry, tensors: dict[str, torch.Tensor], report) -> dict[str, torch.Tensor]:
    """The LyCORIS keys of one module (``name``: its LyCORIS name); the status goes into ``report``.

    Example:
        >>> module_state("lycoris_fc", "fc", entry, tensors, report)  # doctest: +SKIP
    """
    writer = WRITERS.get(entry.method)
    if writer is None:
        raise UsageError(f"module {target!r} is {entry.method}; the LyCORIS writer holds LoRA, LoCon (Tucker), "
                         "LoHa and LoKr", hint="convert it with --method lora first")
    return writer(name, target, entry, tensors, report)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def _alpha_for(target, params, report, extra_ok: bool = True) -> torch.Tensor:
    """The 0-d alpha giving the stored scale at the rank; LOSSLESS when exact (and ``extra_ok``)."""
    rank, scale = int(params["rank"]), float(params["scale"])
    alpha = alpha_tensor(scale * rank)
    exact = float(alpha) / rank == scale
    report.add(target, LOSSLESS if exact and extra_ok else EXACT_MATH,
               "" if exact else f"scale {scale!r} -> {float(alpha) / rank!r}")
    return alpha


def _write_lora(name, target, entry, tensors, report):
    state = {f"{name}.{leaf}": tensors[role] for leaf, role in PLAIN_ROLES.items() if role in tensors}
    state[f"{name}.alpha"] = _alpha_for(target, entry.params, report, not entry.params["use_rslora"])
    return state


def _write_loha(name, target, entry, tensors, report):
    tucker = "t1" in tensors
    state = {f"{name}.hada_{role}": (t if tucker else _flat(t)) for role, t in tensors.items()}
    state[f"{name}.alpha"] = _alpha_for(target, entry.params, report)
    return state


def _write_lokr(name, target, entry, tensors, report):
    params = entry.params
    tucker = "t2" in tensors
    state = {f"{name}.lokr_{role}": (_flat(t) if role == "w2_b" and not tucker else t) for role, t in tensors.items()}
    if "w1" in tensors and "w2" in tensors:
        # LyCORIS applies scale 1 to two full halves: fold our scale into w2.
        state[f"{name}.alpha"] = alpha_tensor(float(params["rank"]))
        if params["scale"] != 1.0:
            state[f"{name}.lokr_w2"] = tensors["w2"].float() * params["scale"]
            report.add(target, SCALE_FOLDED, f"scale {params['scale']:g} folded into w2 (LyCORIS applies 1)")
            return state
        report.add(target, LOSSLESS)
        return state
    state[f"{name}.alpha"] = alpha_tensor(params["scale"] * params["rank"])
    report.add(target, LOSSLESS)
    return state


WRITERS = {"lora": _write_lora, "lora_tucker": _write_lora, "loha": _write_loha, "lokr": _write_lokr}
