"""What the consumer rules need to know about an adapter, computed once from its manifest.

The check never reads tensor data: every fact here comes from the manifest (methods, per-module
rank/alpha/use_rslora/scale, layer kinds, payloads, the recorded base config).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..format import Manifest

#: ``<stack>.layers.<N>.<path>``: the transformer block index of a module, as PEFT and most loaders see it.
BLOCK_RE = re.compile(r"^(?P<stack>.*?layers)\.(?P<index>\d+)\.(?P<path>.+)$")
LORA_FAMILY = ("lora", "dora")
#: Methods without any LoRA form (a dense ΔW): no export materialises them as LoRA.
DENSE_METHODS = ("full",)


def _known_methods():
    from ..methods import METHODS
    return METHODS


@dataclass
class PeftConfigView:
    """The one global ``r`` / ``lora_alpha`` / ``use_rslora`` a PEFT export writes (patterns aside)."""

    r: int
    lora_alpha: float
    use_rslora: bool


@dataclass
class AdapterFacts:
    """Facts about one adapter that decide whether a consumer loads it and how it scales it."""

    modules: dict[str, dict[str, Any]]          # name -> {rank, alpha, use_rslora, scale, layer, method}
    methods: list[str]
    payload_kinds: dict[str, list[str]]         # kind -> targets
    fused: list[str]                            # modules adapting a block of another weight
    conv1d: list[str]
    embeddings: list[str]
    lm_head: list[str]
    config: PeftConfigView | None
    base_config: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- derived
    @property
    def lora_modules(self) -> dict[str, dict[str, Any]]:
        return {k: m for k, m in self.modules.items() if m["method"] in LORA_FAMILY}

    @property
    def max_rank(self) -> int:
        return max((m["rank"] for m in self.lora_modules.values()), default=0)

    @property
    def ranks(self) -> list[int]:
        return sorted({m["rank"] for m in self.lora_modules.values()})

    @property
    def rslora_modules(self) -> list[str]:
        return [k for k, m in self.lora_modules.items() if m["use_rslora"]]

    @property
    def non_lora_methods(self) -> list[str]:
        return [m for m in self.methods if m not in LORA_FAMILY + DENSE_METHODS and m not in self.no_lora_form_methods]

    @property
    def no_lora_form_methods(self) -> list[str]:
        """Methods without an exact LoRA form (ΔW depends on the base, or replaces rows); dense ΔW methods
        have their own rule."""
        from ..methods import get_method
        lora = get_method("lora")
        known = {x.name for x in _known_methods()}
        return [m for m in self.methods if m not in LORA_FAMILY + DENSE_METHODS and m in known
                and "lora" not in get_method(m).converts_to and m not in lora.converts_from]

    @property
    def dense_methods(self) -> list[str]:
        return [m for m in self.methods if m in DENSE_METHODS]

    @property
    def kohya_dora(self) -> list[str]:
        """DoRA modules that are not PEFT's: kohya/LyCORIS ``dora_scale`` (input axis, or a norm eps)."""
        return [k for k, m in self.modules.items() if m["method"] == "dora"
                and (m.get("magnitude_axis") != "out" or m.get("norm_eps"))]

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.base_config.get("tie_word_embeddings"))

    def pattern_modules(self) -> list[str]:
        """Modules a PEFT export needs a rank_pattern or alpha_pattern entry for."""
        if self.config is None:
            return []
        out = []
        for name, m in self.lora_modules.items():
            alpha = _alpha_in_rule(m, self.config.use_rslora)
            if m["rank"] != self.config.r or alpha != self.config.lora_alpha:
                out.append(name)
        return out

    def misscaled(self, rule) -> dict[str, tuple[float, float]]:
        """``{module: (our scale, the scale rule(self, module) gives)}`` where they differ beyond fp rounding."""
        out = {}
        for name, m in self.lora_modules.items():
            given = rule(self, m)
            if not math.isclose(given, m["scale"], rel_tol=1e-9):
                out[name] = (m["scale"], given)
        return out

    def layer_types(self) -> dict[str, set[int]]:
        """``{path inside the block (e.g. self_attn.q_proj): {block indices}}`` for block modules."""
        out: dict[str, set[int]] = {}
        for name in self.lora_modules:
            match = BLOCK_RE.match(name)
            if match:
                out.setdefault(match["path"], set()).add(int(match["index"]))
        return out

    def ranks_by_layer_type(self) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for name, m in self.lora_modules.items():
            match = BLOCK_RE.match(name)
            if match:
                out.setdefault(match["path"], set()).add(m["rank"])
        return out


def _alpha_in_rule(module: dict[str, Any], use_rslora: bool) -> float:
    """The alpha that gives this module its scale under the export's rsLoRA rule (as the PEFT writer does)."""
    if bool(module["use_rslora"]) == use_rslora:
        return float(module["alpha"])
    return module["scale"] * (math.sqrt(module["rank"]) if use_rslora else module["rank"])


def peft_config_view(modules: dict[str, dict[str, Any]]) -> PeftConfigView | None:
    """The global values the PEFT writer picks: the most common rsLoRA flag, rank and alpha."""
    lora = [m for m in modules.values() if m["method"] in LORA_FAMILY]
    if not lora:
        return None
    use_rslora = _most_common([bool(m["use_rslora"]) for m in lora])
    rank = _most_common([m["rank"] for m in lora])
    alpha = _most_common([_alpha_in_rule(m, use_rslora) for m in lora])
    return PeftConfigView(r=int(rank), lora_alpha=float(alpha), use_rslora=use_rslora)


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def adapter_facts(manifest: Manifest) -> AdapterFacts:
    """Collect the facts the consumer rules look at.

    Example:
        >>> from adapterfmt.format import read_adapter
        >>> facts = adapter_facts(read_adapter("adapter.safetensors").manifest)  # doctest: +SKIP
        >>> facts.max_rank  # doctest: +SKIP
        8
    """
    modules = {}
    for name, entry in manifest.modules.items():
        params = entry.params
        modules[name] = {"method": entry.method, "layer": entry.layer, "rank": int(params.get("rank", 0)),
                         "alpha": float(params.get("alpha", 0.0)), "use_rslora": bool(params.get("use_rslora")),
                         "scale": float(params.get("scale", 0.0)),
                         "magnitude_axis": params.get("magnitude_axis"), "norm_eps": float(params.get("norm_eps", 0.0))}
    payloads: dict[str, list[str]] = {}
    for payload in manifest.payloads.values():
        payloads.setdefault(payload.kind, []).append(payload.target)
    entries = manifest.modules
    return AdapterFacts(
        modules=modules, methods=manifest.methods(), payload_kinds=payloads,
        # a multi-component module's key is "<component>.<path>" and its base_weight "<path>.weight"
        fused=[k for k, e in entries.items()
               if (f"{e.component}.{e.base_weight}" if e.component else e.base_weight) != f"{k}.weight"],
        conv1d=[k for k, e in entries.items() if e.layer == "conv1d"],
        embeddings=[k for k, e in entries.items() if e.layer == "embedding"],
        lm_head=[k for k in entries if k.rsplit(".", 1)[-1] == "lm_head"],
        config=peft_config_view(modules),
        base_config=dict(manifest.source.get("base_config") or {}))
