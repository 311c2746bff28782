"""LyCORIS LoHa/LoKr files both ways, with LyCORIS itself (lycoris-lora) as the reference consumer."""
from __future__ import annotations

import pytest
import torch

import adapterfmt
from adapterfmt.format import read_adapter
from tests.helpers import load_model, logits, peft_logits
from tests.tuner_helpers import make_tuner_adapter

lycoris = pytest.importorskip("lycoris")


def _lycoris_network(model, algo, dim, alpha, seed):
    from lycoris import create_lycoris
    network = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo, factor=-1)
    network.apply_to()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return network


@pytest.mark.parametrize("algo, dim, alpha", [("loha", 4, 2.0), ("lokr", 2, 3.0), ("lokr", 10000, 3.0)])
def test_lycoris_file_imports_and_merges_like_lycoris(algo, dim, alpha, llama_base, tmp_path):
    model = load_model(llama_base)
    before = logits(model)
    network = _lycoris_network(model, algo, dim, alpha, seed=4)
    network.save_weights(str(tmp_path / "lyco.safetensors"), torch.float32, None)
    want = logits(model)  # LyCORIS's own forward pass
    assert (want - before).abs().max() > 1e-3
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(tmp_path / "lyco.safetensors", native, base=llama_base)
    methods = {e.method for e in read_adapter(native).manifest.modules.values()}
    assert methods == {algo}
    adapterfmt.merge(llama_base, [(native, 1.0)], tmp_path / "merged")
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_adapter_written_as_lycoris_loads_in_lycoris(kind, llama_base, tmp_path):
    from lycoris import create_lycoris_from_weights
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", kind)
    out = tmp_path / "lyco.safetensors"
    report = adapterfmt.convert(peft_dir, out, to="lycoris")
    model = load_model(llama_base)
    network, _ = create_lycoris_from_weights(1.0, str(out), model)
    assert len(network.loras) == len(read_adapter_modules(peft_dir, llama_base, tmp_path))
    network.apply_to()
    torch.testing.assert_close(logits(model), peft_logits(llama_base, peft_dir), rtol=0, atol=1e-5)
    if kind == "lokr":  # PEFT's alpha/r on two full halves becomes LyCORIS's 1: folded into w2
        assert any(m.status == "scale_folded" for m in report.modules)


def read_adapter_modules(peft_dir, base, tmp_path):
    adapterfmt.convert(peft_dir, tmp_path / "n.safetensors", base=base)
    return read_adapter(tmp_path / "n.safetensors").manifest.modules
