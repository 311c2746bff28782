"""LyCORIS conv files (LoCon, LoHa, LoKr; flattened and Tucker) made by LyCORIS itself, both ways.

Reference consumer: LyCORIS 4.1.3 (its network's forward pass, ``create_lycoris_from_weights``).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import adapterfmt
from adapterfmt.errors import AdapterFmtError

from .lycoris_conv_files import CASES, load_resnet, outputs, shared_case

pytest.importorskip("lycoris")
IDS = [f"{a}{'-tucker' if t else ''}" for a, t in CASES]


@pytest.fixture(scope="module", params=list(CASES), ids=IDS)
def lycoris_file(request, tmp_path_factory):
    algo, tucker = request.param
    base, path, want = shared_case(tmp_path_factory, algo, tucker)
    work = tmp_path_factory.mktemp(f"{algo}{tucker}")
    native = work / "a.safetensors"
    report = adapterfmt.convert(path, native, base=base)
    return algo, tucker, base, path, want, native, report, work


def test_every_tensor_is_accounted_for(lycoris_file):
    algo, tucker, _, path, _, native, report, _ = lycoris_file
    state = load_file(path)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    adapter = adapterfmt.read_adapter(native)
    assert report.worst == "lossless" and len(report.modules) == len(names) == len(adapter.manifest.modules)
    stored = sum(len(e.tensors) for e in adapter.manifest.modules.values())
    assert stored + len(names) == len(state)  # every factor, plus one alpha per module
    assert sum(t.numel() for t in adapter.tensors.values()) + len(names) == sum(t.numel() for t in state.values())
    assert {e.layer for e in adapter.manifest.modules.values()} == {"conv2d"}
    cores = {"lora": "lora_mid", "loha": "t1", "lokr": "t2"}[algo]
    has_core = any(cores in e.tensors for e in adapter.manifest.modules.values())
    assert has_core == tucker
    if tucker:  # LyCORIS keeps 1x1 convolutions flattened even with use_tucker
        assert any(cores not in e.tensors and e.shape[2:] == [1, 1] for e in adapter.manifest.modules.values())


def test_written_back_bit_exactly(lycoris_file):
    _, _, _, path, _, native, _, work = lycoris_file
    back = work / "back.safetensors"
    report = adapterfmt.convert(native, back, to="lycoris", overwrite=True)
    assert report.worst == "lossless"
    original, again = load_file(path), load_file(back)
    assert set(original) == set(again)
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and again[key].shape == tensor.shape, key
        assert torch.equal(again[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key


def test_merge_equals_lycoris_forward(lycoris_file):
    _, _, base, _, want, native, _, work = lycoris_file
    before = outputs(load_resnet(base))
    assert (want - before).abs().max() > 1e-3  # the adapter changes the outputs
    adapterfmt.merge(base, [(native, 1.0)], work / "merged", overwrite=True)
    got = outputs(load_resnet(work / "merged"))
    assert (got - want).abs().max() <= 1e-5


def test_written_file_loads_in_lycoris(lycoris_file):
    from lycoris import create_lycoris_from_weights
    algo, tucker, base, _, want, native, _, work = lycoris_file
    if algo == "lokr" and tucker:
        # Measured: create_lycoris_from_weights fails on the file LyCORIS itself saved (AttributeError 'no attribute
        # lokr_w1_a' with decompose_both, a shape mismatch without): make_module_from_state_dict takes the rank
        # from lokr_w2_a.shape[1], which is the Kronecker factor b for a Tucker w2_a (r, b).
        pytest.skip("LyCORIS 4.1.3 cannot reload its own Tucker LoKr files")
    out = work / "from-adapterfmt.safetensors"
    adapterfmt.convert(native, out, to="lycoris", overwrite=True)
    model = load_resnet(base)
    network, _ = create_lycoris_from_weights(1.0, str(out), model)
    network.apply_to()
    assert (outputs(model) - want).abs().max() <= 1e-5


def test_dora_scale_is_refused_by_name(lycoris_file, tmp_path):
    from safetensors.torch import save_file
    _, _, base, path, *_ = lycoris_file
    state = load_file(path)
    name = next(iter(state)).rsplit(".", 1)[0].removesuffix(".lora_up").removesuffix(".lora_down")
    state[f"{name}.dora_scale"] = torch.ones(3)
    save_file(state, str(tmp_path / "dora.safetensors"))
    with pytest.raises(AdapterFmtError, match="dora_scale"):
        adapterfmt.convert(tmp_path / "dora.safetensors", tmp_path / "x.safetensors", base=base)
