"""``adapterfmt demo``: the whole job on tiny random models, offline, in a few seconds.

Two halves: an LLM (a tiny Llama with PEFT LoRA/rsLoRA/DoRA, LoHa, IA³ files and a NOLA adapter;
:mod:`.demo_llm`) and a diffusion pipeline (a tiny SD 1.x pipeline with an sd-scripts-style kohya
LoRA/LoCon file; :mod:`.demo_diffusion`). Every step prints one line with what it measured.
Only core dependencies are used (no PEFT, sd-scripts, MLX or LyCORIS).
"""
from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

from ..errors import UsageError
from .demo_measure import Steps


def run_demo(out_dir: Path | str | None = None, *, overwrite: bool = False) -> Iterator[str]:
    """Build tiny models, make adapters of several methods, convert, merge, validate; yield log lines.

    A non-empty ``out_dir`` is refused unless ``overwrite`` (then the demo's files are replaced).

    Example:
        >>> for line in run_demo():  # doctest: +SKIP
        ...     print(line)
    """
    from .demo_diffusion import diffusion_steps
    from .demo_llm import llm_steps
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="adapterfmt-demo-"))
    if work.is_dir() and any(work.iterdir()) and not overwrite:
        raise UsageError("demo directory is not empty", path=work,
                         hint="pass --overwrite to replace the demo's files, or choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    step = Steps()
    yield f"demo directory: {work}"
    with _quiet_libraries():
        yield "LLM: a tiny Llama; PEFT-layout LoRA, rsLoRA, DoRA, LoHa, IA³ files; a NOLA adapter"
        yield from llm_steps(work / "llm", step)
        yield "diffusion: a tiny SD 1.x pipeline, an sd-scripts kohya LoRA/LoCon file"
        yield from diffusion_steps(work / "diffusion", step)
    yield f"done: {step.count} steps ran offline on CPU in {time.perf_counter() - start:.0f} s"


@contextlib.contextmanager
def _quiet_libraries():
    """Keep the demo's output to its own lines: no transformers progress bars, no library deprecation notes."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
