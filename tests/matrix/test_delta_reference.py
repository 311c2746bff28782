"""Every method's ΔW, and the engine's merge of it, against the independent float64 formula of the spec.

The reference (``tests/matrix/reference.py``) is written from ``spec/`` and never calls a method's
own code or its conversions; the tolerance table is in that module's docstring. Hypothesis draws
shapes, ranks, storage dtypes (F32/F16/BF16), alpha and the scale rule (rsLoRA; SORSA's
``alpha: null``), NOLA seeds over the whole uint64 range and NOLA ``rows``, and the layer kind,
so that ``fan_in_fan_out`` bases (stored as the transpose) are merged too.

1. ``Method.delta`` (canonical orientation, fp32) agrees with the reference ΔW.
2. ``adapterfmt.merge`` of a one-module adapter into a one-tensor fp32 base, stored transposed when
   ``fan_in_fan_out``, at weight 1 (a method's own ``merged``: DoRA) or another weight (ΔW path),
   agrees with ``W + w·ΔW_ref`` in the base's stored orientation, within the table's ΔW bound times
   |w| plus the two final fp32 roundings (``w·ΔW`` and the sum).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from safetensors.torch import save_file

import adapterfmt
from adapterfmt.format import Adapter, BaseWeight, Manifest
from adapterfmt.methods import get_method

from .builders import CONV_ONLY_VARIANTS, VARIANTS, Target, build_module, uncovered_methods
from .reference import U32, as_float64, delta_bound, reference_delta, within

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Every variant of the builders, plus NOLA restricted to a block of output rows.
CASES = sorted(set(VARIANTS) - CONV_ONLY_VARIANTS) + ["nola_rows"]
WORK = Path(tempfile.mkdtemp(prefix="adapterfmt-delta-ref-"))
DELTA_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MERGE_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def modules(draw, case: str):
    """(entry, tensors, canonical fp32 base) of one random module of ``case``."""
    variant = "nola" if case == "nola_rows" else case
    method = get_method(VARIANTS[variant][0])
    # OFT rotates blocks of at least two inputs.
    out_f, in_f, rank = draw(st.integers(1, 12)), draw(st.integers(2 if method.name == "oft" else 1, 12)), \
        draw(st.integers(1, 6))
    layer = draw(st.sampled_from([k for k in ("linear", "conv1d", "embedding") if k in method.layers]))
    dtype = draw(st.sampled_from(DTYPES))
    alpha = draw(st.one_of(st.integers(1, 64).map(float), st.floats(0.01, 64, allow_nan=False)))
    rows = None
    if case == "nola_rows":
        start = draw(st.integers(0, out_f - 1))
        rows = [start, draw(st.integers(start + 1, out_f))]
    seeds = (draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    entry, tensors = build_module(variant, Target("model.layers.0.mlp.proj", [out_f, in_f], layer), rank, alpha,
                                  gen, dtype, rows=rows, seeds=seeds)
    base = torch.randn(out_f, in_f, generator=gen)
    return entry, tensors, base


def test_every_method_has_a_case():
    assert not uncovered_methods(), "a new method needs a builder row (tests/matrix/builders.py) and a " \
                                    "reference formula with a tolerance row (tests/matrix/reference.py)"


@pytest.mark.parametrize("case", CASES)
def test_delta_matches_spec_formula(case):
    @DELTA_SETTINGS
    @given(modules(case))
    def check(module):
        entry, tensors, base = module
        ours = get_method(entry.method).delta(entry, tensors, base.clone()).double().numpy()
        t64, base64 = as_float64(tensors), base.double().numpy()
        want = reference_delta(entry.method, entry.params, entry.shape, t64, base64, entry.fan_in_fan_out)
        assert ours.shape == want.shape
        ok, excess = within(ours, want, delta_bound(entry.method, entry.params, t64, want, base64))
        assert ok, f"{entry.method}: ΔW exceeds the tolerance table by {excess:.3g}"

    check()


def merge_one(entry, tensors, base: torch.Tensor, weight: float, where: Path) -> np.ndarray:
    """Merge one module into a one-tensor base file (stored transposed when fan_in_fan_out)."""
    stored = (base.t() if entry.fan_in_fan_out else base).contiguous()
    base_file = where / "base.safetensors"
    save_file({entry.base_weight: stored}, str(base_file))
    manifest = Manifest(created_by="tests.matrix")
    manifest.modules["model.layers.0.mlp.proj"] = entry
    manifest.base.weights[entry.base_weight] = BaseWeight(shape=list(stored.shape))
    names = {ref.name: tensors[role] for role, ref in entry.tensors.items()}
    adapterfmt.merge(base_file, [(Adapter(manifest=manifest, tensors=names), weight)], where / "out",
                     device="cpu", overwrite=True)
    (merged_file,) = (where / "out").glob("*.safetensors")
    return load_file(merged_file)[entry.base_weight].astype(np.float64)


@pytest.mark.parametrize("case", CASES)
def test_engine_merge_matches_spec_formula_in_stored_orientation(case):
    @MERGE_SETTINGS
    @given(modules(case), st.sampled_from([1.0, 0.5, -0.75]))
    def check(module, weight):
        entry, tensors, base = module
        got = merge_one(entry, tensors, base, weight, WORK)
        t64, base64 = as_float64(tensors), base.double().numpy()
        delta = reference_delta(entry.method, entry.params, entry.shape, t64, base64, entry.fan_in_fan_out)
        want = base64 + weight * delta
        bound = abs(weight) * delta_bound(entry.method, entry.params, t64, delta, base64) \
            + 2 * U32 * (np.abs(weight * delta) + np.abs(want))
        stored_want, stored_bound = (want.T, np.asarray(bound).T) if entry.fan_in_fan_out else (want, bound)
        assert got.shape == stored_want.shape, "the merged tensor lost its stored orientation"
        ok, excess = within(got, stored_want, stored_bound)
        assert ok, f"{entry.method} on {entry.layer} (fan_in_fan_out={entry.fan_in_fan_out}, w={weight}): " \
                   f"merge exceeds the bound by {excess:.3g}"

    check()
