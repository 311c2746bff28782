"""The streaming merge against PEFT's merge_and_unload and an in-memory reference."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner

from adapterfmt.cli import main
from adapterfmt.engine.merge import merge
from adapterfmt.engine.unmerge import ulp_distance
from adapterfmt.errors import BaseMismatchError
from adapterfmt.format import read_adapter
from adapterfmt.methods import METHOD_BY_NAME
from tests.engine.common import LLAMA_LINEAR, load_dir, peft_to_native, reference_merge
from tests.helpers import load_model, logits, peft_merged_state, tiny_gpt2, tiny_llama
from tests.matrix.reference import reference_merged
from tests.tuner_helpers import PEFT_TUNERS, make_tuner_adapter

# How to make a real adapter of each method for the generic checks; methods added later
# register a factory here (kwargs for tests.helpers.make_peft_adapter).
FACTORIES = {
    "lora": dict(target_modules=LLAMA_LINEAR, r=4, lora_alpha=8),
    "dora": dict(target_modules=LLAMA_LINEAR, r=4, lora_alpha=8, use_dora=True),
}


def fp64_merged(entry, tensors, canon: torch.Tensor) -> torch.Tensor:
    """W + ΔW in float64, canonical orientation, from the spec's formula (tests/matrix/reference.py),
    never from the method's own code or its conversions."""
    merged = reference_merged(entry.method, entry.params, entry.shape, tensors, canon.double().numpy(),
                              fan_in_fan_out=entry.fan_in_fan_out)
    return torch.from_numpy(merged)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "base", dtype=torch.bfloat16)


def assert_equal_states(got, want):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_llama_bit_identical_to_peft_and_reference(tmp_path, dtype):
    base = tiny_llama(tmp_path / "base", dtype=dtype)
    peft_dir, native = peft_to_native(base, tmp_path, "lora", **FACTORIES["lora"])
    summary = merge(base, [(native, 1.0)], tmp_path / "out", device="cpu")
    got = load_dir(tmp_path / "out")
    assert summary.tensors_changed == 14 and summary.tensors_total == len(got)
    assert_equal_states(got, peft_merged_state(base, peft_dir))
    assert_equal_states(got, reference_merge(base, [(read_adapter(native), 1.0)]))


def test_gpt2_conv1d_fan_in_fan_out_bit_identical(tmp_path):
    base = tiny_gpt2(tmp_path / "base", dtype=torch.bfloat16)
    peft_dir, native = peft_to_native(base, tmp_path, "gpt2", target_modules=["c_attn", "c_proj", "c_fc"],
                                      fan_in_fan_out=True, r=4, lora_alpha=8)
    assert any(e.fan_in_fan_out for e in read_adapter(native).manifest.modules.values())
    merge(base, [(native, 1.0)], tmp_path / "out")
    got = load_dir(tmp_path / "out")
    want = peft_merged_state(base, peft_dir)
    assert_equal_states({k: v for k, v in got.items() if k in want}, {k: want[k] for k in got if k in want})
    assert_equal_states(got, reference_merge(base, [(read_adapter(native), 1.0)]))


def derived_adapter(method: str, lora_path, out):
    """An adapter of ``method`` on the same modules as a real PEFT LoRA (for methods PEFT lacks)."""
    from adapterfmt.ops.convert import convert_methods
    from adapterfmt.format import write_adapter
    from adapterfmt.methods.descriptor import tensor_refs
    from adapterfmt.methods.init_relative import init_relative_params
    from adapterfmt.methods.sorsa import sorsa_params
    from adapterfmt.conversion_report import ConversionReport
    adapter = read_adapter(lora_path)
    if method == "nola":
        adapter = convert_methods(adapter, "nola", {"nola_basis": (24, 24), "seed": 5}, ConversionReport())
        return write_adapter(adapter, out)
    gen = torch.Generator().manual_seed(11)
    tensors = {}
    for target, entry in adapter.manifest.modules.items():
        a, b = adapter.module_tensors(target)["lora_A"], adapter.module_tensors(target)["lora_B"]
        r = a.shape[0]
        if method == "sorsa":
            roles = {"U_p": b, "S_p": torch.rand(r, generator=gen) + 0.5, "Vt_p": a,
                     "U_p0": torch.randn(b.shape, generator=gen) * 0.1,
                     "S_p0": torch.sort(torch.rand(r, generator=gen) + 0.5, descending=True).values,
                     "Vt_p0": torch.randn(a.shape, generator=gen) * 0.1}
            entry.method, entry.params = "sorsa", sorsa_params(r, 2.0 * r)
        elif method == "full":  # a dense ΔW (LyCORIS full): the LoRA's product plus full-rank noise
            roles = {"diff": b.float() @ a.float() + torch.randn(b.shape[0], a.shape[1], generator=gen) * 0.01}
            entry.method, entry.params = "full", {}
        else:
            roles = {"lora_A": a, "lora_B": b, "lora_A0": torch.randn(a.shape, generator=gen) * 0.1,
                     "lora_B0": torch.randn(b.shape, generator=gen) * 0.1}
            entry.method, entry.params = method, init_relative_params(r, entry.params["alpha"], False, method)
        entry.tensors = tensor_refs(target, roles)
        tensors.update({entry.tensors[role].name: t for role, t in roles.items()})
    adapter.tensors = tensors
    return write_adapter(adapter, out)


