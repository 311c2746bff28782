"""Our GGUF LoRA exports in real llama.cpp, against transformers + PEFT on the same token ids.

Run by scripts/test-consumers.sh (which builds llama.cpp); skipped when llama_cpp or the llama.cpp tree is absent.
Each case also measures llama.cpp's own convert_lora_to_gguf.py on the same adapter, as the baseline.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from .llamacpp_env import (LlamaCppFailed, convert_base, convert_lora_llama_cpp, import_llama_cpp, llama_cpp_dir,
                           llama_cpp_logits, peft_logits, record)

llama_cpp_dir()
import_llama_cpp()

import adapterfmt  # noqa: E402
from adapterfmt.errors import UsageError  # noqa: E402

from .architectures import ARCHS, build  # noqa: E402

pytestmark = pytest.mark.llamacpp

#: Logit tolerance on top of the base model's own transformers-vs-llama.cpp difference (fp32 both sides).
TOL = 2e-4

#: LoRA settings per architecture: rank/alpha patterns and rsLoRA spread over the matrix.
LORA = {
    "llama": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}),
    "mistral": dict(r=4, lora_alpha=6, use_rslora=True),
    "qwen2": dict(r=4, lora_alpha=16, rank_pattern={"k_proj": 3}, alpha_pattern={"o_proj": 5}),
    "qwen3": dict(r=3, lora_alpha=4, use_rslora=True, rank_pattern={"up_proj": 2}),
    "mixtral": dict(r=4, lora_alpha=8, alpha_pattern={"k_proj": 2}),
    "qwen2_moe": dict(r=4, lora_alpha=8, use_rslora=True),
    "qwen3_moe": dict(r=2, lora_alpha=8, rank_pattern={"v_proj": 4}),
    "gemma2": dict(r=4, lora_alpha=8, alpha_pattern={"gate_proj": 2}),
    "gemma3": dict(r=4, lora_alpha=4, use_rslora=True),
    "phi3": dict(r=4, lora_alpha=8, rank_pattern={"qkv_proj": 2}),
    "gpt_neox": dict(r=4, lora_alpha=8, alpha_pattern={"query_key_value": 16}),
    "falcon": dict(r=4, lora_alpha=8, rank_pattern={"query_key_value": 3}),
    "stablelm": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"q_proj": 2}),
    "granite": dict(r=4, lora_alpha=8, alpha_pattern={"down_proj": 2}),
    "granitemoe": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"k_proj": 2}),
    "gemma": dict(r=2, lora_alpha=8, alpha_pattern={"up_proj": 4}),
}
_BASES: dict[tuple, tuple[Path, Path, float]] = {}


def base_model(name: str, root: Path, **overrides) -> tuple[Path, Path, float]:
    """(transformers dir, GGUF base, max |Δlogits| of the bases alone), built once per session."""
    key = (name, tuple(sorted(overrides.items())))
    if key not in _BASES:
        folder = root / f"{name}{'-' + '-'.join(map(str, overrides)) if overrides else ''}"
        folder.mkdir(parents=True, exist_ok=True)
        hf = build(name, folder / "hf", **overrides)
        gguf_base = convert_base(hf, folder / "base.gguf")
        floor = float(np.abs(llama_cpp_logits(gguf_base, None) - peft_logits(hf, None)).max())
        _BASES[key] = (hf, gguf_base, floor)
    return _BASES[key]


def peft_adapter(base: Path, out: Path, seed: int = 1, dtype: torch.dtype | None = None, **kwargs) -> Path:
    """A PEFT LoRA with random non-zero A and B (init_lora_weights=False), saved like a trained one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs))
    if dtype is not None:
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
    peft_model.save_pretrained(out)
    return out


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def llama_cpp_converter(peft_dir: Path, hf: Path, base_gguf: Path, out: Path) -> tuple[np.ndarray | None, str]:
    """llama.cpp's own converter on the same adapter, run in llama.cpp: (logits, "") or (None, how it failed)."""
    try:
        return llama_cpp_logits(base_gguf, convert_lora_llama_cpp(peft_dir, hf, out)), ""
    except (AssertionError, LlamaCppFailed) as exc:
        return None, "fails: " + str(exc).strip().splitlines()[-1][:160]


def llama_cpp_converter_error(peft_dir: Path, hf: Path, base_gguf: Path, want: np.ndarray, out: Path) -> str:
    """llama.cpp's own converter on the same adapter: its max |Δlogits|, or how it failed."""
    theirs, failure = llama_cpp_converter(peft_dir, hf, base_gguf, out)
    return failure or f"{max_diff(theirs, want):.3g}"


def imported_as_peft(gguf_file: Path, hf: Path, out: Path) -> np.ndarray:
    """Our GGUF reader, written out as PEFT: transformers+PEFT logits of what we read."""
    adapterfmt.convert(gguf_file, out, to="peft", base=hf)
    return peft_logits(hf, out)


