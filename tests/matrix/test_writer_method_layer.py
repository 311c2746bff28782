"""Every registered writer × every method × every layer kind: round trip with the reported status, or refuse.

The pattern is PEFT's ``TEST_CASES``: one case table, one generic check. For each case an adapter is
built from the method descriptors (``tests/matrix/builders.py``), written with the public API,
converted with ``adapterfmt.convert(src, dst, to=writer, base=...)`` and converted back to
adapterfmt. The factors' storage dtype (F32, F16, BF16) rotates over the variants, so every writer
and layer kind sees all three. Invariants:

* the call either succeeds or raises one of our errors (an ``AdapterFmtError`` subclass): one
  line that names the method or the layer kind the writer cannot hold and says what to do (a
  hint). Which cases refuse is pinned by :data:`CANNOT_HOLD`, so a writer that starts refusing
  (or silently accepting) is caught;
* after a successful round trip the set of modules is the set before (nothing silently dropped),
  and the report has one row per module;
* a module reported ``lossless`` comes back with the same method, bit-identical tensors
  (dtype, shape, bytes) and the same rank and scale;
* any other module (``exact``, ``scale_folded``, ``lossy``) has its ΔW, compared in float64 with the
  independent reference of ``tests/matrix/reference.py``, within the reported ``max_abs_error``
  plus the slack of :data:`STATUS_SLACK`.

Slack table (``max|ΔW_before|``: the float64 reference ΔW of the original module):

| status | bound on max|ΔW_after − ΔW_before| |
|---|---|
| lossless | 0 (tensors bit-identical, same scale) |
| exact | reported max_abs_error + 2**-20·max|ΔW_before| |
| scale_folded | reported max_abs_error + 2**-20·max|ΔW_before| |
| lossy | reported max_abs_error + 2**-20·max|ΔW_before| |

Why the 2**-20 (≈ 8 fp32 ulps relative): "exact" allows fp32 rounding of rewritten factors or
scales, and the reported error is measured between fp32 ΔWs, so it can miss that rounding: NOLA ->
LoRA reports 0 (both ΔWs come from the same materialised factors; the fp64 error, ~1e-7 relative,
is only in the note), and a module converted (exact) and then scale-folded reports the folding's
error only. Measured excess over the reported error: at most ~1.6e-7·max|ΔW_before|.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import adapterfmt
from adapterfmt.conversion_report import EXACT_MATH, LOSSLESS, LOSSY, SCALE_FOLDED
from adapterfmt.errors import AdapterFmtError
from adapterfmt.formats.registry import FORMATS
from adapterfmt.methods import get_method

from ..helpers import tiny_resnet
from .builders import CONV_ONLY_VARIANTS, VARIANTS, Target, build_adapter, method_of, uncovered_methods
from .reference import reference_delta

WRITERS = sorted(f.name for f in FORMATS if f.can_write)
#: layer kind -> (tiny base, targets). Llama: q_proj is RoPE-permuted by GGUF; GPT-2 Conv1D is stored (in, out).
LAYERS = {
    "linear": ("llama", [Target("model.layers.0.self_attn.q_proj", [64, 64]),
                         Target("model.layers.1.mlp.down_proj", [64, 96])]),
    "conv1d": ("gpt2", [Target("transformer.h.0.attn.c_attn", [96, 32], "conv1d"),
                        Target("transformer.h.1.mlp.c_proj", [32, 128], "conv1d")]),
    "embedding": ("llama", [Target("model.embed_tokens", [64, 128], "embedding")]),
    "conv2d": ("resnet", [Target("encoder.stages.1.layers.0.layer.1.convolution", [6, 6, 3, 3], "conv2d"),
                          Target("encoder.stages.1.layers.0.shortcut.convolution", [24, 16, 1, 1], "conv2d")]),
}
#: writer -> the layer kinds and methods it cannot hold (a method is held when the writer stores it, or
#: the method converts exactly to one it stores). Everything else must round-trip.
#: Methods whose ΔW depends on the base (ia3, oft, boft) have no LoRA equivalent: writers without them refuse.
BASE_DEPENDENT = {"ia3", "oft", "boft"}
#: fourierft: ΔW is generically full rank (seeded random frequencies), so no exact LoRA form either.
BASE_DEPENDENT |= {"fourierft"}
#: trainable_tokens: replaced rows of an embedding/head (PEFT trainable tokens); no LoRA form, held by adapterfmt/peft only.
BASE_DEPENDENT |= {"trainable_tokens"}
#: full (dense ΔW): no exact LoRA form and no place in PEFT/GGUF/MLX/diffusers files (kohya/LyCORIS pipeline
#: files hold it: tests/diffusion). dora_in (kohya/LyCORIS input-axis dora_scale) is refused as "magnitude_axis 'in'".
BASE_DEPENDENT |= {"full"}
#: variant -> the reason a refusal names (variants of one method that only some writers hold)
VARIANT_REASON = {"dora_in": "magnitude_axis 'in'"}
CANNOT_HOLD = {"adapterfmt": set(), "peft": {"magnitude_axis 'in'", "full"},
               "gguf": {"conv1d", "conv2d", "dora"} | BASE_DEPENDENT,
               # kohya: no consumer maps an LLM module name (diffusers/ComfyUI apply nothing), so it refuses.
               "kohya": {"linear", "conv1d", "embedding", "conv2d", "dora"} | BASE_DEPENDENT,
               "mlx": {"conv2d", "dora on an embedding", "magnitude_axis 'in'"} | BASE_DEPENDENT,
               # lycoris: LyCORIS's own wrapper maps any module name (prefix "lycoris"); Linear and Conv2d layers.
               "lycoris": {"conv1d", "embedding", "dora"} | BASE_DEPENDENT,
               # diffusers pipeline files hold multi-component adapters only (tests/diffusion)
               "diffusers": {"linear", "conv1d", "embedding", "conv2d", "dora"} | BASE_DEPENDENT,
               # bfl (Flux) and comfyui (SD 1.x/SDXL) hold pipeline LoRAs only (tests/diffusion)
               "bfl": {"linear", "conv1d", "embedding", "conv2d", "dora"} | BASE_DEPENDENT,
               "comfyui": {"linear", "conv1d", "embedding", "conv2d", "dora"} | BASE_DEPENDENT}
STATUS_SLACK = {EXACT_MATH: 2.0 ** -20, SCALE_FOLDED: 2.0 ** -20, LOSSY: 2.0 ** -20}
OUTPUT_NAME = {"adapterfmt": "out.safetensors", "peft": "out-peft", "gguf": "out.gguf",
               "kohya": "out.safetensors", "mlx": "out-mlx", "lycoris": "out.safetensors",
               "diffusers": "out.safetensors", "bfl": "out.safetensors", "comfyui": "out.safetensors"}
#: Storage dtype of the factors, rotated over the variants so that every writer and layer sees all three.
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
CASES = [(w, layer, v, list(DTYPES)[i % len(DTYPES)]) for w in WRITERS for layer in LAYERS
         for i, v in enumerate(VARIANTS) if layer in get_method(method_of(v)).layers
         and (layer == "conv2d" or v not in CONV_ONLY_VARIANTS)]

_STATES: dict[Path, dict[str, np.ndarray]] = {}


def base_state(path: Path) -> dict[str, np.ndarray]:
    """The base's weights as float64 numpy arrays (read once per session)."""
    if path not in _STATES:
        state = {}
        for shard in sorted(Path(path).glob("*.safetensors")):
            state.update({k: v.astype(np.float64) for k, v in load_file(shard).items()})
        _STATES[path] = state
    return _STATES[path]


