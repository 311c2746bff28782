"""MLX-LM adapters: mlx-lm's layout (keys, transposed shapes, config) and its ΔW; round trips."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterfmt.ops.convert import convert
from adapterfmt.errors import ForeignFormatError, LossyConversionError, UsageError
from adapterfmt.format import read_adapter, write_adapter
from adapterfmt.format.dtypes import dtype_name
from tests.helpers import make_peft_adapter, peft_merged_state

from .conftest import assert_round_trip, deltas


@pytest.mark.parametrize("name", ["patterns", "rslora", "dora"])
def test_round_trip(name, native, workdir, base_weights):
    out, back = workdir / f"{name}-mlx", workdir / f"{name}-from-mlx.safetensors"
    report = convert(native[name], out, to="mlx")
    convert(out, back)
    assert_round_trip(native[name], back, report, base_weights)
    if name == "dora":
        assert report.worst == "lossless"


def test_layout_and_mlx_delta(native, workdir, base_weights):
    out = workdir / "patterns-layout-mlx"
    convert(native["patterns"], out, to="mlx")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    params = config["lora_parameters"]
    assert params["rank"] == 4 and params["scale"] == 2.0
    assert params["keys"] == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    ours = deltas(native["patterns"], base_weights)
    with safe_open(str(out / "adapters.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "mlx"}
        assert set(handle.keys()) == {f"{m}.{r}" for m in ours for r in ("lora_a", "lora_b")}
        for module, delta in ours.items():
            a, b = handle.get_tensor(f"{module}.lora_a"), handle.get_tensor(f"{module}.lora_b")
            out_f, in_f = delta.shape
            assert list(a.shape) == [in_f, params["rank"]] and list(b.shape) == [params["rank"], out_f]
            # mlx-lm: y += scale * x @ a @ b; fuse: W + (scale * b.T) @ a.T
            x = torch.randn(3, in_f)
            torch.testing.assert_close((x @ a @ b) * params["scale"], x @ delta.t(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close((params["scale"] * b.t()) @ a.t(), delta, rtol=1e-6, atol=1e-7)


def test_dora_magnitude_fuses_like_mlx_and_peft(native, workdir, base, base_weights):
    out = workdir / "dora-fuse-mlx"
    convert(native["dora"], out, to="mlx")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora"
    scale = config["lora_parameters"]["scale"]
    merged = peft_merged_state(base, workdir / "peft-dora")
    with safe_open(str(out / "adapters.safetensors"), framework="pt") as handle:
        module = "model.layers.0.self_attn.q_proj"
        a, b, m = (handle.get_tensor(f"{module}.{r}") for r in ("lora_a", "lora_b", "m"))
    weight = base_weights[f"{module}.weight"].float()
    adapted = weight + (scale * b.t()) @ a.t()  # mlx-lm DoRALinear.fuse
    fused = (m / torch.linalg.norm(adapted, dim=1))[:, None] * adapted
    torch.testing.assert_close(fused, merged[f"{module}.weight"], rtol=1e-5, atol=1e-6)


def test_num_layers_counts_from_the_last_block(workdir, base):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = make_peft_adapter(base, workdir / "peft-last", r=2, lora_alpha=4, target_modules=["q_proj"],
                                 layers_to_transform=[1])
    convert(peft, workdir / "last.safetensors", base=base)
    convert(workdir / "last.safetensors", workdir / "last-mlx", to="mlx")
    config = json.loads((workdir / "last-mlx" / "adapter_config.json").read_text())
    assert config["num_layers"] == 1 and config["lora_parameters"]["keys"] == ["self_attn.q_proj"]


def test_refusals(workdir, native):
    bad = workdir / "bad-mlx"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1,
                                                          "lora_parameters": {"rank": 2, "scale": 1.0}}))
    save_file({"model.layers.0.self_attn.q_proj.lora_a": torch.zeros(64, 2),
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, str(bad / "adapters.safetensors"))
    with pytest.raises(ForeignFormatError, match="not lora_a, lora_b or m"):
        convert(bad, workdir / "bad.safetensors")
    with pytest.raises(UsageError, match="--dtype: Input should be 'f32', 'f16', 'bf16' or 'keep'"):
        convert(native["patterns"], workdir / "f8-mlx", to="mlx", format_options={"dtype": "f8"})


# ---------------------------------------------------------------- scale folding (issue 11)
def _in_dtype(path, dtype, out):
    """The adapterfmt file at ``path`` with every tensor cast to ``dtype`` (a bf16 adapter)."""
    adapter = read_adapter(path)
    adapter.tensors = {k: v.to(dtype) for k, v in adapter.tensors.items()}
    for entry in adapter.manifest.modules.values():
        for ref in entry.tensors.values():
            ref.dtype = dtype_name(dtype)
    return write_adapter(adapter, out)


def _fp64_deltas(path):
    """ΔW (out, in) in fp64 of every LoRA module of an adapterfmt file: scale * B @ A."""
    adapter = read_adapter(path)
    return {t: float(e.params["scale"]) * adapter.module_tensors(t)["lora_B"].double()
            @ adapter.module_tensors(t)["lora_A"].double() for t, e in adapter.manifest.modules.items()}


def _mlx_deltas(out):
    """ΔW (out, in) in fp64 as mlx-lm's LoRALinear.fuse computes it: scale * lora_b.T @ lora_a.T."""
    config = json.loads((out / "adapter_config.json").read_text())
    scale, weights = config["lora_parameters"]["scale"], load_file(str(out / "adapters.safetensors"))
    stems = {k.rsplit(".", 1)[0] for k in weights}
    return {s: scale * weights[f"{s}.lora_b"].double().t() @ weights[f"{s}.lora_a"].double().t() for s in stems}