@pytest.mark.parametrize("name", list(ARCHS))
def test_lora_logits_match_peft(name, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "llamacpp"
    hf, base_gguf, floor = base_model(name, root)
    work = tmp_path_factory.mktemp(name)
    peft_dir = peft_adapter(hf, work / "peft", target_modules=ARCHS[name][3], **LORA[name])
    ours = work / "ours.gguf"
    report = adapterfmt.convert(peft_dir, ours, to="gguf", base=hf)
    want = peft_logits(hf, peft_dir)
    err = max_diff(llama_cpp_logits(base_gguf, ours), want)
    effect = max_diff(want, peft_logits(hf, None))  # how much the adapter moves the logits
    theirs, failure = llama_cpp_converter(peft_dir, hf, base_gguf, work / "theirs.gguf")
    # Import: what we read from a GGUF (ours, and llama.cpp's converter output) must compute in PEFT what
    # llama.cpp computes with that file.
    read_ours = max_diff(imported_as_peft(ours, hf, work / "ours-peft"), want)
    read_theirs = None if theirs is None else max_diff(imported_as_peft(work / "theirs.gguf", hf, work / "theirs-peft"),
                                                       theirs)
    record({"case": name, "ours": err, "llama.cpp converter": failure or max_diff(theirs, want), "base floor": floor,
            "lora effect": effect, "report": report.worst, "import ours": read_ours, "import theirs": read_theirs})
    assert effect > 0.05, "the adapter must change the logits for the comparison to mean anything"
    assert err <= floor + TOL, f"{name}: llama.cpp with our GGUF is off by {err} (base alone: {floor})"
    assert read_ours <= 1e-5, f"{name}: reading our GGUF back changes the logits by {read_ours}"
    if read_theirs is not None:
        assert read_theirs <= floor + TOL, f"{name}: our reading of llama.cpp's file is off by {read_theirs}"


def test_untied_embedding_and_lm_head_lora(tmp_path_factory):
    hf, base_gguf, floor = base_model("llama", tmp_path_factory.getbasetemp() / "llamacpp")
    work = tmp_path_factory.mktemp("embed")
    peft_dir = peft_adapter(hf, work / "peft", r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head",
                                                                                   "q_proj"])
    adapterfmt.convert(peft_dir, work / "ours.gguf", to="gguf", base=hf)
    want = peft_logits(hf, peft_dir)
    err = max_diff(llama_cpp_logits(base_gguf, work / "ours.gguf"), want)
    baseline = llama_cpp_converter_error(peft_dir, hf, base_gguf, want, work / "theirs.gguf")
    record({"case": "llama embed_tokens+lm_head", "ours": err, "llama.cpp converter": baseline, "base floor": floor})
    assert err <= floor + TOL


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_tied_embedding_lora_is_refused(module, tmp_path_factory):
    """PEFT runs these; llama.cpp has one token_embd tensor for both ends, so we refuse by name."""
    hf, base_gguf, floor = base_model("qwen2", tmp_path_factory.getbasetemp() / "llamacpp", tie_word_embeddings=True)
    work = tmp_path_factory.mktemp(f"tied-{module}")
    peft_dir = peft_adapter(hf, work / "peft", r=4, lora_alpha=8, target_modules=[module, "q_proj"])
    want = peft_logits(hf, peft_dir)  # PEFT loads and runs it
    baseline = llama_cpp_converter_error(peft_dir, hf, base_gguf, want, work / "theirs.gguf")
    record({"case": f"qwen2 tied, {module} LoRA", "ours": "refused", "llama.cpp converter": baseline,
            "base floor": floor})
    with pytest.raises(UsageError, match="ties its input and output embeddings"):
        adapterfmt.convert(peft_dir, work / "ours.gguf", to="gguf", base=hf)


def test_f16_adapter_factor_dtype(tmp_path_factory):
    """An F16 PEFT adapter: F16 factors put llama.cpp's LoRA matmuls in half precision; --dtype f32 does not."""
    import gguf
    hf, base_gguf, floor = base_model("llama", tmp_path_factory.getbasetemp() / "llamacpp")
    work = tmp_path_factory.mktemp("f16")
    peft_dir = peft_adapter(hf, work / "peft", dtype=torch.float16, r=4, lora_alpha=8,
                            target_modules=["q_proj", "v_proj", "down_proj"])
    want = peft_logits(hf, peft_dir)
    errors = {}
    for dtype, ggml_type in (("keep", "F16"), ("f32", "F32")):
        out = work / f"ours-{dtype}.gguf"
        adapterfmt.convert(peft_dir, out, to="gguf", base=hf, format_options={"dtype": dtype})
        assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {ggml_type}
        errors[dtype] = max_diff(llama_cpp_logits(base_gguf, out), want)
        record({"case": f"llama F16 adapter, --dtype {dtype}", "ours": errors[dtype], "base floor": floor})
    assert errors["f32"] <= floor + TOL
    assert errors["f32"] < errors["keep"]


def test_merge_into_gguf_model_runs_in_llama_cpp(tmp_path_factory):
    """adapterfmt merge into a GGUF model (the quantized-base issue): the F32 output computes PEFT's logits in
    llama.cpp's runtime, and the output requantized to Q8_0 loads and runs there too."""
    hf, base_gguf, floor = base_model("llama", tmp_path_factory.getbasetemp() / "llamacpp")
    work = tmp_path_factory.mktemp("merge-gguf")
    peft_dir = peft_adapter(hf, work / "peft", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"])
    native = work / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=hf)
    want = peft_logits(hf, peft_dir)
    adapterfmt.merge(base_gguf, [native], work / "merged-f32.gguf", gguf_type="F32")
    f32 = llama_cpp_logits(work / "merged-f32.gguf", None)
    assert max_diff(f32, want) <= floor + TOL
    adapterfmt.merge(base_gguf, [native], work / "merged-q8.gguf", gguf_type="Q8_0", force=True)
    q8 = llama_cpp_logits(work / "merged-q8.gguf", None)
    record({"case": "llama merged into GGUF model (F32 / Q8_0 output)", "ours": max_diff(f32, want),
            "llama.cpp converter": "-", "base floor": floor, "Q8_0 vs F32 merge": max_diff(q8, f32)})
    assert np.isfinite(q8).all() and max_diff(q8, f32) < 0.05 * float(np.abs(f32).max())
