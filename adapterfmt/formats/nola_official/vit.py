"""Official NOLA ViT checkpoints (UCDvision/NOLA ``vit/NOLA.py``, ``save_nola_parameters``).

Keys: ``fc{1,2}_alpha_{iii}`` (ka), ``fc{1,2}_beta_{iii}`` (kb), the basis checksum
``fc{1,2}_A_{iii}`` = A[0, :10, 0], and the classifier ``fc_{in}in_{out}out``. The basis is
torch's CPU generator after ``manual_seed(0)``: ``kaiming_uniform_(a=sqrt(5))`` into
``zeros(ka, in, r)`` then into ``zeros(kb, r, out)`` (same stream), x·A·B convention, so
canonical A_i = A_vit_i.T and B_j = B_vit_j.T; ΔW = (1/r)·B·A, no offsets. r is not stored.
Imported bit-exactly on CPU; the stored checksums are verified.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ...errors import ForeignFormatError, UsageError
from ...format import Adapter, BaseWeight, Manifest, Payload, TensorRef
from ...format.dtypes import dtype_name
from ...methods.nola import nola_module
from ...methods.nola.bases import basis_chunk
from ...conversion_report import LOSSLESS

KEY_RE = re.compile(r"^(fc[12])_(alpha|beta|A)_(\d+)$")
HEAD_RE = re.compile(r"^fc_(\d+)in_(\d+)out$")
GENERATOR = {"id": "torch-cpu-kaiming-uniform", "version": 1}
PROVENANCE = {"id": "torch-cpu-mt19937-kaiming", "source": "UCDvision/NOLA vit/NOLA.py (NOLA2)", "seed": 0,
              "note": "torch CPU MT19937, fp32; float32 uniform_ uses an FMA on x86 torch builds"}


def is_vit_state(keys) -> bool:
    """True when the keys look like an official NOLA ViT save."""
    return any(KEY_RE.match(k) for k in keys) and all(KEY_RE.match(k) or HEAD_RE.match(k) for k in keys)


def vit_to_adapter(state: dict[str, torch.Tensor], path: Path, options, report) -> Adapter:
    """Build a NOLA adapter from an official ViT state dict (needs ``nola_rank``)."""
    rank = options.format.nola_rank
    if not rank:
        raise UsageError("official NOLA ViT checkpoints do not store the rank", path=path,
                         hint="pass --nola-rank R (vit/run.sh uses 1)")
    layers: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    head = None
    for key, tensor in state.items():
        match = KEY_RE.match(key)
        if match:
            layers.setdefault((match[1], int(match[3])), {})[match[2]] = tensor
        else:
            head = (HEAD_RE.match(key), tensor)
    dim = int(head[0][1]) if head else None
    manifest, tensors = Manifest(), {}
    for (fc, index), parts in sorted(layers.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if "alpha" not in parts or "beta" not in parts:
            raise ForeignFormatError(f"{fc} of block {index} lacks alpha or beta", path=path,
                                     hint="the checkpoint is incomplete")
        target = f"blocks.{index}.mlp.{fc}"
        out_f, in_f = _shape(target, fc, dim, options, path, report)
        ka, kb = parts["alpha"].numel(), parts["beta"].numel()
        sides = {"A": {"seed": 0, "num_basis": ka, "basis_scale": 1.0, "draw_shape": [ka, in_f, rank]},
                 "B": {"seed": 0, "num_basis": kb, "basis_scale": 1.0, "draw_shape": [kb, rank, out_f],
                       "draw_after": [[ka, in_f, rank]]}}
        coefs = {"coef_A": parts["alpha"].reshape(-1), "coef_B": parts["beta"].reshape(-1)}
        entry, coefs = nola_module(target, f"{target}.weight", [out_f, in_f], rank, 1.0 / rank, sides, coefs,
                                   generator=GENERATOR, provenance=dict(PROVENANCE))
        if "A" in parts:
            _verify_checksum(target, entry, parts["A"], path)
        manifest.modules[target] = entry
        tensors.update({entry.tensors[r].name: t for r, t in coefs.items()})
        manifest.base.weights[f"{target}.weight"] = BaseWeight(shape=[out_f, in_f])
        report.add(target, LOSSLESS, "basis regenerated on CPU (torch MT19937, seed 0)"
                   + ("; checksum verified" if "A" in parts else "; no checksum stored"))
    if head is not None:
        name = "payload.head.weight"
        tensors[name] = head[1]
        manifest.payloads["head.weight"] = Payload("full_weight", "head.weight",
                                                   TensorRef(name, dtype_name(head[1].dtype), list(head[1].shape)))
        report.notes.append("classifier kept as a full_weight payload for head.weight; the official save has "
                            "no head bias")
    manifest.source = {"format": "nola_official", "variant": "vit", "rank": int(rank)}
    return Adapter(manifest=manifest, tensors=tensors)


def _shape(target: str, fc: str, dim: int | None, options, path, report) -> tuple[int, int]:
    """(out, in) from the base if given, else from the classifier's input size and mlp_ratio 4."""
    if options.base is not None and f"{target}.weight" in options.base:
        return tuple(options.base.shape(f"{target}.weight"))
    if dim is None:
        raise UsageError(f"cannot tell the shape of {target}", path=path, hint="pass --base")
    hidden = int(None or 4 * dim)
    note = f"ViT shapes assumed: dim {dim} (from the classifier), mlp hidden {hidden} (pass --base to read them)"
    if note not in report.notes:
        report.notes.append(note)
    return (hidden, dim) if fc == "fc1" else (dim, hidden)


def _verify_checksum(target: str, entry, stored: torch.Tensor, path) -> None:
    # Official: fc1_A = A_vit[0, :10, 0], i.e. canonical A[0][0, :10].
    first = basis_chunk(entry.params["generator"], entry.params["A"], (entry.params["rank"], entry.shape[1]), 0, 1)
    expected = first[0, 0, :stored.numel()]
    if not torch.equal(expected, stored.float().reshape(-1)):
        raise ForeignFormatError(f"{target}: the regenerated basis does not match the stored checksum "
                                 f"(max diff {float((expected - stored.float().reshape(-1)).abs().max()):.3g})",
                                 path=path, hint="check --nola-rank; this torch build's CPU generator may differ "
                                                 "from the one used for training")