def test_mlx_bf16_per_module_scale_fold_is_fp32(native, workdir):
    """A bf16 rsLoRA adapter: v_proj (rank 3, scale 8/sqrt(3)) differs from the global scale 4. The fold is
    computed in fp64 and B stored in fp32 (relative ΔW error ~1e-8, reported); folding into bf16, what the
    writer did before, is off by ~1.9e-3 (now only on request, reported lossy)."""
    half = _in_dtype(native["rslora"], torch.bfloat16, workdir / "rslora-bf16.safetensors")
    reference, folded = _fp64_deltas(half), "model.layers.0.self_attn.v_proj"
    errors = {}
    for dtype in ("keep", "bf16"):
        out = workdir / f"rslora-bf16-{dtype}-mlx"
        report = convert(half, out, to="mlx", format_options={"dtype": dtype})
        got = _mlx_deltas(out)
        errors[dtype] = float(torch.linalg.norm(got[folded] - reference[folded]) / torch.linalg.norm(reference[folded]))
        status = {m.module: m for m in report.modules}[folded]
        assert status.rel_error == pytest.approx(errors[dtype], rel=1e-6)  # the report measures what the file holds
        weights = load_file(str(out / "adapters.safetensors"))
        if dtype == "keep":
            assert status.status == "scale_folded" and weights[f"{folded}.lora_b"].dtype == torch.float32
            assert weights[f"{folded}.lora_a"].dtype == torch.bfloat16
            assert weights["model.layers.0.self_attn.q_proj.lora_b"].dtype == torch.bfloat16  # not folded: kept
        else:
            assert status.status == "lossy" and weights[f"{folded}.lora_b"].dtype == torch.bfloat16
    assert errors["keep"] < 1e-7 and errors["bf16"] > 1e-3, errors


def test_mlx_fold_exact_in_fp32_is_exact(native, workdir):
    """bf16 B times 0.375 (o_proj: scale 0.75 against 2) needs 10 significant bits: exact in fp32."""
    half = _in_dtype(native["patterns"], torch.bfloat16, workdir / "patterns-bf16.safetensors")
    out = workdir / "patterns-bf16-mlx"
    report = convert(half, out, to="mlx", strict=True)
    status = {m.module: m for m in report.modules}["model.layers.0.self_attn.o_proj"]
    assert status.status == "exact" and status.max_abs_error == 0.0, status
    got, reference = _mlx_deltas(out), _fp64_deltas(half)
    assert all(torch.equal(got[m], reference[m]) for m in reference)


