"""Spec 1.3 conformance: the methods and features of format 1.3 (spec/vectors/v1.3).

- the second reader (written from spec/ alone) accepts every positive vector within its rtol and refuses
  every must-refuse vector with the class INDEX.json names (reading, then computing each module's value:
  trainable_tokens' index rules are refused when merged or validated, methods-tuners.md §2);
- the package agrees: read_adapter + the method's ΔW / merged weight, the merge engine, and the CLI;
- the committed bytes are pinned (tests/spec/v1.3.sha256) and the generator reproduces them, while the
  v1.2 generator (whose helpers the v1.3 one imports) still reproduces v1.2.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import independent_delta as idl
import independent_reader as ir
import package_checks as checks
from adapterfmt import read_adapter

VECTORS = checks.VectorSet("1.3", "bias.")
V13, POSITIVE, INVALID, BIAS = VECTORS.directory, VECTORS.positive, VECTORS.invalid, VECTORS.prefix
relative_error = checks.relative_error


def test_v13_vectors_are_pinned_and_indexed():
    checks.pinned_and_indexed(VECTORS)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_generators_reproduce_the_committed_vectors(version, tmp_path):
    """v1.3's generator reuses v1.2's builders: both keep producing their committed bytes."""
    checks.generator_reproduces(version, tmp_path)


def test_v13_vectors_cover_every_1_3_method_and_feature():
    from adapterfmt.format.versions import FEATURE_SINCE, METHOD_SINCE, features_of
    entries = [e for p in POSITIVE for e in ir.read(V13 / p).manifest["modules"].values()]
    assert {m for m, v in METHOD_SINCE.items() if v == (1, 3)} <= {e["method"] for e in entries}
    assert {what for what, since, _ in FEATURE_SINCE if since == (1, 3)} == {
        what for e in entries for what, _ in features_of(e)}


# ------------------------------------------------------------------ the second reader
def expected_values(entry: dict) -> dict[str, np.ndarray]:
    return checks.expected_values(VECTORS, entry)


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_independent_reader_accepts_v13_positive_vectors(name):
    entry, base = POSITIVE[name], checks.base_tensors(VECTORS)
    adapter = ir.read(V13 / name)
    assert adapter.version == tuple(int(v) for v in entry["version"].split("."))
    value = idl.merged if entry["expected_kind"] == "merged" else idl.delta
    expected = expected_values(entry)
    modules = adapter.manifest["modules"]
    biases = idl.bias_deltas(adapter)
    assert set(expected) == set(modules) | {BIAS + key for key in biases}
    for module in modules:
        got = value(adapter, module, idl.canonical_base(adapter, module, base))
        assert relative_error(got, expected[module]) <= entry["rtol"], module
    for key, delta in biases.items():
        assert relative_error(ir.to_array64(*base[key]) + delta, expected[BIAS + key]) <= entry["rtol"], key
    assert idl.validate(adapter, base) == []


@pytest.mark.parametrize("name", sorted(INVALID))
def test_independent_reader_refuses_v13_invalid_vectors(name):
    """Refused on reading, or (trainable_tokens' index rules) when the merged weight is computed."""
    base = checks.base_tensors(VECTORS)
    with pytest.raises(ir.Refusal) as caught:
        adapter = ir.read(V13 / name)
        for module in adapter.manifest["modules"]:
            idl.merged(adapter, module, idl.canonical_base(adapter, module, base))
    assert type(caught.value).__name__ == INVALID[name]["refusal"], caught.value


# ------------------------------------------------------------------ the package
@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_package_agrees_on_v13_positive_vectors(name):
    checks.package_agrees(VECTORS, name)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_package_refuses_v13_invalid_vectors_with_the_same_class(name):
    checks.package_refuses(VECTORS, name)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return checks.base_model_dir(VECTORS, tmp_path_factory.mktemp("v13-base"))


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_merge_engine_applies_v13_positive_vectors(name, base_dir, tmp_path):
    checks.merge_engine_applies(VECTORS, name, base_dir, tmp_path / "out")


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_cli_validates_v13_positive_vectors(name):
    checks.cli_validates(VECTORS, name)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_cli_refuses_v13_invalid_vectors_in_one_line(name):
    checks.cli_refuses_in_one_line(VECTORS, name)


# ------------------------------------------------------------------ a real consumer: LyCORIS's functional ΔW
def _lycoris_delta(entry, t):
    """ΔW as lycoris-lora 4.1.3 computes it from the vector's tensors (its names: w*d = w*_b, w*u = w*_a)."""
    import lycoris.functional.locon as locon
    import lycoris.functional.loha as loha
    import lycoris.functional.lokr as lokr
    scale = entry.params["scale"]
    if entry.method == "lora_tucker":
        return locon.diff_weight(t["lora_A"], t["lora_B"], t["lora_mid"], gamma=scale, backend="torch")
    if entry.method == "loha":
        return loha.diff_weight(t["w1_b"], t["w1_a"], t["w2_b"], t["w2_a"], t.get("t1"), t.get("t2"), gamma=scale,
                                backend="torch")
    return lokr.kron_weight(*(t.get(r) for r in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")), scale=scale,
                            backend="torch")


@pytest.mark.parametrize("name", ["lora_tucker.safetensors", "loha_conv2d.safetensors",
                                  "loha_conv2d_tucker.safetensors", "lokr_conv2d.safetensors",
                                  "lokr_conv2d_tucker.safetensors"])
def test_v13_convolution_vectors_match_lycoris(name):
    """The expected ΔW of every convolution vector is what LyCORIS computes from the same tensors."""
    entry, expected = POSITIVE[name], expected_values(POSITIVE[name])
    adapter = read_adapter(V13 / name)
    for target, module in adapter.manifest.modules.items():
        got = _lycoris_delta(module, adapter.module_tensors(target)).double().numpy()
        assert relative_error(got.reshape(module.shape), expected[target]) <= entry["rtol"], target


def test_v13_dora_eps_vectors_match_lycoris_weight_decompose():
    """Every DoRA module with norm_eps 2^-23 (both axes, linear and conv2d) merges as LyCORIS's
    _weight_decompose (which adds fp32's eps to the norm) does on V = W + ΔW_lora."""
    import torch
    from lycoris.functional.general import _weight_decompose
    base = load_file(str(V13 / "base.safetensors"))
    checked = 0
    for name in ("dora_in_eps.safetensors", "dora_conv2d.safetensors"):
        entry, expected = POSITIVE[name], expected_values(POSITIVE[name])
        adapter = read_adapter(V13 / name)
        for target, module in adapter.manifest.modules.items():
            if module.params.get("norm_eps") != 2.0**-23:
                continue
            t = adapter.module_tensors(target)
            a, b = t["lora_A"].flatten(1), t["lora_B"].flatten(1)
            v = base[module.base_weight].float() + (b @ a).reshape(module.shape) * module.params["scale"]
            on_out = module.params["magnitude_axis"] == "out"
            shape = [-1 if axis == (0 if on_out else 1) else 1 for axis in range(v.dim())]
            got = _weight_decompose(v, t["magnitude"].reshape(shape), 1, on_out)
            assert relative_error(got.double().numpy(), expected[target]) <= entry["rtol"], target
            checked += 1
    assert checked == 3


def test_v13_trainable_tokens_vector_matches_peft():
    """PEFT's TrainableTokens on an nn.Embedding and an nn.Linear head, given the vector's indices and values,
    merges (merge_and_unload) to the expected weights, rounded once to the base dtype."""
    import torch
    from peft import TrainableTokensConfig, get_peft_model
    entry = POSITIVE["trainable_tokens.safetensors"]
    adapter, expected = read_adapter(V13 / "trainable_tokens.safetensors"), expected_values(entry)
    base = load_file(str(V13 / "base.safetensors"))
    for target, module in adapter.manifest.modules.items():
        stored = base[module.base_weight]
        layer = (torch.nn.Embedding(*stored.shape) if module.layer == "embedding"
                 else torch.nn.Linear(stored.shape[1], stored.shape[0], bias=False)).to(stored.dtype)
        layer.weight.data = stored.clone()
        wrapper = torch.nn.Module()
        wrapper.layer = layer
        tensors = adapter.module_tensors(target)
        model = get_peft_model(wrapper, TrainableTokensConfig(target_modules=["layer"],
                                                              token_indices=tensors["indices"].tolist()))
        model.base_model.model.layer.trainable_tokens_delta["default"].data = tensors["values"].to(stored.dtype)
        merged = model.merge_and_unload().layer.weight.detach().double().numpy()
        want = expected[target].T if module.fan_in_fan_out else expected[target]
        half_ulp = 2.0**-8 if stored.dtype.itemsize == 2 else 2.0**-24
        assert (np.abs(merged - want) <= half_ulp * np.abs(want)).all(), target
