"""NOLA (Koohpayegani et al., ICLR 2024): LoRA factors as combinations of seeded random bases.

ΔW = s · B · A with
    A = offset_A + basis_scale_A · Σ_i coef_A[i] · A_i   (A_i: r x in)
    B = offset_B + basis_scale_B · Σ_j coef_B[j] · B_j   (B_j: out x r)
where the bases are regenerated from per-side uint64 seeds by a registered generator
(:mod:`adapterfmt.nola_bases`); the file holds coefficients, optional offsets and seeds only.
Storage, summation order and fingerprints: ``spec/nola.md``.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from ..errors import ManifestError, UsageError
from ..format.fingerprint import dtype_name
from ..format.manifest import ModuleEntry, TensorRef
from ..nola_bases import combine, fingerprint, known_generators
from ..nola_generator import GENERATOR_ID, GENERATOR_VERSION
from ..report import EXACT_MATH, LOSSY
from .base import AdapterMethod, expect_shape, register_method
from .lora import lora_params

SIDES = ("A", "B")
#: Largest fp64 basis kept in memory by the LoRA -> NOLA projection.
KEEP_BYTES = 256 << 20


def side_dims(entry: ModuleEntry, side: str) -> tuple[int, int]:
    """(rows, cols) of one basis matrix: A is (r, in), B is (rows_out, r)."""
    rank = int(entry.params["rank"])
    rows = entry.params.get("rows") or [0, entry.shape[0]]
    return (rank, entry.shape[1]) if side == "A" else (rows[1] - rows[0], rank)


def fl32(value: float) -> float:
    """``value`` rounded to float32, as a Python float. Example: ``fl32(0.1) == 0.10000000149011612``."""
    return float(np.float32(value))


def derive_seed(master: int, target: str, side: str) -> int:
    """Per-module seed: first 8 bytes (little endian) of SHA-256(f"{master}:{target}:{side}").

    Example:
        >>> derive_seed(0, "model.layers.0.self_attn.q_proj", "A") < 2**64
        True
    """
    digest = hashlib.sha256(f"{int(master)}:{target}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class NOLA(AdapterMethod):
    name = "nola"
    roles = ("coef_A", "coef_B")
    summary = "seeded random-basis LoRA (Koohpayegani et al. 2024); coefficients + seeds only"
    converts_to = ("lora",)
    converts_from = ("lora",)

    def check_entry(self, target, entry, path=None):
        super().check_entry(target, entry, path)
        p = entry.params
        rows = p.get("rows") or [0, entry.shape[0]]
        if not 0 <= rows[0] < rows[1] <= entry.shape[0]:
            raise ManifestError(f"module {target!r}: rows {rows} outside 0..{entry.shape[0]}", path=path,
                                hint="the manifest is damaged; re-export the adapter")
        for side in SIDES:
            info = p[side]
            expect_shape(target, f"coef_{side}", entry.tensors[f"coef_{side}"].shape, [info["num_basis"]], path)
            if f"offset_{side}" in entry.tensors:
                expect_shape(target, f"offset_{side}", entry.tensors[f"offset_{side}"].shape,
                             list(side_dims(entry, side)), path)
            if fl32(info["basis_scale"]) != float(info["basis_scale"]):
                raise ManifestError(f"module {target!r}: basis_scale {info['basis_scale']} is not a float32 value",
                                    path=path, hint="store fl32(1/sqrt(k)) exactly")
            if not 0 <= int(info["seed"]) < 2**64:
                raise ManifestError(f"module {target!r}: seed {info['seed']} is not a uint64", path=path,
                                    hint="the manifest is damaged")

    def factors(self, entry: ModuleEntry, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The materialised (B, A) in fp32 (B covers ``rows`` only)."""
        gen = entry.params["generator"]
        a, b = (combine(gen, entry.params[s], side_dims(entry, s), tensors[f"coef_{s}"],
                        tensors.get(f"offset_{s}")) for s in SIDES)
        return b, a

    def delta(self, entry, tensors, base=None, rows=None):
        b, a = self.factors(entry, tensors)
        part = (b @ a) * float(entry.params["scale"])
        rows = entry.params.get("rows")
        if not rows or rows == [0, entry.shape[0]]:
            return part
        full = torch.zeros(entry.shape, dtype=torch.float32, device=part.device)
        full[rows[0]:rows[1]] = part
        return full

    def validate_module(self, target, entry, tensors, base):
        problems, measures = [], {}
        gen = entry.params["generator"]
        for side in SIDES:
            info = entry.params[side]
            try:
                got = fingerprint(gen, info, side_dims(entry, side))
            except ValueError as exc:
                problems.append(f"basis {side} cannot be regenerated ({exc}); known generators: "
                                f"{', '.join(known_generators())}")
                continue
            if got != info["fingerprint"]:
                problems.append(f"basis {side} regenerated from seed {info['seed']} does not match its fingerprint "
                                f"(generator {gen['id']}/v{gen['version']}); this machine's generator differs "
                                "from the one that made the adapter")
        # An unverified emulation (legacy CUDA imports) is self-consistent, so not a problem;
        # it is surfaced as a measurement so that callers can flag it.
        measures["basis_generator_unverified"] = float(gen.get("verified") is False)
        return problems, measures

    def parameter_count(self, entry):
        # Coefficients and offsets are the stored scalars; each seed counts as one scalar too.
        return super().parameter_count(entry) + len(SIDES)

    def convert_module(self, target, entry, tensors, to, options):
        if to != "lora":
            return super().convert_module(target, entry, tensors, to, options)
        return nola_to_lora(target, entry, tensors)

    def convert_from(self, target, entry, tensors, options):
        return lora_to_nola(target, entry, tensors, options)


