"""merge --base-form: a QLoRA adapter merged into the base it was trained against.

The reference is the real QLoRA model: transformers loads the tiny bf16 Llama in 4-bit NF4 with
bitsandbytes on CPU, PEFT puts a LoRA on it. The effective weight each 4-bit layer computes with is
read back by probing the layer itself with an identity input (exact: one non-zero product per output),
in train mode, which is the path training runs (eval on AVX512-BF16 CPUs takes a bf16 inference kernel).
"""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")
from safetensors.torch import load_file  # noqa: E402

import adapterfmt  # noqa: E402
from adapterfmt.errors import UsageError  # noqa: E402

from ..helpers import logits  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
DELTA_SHRINK = 0.02  # makes ΔW small next to the NF4 error on some layers, as in real QLoRA runs


def qlora_model(base, compute_dtype, double_quant=True, quant_type="nf4"):
    """The 4-bit model transformers + bitsandbytes build on CPU (load dtype fp32)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype,
                                bnb_4bit_use_double_quant=double_quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.float32,
                                                    device_map="cpu")


def effective_weight(layer, dtype) -> torch.Tensor:
    """What a bnb Linear4bit multiplies by, read back through its own forward: I @ Wᵀ = Wᵀ."""
    base_layer = getattr(layer, "base_layer", layer)
    base_layer.train()
    with torch.no_grad():
        return base_layer(torch.eye(base_layer.in_features, dtype=dtype)).t().contiguous()


@pytest.fixture(scope="module", params=[("nf4", torch.float32), ("nf4", torch.bfloat16), ("fp4", torch.float32)],
                ids=["nf4-compute-fp32", "nf4-compute-bf16", "fp4-compute-fp32"])
def qlora(request, llama_base_bf16, tmp_path_factory):
    """(base dir, PEFT QLoRA model, adapterfmt adapter with its base form recorded, compute dtype)."""
    from peft import LoraConfig, get_peft_model
    scheme, compute = request.param
    tmp = tmp_path_factory.mktemp("qlora")
    model = qlora_model(llama_base_bf16, compute, quant_type=scheme)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(DELTA_SHRINK)
    peft_model.save_pretrained(tmp / "peft")
    flag = {torch.float32: "fp32", torch.bfloat16: "bf16"}[compute]
    adapterfmt.convert(tmp / "peft", tmp / "a.safetensors", base=llama_base_bf16, trained_on=scheme,
                       trained_options={"compute_dtype": flag, "double_quant": True})
    return llama_base_bf16, peft_model, tmp / "a.safetensors", compute


def reference_weights(peft_model, compute) -> dict[str, torch.Tensor]:
    """Per quantized weight: the QLoRA layer's effective weight (+ PEFT's ΔW where adapted), in fp32."""
    import bitsandbytes as bnb
    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, bnb.nn.Linear4bit) and not name.endswith(".base_layer"):
            weight = effective_weight(module, compute).float()
            if hasattr(module, "lora_A"):
                weight = weight + module.get_delta_weight("default").float()
            out[f"{name}.weight"] = weight
    return out


def test_records_the_base_form(qlora):
    _, _, adapter, compute = qlora
    form = adapterfmt.read_adapter(adapter).manifest.base.quantization
    assert (form.block_size, form.double_quant, form.library) == (64, True, "bitsandbytes")
    assert form.scheme in ("nf4", "fp4")
    assert form.compute_dtype == {torch.float32: "F32", torch.bfloat16: "BF16"}[compute]


@pytest.mark.parametrize("dtype", ["fp32", "keep"])
def test_trained_equals_bnb_dequant_plus_peft_delta_bit_for_bit(qlora, tmp_path, dtype):
    base, peft_model, adapter, compute = qlora
    summary = adapterfmt.merge(base, [adapter], tmp_path / "m", dtype=dtype, base_form="trained")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    reference = reference_weights(peft_model, compute)
    assert len(reference) == 14  # every q/k/v/o/gate/up/down of both layers, adapted or not; not lm_head
    out_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    for name, want in reference.items():
        assert torch.equal(merged[name], want.to(out_dtype)), name  # one rounding, from fp32
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(merged[name].float(), original[name].float()), name  # never quantized
    assert summary.base_form["mode"] == "trained" and len(summary.base_form["layers"]) == 6


def test_trained_merge_computes_the_qlora_logits(qlora, tmp_path):
    from transformers import AutoModelForCausalLM
    base, peft_model, adapter, compute = qlora
    adapterfmt.merge(base, [adapter], tmp_path / "trained", dtype="fp32")  # trained is the default here
    adapterfmt.merge(base, [adapter], tmp_path / "original", dtype="fp32", base_form="original")
    peft_model.train()  # the training path (dropout is 0)
    want = logits(peft_model)
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "trained", dtype=torch.float32))
    naive = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "original", dtype=torch.float32))
    # fp32 compute: same weights, only the summation order of x@W + x@ΔW differs. bf16 compute: the
    # QLoRA model runs its base matmul in bf16, the merged model in fp32 (its weights are bf16 values).
    tolerance = 1e-5 if compute == torch.float32 else 1e-2  # measured 3.5e-7 and 2.7e-3
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < tolerance
    assert (naive - want).abs().max() / scale > 10 * ((got - want).abs().max() / scale)


def test_original_differs_and_reports_the_ratio(qlora, tmp_path):
    base, peft_model, adapter, compute = qlora
    summary = adapterfmt.merge(base, [adapter], tmp_path / "m", dtype="fp32", base_form="original")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    reference = reference_weights(peft_model, compute)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           reference["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"],  # unadapted: untouched
                       original["model.layers.0.self_attn.k_proj.weight"].float())
    rows = {row["tensor"]: row for row in summary.base_form["layers"]}
    assert len(rows) == 6
    modules = dict(peft_model.base_model.model.named_modules())
    for name, row in rows.items():
        module = modules[name.removesuffix(".weight")]
        delta = module.get_delta_weight("default").float()
        error = original[name].float() - effective_weight(module, compute).float()
        want = error.norm() / delta.norm()
        assert row["ratio"] == pytest.approx(float(want), rel=1e-4), name
    assert max(r["ratio"] for r in rows.values()) > 1
    assert any(note.startswith("warning:") and "--base-form trained" in note for note in summary.notes)


def test_trained_needs_a_recorded_form(llama_base_bf16, tmp_path):
    from ..helpers import make_peft_adapter
    make_peft_adapter(llama_base_bf16, tmp_path / "peft", target_modules=["q_proj"])
    adapterfmt.convert(tmp_path / "peft", tmp_path / "a.safetensors", base=llama_base_bf16)
    with pytest.raises(UsageError, match="--base-form trained") as info:
        adapterfmt.merge(llama_base_bf16, [tmp_path / "a.safetensors"], tmp_path / "m", base_form="trained")
    assert "--trained-on" in info.value.one_line()
    summary = adapterfmt.merge(llama_base_bf16, [tmp_path / "a.safetensors"], tmp_path / "m2")
    assert summary.base_form is None  # unknown form, no request: the stored weights, as always


def test_bnb_quantize_dequantize_is_deterministic_on_cpu():
    """Measured: the same packed codes and scales every time, whatever the thread count."""
    import bitsandbytes.functional as F
    torch.manual_seed(0)
    weight = torch.randn(384, 320).to(torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, threads, 1, threads):
            torch.set_num_threads(count)
            packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
            results.append((packed, state.absmax, F.dequantize_4bit(packed, state)))
    finally:
        torch.set_num_threads(threads)
    for packed, absmax, dequant in results[1:]:
        assert torch.equal(packed, results[0][0]) and torch.equal(absmax, results[0][1])
        assert torch.equal(dequant, results[0][2])


def test_int8_form_is_what_transformers_quantized(llama_base_bf16):
    """LLM.int8: the weight side of the form equals the int8 codes and scales transformers stores."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file as load
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from adapterfmt.engine.base_form import bnb_form, trained_weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(llama_base_bf16, dtype=torch.float16, device_map="cpu",
                                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    stored = load(llama_base_bf16 / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        want = F.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB).half()
        assert torch.equal(trained_weight(stored[f"{name}.weight"], bnb_form("int8")), want), name


def test_prequantized_int8_base_reads_as_its_dequantized_weights(llama_base_bf16, tmp_path):
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from adapterfmt.checkpoint.bnb_checkpoint import BnbCheckpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(llama_base_bf16, dtype=torch.float16, device_map="cpu",
                                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    model.save_pretrained(tmp_path / "q8")
    checkpoint = BnbCheckpoint(tmp_path / "q8")
    assert checkpoint.scheme == "int8" and len(checkpoint.quantized_names()) == 14
    assert not any(name.endswith((".SCB", ".weight_format")) for name in checkpoint.names())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        want = F.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB).half()
        assert torch.equal(checkpoint.get(f"{name}.weight"), want), name


def test_quantization_config_gives_the_form_or_a_named_refusal():
    from adapterfmt.engine.base_form import form_from_quantization_config
    form = form_from_quantization_config({"quant_method": "bitsandbytes", "load_in_4bit": True,
                                          "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16",
                                          "bnb_4bit_use_double_quant": True, "llm_int8_skip_modules": ["mlp"]})
    assert (form.scheme, form.compute_dtype, form.double_quant, form.skip_modules) == ("nf4", "BF16", True, ["mlp"])
    for method in ("gptq", "awq"):
        with pytest.raises(UsageError, match=f"'{method}'.*quant_method"):
            form_from_quantization_config({"quant_method": method, "bits": 4})


def test_cli_refusal_is_one_line(llama_base_bf16, tmp_path):
    from click.testing import CliRunner

    from adapterfmt.cli import main
    from ..helpers import make_peft_adapter
    make_peft_adapter(llama_base_bf16, tmp_path / "peft", target_modules=["q_proj"])
    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(tmp_path / "peft"), str(tmp_path / "a.safetensors"),
                                  "--compute-dtype", "bf16"])
    assert result.exit_code != 0 and "add --trained-on" in result.output
    runner.invoke(main, ["convert", str(tmp_path / "peft"), str(tmp_path / "a.safetensors")])
    result = runner.invoke(main, ["merge", "--base", str(llama_base_bf16), "--adapter", str(tmp_path / "a.safetensors"),
                                  "--out", str(tmp_path / "m"), "--base-form", "trained"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "--trained-on" in result.output


def test_prequantized_bnb_base_merges_like_the_trained_form(qlora, tmp_path):
    """--base given as the 4-bit checkpoint save_pretrained writes: dequantized by bitsandbytes, tensor by tensor."""
    import json

    from transformers import AutoModelForCausalLM
    base, peft_model, adapter, compute = qlora
    form = adapterfmt.read_adapter(adapter).manifest.base.quantization
    quantized = qlora_model(base, compute, quant_type=form.scheme)
    quantized.save_pretrained(tmp_path / "q4")
    summary = adapterfmt.merge(tmp_path / "q4", [adapter], tmp_path / "from-q4", dtype="fp32")
    adapterfmt.merge(base, [adapter], tmp_path / "from-float", dtype="fp32", base_form="trained")
    got = load_file(tmp_path / "from-q4" / "model.safetensors")
    want = load_file(tmp_path / "from-float" / "model.safetensors")
    assert sorted(got) == sorted(want)  # the packed parts (absmax, quant_map, ...) are gone
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for name, weight in reference_weights(peft_model, compute).items():
        assert torch.equal(got[name], weight), name
    assert "quantization_config" not in json.loads((tmp_path / "from-q4" / "config.json").read_text())
    assert any("bitsandbytes-quantized" in note for note in summary.notes)
    peft_model.train()
    merged_logits = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "from-q4", dtype=torch.float32))
    want_logits = logits(peft_model)
    tolerance = 1e-5 if compute == torch.float32 else 1e-2
    assert (merged_logits - want_logits).abs().max() / want_logits.abs().max() < tolerance
    with pytest.raises(UsageError, match="does not hold the original weights"):
        adapterfmt.merge(tmp_path / "q4", [adapter], tmp_path / "x", base_form="original")
    # convert --base <the 4-bit checkpoint>: the form comes from its quantization_config
    adapterfmt.convert(adapter.parent / "peft", tmp_path / "b.safetensors", base=tmp_path / "q4")
    recorded = adapterfmt.read_adapter(tmp_path / "b.safetensors").manifest.base.quantization
    assert (recorded.scheme, recorded.compute_dtype, recorded.double_quant) == \
        (form.scheme, form.compute_dtype, form.double_quant)


