"""GGUF LoRA: round trips, and the file as llama.cpp's loader and export-lora see it."""
from __future__ import annotations

import json
import sys

import gguf
import numpy as np
import pytest
import torch

from adapterfmt.convert import convert
from adapterfmt.errors import ForeignFormatError, UsageError
from adapterfmt.formats.gguf_lora import BLOCK_NAMES, TOP_NAMES, hf_to_gguf
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


def test_name_table_agrees_with_gguf_package():
    for arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.QWEN3):
        name_map = gguf.get_tensor_name_map(arch, 4)
        for hf in [f"model.layers.3.{k}" for k in BLOCK_NAMES] + list(TOP_NAMES):
            assert hf_to_gguf(hf) == f"{name_map.get_name(hf)}.weight", (arch, hf)


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


def test_strict_accepts_scale_folding_and_json_reports_errors(native, workdir):
    from click.testing import CliRunner

    from adapterfmt.cli import main
    result = CliRunner().invoke(main, ["convert", str(native["patterns"]), str(workdir / "strict.gguf"),
                                       "--to", "gguf", "--strict", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    folded = [m for m in report["modules"] if m["status"] == "scale_folded"]
    assert report["overall"] == "scale_folded" and len(folded) == 2
    assert all(m["rel_error"] < 1e-6 and m["max_abs_error"] is not None for m in folded)
