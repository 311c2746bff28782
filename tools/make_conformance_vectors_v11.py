"""Regenerate spec/vectors/v1.1 (positive vectors, must-refuse vectors, INDEX.json), deterministically.

    python tools/make_conformance_vectors_v11.py

Written from spec/ alone with numpy: it writes the safetensors bytes itself and computes every expected
ΔW in float64 from the stored values, never calling adapterfmt. Random values come from the spec's own
Philox4x32-10 generator (portable and pinned by the spec's known-answer tests), taken from the independent
reader under tests/spec, so regenerating gives the same bytes on every machine. The files are then frozen:
tests/spec/test_vectors.py pins them by sha256.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vectors_v11_build import (BASE, ROOT, Builder, Tensor, container, dora_module, header_entries,  # noqa: E402
                               init_relative, lora_module, lora_params, manifest_text, metadata_for,
                               nola_module, rand, sorsa_module)

OUT = ROOT / "spec" / "vectors" / "v1.1"
RTOL = 1e-5
ORDER = ("E is the spec formula evaluated in float64 on the stored values (decoded exactly; F64 kept); "
         "an fp32 implementation following the reference operation order passes with max|ΔW - E| <= rtol * max|E|")


# ------------------------------------------------------------------ positive vectors
def vec_lora_patterns():
    """Per-module rank/alpha (PEFT rank_pattern/alpha_pattern resolved), one rsLoRA module, F32."""
    b = Builder()
    lora_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 3, 6)
    lora_module(b, "model.v_proj", "model.v_proj.weight", (4, 6), 2, 5, rslora=True)
    lora_module(b, "model.down_proj", "model.down_proj.weight", (6, 10), 5, 7.5)
    return b


def vec_lora_f16():
    """F16 storage (converted exactly to fp32 before use)."""
    b = Builder()
    lora_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 4, 8, dtype="F16")
    lora_module(b, "model.v_proj", "model.v_proj.weight", (4, 6), 2, 3, dtype="F16", rslora=True)
    return b


def vec_lora_conv1d_embedding_payload():
    """BF16 factors on a Conv1D (fan_in_fan_out) and an embedding; a modules_to_save payload."""
    b = Builder()
    lora_module(b, "model.c_attn", "model.c_attn.weight", (12, 6), 2, 4, dtype="BF16", fifo=True, layer="conv1d")
    lora_module(b, "model.embed_tokens", "model.embed_tokens.weight", (6, 10), 2, 2, dtype="BF16", fifo=True,
                layer="embedding")
    b.payload("modules_to_save", "model.norm.weight", Tensor("F32", rand("payload norm", (6,))))
    return b


def vec_dora():
    """DoRA; the expected file holds ΔW = W' - W (not the merged weight). One BF16 base weight."""
    b = Builder()
    dora_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 2, 4)
    dora_module(b, "model.o_proj", "model.o_proj.weight", (6, 8), 3, 3)
    return b


def vec_dora_fan_in_fan_out():
    """DoRA on a Conv1D base stored (in, out): the row norm is over canonical rows (out)."""
    b = Builder()
    dora_module(b, "model.c_fc", "model.c_fc.weight", (9, 6), 2, 2, fifo=True, layer="conv1d")
    return b


def vec_olora():
    """OLoRA: trained and init factors, stored against the original base; one rsLoRA module."""
    b = Builder()
    init_relative(b, "olora", "model.q_proj", "model.q_proj.weight", (8, 6), 2, 4, "olora")
    init_relative(b, "olora", "model.v_proj", "model.v_proj.weight", (4, 6), 3, 3, "olora", rslora=True)
    return b


def vec_pissa():
    """PiSSA with BF16 factors and a pissa_niter_N init."""
    b = Builder()
    init_relative(b, "pissa", "model.q_proj", "model.q_proj.weight", (8, 6), 2, 2, "pissa_niter_4", dtype="BF16")
    init_relative(b, "pissa", "model.down_proj", "model.down_proj.weight", (6, 10), 3, 6, "pissa")
    return b


def vec_sorsa():
    """SORSA with alpha null (s = 1) and with alpha (s = alpha / r)."""
    b = Builder()
    sorsa_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 2, None)
    sorsa_module(b, "model.v_proj", "model.v_proj.weight", (4, 6), 3, 6)
    return b


