"""PEFT LoHa / LoKr on Conv2d (flattened, and ``use_effective_conv2d`` Tucker cores) against real PEFT 0.21.

Tiny bottleneck ResNets from configs (1×1, 3×3 and 7×7 convs). Non-zero trained-looking weights
(``init_weights=False``). Our merge equals ``merge_and_unload`` within 1 ulp; PEFT → adapterfmt → PEFT loads in
PEFT with outputs within 1e-5 of the original adapter's.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import adapterfmt
from adapterfmt.engine.unmerge import ulp_distance

from .lycoris_conv_files import load_resnet, outputs, tiny_conv_resnet

#: case -> (wide model?, PEFT config class name, config kwargs)
CASES = {"loha": (False, "LoHaConfig", {"r": 2, "alpha": 3}),
         "loha-effective": (False, "LoHaConfig", {"r": 2, "alpha": 3, "use_effective_conv2d": True}),
         "lokr": (True, "LoKrConfig", {"r": 1, "alpha": 2, "decompose_both": True}),
         "lokr-effective": (True, "LoKrConfig", {"r": 1, "alpha": 2, "use_effective_conv2d": True})}


def make_peft(base, out, case):
    import peft
    wide, cls, kwargs = CASES[case]
    config = getattr(peft, cls)(target_modules=["convolution"], init_weights=False, **kwargs)
    torch.manual_seed(1)
    model = peft.get_peft_model(load_resnet(base), config)
    with torch.no_grad():  # LoKr's init leaves one side at zero even with init_weights=False on some layouts
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


def peft_model(base, adapter_dir):
    from peft import PeftModel
    return PeftModel.from_pretrained(load_resnet(base), adapter_dir).eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    work = tmp_path_factory.mktemp("peft-conv-bases")
    return {False: tiny_conv_resnet(work / "narrow", False), True: tiny_conv_resnet(work / "wide", True)}


@pytest.fixture(scope="module", params=sorted(CASES))
def imported(request, bases, tmp_path_factory):
    case = request.param
    base = bases[CASES[case][0]]
    work = tmp_path_factory.mktemp(case)
    peft_dir = make_peft(base, work / "peft", case)
    ours = work / "a.safetensors"
    report = adapterfmt.convert(peft_dir, ours, base=base)
    assert report.worst == "lossless", report.lines()
    return case, base, peft_dir, ours, work


def test_conv_modules_keep_peft_forms(imported):
    case, _, peft_dir, ours, _ = imported
    adapter = adapterfmt.read_adapter(ours)
    entries = adapter.manifest.modules
    assert {e.layer for e in entries.values()} == {"conv2d"}
    core = "t1" if case.startswith("loha") else "t2"
    kxk_cores = {core in e.tensors for e in entries.values() if e.shape[2:] != [1, 1] and "w2" not in e.tensors}
    assert kxk_cores == {case.endswith("effective")}
    assert not any(core in e.tensors for e in entries.values() if e.shape[2:] == [1, 1])
    state = load_file(peft_dir / "adapter_model.safetensors")
    assert sum(len(e.tensors) for e in entries.values()) == len(state)
    assert sum(t.numel() for t in adapter.tensors.values()) == sum(t.numel() for t in state.values())
    result = adapterfmt.validate(ours, base=imported[1])
    assert result.valid and result.base_checked, result.problems


def test_merge_equals_peft_merge_and_unload(imported):
    _, base, peft_dir, ours, work = imported
    adapterfmt.merge(base, [(ours, 1.0)], work / "merged", overwrite=True)
    mine = load_resnet(work / "merged").state_dict()
    original = load_resnet(base).state_dict()
    reference = peft_model(base, peft_dir).merge_and_unload().state_dict()
    worst, changed = 0, 0
    for key, ref in reference.items():
        if not ref.is_floating_point():
            continue
        worst = max(worst, int(ulp_distance(mine[key], ref).max()))
        changed += not torch.equal(ref, original[key])
    assert changed >= 9 and worst <= 1


def test_peft_round_trip_loads_with_the_same_outputs(imported):
    case, base, peft_dir, ours, work = imported
    back = work / "back-peft"
    report = adapterfmt.convert(ours, back, to="peft", overwrite=True)
    assert report.worst == "lossless"
    config = json.loads((back / "adapter_config.json").read_text())
    assert config["use_effective_conv2d"] == case.endswith("effective")
    want = outputs(peft_model(base, peft_dir))
    got = outputs(peft_model(base, back))
    assert (want - outputs(load_resnet(base))).abs().max() > 1e-3
    assert (got - want).abs().max() <= 1e-5
    original, again = load_file(peft_dir / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert set(original) == set(again) and all(torch.equal(original[k], again[k]) for k in original)


def test_converts_to_conv_lora_exactly(imported):
    _, base, _, ours, work = imported
    report = adapterfmt.convert(ours, work / "lora-peft", to="peft", method="lora", overwrite=True)
    assert {m.status for m in report.modules} == {"exact"}
    assert max(m.max_abs_error for m in report.modules) < 1e-5


def test_truncated_conv_lora_reports_the_measured_error(imported):
    case, base, _, ours, work = imported
    out = work / "lora-r1.safetensors"
    report = adapterfmt.convert(ours, out, method="lora", resize={"rank": 1}, overwrite=True)
    statuses = {m.status for m in report.modules}
    assert statuses <= {"lossy", "exact"}
    # LoHa (r = 2: rank up to 4) and LoKr with a full W1 lose; LoKr with both halves factored at r = 1 is rank 1.
    assert ("lossy" in statuses) == (case != "lokr")
    adapter, source = adapterfmt.read_adapter(out), adapterfmt.read_adapter(ours)
    from adapterfmt.methods import get_method
    for row in report.modules:
        entry = adapter.manifest.modules[row.module]
        assert entry.method == "lora" and entry.params["rank"] == 1 and entry.layer == "conv2d"
        old = source.manifest.modules[row.module]
        want = get_method(old.method).delta(old, source.module_tensors(row.module)).double()
        got = get_method("lora").delta(entry, adapter.module_tensors(row.module)).double()
        # The reported error is the one measured (fp32 ΔWs), up to fp32 rounding of the rewritten factors.
        assert abs(float((got - want).abs().max()) - row.max_abs_error) <= 1e-6 * float(want.abs().max()) + 1e-7



def test_conv1d_tucker_cores_are_refused_by_name(tmp_path):
    """PEFT stores a Conv1d's LoHa core as (r, r, k, 1): not a Conv2d, refused with the base's shape."""
    from peft import LoHaConfig, get_peft_model
    from safetensors.torch import save_file

    from adapterfmt.errors import AdapterFmtError

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 6, 3)

    model = Net()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    config = LoHaConfig(r=2, target_modules=["conv"], use_effective_conv2d=True, init_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterFmtError, match=r"Conv2d weight \[6, 4, 3, 1\], the base weight is \[6, 4, 3\]"):
        adapterfmt.convert(tmp_path / "peft", tmp_path / "a.safetensors", base=tmp_path / "base")
    assert not (tmp_path / "a.safetensors").exists()


def test_flattened_conv_read_without_base_is_refused_at_merge_by_name(bases, tmp_path):
    """PEFT stores flattened conv factors in 2-D, so without --base the module is read as a Linear of the
    flattened shape (exact as a matrix: PEFT reloads it). Merging it into the conv base says so and how to
    fix it, instead of blaming a different model."""
    from adapterfmt.errors import BaseMismatchError
    base = bases[False]
    peft_dir = make_peft(base, tmp_path / "peft", "loha")
    adapterfmt.convert(peft_dir, tmp_path / "nobase.safetensors")
    with pytest.raises(BaseMismatchError, match=r"is a convolution \[8, 3, 7, 7\]; the adapter holds it as a Linear "
                                                r"\[8, 147\]") as caught:
        adapterfmt.merge(base, [tmp_path / "nobase.safetensors"], tmp_path / "merged")
    assert "--base" in caught.value.hint
    assert not (tmp_path / "merged").exists()
