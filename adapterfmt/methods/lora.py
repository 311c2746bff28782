"""LoRA and rsLoRA: ΔW = s·B·A with s = alpha/r (alpha/sqrt(r) for rsLoRA), per module."""
from __future__ import annotations

from ..errors import ManifestError
from ..format.manifest import ModuleEntry
from .base import AdapterMethod, expect_shape, lora_scale, register_method, take_rows


class LoRA(AdapterMethod):
    name = "lora"
    roles = ("lora_A", "lora_B")
    summary = "low-rank update s·B·A (Hu et al. 2021); rsLoRA when use_rslora"

    def check_entry(self, target: str, entry: ModuleEntry, path: str | None = None) -> None:
        super().check_entry(target, entry, path)
        out_f, in_f = entry.shape
        rank = int(entry.params["rank"])
        expect_shape(target, "lora_A", entry.tensors["lora_A"].shape, [rank, in_f], path)
        expect_shape(target, "lora_B", entry.tensors["lora_B"].shape, [out_f, rank], path)
        scale = lora_scale(rank, entry.params["alpha"], entry.params["use_rslora"])
        if abs(scale - entry.params["scale"]) > 1e-12 * max(1.0, abs(scale)):
            raise ManifestError(f"module {target!r}: scale {entry.params['scale']} disagrees with "
                                f"rank {rank}, alpha {entry.params['alpha']}, use_rslora "
                                f"{entry.params['use_rslora']} (= {scale})", path=path,
                                hint="the manifest is inconsistent; re-export the adapter")

    row_separable = True

    def delta(self, entry, tensors, base=None, rows=None):
        # (B @ A) * s in fp32, the same operation order as PEFT's get_delta_weight, so that
        # merging is bit-identical to PEFT's merge_and_unload.
        # mul_ on the fresh product is the same rounding as `* s` without a second full-size buffer.
        b = take_rows(tensors["lora_B"], rows).float()
        return (b @ tensors["lora_A"].float()).mul_(float(entry.params["scale"]))


def lora_params(rank: int, alpha: float, use_rslora: bool) -> dict:
    """The params dict of a LoRA module entry.

    Example:
        >>> lora_params(4, 8, False)
        {'rank': 4, 'alpha': 8.0, 'use_rslora': False, 'scale': 2.0}
    """
    return {"rank": int(rank), "alpha": float(alpha), "use_rslora": bool(use_rslora),
            "scale": lora_scale(rank, alpha, use_rslora)}


register_method(LoRA())
