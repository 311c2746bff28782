"""Regenerate spec/vectors/v1.2 (positive vectors, must-refuse vectors, INDEX.json), deterministically.

    python tools/make_conformance_vectors_v12.py [DIR]

The methods added after the v1.1 vectors: ia3, loha, lokr, adalora, oft, boft, vera, fourierft, LoRA on
conv2d and LoRA with a bias (a bias_delta payload). Written from spec/ alone with numpy, never calling
adapterfmt: values come from the spec's Philox generator, VeRA/FourierFT draws from the second reader's
torch-cpu-mt19937 (tests/spec/spec_torch_rng.py), expected values are float64. The files are then frozen:
tests/spec/v1.2.sha256 pins them.

Extending: write one ``vec_<name>`` function returning a Builder12 (positive) or one builder returning
bytes (must-refuse), and add it to POSITIVE or INVALID. Released vectors never change; new ones are added.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vectors_v11_build import ROOT, Tensor, container, lora_module, metadata_for, rand  # noqa: E402
from vectors_v12_build import (BASE12, Builder12, adalora_module, boft_module, entry_of, fourierft_module,  # noqa: E402
                               ia3_module, lokr_module, loha_module, lora_conv2d_module, oft_module, set_role,
                               vera_module)

OUT = ROOT / "spec" / "vectors" / "v1.2"
RTOL = 1e-5
ORDER = {
    "delta": "E is ΔW per module (canonical; conv2d: out, in, kh, kw), the spec formula evaluated in float64 on "
             "the stored values (decoded exactly); an fp32 implementation following the reference operation "
             "order passes with max|ΔW - E| <= rtol * max|E|",
    "merged": "E is the merged weight W' per module (canonical, fp32 base weight, before the merge's rounding "
              "to the base dtype), evaluated in float64 on the stored values and the base; an fp32 "
              "implementation following the reference operation order passes with max|W' - E| <= rtol * max|E|",
}
PAYLOAD_NOTE = " Each bias_delta payload has an expected entry payload.<target> = the merged target, base + delta."


# ------------------------------------------------------------------ positive vectors (one function each)
def vec_ia3():
    """IA³ on the output axis with a bias (bias_delta b·l − b), on the input axis (BF16 base), on a Conv1D."""
    b = Builder12()
    ia3_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), "out", bias="model.q_proj.bias")
    ia3_module(b, "model.k_proj", "model.k_proj.weight", (8, 6), "in")
    ia3_module(b, "model.c_attn", "model.c_attn.weight", (12, 6), "out", fifo=True, layer="conv1d")
    return b


def vec_loha():
    """LoHa, F32 and BF16 factors; scale alpha/r applied after the Hadamard product."""
    b = Builder12()
    loha_module(b, "model.q_proj", (8, 6), 2, 4)
    loha_module(b, "model.down_proj", (8, 12), 3, 3, dtype="BF16")
    return b


def vec_lokr():
    """LoKr: full/factored halves, both conventions, both halves full with the explicit scale (1 and alpha/r)."""
    b = Builder12()
    lokr_module(b, "model.up_proj", (12, 8), (3, 2), (4, 4), 2, 4, "peft", w1_full=True, w2_full=False)
    lokr_module(b, "model.down_proj", (8, 12), (2, 3), (4, 4), 2, 3, "lycoris", w1_full=False, w2_full=True)
    lokr_module(b, "model.gate_proj", (12, 8), (4, 2), (3, 4), 4, 8, "lycoris", w1_full=True, w2_full=True)
    lokr_module(b, "model.o_proj", (6, 8), (2, 4), (3, 2), 4, 2, "peft", w1_full=True, w2_full=True)
    return b


def vec_adalora():
    """AdaLoRA: pruned below init_r (ranknum stays init_r); lora_alpha ≤ 0 (scaling = init_r) on a Conv1D;
    init_r = 2, where the divisor's + 1e-5 (relative 5e-6) exceeds this vector's rtol. A module pruned to
    rank 0 is absent from the file (ΔW = 0): see invalid/adalora_rank_zero."""
    b = Builder12()
    adalora_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 3, 8, 4)
    adalora_module(b, "model.v_proj", "model.v_proj.weight", (4, 6), 1, 16, 2)
    adalora_module(b, "model.c_attn", "model.c_attn.weight", (12, 6), 1, 0, 6, fifo=True, layer="conv1d")
    return b


def vec_oft_neumann():
    """OFT, Cayley–Neumann series: 5 terms, 2 terms, and 3 terms with one shared block."""
    b = Builder12()
    oft_module(b, "model.o_proj", (6, 8), block=4, share=False, cayley="neumann", terms=5)
    oft_module(b, "model.up_proj", (12, 8), block=2, share=False, cayley="neumann", terms=2)
    oft_module(b, "model.q_proj", (8, 6), block=3, share=True, cayley="neumann", terms=3)
    return b


def vec_oft_cayley_coft():
    """OFT, exact Cayley and Neumann with COFT: one block below ε′ = eps/√n (kept), one above (projected)."""
    b = Builder12()
    oft_module(b, "model.o_proj", (6, 8), block=4, share=False, cayley="exact", coft=True, eps=0.1,
               magnitudes=(0.01, 0.2))
    oft_module(b, "model.up_proj", (12, 8), block=4, share=False, cayley="neumann", terms=4, coft=True, eps=0.1,
               magnitudes=(0.2, 0.01))
    return b


def vec_boft():
    """BOFT: butterfly factors 3 (block 2), 2 (block 4) and 1 (odd block 3); per-row scale."""
    b = Builder12()
    boft_module(b, "model.o_proj", (6, 8), factors=3, block=2)
    boft_module(b, "model.up_proj", (12, 8), factors=2, block=4)
    boft_module(b, "model.down_proj", (8, 12), factors=1, block=3)
    return b


def vec_vera():
    """VeRA, seed 0, `fused`, shared max_in 8 / max_out 12; a Conv1D module; projections regenerated."""
    b = Builder12()
    common = dict(rank=4, seed=0, variant="fused", max_in=8, max_out=12)
    vera_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), **common)
    vera_module(b, "model.o_proj", "model.o_proj.weight", (6, 8), **common)
    vera_module(b, "model.c_attn", "model.c_attn.weight", (12, 6), fifo=True, layer="conv1d", **common)
    return b


def vec_vera_unfused_stored():
    """VeRA, seed 2^64 − 1 (key 2^32 − 1), `unfused`; one module with stored BF16 proj_A/proj_B; one module
    with its own seed, rank and max dims (each module's ΔW depends on its own params only)."""
    b = Builder12()
    common = dict(rank=3, seed=2**64 - 1, variant="unfused", max_in=12, max_out=12)
    vera_module(b, "model.up_proj", "model.up_proj.weight", (12, 8), **common)
    vera_module(b, "model.down_proj", "model.down_proj.weight", (8, 12), stored_projections=True, **common)
    vera_module(b, "model.v_proj", "model.v_proj.weight", (4, 6), rank=2, seed=1, variant="unfused", max_in=6,
                max_out=4)
    return b


def vec_fourierft():
    """FourierFT: seed 777; seed 2^32 + 777 (only the low 32 bits seed the engine) on a Conv1D; seed 5 with
    n = out·in (every position)."""
    b = Builder12()
    fourierft_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), seed=777, n=10, scaling=150.0)
    fourierft_module(b, "model.c_attn", "model.c_attn.weight", (12, 6), seed=2**32 + 777, n=20, scaling=0.5,
                     fifo=True, layer="conv1d")
    fourierft_module(b, "model.v_proj", "model.v_proj.weight", (4, 6), seed=5, n=24, scaling=1.0)
    return b


