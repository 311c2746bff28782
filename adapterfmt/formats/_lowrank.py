"""Shared helpers of the low-rank foreign formats (GGUF, kohya, MLX-LM).

Not a format itself (the leading underscore keeps it out of the self-registration scan).
"""
from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from typing import Any, Callable

import torch

from ..errors import LossyConversionError, UsageError
from ..format import Adapter, BaseWeight, Manifest, ModuleEntry, TensorRef
from ..format.dtypes import dtype_name
from ..format.fingerprint import tensor_fingerprint
from ..conversion_report import EXACT_MATH, LOSSLESS, LOSSY, SCALE_FOLDED, ConversionReport

#: Base-config fields a converter may need later (head counts for RoPE permutation, layer count).
BASE_CONFIG_KEYS = ("architectures", "model_type", "num_attention_heads", "num_key_value_heads", "num_kv_heads",
                    "num_hidden_layers", "n_layer", "hidden_size", "head_dim", "tie_word_embeddings", "vocab_size")


def base_config_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of a transformers ``config.json`` worth keeping in ``manifest.source``.

    Example:
        >>> base_config_summary({"num_attention_heads": 4, "rope_theta": 1e4})
        {'num_attention_heads': 4}
    """
    return {k: config[k] for k in BASE_CONFIG_KEYS if config.get(k) is not None}


def known_base_config(adapter: Adapter | None, base: Any = None) -> dict[str, Any]:
    """The base config from ``base`` (a BaseCheckpoint), else the one recorded in the manifest source."""
    if base is not None and getattr(base, "config", None):
        return base_config_summary(base.config)
    if adapter is not None:
        return dict(adapter.manifest.source.get("base_config") or {})
    return {}


def lora_params_exact(rank: int, scale: float, alpha: float | None = None) -> dict[str, Any]:
    """LoRA params keeping a foreign format's *scale* bit-exact (alpha = scale·rank when not given).

    Example:
        >>> lora_params_exact(4, 2.0)
        {'rank': 4, 'alpha': 8.0, 'use_rslora': False, 'scale': 2.0}
    """
    alpha = scale * rank if alpha is None else alpha
    return {"rank": int(rank), "alpha": float(alpha), "use_rslora": False, "scale": float(scale)}


def add_lowrank_module(manifest: Manifest, tensors: dict[str, torch.Tensor], target: str, a: torch.Tensor,
                       b: torch.Tensor, params: dict[str, Any], *, layer: str = "linear",
                       magnitude: torch.Tensor | None = None) -> ModuleEntry:
    """Add a canonical LoRA/DoRA module: A (r, in), B (out, r); embeddings are stored transposed."""
    method = "dora" if magnitude is not None else "lora"
    if magnitude is not None:
        params = dict(params, magnitude_axis="out")
    roles = {"lora_A": a, "lora_B": b} | ({"magnitude": magnitude} if magnitude is not None else {})
    refs = {}
    for role, tensor in roles.items():
        name = f"{target}.{role}"
        tensors[name] = tensor.contiguous()
        refs[role] = TensorRef(name, dtype_name(tensor.dtype), list(tensor.shape))
    out_f, in_f = b.shape[0], a.shape[1]
    transposed = layer != "linear"
    entry = ModuleEntry(method=method, base_weight=f"{target}.weight", shape=[out_f, in_f], params=params,
                        tensors=refs, fan_in_fan_out=transposed, layer=layer)
    manifest.modules[target] = entry
    manifest.base.weights[entry.base_weight] = BaseWeight(shape=[in_f, out_f] if transposed else [out_f, in_f])
    return entry


def most_common(values: list[Any]) -> Any:
    """The most frequent value (ties: first seen), used to pick a format's one global setting."""
    return Counter(values).most_common(1)[0][0]


