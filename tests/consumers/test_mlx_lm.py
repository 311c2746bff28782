"""Real mlx-lm loads every MLX export and computes what transformers+PEFT computes (fp32 logits).

Per architecture: a tiny random model, a real PEFT LoRA (rank and alpha patterns, rsLoRA, embeddings and
heads where mlx-lm can hold them), ``adapterfmt.convert(..., to="mlx", base=...)``, then mlx-lm's own
loader. Two references: PEFT's logits, and mlx-lm's logits of PEFT's merged model (which isolates
mlx-lm's own implementation differences, e.g. exact GELU where transformers uses the tanh form).

``python -m tests.consumers.test_mlx_lm`` prints the per-architecture table.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import adapterfmt

from .mlx_models import (ARCHS, build_base, make_adapter, mlx_base, mlx_logits, mlx_trained_adapter,
                         peft_logits)

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")

DORA_ARCHS = ["llama", "gpt2", "phi3", "gpt_neox"]


def peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    """PEFT's own merge of the adapter into the base, saved as a transformers checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
        model.save_pretrained(out)
    return out


def measure(name: str, root: Path, *, dora: bool = False, targets: list[str] | None = None,
            dtype: torch.dtype | None = None, write_options: dict | None = None) -> dict:
    """Export one PEFT adapter to MLX and compare mlx-lm's logits with both references."""
    base = build_base(name, root / "base")
    peft = make_adapter(name, base, root / "peft", dora=dora, targets=targets, dtype=dtype)
    out = root / "mlx"
    report = adapterfmt.convert(peft, out, to="mlx", base=base, format_options=write_options)
    reference, plain = peft_logits(base, peft), peft_logits(base, None)
    got = mlx_logits(mlx_base(base, root / "mlx-base"), out)
    merged = mlx_logits(mlx_base(peft_merged(base, peft, root / "merged"), root / "mlx-merged"), None)
    return {"arch": name, "effect": float(np.abs(reference - plain).max()),
            "vs_peft": float(np.abs(got - reference).max()), "vs_merged": float(np.abs(got - merged).max()),
            "merged_vs_peft": float(np.abs(merged - reference).max()), "report": report, "out": out}


def check(result: dict, record_property) -> None:
    for key in ("effect", "vs_peft", "vs_merged", "merged_vs_peft"):
        record_property(key, result[key])
    assert result["effect"] > 0.05, result  # the adapter changes the logits visibly: the test can fail
    # fp32 noise is ~1e-6 (DoRA's norms: ~3e-5); an export error shows at 1e-3 and above (a bf16 fold: 9e-3).
    assert result["vs_merged"] < 1e-4, result
    # As close to PEFT as PEFT's own merged weights run in mlx-lm (its implementation error), plus fp32 noise.
    assert result["vs_peft"] <= result["merged_vs_peft"] + 5e-5, result


@pytest.mark.parametrize("name", list(ARCHS))
def test_mlx_lm_logits_equal_peft(name, tmp_path, record_property):
    result = measure(name, tmp_path)
    check(result, record_property)
    statuses = {m.status for m in result["report"].modules}
    assert statuses <= {"lossless", "scale_folded", "exact"}, result["report"].lines()


@pytest.mark.parametrize("name", DORA_ARCHS)
def test_mlx_lm_dora_logits_equal_peft(name, tmp_path, record_property):
    block_targets = [t for t in ARCHS[name].targets if t not in ("embed_tokens", "wpe", "embed_in")]
    check(measure(name, tmp_path, dora=True, targets=block_targets), record_property)