def vec_nola():
    """NOLA, Philox bases; one module with offsets and the seeds 2^64-1 and 2^53+1."""
    b = Builder()
    nola_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 2, 0.5, (1, 2), (5, 4))
    nola_module(b, "model.down_proj", "model.down_proj.weight", (6, 10), 3, 2.0, (2**64 - 1, 2**53 + 1), (7, 3),
                offsets=True)
    return b


def vec_nola_rows():
    """Two NOLA modules on one fused Conv1D weight, each covering a block of canonical rows."""
    b = Builder()
    nola_module(b, "model.c_qkv.q", "model.c_qkv.weight", (12, 4), 2, 1.5, (11, 12), (6, 5), rows=(0, 4),
                fifo=True, layer="conv1d", offsets=True)
    nola_module(b, "model.c_qkv.v", "model.c_qkv.weight", (12, 4), 2, 1.5, (13, 14), (6, 5), rows=(8, 12),
                fifo=True, layer="conv1d")
    return b


def vec_lora_newer_minor():
    """A file declaring 1.9 with unknown optional members: a 1.1 reader ignores them (README §3)."""
    b = Builder()
    lora_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 2, 4, tag="newer ")
    b.manifest["added_in_1_9"] = {"anything": [1, 2]}
    b.manifest["modules"]["model.q_proj"]["added_in_1_9"] = "ignored"
    b.manifest["modules"]["model.q_proj"]["params"]["note_1_9"] = True
    return b


POSITIVE = {
    "lora_patterns": (vec_lora_patterns, "1.1"),
    "lora_f16": (vec_lora_f16, "1.1"),
    "lora_conv1d_embedding_payload": (vec_lora_conv1d_embedding_payload, "1.1"),
    "dora": (vec_dora, "1.1"),
    "dora_fan_in_fan_out": (vec_dora_fan_in_fan_out, "1.1"),
    "olora": (vec_olora, "1.1"),
    "pissa": (vec_pissa, "1.1"),
    "sorsa": (vec_sorsa, "1.1"),
    "nola": (vec_nola, "1.1"),
    "nola_rows": (vec_nola_rows, "1.1"),
    "lora_newer_minor_1_9": (vec_lora_newer_minor, "1.9"),
}


# ------------------------------------------------------------------ must-refuse vectors
def small_lora() -> Builder:
    """The valid file every invalid vector starts from: one LoRA module, F32."""
    b = Builder()
    lora_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 2, 4, tag="invalid ")
    b.expected.clear()
    return b


def with_manifest(edit, version="1.1"):
    b = small_lora()
    edit(b.manifest)
    return container(b.tensors, metadata_for(b.manifest, version))


def with_text(edit, version="1.1"):
    b = small_lora()
    return container(b.tensors, metadata_for(edit(manifest_text(b.manifest)), version))


def module_of(m):
    return m["modules"]["model.q_proj"]


def rename_module(m):
    m["modules"]["model.q_proj\n"] = m["modules"].pop("model.q_proj")


def huge_integer(text):
    return text.replace('"alpha":4.0', '"alpha":' + "1" + "0" * 399)


def duplicate_member(text):
    return text.replace('"alpha":4.0', '"alpha":4.0,"alpha":4.0')


def header_duplicate():
    b = small_lora()
    entries = header_entries(b.tensors)
    return container(b.tensors, metadata_for(b.manifest), entries=entries + [entries[0]])


def two_roles_one_tensor():
    b = Builder()
    same = Tensor("F32", rand("square", (4, 4)))
    b.module("model.q_proj", "lora", "model.q_proj.weight", (4, 4), lora_params(4, 4),
             {"lora_A": same, "lora_B": same})
    del b.manifest["base"]["weights"]["model.q_proj.weight"]
    module_of(b.manifest)["tensors"]["lora_B"]["name"] = "model.q_proj.lora_A"
    del b.tensors["model.q_proj.lora_B"]
    return container(b.tensors, metadata_for(b.manifest))


