"""`adapterfmt check` rules and `convert --to peft --for TARGET`.

Adapters are real PEFT adapters (tests/helpers.make_peft_adapter) converted with the public API.
The PEFT target is verified with real PEFT; vLLM, SGLang, TGI and llama.cpp are not installable
here, so their loaders' scale rules are reimplemented below from their source (cited per function).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapterfmt
from adapterfmt.errors import UsageError
from adapterfmt.formats import WriteOptions, get_format
from adapterfmt.methods import get_method
from adapterfmt.ops.check import OK, check_adapter
from adapterfmt.ops.check_rules import RULES, TARGETS
from adapterfmt.ops.for_target import prepare_for_target
from adapterfmt.conversion_report import ConversionReport

from ..helpers import load_model, make_peft_adapter

ADAPTERS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
    "full": dict(r=4, lora_alpha=8, use_rslora=True, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj"],
                 rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}, modules_to_save=["lm_head"]),
    "rank32": dict(r=32, lora_alpha=32, target_modules=["q_proj"]),
    "partial": dict(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"], layers_to_transform=[0]),
    "embed": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "lm_head"]),
}


@pytest.fixture(scope="module")
def adapters(llama_base, tmp_path_factory):
    """name -> adapterfmt file (converted from a real PEFT adapter with --base)."""
    root = tmp_path_factory.mktemp("check")
    out = {}
    for name, kwargs in ADAPTERS.items():
        peft_dir = make_peft_adapter(llama_base, root / f"{name}-peft", **kwargs)
        out[name] = root / f"{name}.safetensors"
        adapterfmt.convert(peft_dir, out[name], base=llama_base)
    return out


def fired(path_or_adapter, target) -> dict[str, str]:
    """rule id -> severity of the findings for one target."""
    verdict = check_adapter(path_or_adapter, [target]).targets[0]
    return {f.rule: f.severity for f in verdict.findings}


def our_deltas(adapter, base_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """ΔW per module from the adapterfmt file itself (fp64), canonical (out, in)."""
    out = {}
    for name, entry in adapter.manifest.modules.items():
        t = {k: v.double() for k, v in adapter.module_tensors(name).items()}
        out[name] = get_method(entry.method).delta(entry, t).double()
    return out


def write_for(adapter, target: str, out: Path) -> ConversionReport:
    report = ConversionReport()
    ready = prepare_for_target(adapter, target, report)
    get_format("peft").write(ready, out, ConversionReport(), WriteOptions())
    return report


# ------------------------------------------------------------------ in-memory variants for the rarer rules
def _first(adapter):
    return next(iter(sorted(adapter.manifest.modules)))


def mixed_methods(a):
    entry = a.manifest.modules[_first(a)]
    entry.method = "lora"
    entry.tensors.pop("magnitude")


def mixed_fan_in_fan_out(a):
    a.manifest.modules[_first(a)].layer = "conv1d"


def fused(a):
    a.manifest.modules[_first(a)].base_weight = "model.layers.0.self_attn.qkv_proj.weight"


def bias_delta(a):
    from adapterfmt.format import Payload, TensorRef
    a.manifest.payloads["x.bias"] = Payload("bias_delta", "x.bias", TensorRef("payload.x.bias", "F32", [4]))


def nola(a):
    a.manifest.modules[_first(a)].method = "nola"


def tied(a):
    a.manifest.source.setdefault("base_config", {})["tie_word_embeddings"] = True


def tokens(a):
    a.manifest.modules[_first(a)].method = "trainable_tokens"


def mixed_rank_in_type(a):
    a.manifest.modules["model.layers.0.self_attn.q_proj"].params["rank"] = 2


def kohya_dora(a):
    for entry in a.manifest.modules.values():
        if entry.method == "dora":
            entry.params.update(magnitude_axis="in", norm_eps=2.0 ** -23)


def dense(a):
    a.manifest.modules[_first(a)].method = "full"


VARIANTS = {"kohya_dora": ("full", kohya_dora), "dense": ("plain", dense), "mixed_methods": ("full", mixed_methods), "mixed_fifo": ("plain", mixed_fan_in_fan_out),
            "fused": ("plain", fused), "bias": ("plain", bias_delta), "nola": ("plain", nola),
            "tied": ("embed", tied), "mixed_rank": ("plain", mixed_rank_in_type), "tokens": ("plain", tokens)}

# (adapter or variant, target, rule, severity): each rule of every target, firing where the source says.
EXPECTED = [
    ("plain", "peft", "peft_features", OK),
    ("full", "peft", "peft_features", OK),
    ("mixed_methods", "peft", "mixed_methods", "refuse"),
    ("mixed_fifo", "peft", "mixed_fan_in_fan_out", "refuse"),
    ("full", "vllm", "dora", "refuse"),
    ("full", "vllm", "modules_to_save", "refuse"),
    ("rank32", "vllm", "rank_limit", "refuse"),
    ("patterns", "vllm", "patterns_ignored", "mis-scaled"),
    ("patterns", "vllm", "rslora", OK),
    ("embed", "vllm", "embeddings", OK),
    ("plain", "vllm", "dtype", OK),
    ("full", "sglang", "dora", "refuse"),
    ("patterns", "sglang", "patterns_refused", "refuse"),
    ("patterns", "sglang", "rslora_ignored", "mis-scaled"),
    ("plain", "sglang", "rank_limit", OK),
    ("full", "sglang", "modules_to_save", "ignored"),
    ("full", "tgi", "dora_ignored", "ignored"),
    ("full", "tgi", "modules_to_save", "ignored"),
    ("embed", "tgi", "unmapped_modules", "ignored"),
    ("partial", "tgi", "partial_layers", "ignored"),
    ("mixed_rank", "tgi", "mixed_rank_in_type", "refuse"),
    ("patterns", "tgi", "patterns_ignored", "mis-scaled"),
    ("plain", "tgi", "rank_padding", "mis-scaled"),
    ("patterns", "tgi", "rslora", OK),
    ("full", "llama.cpp", "dora", "refuse"),
    ("full", "llama.cpp", "modules_to_save", "refuse"),
    ("tied", "llama.cpp", "tied_head", "refuse"),
    ("patterns", "llama.cpp", "scalar_alpha", "mis-scaled"),
    ("plain", "llama.cpp", "gguf_export", OK),
    ("full", "mlx", "modules_to_save", "refuse"),
    ("patterns", "mlx", "one_rank", OK),
    ("patterns", "mlx", "one_scale", OK),
    ("full", "mlx", "dora", OK),
    ("patterns", "mlx", "rslora", OK),
    ("plain", "diffusers", "not_a_pipeline_adapter", "ignored"),
    ("full", "diffusers", "dora", "refuse"),
    ("kohya_dora", "diffusers", "dora_scale_ignored", "ignored"),
    ("dense", "comfyui", "dense_method", OK),
    ("full", "diffusers", "payloads", "refuse"),
    ("plain", "diffusers", "alphas", OK),
    ("patterns", "diffusers", "per_module_alphas", "mis-scaled"),
    ("plain", "comfyui", "not_a_comfy_model", "ignored"),
    ("full", "comfyui", "dora", "mis-scaled"),
    ("embed", "comfyui", "payloads", "refuse"),
    ("plain", "comfyui", "alphas", OK),
] + [(v, t, r, s) for t in TARGETS for v, r, s in
     (("nola", "non_lora_method", OK), ("fused", "fused_block", "refuse"), ("bias", "bias_delta", "refuse"),
      ("tokens", "no_lora_form", "refuse"),
      ("dense", "dense_method", "refuse"))
     if any(rule.id == r and (t, r) != ("comfyui", "dense_method") for rule in RULES[t])]


def load_case(adapters, case):
    base_name, edit = VARIANTS.get(case, (case, None))
    adapter = adapterfmt.read_adapter(adapters[base_name])
    if edit:
        edit(adapter)
    return adapter


@pytest.mark.parametrize("case,target,rule,severity", EXPECTED)
def test_rule_fires(adapters, case, target, rule, severity):
    assert fired(load_case(adapters, case), target).get(rule) == severity


def test_every_rule_is_tested():
    tested = {(t, r) for _, t, r, _ in EXPECTED}
    assert {(t, rule.id) for t in TARGETS for rule in RULES[t]} == tested


@pytest.mark.parametrize("target", ["peft", "vllm", "sglang", "llama.cpp", "mlx"])
def test_plain_lora_has_no_issue(adapters, target):
    """A uniform LoRA (r=4, alpha=8, q/v) is fine everywhere but TGI (rank padding) and diffusion loaders."""
    assert set(fired(adapters["plain"], target).values()) <= {OK}


def test_unknown_target_is_a_usage_error(adapters):
    with pytest.raises(UsageError, match="unknown check target"):
        check_adapter(adapters["plain"], ["onnx"])


def test_report_json_and_lines(adapters):
    report = check_adapter(adapters["full"], TARGETS, out="out-dir", base="base-dir")
    data = json.loads(json.dumps(report.to_dict()))
    assert [t["target"] for t in data["targets"]] == list(TARGETS)
    verdicts = {t["target"]: t["verdict"] for t in data["targets"]}
    assert verdicts["peft"] == OK and verdicts["vllm"] == "refuse" and verdicts["tgi"] == "ignored"
    lines = report.lines()
    assert sum(line.startswith("vllm: VERDICT") for line in lines) == 1
    assert any("--base base-dir" in line for line in lines)


# ------------------------------------------------------------------ consumers' scale rules, reimplemented
PREFIX = "base_model.model."


def _pairs(peft_dir: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, {module: (A, B)}) as the serving loaders parse a PEFT directory:
    vllm/lora/utils.py parse_fine_tuned_lora_name (strip base_model.model. and .lora_A/.lora_B.weight)."""
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    state = load_file(str(peft_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, role = key[len(PREFIX):].rpartition(".lora_")
        pairs.setdefault(module, {})[role] = tensor.double()
    return config, {m: (p["A.weight"], p["B.weight"]) for m, p in pairs.items()}


def vllm_deltas(peft_dir: Path) -> dict[str, torch.Tensor]:
    """vLLM: vllm/lora/peft_helper.py PEFTHelper.from_dict keeps only its own fields (no rank_pattern /
    alpha_pattern); __post_init__ sets vllm_lora_scaling_factor = lora_alpha/r or lora_alpha/sqrt(r) with
    the config's r; lora_weights.py LoRALayerWeights.from_config/optimize multiplies it into every lora_b."""
    config, pairs = _pairs(peft_dir)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return {m: (b * scale) @ a for m, (a, b) in pairs.items()}


def sglang_deltas(peft_dir: Path) -> dict[str, torch.Tensor]:
    """SGLang: python/sglang/srt/lora/lora_config.py refuses pattern entries that change r/lora_alpha
    (validate_new_adapter); lora.py LoRAAdapter.__init__ scaling = lora_alpha / r (use_rslora not read)."""
    config, pairs = _pairs(peft_dir)
    for key, default in (("rank_pattern", config["r"]), ("alpha_pattern", config["lora_alpha"])):
        assert all(v == default for v in (config.get(key) or {}).values()), f"SGLang refuses {key}"
    return {m: (b @ a) * (config["lora_alpha"] / config["r"]) for m, (a, b) in pairs.items()}


# models/__init__.py get_model_with_lora_adapters: the layer types prepared, in order, with one config.
TGI_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tgi_deltas(peft_dir: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """TGI: adapters/lora.py LoraConfig.load reads r/lora_alpha/use_rslora; LoraWeights.prepare_weights
    runs per layer type, drops a type missing in any layer, scales lora_b by get_scaling_factor(alpha, r)
    and then sets config.r to the SGMV-padded rank (utils/sgmv.py pad_rank: 8, else a multiple of 16)."""
    from adapterfmt.ops.check_rules import tgi_padded_rank
    config, pairs = _pairs(peft_dir)
    r, out = config["r"], {}
    for layer_type in TGI_ORDER:
        names = [m for m in pairs if m.endswith(layer_type)]
        if len(names) < n_layers:
            continue
        scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
        for m in names:
            a, b = pairs[m]
            out[m] = (b @ a) * scale
        r = tgi_padded_rank(r)
    return out


def llamacpp_deltas(peft_dir: Path) -> dict[str, torch.Tensor]:
    """llama.cpp: convert_lora_to_gguf.py set_gguf_parameters writes only float(lora_alpha);
    src/llama-adapter.h get_scale = alpha / rank with rank = lora_b.ne[0] (each tensor's own rank)."""
    config, pairs = _pairs(peft_dir)
    return {m: (b @ a) * (config["lora_alpha"] / a.shape[0]) for m, (a, b) in pairs.items()}


def assert_same_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = 1e-6):
    assert set(want) <= set(got), f"missing {sorted(set(want) - set(got))}"
    for name, ref in want.items():
        err = float(torch.linalg.norm(got[name] - ref) / torch.linalg.norm(ref))
        assert err < rel, f"{name}: relative error {err:.3g}"


def worst_rel(got, want) -> float:
    return max(float(torch.linalg.norm(got[n] - w) / torch.linalg.norm(w)) for n, w in want.items())


CONSUMERS = {"vllm": vllm_deltas, "sglang": sglang_deltas, "llama.cpp": llamacpp_deltas,
             "tgi": lambda d: tgi_deltas(d, n_layers=2)}


@pytest.mark.parametrize("target", sorted(CONSUMERS))
def test_for_target_export_computes_our_delta(adapters, tmp_path, target):
    """rsLoRA + rank/alpha patterns: the plain PEFT export is mis-scaled there, the --for export is exact."""
    adapter = adapterfmt.read_adapter(adapters["patterns"])
    want = our_deltas(adapter)
    plain = tmp_path / "plain"
    get_format("peft").write(adapter, plain, ConversionReport(), WriteOptions())
    if target == "sglang":  # current SGLang refuses the pattern entries outright
        with pytest.raises(AssertionError, match="SGLang refuses"):
            CONSUMERS[target](plain)
    else:  # the rule matters: as is, the ΔW there is wrong
        assert worst_rel(CONSUMERS[target](plain), want) > 0.1
    report = write_for(adapter, target, tmp_path / "ready")
    assert_same_deltas(CONSUMERS[target](tmp_path / "ready"), want)
    folded = [m for m in report.modules if m.status == "scale_folded"]
    assert folded and all(m.rel_error is not None and m.rel_error < 1e-6 for m in folded)


def test_tgi_export_fills_missing_layers(adapters, tmp_path):
    adapter = adapterfmt.read_adapter(adapters["partial"])
    want = our_deltas(adapter)
    assert set(tgi_deltas(_export(adapter, tmp_path / "plain"), 2)) == set()  # TGI drops both layer types
    write_for(adapter, "tgi", tmp_path / "ready")
    got = tgi_deltas(tmp_path / "ready", n_layers=2)
    assert_same_deltas(got, want)
    assert all(float(got[m].abs().max()) == 0 for m in got if m not in want)


def _export(adapter, path: Path) -> Path:
    get_format("peft").write(adapter, path, ConversionReport(), WriteOptions())
    return path


@pytest.mark.parametrize("target", ["vllm", "sglang", "tgi", "llama.cpp"])
def test_for_target_export_still_loads_in_peft_with_our_delta(adapters, llama_base, tmp_path, target):
    """The --for file is a valid PEFT adapter: real PEFT gives our ΔW (to fp rounding of the scale)."""
    from ..helpers import peft_merged_state
    adapter = adapterfmt.read_adapter(adapters["patterns"])
    write_for(adapter, target, tmp_path / "ready")
    merged = peft_merged_state(llama_base, tmp_path / "ready")
    base = load_model(llama_base).state_dict()
    for name, delta in our_deltas(adapter).items():
        got = (merged[f"{name}.weight"].double() - base[f"{name}.weight"].double())
        assert float(torch.linalg.norm(got - delta) / torch.linalg.norm(delta)) < 1e-5, name


@pytest.mark.parametrize("case", ["plain", "patterns", "full", "embed"])
def test_peft_ok_means_real_peft_computes_our_weights(adapters, llama_base, tmp_path, case):
    """Every adapter the check calls OK for peft loads with PeftModel.from_pretrained and merges to our W'."""
    from ..helpers import peft_merged_state
    adapter = adapterfmt.read_adapter(adapters[case])
    assert check_adapter(adapter, ["peft"]).targets[0].severity == OK
    write_for(adapter, "peft", tmp_path / "peft")
    merged = peft_merged_state(llama_base, tmp_path / "peft")
    base = load_model(llama_base).state_dict()
    for name, entry in adapter.manifest.modules.items():
        w = base[entry.base_weight].float()
        w = w.T if entry.fan_in_fan_out else w
        ours = get_method(entry.method).merged(entry, adapter.module_tensors(name), base=w)
        ours = ours.T if entry.fan_in_fan_out else ours
        torch.testing.assert_close(merged[entry.base_weight], ours, rtol=0, atol=2e-6)
    for payload in adapter.manifest.payloads.values():
        if payload.kind == "modules_to_save":
            assert torch.equal(merged[payload.target], adapter.tensors[payload.tensor.name])


@pytest.mark.parametrize("target,reason", [("vllm", "DoRA"), ("sglang", "DoRA"), ("tgi", "DoRA"),
                                           ("llama.cpp", "DoRA"), ("mlx", "modules_to_save")])
def test_for_target_refuses_with_the_reason(adapters, target, reason):
    with pytest.raises(UsageError, match=f"--for {target}: .*{reason}"):
        prepare_for_target(adapterfmt.read_adapter(adapters["full"]), target, ConversionReport())


def test_fold_keeps_bf16_when_exact_and_widens_otherwise(adapters):
    """Scale folding in fp64: a power-of-two ratio stays bf16 (exact), any other ratio is stored fp32."""
    from adapterfmt.format import TensorRef
    from adapterfmt.methods.lora import lora_params
    adapter = adapterfmt.read_adapter(adapters["plain"])
    for entry in adapter.manifest.modules.values():
        for role, ref in entry.tensors.items():
            adapter.tensors[ref.name] = adapter.tensors[ref.name].bfloat16()
            entry.tensors[role] = TensorRef(ref.name, "BF16", ref.shape)
    names = sorted(adapter.manifest.modules)  # 4 modules at scale 2 (alpha 8, rank 4)
    adapter.manifest.modules[names[0]].params = lora_params(4, 16, False)   # scale 4: ratio 2, exact
    adapter.manifest.modules[names[1]].params = lora_params(4, 12, False)   # scale 3: ratio 1.5, not exact
    report = ConversionReport()
    ready = prepare_for_target(adapter, "vllm", report)
    dtype = {n: ready.module_tensors(n)["lora_B"].dtype for n in names}
    assert dtype[names[0]] == torch.bfloat16 and dtype[names[1]] == torch.float32
    assert dtype[names[2]] == torch.bfloat16  # untouched
    status = {m.module: m.status for m in report.modules}
    assert status[names[0]] == "exact" and status[names[1]] == "scale_folded" and status[names[2]] == "lossless"


# ------------------------------------------------------------------ llama.cpp's own converter, when available
# Opt-in (about 45 s: three converter runs): LLAMA_CPP_DIR=<llama.cpp source, e.g. the one vendored in the
# llama-cpp-python sdist> as scripts/test-consumers.sh sets it.
_SOURCE = os.environ.get("LLAMA_CPP_DIR") or os.environ.get("ADAPTERFMT_LLAMA_CPP_DIR")
LLAMA_CPP_DIR = Path(_SOURCE) if _SOURCE else None
CONVERTER = LLAMA_CPP_DIR / "convert_lora_to_gguf.py" if LLAMA_CPP_DIR else None
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output"}


def run_llamacpp_converter(peft_dir: Path, base: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERTER), "--base", str(base), "--outtype", "f32",
                           "--outfile", str(out), str(peft_dir)], capture_output=True, text=True, timeout=300,
                          cwd=CONVERTER.parent)


