"""Adapters of every method built from the method descriptors (roles, dims, example tensors).

One small params builder per variant (valid params for the descriptor's typed model); the
tensors come from ``Method.example_tensors`` (required roles) plus the optional roles at the
shapes the descriptor's ``dims`` give, so a method that gains a role is covered without an edit.

Example:
    >>> adapter = build_adapter("olora", [Target("m", [6, 4])], torch.Generator().manual_seed(0))
    >>> sorted(adapter.manifest.modules["m"].tensors)
    ['lora_A', 'lora_A0', 'lora_B', 'lora_B0']
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterfmt.format import Adapter, BaseWeight, Manifest, ModuleEntry
from adapterfmt.methods import METHOD_BY_NAME, get_method
from adapterfmt.methods.descriptor import tensor_refs
from adapterfmt.methods.init_relative import init_relative_params
from adapterfmt.methods.lora import lora_params
from adapterfmt.methods.nola import nola_module
from adapterfmt.methods.adalora import adalora_params
from adapterfmt.methods.ia3 import ia3_params
from adapterfmt.methods.vera import vera_params
from adapterfmt.methods.fourierft import fourierft_params
from adapterfmt.methods.loha import loha_params
from adapterfmt.methods.lokr import lokr_scale
from adapterfmt.methods.sorsa import sorsa_params
from adapterfmt.methods.trainable_tokens import trainable_tokens_params


@dataclass(frozen=True)
class Target:
    """One adapted base weight: module name, canonical [out, in] shape ([out, in, kh, kw] for conv2d), layer kind."""

    name: str
    shape: list[int]
    layer: str = "linear"
    base_weight: str = ""

    @property
    def weight(self) -> str:
        return self.base_weight or f"{self.name}.weight"

    @property
    def fan_in_fan_out(self) -> bool:
        # GPT-2 Conv1D and embeddings store the transpose (spec §4); Conv2d is stored as is.
        return self.layer not in ("linear", "conv2d")

    @property
    def stored_shape(self) -> list[int]:
        return list(reversed(self.shape)) if self.fan_in_fan_out else list(self.shape)


def _lora(rank, alpha, rows):
    return lora_params(rank, alpha, False)


def _rslora(rank, alpha, rows):
    return lora_params(rank, alpha, True)


def _dora(rank, alpha, rows):
    return {**lora_params(rank, alpha, False), "magnitude_axis": "out"}


def _init_relative(init):
    return lambda rank, alpha, rows: init_relative_params(rank, alpha, False, init)


def _sorsa(rank, alpha, rows):
    return sorsa_params(rank, alpha if rank % 2 else None)  # both scale rules: alpha/r and alpha=None -> 1


def _ia3(rank, alpha, rows):
    return ia3_params("in" if rank % 2 else "out", rank % 2 == 0)  # both axes over the targets


def _loha(rank, alpha, rows):
    return loha_params(rank, alpha)


def _vera(rank, alpha, rows):
    # One projection pair per model (PEFT's rule): rank, seed and max dims shared by every target.
    return vera_params(4, 7, "fused", 128, 128)


def _fourierft(rank, alpha, rows, shape):
    # Seed and scaling shared by every target (PEFT's rule); n per module (n_frequency_pattern).
    return fourierft_params(4321, min(5 * rank, shape[0] * shape[1]), 150.0)


def _trainable_tokens(rank, alpha, rows, shape):
    # One index list per adapter (PEFT's TrainableTokens rule, see build_adapter); never more rows than the weight has.
    return trainable_tokens_params(min(3, *shape[:2]))


def _adalora(rank, alpha, rows):
    return adalora_params(rank, alpha, rank + 2)  # pruned: ranknum (init_r) above the rank


def _block(size: int, limit: int) -> int:
    """The largest divisor of ``size`` in [2, limit], else ``size`` itself."""
    return next((b for b in range(min(limit, size), 1, -1) if size % b == 0), size)


def _oft(cayley, share, coft):
    """OFT params for a shape; one setting per variant, so that one PEFT config can hold the adapter."""
    def params(rank, alpha, rows, shape):
        return {"block_size": _block(shape[1], 8), "block_share": share, "cayley": cayley, "neumann_terms": 5,
                "coft": coft, "eps": 0.05}
    return params


def _boft(rank, alpha, rows, shape):
    """Block size 2 (1 for an odd ``in``); two butterfly factors where PEFT's constraints allow them."""
    size = 2 if shape[1] % 2 == 0 else 1
    return {"butterfly_factors": 2 if size == 2 and shape[1] % 4 == 0 else 1, "block_size": size}