#: ``--dtype`` names for the factors a writer stores; ``keep`` (None) keeps each tensor's own dtype.
STORE_DTYPES: dict[str, torch.dtype | None] = {
    "keep": None, "f32": torch.float32, "fp32": torch.float32, "float32": torch.float32,
    "f16": torch.float16, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def store_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype for a writer's ``dtype`` option (``None`` = keep each tensor's own).

    Example:
        >>> store_dtype("f32")
        torch.float32
    """
    if name is None:
        return None
    try:
        return STORE_DTYPES[str(name).lower()]
    except KeyError:
        raise UsageError(f"unknown --dtype {name!r}", hint="use one of f32, f16, bf16, keep") from None


def fold_to_global(adapter: Adapter, report: ConversionReport, global_scale: Callable[[ModuleEntry], float],
                   note: Callable[[ModuleEntry], str] = lambda e: "", *,
                   dtype: torch.dtype | None | Callable[[ModuleEntry], torch.dtype | None] = None,
                   strict: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fit each module to a format with one global scale rule; returns ``{target: (A, B)}``.

    ``global_scale(entry)`` is the scale the target format will apply to that module. A module
    whose own scale differs has the ratio folded into B (see :func:`fold_scale`): stored in B's own
    dtype when that is exact (e.g. a power-of-two ratio), else in fp32 (``exact`` when fp32 holds the
    product exactly, else ``scale_folded`` after one rounding, with the measured ΔW error). ``dtype``
    (or a function of the entry giving it) forces the stored dtype of A and B; a rounding cast is
    ``lossy``. With ``strict`` any fold or cast that is not exact raises
    :class:`LossyConversionError` before anything is written.

    Example:
        >>> factors = fold_to_global(adapter, report, lambda e: 2.0, strict=True)  # doctest: +SKIP
    """
    out = {}
    dtype_of = dtype if callable(dtype) else (lambda e: dtype)
    for target, entry in adapter.manifest.modules.items():
        tensors = adapter.module_tensors(target)
        a, b = tensors["lora_A"], tensors["lora_B"]
        own, given, dtype = float(entry.params["scale"]), float(global_scale(entry)), dtype_of(entry)
        if given == 0.0 and own != 0.0:
            raise UsageError(f"module {target!r}: cannot fold scale {own} into a global scale of 0")
        new_a, a_exact = cast_exactly(a, dtype)
        if own == given or math.isclose(own, given, rel_tol=1e-6):
            new_b, b_exact = cast_exactly(b, dtype)
            folded = ""
        else:
            new_b, b_exact = fold_scale(b, own, given, dtype)
            folded = f"scale {own:.6g} folded into B (global {given:.6g}, stored {dtype_name(new_b.dtype)}" + \
                     (", exact)" if b_exact else ")")
        status, why = _fold_status(own, given, folded, (a, new_a, a_exact), (b, new_b, b_exact))
        reference, result = _delta(a, b, own), _delta(new_a, new_b, given)
        if strict and status in (SCALE_FOLDED, LOSSY):
            error = float(torch.linalg.norm(result - reference) / max(float(torch.linalg.norm(reference)), 1e-300))
            raise LossyConversionError(f"module {target!r}: {why} (relative ΔW error {error:.2g}) and --strict was "
                                       "given; nothing was written",
                                       hint="drop --strict to accept the measured error, or keep per-module scales "
                                            "(export to peft or adapterfmt)")
        report.add(target, status, _join(note(entry), why), reference=reference, result=result)
        out[target] = (new_a, new_b)
    return out


def _fold_status(own: float, given: float, folded: str, *pairs) -> tuple[str, str]:
    """The report status of one module from its (old, new, exact) A and B, and why."""
    inexact = [new for _, new, exact in pairs if not exact]
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in inexact) or (inexact and not folded):
        return LOSSY, _join(folded, f"rounded to {', '.join(sorted({dtype_name(t.dtype) for t in inexact}))}")
    if inexact:
        return SCALE_FOLDED, folded
    if folded:
        return EXACT_MATH, folded
    if any(old.dtype != new.dtype for old, new, _ in pairs):
        return EXACT_MATH, f"stored as {dtype_name(pairs[-1][1].dtype)} (exact)"
    if own != given:
        return EXACT_MATH, f"scale {own!r} stored as {given!r} (fp32 rounding)"
    return LOSSLESS, ""


def cast_exactly(tensor: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, bool]:
    """``tensor`` cast to ``dtype`` (None: unchanged) and whether every value survived exactly.

    Example:
        >>> cast_exactly(torch.tensor([0.1]), torch.bfloat16)[1]
        False
    """
    if dtype is None or dtype == tensor.dtype:
        return tensor, True
    cast = tensor.to(dtype)
    return cast, bool(torch.equal(cast.double(), tensor.double()))


