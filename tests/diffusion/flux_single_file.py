"""A single-file Flux transformer in BFL's layout, written from the tiny diffusers transformer with the test's own
BFL table (flux_files.DOUBLE/SINGLE/TOP), independently of adapterfmt: fused qkv / linear1 are the diffusers
weights stacked in row order, the final layer's adaLN rows are (shift, scale) where diffusers has (scale, shift).
``diffusers_view`` reads such a file back into diffusers' names with the same table."""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from .flux_files import SWAPPED, bfl_modules

#: BFL RMSNorm scales -> diffusers norms (per double / single block).
DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def _table(transformer) -> dict[str, tuple[list[str], bool]]:
    """{BFL tensor: ([diffusers tensors in row order], swapped)} for every weight, bias and norm scale."""
    out = {}
    for bfl, modules in bfl_modules(transformer, top=True).items():
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = ([f"{m}.{kind}" for m in modules], bfl in SWAPPED)
    for i in range(len(transformer.transformer_blocks)):
        out |= {f"double_blocks.{i}.{k}": ([f"transformer_blocks.{i}.{v}"], False) for k, v in DOUBLE_NORMS.items()}
    for i in range(len(transformer.single_transformer_blocks)):
        out |= {f"single_blocks.{i}.{k}": ([f"single_transformer_blocks.{i}.{v}"], False) for k, v in SINGLE_NORMS.items()}
    return out


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2)
    return torch.cat([second, first])


def save_bfl_single_file(transformer, out, dtype=None, prefix: str = "", metadata=None) -> dict[str, tuple[list[str], bool]]:
    """Write the transformer as a BFL-layout single file; returns the table used. Every diffusers tensor is used once."""
    state = transformer.state_dict()
    table = _table(transformer)
    used = [name for parts, _ in table.values() for name in parts]
    assert sorted(used) == sorted(state), set(state) ^ set(used)
    stored = {}
    for bfl, (parts, swapped) in table.items():
        value = torch.cat([state[p] for p in parts])
        value = _swap(value) if swapped else value
        stored[prefix + bfl] = (value if dtype is None else value.to(dtype)).contiguous()
    save_file(stored, str(out), metadata=metadata or {"modelspec.architecture": "flux-1-dev"})
    return table


def diffusers_view(path, table, prefix: str = "") -> dict[str, torch.Tensor]:
    """The file's tensors under diffusers' names, by the same table."""
    stored = load_file(str(path))
    out = {}
    for bfl, (parts, swapped) in table.items():
        value = stored[prefix + bfl]
        value = _swap(value) if swapped else value
        if len(parts) == 4:  # linear1: q, k, v (inner rows each), then the MLP input
            inner = value.shape[1] if bfl.endswith(".weight") else value.shape[0] // 7
            sizes = [inner] * 3 + [value.shape[0] - 3 * inner]
        else:
            sizes = [value.shape[0] // len(parts)] * len(parts)
        out |= dict(zip(parts, value.split(sizes)))
    return out