#: Methods whose params depend on the target's shape (their builder also takes it).
SHAPED = {"oft", "boft", "fourierft", "trainable_tokens"}
#: variant -> (method name, params(rank, alpha, rows)); NOLA is built by nola_module (fingerprints),
#: LoKr by _lokr (its layout depends on the shape).
VARIANTS = {"lora": ("lora", _lora), "rslora": ("lora", _rslora), "dora": ("dora", _dora),
            "olora": ("olora", _init_relative("olora")), "pissa": ("pissa", _init_relative("pissa")),
            "sorsa": ("sorsa", _sorsa), "nola": ("nola", None), "ia3": ("ia3", _ia3), "loha": ("loha", _loha),
            "lokr": ("lokr", None), "adalora": ("adalora", _adalora), "oft": ("oft", _oft("neumann", False, False)),
            "oft_exact": ("oft", _oft("exact", True, True)), "boft": ("boft", _boft),
            "vera": ("vera", _vera), "fourierft": ("fourierft", _fourierft), "full": ("full", lambda r, a, rows: {}),
            "dora_in": ("dora", lambda r, a, rows: {**lora_params(r, a, False), "magnitude_axis": "in"}),
            "trainable_tokens": ("trainable_tokens", _trainable_tokens),
            "loha_tucker": ("loha", None), "lokr_tucker": ("lokr", None), "lora_tucker": ("lora_tucker", None)}
#: Variants of convolution forms: only built on conv2d targets (elsewhere they are their plain variant).
CONV_ONLY_VARIANTS = {"loha_tucker", "lokr_tucker", "lora_tucker"}
#: Methods whose optional roles stay absent (VeRA: stored projections only for unreproducible imports;
#: LoHa: the Tucker cores belong to another form, built by the loha_tucker variant).
REQUIRED_ROLES_ONLY = {"vera", "loha", "full"}  # full: diff_b needs a base bias (tests/diffusion)


def method_of(variant: str) -> str:
    return VARIANTS[variant][0]


def role_tensors(entry: ModuleEntry, gen: torch.Generator, dtype: torch.dtype, optional: bool = True
                 ) -> dict[str, torch.Tensor]:
    """Random non-zero tensors for the method's roles (optional ones too, when ``optional``)."""
    method = get_method(entry.method)
    tensors = method.example_tensors(entry, gen, dtype)
    dims = method.dims(entry, method.params(entry))
    for role in method.roles:
        if optional and role.name not in tensors:
            shape = [dims[d] if isinstance(d, str) else d for d in role.shape]
            tensors[role.name] = torch.randn(shape, generator=gen).to(dtype)
    # A value that rounds to zero in F16/BF16 would make "non-zero" false; keep every entry non-zero
    # (integer roles, token indices, are left alone).
    return {role: torch.where(t == 0, torch.ones((), dtype=dtype), t) if t.is_floating_point() else t
            for role, t in tensors.items()}


def _nola(target: Target, rank: int, scale: float, rows, gen, dtype, seeds) -> tuple[ModuleEntry, dict]:
    out, inp = target.shape
    start, stop = rows or (0, out)
    k, l_ = 3 + rank, 2 + rank
    tensors = {"coef_A": torch.randn(k, generator=gen).to(dtype), "coef_B": torch.randn(l_, generator=gen).to(dtype),
               "offset_A": (0.1 * torch.randn(rank, inp, generator=gen)).to(dtype),
               "offset_B": (0.1 * torch.randn(stop - start, rank, generator=gen)).to(dtype)}
    extra = {"rows": [start, stop]} if rows else {}
    return nola_module(target.name, target.weight, list(target.shape), rank, scale,
                       {"A": {"seed": seeds[0], "num_basis": k}, "B": {"seed": seeds[1], "num_basis": l_}},
                       tensors, layer=target.layer, fan_in_fan_out=target.fan_in_fan_out, **extra)


def _lokr(target: Target, rank: int, alpha: float, gen, dtype, tucker: bool = False) -> tuple[ModuleEntry, dict]:
    """LoKr in PEFT's own layout for this rank (W1 full; W2 full or factored); an odd rank with both halves
    full uses LyCORIS's convention (scale 1). conv2d: W2 carries the kernel (full (b, d, kh, kw), flattened
    w2_b (r, d, kh, kw), or with ``tucker`` on a k×k kernel the core t2 (r, r, kh, kw), w2_a (r, b), w2_b (r, d))."""
    from adapterfmt.formats.peft.tuners.lokr_layout import peft_layout
    out, inp = target.shape[:2]
    kernel = list(target.shape[2:])
    (a, b), (c, d), _, w2_full = peft_layout(out, inp, rank, -1, False)
    randn = lambda *shape: torch.randn(shape, generator=gen).to(dtype)  # noqa: E731
    if w2_full:
        second = {"w2": randn(b, d, *kernel)}
    elif tucker and kernel not in ([], [1, 1]):
        second = {"t2": randn(rank, rank, *kernel), "w2_a": randn(rank, b), "w2_b": randn(rank, d)}
    else:
        second = {"w2_a": randn(b, rank), "w2_b": randn(rank, d, *kernel)}
    tensors = {"w1": randn(a, c)} | second
    convention = "lycoris" if w2_full and rank % 2 == 1 else "peft"
    params = {"w1_shape": [a, c], "w2_shape": [b, d], "rank": rank, "alpha": alpha, "convention": convention,
              "scale": lokr_scale(convention, rank, alpha, w2_full)}
    entry = ModuleEntry(method="lokr", base_weight=target.weight, shape=list(target.shape), params=params,
                        tensors=tensor_refs(target.name, tensors), fan_in_fan_out=target.fan_in_fan_out,
                        layer=target.layer)
    return entry, tensors


