"""The vocabulary of ``adapterfmt check``: severities and the :class:`Rule` a consumer table is made of."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .adapter_facts import AdapterFacts

REFUSE, IGNORED, MISSCALED, OK = "refuse", "ignored", "mis-scaled", "ok"
#: Worst first: the verdict of a target is its worst finding.
SEVERITY_ORDER = (REFUSE, IGNORED, MISSCALED, OK)


@dataclass(frozen=True)
class Rule:
    """One consumer behaviour: when ``applies(facts)``, the consumer does ``severity`` for ``message(facts)``.

    ``fix`` is the command that produces a file computing exactly our ΔW there (placeholders
    ``{file}``, ``{out}``, ``{base}``), or an alternative when no adapter file can (``exact_fix=False``).
    """

    id: str
    severity: str
    applies: Callable[[AdapterFacts], bool]
    message: Callable[[AdapterFacts], str]
    fix: str | None = None
    exact_fix: bool = True
    source: str = ""