@pytest.fixture(scope="session")
def bases(llama_base, gpt2_base, tmp_path_factory):
    return {"llama": llama_base, "gpt2": gpt2_base, "resnet": tiny_resnet(tmp_path_factory.mktemp("resnet") / "base")}


def test_every_writer_method_and_layer_has_a_case():
    assert set(WRITERS) == set(CANNOT_HOLD), "a new writer needs a CANNOT_HOLD row"
    assert not uncovered_methods(), "a new method needs a builder row in tests/matrix/builders.py"
    assert set(LAYERS) == {"linear", "conv1d", "embedding", "conv2d"}


def module_delta(adapter, target, base):
    entry = adapter.manifest.modules[target]
    stored = base[entry.base_weight]
    canonical = stored.T if entry.fan_in_fan_out else stored
    return reference_delta(entry.method, entry.params, entry.shape, adapter.module_tensors(target), canonical,
                           entry.fan_in_fan_out)


def assert_bit_identical(before, after, target):
    old, new = before.manifest.modules[target], after.manifest.modules[target]
    assert new.method == old.method, f"{target}: reported lossless but {old.method} came back as {new.method}"
    assert (new.params.get("rank"), new.params.get("scale")) == (old.params.get("rank"), old.params.get("scale")), \
        target
    old_t, new_t = before.module_tensors(target), after.module_tensors(target)
    assert set(new_t) == set(old_t), target
    for role, tensor in old_t.items():
        got = new_t[role]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, (target, role)
        assert torch.equal(got.contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), (target, role)


