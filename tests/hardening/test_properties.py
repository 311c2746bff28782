"""Property tests over random shapes, ranks, dtypes (F32/F16/BF16), layers and methods.

Properties:
1. adapterfmt write -> read is bit-exact (every tensor's bytes, the manifest JSON), for any
   finite bit pattern (subnormals, -0.0, extremes included).
2. adapterfmt -> PEFT -> adapterfmt is bit-exact for every module the PEFT writer reports
   ``lossless`` (tensors' bytes, method, shape, layer, params; when one PEFT config forces a
   module's rsLoRA flag to be rewritten, rank and the float scale are still bit-identical, so
   is ΔW); modules it reports ``exact`` keep the tensors bit-exact and the scale within 1 ulp.
3. ΔW of every method agrees with a float64 reference within the tolerance below.

Methods: those in :data:`BUILDERS` that are registered (``all_methods()``); a method with the
LoRA roles and params gets a random entry generically. Other methods need a builder row here.

Tolerance table (u = 2**-24, fp32 unit roundoff; inputs are exact in fp32 whatever the stored dtype):

| method | quantity | bound |
|---|---|---|
| lora | each ΔW_ij | ``(r + 2)·u·|s|·(|B|·|A|)_ij``  (r-term dot product, then one scale rounding) |
| dora | max |ΔW - ΔW64| | ``4·(in + r + 8)·u·(max|W'| + max|W|)``  (row norm of length ``in``, the division, and the cancellation in W' - W) |
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterfmt.format import Adapter, Manifest, ModuleEntry, TensorRef, read_adapter, write_adapter
from adapterfmt.format.dtypes import dtype_name
from adapterfmt.formats.base import ReadOptions
from adapterfmt.formats.peft.state import adapter_to_peft, peft_to_adapter
from adapterfmt.methods import METHOD_BY_NAME, get_method
from adapterfmt.methods.lora import lora_params
from adapterfmt.conversion_report import LOSSLESS, ConversionReport

U32 = 2.0 ** -24
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WORK = Path(tempfile.mkdtemp(prefix="adapterfmt-props-"))
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_bits(shape, dtype, gen) -> torch.Tensor:
    """Any finite value of ``dtype`` (random bit patterns; non-finite ones replaced by 0)."""
    if dtype == torch.float32:
        raw = torch.randint(-2 ** 31, 2 ** 31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)
    else:
        raw = torch.randint(-2 ** 15, 2 ** 15 - 1, shape, generator=gen, dtype=torch.int32).to(torch.int16)
    t = raw.view(dtype).clone()
    t[~torch.isfinite(t)] = 0
    return t


def random_values(shape, dtype, gen) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * 0.5).to(dtype)


def lora_tensors(out_f, in_f, rank, dtype, gen, fill):
    return {"lora_A": fill((rank, in_f), dtype, gen), "lora_B": fill((out_f, rank), dtype, gen)}


def dora_tensors(out_f, in_f, rank, dtype, gen, fill):
    tensors = lora_tensors(out_f, in_f, rank, dtype, gen, fill)
    tensors["magnitude"] = (torch.rand(out_f, generator=gen) + 0.5).to(dtype) if fill is random_values \
        else fill((out_f,), dtype, gen)
    return tensors


def dora_params(rank, alpha, use_rslora):
    return {**lora_params(rank, alpha, use_rslora), "magnitude_axis": "out"}


# method -> (params(rank, alpha, use_rslora), tensors(out, in, rank, dtype, gen, fill))
BUILDERS = {"lora": (lora_params, lora_tensors), "dora": (dora_params, dora_tensors)}
METHODS = sorted(m for m in BUILDERS if m in METHOD_BY_NAME)


@st.composite
def adapters(draw, methods=METHODS, fill=random_bits, max_modules=3):
    """A random valid Adapter: 1..max_modules modules of one method, one dtype, one layer kind."""
    method = draw(st.sampled_from(methods))
    dtype = draw(st.sampled_from(DTYPES))
    layer = draw(st.sampled_from(["linear", "conv1d"]))
    mixed = draw(st.booleans())  # mixed rsLoRA/LoRA scale rules make the PEFT writer rewrite alpha
    use_rslora = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    make_params, make_tensors = BUILDERS[method]
    manifest, tensors = Manifest(created_by="props"), {}
    for i in range(draw(st.integers(1, max_modules))):
        out_f, in_f, rank = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 6))
        alpha = draw(st.one_of(st.integers(1, 64).map(float), st.floats(0.01, 64, allow_nan=False)))
        target = f"model.layers.{i}.mlp.proj"
        refs = {}
        for role, tensor in make_tensors(out_f, in_f, rank, dtype, gen, fill).items():
            name = f"{target}.{role}"
            tensors[name] = tensor
            refs[role] = TensorRef(name, dtype_name(dtype), list(tensor.shape))
        manifest.modules[target] = ModuleEntry(method, f"{target}.weight", [out_f, in_f],
                                               make_params(rank, alpha, use_rslora ^ (mixed and i % 2 == 1)), refs,
                                               fan_in_fan_out=layer == "conv1d", layer=layer)
    return Adapter(manifest, tensors)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


@SETTINGS
@given(adapters())
def test_write_read_round_trip_is_bit_exact(adapter):
    back = read_adapter(write_adapter(adapter, WORK / "rt.safetensors", overwrite=True))
    assert back.manifest.to_json() == adapter.manifest.to_json()
    assert set(back.tensors) == set(adapter.tensors)
    assert all(same_bits(back.tensors[n], t) for n, t in adapter.tensors.items())


@SETTINGS
@given(adapters(methods=[m for m in ("lora", "dora") if m in METHODS]))
def test_peft_round_trip_is_bit_exact_where_reported_lossless(adapter):
    report = ConversionReport()
    config, state = adapter_to_peft(adapter, report)
    config = json.loads(json.dumps(config))  # what the PEFT writer puts on disk
    back = peft_to_adapter(config, state, WORK / "peft", ReadOptions(), ConversionReport())
    statuses = {m.module: m.status for m in report.modules}
    for target, entry in adapter.manifest.modules.items():
        new = back.manifest.modules[target]
        assert (new.method, new.shape, new.layer, new.fan_in_fan_out) == \
               (entry.method, entry.shape, entry.layer, entry.fan_in_fan_out)
        for role in entry.tensors:
            assert same_bits(back.module_tensors(target)[role], adapter.module_tensors(target)[role])
        if statuses[target] == LOSSLESS and new.params["use_rslora"] == entry.params["use_rslora"]:
            assert new.params == entry.params
        elif statuses[target] == LOSSLESS:
            # Scale rule rewritten (rsLoRA <-> alpha/r) with the very same float scale: ΔW is bit-identical.
            assert (new.params["rank"], new.params["scale"]) == (entry.params["rank"], entry.params["scale"])
        else:
            assert new.params["rank"] == entry.params["rank"]
            assert math.isclose(new.params["scale"], entry.params["scale"], rel_tol=2 ** -52)


def reference_delta(entry, tensors, base64):
    a, b = tensors["lora_A"].double(), tensors["lora_B"].double()
    delta = float(entry.params["scale"]) * (b @ a)
    if entry.method == "dora":
        combined = base64 + delta
        merged = (tensors["magnitude"].double() / torch.linalg.norm(combined, dim=1)).view(-1, 1) * combined
        return merged - base64, merged
    return delta, None


@SETTINGS
@given(adapters(fill=random_values, max_modules=2), st.integers(0, 2 ** 32 - 1))
def test_delta_agrees_with_float64(adapter, seed):
    gen = torch.Generator().manual_seed(seed)
    for target, entry in adapter.manifest.modules.items():
        tensors = adapter.module_tensors(target)
        base = torch.randn(entry.shape, generator=gen)
        ours = get_method(entry.method).delta(entry, tensors, base).double()
        ref, merged = reference_delta(entry, tensors, base.double())
        assert ours.shape == ref.shape
        out_f, in_f = entry.shape
        rank = int(entry.params["rank"])
        if entry.method == "lora":
            s = abs(float(entry.params["scale"]))
            bound = (rank + 2) * U32 * s * (tensors["lora_B"].double().abs() @ tensors["lora_A"].double().abs())
            assert bool(((ours - ref).abs() <= bound + 1e-300).all()), float(((ours - ref).abs() - bound).max())
        else:
            bound = 4 * (in_f + rank + 8) * U32 * (float(merged.abs().max()) + float(base.abs().max()))
            assert float((ours - ref).abs().max()) <= bound


def test_every_registered_method_with_lora_roles_is_covered():
    """A new LoRA-shaped method must get a BUILDERS row (so its ΔW is property-tested too)."""
    lora_shaped = [m.name for m in METHOD_BY_NAME.values() if {r.name for r in m.roles} <= {"lora_A", "lora_B", "magnitude"}]
    missing = sorted(set(lora_shaped) - set(BUILDERS))
    if missing:
        pytest.fail(f"add BUILDERS rows for {missing}")
