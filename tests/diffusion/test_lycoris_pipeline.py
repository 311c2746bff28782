"""kohya/LyCORIS pipeline files of every family (LoCon 1x1/3x3, DoRA on both axes, LoHa, LoKr, full), made by
lycoris-lora's ``create_lycoris`` on tiny SD 1.x and SDXL models: every tensor placed, written back bit for bit,
ΔW equal to ``lycoris.functional``, merges equal to diffusers' ``fuse_lora`` (LoCon) or to LyCORIS's own merge
rounded once, and ``--to diffusers`` loading like the source where diffusers can load it (refused by name
where it cannot)."""
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import adapterfmt
from adapterfmt.errors import UsageError
from adapterfmt.methods import get_method

from .consumers import lora_layer_count, outputs, tiny_pipeline
from .lycoris_files import CONV_FAMILIES, FAMILIES, lycoris_file

FILES = {"unet": "diffusion_pytorch_model.safetensors"}
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cache = {}

    def make(kind, family, request):
        if (kind, family) not in cache:
            pipe, models = request.getfixturevalue(kind)
            src = tmp_path_factory.mktemp(f"{kind}-{family}") / "lycoris.safetensors"
            names = lycoris_file(kind, family, models, src)
            mid = src.with_name("af.safetensors")
            report = adapterfmt.convert(src, mid, base=pipe)
            cache[kind, family] = (pipe, models, src, names, mid, report)
        return cache[kind, family]
    return make


def _data(path):
    raw = path.read_bytes()
    return raw[8 + struct.unpack("<Q", raw[:8])[0]:]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_tensor_placed_and_written_back_bit_exactly(kind, family, made, request, tmp_path):
    pipe, models, src, names, mid, report = made(kind, family, request)
    assert report.worst == "lossless"
    adapter = adapterfmt.read_adapter(mid)
    assert set(adapter.manifest.modules) == set(names.values())  # LyCORIS's own module list, mapped by diffusers
    stored = load_file(str(src))
    alphas = sum(k.endswith(".alpha") for k in stored)
    assert len(adapter.tensors) == len(stored) - alphas  # every other tensor is one role of one module
    methods = {e.method for e in adapter.manifest.modules.values()}
    layers = {e.layer for e in adapter.manifest.modules.values()}
    expected = {"locon": {"lora"}, "loha": {"loha"}, "lokr": {"lokr"}, "full": {"full"},
                "dora_out": {"dora"}, "dora_in": {"dora"}}[family]
    assert methods == expected
    if family in ("locon", "full", "dora_out", "dora_in"):
        assert "conv2d" in layers  # 3x3 resnet convs (and SD 1.x's 1x1 proj_in)
    axes = {e.params.get("magnitude_axis") for e in adapter.manifest.modules.values()}
    assert axes == {"dora_out": {"out"}, "dora_in": {"in"}}.get(family, {None})
    back = tmp_path / "back.safetensors"
    assert adapterfmt.convert(mid, back, to="kohya").worst == "lossless"
    with safe_open(str(src), framework="pt") as a, safe_open(str(back), framework="pt") as b:
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
    assert _data(src) == _data(back)


def _lycoris_delta(family, leaves, alpha):
    """ΔW by lycoris.functional (not the module's get_diff_weight, which applies the scale twice)."""
    from lycoris.functional import locon, loha, lokr
    g = lambda k: leaves.get(k).float() if k in leaves else None  # noqa: E731
    if family == "locon":
        rank = leaves["lora_down.weight"].shape[0]
        return locon.diff_weight(g("lora_down.weight"), g("lora_up.weight"), None, gamma=alpha / rank)
    if family == "loha":
        rank = leaves["hada_w1_b"].shape[0]
        return loha.diff_weight(g("hada_w1_b"), g("hada_w1_a"), g("hada_w2_b"), g("hada_w2_a"), None, None,
                                gamma=alpha / rank)
    # functional.lokr takes gamma = alpha and divides by the factor rank itself (scale 1 with two full halves)
    return lokr.diff_weight(g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), g("lokr_w2"), g("lokr_w2_a"),
                            g("lokr_w2_b"), None, gamma=alpha)


def _ulps(a, b):
    gap = torch.nextafter(b.abs(), torch.tensor(float("inf"))) - b.abs()
    return float(((a - b).abs() / gap).max())