def test_mlx_power_of_two_fold_is_exact_in_bf16_and_passes_strict(workdir, base):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # v_proj: rank 2 -> scale 4 against the global 2: ratio 2
        peft = make_peft_adapter(base, workdir / "peft-pow2", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                 rank_pattern={"v_proj": 2})
    convert(peft, workdir / "pow2.safetensors", base=base)
    half = _in_dtype(workdir / "pow2.safetensors", torch.bfloat16, workdir / "pow2-bf16.safetensors")
    out = workdir / "pow2-mlx"
    report = convert(half, out, to="mlx", strict=True)
    status = {m.module: m for m in report.modules}["model.layers.0.self_attn.v_proj"]
    assert status.status == "exact" and status.max_abs_error == 0.0, status
    weights = load_file(str(out / "adapters.safetensors"))
    assert weights["model.layers.0.self_attn.v_proj.lora_b"].dtype == torch.bfloat16
    reference = _fp64_deltas(half)
    for module, delta in _mlx_deltas(out).items():
        assert torch.equal(delta, reference[module]), module


def test_mlx_strict_refuses_inexact_fold(native, workdir):
    out = workdir / "strict-mlx"
    with pytest.raises(LossyConversionError, match=r"o_proj'.*folded into B.*--strict"):
        convert(native["patterns"], out, to="mlx", strict=True)
    assert not out.exists()
    half = _in_dtype(native["rslora"], torch.float32, workdir / "rslora-f32.safetensors")
    with pytest.raises(LossyConversionError, match="rounded to F16"):
        convert(half, workdir / "strict-f16-mlx", to="mlx", strict=True, format_options={"dtype": "f16"})


def test_mlx_dtype_f32_is_exact(native, workdir, base_weights):
    half = _in_dtype(native["dora"], torch.bfloat16, workdir / "dora-bf16.safetensors")
    out = workdir / "dora-f32-mlx"
    report = convert(half, out, to="mlx", strict=True, format_options={"dtype": "f32"})
    assert {m.status for m in report.modules} == {"exact"}, report.lines()
    assert {t.dtype for t in load_file(str(out / "adapters.safetensors")).values()} == {torch.float32}


# ---------------------------------------------------------------- the architecture table (issue 11)
def _peft_on(name, root, **kwargs):
    from tests.consumers.mlx_models import build_base, make_adapter
    base = build_base(name, root / f"{name}-base")
    return base, make_adapter(name, base, root / f"{name}-peft", **kwargs)


def test_mlx_gpt_neox_uses_mlx_lm_names(workdir):
    """GPT-NeoX was written with transformers' names (gpt_neox.layers.N), which mlx-lm cannot map; now it gets mlx-lm's (model.h.N, model.embed_out, model.embed_in) and reads back to the same ΔW."""
    base, peft = _peft_on("gpt_neox", workdir)
    out, back = workdir / "neox-mlx", workdir / "neox-back.safetensors"
    convert(peft, workdir / "neox.safetensors", base=base)
    convert(workdir / "neox.safetensors", out, to="mlx")
    names = set(load_file(str(out / "adapters.safetensors")))
    assert "model.h.0.attention.query_key_value.lora_a" in names and "model.embed_in.lora_a" in names
    assert not any(n.startswith("gpt_neox.") for n in names)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == 3 and "model.embed_in" in config["lora_parameters"]["keys"]
    assert "attention.query_key_value" in config["lora_parameters"]["keys"]
    convert(out, back, base=base)
    original, again = read_adapter(workdir / "neox.safetensors"), read_adapter(back)
    assert set(again.manifest.modules) == set(original.manifest.modules)
    assert again.manifest.modules["gpt_neox.embed_in"].layer == "embedding"


def test_mlx_opt_refused(workdir):
    from transformers import OPTConfig, OPTForCausalLM
    base = workdir / "opt-base"
    OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                             ffn_dim=48, max_position_embeddings=32, word_embed_proj_dim=32)).save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = make_peft_adapter(base, workdir / "opt-peft", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(UsageError, match="architecture 'OPTForCausalLM': mlx-lm has no OPT model"):
        convert(peft, workdir / "opt-mlx", to="mlx", base=base)
    assert not (workdir / "opt-mlx").exists()


def test_mlx_lm_head_and_c_attn_exported(native, workdir):
    """Embedding and lm_head LoRA (untied Llama) and GPT-2's Conv1D c_attn: written where mlx-lm's loader
    puts them, in mlx-lm's layouts (LoRAEmbedding: lora_a (vocab, r), lora_b (r, dims))."""
    out = workdir / "embed-mlx"
    convert(native["embed"], out, to="mlx")
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["lora_parameters"]["keys"]) == {"self_attn.q_proj", "self_attn.k_proj", "model.embed_tokens",
                                                      "lm_head"}
    got, ours = _mlx_deltas(out), _fp64_deltas(native["embed"])
    weights = load_file(str(out / "adapters.safetensors"))
    assert list(weights["model.embed_tokens.lora_a"].shape) == [128, 4]  # (vocab, r)
    for module, delta in ours.items():
        # canonical (out, in) is (dims, vocab) for the embedding: mlx-lm's fuse adds scale*lora_a@lora_b (vocab, dims)
        assert torch.equal(got[module], delta), module
    assert torch.equal(ours["model.embed_tokens"].t(), 2.0 * weights["model.embed_tokens.lora_a"].double()
                       @ weights["model.embed_tokens.lora_b"].double())
    base, peft = _peft_on("gpt2", workdir, targets=["c_attn"])
    convert(peft, workdir / "gpt2-mlx", to="mlx", base=base)
    weights = load_file(str(workdir / "gpt2-mlx" / "adapters.safetensors"))
    assert list(weights["model.h.0.attn.c_attn.lora_a"].shape) == [64, 2]  # (in, r), rank pattern c_attn: 2
    assert list(weights["model.h.0.attn.c_attn.lora_b"].shape) == [2, 192]


