"""Progress bars for long per-module work (on a terminal only; never in --json or piped output)."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """Iterate ``items`` with a progress bar on stderr, shown only when stderr is a terminal.

    Example:
        >>> list(progress([1, 2], "convert"))
        [1, 2]
    """
    from tqdm import tqdm
    return tqdm(items, desc=desc, total=total, unit="module", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())