#: Significant bits of each float dtype (the implicit bit included).
MANTISSA_BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def fold_scale(b: torch.Tensor, own: float, given: float,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, bool]:
    """``b * own / given`` computed in fp64 and stored once; returns the tensor and whether it is exact.

    Exact means equal in real arithmetic: the ratio is exact in fp64, the fp64 product cannot round
    (the significant bits of B's dtype and of the ratio fit in 53), and the stored values equal it.
    Without ``dtype`` the result keeps B's dtype when that is exact (e.g. a power-of-two ratio),
    else fp32 (fp64 stays fp64): folding into a half dtype would round every element by up to
    2^-9 (bf16) relative.

    Example:
        >>> fold_scale(torch.tensor([3.0], dtype=torch.bfloat16), 1.0, 2.0)
        (tensor([1.5000], dtype=torch.bfloat16), True)
    """
    ratio = own / given
    product = b.double() * ratio
    exact_product = Fraction(own) / Fraction(given) == Fraction(ratio) and \
        _significant_bits(ratio) + MANTISSA_BITS.get(b.dtype, 53) <= 53
    wide = torch.float64 if b.dtype == torch.float64 else torch.float32
    candidates = [dtype] if dtype is not None else [b.dtype, wide]
    for candidate in candidates:
        stored = product.to(candidate)
        if exact_product and torch.equal(stored.double(), product):
            return stored, True
    return product.to(candidates[-1]), False


def _significant_bits(value: float) -> int:
    """Bits between the leading and the last set bit of a float's mantissa (0 for 0)."""
    mantissa = int(abs(math.frexp(value)[0]) * 2 ** 53)
    return (mantissa >> ((mantissa & -mantissa).bit_length() - 1)).bit_length() if mantissa else 0


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return (b.double() @ a.double()) * scale


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def require_linear(adapter: Adapter, fmt: str, report: ConversionReport, base: Any = None,
                   allowed: tuple[str, ...] = ("linear",), payloads: bool = True) -> None:
    """Refuse modules whose layer kind the format cannot express, and payloads it cannot hold.

    ``full_weight`` payloads (PEFT's saved copy of a targeted base embedding) are dropped with a
    note, as llama.cpp's converter does, unless ``base`` (or else the fingerprint the manifest recorded)
    shows they differ from the base weight; with neither, the copy cannot be checked and is refused.
    """
    for target, entry in adapter.manifest.modules.items():
        if entry.layer not in allowed:
            raise UsageError(f"module {target!r} is {'an' if entry.layer[0] in 'aeiou' else 'a'} {entry.layer} layer, which {fmt} cannot hold",
                             hint=f"{fmt} supports {', '.join(allowed)} targets; drop that module first")
    if payloads:
        drop_base_copies(adapter, fmt, report, base)


def drop_base_copies(adapter: Adapter, fmt: str, report: ConversionReport, base: Any = None) -> None:
    """Refuse payloads ``fmt`` cannot hold; drop the ``full_weight`` copies shown equal to the base.

    Example:
        >>> drop_base_copies(adapter, "GGUF", report, base)  # doctest: +SKIP
    """
    for payload in adapter.manifest.payloads.values():
        tensor = adapter.tensors[payload.tensor.name]
        recorded = adapter.manifest.base.weights.get(payload.target)
        if payload.kind != "full_weight":
            same = False
        elif base is not None:
            same = payload.target in base and torch.equal(base.get(payload.target), tensor)
        elif recorded is not None and recorded.fingerprint:
            same = recorded.fingerprint == tensor_fingerprint(tensor)
        else:
            # Nothing to compare with. PEFT saves the copy when the vocabulary was resized, so it may
            # differ from the base the consumer loads: dropping it unchecked could be silently wrong.
            raise UsageError(f"{fmt} has no place for payload {payload.target!r} (a saved full weight) and there is "
                             "nothing to check it against", hint="pass --base so the copy can be checked against the "
                             "base weight (it is dropped when equal), or export to peft or adapterfmt to keep it")
        if same is False:
            raise UsageError(f"{fmt} has no place for payload {payload.target!r} ({payload.kind})",
                             hint="export to peft or adapterfmt to keep modules_to_save / changed full weights")
        report.notes.append(f"dropped payload {payload.target} (checked: a copy of the base weight)")