def vec_lora_conv2d():
    """LoRA on Conv2d: a 1×1 kernel and a 3×3 kernel (expected ΔW has shape out, in, kh, kw)."""
    b = Builder12()
    lora_conv2d_module(b, "model.conv1", (6, 4, 1, 1), 2, 4)
    lora_conv2d_module(b, "model.conv3", (5, 3, 3, 3), 2, 3)
    return b


def vec_lora_bias():
    """LoRA with PEFT lora_bias: the bias lora_B.bias·scale stored as a bias_delta payload."""
    b = Builder12()
    lora_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 2, 4, tag="bias ")
    b.bias_delta("model.q_proj.bias", Tensor("F32", rand("lora_bias q", (8,), 0.25)))
    return b


#: Per-vector tolerances tighter than RTOL, where a common mistake is smaller than 1e-5.
RTOL_OF = {"adalora": 2e-6}
# name -> (builder, declared version, expected kind)
POSITIVE = {
    "ia3": (vec_ia3, "1.1", "merged"),
    "loha": (vec_loha, "1.1", "delta"),
    "lokr": (vec_lokr, "1.1", "delta"),
    "adalora": (vec_adalora, "1.1", "delta"),
    "oft_neumann": (vec_oft_neumann, "1.1", "merged"),
    "oft_cayley_coft": (vec_oft_cayley_coft, "1.1", "merged"),
    "boft": (vec_boft, "1.1", "merged"),
    "vera": (vec_vera, "1.2", "delta"),
    "vera_unfused_stored": (vec_vera_unfused_stored, "1.2", "delta"),
    "fourierft": (vec_fourierft, "1.2", "delta"),
    "lora_conv2d": (vec_lora_conv2d, "1.1", "delta"),
    "lora_bias": (vec_lora_bias, "1.1", "delta"),
}


