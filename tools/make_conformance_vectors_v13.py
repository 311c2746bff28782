"""Regenerate spec/vectors/v1.3 (positive vectors, must-refuse vectors, INDEX.json), deterministically.

    python tools/make_conformance_vectors_v13.py [DIR]

The methods and features of format 1.3: trainable_tokens, lora_tucker, loha/lokr on conv2d (flattened and
Tucker forms), full, DoRA with magnitude_axis "in" / norm_eps / on conv2d. Written from spec/ alone with
numpy, never calling adapterfmt; expected values are float64. The files are then frozen: tests/spec/v1.3.sha256
pins them.

Extending: write one ``vec_<name>`` function returning a Builder13 (positive) or one builder returning
bytes (must-refuse), and add it to POSITIVE or INVALID. Released vectors never change; new ones are added.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vectors_v11_build import ROOT, Tensor, container, metadata_for, rand  # noqa: E402
from vectors_v12_build import entry_of, set_role  # noqa: E402
from vectors_v13_build import (BASE13, LYCORIS_EPS, Builder13, dora13_module, full_module,  # noqa: E402
                               lokr_conv2d_module, loha_conv2d_module, lora_tucker_module, trainable_tokens_module)

OUT = ROOT / "spec" / "vectors" / "v1.3"
RTOL = 1e-5
ORDER = {
    "delta": "E is ΔW per module (canonical; conv2d: out, in, kh, kw), the spec formula evaluated in float64 on "
             "the stored values (decoded exactly); an fp32 implementation following the reference operation "
             "order passes with max|ΔW - E| <= rtol * max|E|",
    "merged": "E is the merged weight W' per module (canonical, fp32 base weight, before the merge's rounding "
              "to the base dtype), evaluated in float64 on the stored values and the base; an fp32 "
              "implementation following the reference operation order passes with max|W' - E| <= rtol * max|E|",
}
BIAS_NOTE = " Each full module with diff_b has an expected entry bias.<bias parameter> = the merged bias, b + diff_b."


# ------------------------------------------------------------------ positive vectors (one function each)
def vec_trainable_tokens():
    """trainable_tokens: rows 7, 2, 9 of an embedding (fan_in_fan_out, F32 values) and rows 0, 5 of an output
    head (linear, BF16 base and BF16 values); E is the merged weight (replaced rows, canonical)."""
    b = Builder13()
    trainable_tokens_module(b, "model.embed_tokens", "model.embed_tokens.weight", [7, 2, 9], embedding=True)
    trainable_tokens_module(b, "model.lm_head", "model.lm_head.weight", [0, 5], embedding=False, dtype="BF16")
    return b


def vec_lora_tucker():
    """lora_tucker on a 3×3 convolution: A (r, in, 1, 1), mid (r, r, 3, 3), B (out, r, 1, 1), rsLoRA scale."""
    b = Builder13()
    lora_tucker_module(b, "model.conv3", (5, 3, 3, 3), 2, 3, rslora=True)
    return b


def vec_loha_conv2d():
    """LoHa on conv2d, flattened form: a 3×3 kernel (w*_b (r, in, 3, 3)) and a 1×1 kernel."""
    b = Builder13()
    loha_conv2d_module(b, "model.conv3", (5, 3, 3, 3), 2, 4, tucker_form=False)
    loha_conv2d_module(b, "model.conv1", (6, 4, 1, 1), 3, 3, tucker_form=False)
    return b


def vec_loha_conv2d_tucker():
    """LoHa on a 3×3 convolution, Tucker form: t1, t2 (r, r, 3, 3), w*_a (r, out), w*_b (r, in)."""
    b = Builder13()
    loha_conv2d_module(b, "model.conv3", (5, 3, 3, 3), 2, 4, tucker_form=True)
    return b


def vec_lokr_conv2d():
    """LoKr on conv2d, flattened form: a 3×3 kernel with full w1 and full w2 (b, d, 3, 3) (scale 1, lycoris),
    and a 1×1 kernel with factored w1 and w2 = w2_a·w2_b (r, d, 1, 1)."""
    b = Builder13()
    lokr_conv2d_module(b, "model.conv4", (4, 2, 3, 3), (2, 1), (2, 2), 2, 4, w1_full=True, w2_form="full")
    lokr_conv2d_module(b, "model.conv1", (6, 4, 1, 1), (3, 2), (2, 2), 2, 3, w1_full=False, w2_form="factored")
    return b


def vec_lokr_conv2d_tucker():
    """LoKr on a 3×3 convolution, Tucker W2 = t2 ×₁ w2_aᵀ ×₂ w2_bᵀ (w2_a (r, b)), full w1; scale alpha/r."""
    b = Builder13()
    lokr_conv2d_module(b, "model.conv4", (4, 2, 3, 3), (2, 1), (2, 2), 2, 3, w1_full=True, w2_form="tucker")
    return b


def vec_full():
    """full: a linear ΔW with diff_b (the layer's bias model.q_proj.bias changes), a 3×3 conv2d ΔW (BF16)."""
    b = Builder13()
    full_module(b, "model.q_proj", (8, 6), with_bias=True)
    full_module(b, "model.conv3", (5, 3, 3, 3), layer="conv2d", dtype="BF16")
    return b


def vec_dora_in_eps():
    """DoRA magnitude_axis in with norm_eps 2^-23 on weights of norm ~1e-6 (eps changes W' by percents), and
    magnitude_axis out with norm_eps; E is the merged weight."""
    b = Builder13()
    dora13_module(b, "model.small_proj", (6, 8), 2, 4, axis="in", eps=LYCORIS_EPS, b_scale=1e-7)
    dora13_module(b, "model.q_proj", (8, 6), 2, 2, axis="out", eps=LYCORIS_EPS)
    return b


def vec_dora_conv2d():
    """DoRA on conv2d: a 3×3 kernel with the magnitude per output channel (norm over in, kh, kw), and a 1×1
    kernel of norm ~1e-6 with the magnitude per input channel (norm over out, kh, kw) and norm_eps 2^-23."""
    b = Builder13()
    dora13_module(b, "model.conv3", (5, 3, 3, 3), 2, 4, axis="out", layer="conv2d")
    dora13_module(b, "model.conv_small", (6, 4, 1, 1), 2, 2, axis="in", eps=LYCORIS_EPS, layer="conv2d",
                  b_scale=1e-7)
    return b


# name -> (builder, declared version, expected kind)
POSITIVE = {
    "trainable_tokens": (vec_trainable_tokens, "1.3", "merged"),
    "lora_tucker": (vec_lora_tucker, "1.3", "delta"),
    "loha_conv2d": (vec_loha_conv2d, "1.3", "delta"),
    "loha_conv2d_tucker": (vec_loha_conv2d_tucker, "1.3", "delta"),
    "lokr_conv2d": (vec_lokr_conv2d, "1.3", "delta"),
    "lokr_conv2d_tucker": (vec_lokr_conv2d_tucker, "1.3", "delta"),
    "full": (vec_full, "1.3", "delta"),
    "dora_in_eps": (vec_dora_in_eps, "1.3", "merged"),
    "dora_conv2d": (vec_dora_conv2d, "1.3", "merged"),
}


# ------------------------------------------------------------------ must-refuse vectors
def written(b: Builder13, version: str = "1.3") -> bytes:
    return container(b.tensors, metadata_for(b.manifest, version))


def unlisted(b: Builder13, target: str) -> Builder13:
    """Drop the module's base.weights entry (README §7: MAY omit), so only the method rule is broken."""
    del b.manifest["base"]["weights"][entry_of(b, target)["base_weight"]]
    return b


def tokens(indices=(7, 2, 9), index=None, version="1.3", edit=None):
    def make():
        b = Builder13()
        trainable_tokens_module(b, "model.embed_tokens", "model.embed_tokens.weight", list(indices), embedding=True,
                                index=index)
        if edit:
            edit(b, entry_of(b, "model.embed_tokens"))
        return written(b, version)
    return make


def float_indices():
    values = np.array([7.0, 2.0, 9.0])
    return tokens(index=Tensor("F32", values))()


def tokens_values_width():
    b = Builder13()
    trainable_tokens_module(b, "model.lm_head", "model.lm_head.weight", [0, 5], embedding=False)
    set_role(b, "model.lm_head", "values", Tensor("F32", rand("wide values", (2, 10))))
    return written(b)


def loha_tucker_1x1():
    b = Builder13()
    loha_conv2d_module(b, "model.conv1", (6, 4, 1, 1), 2, 4, tucker_form=True)
    return written(b)


def loha_t1_without_t2():
    b = Builder13()
    loha_conv2d_module(b, "model.conv3", (5, 3, 3, 3), 2, 4, tucker_form=True)
    set_role(b, "model.conv3", "t2", None)
    return written(b)


def loha_conv2d_declared(version):
    def make():
        b = Builder13()
        loha_conv2d_module(b, "model.conv3", (5, 3, 3, 3), 2, 4, tucker_form=False)
        return written(b, version)
    return make


def lokr_core_with_full_w2():
    b = Builder13()
    lokr_conv2d_module(b, "model.conv4", (4, 2, 3, 3), (2, 1), (2, 2), 2, 3, w1_full=True, w2_form="full")
    set_role(b, "model.conv4", "t2", Tensor("F32", rand("core with full w2", (2, 2, 3, 3))))
    return written(b)


def lora_tucker_linear():
    b = Builder13()
    lora_tucker_module(b, "model.conv3", (5, 3, 3, 3), 2, 3)
    entry = entry_of(b, "model.conv3")
    entry.update(layer="linear", shape=[5, 3])
    set_role(b, "model.conv3", "lora_A", Tensor("F32", rand("lin A", (2, 3))))
    set_role(b, "model.conv3", "lora_B", Tensor("F32", rand("lin B", (5, 2))))
    return written(unlisted(b, "model.conv3"))


def lora_tucker_mid_shape():
    b = Builder13()
    lora_tucker_module(b, "model.conv3", (5, 3, 3, 3), 2, 3)
    set_role(b, "model.conv3", "lora_mid", Tensor("F32", rand("mid 1x1", (2, 2, 1, 1))))
    return written(b)


def lora_tucker_scale():
    b = Builder13()
    lora_tucker_module(b, "model.conv3", (5, 3, 3, 3), 2, 3)
    entry_of(b, "model.conv3")["params"]["scale"] = 3.0
    return written(b)


def full_diff_shape():
    b = Builder13()
    full_module(b, "model.q_proj", (8, 6))
    set_role(b, "model.q_proj", "diff", Tensor("F32", rand("diff t", (6, 8))))
    return written(b)


def full_diff_b_shape():
    b = Builder13()
    full_module(b, "model.q_proj", (8, 6))
    set_role(b, "model.q_proj", "diff_b", Tensor("F32", rand("diff_b 6", (6,))))
    return written(b)


def full_declared_1_2():
    b = Builder13()
    full_module(b, "model.q_proj", (8, 6))
    return written(b, "1.2")


def dora_in_magnitude_length():
    b = Builder13()
    dora13_module(b, "model.small_proj", (6, 8), 2, 4, axis="in", eps=LYCORIS_EPS, b_scale=1e-7)
    set_role(b, "model.small_proj", "magnitude", Tensor("F32", rand("m out", (6,))))
    return written(b)


def dora_declared_1_2(**kw):
    def make():
        b = Builder13()
        dora13_module(b, "model.q_proj", (8, 6), 2, 2, **kw)
        return written(b, "1.2")
    return make


def dora_conv2d_declared_1_2():
    b = Builder13()
    dora13_module(b, "model.conv3", (5, 3, 3, 3), 2, 4, axis="out", layer="conv2d")
    return written(b, "1.2")


def dora_negative_eps():
    b = Builder13()
    dora13_module(b, "model.q_proj", (8, 6), 2, 2, axis="out", eps=LYCORIS_EPS)
    entry_of(b, "model.q_proj")["params"]["norm_eps"] = -1e-6
    return written(b)


TUNERS = "methods-tuners.md"
FULL = "methods-full.md"
# file name -> (builder returning bytes, refusal class, rule)
INVALID = {
    "trainable_tokens_duplicate_index": (tokens((7, 2, 7)), "TensorError",
                                         f"{TUNERS} §2: no index appears twice (refused when merged or validated)"),
    "trainable_tokens_index_out_of_range": (tokens((7, 2, 10)), "TensorError",
                                            f"{TUNERS} §2: every index lies in [0, tokens) (refused when merged "
                                            "or validated)"),
    "trainable_tokens_negative_index": (tokens((7, -1, 9)), "TensorError",
                                        f"{TUNERS} §2: every index lies in [0, tokens)"),
    "trainable_tokens_float_indices": (float_indices, "TensorError", "README §6: indices is I64 only"),
    "trainable_tokens_embedding_not_transposed": (
        tokens(edit=lambda b, e: unlisted(b, "model.embed_tokens").manifest and e.update(fan_in_fan_out=False)), "ManifestError",
        f"{TUNERS} §2: an embedding layer has fan_in_fan_out true"),
    "trainable_tokens_values_width": (tokens_values_width, "TensorError", f"{TUNERS} §2: values is (k, d)"),
    "trainable_tokens_count": (tokens(edit=lambda b, e: e["params"].update(count=2)), "TensorError",
                               f"{TUNERS} §2: indices is (count)"),
    "trainable_tokens_in_1_2_file": (tokens(version="1.2"), "UnknownMethodError",
                                     "README §3: trainable_tokens does not exist in 1.2"),
    "loha_tucker_core_on_1x1": (loha_tucker_1x1, "ManifestError", f"{TUNERS} §6.2: no core on a 1×1 kernel"),
    "loha_t1_without_t2": (loha_t1_without_t2, "ManifestError", f"{TUNERS} §6.2: cores come together"),
    "lokr_tucker_core_with_full_w2": (lokr_core_with_full_w2, "ManifestError",
                                      f"{TUNERS} §6.2: t2 comes with w2_a and w2_b, never with w2"),
    "loha_conv2d_in_1_2_file": (loha_conv2d_declared("1.2"), "ManifestError",
                                "README §3: loha/lokr on conv2d is a 1.3 feature"),
    "lora_tucker_on_linear": (lora_tucker_linear, "ManifestError", "schema: lora_tucker layers (conv2d only)"),
    "lora_tucker_mid_kernel": (lora_tucker_mid_shape, "TensorError", f"{TUNERS} §6.2: lora_mid is (r, r, kh, kw)"),
    "lora_tucker_scale_rule": (lora_tucker_scale, "ManifestError", "README §6: scale rule (as lora)"),
    "full_diff_shape_mismatch": (full_diff_shape, "TensorError", f"{FULL}: diff has the layer's weight shape"),
    "full_diff_b_shape": (full_diff_b_shape, "TensorError", f"{FULL}: diff_b is (out)"),
    "full_in_1_2_file": (full_declared_1_2, "UnknownMethodError", "README §3: full does not exist in 1.2"),
    "dora_in_magnitude_length": (dora_in_magnitude_length, "TensorError",
                                 "README §6: magnitude_axis in has a magnitude of in entries"),
    "dora_in_in_1_2_file": (dora_declared_1_2(axis="in"), "ManifestError",
                            "README §3: DoRA magnitude_axis in is a 1.3 feature"),
    "dora_norm_eps_in_1_2_file": (dora_declared_1_2(axis="out", eps=LYCORIS_EPS), "ManifestError",
                                  "README §3: DoRA norm_eps is a 1.3 feature"),
    "dora_conv2d_in_1_2_file": (dora_conv2d_declared_1_2, "ManifestError",
                                "README §3: DoRA on conv2d is a 1.3 feature"),
    "dora_negative_norm_eps": (dora_negative_eps, "ManifestError", "README §6: norm_eps ≥ 0"),
}


def main(out: Path = OUT) -> None:
    """Write every vector and INDEX.json under ``out`` (replacing it)."""
    if out.exists():
        shutil.rmtree(out)
    (out / "invalid").mkdir(parents=True)
    (out / "base.safetensors").write_bytes(container(BASE13, {"format": "pt"}))
    index = {"version": "1.3", "base": "base.safetensors", "positive": [], "invalid": []}
    for name, (build, version, kind) in POSITIVE.items():
        b = build()
        b.write(out / f"{name}.safetensors", version)
        about = " ".join(build.__doc__.split()) + (BIAS_NOTE if any(k.startswith("bias.") for k in b.expected)
                                                   else "")
        index["positive"].append({"file": f"{name}.safetensors", "expected": f"{name}.expected.safetensors",
                                  "base": "base.safetensors", "version": version, "expected_dtype": "F64",
                                  "expected_kind": kind, "rtol": RTOL, "order": ORDER[kind], "about": about})
    for name, (build, refusal, rule) in INVALID.items():
        (out / "invalid" / f"{name}.safetensors").write_bytes(build())
        index["invalid"].append({"file": f"invalid/{name}.safetensors", "refusal": refusal, "rule": rule})
    (out / "INDEX.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(POSITIVE)} positive and {len(INVALID)} must-refuse vectors to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