def adapter_of(method: str, base, tmp_path):
    """(PEFT dir or None, adapterfmt file) of ``method`` for ``base``: real PEFT where PEFT has it."""
    if method in FACTORIES:
        return peft_to_native(base, tmp_path, method, **FACTORIES[method])
    if method in PEFT_TUNERS:
        from adapterfmt.ops.convert import convert
        peft_dir = make_tuner_adapter(base, tmp_path / f"{method}-peft", method)
        convert(peft_dir, tmp_path / f"{method}.safetensors", base=base)
        return peft_dir, tmp_path / f"{method}.safetensors"
    _, lora = peft_to_native(base, tmp_path, "lora", **FACTORIES["lora"])
    return None, derived_adapter(method, lora, tmp_path / f"{method}.safetensors")


#: Methods defined for Linear layers (this file merges into a tiny Llama). Conv-only methods (lora_tucker) are
#: merged in tests/matrix/test_conv_delta_reference.py, tests/formats/test_lycoris_conv.py and
#: tests/formats/test_peft_conv_lycoris.py.
LINEAR_METHODS = sorted(name for name, method in METHOD_BY_NAME.items() if "linear" in method.layers)


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_every_method_streams_like_reference_and_within_1ulp_of_fp64(tmp_path, llama, method):
    _, native = adapter_of(method, llama, tmp_path)
    merge(llama, [(native, 1.0)], tmp_path / "out")
    got = load_dir(tmp_path / "out")
    adapter = read_adapter(native)
    assert_equal_states(got, reference_merge(llama, [(adapter, 1.0)]))
    base = load_dir(llama)
    for target, entry in adapter.manifest.modules.items():
        stored = base[entry.base_weight]
        canon = stored.t() if entry.fan_in_fan_out else stored
        exact = fp64_merged(entry, adapter.module_tensors(target), canon)
        exact = (exact.t() if entry.fan_in_fan_out else exact).to(stored.dtype)
        assert int(ulp_distance(got[entry.base_weight], exact).max()) <= 1, target


def test_weighted_mix_of_methods_against_original_base(tmp_path, llama):
    _, lora = peft_to_native(llama, tmp_path, "l", seed=3, **FACTORIES["lora"])
    _, dora = peft_to_native(llama, tmp_path, "d", seed=4, **FACTORIES["dora"])
    mix = [(lora, 0.7), (dora, 0.3)]
    merge(llama, mix, tmp_path / "out")
    got = load_dir(tmp_path / "out")
    assert_equal_states(got, reference_merge(llama, [(read_adapter(p), w) for p, w in mix]))
    # Order does not matter beyond fp32 addition order: the reversed mix is within one ulp.
    merge(llama, mix[::-1], tmp_path / "rev")
    rev = load_dir(tmp_path / "rev")
    assert max(int(ulp_distance(got[k], rev[k]).max()) for k in got) <= 1


