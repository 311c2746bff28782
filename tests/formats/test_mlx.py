"""MLX-LM adapters: mlx-lm's layout (keys, transposed shapes, config) and its ΔW; round trips."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterfmt.ops.convert import convert
from adapterfmt.errors import ForeignFormatError, UsageError
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
    with pytest.raises(UsageError, match="outside the transformer blocks|embedding"):
        convert(native["embed"], workdir / "embed-mlx", to="mlx")
    bad = workdir / "bad-mlx"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1,
                                                          "lora_parameters": {"rank": 2, "scale": 1.0}}))
    save_file({"model.layers.0.self_attn.q_proj.lora_a": torch.zeros(64, 2),
               "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, str(bad / "adapters.safetensors"))
    with pytest.raises(ForeignFormatError, match="not lora_a, lora_b or m"):
        convert(bad, workdir / "bad.safetensors")
