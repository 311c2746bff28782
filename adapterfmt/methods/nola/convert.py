"""NOLA conversions: NOLA -> LoRA (materialise the bases, exact up to fp32 rounding) and
LoRA -> NOLA (fp64 least-squares projection onto fresh Philox bases, lossy, error measured)."""
from __future__ import annotations

import torch
from pydantic import Field, field_validator

from ...conversion_report import EXACT_MATH, LOSSY
from ...errors import UsageError
from ...format.manifest import ModuleEntry
from ..descriptor import Params, tensor_refs
from ..lora import lora_params
from .bases import GeneratorFn, basis_chunks
from .module import SIDES, derive_seed, nola_delta, nola_factors, nola_module, side_dims

class NolaFromLoraOptions(Params):
    """Options of ``convert --method nola`` (a least-squares projection onto fresh Philox bases)."""

    nola_basis: tuple[int, int] | None = Field(default=None, description=(
        "NOLA basis sizes K[,L] of the A and B sides for --method nola."))
    seed: int | None = Field(default=None, ge=0, lt=2**64, description=(
        "Master seed for NOLA bases (per-module seeds are derived from it)."))

    @field_validator("nola_basis", mode="before")
    @classmethod
    def _sizes(cls, value):
        """``"K"`` or ``"K,L"`` (the CLI's spelling) -> (K, L)."""
        if isinstance(value, str):
            try:
                sizes = [int(v) for v in value.split(",")]
            except ValueError:
                raise ValueError(f"{value!r} must be K or K,L with positive integers") from None
            value = (sizes[0], sizes[-1]) if 1 <= len(sizes) <= 2 else ()
        if isinstance(value, (tuple, list)) and (len(value) != 2 or min(value) < 1):
            raise ValueError(f"{value!r} must be K or K,L with positive integers")
        return tuple(value) if isinstance(value, list) else value


#: Largest fp64 basis kept in memory by the LoRA -> NOLA projection.
KEEP_BYTES = 256 << 20


def nola_to_lora(target: str, entry: ModuleEntry, tensors: dict[str, torch.Tensor], draw: GeneratorFn | None = None):
    """Materialise A and B (rank r, same scale); rows outside ``rows`` get zero B rows (exact).

    ``draw`` replaces the manifest's generator (the official import drawing on this CUDA device).
    """
    b, a = nola_factors(entry, tensors, draw)
    rows = entry.params.get("rows") or [0, entry.shape[0]]
    if rows != [0, entry.shape[0]]:
        full = torch.zeros(entry.shape[0], b.shape[1])
        full[rows[0]:rows[1]] = b
        b = full
    rank = int(entry.params["rank"])
    alpha = float(entry.params["scale"]) * rank
    params = lora_params(rank, alpha, False)
    params["scale"] = float(entry.params["scale"])
    lora_tensors = {"lora_A": a.contiguous(), "lora_B": b.contiguous()}
    new = entry.replace(method="lora", params=params, tensors=tensor_refs(target, lora_tensors))
    reference = _reference_delta(entry, tensors, draw)
    result = (b.double() @ a.double()) * params["scale"]
    err = float((result - reference).abs().max()) if reference.numel() else 0.0
    note = f"bases materialised (rank {rank}); max|ΔW - fp64 ref|={err:.3g}"
    return new, lora_tensors, EXACT_MATH, note


def _reference_delta(entry: ModuleEntry, tensors, draw: GeneratorFn | None = None) -> torch.Tensor:
    """ΔW (rows part zero-padded) in float64 from the same fp32 basis values."""
    gen, factors = entry.params["generator"], []
    for side in SIDES:
        dims, info = side_dims(entry, side), entry.params[side]
        acc = torch.zeros(dims, dtype=torch.float64)
        coef = tensors[f"coef_{side}"].double()
        for start, chunk in basis_chunks(gen, info, dims, None, draw):
            acc += torch.einsum("k,kij->ij", coef[start:start + chunk.shape[0]], chunk.double())
        acc *= float(info["basis_scale"])
        if f"offset_{side}" in tensors:
            acc += tensors[f"offset_{side}"].double()
        factors.append(acc)
    a, b = factors
    rows = entry.params.get("rows") or [0, entry.shape[0]]
    full = torch.zeros(entry.shape, dtype=torch.float64)
    full[rows[0]:rows[1]] = (b @ a) * float(entry.params["scale"])
    return full