def _tucker(method: str, target: Target, rank: int, alpha: float, gen, dtype) -> tuple[ModuleEntry, dict]:
    """The Tucker form on a k×k conv2d (LoHa cores t1/t2, LoRA lora_mid); the flattened/plain form on 1×1
    kernels and other layers, as LyCORIS and PEFT store them."""
    kxk = target.layer == "conv2d" and target.shape[2:] != [1, 1]
    if method == "lora_tucker" and not kxk:
        return build_module("lora", target, rank, alpha, gen, dtype)
    if method == "lora_tucker":
        entry = ModuleEntry(method=method, base_weight=target.weight, shape=list(target.shape),
                            params=lora_params(rank, alpha, False), tensors={}, layer=target.layer)
        tensors = role_tensors(entry, gen, dtype, optional=False)
    else:
        entry = ModuleEntry(method="loha", base_weight=target.weight, shape=list(target.shape),
                            params=loha_params(rank, alpha), tensors={}, fan_in_fan_out=target.fan_in_fan_out,
                            layer=target.layer)
        if kxk:
            entry.tensors = {"t1": None}  # roles_for() picks the Tucker roles when the entry has a core
        tensors = role_tensors(entry, gen, dtype, optional=False)
    entry.tensors = tensor_refs(target.name, tensors)
    return entry, tensors


def build_module(variant: str, target: Target, rank: int, alpha: float, gen: torch.Generator,
                 dtype: torch.dtype = torch.float32, *, rows: list[int] | None = None,
                 seeds: tuple[int, int] = (7, 2**64 - 1)) -> tuple[ModuleEntry, dict[str, torch.Tensor]]:
    """One module of ``variant`` on ``target`` with random non-zero tensors (``rows``: NOLA only)."""
    method, make_params = VARIANTS[variant]
    if method == "nola":
        return _nola(target, rank, alpha / rank, rows, gen, dtype, seeds)
    if method == "lokr":
        # rank 1: PEFT's layout keeps W2 factored (hence Tucker-able) for the small conv targets only then.
        tucker = variant == "lokr_tucker"
        return _lokr(target, 1 if tucker else rank, alpha, gen, dtype, tucker=tucker)
    if variant in ("loha_tucker", "lora_tucker"):
        return _tucker(method, target, rank, alpha, gen, dtype)
    params = make_params(rank, alpha, rows, target.shape) if method in SHAPED else make_params(rank, alpha, rows)
    entry = ModuleEntry(method=method, base_weight=target.weight, shape=list(target.shape), params=params, tensors={},
                        fan_in_fan_out=target.fan_in_fan_out, layer=target.layer)
    tensors = role_tensors(entry, gen, dtype, optional=method not in REQUIRED_ROLES_ONLY)
    entry.tensors = tensor_refs(target.name, tensors)
    return entry, tensors


def build_adapter(variant: str, targets: list[Target], gen: torch.Generator, dtype: torch.dtype = torch.float32,
                  *, ranks: list[int] | None = None, alphas: list[float] | None = None,
                  nola_rows: bool = False) -> Adapter:
    """An adapter of one variant on ``targets`` (own rank and alpha per module; base shapes recorded)."""
    manifest, tensors = Manifest(created_by="tests.matrix"), {}
    for i, target in enumerate(targets):
        rank = (ranks or [2 + i for _ in targets])[i]
        alpha = (alphas or [float(3 + 2 * i) for _ in targets])[i]
        out = target.shape[0]
        rows = [out // 4, out - out // 4] if nola_rows and i == 0 and out >= 4 else None
        entry, module_tensors = build_module(variant, target, rank, alpha, gen, dtype, rows=rows)
        if entry.method == "trainable_tokens":
            # PEFT's rule: one token_indices list for every module of an adapter.
            shared_indices = module_tensors["indices"] if i == 0 else shared_indices
            module_tensors["indices"] = shared_indices.clone()
        manifest.modules[target.name] = entry
        manifest.base.weights[target.weight] = BaseWeight(shape=target.stored_shape)
        tensors.update({entry.tensors[role].name: t for role, t in module_tensors.items()})
    return Adapter(manifest=manifest, tensors=tensors)


def uncovered_methods() -> list[str]:
    """Registered methods no variant builds (a new method needs a VARIANTS row)."""
    return sorted(set(METHOD_BY_NAME) - {m for m, _ in VARIANTS.values()})