def test_mlx_bf16_per_module_scale_fold_is_fp32_in_mlx_lm(tmp_path, record_property):
    """A bf16 adapter with per-module scales (and an embedding): folded B and the embedding's factors are
    stored in fp32, so mlx-lm computes PEFT's fp32 result; folding in bf16 (the old writer) is 100x off."""
    after = measure("llama", tmp_path / "keep", dtype=torch.bfloat16)
    check(after, record_property)
    weights = load_file(str(after["out"] / "adapters.safetensors"))
    assert weights["model.layers.0.self_attn.o_proj.lora_b"].dtype == torch.float32  # folded (alpha pattern)
    assert weights["model.layers.0.self_attn.o_proj.lora_a"].dtype == torch.bfloat16
    assert weights["model.embed_tokens.lora_a"].dtype == torch.float32  # mlx-lm multiplies these in their dtype
    before = measure("llama", tmp_path / "bf16", dtype=torch.bfloat16, write_options={"dtype": "bf16"})
    record_property("vs_peft_folded_in_bf16", before["vs_peft"])
    assert before["report"].worst == "lossy"
    assert after["vs_peft"] * 100 < before["vs_peft"], (after["vs_peft"], before["vs_peft"])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_mlx_embedding_lora_to_peft_is_embedding(name, tmp_path, record_property):
    """An adapter trained by mlx-lm on the embedding (and blocks) becomes a PEFT embedding LoRA that PEFT
    runs with mlx-lm's logits (the old reader made it a Linear layer, which PEFT dropped: logits off by 4)."""
    from safetensors import safe_open
    base = build_base(name, tmp_path / "base")
    embedding, block = ("model.embed_tokens", "self_attn.q_proj") if name == "llama" else ("model.wpe", "attn.c_attn")
    native = mlx_trained_adapter(mlx_base(base, tmp_path / "mlx-base"), tmp_path / "native", [embedding, block],
                                 num_layers=2)
    report = adapterfmt.convert(native, tmp_path / "peft", to="peft", base=base)
    assert report.worst == "lossless", report.lines()
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    hf_embedding = {"llama": "model.embed_tokens", "gpt2": "transformer.wpe"}[name]
    assert any(k.endswith(f"{hf_embedding}.lora_embedding_A") for k in keys), keys
    got = peft_logits(base, tmp_path / "peft")
    expected = mlx_logits(mlx_base(base, tmp_path / "mlx-base"), native)
    effect = float(np.abs(expected - mlx_logits(mlx_base(base, tmp_path / "mlx-base"), None)).max())
    record_property("effect", effect)
    record_property("vs_mlx_lm", float(np.abs(got - expected).max()))
    assert effect > 0.05 and np.abs(got - expected).max() < 2e-5


def main() -> None:  # pragma: no cover - prints the table for the docs/closing notes
    import tempfile
    rows = [("patterns+rsLoRA", name, {}) for name in ARCHS] + [("DoRA", name, {"dora": True}) for name in DORA_ARCHS]
    import mlx.core as mx
    import mlx_lm
    import peft
    import transformers
    print("# MLX exports in real mlx-lm: max |Δ logits| against transformers+PEFT (fp32)\n")
    print(f"Generated by `python -m tests.consumers.test_mlx_lm > tests/consumers/MLX_LOGITS.md` with mlx "
          f"{mx.__version__}, mlx-lm {mlx_lm.__version__}, transformers {transformers.__version__}, peft "
          f"{peft.__version__}. Tiny random fp32 models (3 layers, hidden 64); PEFT LoRA r=4, alpha=8, rsLoRA, "
          "one rank and one alpha pattern, embeddings and lm_head where mlx-lm can hold them. Effect: how much "
          "the adapter moves the logits. The last column is mlx-lm's own implementation difference (PEFT's "
          "merged model run in mlx-lm, e.g. exact GELU in gemma/starcoder2 where transformers uses tanh).\n")
    print("| arch | adapter | max abs logit effect | max abs Δ vs PEFT | vs PEFT-merged in mlx-lm | merged vs PEFT |")
    print("|---|---|---|---|---|---|")
    for label, name, kwargs in rows:
        if kwargs.get("dora"):
            kwargs["targets"] = [t for t in ARCHS[name].targets if t not in ("embed_tokens", "wpe", "embed_in")]
        r = measure(name, Path(tempfile.mkdtemp()), **kwargs)
        print(f"| {name} | {label} | {r['effect']:.3g} | {r['vs_peft']:.2g} | {r['vs_merged']:.2g} | "
              f"{r['merged_vs_peft']:.2g} |", flush=True)
    print("\nA bf16 adapter with per-module scales: the old writer folded into bf16 (now `--dtype bf16`, lossy); "
          "`keep` folds in fp64 and stores fp32.\n")
    print("| arch | adapter | max abs logit effect | max abs Δ vs PEFT | vs PEFT-merged in mlx-lm | merged vs PEFT |")
    print("|---|---|---|---|---|---|")
    for dtype in ("bf16", "keep"):  # a bf16 adapter: folded in bf16 (the old writer) / fp32 (now)
        r = measure("llama", Path(tempfile.mkdtemp()), dtype=torch.bfloat16, write_options={"dtype": dtype})
        worst = max((m.rel_error or 0.0) for m in r["report"].modules)
        print(f"| llama | bf16 adapter, --dtype {dtype} ({r['report'].worst}, worst module ΔW rel error "
              f"{worst:.2g}) | {r['effect']:.3g} | {r['vs_peft']:.2g} | {r['vs_merged']:.2g} | "
              f"{r['merged_vs_peft']:.2g} |", flush=True)


if __name__ == "__main__":
    main()