@pytest.fixture(scope="module")
def tied_peft(workdir):
    base, peft = _peft_on("gemma", workdir / "tied", targets=["q_proj", "embed_tokens", "lm_head"])
    convert(peft, workdir / "tied" / "adapter.safetensors")  # (binding a tied lm_head to --base: another defect)
    return workdir / "tied" / "adapter.safetensors"


def _with_base(path, out, architecture, tie, drop=()):
    """The adapter with a recorded base (architecture, layer count, tie), without the ``drop`` modules and
    without PEFT's saved embedding copies (unverifiable here: no base was given at import)."""
    adapter = read_adapter(path)
    for payload in adapter.manifest.payloads.values():
        adapter.tensors.pop(payload.tensor.name)
    adapter.manifest.payloads.clear()
    for target in drop:
        for ref in adapter.manifest.modules.pop(target).tensors.values():
            adapter.tensors.pop(ref.name)
    adapter.manifest.base.architecture = architecture
    config = {"architectures": [architecture], "num_hidden_layers": 3}
    adapter.manifest.source["base_config"] = config | ({} if tie is None else {"tie_word_embeddings": tie})
    return write_adapter(adapter, out, overwrite=True)


@pytest.mark.parametrize("architecture, tie", [("GemmaForCausalLM", None), ("LlamaForCausalLM", True)])
@pytest.mark.parametrize("target", ["model.embed_tokens", "lm_head"])
def test_mlx_tied_embedding_or_head_refused(architecture, tie, target, tied_peft, workdir):
    """On a tied model mlx-lm has no lm_head, and its LoRAEmbedding would change the output too."""
    other = {"model.embed_tokens": "lm_head", "lm_head": "model.embed_tokens"}[target]
    native = _with_base(tied_peft, workdir / f"tied-{architecture}-{target}.safetensors", architecture, tie, [other])
    model_type = {"GemmaForCausalLM": "gemma", "LlamaForCausalLM": "llama"}[architecture]
    with pytest.raises(UsageError, match=f"{target}' cannot be exported to MLX: mlx-lm's {model_type} model "
                                         "(computes the logits with this embedding|has no separate output)"):
        convert(native, workdir / "tied-mlx", to="mlx")
    assert not (workdir / "tied-mlx").exists()


@pytest.mark.parametrize("to", ["mlx", "gguf"])
def test_unchecked_full_weight_copy_refused(tied_peft, workdir, to):
    """PEFT's saved copy of a targeted embedding cannot be dropped unchecked (it differs after a vocabulary
    resize): without --base or a recorded fingerprint the export is refused, naming the way out."""
    adapter = read_adapter(tied_peft)
    assert adapter.manifest.payloads, "the fixture's PEFT file has a saved embedding copy"
    adapter.manifest.base.architecture = "LlamaForCausalLM"
    adapter.manifest.source["base_config"] = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3,
                                              "tie_word_embeddings": False}
    source = write_adapter(adapter, workdir / f"unchecked-{to}.safetensors", overwrite=True)
    out = workdir / f"unchecked-{to}"
    with pytest.raises(UsageError, match="saved full weight.*nothing to check it against") as caught:
        convert(source, out, to=to)
    assert "--base" in caught.value.hint
    assert not out.exists()