def test_gptq_and_awq_bases_are_refused_by_name(llama_base_bf16, tmp_path):
    import json
    import shutil
    from ..helpers import make_peft_adapter
    make_peft_adapter(llama_base_bf16, tmp_path / "peft", target_modules=["q_proj"])
    adapterfmt.convert(tmp_path / "peft", tmp_path / "a.safetensors", base=llama_base_bf16)
    for method in ("gptq", "awq"):
        base = tmp_path / method
        shutil.copytree(llama_base_bf16, base)
        config = json.loads((base / "config.json").read_text())
        config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
        (base / "config.json").write_text(json.dumps(config))
        with pytest.raises(UsageError, match=f"quantized with '{method}'") as info:
            adapterfmt.merge(base, [tmp_path / "a.safetensors"], tmp_path / f"m-{method}")
        assert "unquantized base" in info.value.one_line()
        with pytest.raises(UsageError, match=f"quantized with '{method}'"):
            adapterfmt.convert(tmp_path / "peft", tmp_path / f"{method}.safetensors", base=base)


def test_choose_form_never_guesses():
    from adapterfmt.engine.base_form import bnb_form, choose_form
    nf4, fp4 = bnb_form("nf4", "bf16"), bnb_form("fp4")
    assert choose_form([nf4, nf4], None) == ("trained", nf4)
    assert choose_form([None, None], None) == ("original", None)
    assert choose_form([nf4], "original") == ("original", nf4)  # still measured for the report
    assert choose_form([bnb_form("none")], None)[0] == "original"
    for forms in ([nf4, fp4], [nf4, None]):
        with pytest.raises(UsageError, match="different base forms"):
            choose_form(forms, None)
        assert choose_form(forms, "original")[0] == "original"


