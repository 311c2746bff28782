"""``adapterfmt check``: will this adapter load in vLLM / SGLang / TGI / llama.cpp / MLX-LM / diffusers /
ComfyUI / PEFT, what will that consumer silently ignore or mis-scale, and which ``adapterfmt convert``
command produces a file that computes exactly our ΔW there.

The rules are data (``adapterfmt.ops.check_rules.RULES``: a table of :class:`Rule` per target), each
read from the consumer's source and cited in ``docs/consumers.md``. The check works on the manifest
only (no tensor data, no base model).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from ..errors import AdapterFmtError, UsageError
from ..format import Adapter, Manifest
from .adapter_facts import adapter_facts
from .check_model import IGNORED, MISSCALED, OK, REFUSE, SEVERITY_ORDER, Rule  # noqa: F401 (re-exported)

__all__ = ["IGNORED", "MISSCALED", "OK", "REFUSE", "SEVERITY_ORDER", "Rule", "check_adapter", "load_for_check"]
from .check_rules import RULES, TARGET_ALIASES
from .check_rules_diffusion import KEY_RULES

@dataclass
class Finding:
    """One line of the check: a rule that fired for a target."""

    target: str
    rule: str
    severity: str
    message: str
    fix: str | None
    exact_fix: bool
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TargetVerdict:
    """The findings for one target and the verdict they add up to."""

    target: str
    findings: list[Finding]

    @property
    def severity(self) -> str:
        worst = min((SEVERITY_ORDER.index(f.severity) for f in self.findings), default=len(SEVERITY_ORDER) - 1)
        return SEVERITY_ORDER[worst]

    @property
    def fix(self) -> str | None:
        """What makes every finding exact (commands joined by ' and '), or None when one has no exact fix."""
        bad = [f for f in self.findings if f.severity != OK]
        if any(not f.exact_fix for f in bad):
            return None
        fixes = list(dict.fromkeys(f.fix for f in bad if f.fix))
        if not fixes:
            fixes = [next((f.fix for f in self.findings if f.fix), None)]
        return " and ".join(fixes) if fixes[0] else None

    def verdict(self) -> str:
        """One line: what happens as is, and the exact route (or why there is none)."""
        as_is = {REFUSE: "refused", IGNORED: "loads but silently ignores part of the adapter",
                 MISSCALED: "loads but computes a different ΔW (mis-scaled)", OK: "loads and computes our ΔW"}
        text = f"{self.target}: as is, {as_is[self.severity]}"
        blocking = [f.rule for f in self.findings if f.severity != OK and not f.exact_fix]
        if blocking:
            return f"{text}; no adapter file computes our ΔW there ({', '.join(blocking)})"
        if self.severity == OK:
            return text + (f"; write it with: {self.fix}" if self.fix else "")
        return f"{text}; exact with: {self.fix}"

    def to_dict(self) -> dict:
        return {"target": self.target, "verdict": self.severity, "summary": self.verdict(), "fix": self.fix,
                "findings": [f.to_dict() for f in self.findings]}


@dataclass
class CheckReport:
    """The whole check: one :class:`TargetVerdict` per requested target."""

    path: str
    targets: list[TargetVerdict]

    def to_dict(self) -> dict:
        """The ``--json`` output."""
        return {"path": self.path, "targets": [t.to_dict() for t in self.targets]}

    def lines(self) -> list[str]:
        """Human output: per target one line per finding, then the verdict line."""
        out = []
        for t in self.targets:
            for f in t.findings:
                fix = f" -> {f.fix}" if f.fix and f.severity != OK else ""
                out.append(f"{t.target}: [{f.severity}] {f.message}{fix}")
            out.append(f"{t.target}: VERDICT {t.verdict()}")
        return out


def check_adapter(adapter_or_path: Adapter | str | Path, targets: Iterable[str],
                  out: str = "OUT", base: str = "BASE") -> CheckReport:
    """Check an adapter (an :class:`Adapter` or an adapterfmt file) against consumer targets.

    Example:
        >>> report = check_adapter("adapter.safetensors", ["vllm", "peft"])  # doctest: +SKIP
        >>> print("\\n".join(report.lines()))  # doctest: +SKIP
    """
    path = str(adapter_or_path) if isinstance(adapter_or_path, (str, Path)) else "ADAPTER"
    names = [TARGET_ALIASES.get(t.lower(), t.lower()) for t in targets]
    for target, name in zip(targets, names):
        if name not in RULES:
            raise UsageError(f"unknown check target {target!r}",
                             hint=f"choose from {', '.join(sorted(RULES))}")
    keys = key_view(adapter_or_path, base)
    adapter = _adapter_for_check(adapter_or_path, keys, names)
    readable = adapter is not UNREADABLE
    facts = adapter_facts(adapter.manifest)
    verdicts = []
    for name in names:
        fields = {"file": path, "out": out, "base": base, "max_rank": facts.max_rank}
        findings = [Finding(name, r.id, r.severity, r.message(facts), r.fix.format(**fields) if r.fix else None,
                            r.exact_fix, r.source) for r in RULES[name] if readable and r.applies(facts)
                    and (keys is None or r.id not in keys.decided_by_keys(name))]
        if keys is not None:
            # The file as the diffusion loaders see it: which of its keys they apply, ignore or refuse.
            findings += [Finding(name, r.id, r.severity,
                                 r.message(keys), r.fix.format(**fields) if r.fix else None, r.exact_fix, r.source)
                         for r in KEY_RULES.get(name, ()) if r.applies(keys)]
        findings.sort(key=lambda f: SEVERITY_ORDER.index(f.severity))
        verdicts.append(TargetVerdict(name, findings))
    return CheckReport(path=path, targets=verdicts)


#: Stands for a diffusion file adapterfmt cannot read: only its keys are checked.
UNREADABLE = Adapter(manifest=Manifest(), tensors={})


def key_view(adapter_or_path, base: str):
    """The key-level view of a diffusion LoRA file as it is (kohya, LyCORIS, diffusers format), else None.

    adapterfmt files are judged by their manifest; ``base`` is used when it names an existing path.
    """
    from ..formats import detect_format
    from .check_rules_diffusion import KeyView
    from .diffusion_keys import read_diffusion_keys
    if not isinstance(adapter_or_path, (str, Path)):
        return None
    from .hub import resolve_path
    path = resolve_path(adapter_or_path)
    keys = read_diffusion_keys(path, base if base and Path(base).exists() else None)
    if keys is None:
        return None
    try:
        if detect_format(Path(path)).name == "adapterfmt":
            return None
    except AdapterFmtError:
        pass  # a family adapterfmt does not read: the loaders' view is all there is
    return KeyView(keys)


def _adapter_for_check(adapter_or_path, keys, names: list[str]) -> Adapter:
    """The adapter the manifest rules look at. A diffusion file adapterfmt cannot read (a family or layout
    it refuses, SGM names without --base) is still checked by its keys for the diffusion targets."""
    if not isinstance(adapter_or_path, (str, Path)):
        return adapter_or_path
    try:
        return load_for_check(adapter_or_path, keys.keys.base if keys is not None else None)
    except AdapterFmtError:
        if keys is None or not set(names) <= set(KEY_RULES):
            raise
        return UNREADABLE


def load_for_check(path: str | Path, base: str | None = None) -> Adapter:
    """The adapter to check: an adapterfmt file's manifest only (no tensor data), or any foreign format
    adapterfmt reads (a PEFT directory, GGUF, MLX, kohya), read as ``convert`` would.

    Example:
        >>> adapter = load_for_check("my-peft-adapter")  # doctest: +SKIP
    """
    from ..conversion_report import ConversionReport
    from ..format.container import parse_manifest, read_header
    from ..formats import ReadOptions, detect_format
    from .hub import resolve_path
    path = resolve_path(path)
    fmt = detect_format(Path(path))
    if fmt.name == "adapterfmt":
        metadata, _ = read_header(path)
        manifest, version = parse_manifest(metadata, str(path))
        return Adapter(manifest=manifest, tensors={}, version=version)
    # A base (an existing path given to check --base) lets kohya SDXL names on SGM blocks be read.
    from .load import load_base
    options = ReadOptions(base=load_base(Path(base))) if base else ReadOptions()
    return fmt.read(Path(path), options, ConversionReport())