def nola_module(target: str, base_weight: str, shape: list[int], rank: int, scale: float,
                sides: dict[str, dict], tensors: dict[str, torch.Tensor], generator: dict | None = None,
                **extra) -> tuple[ModuleEntry, dict[str, torch.Tensor]]:
    """Build a NOLA module entry; fills basis_scale (fl32(1/sqrt(k))) and fingerprints when absent.

    ``sides`` maps "A"/"B" to at least ``{"seed": int, "num_basis": k}``; ``tensors`` holds
    ``coef_A``, ``coef_B`` and optionally ``offset_A``/``offset_B``; ``extra`` goes into params
    (``rows``, ``provenance``, ``layer``/``fan_in_fan_out`` go to the entry).

    Example:
        >>> e, t = nola_module("m", "m.weight", [4, 3], 2, 1.0, {"A": {"seed": 1, "num_basis": 2},
        ...     "B": {"seed": 2, "num_basis": 2}}, {"coef_A": torch.zeros(2), "coef_B": torch.zeros(2)})
        >>> e.params["A"]["seed"]
        '1'
    """
    layer = extra.pop("layer", "linear")
    fifo = extra.pop("fan_in_fan_out", False)
    params = {"rank": int(rank), "scale": float(scale),
              "generator": dict(generator or {"id": GENERATOR_ID, "version": GENERATOR_VERSION})}
    params.update(extra)
    entry = ModuleEntry(method="nola", base_weight=base_weight, shape=list(shape), params=params,
                        tensors={role: TensorRef(f"{target}.{role}", dtype_name(t.dtype), list(t.shape))
                                 for role, t in tensors.items()}, fan_in_fan_out=fifo, layer=layer)
    for side in SIDES:
        info = dict(sides[side])
        info["seed"] = str(int(info["seed"]))
        info.setdefault("basis_scale", fl32(1.0 / math.sqrt(int(info["num_basis"]))))
        params[side] = info
        info.setdefault("fingerprint", fingerprint(params["generator"], info, side_dims(entry, side)))
    return entry, dict(tensors)


def nola_to_lora(target: str, entry: ModuleEntry, tensors: dict[str, torch.Tensor]):
    """Materialise A and B (rank r, same scale); rows outside ``rows`` get zero B rows (exact)."""
    b, a = NOLA().factors(entry, tensors)
    rows = entry.params.get("rows") or [0, entry.shape[0]]
    if rows != [0, entry.shape[0]]:
        full = torch.zeros(entry.shape[0], b.shape[1])
        full[rows[0]:rows[1]] = b
        b = full
    rank = int(entry.params["rank"])
    alpha = float(entry.params["scale"]) * rank
    params = lora_params(rank, alpha, False)
    params["scale"] = float(entry.params["scale"])
    new = ModuleEntry(method="lora", base_weight=entry.base_weight, shape=list(entry.shape), params=params,
                      tensors={"lora_A": TensorRef(f"{target}.lora_A", "F32", list(a.shape)),
                               "lora_B": TensorRef(f"{target}.lora_B", "F32", list(b.shape))},
                      fan_in_fan_out=entry.fan_in_fan_out, layer=entry.layer)
    reference = _reference_delta(entry, tensors)
    result = (b.double() @ a.double()) * params["scale"]
    err = float((result - reference).abs().max()) if reference.numel() else 0.0
    note = f"bases materialised (rank {rank}); max|ΔW - fp64 ref|={err:.3g}"
    return new, {"lora_A": a.contiguous(), "lora_B": b.contiguous()}, EXACT_MATH, note


def _reference_delta(entry: ModuleEntry, tensors) -> torch.Tensor:
    """ΔW (rows part zero-padded) in float64 from the same fp32 basis values."""
    from ..nola_bases import basis_chunks
    gen, factors = entry.params["generator"], []
    for side in SIDES:
        dims, info = side_dims(entry, side), entry.params[side]
        acc = torch.zeros(dims, dtype=torch.float64)
        coef = tensors[f"coef_{side}"].double()
        for start, chunk in basis_chunks(gen, info, dims):
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
    result = NOLA().delta(new, new_tensors).double()
    norm = float(torch.linalg.norm(reference))
    rel = float(torch.linalg.norm(result - reference)) / norm if norm else 0.0
    return new, new_tensors, LOSSY, f"projected onto k={k}, l={l or k} bases; rel ΔW error {rel:.3g}"


def _project(gen: dict, info: dict, dims: tuple[int, int], target: torch.Tensor) -> torch.Tensor:
    """fp64 least squares: argmin_c ||basis_scale * Σ c_i X_i - target||, via the k x k normal matrix
    accumulated chunk by chunk (memory O(k² + chunk)), solved with lstsq for rank deficiency."""
    from ..nola_bases import basis_chunks
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


register_method(NOLA())