def test_spec_reader_reads_the_recorded_form(qlora):
    """The independent spec reader (tests/spec) accepts base.quantization; a bad scheme is refused."""
    import json

    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spec"))  # the spec reader is a plain module
    import independent_reader
    _, _, adapter, _ = qlora
    manifest = independent_reader.read(adapter).manifest
    assert manifest["base"]["quantization"]["scheme"] in ("nf4", "fp4")
    from adapterfmt.format.schema import validate_manifest_dict
    from adapterfmt.errors import ManifestError
    bad = json.loads(json.dumps(manifest))
    bad["base"]["quantization"]["scheme"] = "nf3"
    with pytest.raises(ManifestError):
        validate_manifest_dict(bad)


def test_dora_on_a_4bit_base_merges_into_the_trained_form(llama_base_bf16, tmp_path):
    """DoRA needs the base for its norms: in the trained form that is dequant(quant(W)), as PEFT's bnb DoRA uses."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = qlora_model(llama_base_bf16, torch.float32)
    torch.manual_seed(5)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                  use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.rand_like(param))
    peft_model.save_pretrained(tmp_path / "peft")
    adapterfmt.convert(tmp_path / "peft", tmp_path / "d.safetensors", base=llama_base_bf16, trained_on="nf4",
                       trained_options={"compute_dtype": "fp32", "double_quant": True})
    adapterfmt.merge(llama_base_bf16, [tmp_path / "d.safetensors"], tmp_path / "m", dtype="fp32")
    adapterfmt.merge(llama_base_bf16, [tmp_path / "d.safetensors"], tmp_path / "o", dtype="fp32", base_form="original")
    peft_model.train()
    want = logits(peft_model)
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32))
    naive = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32))
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < 1e-5
    assert (naive - want).abs().max() / scale > 1e-3


def test_compute_dtype_is_part_of_the_form(llama_base_bf16):
    """The trap: bitsandbytes dequantizes straight into the compute dtype, so bf16 and fp32 compute
    train against different weights (bf16: every block's absmax·code rounded once more)."""
    from safetensors.torch import load_file as load

    from adapterfmt.engine.base_form import bnb_form, trained_weight
    weight = load(llama_base_bf16 / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    fp32 = trained_weight(weight, bnb_form("nf4", "fp32"))
    bf16 = trained_weight(weight, bnb_form("nf4", "bf16"))
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, fp32.to(torch.bfloat16))  # one rounding from the fp32 dequantization
    assert not torch.equal(bf16.float(), fp32)
