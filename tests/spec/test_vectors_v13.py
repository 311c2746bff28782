"""Spec 1.3 conformance: the methods and features of format 1.3 (spec/vectors/v1.3).

- the second reader (written from spec/ alone) accepts every positive vector within its rtol and refuses
  every must-refuse vector with the class INDEX.json names (reading, then computing each module's value:
  trainable_tokens' index rules are refused when merged or validated, methods-tuners.md §2);
- the package agrees: read_adapter + the method's ΔW / merged weight, the merge engine, and the CLI;
- the committed bytes are pinned (tests/spec/v1.3.sha256) and the generator reproduces them, while the
  v1.2 generator (whose helpers the v1.3 one imports) still reproduces v1.2.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

import independent_delta as idl
import independent_reader as ir
from adapterfmt import merge, read_adapter
from adapterfmt.cli import main
from adapterfmt.errors import AdapterFmtError
from adapterfmt.methods import get_method

ROOT = Path(__file__).resolve().parents[2]
V13 = ROOT / "spec" / "vectors" / "v1.3"
INDEX = json.loads((V13 / "INDEX.json").read_text())
POSITIVE = {e["file"]: e for e in INDEX["positive"]}
INVALID = {e["file"]: e for e in INDEX["invalid"]}
BIAS = "bias."


def pinned(version: str = "1.3") -> dict[str, str]:
    lines = Path(__file__).with_name(f"v{version}.sha256").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def test_v13_vectors_are_pinned_and_indexed():
    files = {str(p.relative_to(V13)) for p in V13.rglob("*") if p.is_file()}
    pins = pinned()
    assert files == set(pins), files ^ set(pins)
    for name, digest in pins.items():
        assert hashlib.sha256((V13 / name).read_bytes()).hexdigest() == digest, \
            f"{name} changed: released vectors are frozen"
    listed = set(POSITIVE) | set(INVALID) | {e["expected"] for e in POSITIVE.values()} | {"base.safetensors"}
    assert files - {"INDEX.json"} == listed


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_generators_reproduce_the_committed_vectors(version, tmp_path):
    """v1.3's generator reuses v1.2's builders: both keep producing their committed bytes."""
    tool = _tool(f"make_conformance_vectors_v{version.replace('.', '')}")
    tool.main(tmp_path / version)
    for name, digest in pinned(version).items():
        assert hashlib.sha256((tmp_path / version / name).read_bytes()).hexdigest() == digest, name


def test_v13_vectors_cover_every_1_3_method_and_feature():
    from adapterfmt.format.versions import FEATURE_SINCE, METHOD_SINCE, features_of
    entries = [e for p in POSITIVE for e in ir.read(V13 / p).manifest["modules"].values()]
    assert {m for m, v in METHOD_SINCE.items() if v == (1, 3)} <= {e["method"] for e in entries}
    assert {what for what, since, _ in FEATURE_SINCE if since == (1, 3)} == {
        what for e in entries for what, _ in features_of(e)}


# ------------------------------------------------------------------ the second reader
def base_tensors() -> dict:
    return ir.parse_container((V13 / "base.safetensors").read_bytes())[1]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def expected_values(entry: dict) -> dict[str, np.ndarray]:
    tensors = ir.parse_container((V13 / entry["expected"]).read_bytes())[1]
    return {name: ir.to_array64(*t) for name, t in tensors.items()}


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_independent_reader_accepts_v13_positive_vectors(name):
    entry, base = POSITIVE[name], base_tensors()
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
    base = base_tensors()
    with pytest.raises(ir.Refusal) as caught:
        adapter = ir.read(V13 / name)
        for module in adapter.manifest["modules"]:
            idl.merged(adapter, module, idl.canonical_base(adapter, module, base))
    assert type(caught.value).__name__ == INVALID[name]["refusal"], caught.value


# ------------------------------------------------------------------ the package
def package_values(path: Path, kind: str) -> dict[str, np.ndarray]:
    """Per module: ΔW (kind "delta") or the merged weight (kind "merged"), from read_adapter + the method."""
    base = load_file(str(V13 / "base.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = read_adapter(path)
    values = {}
    for target, entry in adapter.manifest.modules.items():
        method, tensors = get_method(entry.method), adapter.module_tensors(target)
        canon = entry.canonical(base[entry.base_weight].float())
        value = method.merged(entry, tensors, canon) if kind == "merged" else method.delta(entry, tensors, canon)
        values[target] = value.double().numpy()
        if "diff_b" in tensors:  # methods-full.md: the layer's bias is <base_weight without .weight>.bias
            bias = entry.base_weight.removesuffix(".weight") + ".bias"
            values[BIAS + bias] = (base[bias].double() + tensors["diff_b"].double()).numpy()
    return values


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_package_agrees_on_v13_positive_vectors(name):
    entry = POSITIVE[name]
    got, expected = package_values(V13 / name, entry["expected_kind"]), expected_values(entry)
    assert set(got) == set(expected)
    for key in expected:
        assert relative_error(got[key], expected[key]) <= entry["rtol"], key


@pytest.mark.parametrize("name", sorted(INVALID))
def test_package_refuses_v13_invalid_vectors_with_the_same_class(name):
    with pytest.raises(AdapterFmtError) as caught:
        package_values(V13 / name, "delta")
    assert type(caught.value).__name__ == INVALID[name]["refusal"], caught.value


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("v13-base")
    shutil.copy(V13 / "base.safetensors", directory / "model.safetensors")
    return directory


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_merge_engine_applies_v13_positive_vectors(name, base_dir, tmp_path):
    """adapterfmt.merge: every base tensor the vector changes equals the expected value, rounded once."""
    entry = POSITIVE[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(base_dir, [V13 / name], tmp_path / "out")
        manifest = read_adapter(V13 / name).manifest
    merged, base = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(V13 / "base.safetensors"))
    for key, want in expected_values(entry).items():
        if key.startswith(BIAS):
            target, fifo, start = key[len(BIAS):], False, 0.0
        else:
            module = manifest.modules[key]
            target, fifo = module.base_weight, module.fan_in_fan_out
            start = 0.0 if entry["expected_kind"] == "merged" else base[target].double().numpy()
            start = start.T if fifo and entry["expected_kind"] == "delta" else start
        got = merged[target].double().numpy()
        got = got.T if fifo else got
        want = want + start
        # one rounding to the base dtype: half an ulp, at most 2^-8 of the value for BF16, 2^-24 for F32
        half_ulp = 2.0**-8 if base[target].dtype.itemsize == 2 else 2.0**-24
        limit = entry["rtol"] * np.abs(want).max() + half_ulp * np.abs(want)
        assert (np.abs(got - want) <= limit).all(), key


@pytest.mark.parametrize("name", sorted(POSITIVE))
def test_cli_validates_v13_positive_vectors(name):
    result = CliRunner().invoke(main, ["validate", str(V13 / name)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", sorted(INVALID))
def test_cli_refuses_v13_invalid_vectors_in_one_line(name):
    result = CliRunner().invoke(main, ["validate", str(V13 / name)])
    assert result.exit_code != 0, result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert "Traceback" not in result.output and len(errors) == 1, result.stderr
    assert Path(name).name in errors[0]


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