@pytest.mark.parametrize("family", ["locon", "loha", "lokr"])
def test_delta_equals_lycoris_functional(family, made, request):
    pipe, models, src, names, mid, report = made("sd15", family, request)
    adapter = adapterfmt.read_adapter(mid)
    stored = load_file(str(src))
    worst = 0.0
    for name, target in names.items():
        leaves = {k.split(".", 1)[1]: v for k, v in stored.items() if k.split(".", 1)[0] == name}
        alpha = float(leaves.pop("alpha"))
        entry = adapter.manifest.modules[target]
        ours = get_method(entry.method).delta(entry, adapter.module_tensors(target))
        theirs = _lycoris_delta(family, leaves, alpha).reshape(ours.shape)
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7)
        worst = max(worst, _ulps(ours, theirs))
    assert worst <= 1, worst  # measured 0: the same fp32 operations as lycoris.functional


def _merge(pipe, adapter, component, out):
    adapterfmt.merge(pipe / component, [adapter], out)
    return load_file(str(out / FILES.get(component, "model.safetensors")))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_locon_merge_equals_fuse_lora(kind, made, request, tmp_path):
    pipe, models, src, names, mid, report = made(kind, "locon", request)
    fused = tiny_pipeline(kind, models)
    fused.load_lora_weights(str(src))
    fused.fuse_lora(components=list(models))
    for component in models:
        ours = _merge(pipe, mid, component, tmp_path / component)
        theirs = {k.replace(".base_layer", ""): v for k, v in getattr(fused, component).state_dict().items()
                  if ".lora_" not in k}
        changed = 0
        for param, value in ours.items():
            gap = torch.nextafter(theirs[param].abs(), torch.tensor(float("inf"))) - theirs[param].abs()
            assert bool(((value - theirs[param]).abs() <= gap).all()), param
            changed += not torch.equal(value, models[component].state_dict()[param])
        assert changed == sum(t.startswith(component + ".") for t in names.values())


@pytest.mark.parametrize("family", ["loha", "lokr", "full", "dora_out", "dora_in"])
def test_merge_equals_lycoris_merge(family, made, request, tmp_path):
    """diffusers cannot load these; the reference is LyCORIS's functional merge in fp32."""
    from lycoris.functional.general import weight_decompose
    pipe, models, src, names, mid, report = made("sd15", family, request)
    stored = load_file(str(src))
    ours = _merge(pipe, mid, "unet", tmp_path / "unet")
    base = models["unet"].state_dict()
    worst = 0.0
    for name, target in names.items():
        component, path = target.split(".", 1)
        if component != "unet":
            continue
        leaves = {k.split(".", 1)[1]: v for k, v in stored.items() if k.split(".", 1)[0] == name}
        w = base[f"{path}.weight"].float()
        if family == "full":
            want = w + leaves["diff"].float()
            if "diff_b" in leaves:
                bias = base[f"{path}.bias"] + leaves["diff_b"].float()
                assert _ulps(ours[f"{path}.bias"], bias) <= 1
        else:
            alpha = float(leaves.pop("alpha"))
            scale = leaves.pop("dora_scale", None)
            delta = _lycoris_delta("locon" if family.startswith("dora") else family, leaves, alpha).reshape(w.shape)
            want = w + delta if scale is None else \
                weight_decompose(w + delta, scale.float(), 1, family == "dora_out", backend="torch")
        worst = max(worst, _ulps(ours[f"{path}.weight"], want))
    assert worst <= 1, worst


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_locon_to_diffusers_loads_like_the_source(kind, made, request, tmp_path):
    pipe, models, src, names, mid, report = made(kind, "locon", request)
    out = tmp_path / "diffusers.safetensors"
    assert adapterfmt.convert(mid, out, to="diffusers").worst == "lossless"
    theirs, ours = tiny_pipeline(kind, models), tiny_pipeline(kind, models)
    theirs.load_lora_weights(str(src))
    ours.load_lora_weights(str(out))
    counts = lora_layer_count(theirs)
    assert counts == lora_layer_count(ours) and sum(counts.values()) == len(names)  # conv LoRAs applied too
    base, got, want = outputs(kind, tiny_pipeline(kind, models)), outputs(kind, ours), outputs(kind, theirs)
    for component in want:
        assert (want[component] - base[component]).abs().max() > 1e-3
        torch.testing.assert_close(got[component], want[component], **TOL)
    # a kohya file we write from the diffusers export (our own names) applies as many layers
    again = tmp_path / "again.safetensors"
    adapterfmt.convert(out, tmp_path / "from-diffusers.safetensors", base=pipe)
    adapterfmt.convert(tmp_path / "from-diffusers.safetensors", again, to="kohya")
    mine = tiny_pipeline(kind, models)
    mine.load_lora_weights(str(again))
    assert lora_layer_count(mine) == counts
    for component, value in outputs(kind, mine).items():
        torch.testing.assert_close(value, want[component], **TOL)