def lora_to_nola(target: str, entry: ModuleEntry, tensors: dict[str, torch.Tensor], options: dict):
    """Least-squares projection (fp64) of A and B onto fresh Philox bases; lossy, error measured.

    Seeds: :func:`derive_seed` of ``options['seed']`` (default 0), the module path and the side.
    ``options['nola_basis']`` is ``(k, l)``; basis_scale = fl32(1/sqrt(k)).
    """
    if entry.method != "lora":
        raise UsageError(f"module {target!r}: only LoRA converts to NOLA (got {entry.method})",
                         hint="convert to lora first")
    k, l = options.get("nola_basis") or (None, None)
    if not k:
        raise UsageError("converting to NOLA needs the basis sizes", hint="pass --nola-basis K[,L]")
    master = int(options.get("seed") or 0)
    rank = int(entry.params["rank"])
    targets = {"A": tensors["lora_A"].double(), "B": tensors["lora_B"].double()}
    sides = {side: {"seed": derive_seed(master, target, side), "num_basis": count}
             for side, count in (("A", int(k)), ("B", int(l or k)))}
    placeholder = {f"coef_{s}": torch.zeros(sides[s]["num_basis"]) for s in SIDES}
    new, _ = nola_module(target, entry.base_weight, entry.shape, rank, float(entry.params["scale"]), sides,
                         placeholder, fan_in_fan_out=entry.fan_in_fan_out, layer=entry.layer)
    params = new.params
    new_tensors = {f"coef_{s}": _project(params["generator"], params[s], side_dims(new, s), targets[s])
                   for s in SIDES}
    reference = (targets["B"] @ targets["A"]) * params["scale"]
    result = nola_delta(new, new_tensors).double()
    norm = float(torch.linalg.norm(reference))
    rel = float(torch.linalg.norm(result - reference)) / norm if norm else 0.0
    return new, new_tensors, LOSSY, f"projected onto k={k}, l={l or k} bases; rel ΔW error {rel:.3g}"


def _project(gen: dict, info: dict, dims: tuple[int, int], target: torch.Tensor) -> torch.Tensor:
    """fp64 least squares: argmin_c ||basis_scale * Σ c_i X_i - target||, via the k x k normal matrix
    accumulated chunk by chunk (memory O(k² + chunk)), solved with lstsq for rank deficiency."""
    k = int(info["num_basis"])
    gram = torch.zeros(k, k, dtype=torch.float64)
    rhs = torch.zeros(k, dtype=torch.float64)
    scale = float(info["basis_scale"])
    flat_target = target.reshape(-1)

    def blocks():
        for start, chunk in basis_chunks(gen, info, dims):
            yield start, chunk.reshape(chunk.shape[0], -1).double() * scale

    # Small bases are kept; big ones are regenerated per Gram block row so that memory stays
    # bounded by two chunks whatever k is.
    keep = k * dims[0] * dims[1] * 8 <= KEEP_BYTES
    cached = list(blocks()) if keep else None
    for i, (si, xi) in enumerate(cached or blocks()):
        rhs[si:si + xi.shape[0]] = xi @ flat_target
        for j, (sj, xj) in enumerate(cached or blocks()):
            if j < i:
                continue
            g = xi @ xj.T
            gram[si:si + xi.shape[0], sj:sj + xj.shape[0]] = g
            gram[sj:sj + xj.shape[0], si:si + xi.shape[0]] = g.T
    coef = torch.linalg.lstsq(gram, rhs.unsqueeze(1), driver="gelsd").solution.view(-1)
    return coef.float()