def worst_status(*reports):
    order = [LOSSLESS, EXACT_MATH, SCALE_FOLDED, LOSSY]
    rows = {}
    for report in reports:
        for row in report.modules:
            if row.module not in rows or order.index(row.status) > order.index(rows[row.module].status):
                rows[row.module] = row
    return rows


@pytest.mark.parametrize("writer,layer,variant,dtype", CASES, ids=["-".join(c) for c in CASES])
def test_round_trip_with_reported_status_or_refusal(tmp_path, bases, writer, layer, variant, dtype):
    model, targets = LAYERS[layer]
    method = method_of(variant)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{writer}/{layer}/{variant}".encode()))
    adapter = build_adapter(variant, targets, gen, DTYPES[dtype], nola_rows=True)
    src = adapterfmt.write_adapter(adapter, tmp_path / "src.safetensors")
    before = adapterfmt.read_adapter(src)
    out = tmp_path / OUTPUT_NAME[writer]
    refusal_reasons = CANNOT_HOLD[writer] & {layer, method, f"{method} on an {layer}", VARIANT_REASON.get(variant)}
    try:
        forward = adapterfmt.convert(src, out, to=writer, base=bases[model])
    except AdapterFmtError as exc:
        assert refusal_reasons, f"{writer} refused {method} on {layer}: {exc}"
        assert any(reason.lower() in str(exc).lower() for reason in refusal_reasons), \
            f"the refusal does not name {sorted(refusal_reasons)}: {exc}"
        assert exc.hint and "\n" not in exc.one_line(), f"a refusal is one line that says what to do: {exc!r}"
        assert not out.exists(), "a refused conversion left an output behind"
        return
    assert not refusal_reasons, f"{writer} accepted {method} on {layer} (expected a refusal naming " \
                                f"{sorted(refusal_reasons)}; update CANNOT_HOLD if the writer gained it)"
    backward = adapterfmt.convert(out, tmp_path / "back.safetensors", to="adapterfmt", base=bases[model])
    after = adapterfmt.read_adapter(tmp_path / "back.safetensors")
    modules = set(before.manifest.modules)
    assert set(after.manifest.modules) == modules, "modules were dropped or added"
    assert {m.module for m in forward.modules} == modules, "the report must have one row per module"
    rows = worst_status(forward, backward)
    base = base_state(bases[model])
    for target in sorted(modules):
        row = rows[target]
        if row.status == LOSSLESS:
            assert_bit_identical(before, after, target)
            continue
        want, got = module_delta(before, target, base), module_delta(after, target, base)
        err = float(np.abs(got - want).max())
        bound = (row.max_abs_error or 0.0) + STATUS_SLACK[row.status] * float(np.abs(want).max())
        assert err <= bound, f"{target} ({row.status}): max|ΔW error| {err:.3g} > reported " \
                             f"{row.max_abs_error} + slack (bound {bound:.3g})"