# ------------------------------------------------------------------ must-refuse vectors
def written(b: Builder12, version: str = "1.1") -> bytes:
    return container(b.tensors, metadata_for(b.manifest, version))


def one(build, *args, **kwargs):
    """A file holding one module built by ``build(b, *args, **kwargs)``."""
    b = Builder12()
    build(b, *args, **kwargs)
    return b


def edit_params(b: Builder12, target: str, **changes) -> Builder12:
    params = entry_of(b, target)["params"]
    for key, value in changes.items():
        if value is None:
            params.pop(key)
        else:
            params[key] = value
    return b


def unlisted(b: Builder12, target: str) -> Builder12:
    """Drop the module's base.weights entry (README §7: MAY omit), so only the method rule is broken."""
    del b.manifest["base"]["weights"][entry_of(b, target)["base_weight"]]
    return b


def ia3_in(b):
    ia3_module(b, "model.k_proj", "model.k_proj.weight", (8, 6), "in")


def loha_q(b):
    loha_module(b, "model.q_proj", (8, 6), 2, 4)


def lokr_up(b, **kw):
    args = dict(w1_full=True, w2_full=False) | kw
    lokr_module(b, "model.up_proj", (12, 8), (3, 2), (4, 4), 2, 4, "peft", **args)


def adalora_q(b):
    adalora_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 3, 8, 4)


def oft_o(b, **kw):
    oft_module(b, "model.o_proj", (6, 8), **(dict(block=4, share=False, cayley="neumann") | kw))


def boft_up(b, **kw):
    boft_module(b, "model.up_proj", (12, 8), **(dict(factors=2, block=4) | kw))


def vera_q(b, **kw):
    vera_module(b, "model.q_proj", "model.q_proj.weight", (8, 6),
                **(dict(rank=4, seed=0, variant="fused", max_in=8, max_out=12) | kw))


def fourier_q(b, **kw):
    fourierft_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), **(dict(seed=777, n=10, scaling=150.0) | kw))


def conv3(b):
    lora_conv2d_module(b, "model.conv3", (5, 3, 3, 3), 2, 3)


def wrong_role(build, target, role, shape, version="1.1"):
    def make():
        b = one(build)
        set_role(b, target, role, Tensor("F32", np.ones(shape)))
        return written(b, version)
    return make


def missing_role(build, target, role):
    def make():
        b = one(build)
        set_role(b, target, role, None)
        return written(b)
    return make


def params_edit(build, target, version="1.1", unlist=False, **changes):
    def make():
        b = edit_params(one(build), target, **changes)
        return written(unlisted(b, target) if unlist else b, version)
    return make


def lokr_both_w1():
    b = one(lokr_up)
    set_role(b, "model.up_proj", "w1_a", Tensor("F32", rand("extra w1_a", (3, 2))))
    set_role(b, "model.up_proj", "w1_b", Tensor("F32", rand("extra w1_b", (2, 2))))
    return written(b)


def lokr_products():
    b = Builder12()
    lokr_module(b, "model.up_proj", (12, 8), (2, 2), (4, 4), 2, 4, "peft", w1_full=True, w2_full=False)
    return written(unlisted(b, "model.up_proj"))


def oft_not_dividing():
    b = Builder12()
    oft_module(b, "model.o_proj", (6, 8), block=3, share=False, cayley="neumann")  # in = 8, b = 3: 2 blocks
    return written(b)


def boft_build(shape, target, **kw):
    def make():
        b = Builder12()
        boft_module(b, target, shape, **kw)
        return written(b)
    return make


def vera_one_projection():
    b = one(vera_q, stored_projections=True)
    set_role(b, "model.q_proj", "proj_B", None)
    return written(b, "1.2")


def conv2d_as_matrix():
    b = one(conv3)
    entry = entry_of(b, "model.conv3")
    entry["shape"] = [5, 3]
    set_role(b, "model.conv3", "lora_A", Tensor("F32", rand("flat A", (2, 3))))
    set_role(b, "model.conv3", "lora_B", Tensor("F32", rand("flat B", (5, 2))))
    return written(unlisted(b, "model.conv3"))


def conv2d_fan_in_fan_out():
    b = one(conv3)
    entry_of(b, "model.conv3")["fan_in_fan_out"] = True
    return written(unlisted(b, "model.conv3"))


