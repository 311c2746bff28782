"""PEFT LoHa / LoKr on ``nn.Conv2d``: the flattened form and ``use_effective_conv2d`` (Tucker cores).

PEFT 0.21.2 (``loha/layer.py``, ``lokr/layer.py``) stores, for a Conv2d with a kernel larger than 1×1 and
``use_effective_conv2d=True``: LoHa ``hada_t{1,2}`` (r, r, kh, kw), ``hada_w{1,2}_a`` (r, out),
``hada_w{1,2}_b`` (r, in); LoKr ``lokr_t2`` (r, r, kh, kw), ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d) (when W2
is factored). Otherwise (1×1 kernels always) the kernel is flattened into the input side: ``hada_w{1,2}_b``
(r, in·kh·kw), LoKr ``lokr_w2_b`` (r, d·kh·kw) or a full ``lokr_w2`` (b, d, kh, kw). The einsum orders and the
scale alpha/r are the same as LyCORIS's (measured: ΔW bit-identical), so adapterfmt stores the tensors as
they are, a flattened factor with its kernel axes restored from the base weight's shape.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ....errors import UsageError
from ....methods.descriptor import CONV2D_LAYER
from ._common import require


def conv_shape(base, module: str) -> list[int] | None:
    """The base's Conv2d weight shape (out, in, kh, kw) of ``module``, or None (no base, or not a conv)."""
    name = f"{module}.weight"
    if base is None or name not in base:
        return None
    shape = list(base.shape(name))
    return shape if len(shape) == 4 else None


def check_base(module: str, layer: str, shape, base, path: Path) -> None:
    """A conv2d module's shape is its base weight's (a Conv1d's Tucker core, (r, r, k, 1), is not a Conv2d)."""
    name = f"{module}.weight"
    if layer != CONV2D_LAYER or base is None or name not in base:
        return
    require(list(base.shape(name)) == list(shape), f"module {module!r}: the tensors describe a Conv2d weight "
            f"{list(shape)}, the base weight is {list(base.shape(name))}", path,
            hint="only Conv2d convolutions are supported; pass the base the adapter was trained on")


def with_kernel(module: str, leaf: str, tensor: torch.Tensor, axes: list[int], path: Path) -> torch.Tensor:
    """A flattened factor (r, n·kh·kw) as (r, n, kh, kw); ``axes`` = [n, kh, kw]."""
    require(tensor.dim() == 2 and tensor.shape[1] == math.prod(axes),
            f"module {module!r}: {leaf} has shape {list(tensor.shape)}, not a flattened {axes} kernel", path)
    return tensor.reshape(tensor.shape[0], *axes)


def loha_conv(module: str, roles: dict[str, torch.Tensor], rank: int, conv: list[int] | None, path: Path
              ) -> tuple[str, list[int]]:
    """(layer, canonical shape) of a LoHa module; checks the shapes and restores flattened kernels in place."""
    if "t1" in roles:
        require({"t1", "t2"} <= set(roles), f"module {module!r}: hada_t1 and hada_t2 come together", path)
        out_f, in_f = roles["w1_a"].shape[-1], roles["w1_b"].shape[-1]
        kernel = list(roles["t1"].shape[2:])
        expected = {"t1": [rank, rank, *kernel], "t2": [rank, rank, *kernel], "w1_a": [rank, out_f],
                    "w2_a": [rank, out_f], "w1_b": [rank, in_f], "w2_b": [rank, in_f]}
        _check_shapes(module, "hada", roles, expected, path)
        return CONV2D_LAYER, [out_f, in_f, *kernel]
    out_f = roles["w1_a"].shape[0]
    if conv is None:
        return "linear", [out_f, roles["w1_b"].shape[1]]
    for key in ("w1_b", "w2_b"):
        roles[key] = with_kernel(module, f"hada_{key}", roles[key], conv[1:], path)
    return CONV2D_LAYER, [out_f, *conv[1:]]


def lokr_conv(module: str, roles: dict[str, torch.Tensor], conv: list[int] | None, c: int, path: Path
              ) -> tuple[list[int] | None, int, int]:
    """(kernel or None, b, d) of a LoKr module's W2; restores a flattened ``w2_b``'s kernel in place."""
    if "t2" in roles:
        require("w2" not in roles, f"module {module!r}: lokr_t2 belongs to a factored lokr_w2", path)
        return list(roles["t2"].shape[2:]), roles["w2_a"].shape[1], roles["w2_b"].shape[1]
    if "w2" in roles:
        w2 = roles["w2"]
        return (list(w2.shape[2:]) if w2.dim() == 4 else None), w2.shape[0], w2.shape[1]
    b = roles["w2_a"].shape[0]
    if conv is None:
        return None, b, roles["w2_b"].shape[1]
    d = conv[1] // c
    roles["w2_b"] = with_kernel(module, "lokr_w2_b", roles["w2_b"], [d, *conv[2:]], path)
    return list(conv[2:]), b, d


def _check_shapes(module, prefix, roles, expected, path):
    for role, shape in expected.items():
        require(list(roles[role].shape) == shape, f"module {module!r}: {prefix}_{role} has shape "
                f"{list(roles[role].shape)}, expected {shape}", path)


def effective_conv2d(entries, core: str) -> bool:
    """PEFT's one ``use_effective_conv2d`` for the adapter: whether its k×k conv modules carry Tucker cores.

    Refuses an adapter that mixes the two forms on k×k kernels (PEFT would rebuild one of them wrongly).
    """
    kxk = {t: core in e.tensors for t, e in entries.items()
           if e.layer == CONV2D_LAYER and tuple(e.shape[2:]) != (1, 1) and _factored(e)}
    if len(set(kxk.values())) > 1:
        flat = next(t for t, tucker in kxk.items() if not tucker)
        raise UsageError(f"module {flat!r}: PEFT's use_effective_conv2d is one setting per adapter, and this "
                         "adapter mixes Tucker and flattened k×k convolutions",
                         hint="export it with --to lycoris (which holds both), or convert it with --method lora")
    return any(kxk.values())


def _factored(entry) -> bool:
    """A LoKr module with a full W2 has no Tucker choice; every LoHa module has one."""
    return entry.method != "lokr" or "w2" not in entry.tensors


def peft_tensor(role: str, tensor: torch.Tensor, entry, tucker: bool) -> torch.Tensor:
    """A factor as PEFT stores it: conv input factors of the flattened form lose their kernel axes."""
    flat_role = role in ("w1_b", "w2_b") if entry.method == "loha" else role == "w2_b"
    if entry.layer == CONV2D_LAYER and flat_role and not tucker:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor
