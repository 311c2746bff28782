"""GGUF LoRA: round trips, and the file as llama.cpp's loader and export-lora see it."""
from __future__ import annotations

import json
import sys

import gguf
import numpy as np
import pytest
import torch

from adapterfmt.ops.convert import convert
from adapterfmt.errors import ForeignFormatError, UsageError
from adapterfmt.formats.gguf_arch import ARCHITECTURES, name_table
from adapterfmt.formats.gguf_lora import gguf_to_hf, hf_to_gguf
from tests.helpers import peft_merged_state

from .conftest import assert_round_trip, deltas

N_HEAD, N_KV = 4, 2  # tests/helpers.tiny_llama


def hf_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute, written out independently for the test."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_of(hf_name: str):
    if hf_name.endswith("q_proj"):
        return (N_HEAD, N_HEAD)
    if hf_name.endswith("k_proj"):
        return (N_HEAD, N_KV)
    return None


@pytest.mark.parametrize("name", ["patterns", "rslora", "embed"])
def test_round_trip(name, native, workdir, base_weights):
    out, back = workdir / f"{name}.gguf", workdir / f"{name}-from-gguf.safetensors"
    report = convert(native[name], out, to="gguf")
    convert(out, back)
    assert_round_trip(native[name], back, report, base_weights)
    statuses = {m.module.rsplit(".", 1)[-1]: m.status for m in report.modules}
    if name == "patterns":  # global alpha 8: v_proj (r=2, alpha 8) fits, o_proj (alpha 3) is folded
        assert statuses["v_proj"] == "lossless" and statuses["o_proj"] == "scale_folded"
    if name == "rslora":  # alpha = 8*sqrt(4) = 16 fits r=4; the r=3 module is folded
        assert statuses["q_proj"] == "lossless" and statuses["v_proj"] == "scale_folded"