def test_mlx_unknown_tie_needs_base(tied_peft, workdir):
    native = _with_base(tied_peft, workdir / "tie-unknown.safetensors", "LlamaForCausalLM", None, ["lm_head"])
    with pytest.raises(UsageError, match="ties lm_head to the embeddings is unknown; pass --base"):
        convert(native, workdir / "tie-unknown-mlx", to="mlx")
    untied = _with_base(tied_peft, workdir / "untied.safetensors", "LlamaForCausalLM", False)
    convert(untied, workdir / "untied-mlx", to="mlx")
    keys = json.loads((workdir / "untied-mlx" / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert keys == ["lm_head", "model.embed_tokens", "self_attn.q_proj"]


def test_mlx_dora_embedding_refused(workdir, base):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = make_peft_adapter(base, workdir / "peft-dora-embed", r=2, lora_alpha=4, use_dora=True,
                                 target_modules=["q_proj", "embed_tokens"])
    convert(peft, workdir / "dora-embed.safetensors", base=base)
    with pytest.raises(UsageError, match="'model.embed_tokens': DoRA on an embedding is not exported to MLX"):
        convert(workdir / "dora-embed.safetensors", workdir / "dora-embed-mlx", to="mlx")


def test_mlx_table_covers_only_tested_architectures():
    """Every architecture in the MLX table has a real mlx-lm logits test (tests/consumers), and back."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from adapterfmt.formats._mlx_architectures import MLX_ARCHITECTURES
    from tests.consumers.mlx_models import ARCHS
    tested = {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[arch.model_type] for arch in ARCHS.values()}
    assert tested == set(MLX_ARCHITECTURES)


def test_mlx_unknown_architecture_and_names_need_base(workdir, peft_dirs):
    convert(peft_dirs["patterns"], workdir / "no-base.safetensors")
    with pytest.raises(UsageError, match="base architecture is unknown.*pass --base"):
        convert(workdir / "no-base.safetensors", workdir / "no-base-mlx", to="mlx")
    bad = workdir / "embed-no-base-mlx"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 0,
                                                          "lora_parameters": {"rank": 2, "scale": 1.0}}))
    save_file({"model.embed_tokens.lora_a": torch.ones(128, 2), "model.embed_tokens.lora_b": torch.ones(2, 64)},
              str(bad / "adapters.safetensors"))
    with pytest.raises(ForeignFormatError, match="Linear or Embedding.*pass --base"):
        convert(bad, workdir / "embed-no-base.safetensors")


def test_mlx_round_trip_without_base_keeps_mlx_layout(native, workdir):
    first, second = workdir / "rt1-mlx", workdir / "rt2-mlx"
    convert(native["rslora"], first, to="mlx")
    convert(first, workdir / "rt.safetensors")
    convert(workdir / "rt.safetensors", second, to="mlx")
    a, b = load_file(str(first / "adapters.safetensors")), load_file(str(second / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "adapter_config.json").read_text())["num_layers"] == \
        json.loads((second / "adapter_config.json").read_text())["num_layers"]


def test_mlx_module_without_hf_counterpart_refused_on_read(workdir, base):
    bad = workdir / "router-mlx"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                          "lora_parameters": {"rank": 2, "scale": 1.0}}))
    save_file({"model.layers.0.mlp.gate.lora_a": torch.ones(64, 2), "model.layers.0.mlp.gate.lora_b": torch.ones(2, 4)},
              str(bad / "adapters.safetensors"))
    with pytest.raises(ForeignFormatError, match="'model.layers.0.mlp.gate' is not one of the layers of mlx-lm's "
                                                 "llama model"):
        convert(bad, workdir / "router.safetensors", base=base)


def test_mlx_dora_embedding_refused_on_read(workdir, base):
    native = workdir / "dora-embed-native-mlx"
    native.mkdir()
    (native / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "dora", "num_layers": 0,
                                                             "lora_parameters": {"rank": 2, "scale": 1.0}}))
    save_file({"model.embed_tokens.lora_a": torch.ones(128, 2), "model.embed_tokens.lora_b": torch.ones(2, 64),
               "model.embed_tokens.m": torch.ones(128)}, str(native / "adapters.safetensors"))
    with pytest.raises(ForeignFormatError, match="DoRAEmbedding keeps one magnitude per token"):
        convert(native, workdir / "dora-embed-native.safetensors", base=base)
