"""Official SORSA checkpoints (Gunale0926/SORSA): a whole-model state dict plus config.json.

Each adapted Linear ``X`` has ``X.weight`` (the residual W − s·B0·diag(S0)·A0, often bf16),
``X.sorsa_A`` (r×in), ``X.sorsa_S`` (r) and ``X.sorsa_B`` (out×r); ``config.json`` has
``model_type: "sorsa"``, ``rank``, ``alpha`` (None: s = 1, else alpha/r), ``target_modules``.
The original W is not stored, so ``--base`` (the ORIGINAL base) is required: the init
factors are recomputed as ``sorsa_init`` does (thin SVD of Wᵀ, upcast to fp32, which the
official code intends but skips) or read from the post-init snapshot (``--init-snapshot``).
The measured max|E|, E = W_res − (W − s·B0·diag(S0)·A0), is reported and recorded.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import BaseCheckpoint
from ..jsonio import peek_json_object, read_json_file
from ..errors import ForeignFormatError, UsageError
from ..format import Adapter, BaseWeight, Manifest, ModuleEntry
from ..format.dtypes import dtype_name
from ..methods.descriptor import tensor_refs
from ..methods.sorsa import sorsa_params
from ..conversion_report import EXACT_MATH
from .base import AdapterFormat
from .peft import PeftReadOptions

SUFFIXES = (".sorsa_A", ".sorsa_S", ".sorsa_B")


def sorsa_init_factors(weight: torch.Tensor, rank: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official init: SVD of Wᵀ in fp32; (B0 = U_r out×r, S0 = σ_1..r, A0 = V_rᵀ r×in) in ``dtype``.

    Example:
        >>> b0, s0, a0 = sorsa_init_factors(torch.randn(6, 5), 2, torch.float32)
        >>> b0.shape, s0.shape, a0.shape
        (torch.Size([6, 2]), torch.Size([2]), torch.Size([2, 5]))
    """
    u, s, vt = torch.linalg.svd(weight.to(torch.float32).T, full_matrices=False)
    a0 = u[:, :rank].T.contiguous().to(dtype)
    return vt[:rank, :].T.contiguous().to(dtype), s[:rank].to(dtype), a0


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    config = read_json_file(cfg, what="SORSA config")
    if config.get("model_type") != "sorsa":
        raise ForeignFormatError("config.json does not say model_type 'sorsa'", path=cfg,
                                 hint="not an official SORSA checkpoint")
    wanted = {"rank": (int, "an integer or null"), "alpha": ((int, float), "a number or null")}
    for key, (types, what) in wanted.items():
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise ForeignFormatError(f"config field {key} must be {what}, got {value!r}", path=cfg,
                                     hint="the SORSA config is damaged")
    return config


def _base_name(prefix: str, base: BaseCheckpoint) -> str | None:
    # SORSAModel wraps the HF model as ``self.model``, so keys may carry extra ``model.`` prefixes.
    cand = prefix
    while True:
        if f"{cand}.weight" in base:
            return cand
        if not cand.startswith("model."):
            return None
        cand = cand[len("model."):]


def _modules(ckpt: BaseCheckpoint) -> list[str]:
    return sorted({n[: -len(".sorsa_A")] for n in ckpt.names() if n.endswith(".sorsa_A")})