def test_loader_view_and_llama_cpp_delta(native, workdir, base, base_weights):
    """Names, ne shapes and alpha as llama-adapter.cpp checks them; ΔW the way llama.cpp computes it."""
    out = workdir / "embed-view.gguf"
    convert(native["embed"], out, to="gguf")
    reader = gguf.GGUFReader(out)
    field = lambda k: reader.get_field(k).contents()  # noqa: E731
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "llama"
    alpha = float(field("adapter.lora.alpha"))
    tensors = {t.name: t for t in reader.tensors}
    ours = deltas(native["embed"], base_weights)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert set(tensors) == {f"{name_map.get_name(m)}.weight.{s}" for m in ours for s in ("lora_a", "lora_b")}
    merged = peft_merged_state(base, workdir / "peft-embed")
    for hf_name, delta in ours.items():
        stem = f"{name_map.get_name(hf_name)}.weight"
        a, b = tensors[f"{stem}.lora_a"], tensors[f"{stem}.lora_b"]
        base_w = base_weights[f"{hf_name}.weight"].numpy()
        heads = heads_of(hf_name)
        model_w = hf_permute(base_w, *heads) if heads else base_w
        model_ne = list(reversed(model_w.shape))
        a_ne, b_ne = [int(x) for x in a.shape], [int(x) for x in b.shape]
        rank = b_ne[0]
        a_data, b_data = torch.from_numpy(np.array(a.data)), torch.from_numpy(np.array(b.data))
        if stem == "token_embd.weight":  # llama-adapter.cpp: model.ne[0] == b.ne[1], model.ne[1] == a.ne[1]
            assert model_ne[0] == b_ne[1] and model_ne[1] == a_ne[1]
            gguf_delta = (a_data @ b_data.t()) * (alpha / rank)  # ggml_get_rows(a) then b: (vocab, dim)
            ref = delta.t()
        else:  # model.ne[0] == a.ne[0], model.ne[1] == b.ne[1], a.ne[1] == b.ne[0]
            assert model_ne[0] == a_ne[0] and model_ne[1] == b_ne[1] and a_ne[1] == b_ne[0]
            gguf_delta = (b_data @ a_data) * np.float32(alpha / rank)  # export-lora: aᵀ·b in ggml terms
            ref = torch.from_numpy(hf_permute(delta.numpy(), *heads)) if heads else delta
        torch.testing.assert_close(gguf_delta, ref, rtol=1e-6, atol=1e-7)
        # And the merged weight llama.cpp would run equals PEFT's merge, in llama.cpp's row order.
        peft_w = merged[f"{hf_name}.weight"].numpy()
        want = hf_permute(peft_w, *heads) if heads else peft_w
        torch.testing.assert_close(torch.from_numpy(model_w) + gguf_delta, torch.from_numpy(want),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hf_arch", sorted(ARCHITECTURES))
def test_every_listed_module_has_one_gguf_tensor_and_maps_back(hf_arch):
    """Each module of the table gets a distinct llama.cpp tensor name, and the name maps back to it."""
    table = name_table(hf_arch, 3)
    assert len(set(table.values())) == len(table)
    assert len(table) >= 3 * 4  # every block's attention at least
    for module, name in table.items():
        assert hf_to_gguf(module, hf_arch, 3) == f"{name}.weight"
        assert gguf_to_hf(f"{name}.weight", hf_arch, 3) == module


def test_head_counts_travel_in_the_file(native, workdir, base_weights):
    """No --base on the way back: the head counts written as adapterfmt.* keys undo the permutation."""
    out = workdir / "patterns-heads.gguf"
    convert(native["patterns"], out, to="gguf")
    reader = gguf.GGUFReader(out)
    assert int(reader.get_field("adapterfmt.n_head").contents()) == N_HEAD
    assert int(reader.get_field("adapterfmt.n_head_kv").contents()) == N_KV


def test_export_without_head_counts_needs_base(peft_dirs, workdir):
    bare = workdir / "bare.safetensors"
    convert(peft_dirs["patterns"], bare)  # no --base: no architecture, no head counts
    with pytest.raises(UsageError, match="architecture"):
        convert(bare, workdir / "bare.gguf", to="gguf")


def test_loader_checks_on_import(workdir, native):
    good = workdir / "checks.gguf"
    convert(native["patterns"], good, to="gguf")
    reader = gguf.GGUFReader(good)
    # Rewrite with one lora_b missing: llama.cpp says "missing one component".
    writer = gguf.GGUFWriter(workdir / "broken.gguf", "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    for t in reader.tensors:
        if t.name != "blk.0.attn_v.weight.lora_b":
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ForeignFormatError, match="missing one component"):
        convert(workdir / "broken.gguf", workdir / "broken.safetensors")
    model = gguf.GGUFWriter(workdir / "model.gguf", "llama")
    model.add_type("model")
    model.write_header_to_file(), model.write_kv_data_to_file(), model.write_tensors_to_file(), model.close()
    with pytest.raises(ForeignFormatError, match="not a GGUF LoRA adapter"):
        convert(workdir / "model.gguf", workdir / "model.safetensors")


def test_missing_gguf_package_names_the_extra(monkeypatch, native, workdir):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UsageError) as info:
        convert(native["patterns"], workdir / "nogguf.gguf", to="gguf")
    assert "pip install adapterfmt[gguf]" in info.value.one_line()


