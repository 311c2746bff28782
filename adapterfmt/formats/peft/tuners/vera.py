"""PEFT VeRA <-> adapterfmt ``vera``.

PEFT saves per module ``vera_lambda_d`` (r,) and ``vera_lambda_b`` (out,), and, with ``save_projection``
(the default), the shared ``base_model.vera_A`` (r, max_in) and ``base_model.vera_B`` (max_out, r).
The shared pair is checked bit for bit against the seeded generator; only a pair that no generator
variant reproduces is kept (as per-module slices).
"""
from __future__ import annotations

from functools import partial

import torch

from ....errors import UsageError
from ....methods.torch_cpu_rng_peft import vera_variant
from ....methods.vera import shared_projections, vera_params
from ._common import Tuner, base_shape, common_export_fields, payload_state, require
from ..shared import one_fan_in_fan_out

#: State-dict keys of the shared projections (outside ``base_model.model.``).
SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")
#: The variant assumed when PEFT did not save the projections: what torch computes on x86-64 with AVX2.
DEFAULT_VARIANT = "fused"


def split_shared(config, state, path, base, report):
    """Take the shared projections out of ``state``; return (state, per-module build function)."""
    shared = {k: state[k] for k in SHARED_KEYS if k in state}
    state = {k: v for k, v in state.items() if k not in SHARED_KEYS}
    require(len(shared) in (0, 2), "only one of base_model.vera_A / vera_B is saved", path,
            hint="the adapter file is damaged; save it again with PEFT")
    seed, rank = int(config.get("projection_prng_key", 0)), int(config["r"])
    fan = bool(config.get("fan_in_fan_out", False))
    if shared:
        proj_a, proj_b = (shared[k].float() for k in SHARED_KEYS)
        require(proj_a.dim() == 2 and proj_b.dim() == 2 and proj_a.shape[0] == rank == proj_b.shape[1],
                f"vera_A {list(proj_a.shape)} / vera_B {list(proj_b.shape)} do not have rank r={rank}", path)
        max_in, max_out = proj_a.shape[1], proj_b.shape[0]
        variant = vera_variant(seed, proj_a.numpy(), proj_b.numpy())
        if variant is None:
            report.notes.append("the saved vera_A/vera_B match no variant of the seeded generator (bf16-trained "
                                "adapter or another torch); kept as per-module proj_A/proj_B")
        else:
            report.notes.append(f"vera_A/vera_B regenerate bit for bit from seed {seed} ({variant}); not stored")
        kept = None if variant is not None else (proj_a, proj_b)
        variant = variant or DEFAULT_VARIANT
    else:
        modules = {k[len("base_model.model."):].rsplit(".", 1)[0] for k in state if k.endswith(".vera_lambda_b")}
        shapes = [base_shape(base, m, fan, "VeRA", path) for m in sorted(modules)]
        max_out, max_in = max(s[0] for s in shapes), max(s[1] for s in shapes)
        variant, kept = DEFAULT_VARIANT, None
        report.notes.append(f"save_projection=false: projections regenerated ({variant} uniform_ variant)")
    params = vera_params(rank, seed, variant, max_in, max_out)
    return state, partial(build, params=params, kept=kept)


def build(config, module, parts, path, base, *, params, kept):
    lambda_d, lambda_b = parts["vera_lambda_d"], parts["vera_lambda_b"]
    fan = bool(config.get("fan_in_fan_out", False))
    out_f, in_f = base_shape(base, module, fan, "VeRA", path)
    require(lambda_d.shape == (params["rank"],) and lambda_b.shape == (out_f,),
            f"module {module!r}: vera_lambda_d {list(lambda_d.shape)} / vera_lambda_b {list(lambda_b.shape)} do "
            f"not fit r={params['rank']} and the base's out_features {out_f}", path,
            hint="pass the base this adapter belongs to")
    require(in_f <= params["max_in"] and out_f <= params["max_out"], f"module {module!r} ({out_f}×{in_f}) is "
            f"larger than the shared projections ({params['max_out']}×{params['max_in']})", path)
    roles = {"lambda_d": lambda_d, "lambda_b": lambda_b}
    if kept is not None:
        roles["proj_A"] = kept[0][:, :in_f].clone()
        roles["proj_B"] = kept[1][:out_f, :].clone()
    return params, roles, "conv1d" if fan else "linear", fan, (out_f, in_f)


def shared_for_export(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """The model-wide (vera_A, vera_B): regenerated, or rebuilt from the widest/tallest stored slices."""
    entries = adapter.manifest.modules
    keys = {tuple(sorted((k, v) for k, v in e.params.items())) for e in entries.values()}
    if len(keys) > 1:
        raise UsageError("PEFT VeRA shares one projection pair, but the modules disagree on seed/rank/max dims",
                         hint="export the groups as separate adapters")
    p = next(iter(entries.values())).params
    stored = {t: adapter.module_tensors(t) for t, e in entries.items() if "proj_A" in e.tensors}
    if not stored:
        return shared_projections(int(p["seed"]), p["rank"], p["max_in"], p["max_out"], p["float_affine"])
    if len(stored) != len(entries):
        raise UsageError("some VeRA modules store their projections and some do not",
                         hint="the adapter mixes sources; export the groups separately")
    widest = [t for t in stored if entries[t].shape[1] == p["max_in"]]
    tallest = [t for t in stored if entries[t].shape[0] == p["max_out"]]
    if not widest or not tallest:
        raise UsageError("the stored VeRA projection slices do not cover max_in/max_out",
                         hint="keep the adapterfmt file, or merge it")
    full_a, full_b = stored[widest[0]]["proj_A"].float(), stored[tallest[0]]["proj_B"].float()
    for target, tensors in stored.items():
        out_f, in_f = entries[target].shape
        if not (torch.equal(tensors["proj_A"].float(), full_a[:, :in_f])
                and torch.equal(tensors["proj_B"].float(), full_b[:out_f, :])):
            raise UsageError(f"module {target!r}: its stored projections are not slices of one shared pair, "
                             "which PEFT VeRA requires", hint="keep the adapterfmt file, or merge it")
    return full_a, full_b


def export(adapter, report):
    entries = adapter.manifest.modules
    fan = one_fan_in_fan_out(list(entries.values()))
    proj_a, proj_b = shared_for_export(adapter)
    p = next(iter(entries.values())).params
    config = {"peft_type": "VERA", **common_export_fields(adapter), "fan_in_fan_out": fan, "r": p["rank"],
              "projection_prng_key": int(p["seed"]), "save_projection": True, "vera_dropout": 0.0,
              "d_initial": 0.1, "init_weights": True, "bias": "none"}
    state = payload_state(adapter)
    state["base_model.vera_A"] = proj_a.contiguous()
    state["base_model.vera_B"] = proj_b.contiguous()
    for target in entries:
        tensors = adapter.module_tensors(target)
        state[f"base_model.model.{target}.vera_lambda_d"] = tensors["lambda_d"]
        state[f"base_model.model.{target}.vera_lambda_b"] = tensors["lambda_b"]
        report.add(target, "lossless")
    return config, state


VERA_TUNER = Tuner(peft_type="VERA", method="vera", leaves={"vera_lambda_d": "lambda_d", "vera_lambda_b": "lambda_b"},
                   handled=frozenset({"r", "projection_prng_key", "save_projection", "fan_in_fan_out"}),
                   training_only=frozenset({"vera_dropout", "d_initial", "init_weights"}),
                   neutral={"bias": ("none",)}, build=build, export=export, shared=split_shared)
