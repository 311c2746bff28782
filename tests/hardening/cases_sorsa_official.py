"""Corpus rows for the official SORSA checkpoint reader (config, original base, residual check)."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from .corpus import Case, Env

CKPT = r"sorsa"
Q0 = "model.model.layers.0.self_attn.q_proj"


def write_sorsa(base, out, *, rank=4, alpha=8.0):
    """A SORSA checkpoint as the official trainer lays it out (``model.`` wrapper prefix), q_proj only."""
    state = load_file(str(base / "model.safetensors"))
    scale = alpha / rank
    ckpt = {}
    for name, w in state.items():
        key = f"model.{name}"
        if ".q_proj." not in name:
            ckpt[key] = w
            continue
        u, s, vt = torch.linalg.svd(w.float().T, full_matrices=False)
        a0, s0, b0 = u[:, :rank].T.contiguous(), s[:rank].clone(), vt[:rank].T.contiguous()
        prefix = key[: -len(".weight")]
        ckpt.update({key: w.float() - ((b0 * s0) @ a0) * scale, f"{prefix}.sorsa_A": a0 * 1.01,
                     f"{prefix}.sorsa_S": s0, f"{prefix}.sorsa_B": b0})
    out.mkdir()
    save_file(ckpt, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({"model_type": "sorsa", "rank": rank, "alpha": alpha,
                                                 "target_modules": ["q_proj"]}))
    return out


def sorsa(state_edit=None, config_edit=None, *, base=True, from_flag=False, other_base=False):
    def build(env: Env):
        origin = env.shared.base
        if other_base:
            from ..helpers import tiny_llama
            origin = tiny_llama(env.tmp / "other-base", seed=1)
        path = write_sorsa(origin, env.tmp / "sorsa")
        if state_edit:
            weights = path / "model.safetensors"
            tensors = load_file(str(weights))
            state_edit(tensors)
            save_file(tensors, str(weights), metadata={"format": "pt"})
        if config_edit:
            cfg = path / "config.json"
            config = json.loads(cfg.read_text())
            text = config_edit(config)
            cfg.write_text(text if isinstance(text, str) else json.dumps(config))
        return (["convert", path, env.tmp / "out.safetensors"] + (["--base", env.shared.base] if base else [])
                + (["--from", "sorsa_official"] if from_flag else []))
    return build


def put(key, value):
    return lambda t: t.update({key: value})


CASES = [
    Case("sorsa without the original base", sorsa(base=False), 2,
         rf"{CKPT}: a SORSA checkpoint holds the residual, not the original weights; pass --base"),
    Case("sorsa wrong base (residual error too large)", sorsa(other_base=True), 1,
         rf"{CKPT}: module '{Q0}': the stored residual differs from base − s·B0·diag\(S0\)·A0 by up to "
         r".*far beyond"),
    Case("sorsa factors disagree with the base shape", sorsa(put(f"{Q0}.sorsa_A", torch.zeros(4, 32))), 1,
         rf"{CKPT}: module '{Q0}': base weight \[64, 64\] vs factors \[64, 4\]·\[4, 32\]; wrong --base"),
    Case("sorsa factor not 2-D", sorsa(put(f"{Q0}.sorsa_A", torch.zeros(4))), 1,
         rf"{CKPT}: module '{Q0}': sorsa_A \[4\], sorsa_S \[4\], sorsa_B \[64, 4\] are not SORSA factors"),
    Case("sorsa missing sorsa_S", sorsa(lambda t: t.pop(f"{Q0}.sorsa_S")), 1,
         rf"{CKPT}: module '{Q0}' lacks \['.sorsa_S'\]; the checkpoint is incomplete"),
    Case("sorsa config rank disagrees", sorsa(config_edit=lambda c: c.update(rank=8)), 1,
         rf"{CKPT}: module '{Q0}' has rank 4, config says 8; config.json does not match the weights"),
    Case("sorsa config model_type wrong (--from)", sorsa(config_edit=lambda c: c.update(model_type="llama"),
                                                          from_flag=True), 1,
         rf"{CKPT}/config\.json: config.json does not say model_type 'sorsa'; not an official SORSA checkpoint"),
    Case("sorsa config not JSON (--from)", sorsa(config_edit=lambda c: "{model_type: sorsa", from_flag=True), 1,
         rf"{CKPT}/config\.json: not valid JSON .*; the SORSA config is damaged"),
    Case("sorsa config alpha is a string", sorsa(config_edit=lambda c: c.update(alpha="8")), 1,
         rf"{CKPT}/config\.json: config field alpha must be a number or null, got '8'; the SORSA config is damaged"),
]