def llama_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute: the RoPE row order llama.cpp stores q/k in."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_deltas(path: Path) -> dict[str, torch.Tensor]:
    """llama.cpp runtime: src/llama-adapter.h get_scale = adapter.lora.alpha / rank, rank = lora_b.ne[0]."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    t = {x.name: torch.from_numpy(x.data.copy()).double() for x in reader.tensors}
    return {n[:-len(".weight.lora_a")]: (alpha / t[n].shape[0]) * t[n.replace("lora_a", "lora_b")] @ t[n]
            for n in t if n.endswith(".lora_a")}


@pytest.mark.skipif(CONVERTER is None or not CONVERTER.is_file(),
                    reason="set LLAMA_CPP_DIR to a llama.cpp source tree to run its convert_lora_to_gguf.py")
def test_real_llamacpp_converter_mis_scales_plain_and_is_exact_for_llamacpp(adapters, llama_base, tmp_path):
    """The real converter: the plain PEFT export comes out mis-scaled (rsLoRA, alpha_pattern dropped), the
    --for llama.cpp export computes our ΔW under llama.cpp's alpha/rank rule; DoRA is refused."""
    adapter = adapterfmt.read_adapter(adapters["patterns"])
    config = json.loads((llama_base / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    want = {}
    for name, delta in our_deltas(adapter).items():
        layer, path = name.split(".")[2], name.split(".", 3)[3]
        gname = f"blk.{layer}.{GGUF_NAMES[path]}"
        n_head = heads.get(GGUF_NAMES[path])
        want[gname] = llama_permute(delta, n_head) if n_head else delta
    results = {}
    for kind, make in (("plain", _export), ("ready", lambda a, p: (write_for(a, "llama.cpp", p), p)[1])):
        peft_dir = make(adapter, tmp_path / kind)
        proc = run_llamacpp_converter(peft_dir, llama_base, tmp_path / f"{kind}.gguf")
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[kind] = gguf_deltas(tmp_path / f"{kind}.gguf")
    assert worst_rel(results["plain"], want) > 0.1
    assert_same_deltas(results["ready"], want)
    dora_dir = _export(adapterfmt.read_adapter(adapters["full"]), tmp_path / "dora")
    proc = run_llamacpp_converter(dora_dir, llama_base, tmp_path / "dora.gguf")
    assert proc.returncode != 0 and "Not a lora_A or lora_B tensor" in proc.stderr + proc.stdout


def test_for_target_materialises_nola_and_matches_its_delta(adapters, tmp_path):
    """A NOLA adapter (made from LoRA with the public API) becomes LoRA for vLLM, ΔW equal to fp32 rounding."""
    nola_path = tmp_path / "nola.safetensors"
    adapterfmt.convert(adapters["plain"], nola_path, method="nola", method_options={"nola_basis": (64, 64), "seed": 7})
    nola = adapterfmt.read_adapter(nola_path)
    assert fired(nola, "vllm").get("non_lora_method") == OK
    want = our_deltas(nola)
    write_for(nola, "vllm", tmp_path / "ready")
    assert_same_deltas(vllm_deltas(tmp_path / "ready"), want, rel=1e-5)


def test_check_accepts_a_path_and_target_aliases(adapters):
    report = check_adapter(str(adapters["plain"]), ["GGUF", "mlx-lm"])
    assert [t.target for t in report.targets] == ["llama.cpp", "mlx"]
    assert report.path == str(adapters["plain"])


def test_check_reads_a_peft_directory_like_the_converted_file(adapters, llama_base, tmp_path):
    """`check` takes what `convert` reads: the PEFT directory gives the same findings as our file."""
    peft_dir = make_peft_adapter(llama_base, tmp_path / "peft", **ADAPTERS["patterns"])
    from_dir = check_adapter(peft_dir, TARGETS).to_dict()["targets"]
    from_file = check_adapter(adapters["patterns"], TARGETS).to_dict()["targets"]
    assert [(t["target"], t["verdict"], [f["rule"] for f in t["findings"]]) for t in from_dir] == \
        [(t["target"], t["verdict"], [f["rule"] for f in t["findings"]]) for t in from_file]