def test_sharded_base_gives_sharded_output_that_transformers_loads(tmp_path):
    base = tmp_path / "base"
    model = load_model(tiny_llama(tmp_path / "single", dtype=torch.bfloat16))
    model.save_pretrained(base, max_shard_size="60KB")
    assert len(list(base.glob("*.safetensors"))) > 2
    peft_dir, native = peft_to_native(base, tmp_path, "lora", **FACTORIES["lora"])
    summary = merge(base, [(native, 1.0)], tmp_path / "out")
    out = tmp_path / "out"
    shards = sorted(out.glob("*.safetensors"))
    assert summary.shards == len(shards) == len(list(base.glob("*.safetensors")))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = load_dir(out)
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for name, shard in index["weight_map"].items():
        assert name in load_dir_one(out / shard)
    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(load_model(base), peft_dir).merge_and_unload()
    merged_model = load_model(out)
    assert merged_model.dtype == torch.bfloat16
    assert torch.equal(logits(merged_model), logits(peft_model))


def load_dir_one(path):
    from safetensors.torch import load_file
    return load_file(path)


def test_shard_size_reshards_and_keeps_values(tmp_path, llama):
    _, native = peft_to_native(llama, tmp_path, "lora", **FACTORIES["lora"])
    merge(llama, [(native, 1.0)], tmp_path / "one")
    merge(llama, [(native, 1.0)], tmp_path / "many", shard_size=40_000)
    shards = list((tmp_path / "many").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and all(p.stat().st_size < 40_000 + 40_000 for p in shards)
    assert_equal_states(load_dir(tmp_path / "many"), load_dir(tmp_path / "one"))


def test_fingerprint_mismatch_refused_unless_force(tmp_path, llama):
    other = tiny_llama(tmp_path / "other", dtype=torch.bfloat16, seed=5)
    _, native = peft_to_native(llama, tmp_path, "lora", **FACTORIES["lora"])
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        merge(other, [(native, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["merge", "--base", str(other), "--adapter", str(native),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "fingerprint" in result.output
    merge(other, [(native, 1.0)], tmp_path / "out", force=True)


def test_cli_json_dtype_side_files_and_permissions(tmp_path, llama):
    _, native = peft_to_native(llama, tmp_path, "lora", **FACTORIES["lora"])
    base = tmp_path / "base"
    import shutil
    shutil.copytree(llama, base)
    (base / "tokenizer.json").write_text("{}")
    (base / "pytorch_model.bin").write_bytes(b"not copied")
    (base / "training_args.pt").write_bytes(b"not copied")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", "--base", str(base), "--adapter", f"{native}:0.5",
                                       "--out", str(out), "--dtype", "fp32", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    for key in ("tensors_changed", "bytes_read", "bytes_written", "seconds", "peak_rss_bytes"):
        assert summary[key] > 0, key
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in load_dir(out).values())
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert not list(tmp_path.glob(".adapterfmt-tmp-*"))


# PEFT rounds a pruned AdaLoRA's fp32 factors to a bf16 base's dtype on load (the resized parameters
# take the base dtype), so its merge is within one ulp of the exact one, not bit-identical.
PEFT_ROUNDS_FACTORS = {"adalora"}


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_row_block_merge_is_bit_identical_to_whole_tensor_merge(tmp_path, llama, method, monkeypatch):
    import adapterfmt.engine.merge as merge_module
    peft_dir, native = adapter_of(method, llama, tmp_path)
    merge(llama, [(native, 1.0)], tmp_path / "whole")
    monkeypatch.setattr(merge_module, "ROW_BLOCK_BYTES", 7 * 64 * 4)  # 7-row blocks: uneven last block
    merge(llama, [(native, 1.0)], tmp_path / "blocks")
    merge(llama, [(native, 0.5), (native, 0.25)], tmp_path / "blocks-mix")
    monkeypatch.setattr(merge_module, "ROW_BLOCK_BYTES", 1 << 40)
    merge(llama, [(native, 0.5), (native, 0.25)], tmp_path / "whole-mix")
    assert_equal_states(load_dir(tmp_path / "blocks"), load_dir(tmp_path / "whole"))
    assert_equal_states(load_dir(tmp_path / "blocks-mix"), load_dir(tmp_path / "whole-mix"))
    if peft_dir is not None and method not in PEFT_ROUNDS_FACTORS:
        assert_equal_states(load_dir(tmp_path / "blocks"), peft_merged_state(llama, peft_dir))
    elif peft_dir is not None:
        want, got = peft_merged_state(llama, peft_dir), load_dir(tmp_path / "blocks")
        assert max(int(ulp_distance(got[k], want[k]).max()) for k in want) <= 1