def factor_dtype(dtype):
    def build():
        b = small_lora()
        values = np.ones(b.tensors["model.q_proj.lora_A"].shape)
        b.tensors["model.q_proj.lora_A"] = Tensor(dtype, values)
        module_of(b.manifest)["tensors"]["lora_A"]["dtype"] = dtype
        return container(b.tensors, metadata_for(b.manifest))
    return build


def tiny_scale(m):
    # s0 = 1e-12; |1.8e-12 - 1e-12| = 8e-13 passes an absolute 1e-12 check but not the relative one.
    module_of(m)["params"].update(alpha=2e-12, scale=1.8e-12)


def nola_file(edit) -> bytes:
    b = Builder()
    nola_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 2, 0.5, (1, 2), (5, 4))
    edit(module_of(b.manifest)["params"])
    return container(b.tensors, metadata_for(b.manifest))


def truncated():
    data = container(small_lora().tensors, metadata_for(small_lora().manifest))
    return data[:-4]


def overlapping():
    b = small_lora()
    entries = header_entries(b.tensors)
    (name_a, a), (name_b, bb) = entries
    shift = 4
    bb = dict(bb, data_offsets=[bb["data_offsets"][0] - shift, bb["data_offsets"][1] - shift])
    data = b"".join(b.tensors[n].raw for n in sorted(b.tensors))[:-shift]
    return container(b.tensors, metadata_for(b.manifest), entries=[(name_a, a), (name_b, bb)], data=data)


def extra_tensor():
    b = small_lora()
    b.tensors["model.q_proj.unnamed"] = Tensor("F32", np.zeros(3))
    return container(b.tensors, metadata_for(b.manifest))


def missing_tensor():
    b = small_lora()
    del b.tensors["model.q_proj.lora_B"]
    return container(b.tensors, metadata_for(b.manifest))


def rank_contradiction(m):
    module_of(m)["params"].update(rank=3, alpha=6.0, scale=2.0)


def base_shape(m):
    m["base"]["weights"]["model.q_proj.weight"]["shape"] = [6, 8]


def unknown_payload_kind():
    b = small_lora()
    b.payload("modules_to_save", "model.norm.weight", Tensor("F32", rand("payload norm", (6,))))
    b.manifest["payloads"]["model.norm.weight"]["kind"] = "lora_bias_1_9"
    return container(b.tensors, metadata_for(b.manifest, "1.9"))


def payload_key():
    b = small_lora()
    b.payload("modules_to_save", "model.norm.weight", Tensor("F32", rand("payload norm", (6,))))
    b.manifest["payloads"]["model.other.weight"] = b.manifest["payloads"].pop("model.norm.weight")
    return container(b.tensors, metadata_for(b.manifest))


def pissa_with_olora_init():
    b = Builder()
    init_relative(b, "pissa", "model.q_proj", "model.q_proj.weight", (8, 6), 2, 2, "olora")
    return container(b.tensors, metadata_for(b.manifest))


def manifest_header_disagree(m):
    module_of(m)["tensors"]["lora_A"]["dtype"] = "F16"