@pytest.mark.parametrize("family,why", [("full", "cannot load a full"), ("dora_in", "drops kohya/LyCORIS dora_scale"),
                                        ("dora_out", "drops kohya/LyCORIS dora_scale")])
def test_to_diffusers_refuses_what_diffusers_cannot_load(family, why, made, request, tmp_path):
    pipe, models, src, names, mid, report = made("sd15", family, request)
    with pytest.raises(UsageError, match=why):
        adapterfmt.convert(mid, tmp_path / "out.safetensors", to="diffusers")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("family", ["loha", "lokr"])
def test_loha_lokr_to_diffusers_convert_exactly_to_lora_and_load(family, made, request, tmp_path):
    """diffusers refuses the LyCORIS file itself; --to diffusers converts each module to an exact LoRA
    (reported exact, not lossless), which loads with every module applied and LyCORIS's outputs."""
    from lycoris.functional import loha, lokr  # noqa: F401  (the reference below)
    pipe, models, src, names, mid, report = made("sd15", family, request)
    with pytest.raises(ValueError, match="not been correctly renamed"):
        tiny_pipeline("sd15", models).load_lora_weights(str(src))
    out = tmp_path / "out.safetensors"
    assert adapterfmt.convert(mid, out, to="diffusers").worst == "exact"
    loaded = tiny_pipeline("sd15", models)
    loaded.load_lora_weights(str(out))
    assert sum(lora_layer_count(loaded).values()) == len(names)
    stored, reference = load_file(str(src)), {c: m for c, m in models.items()}
    import copy
    reference = {c: copy.deepcopy(m) for c, m in models.items()}
    with torch.no_grad():
        for name, target in names.items():
            component, path = target.split(".", 1)
            leaves = {k.split(".", 1)[1]: v for k, v in stored.items() if k.split(".", 1)[0] == name}
            alpha = float(leaves.pop("alpha"))
            weight = reference[component].get_submodule(path).weight
            weight += _lycoris_delta(family, leaves, alpha).reshape(weight.shape)
    want = outputs("sd15", tiny_pipeline("sd15", reference))
    for component, value in outputs("sd15", loaded).items():
        torch.testing.assert_close(value, want[component], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,rule,severity", [("dora_in", "dora_scale_ignored", "ignored"),
                                                  ("dora_out", "dora_scale_ignored", "ignored"),
                                                  ("full", "dense_method", "refuse")])
def test_check_target_diffusers_names_what_diffusers_ignores(family, rule, severity, made, request):
    from adapterfmt.ops.check import check_adapter
    pipe, models, src, names, mid, report = made("sd15", family, request)
    findings = {f.rule: f for f in check_adapter(mid, ["diffusers"]).targets[0].findings}
    assert findings[rule].severity == severity
    if rule == "dora_scale_ignored":
        assert "drops every dora_scale" in findings[rule].message


@pytest.mark.parametrize("family", sorted(CONV_FAMILIES))
def test_conv_and_tucker_lycoris_modules_round_trip_or_are_refused_by_name(family, sd15, tmp_path):
    """LoHa/LoKr on convs and Tucker cores need the LyCORIS conv modules (formats/lycoris_modules.py): with
    them the file comes back bit for bit, without them the first such module is refused naming its family."""
    from adapterfmt.errors import ForeignFormatError
    from adapterfmt.formats.kohya_modules import lycoris_modules
    pipe, models = sd15
    src = tmp_path / "conv.safetensors"
    names = lycoris_file("sd15", family, models, src)
    mid, back = tmp_path / "af.safetensors", tmp_path / "back.safetensors"
    if lycoris_modules() is None:
        with pytest.raises(ForeignFormatError, match="(LoHa|LoKr|LoCon \\(Tucker\\)) on this layer"):
            adapterfmt.convert(src, mid, base=pipe)
        return
    assert adapterfmt.convert(src, mid, base=pipe).worst == "lossless"
    assert set(adapterfmt.read_adapter(mid).manifest.modules) == set(names.values())
    assert adapterfmt.convert(mid, back, to="kohya").worst == "lossless"
    assert _data(src) == _data(back)
