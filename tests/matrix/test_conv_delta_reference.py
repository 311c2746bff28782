"""conv2d ΔW (LoRA, LoHa, LoKr, flattened and Tucker; Tucker LoRA) and the engine's merge of it, against the
independent float64 formulas of ``tests/matrix/reference.py`` (spec/methods-tuners.md §6).

Hypothesis draws the channel counts, the kernel (1×1 and k×k, square or not), the rank, alpha and the storage
dtype; the builders choose the form as LyCORIS and PEFT do (Tucker only on k×k kernels, LoKr's layout by
PEFT's rule).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterfmt.methods import get_method

from .builders import Target, build_module
from .reference import U32, as_float64, delta_bound, reference_delta, within
from .test_delta_reference import DTYPES, WORK, merge_one

VARIANTS = ["lora", "loha", "loha_tucker", "lokr", "lokr_tucker", "lora_tucker"]
CORES = {"loha_tucker": "t1", "lokr_tucker": "t2", "lora_tucker": "lora_mid"}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_modules(draw, variant: str):
    """(entry, tensors, fp32 base (out, in, kh, kw)) of one random conv2d module."""
    out_f, in_f = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kernel = draw(st.sampled_from([(1, 1), (3, 3), (2, 3), (5, 1)]))
    rank, dtype = draw(st.integers(1, 4)), draw(st.sampled_from(DTYPES))
    alpha = draw(st.one_of(st.integers(1, 64).map(float), st.floats(0.01, 64, allow_nan=False)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    shape = [out_f, in_f, *kernel]
    entry, tensors = build_module(variant, Target("model.conv", shape, "conv2d"), rank, alpha, gen, dtype)
    return entry, tensors, torch.randn(shape, generator=gen)


@pytest.mark.parametrize("variant", VARIANTS)
def test_conv_delta_matches_spec_formula(variant):
    seen_core = []

    @SETTINGS
    @given(conv_modules(variant))
    def check(module):
        entry, tensors, _ = module
        get_method(entry.method).check_entry("model.conv", entry)
        ours = get_method(entry.method).delta(entry, tensors).double().numpy()
        t64 = as_float64(tensors)
        want = reference_delta(entry.method, entry.params, entry.shape, t64)
        assert ours.shape == want.shape == tuple(entry.shape)
        ok, excess = within(ours, want, delta_bound(entry.method, entry.params, t64, want))
        assert ok, f"{variant}: ΔW exceeds the tolerance table by {excess:.3g}"
        seen_core.append(CORES.get(variant, "-") in tensors)

    check()
    assert any(seen_core) == (variant in CORES)  # the Tucker variants did draw Tucker modules


@pytest.mark.parametrize("variant", VARIANTS)
def test_conv_merge_matches_spec_formula(variant):
    @settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(conv_modules(variant), st.sampled_from([1.0, -0.75]))
    def check(module, weight):
        entry, tensors, base = module
        got = merge_one(entry, tensors, base, weight, WORK)
        t64, base64 = as_float64(tensors), base.double().numpy()
        delta = reference_delta(entry.method, entry.params, entry.shape, t64)
        want = base64 + weight * delta
        bound = abs(weight) * delta_bound(entry.method, entry.params, t64, delta) \
            + 2 * U32 * (np.abs(weight * delta) + np.abs(want))
        ok, excess = within(got, want, bound)
        assert ok, f"{variant} (w={weight}): merge exceeds the bound by {excess:.3g}"

    check()