# file name -> (builder, refusal class, rule)
INVALID = {
    "module_name_trailing_newline": (lambda: with_manifest(rename_module), "ManifestError",
                                     "README §4: names match as whole strings"),
    "version_trailing_newline": (lambda: with_manifest(lambda m: None, "1.1\n"), "ManifestError",
                                 "README §2: the version is matched as a whole string"),
    "huge_integer_literal": (lambda: with_text(huge_integer), "ManifestError",
                             "README §2: integers within ±(2^53-1)"),
    "float_overflow_literal": (lambda: with_text(lambda t: t.replace('"alpha":4.0', '"alpha":1e400')),
                               "ManifestError", "README §2: numbers finite as doubles"),
    "nan_literal": (lambda: with_text(lambda t: t.replace('"alpha":4.0', '"alpha":NaN')), "ManifestError",
                    "README §2: NaN is not JSON"),
    "header_duplicate_key": (header_duplicate, "HeaderError", "README §1: no duplicate members in the header"),
    "manifest_duplicate_key": (lambda: with_text(duplicate_member), "ManifestError",
                               "README §2: no duplicate members in the manifest"),
    "two_roles_one_tensor": (two_roles_one_tensor, "ManifestError", "README §5: no tensor is named twice"),
    "factor_dtype_i8": (factor_dtype("I8"), "TensorError", "README §6: allowed role dtypes"),
    "factor_dtype_bool": (factor_dtype("BOOL"), "TensorError", "README §6: allowed role dtypes"),
    "scale_relative_tolerance": (lambda: with_manifest(tiny_scale), "ManifestError",
                                 "README §6: scale rule is relative"),
    "nola_unknown_generator": (lambda: nola_file(lambda p: p.update(generator={"id": "mystery-rng", "version": 1})),
                               "UnknownMethodError", "nola.md §2: unknown generator"),
    "nola_unknown_generator_version": (
        lambda: nola_file(lambda p: p.update(generator={"id": "philox4x32-10", "version": 2})),
        "UnknownMethodError", "nola.md §2: unknown generator version"),
    "nola_seed_too_large": (lambda: nola_file(lambda p: p["A"].update(seed=str(2**64))), "ManifestError",
                            "nola.md §2: seed < 2^64"),
    "nola_rows_out_of_range": (lambda: nola_file(lambda p: p.update(rows=[4, 9])), "ManifestError",
                               "nola.md §2: 0 <= start < stop <= out"),
    "truncated_data": (truncated, "HeaderError", "README §1: the data buffer is truncated"),
    "overlapping_offsets": (overlapping, "HeaderError", "README §1: ranges tile the buffer"),
    "unsupported_major": (lambda: with_manifest(lambda m: None, "2.0"), "VersionError", "README §3"),
    "tensor_not_named": (extra_tensor, "TensorError", "README §5: every tensor is named"),
    "missing_tensor": (missing_tensor, "TensorError", "README §9 step 5"),
    "shape_contradicts_rank": (lambda: with_manifest(rank_contradiction), "TensorError",
                               "README §6: role shapes follow from rank and shape"),
    "base_weights_shape": (lambda: with_manifest(base_shape), "ManifestError", "README §7: base.weights shape"),
    "unknown_method": (lambda: with_manifest(lambda m: module_of(m).update(method="vera")), "UnknownMethodError",
                       "README §3: unknown method"),
    "unknown_member_same_minor": (lambda: with_manifest(lambda m: module_of(m).update(extra=1)), "ManifestError",
                                  "README §3: closed schema for b <= m"),
    "unknown_payload_kind_newer_minor": (unknown_payload_kind, "ManifestError",
                                         "README §3: unknown payload kind refused in any file"),
    "payload_key_not_target": (payload_key, "ManifestError", "README §8: key equals target"),
    "pissa_init_olora": (pissa_with_olora_init, "ManifestError", "methods-principal.md §2: init per method"),
    "manifest_header_dtype_disagree": (lambda: with_manifest(manifest_header_disagree), "ManifestError",
                                       "README §9 step 6"),
    "not_adapterfmt": (lambda: with_manifest(lambda m: None).replace(b'"adapterfmt.format":"adapterfmt"',
                                                                      b'"adapterfmt.format":"adapterfm_"'),
                       "ManifestError", "README §2: adapterfmt.format"),
}


def main(out: Path = OUT) -> None:
    """Write every vector and INDEX.json under ``out`` (replacing it)."""
    if out.exists():
        shutil.rmtree(out)
    (out / "invalid").mkdir(parents=True)
    (out / "base.safetensors").write_bytes(container(BASE, {"format": "pt"}))
    index = {"version": "1.1", "base": "base.safetensors", "positive": [], "invalid": []}
    for name, (build, version) in POSITIVE.items():
        build().write(out / f"{name}.safetensors", version)
        index["positive"].append({"file": f"{name}.safetensors", "expected": f"{name}.expected.safetensors",
                                  "base": "base.safetensors", "version": version, "expected_dtype": "F64",
                                  "rtol": RTOL, "order": ORDER, "about": " ".join(build.__doc__.split())})
    for name, (build, refusal, rule) in INVALID.items():
        (out / "invalid" / f"{name}.safetensors").write_bytes(build())
        index["invalid"].append({"file": f"invalid/{name}.safetensors", "refusal": refusal, "rule": rule})
    (out / "INDEX.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(POSITIVE)} positive and {len(INVALID)} must-refuse vectors to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