class SorsaOfficialFormat(AdapterFormat):
    name = "sorsa_official"
    summary = "official SORSA checkpoint (Gunale0926/SORSA): full state dict with residual + sorsa_A/S/B"
    priority = 15
    writes_methods = ()
    can_write = False
    read_options = PeftReadOptions  # the same --init-snapshot

    def detect(self, path: Path) -> bool:
        if not (path.is_dir() and (path / "config.json").is_file()):
            return False
        return (peek_json_object(path / "config.json") or {}).get("model_type") == "sorsa"

    def read(self, path: Path, options, report) -> Adapter:
        config = _read_config(path)
        if options.base is None:
            raise UsageError("a SORSA checkpoint holds the residual, not the original weights", path=path,
                                     hint="pass --base pointing at the ORIGINAL base model")
        base = options.base
        ckpt = BaseCheckpoint(path)
        snapshot_dir = options.format.init_snapshot
        snapshot = BaseCheckpoint(snapshot_dir) if snapshot_dir else None
        alpha = config.get("alpha")
        manifest, tensors = Manifest(), {}
        for prefix in _modules(ckpt):
            target = _base_name(prefix, base)
            if target is None:
                raise ForeignFormatError(f"module {prefix!r} has no '.weight' in the base model", path=path,
                                         hint="check --base: it must be the original model the run started from")
            missing = [s for s in SUFFIXES + (".weight",) if f"{prefix}{s}" not in ckpt]
            if missing:
                raise ForeignFormatError(f"module {prefix!r} lacks {missing}", path=path,
                                         hint="the checkpoint is incomplete")
            a, s_vec, b = (ckpt.get(prefix + s) for s in SUFFIXES)
            if a.dim() != 2 or s_vec.shape != (a.shape[0],) or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise ForeignFormatError(f"module {prefix!r}: sorsa_A {list(a.shape)}, sorsa_S {list(s_vec.shape)}, "
                                         f"sorsa_B {list(b.shape)} are not SORSA factors (r×in, r, out×r)",
                                         path=path, hint="the checkpoint is damaged")
            rank = a.shape[0]
            if config.get("rank") not in (None, rank):
                raise ForeignFormatError(f"module {prefix!r} has rank {rank}, config says {config['rank']}",
                                         path=path, hint="config.json does not match the weights")
            raw = base.get(f"{target}.weight")
            weight = raw.float()
            if list(weight.shape) != [b.shape[0], a.shape[1]]:
                raise ForeignFormatError(f"module {prefix!r}: base weight {list(weight.shape)} vs factors "
                                         f"{list(b.shape)}·{list(a.shape)}", path=path, hint="wrong --base")
            params = sorsa_params(rank, alpha, init_source="snapshot" if snapshot else "recomputed")
            if snapshot is not None:
                b0, s0, a0 = (snapshot.get(prefix + s) for s in (".sorsa_B", ".sorsa_S", ".sorsa_A"))
            else:
                b0, s0, a0 = sorsa_init_factors(weight, rank, a.dtype)
            residual = ckpt.get(prefix + ".weight")
            intended = weight - ((b0.float() * s0.float()) @ a0.float()) * params["scale"]
            err = (residual.float() - intended).abs()
            params.update(residual_dtype=dtype_name(residual.dtype), max_abs_residual_error=float(err.max()))
            _check_residual(prefix, err, intended, residual.dtype, path)
            new = {"U_p": b, "S_p": s_vec, "Vt_p": a, "U_p0": b0, "S_p0": s0, "Vt_p0": a0}
            new = {k: v.contiguous() for k, v in new.items()}
            entry = ModuleEntry(method="sorsa", base_weight=f"{target}.weight", shape=list(weight.shape),
                                params=params, tensors=tensor_refs(target, new))
            manifest.modules[target] = entry
            manifest.base.weights[entry.base_weight] = BaseWeight(shape=list(raw.shape))
            tensors.update({ref.name: new[role] for role, ref in entry.tensors.items()})
            report.add(target, EXACT_MATH, f"residual {dtype_name(residual.dtype)}: max|E|={float(err.max()):.3g} "
                                           "(rounding of the stored residual; not representable)")
        if not manifest.modules:
            raise ForeignFormatError("no sorsa_A tensors found", path=path, hint="not a SORSA checkpoint")
        manifest.base.name_or_path = config.get("base_model_name_or_path")
        manifest.source = {"format": "sorsa_official", "config": config}
        adapter = Adapter(manifest=manifest, tensors=tensors)
        report.notes.append(f"SORSA init {'read from the snapshot' if snapshot else 'recomputed (fp32 SVD)'}; "
                            "stored relative to the original base")
        return adapter


def _check_residual(prefix: str, err: torch.Tensor, intended: torch.Tensor, dtype: torch.dtype, path: Path) -> None:
    # E should be the residual's rounding: ≤ ½ ulp elementwise. Allow generous slack for an SVD
    # computed on another device; a wrong base or init is orders of magnitude off.
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 1.0
    bound = 64 * eps * (intended.abs() + float(intended.abs().max()) * 1e-3) + 1e-5 * float(intended.abs().max())
    if bool((err > bound).any()):
        raise ForeignFormatError(f"module {prefix!r}: the stored residual differs from base − s·B0·diag(S0)·A0 "
                                 f"by up to {float(err.max()):.3g}, far beyond its rounding", path=path,
                                 hint="--base is not the original model, or the init was computed elsewhere "
                                      "(pass --init-snapshot with the post-init SORSA snapshot)")


