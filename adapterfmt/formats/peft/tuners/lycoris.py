"""PEFT LoHa and LoKr <-> adapterfmt ``loha`` / ``lokr`` (Linear and Conv2d layers; PEFT's scale alpha/r).

Conv2d (flattened, and ``use_effective_conv2d`` Tucker cores): see :mod:`.lycoris_conv`.
"""
from __future__ import annotations

import math
from collections import Counter

from ....errors import UsageError
from ....methods.loha import loha_params
from ....methods.lokr import lokr_scale
from ..config import PREFIX, resolve_rank_alpha
from ._common import Tuner, common_export_fields, payload_state, require
from .lokr_layout import peft_layout_factor
from .lycoris_conv import check_base, conv_shape, effective_conv2d, loha_conv, lokr_conv, peft_tensor

LYCORIS_TRAINING = frozenset({"rank_dropout", "module_dropout", "init_weights", "rank_dropout_scale",
                              "use_effective_conv2d", "decompose_both", "decompose_factor"})


def _rank_alpha(config, module):
    rank, alpha = resolve_rank_alpha({**config, "lora_alpha": config.get("alpha", 8)}, module)
    return int(rank), float(alpha)


def build_loha(config, module, parts, path, base):
    roles = {k[len("hada_"):]: v for k, v in parts.items()}
    require({"w1_a", "w1_b", "w2_a", "w2_b"} <= set(roles), f"module {module!r}: LoHa needs hada_w1_a, hada_w1_b, "
            "hada_w2_a and hada_w2_b", path)
    rank, alpha = _rank_alpha(config, module)
    if "t1" not in roles and "t2" not in roles:
        require(all(t.dim() == 2 for t in roles.values()), f"module {module!r}: LoHa tensors are not matrices", path)
        out_f, in_f = roles["w1_a"].shape[0], roles["w1_b"].shape[1]
        expected = {"w1_a": (out_f, rank), "w1_b": (rank, in_f), "w2_a": (out_f, rank), "w2_b": (rank, in_f)}
        for role, shape in expected.items():
            require(tuple(roles[role].shape) == shape, f"module {module!r}: hada_{role} has shape "
                    f"{list(roles[role].shape)}, expected {list(shape)} for rank {rank}", path)
    layer, shape = loha_conv(module, roles, rank, conv_shape(base, module), path)
    check_base(module, layer, shape, base, path)
    return loha_params(rank, alpha), roles, layer, False, tuple(shape)


def build_lokr(config, module, parts, path, base):
    roles = {k[len("lokr_"):]: v for k, v in parts.items()}
    for which in ("w1", "w2"):
        full, pair = which in roles, {f"{which}_a", f"{which}_b"} <= set(roles)
        require(full != pair, f"module {module!r}: needs lokr_{which} or both lokr_{which}_a and _b", path)
    rank, alpha = _rank_alpha(config, module)
    tucker = "t2" in roles
    for key, axis in (("w1_a", 1), ("w2_a", 0 if tucker else 1)):  # a Tucker w2_a is (r, b)
        if key in roles:
            require(roles[key].shape[axis] == rank, f"module {module!r}: lokr_{key} has rank "
                    f"{roles[key].shape[axis]}, the config resolves to {rank}", path)
    a, c = roles["w1"].shape if "w1" in roles else (roles["w1_a"].shape[0], roles["w1_b"].shape[1])
    kernel, b, d = lokr_conv(module, roles, conv_shape(base, module), c, path)
    require(kernel is not None or all(t.dim() == 2 for t in roles.values()),
            f"module {module!r}: LoKr tensors are not matrices", path)
    both_full = "w1" in roles and "w2" in roles
    params = {"w1_shape": [a, c], "w2_shape": [b, d], "rank": rank, "alpha": alpha, "convention": "peft",
              "scale": lokr_scale("peft", rank, alpha, both_full)}
    if kernel is None:
        return params, roles, "linear", False, (a * b, c * d)
    check_base(module, "conv2d", (a * b, c * d, *kernel), base, path)
    return params, roles, "conv2d", False, (a * b, c * d, *kernel)