def test_strict_refuses_inexact_scale_fold_and_json_reports_errors(native, workdir):
    from click.testing import CliRunner

    from adapterfmt.cli import main
    args = ["convert", str(native["patterns"]), str(workdir / "strict.gguf"), "--to", "gguf", "--json"]
    refused = CliRunner().invoke(main, args + ["--strict"])
    assert refused.exit_code == 1 and "o_proj" in refused.output and "--strict" in refused.output, refused.output
    assert not (workdir / "strict.gguf").exists()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    folded = [m for m in report["modules"] if m["status"] == "scale_folded"]
    assert report["overall"] == "scale_folded" and len(folded) == 2
    assert all(m["rel_error"] < 1e-6 and m["max_abs_error"] is not None for m in folded)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_round_trip_bit_exact(dtype, native, workdir):
    from adapterfmt.format import read_adapter, write_adapter
    from adapterfmt.format.dtypes import dtype_name
    adapter = read_adapter(native["rslora"])
    adapter.tensors = {k: v.to(dtype) for k, v in adapter.tensors.items()}
    for entry in adapter.manifest.modules.values():
        for ref in entry.tensors.values():
            ref.dtype = dtype_name(dtype)
    half = write_adapter(adapter, workdir / f"half-{dtype_name(dtype)}.safetensors")
    out, back = workdir / f"half-{dtype_name(dtype)}.gguf", workdir / f"half-{dtype_name(dtype)}-back.safetensors"
    report = convert(half, out, to="gguf")
    convert(out, back)
    again = read_adapter(back)
    for target, status in ((m.module, m.status) for m in report.modules):
        if status == "lossless":
            for role, tensor in adapter.module_tensors(target).items():
                assert tensor.dtype == dtype and torch.equal(tensor, again.module_tensors(target)[role])


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM"])
def test_other_covered_architectures(arch, tmp_path):
    import transformers

    from tests.helpers import make_peft_adapter
    torch.manual_seed(0)
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    getattr(transformers, arch)(config).save_pretrained(tmp_path / "base")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = make_peft_adapter(tmp_path / "base", tmp_path / "peft", r=2, lora_alpha=4,
                                 target_modules=["q_proj", "k_proj", "v_proj"])
    convert(peft, tmp_path / "a.safetensors", base=tmp_path / "base")
    report = convert(tmp_path / "a.safetensors", tmp_path / "a.gguf", to="gguf")
    assert report.worst == "lossless"
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert reader.get_field("general.architecture").contents() == ("qwen2" if "Qwen" in arch else "llama")
    convert(tmp_path / "a.gguf", tmp_path / "b.safetensors")
    from adapterfmt.format import read_adapter
    a, b = read_adapter(tmp_path / "a.safetensors"), read_adapter(tmp_path / "b.safetensors")
    assert b.manifest.base.architecture == arch
    for name, tensor in a.tensors.items():
        assert torch.equal(tensor, b.tensors[name]), name
    # The k rows in the file are permuted over the kv heads for Mistral, untouched for Qwen2.
    k_b = torch.from_numpy(np.array(next(t.data for t in reader.tensors if t.name == "blk.0.attn_k.weight.lora_b")))
    k_ref = a.tensors["model.layers.0.self_attn.k_proj.lora_B"]
    expect = torch.from_numpy(hf_permute(k_ref.numpy(), 4, 2)) if "Mistral" in arch else k_ref
    assert torch.equal(k_b, expect)


def test_truncated_file_is_one_error(native, workdir):
    good = workdir / "trunc-src.gguf"
    convert(native["patterns"], good, to="gguf")
    data = good.read_bytes()
    for cut in (8, 64, len(data) // 2, len(data) - 3):
        bad = workdir / f"trunc-{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ForeignFormatError):
            convert(bad, workdir / f"trunc-{cut}.safetensors")


def test_dtype_option_writes_f32_factors_and_refuses_rounding(native, workdir):
    """--dtype f32 stores fp32 factors exactly; a cast that would round is refused, not done silently."""
    from adapterfmt.format import read_adapter, write_adapter
    from adapterfmt.format.dtypes import dtype_name
    adapter = read_adapter(native["rslora"])
    adapter.tensors = {k: v.to(torch.float16) for k, v in adapter.tensors.items()}
    for entry in adapter.manifest.modules.values():
        for ref in entry.tensors.values():
            ref.dtype = dtype_name(torch.float16)
    half = write_adapter(adapter, workdir / "dtype-f16.safetensors")
    convert(half, workdir / "dtype-f32.gguf", to="gguf", format_options={"dtype": "f32"})
    tensors = gguf.GGUFReader(workdir / "dtype-f32.gguf").tensors
    assert {t.tensor_type.name for t in tensors} == {"F32"}
    with pytest.raises(UsageError, match="not exactly representable in BF16"):
        convert(half, workdir / "dtype-bf16.gguf", to="gguf", format_options={"dtype": "bf16"})
    with pytest.raises(UsageError, match="--dtype"):
        convert(half, workdir / "dtype-x.gguf", to="gguf", format_options={"dtype": "f8"})