def bias_delta_dtype():
    b = vec_lora_bias()
    tensor = Tensor("I8", np.ones(8))
    b.tensors["payload.model.q_proj.bias"] = tensor
    b.manifest["payloads"]["model.q_proj.bias"]["tensor"].update(dtype="I8", shape=tensor.shape)
    return written(b)


def adalora_rank_zero() -> bytes:
    b = Builder12()
    adalora_module(b, "model.q_proj", "model.q_proj.weight", (8, 6), 0, 8, 4)
    return written(b)


def fourierft_too_many() -> bytes:
    b = Builder12()
    fourierft_module(b, "model.v_proj", "model.v_proj.weight", (4, 6), seed=5, n=24, scaling=1.0)
    edit_params(b, "model.v_proj", n_frequency=25)
    set_role(b, "model.v_proj", "spectrum", Tensor("F32", rand("too many", (25,))))
    return written(b, "1.2")


def loha_conv1d() -> bytes:
    b = Builder12()
    loha_module(b, "model.q_proj", (8, 6), 2, 4)
    entry_of(b, "model.q_proj")["layer"] = "conv1d"
    return written(b)


TUNERS = "methods-tuners.md"
# file name -> (builder returning bytes, refusal class, rule)
INVALID = {
    "ia3_scale_length": (wrong_role(ia3_in, "model.k_proj", "scale", (8,)), "TensorError",
                         f"{TUNERS} §1: ia3 scale has n = in on axis in"),
    "ia3_bias_scaled_axis_in": (params_edit(ia3_in, "model.k_proj", bias_scaled=True), "ManifestError",
                                f"{TUNERS} §2: bias_scaled is true exactly when axis = out"),
    "loha_missing_role": (missing_role(loha_q, "model.q_proj", "w2_b"), "ManifestError",
                          f"{TUNERS} §1 / schema: every loha role is required"),
    "loha_rank_shape": (wrong_role(loha_q, "model.q_proj", "w1_b", (3, 6)), "TensorError",
                        f"{TUNERS} §1: w1_b is (r, in)"),
    "loha_on_conv1d": (loha_conv1d, "ManifestError", "schema: loha layers"),
    "lokr_full_and_factored_half": (lokr_both_w1, "ManifestError",
                                    f"{TUNERS} §2: exactly one of w1 / (w1_a, w1_b)"),
    "lokr_missing_half": (missing_role(lokr_up, "model.up_proj", "w1"), "ManifestError",
                          f"{TUNERS} §2: exactly one of w1 / (w1_a, w1_b)"),
    "lokr_shapes_contradict_module": (lokr_products, "ManifestError", f"{TUNERS} §2: out = a·b, in = c·d"),
    "lokr_lycoris_scale_both_full": (
        params_edit(lambda b: lokr_up(b, w2_full=True), "model.up_proj", convention="lycoris"),
        "ManifestError", f"{TUNERS} §2: lycoris scale is 1 when both halves are full"),
    "adalora_scale_rule": (params_edit(adalora_q, "model.q_proj", scale=8 / 4.0), "ManifestError",
                           f"{TUNERS} §2: scale = scaling / fl32(fl32(ranknum) + fl32(1e-5))"),
    "adalora_rank_zero": (adalora_rank_zero, "ManifestError",
                          f"{TUNERS} §2: rank ≥ 1; a rank-0 module is not stored"),
    "adalora_ranknum_zero": (params_edit(adalora_q, "model.q_proj", ranknum=0.0), "ManifestError",
                             "schema: ranknum > 0"),
    "oft_block_size_zero": (params_edit(oft_o, "model.o_proj", block_size=0), "ManifestError",
                            "schema: block_size ≥ 2"),
    "oft_block_size_not_dividing": (oft_not_dividing, "ManifestError", f"{TUNERS} §2: block_size divides in"),
    "oft_shared_blocks_rows": (wrong_role(lambda b: oft_o(b, share=True), "model.o_proj", "blocks", (2, 6)),
                               "TensorError", f"{TUNERS} §1: blocks has 1 row with block_share"),
    "oft_neumann_terms_zero": (params_edit(oft_o, "model.o_proj", neumann_terms=0), "ManifestError",
                               "schema: neumann_terms ≥ 1"),
    "boft_factor_contradicts_tensors": (params_edit(boft_up, "model.up_proj", butterfly_factors=1),
                                        "TensorError", f"{TUNERS} §1: rotations is (N, D, H, H)"),
    "boft_odd_block_butterfly": (boft_build((8, 12), "model.down_proj", factors=2, block=3), "ManifestError",
                                 f"{TUNERS} §2: N > 1 needs an even block size"),
    "boft_blocks_not_multiple": (boft_build((8, 12), "model.down_proj", factors=3, block=2), "ManifestError",
                                 f"{TUNERS} §2: D is a multiple of 2^(N-1)"),
    "boft_scale_length": (wrong_role(boft_up, "model.up_proj", "scale", (8,)), "TensorError",
                          f"{TUNERS} §1: scale is (out)"),
    "vera_missing_seed": (params_edit(vera_q, "model.q_proj", "1.2", seed=None), "ManifestError",
                          f"{TUNERS} §5 / schema: seed is required"),
    "vera_in_1_1_file": (params_edit(vera_q, "model.q_proj", "1.1"), "UnknownMethodError",
                         "README §3: vera does not exist in 1.1"),
    "vera_seed_too_large": (params_edit(vera_q, "model.q_proj", "1.2", seed=str(2**64)), "ManifestError",
                            "torch-cpu-generator.md §1: the stored seed is a u64"),
    "vera_exceeds_max_in": (params_edit(vera_q, "model.q_proj", "1.2", max_in=5), "ManifestError",
                            f"{TUNERS} §5: in ≤ max_in"),
    "vera_one_projection": (vera_one_projection, "ManifestError", f"{TUNERS} §5: proj_A and proj_B together"),
    "vera_unknown_generator_version": (params_edit(vera_q, "model.q_proj", "1.2", generator_version=2),
                                       "ManifestError", f"{TUNERS} §5: generator keys are schema constants"),
    "vera_unknown_float_affine": (params_edit(vera_q, "model.q_proj", "1.2", float_affine="fma"),
                                  "ManifestError", "schema: float_affine is fused or unfused"),
    "fourierft_missing_seed": (params_edit(fourier_q, "model.q_proj", "1.2", seed=None), "ManifestError",
                               f"{TUNERS} §5 / schema: seed is required"),
    "fourierft_in_1_1_file": (params_edit(fourier_q, "model.q_proj", "1.1"), "UnknownMethodError",
                              "README §3: fourierft does not exist in 1.1"),
    "fourierft_too_many_frequencies": (fourierft_too_many, "ManifestError", f"{TUNERS} §5: n ≤ out·in"),
    "fourierft_spectrum_length": (wrong_role(fourier_q, "model.q_proj", "spectrum", (11,), "1.2"), "TensorError",
                                  f"{TUNERS} §5: spectrum is (n_frequency)"),
    "lora_conv2d_b_not_1x1": (wrong_role(conv3, "model.conv3", "lora_B", (5, 2)), "TensorError",
                              "README §4: conv2d lora_B is (out, r, 1, 1)"),
    "lora_conv2d_matrix_shape": (conv2d_as_matrix, "ManifestError", "README §4: a conv2d shape is [out, in, kh, kw]"),
    "lora_conv2d_fan_in_fan_out": (conv2d_fan_in_fan_out, "ManifestError",
                                   "README §4: conv2d has fan_in_fan_out false"),
    "bias_delta_dtype_i8": (bias_delta_dtype, "TensorError", "README §8: a bias_delta tensor is F64/F32/F16/BF16"),
}