def _common_numbers(entries, key):
    values = Counter(e.params[key] for e in entries.values())
    return values.most_common(1)[0][0]


def _patterns(entries, key, default):
    return {t: _plain(e.params[key]) for t, e in entries.items() if e.params[key] != default}


def _plain(value):
    return int(value) if float(value).is_integer() else float(value)


def export_loha(adapter, report):
    entries = adapter.manifest.modules
    r, alpha = _common_numbers(entries, "rank"), _common_numbers(entries, "alpha")
    config = {"peft_type": "LOHA", **common_export_fields(adapter), "r": r, "alpha": _plain(alpha),
              "rank_pattern": _patterns(entries, "rank", r), "alpha_pattern": _patterns(entries, "alpha", alpha),
              "use_effective_conv2d": effective_conv2d(entries, "t1"), "init_weights": True, "rank_dropout": 0.0,
              "module_dropout": 0.0}
    state = payload_state(adapter)
    for target, entry in entries.items():
        _check_pattern(config, target, entry)
        tucker = "t1" in entry.tensors
        for role, tensor in adapter.module_tensors(target).items():
            state[f"{PREFIX}{target}.hada_{role}"] = peft_tensor(role, tensor, entry, tucker)
        report.add(target, "lossless")
    return config, state


def _check_pattern(config, target, entry):
    rank, alpha = _rank_alpha(config, target)
    if rank != entry.params["rank"] or not math.isclose(alpha, entry.params["alpha"], rel_tol=1e-12):
        raise UsageError(f"module {target!r}: PEFT's pattern matching would give rank {rank}, alpha {alpha}",
                         hint="the module names collide under PEFT's suffix matching; export fewer modules")


def export_lokr(adapter, report):
    entries = adapter.manifest.modules
    conventions = {e.params["convention"] for e in entries.values()}
    r, alpha = _common_numbers(entries, "rank"), _common_numbers(entries, "alpha")
    factor, decompose_both = peft_layout_factor(entries)
    config = {"peft_type": "LOKR", **common_export_fields(adapter), "r": r, "alpha": _plain(alpha),
              "rank_pattern": _patterns(entries, "rank", r), "alpha_pattern": _patterns(entries, "alpha", alpha),
              "decompose_both": decompose_both, "decompose_factor": factor,
              "use_effective_conv2d": effective_conv2d(entries, "t2"),
              "init_weights": True, "rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False}
    state = payload_state(adapter)
    for target, entry in entries.items():
        _check_pattern(config, target, entry)
        tensors = adapter.module_tensors(target)
        both_full = "w1" in tensors and "w2" in tensors
        if entry.params["convention"] != "peft" and both_full:
            # LyCORIS applied 1; PEFT will apply alpha/r: fold the ratio into w2 (scaled copy).
            ratio = entry.params["scale"] / lokr_scale("peft", entry.params["rank"], entry.params["alpha"], True)
            tensors = {**tensors, "w2": tensors["w2"] * ratio}
            report.add(target, "scale_folded", f"LyCORIS scale 1 folded into w2 (x{ratio:g})")
        else:
            report.add(target, "lossless")
        for role, tensor in tensors.items():
            state[f"{PREFIX}{target}.lokr_{role}"] = peft_tensor(role, tensor, entry, "t2" in tensors)
    if conventions - {"peft"}:
        report.notes.append("LoKr scale convention changed from LyCORIS to PEFT")
    return config, state


LOHA_TUNER = Tuner(peft_type="LOHA", method="loha",
                   leaves={f"hada_{k}": k for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
                   handled=frozenset({"r", "alpha", "rank_pattern", "alpha_pattern"}),
                   training_only=LYCORIS_TRAINING, build=build_loha, export=export_loha)
LOKR_TUNER = Tuner(peft_type="LOKR", method="lokr",
                   leaves={f"lokr_{k}": k for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
                   handled=frozenset({"r", "alpha", "rank_pattern", "alpha_pattern"}),
                   training_only=LYCORIS_TRAINING, build=build_lokr, export=export_lokr)
