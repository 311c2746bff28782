"""Official-layout SORSA checkpoints (built here) + the original base -> adapterfmt SORSA."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterfmt.ops.convert import convert
from adapterfmt.engine.merge import merge
from adapterfmt.errors import ForeignFormatError, UsageError
from adapterfmt.format import read_adapter
from adapterfmt.ops.validate import validate
from tests.helpers import load_model, logits, peft_logits, tiny_llama

TARGETS = ("q_proj", "v_proj", "up_proj")


def build_sorsa(base, out, snapshot, *, rank=4, alpha=None, residual_dtype=torch.float32, seed=5):
    """A whole-model SORSA state dict as the official trainer lays it out (``model.`` wrapper prefix).

    Init: thin SVD of Wᵀ in fp32, top r; residual W − s·(B0·S0)·A0 cast to ``residual_dtype``;
    then the factors are perturbed to stand in for training. Also writes the post-init snapshot.
    """
    state = load_file(str(base / "model.safetensors"))
    scale = 1.0 if alpha is None else alpha / rank
    init, trained = {}, {}
    gen = torch.Generator().manual_seed(seed)
    for name, w in state.items():
        key = f"model.{name}"
        if not any(f".{t}." in name for t in TARGETS) or not name.endswith(".weight"):
            init[key] = trained[key] = w
            continue
        u, s, vt = torch.linalg.svd(w.float().T, full_matrices=False)
        a0, s0, b0 = u[:, :rank].T.contiguous(), s[:rank].clone(), vt[:rank].T.contiguous()
        residual = (w.float() - ((b0 * s0) @ a0) * scale).to(residual_dtype)
        prefix = key[: -len(".weight")]
        init.update({key: residual, f"{prefix}.sorsa_A": a0, f"{prefix}.sorsa_S": s0, f"{prefix}.sorsa_B": b0})
        trained.update({key: residual,
                        f"{prefix}.sorsa_A": a0 + 0.02 * torch.randn(a0.shape, generator=gen),
                        f"{prefix}.sorsa_S": s0 * (1 + 0.05 * torch.randn(s0.shape, generator=gen)),
                        f"{prefix}.sorsa_B": b0 + 0.02 * torch.randn(b0.shape, generator=gen)})
    config = {"model_type": "sorsa", "base_model_name_or_path": str(base), "rank": rank, "alpha": alpha,
              "dropout": 0.0, "target_modules": list(TARGETS)}
    for where, sd in ((out, trained), (snapshot, init)):
        where.mkdir(parents=True)
        save_file(sd, str(where / "model.safetensors"), metadata={"format": "pt"})
        (where / "config.json").write_text(json.dumps(config))
    return trained, scale


def official_merged(trained, base_state, scale):
    """The official merge (residual += s·(B·S)·A), mapped back to base names."""
    merged = dict(base_state)
    for key, value in trained.items():
        if key.endswith(".sorsa_A"):
            prefix = key[: -len(".sorsa_A")]
            res = trained[f"{prefix}.weight"]
            prod = (trained[f"{prefix}.sorsa_B"] * trained[f"{prefix}.sorsa_S"]) @ value
            merged[f"{prefix[len('model.'):]}.weight"] = res.float() + prod * scale
    return merged


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base") / "llama")


@pytest.mark.parametrize("alpha,rdtype", [(None, torch.float32), (8.0, torch.bfloat16)])
def test_sorsa_import_merge_export(base, tmp_path, alpha, rdtype):
    trained, scale = build_sorsa(base, tmp_path / "ckpt", tmp_path / "snap", alpha=alpha, residual_dtype=rdtype)
    report = convert(tmp_path / "ckpt", tmp_path / "s.safetensors", base=base)
    adapter = read_adapter(tmp_path / "s.safetensors")
    assert adapter.manifest.methods() == ["sorsa"] and len(adapter.manifest.modules) == 6
    entry = adapter.manifest.modules["model.layers.1.mlp.up_proj"]
    assert entry.params["scale"] == scale and entry.params["alpha"] == alpha
    errs = [e.params["max_abs_residual_error"] for e in adapter.manifest.modules.values()]
    if rdtype == torch.float32:
        assert max(errs) < 1e-6
    else:
        assert 0 < max(errs) < 4e-3  # ½ bf16 ulp of weights below 1
    assert all(m.status == "exact" for m in report.modules)
    result = validate(tmp_path / "s.safetensors", base)
    assert result.valid, result.problems
    assert result.measurements["model.layers.0.self_attn.q_proj"]["U_p0_orthonormality_error"] < 1e-5
    # Merge against the ORIGINAL base = residual + s·B·diag(S)·A up to the residual's rounding E.
    merge(base, [(tmp_path / "s.safetensors", 1.0)], tmp_path / "merged")
    ours = load_model(tmp_path / "merged").state_dict()
    base_state = load_model(base).state_dict()
    reference = official_merged(trained, base_state, scale)
    worst = max(float((ours[k].float() - reference[k]).abs().max()) for k in reference)
    assert worst <= max(errs) + 2e-6, (worst, max(errs))
    # Export as plain PEFT LoRA (rank 2r): same logits as our merged model.
    rep = convert(tmp_path / "s.safetensors", tmp_path / "peft", to="peft")
    assert rep.worst == "exact" and max(m.max_abs_error for m in rep.modules) < 1e-5
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == scale * 8
    merged_logits = logits(load_model(tmp_path / "merged"))
    assert float((peft_logits(base, tmp_path / "peft") - merged_logits).abs().max()) < 1e-5
    # The snapshot route gives the same init.
    convert(tmp_path / "ckpt", tmp_path / "snap.safetensors", base=base,
            format_options={"init_snapshot": tmp_path / "snap"})
    snap = read_adapter(tmp_path / "snap.safetensors")
    for target in snap.manifest.modules:
        d1 = adapter.manifest.modules[target]
        from adapterfmt.methods import get_method
        a = get_method("sorsa").delta(d1, adapter.module_tensors(target))
        b = get_method("sorsa").delta(snap.manifest.modules[target], snap.module_tensors(target))
        assert float((a - b).abs().max()) < 1e-5


def test_sorsa_needs_original_base(base, tmp_path):
    build_sorsa(base, tmp_path / "ckpt", tmp_path / "snap", residual_dtype=torch.bfloat16)
    with pytest.raises(UsageError, match="residual"):
        convert(tmp_path / "ckpt", tmp_path / "x.safetensors")
    other = tiny_llama(tmp_path / "other", seed=9)
    with pytest.raises(ForeignFormatError, match="beyond its rounding"):
        convert(tmp_path / "ckpt", tmp_path / "x.safetensors", base=other)