def main(out: Path = OUT) -> None:
    """Write every vector and INDEX.json under ``out`` (replacing it)."""
    if out.exists():
        shutil.rmtree(out)
    (out / "invalid").mkdir(parents=True)
    (out / "base.safetensors").write_bytes(container(BASE12, {"format": "pt"}))
    index = {"version": "1.2", "base": "base.safetensors", "positive": [], "invalid": []}
    for name, (build, version, kind) in POSITIVE.items():
        b = build()
        b.write(out / f"{name}.safetensors", version)
        about = " ".join(build.__doc__.split()) + (PAYLOAD_NOTE if b.manifest["payloads"] else "")
        index["positive"].append({"file": f"{name}.safetensors", "expected": f"{name}.expected.safetensors",
                                  "base": "base.safetensors", "version": version, "expected_dtype": "F64",
                                  "expected_kind": kind, "rtol": RTOL_OF.get(name, RTOL), "order": ORDER[kind], "about": about})
    for name, (build, refusal, rule) in INVALID.items():
        (out / "invalid" / f"{name}.safetensors").write_bytes(build())
        index["invalid"].append({"file": f"invalid/{name}.safetensors", "refusal": refusal, "rule": rule})
    (out / "INDEX.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(POSITIVE)} positive and {len(INVALID)} must-refuse vectors to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
