"""OLoRA/PiSSA/SORSA method objects: ΔW against the original base, conversion, merge weights."""
from __future__ import annotations

import pytest
import torch

from adapterfmt.ops.convert import convert_methods
from adapterfmt.engine.merge import merge
from adapterfmt.errors import AdapterFmtError
from adapterfmt import read_adapter, write_adapter
from adapterfmt.format import Adapter, BaseWeight, Manifest, ModuleEntry
from adapterfmt.methods import get_method
from adapterfmt.methods.descriptor import tensor_refs
from adapterfmt.methods.init_relative import init_relative_params
from adapterfmt.methods.sorsa import sorsa_params
from adapterfmt.conversion_report import ConversionReport
from tests.helpers import load_model, tiny_llama

TARGET = "model.layers.0.self_attn.q_proj"


def make(method, out_f=64, in_f=64, r=3, rslora=False):
    torch.manual_seed(0)
    if method == "sorsa":
        t = {"U_p": torch.randn(out_f, r), "S_p": torch.rand(r) + 1, "Vt_p": torch.randn(r, in_f),
             "U_p0": torch.randn(out_f, r), "S_p0": torch.tensor([3.0, 2.0, 1.0]), "Vt_p0": torch.randn(r, in_f)}
        params = sorsa_params(r, 6.0)
    else:
        t = {"lora_A": torch.randn(r, in_f), "lora_B": torch.randn(out_f, r),
             "lora_A0": torch.randn(r, in_f), "lora_B0": torch.randn(out_f, r)}
        params = init_relative_params(r, 6.0, rslora, method)
    entry = ModuleEntry(method=method, base_weight=f"{TARGET}.weight", shape=[out_f, in_f], params=params,
                        tensors=tensor_refs(TARGET, t))
    manifest = Manifest(modules={TARGET: entry})
    manifest.base.weights[entry.base_weight] = BaseWeight(shape=[out_f, in_f])
    return Adapter(manifest=manifest, tensors={ref.name: t[role] for role, ref in entry.tensors.items()})


def reference(method, adapter):
    t = {k: v.double() for k, v in adapter.module_tensors(TARGET).items()}
    s = adapter.manifest.modules[TARGET].params["scale"]
    if method == "sorsa":
        return s * ((t["U_p"] * t["S_p"]) @ t["Vt_p"] - (t["U_p0"] * t["S_p0"]) @ t["Vt_p0"])
    return s * (t["lora_B"] @ t["lora_A"] - t["lora_B0"] @ t["lora_A0"])


@pytest.mark.parametrize("method,rslora", [("olora", False), ("pissa", True), ("sorsa", False)])
def test_delta_conversion_and_weighted_merge(tmp_path, method, rslora):
    adapter = make(method, rslora=rslora)
    write_adapter(adapter, tmp_path / "a.safetensors")
    adapter = read_adapter(tmp_path / "a.safetensors")
    entry = adapter.manifest.modules[TARGET]
    ref = reference(method, adapter)
    delta = get_method(method).delta(entry, adapter.module_tensors(TARGET))
    assert float((delta.double() - ref).abs().max()) < 1e-4
    assert get_method(method).parameter_count(entry) < sum(t.numel() for t in adapter.tensors.values())
    report = ConversionReport()
    lora = convert_methods(adapter, "lora", {}, report)
    e2 = lora.manifest.modules[TARGET]
    assert e2.params["rank"] == 6 and e2.params["scale"] == pytest.approx(entry.params["scale"], rel=1e-12)
    assert report.modules[0].status == "exact" and report.modules[0].max_abs_error < 1e-4
    # Merging with a weight goes through delta(); relative to the original base.
    base = tiny_llama(tmp_path / "base")
    merge(base, [(tmp_path / "a.safetensors", 0.5)], tmp_path / "m", force=True)
    w = load_model(base).state_dict()[f"{TARGET}.weight"].double()
    got = load_model(tmp_path / "m").state_dict()[f"{TARGET}.weight"].double()
    assert float((got - (w + 0.5 * ref)).abs().max()) < 1e-4


def test_bad_shapes_refused(tmp_path):
    adapter = make("olora")
    adapter.manifest.modules[TARGET].params["rank"] = 2
    with pytest.raises(AdapterFmtError):
        write_adapter(adapter, tmp_path / "bad.safetensors")
        read_adapter(tmp_path / "bad.safetensors")
