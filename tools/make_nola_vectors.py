"""Regenerate the NOLA conformance vectors (run from the repository root):

    python tools/make_nola_vectors.py

Writes ``nola_small.safetensors`` (a NOLA adapter: coefficients, offsets, seeds; no basis) and
``nola_small.expected.safetensors`` (ΔW per module, float64, computed from the fp32 basis
values with float64 arithmetic; key = module name).

The v1.0 files are frozen (pinned in tests/hardening/test_version_compat.py); running this now would
rewrite them with the current writer. New vectors go to v1.1: tools/make_conformance_vectors_v11.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's adapterfmt, not an installed one

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from adapterfmt.format import Adapter, Manifest, write_adapter
from adapterfmt.methods.nola import nola_module
from adapterfmt.methods.nola.generator import nola_basis

HERE = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "v1.0"
# (target, (out, in), rank, scale, (seed A, k), (seed B, l), offsets)
MODULES = [
    ("model.layers.0.self_attn.q_proj", (8, 6), 2, 0.5, (1, 5), (2, 4), False),
    ("model.layers.0.mlp.down_proj", (6, 10), 3, 2.0, (2**64 - 1, 7), (2**53 + 1, 3), True),
]


def expected_delta(entry, tensors) -> torch.Tensor:
    """ΔW = s·B·A in float64 from the fp32 Philox basis (independent of the method code)."""
    factors = []
    for side in "AB":
        info = entry.params[side]
        rows, cols = (entry.params["rank"], entry.shape[1]) if side == "A" else (entry.shape[0], entry.params["rank"])
        basis = nola_basis(int(info["seed"]), (info["num_basis"], rows, cols)).double()
        f = torch.einsum("k,kij->ij", tensors[f"coef_{side}"].double(), basis) * info["basis_scale"]
        if f"offset_{side}" in tensors:
            f = f + tensors[f"offset_{side}"].double()
        factors.append(f)
    a, b = factors
    return (b @ a) * entry.params["scale"]


def main() -> None:
    gen = torch.Generator().manual_seed(2024)
    manifest, tensors, expected = Manifest(), {}, {}
    for target, (out_f, in_f), rank, scale, (sa, k), (sb, l), offsets in MODULES:
        parts = {"coef_A": torch.randn(k, generator=gen), "coef_B": torch.randn(l, generator=gen)}
        if offsets:
            parts["offset_A"] = torch.randn(rank, in_f, generator=gen)
            parts["offset_B"] = torch.randn(out_f, rank, generator=gen)
        entry, parts = nola_module(target, f"{target}.weight", [out_f, in_f], rank, scale,
                                   {"A": {"seed": sa, "num_basis": k}, "B": {"seed": sb, "num_basis": l}}, parts)
        manifest.modules[target] = entry
        tensors.update({entry.tensors[r].name: t for r, t in parts.items()})
        expected[target] = expected_delta(entry, parts)
    manifest.created_by = "adapterfmt conformance vectors"
    write_adapter(Adapter(manifest=manifest, tensors=tensors), HERE / "nola_small.safetensors", overwrite=True)
    save_file(expected, str(HERE / "nola_small.expected.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
