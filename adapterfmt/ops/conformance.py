"""Check this implementation against the spec's conformance vectors.

Usage: ``python -m adapterfmt.ops.conformance spec/vectors`` (exit 0 when every vector passes).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from ..methods import get_method, read_checked_adapter

EXPECTED_SUFFIX = ".expected.safetensors"
BASE_FILE = "base.safetensors"
# ΔW is compared in fp32 against an fp64-derived expectation; BLAS summation order may differ
# between machines, so the tolerance is relative to the largest entry.
REL_TOL = 1e-5


def expected_kind(path: Path) -> str:
    """``delta`` or ``merged`` (spec §11: v1.2 INDEX.json says which; older vectors hold ΔW)."""
    index = path.parent / "INDEX.json"
    entries = json.loads(index.read_text()).get("positive", []) if index.is_file() else []
    return next((e.get("expected_kind", "delta") for e in entries if e["file"] == path.name), "delta")


def check_vector(path: Path) -> list[str]:
    """Problems found for one vector file (empty when it conforms)."""
    expected = load_file(str(path.with_name(path.name[: -len(".safetensors")] + EXPECTED_SUFFIX)))
    base_path = path.parent / BASE_FILE
    base = load_file(str(base_path)) if base_path.is_file() else {}
    adapter = read_checked_adapter(path)
    merged = expected_kind(path) == "merged"
    problems = []
    values = {}
    for target, entry in adapter.manifest.modules.items():
        weight = base.get(entry.base_weight)
        canon = None
        if weight is not None:
            canon = entry.canonical(weight.float())
        method, tensors = get_method(entry.method), adapter.module_tensors(target)
        values[target] = method.merged(entry, tensors, canon) if merged else method.delta(entry, tensors, canon)
    for key, payload in adapter.manifest.payloads.items():
        if payload.kind == "bias_delta" and key in base:  # spec §11: payload.<target> = base + delta
            values[f"payload.{key}"] = base[key].double() + adapter.tensors[payload.tensor.name].double()
    for entry in adapter.manifest.modules.values():
        if "diff_b" in entry.tensors:  # spec §11 (v1.3): bias.<bias parameter> = b + diff_b (methods-full.md)
            bias = entry.base_weight.removesuffix(".weight") + ".bias"
            if bias in base:
                values[f"bias.{bias}"] = base[bias].double() + adapter.tensors[entry.tensors["diff_b"].name].double()
    for target, delta in values.items():
        want = expected.get(target)
        if want is None:
            problems.append(f"{path.name}: no expected ΔW for {target}")
            continue
        err = float((delta.double() - want.double()).abs().max())
        limit = REL_TOL * max(float(want.abs().max()), 1e-30)
        if list(delta.shape) != list(want.shape) or err > limit:
            problems.append(f"{path.name}: {target}: max|ΔW error| {err:.3g} > {limit:.3g}")
    return problems


def run(directory: Path) -> int:
    # Files under invalid/ are must-refuse vectors (spec/README.md §11), checked by tests/spec.
    files = sorted(p for p in directory.rglob("*.safetensors")
                   if not p.name.endswith(EXPECTED_SUFFIX) and p.name != BASE_FILE
                   and "invalid" not in p.relative_to(directory).parts)
    failures = 0
    for path in files:
        problems = check_vector(path)
        failures += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {path.relative_to(directory)}")
        for problem in problems:
            print(f"     {problem}")
    print(f"{len(files) - failures} passed, {failures} failed")
    return 1 if failures or not files else 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1] if len(sys.argv) > 1 else "spec/vectors")))
