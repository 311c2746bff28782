"""Conv LoCon / LoHa / LoKr ΔW (flattened and Tucker; 1×1, 3×3 and 7×7 kernels) against ``lycoris.functional``.

The modules come from files LyCORIS itself saved (``tests/formats/lycoris_conv_files.py``). The reference is
LyCORIS's functional API with the scale its modules' forward pass applies (alpha/r; LoKr: 1 for two full
halves), never the module's ``get_diff_weight`` (which applies the scale twice in 4.1.3).
"""
from __future__ import annotations

import pytest
import torch

import adapterfmt
from adapterfmt.methods import get_method

from ..formats.lycoris_conv_files import CASES, shared_case

functional = pytest.importorskip("lycoris.functional")
from lycoris.functional import locon, loha, lokr  # noqa: E402


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    work = tmp_path_factory.mktemp("lycoris-conv-ref")
    made = {}
    for algo, tucker in CASES:
        base, path, _ = shared_case(tmp_path_factory, algo, tucker)
        native = work / f"{algo}{tucker}.adapterfmt.safetensors"
        adapterfmt.convert(path, native, base=base)
        made[(algo, tucker)] = adapterfmt.read_adapter(native)
    return made


def _flat(t):
    return None if t is None else t.reshape(t.shape[0], -1)


def lycoris_delta(entry, t) -> torch.Tensor:
    """ΔW from lycoris.functional, with LyCORIS's argument orders and storage (flattened conv factors)."""
    scale = entry.params["scale"]
    if entry.method in ("lora", "lora_tucker"):
        return locon.diff_weight(t["lora_A"], t["lora_B"], t.get("lora_mid"), gamma=scale, backend="torch")
    if entry.method == "loha":
        tucker = "t1" in t
        w1b, w2b = (t["w1_b"], t["w2_b"]) if tucker else (_flat(t["w1_b"]), _flat(t["w2_b"]))
        delta = loha.diff_weight(w1b, t["w1_a"], w2b, t["w2_a"], t.get("t1"), t.get("t2"), gamma=scale,
                                 backend="torch")
        return delta.reshape(entry.shape)
    w2b = t.get("w2_b") if "t2" in t else _flat(t.get("w2_b"))
    delta = lokr.kron_weight(t.get("w1"), t.get("w1_a"), t.get("w1_b"), t.get("w2"), t.get("w2_a"), w2b, t.get("t2"),
                             scale=scale, backend="torch")
    return delta.reshape(entry.shape)


@pytest.mark.parametrize("case", list(CASES), ids=[f"{a}{'-tucker' if t else ''}" for a, t in CASES])
def test_conv_delta_equals_lycoris_functional(adapters, case):
    adapter = adapters[case]
    kernels, worst = set(), 0.0
    for target, entry in adapter.manifest.modules.items():
        t = adapter.module_tensors(target)
        ours = get_method(entry.method).delta(entry, t)
        ref = lycoris_delta(entry, t)
        assert ours.shape == ref.shape == torch.Size(entry.shape), target
        if entry.method == "lora":
            # Plain conv LoRA keeps PEFT's operation order ((B·A)·s); LyCORIS scales B first: rounding only.
            torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-7)
            worst = max(worst, float((ours - ref).abs().max()))
        else:
            assert torch.equal(ours, ref), target
        kernels.add(tuple(entry.shape[2:]))
    assert {(1, 1), (3, 3)} <= kernels
    assert worst < 1e-6


def test_lokr_functional_diff_weight_reads_the_rank_from_w2_a(adapters):
    """Why the LoKr reference calls kron_weight with the scale: lycoris.functional.lokr.diff_weight(gamma=alpha)
    divides by w1_a.shape[1], else w2_a.shape[1], which for a Tucker w2_a (r, b) is b, not the rank."""
    adapter = adapters[("lokr", True)]
    seen = 0
    for target, entry in adapter.manifest.modules.items():
        t = adapter.module_tensors(target)
        if "t2" not in t:
            continue
        # The same module with W1 stored full (as LyCORIS does without decompose_both).
        full = {"w1": t["w1_a"] @ t["w1_b"], "t2": t["t2"], "w2_a": t["w2_a"], "w2_b": t["w2_b"]}
        got = lokr.diff_weight(full["w1"], None, None, None, full["w2_a"], full["w2_b"], full["t2"],
                               gamma=entry.params["alpha"], backend="torch").reshape(entry.shape)
        ours = get_method("lokr").delta(entry, full)
        rank, b = entry.params["rank"], t["w2_a"].shape[1]
        assert rank != b
        torch.testing.assert_close(got, ours * (rank / b), rtol=1e-6, atol=0)
        seen += 1
    assert seen
