"""Corpus rows for the diffusion readers and the single-file merge (kohya/LyCORIS SD, Flux, diffusers,
ComfyUI, PEFT trainable tokens) and for merges that would overflow fp16.

The tiny pipelines (tests/diffusion/models.py) are built once per process into a cache directory that
no case writes to; each case copies or crafts its adapter under its own ``tmp``.
"""
from __future__ import annotations

import copy
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .corpus import Case, Env

K = r"k\.safetensors"
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # an 8x8 (square) Linear
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 Conv2d, 8 -> 8
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 Conv2d, 8 -> 8
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@functools.lru_cache(maxsize=None)
def cache() -> Path:
    """sd15/sdxl/flux pipelines, an SD 1.x single file and the source LoRAs, built once per process."""
    from tests.diffusion.flux_files import flux_lora_file
    from tests.diffusion.kohya_files import sd_scripts_lora
    from tests.diffusion.ldm_files import save_sd15_single_file
    from tests.diffusion.models import build_components, save_pipeline
    root = Path(tempfile.mkdtemp(prefix="corpus-diffusion-"))
    for kind in ("sd15", "sdxl", "flux"):
        models = build_components(kind)
        save_pipeline(kind, root / kind, models)
        if kind == "flux":
            flux_lora_file(root / "flux.safetensors", models["transformer"])
            continue
        sd_scripts_lora(kind, models, root / f"{kind}.safetensors")
        if kind == "sd15":
            save_sd15_single_file(models, root / "sd15-single.safetensors")
            fp16 = {k: v.half() for k, v in load_file(str(root / "sd15-single.safetensors")).items()}
            save_file(fp16, str(root / "sd15-single-fp16.safetensors"))
    return root


def kohya_edit(edit, *, source: str = "sd15", base: str | None = "sd15", extra: tuple = ()):
    """Convert a damaged copy of a kohya file (``edit(tensors)`` changes it in place)."""
    def build(env: Env):
        tensors = load_file(str(cache() / f"{source}.safetensors"))
        edit(tensors)
        path = env.tmp / "k.safetensors"
        save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
        return ["convert", path, env.tmp / "out.safetensors", *(["--base", cache() / base] if base else []), *extra]
    return build


def put(**leaves):
    """Replace a module's leaves: ``put(name={"leaf": tensor or None})`` (None removes the leaf)."""
    def edit(t):
        for name, parts in leaves.items():
            for leaf, value in parts.items():
                t.pop(f"{name}.{leaf}", None)
                if value is not None:
                    t[f"{name}.{leaf}"] = value
    return edit


def lora_leaves(down: torch.Tensor, up: torch.Tensor, alpha: float = 1.0) -> dict:
    return {"lora_down.weight": down.half(), "lora_up.weight": up.half(), "alpha": torch.tensor(alpha).half()}


def no_lora() -> dict:
    return {"lora_down.weight": None, "lora_up.weight": None}


def both_clip_spellings(t):
    for key in [k for k in t if k.startswith(TE_Q)]:
        t[key.replace("lora_te_text_model_encoder", "lora_te_encoder")] = t[key].clone()


def peft_spelling_in_kohya_file(t):
    t[f"{Q}.lora_A.weight"] = t.pop(f"{Q}.lora_down.weight")
    t[f"{Q}.lora_B.weight"] = t.pop(f"{Q}.lora_up.weight")


def adapterfmt_of(source: str, base: str, env: Env, edit=None) -> Path:
    """The kohya file ``source`` (optionally edited) converted to adapterfmt against ``base``."""
    import adapterfmt
    tensors = load_file(str(cache() / f"{source}.safetensors"))
    if edit is not None:
        edit(tensors)
    src = env.tmp / "src.safetensors"
    save_file(tensors, str(src))
    out = env.tmp / "a.safetensors"
    adapterfmt.convert(src, out, base=cache() / base)
    src.unlink()
    return out


def huge_q(t):
    """ΔW of ~1e5 on one 8x8 weight: finite in fp32, beyond fp16's 65504."""
    t[f"{Q}.lora_down.weight"] = torch.full((4, 8), 200.0).half()
    t[f"{Q}.lora_up.weight"] = torch.full((8, 4), 200.0).half()
    t[f"{Q}.alpha"] = torch.tensor(4.0).half()


def merge_case(source: str, adapter_base: str, base, edit=None, extra: tuple = ()):
    def build(env: Env):
        adapter = adapterfmt_of(source, adapter_base, env, edit)
        out = env.tmp / ("merged.safetensors" if str(base).endswith(".safetensors") else "merged")
        return ["merge", "--base", cache() / base, "--adapter", adapter, "--out", out, *extra]
    return build


def two_modules_one_weight(env: Env):
    """An adapter converted without a base keeps both CLIP spellings apart; crafted by renaming one module."""
    import adapterfmt
    from adapterfmt import read_adapter, write_adapter
    src = env.tmp / "src.safetensors"
    shutil.copy(cache() / "sd15.safetensors", src)
    mid = env.tmp / "mid.safetensors"
    adapterfmt.convert(src, mid)
    adapter = read_adapter(mid)
    modules = adapter.manifest.modules
    old = "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"
    twin = "text_encoder.encoder.layers.0.self_attn.k_proj"
    entry = copy.deepcopy(modules[old])
    for role, ref in entry.tensors.items():
        ref.name = ref.name.replace("text_model.encoder", "encoder")
        adapter.tensors[ref.name] = adapter.tensors[modules[old].tensors[role].name].clone()
    entry.base_weight = entry.base_weight.replace("text_model.encoder", "encoder")
    modules[twin] = entry
    out = env.tmp / "a.safetensors"
    write_adapter(adapter, out)
    src.unlink(), mid.unlink()
    return ["merge", "--base", cache() / "sd15-single.safetensors", "--adapter", out, "--out",
            env.tmp / "merged.safetensors"]


def flux_edit(edit, base: bool = True):
    def build(env: Env):
        tensors = load_file(str(cache() / "flux.safetensors"))
        edit(tensors)
        path = env.tmp / "f.safetensors"
        save_file(tensors, str(path))
        return ["convert", path, env.tmp / "out.safetensors", *(["--base", cache() / "flux"] if base else [])]
    return build


FQKV = "lora_unet_double_blocks_0_img_attn_qkv"


def flux_rows(t):
    t[f"{FQKV}.lora_up.weight"] = t[f"{FQKV}.lora_up.weight"][:-1].clone()


def flux_other_block(t):
    for key in [k for k in t if "double_blocks_0_img_attn_proj" in k]:
        t[key.replace("double_blocks_0", "double_blocks_7")] = t[key].clone()


def diffusers_unknown_component(env: Env):
    import adapterfmt
    src = env.tmp / "src.safetensors"
    shutil.copy(cache() / "sd15.safetensors", src)
    mid, dif = env.tmp / "mid.safetensors", env.tmp / "d.safetensors"
    adapterfmt.convert(src, mid, base=cache() / "sd15")
    adapterfmt.convert(mid, dif, to="diffusers")
    tensors = load_file(str(dif))
    for key in [k for k in tensors if k.startswith("text_encoder.")][:2]:
        tensors[key.replace("text_encoder.", "text_encoder_3.")] = tensors[key].clone()
    save_file(tensors, str(dif), metadata={"format": "pt"})
    src.unlink(), mid.unlink()
    return ["convert", dif, env.tmp / "out.safetensors", "--base", cache() / "sd15"]


CQ = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"


def comfyui_edit(edit):
    def build(env: Env):
        from tests.diffusion.comfyui_files import comfyui_lora
        path = env.tmp / "c.safetensors"
        comfyui_lora(_sd15_models(), path)
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata={"software": "ComfyUI"})
        return ["convert", path, env.tmp / "out.safetensors", "--base", cache() / "sd15"]
    return build


def comfyui_twin(t):
    for leaf in ("lora_down.weight", "lora_up.weight", "alpha"):
        t[f"{CQ.replace('blocks.0', 'blocks_0')}.{leaf}"] = t[f"{CQ}.{leaf}"].clone()


def comfyui_rank(t):
    t[f"{CQ}.lora_up.weight"] = r((8, 5)).half()


def diffusers_metadata(edit):
    """The SD 1.5 LoRA written by our diffusers writer, its ``lora_adapter_metadata`` edited."""
    def build(env: Env):
        import adapterfmt
        from safetensors import safe_open
        src = env.tmp / "src.safetensors"
        shutil.copy(cache() / "sd15.safetensors", src)
        mid, dif = env.tmp / "mid.safetensors", env.tmp / "d.safetensors"
        adapterfmt.convert(src, mid, base=cache() / "sd15")
        adapterfmt.convert(mid, dif, to="diffusers")
        with safe_open(str(dif), framework="pt") as handle:
            metadata = dict(handle.metadata())
        flat = json.loads(metadata["lora_adapter_metadata"])
        edit(flat)
        metadata["lora_adapter_metadata"] = json.dumps(flat).replace('"NAN"', "NaN")
        save_file(load_file(str(dif)), str(dif), metadata=metadata)
        src.unlink(), mid.unlink()
        return ["convert", dif, env.tmp / "out.safetensors", "--base", cache() / "sd15"]
    return build


def comfyui_unknown_key(env: Env):
    from tests.diffusion.comfyui_files import comfyui_lora
    path = env.tmp / "c.safetensors"
    comfyui_lora(_sd15_models(), path)
    tensors = load_file(str(path))
    first = sorted(k for k in tensors if k.endswith("attn1.to_q.lora_down.weight"))[0].removesuffix(".lora_down.weight")
    for leaf in ("lora_down.weight", "lora_up.weight", "alpha"):
        tensors[f"{first.replace('attn1.to_q', 'attn1.to_qq')}.{leaf}"] = tensors.pop(f"{first}.{leaf}")
    save_file(tensors, str(path), metadata={"software": "ComfyUI"})
    return ["convert", path, env.tmp / "out.safetensors", "--base", cache() / "sd15"]


@functools.lru_cache(maxsize=None)
def _sd15_models():
    from tests.diffusion.models import build_components
    return build_components("sd15")


def trainable_tokens_out_of_range(env: Env):
    from peft import TrainableTokensConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(env.shared.base),
                           TrainableTokensConfig(token_indices=[3, 5, 7]))
    src = env.tmp / "tokens"
    model.save_pretrained(src)
    config = json.loads((src / "adapter_config.json").read_text())
    config["token_indices"] = [3, 5, 100000]
    (src / "adapter_config.json").write_text(json.dumps(config))
    return ["convert", src, env.tmp / "out.safetensors", "--base", env.shared.base]


def only_metadata(*extra):
    def build(env: Env):
        path = env.tmp / "m.safetensors"
        save_file({}, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
        return ["convert", path, env.tmp / "out.safetensors", *extra]
    return build


def r(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


CASES = [
    Case("LoHa module missing hada_w2_b", kohya_edit(put(**{Q: {**no_lora(), "hada_w1_a": r((8, 2)).half(),
                                                                "hada_w1_b": r((2, 8)).half(),
                                                                "hada_w2_a": r((8, 2)).half()}})), 1,
         rf"{K}: '{Q}' has \['hada_w1_a', 'hada_w1_b', 'hada_w2_a'\]: not one LoHa, LoKr or LoRA module"),
    Case("LoHa Tucker core t1 without t2", kohya_edit(put(**{CONV: {
        **{f"hada_w{h}_{s}": r((2, 8)).half() for h in (1, 2) for s in "ab"},
        "hada_t1": r((2, 2, 3, 3)).half(), "alpha": torch.tensor(2.0).half()}})), 1,
         rf"{K}: '{CONV}' has \['hada_t1', 'hada_w1_a', 'hada_w1_b', 'hada_w2_a', 'hada_w2_b'\]: not one LoHa, LoKr "
         "or LoRA module"),
    Case("LoCon lora_mid on a 1x1 conv", kohya_edit(put(**{PROJ_IN: {
        **lora_leaves(r((2, 8, 1, 1)), r((8, 2, 1, 1))), "lora_mid.weight": r((2, 2, 1, 1)).half()}})), 1,
         rf"{K}: '{PROJ_IN}' \(LyCORIS LoCon \(Tucker\), conv2d\): .*Tucker cores need a conv2d layer with a kernel "
         r"larger than 1x1"),
    Case("LoCon lora_mid on a Linear layer", kohya_edit(put(**{Q: {
        **lora_leaves(r((2, 8)), r((8, 2))), "lora_mid.weight": r((2, 2)).half()}})), 1,
         rf"{K}: '{Q}': lora_down\.weight \[2, 8\], lora_mid\.weight \[2, 2\], lora_up\.weight \[8, 2\] are neither a "
         r"Linear \(all 2-D\) nor a Conv2d"),
    Case("LoKr half that is 1-D (no --base)", kohya_edit(put(**{Q: {
        **no_lora(), "lokr_w1": r((2,)).half(), "lokr_w2": r((4, 4)).half()}}), base=None), 1,
         rf"{K}: '{Q}': lokr_w1 float16 \[2\] is neither 2-D \(Linear\) nor 4-D \(Conv2d\); the file is damaged"),
    Case("diffusion LoRA of rank 0", kohya_edit(put(**{Q: lora_leaves(r((0, 8)), r((8, 0)))})), 1,
         rf"{K}: '{Q}': lora_down\.weight float16 \[0, 8\] has an empty dimension \(rank 0\?\)"),
    Case("diffusion LoRA with integer factors", kohya_edit(put(**{Q: {
        "lora_down.weight": torch.ones(4, 8, dtype=torch.int32), "lora_up.weight": torch.ones(8, 4, dtype=torch.int32)}})),
         1, rf"{K}: '{Q}': lora_down\.weight int32 \[4, 8\] is not floating point"),
    Case("diffusion LoRA rank mismatch down/up", kohya_edit(put(**{Q: lora_leaves(r((4, 8)), r((8, 5)))})), 1,
         rf"{K}: '{Q}' \(LoRA / LoCon, linear\): .*lora_B has shape \[8, 5\], expected \[8, 4\]"),
    Case("diffusion LoRA wider than the base weight", kohya_edit(put(**{Q: lora_leaves(r((4, 11)), r((8, 4)))})), 1,
         rf"{K}: '{Q}': the LoRA / LoCon tensors give a \[8, 11\] weight, the base's is \[8, 8\]; check --base"),
    Case("diffusion LoRA alpha inf", kohya_edit(put(**{Q: {"alpha": torch.tensor(float("inf")).half()}})), 1,
         rf"{K}: '{Q}': alpha \[\] is not one finite number; the file is damaged"),
    Case("diffusion LoRA alpha 0 (consumers disagree)", kohya_edit(put(**{Q: {"alpha": torch.tensor(0.0).half()}})),
         1, rf"{K}: '{Q}': alpha is 0, which sd-scripts and LyCORIS read as alpha = rank .* diffusers, ComfyUI and "
            "A1111 as scale 0; the consumers disagree"),
    Case("diffusion LoRA alpha 0 without --base", kohya_edit(put(**{Q: {"alpha": torch.tensor(0.0).half()}}),
                                                             base=None), 1, rf"{K}: '{Q}': alpha is 0"),
    Case("diffusion LoRA negative alpha reads", kohya_edit(put(**{Q: {"alpha": torch.tensor(-2.0).half()}})), 0,
         r"kohya -> adapterfmt: \d+ module\(s\), overall lossless", creates=("out.safetensors",)),
    Case("dora_scale of the wrong length", kohya_edit(put(**{Q: {"dora_scale": torch.ones(9, 1).half()}})), 1,
         rf"{K}: '{Q}': dora_scale has shape \[9, 1\], neither \(out, 1, …\) nor \(1, in, …\) of a \[8, 8\] weight"),
    Case("dora_scale 1-d on a square layer (axis ambiguous)", kohya_edit(put(**{Q: {"dora_scale": torch.ones(8).half()}})),
         1, rf"{K}: '{Q}': dora_scale has shape \[8\], neither \(out, 1, …\) nor \(1, in, …\)"),
    Case("dora_scale on a LoHa module", kohya_edit(put(**{Q: {
        **no_lora(), **{f"hada_w{h}_{s}": r((8, 2) if s == "a" else (2, 8)).half() for h in (1, 2) for s in "ab"},
        "dora_scale": torch.ones(8, 1).half()}})), 1,
         rf"{K}: '{Q}': dora_scale on a LyCORIS LoHa module is not supported; DoRA is read on plain LoRA/LoCon"),
    Case("both CLIP spellings of one module", kohya_edit(both_clip_spellings), 1,
         rf"{K}: '(lora_te_text_model_encoder|lora_te_encoder)_layers_0_self_attn_q_proj' and "
         r"'.*' are the same module text_encoder\..*; the file is ambiguous"),
    Case("both CLIP spellings of one module without --base", kohya_edit(both_clip_spellings, base=None), 1,
         rf"{K}: .* are the same module text_encoder\.text_model\.encoder\.layers\.0\.self_attn\.q_proj; the file is "
         "ambiguous"),
    Case("lora_A spelling in a kohya file", kohya_edit(peft_spelling_in_kohya_file), 1,
         rf"{K}: key '{Q}\.lora_A\.weight' is not a kohya LoRA tensor; 1 more: .*lora_B\.weight"),
    Case("LoHa and LoKr leaves in one module", kohya_edit(put(**{Q: {
        **no_lora(), **{f"hada_w{h}_{s}": r((8, 2) if s == "a" else (2, 8)).half() for h in (1, 2) for s in "ab"},
        "lokr_w1": torch.ones(2, 2).half()}})), 1,
         rf"{K}: '{Q}' has \[.*'hada_w2_b', 'lokr_w1'\]: not one LoHa, LoKr or LoRA module"),
    Case("full diff_b without diff", kohya_edit(put(**{PROJ_IN: {"diff_b": torch.zeros(8).half()}})), 1,
         rf"{K}: '{PROJ_IN}' has \['diff_b'\]: a full module is diff with an optional diff_b"),
    Case("Flux fused qkv rows not divisible", flux_edit(flux_rows), 1,
         rf"f\.safetensors: '{FQKV}': lora_up has 47 rows, which do not split into .*to_q, .*to_k, .*to_v"),
    Case("Flux file with one part missing", flux_edit(lambda t: t.pop(f"{FQKV}.lora_up.weight")), 1,
         rf"f\.safetensors: '{FQKV}' lacks its down \(A\) or up \(B\) matrix; the file is incomplete"),
    Case("Flux LoRA of rank 0", flux_edit(lambda t: t.update({
        f"{FQKV}.lora_down.weight": torch.zeros(0, 16).bfloat16(), f"{FQKV}.lora_up.weight": torch.zeros(48, 0).bfloat16()})),
         1, rf"f\.safetensors: '{FQKV}': down \[0, 16\] / up \[48, 0\] are not a Linear low-rank pair"),
    Case("Flux alpha 0", flux_edit(lambda t: t.__setitem__(f"{FQKV}.alpha", torch.tensor(0.0).bfloat16())), 1,
         rf"f\.safetensors: '{FQKV}': alpha is 0, which sd-scripts reads as alpha = rank"),
    Case("Flux block the base does not have", flux_edit(flux_other_block), 1,
         r"f\.safetensors: 'lora_unet_double_blocks_7_img_attn_proj': part transformer_blocks\.7\.attn\.to_out\.0 is "
         r"\[16, 16\] here, the base has no transformer_blocks\.7\.attn\.to_out\.0"),
    Case("diffusers file with an unknown component", diffusers_unknown_component, 1,
         r"sd15: the base pipeline has no component 'text_encoder_3' \(it has text_encoder, unet\)"),
    Case("diffusers lora_alpha NaN", diffusers_metadata(lambda m: m.update({"unet.lora_alpha": "NAN"})), 1,
         r"d\.safetensors: .*: lora_alpha nan in lora_adapter_metadata is not a finite number; the file is damaged"),
    Case("diffusers lora_alpha a string", diffusers_metadata(lambda m: m.update({"unet.lora_alpha": "abc"})), 1,
         r"d\.safetensors: .*: lora_alpha 'abc' in lora_adapter_metadata is not a finite number"),
    Case("diffusers rank_pattern a list", diffusers_metadata(lambda m: m.update({"unet.rank_pattern": [1]})), 1,
         r"d\.safetensors: lora_adapter_metadata field unet\.rank_pattern is list, not an object"),
    Case("diffusers alpha_pattern bad regex", diffusers_metadata(lambda m: m.update({"unet.alpha_pattern": {"q(": 2}})),
         1, r"d\.safetensors: lora_adapter_metadata field unet\.alpha_pattern: 'q\(' is not a regular expression"),
    Case("ComfyUI key matching no module", comfyui_unknown_key, 1,
         r"c\.safetensors: 1 name\(s\) match no module of the base \(first: diffusion_model\.input_blocks\.1\.1\."
         r"transformer_blocks\.0\.attn1\.to_qq\)"),
    Case("ComfyUI names equal once dots become underscores", comfyui_edit(comfyui_twin), 1,
         r"c\.safetensors: 'diffusion_model\.input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.to_q' and "
         r"'diffusion_model\.input_blocks\.1\.1\.transformer_blocks_0\.attn1\.to_q' are the same module once dots "
         "become underscores; the file is ambiguous"),
    Case("ComfyUI rank mismatch names the file's key", comfyui_edit(comfyui_rank), 1,
         r"c\.safetensors: 'diffusion_model\.input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.to_q' \(LoRA / LoCon, "
         r"linear\): .*lora_B has shape \[8, 5\], expected \[8, 4\]"),
    Case("single-file merge: SDXL LoRA into an SD 1.5 file", merge_case("sdxl", "sdxl", "sd15-single.safetensors"), 1,
         r"sd15-single\.safetensors: the base pipeline has no component 'text_encoder_2' \(it has text_encoder, "
         r"unet\); the adapter was made for another kind of pipeline"),
    Case("single-file merge: SD 1.5 LoRA into an SD 1.5 file", merge_case("sd15", "sd15", "sd15-single.safetensors"), 0,
         r"merged \d+ of \d+ tensors", creates=("merged.safetensors",)),
    Case("single-file merge: two modules on one weight", two_modules_one_weight, 2,
         r"a\.safetensors: modules text_encoder\.(text_model\.)?encoder\.layers\.0\.self_attn\.k_proj and .* both "
         r"target .*; the adapter is ambiguous"),
    Case("merge overflowing fp16 (--dtype fp16)", merge_case("sd15", "sd15", "sd15/unet", huge_q, ("--dtype", "fp16")), 1,
         r"merged tensor 'down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q\.weight' has 64 inf/NaN "
         r"value\(s\) after rounding to float16 .*; merge with --dtype fp32 or bf16"),
    Case("single-file merge overflowing an fp16 file",
         merge_case("sd15", "sd15", "sd15-single-fp16.safetensors", huge_q, ("--force",)), 1,
         r"sd15-single-fp16\.safetensors: merged tensor 'model\.diffusion_model\.input_blocks\.1\.1\.transformer_blocks"
         r"\.0\.attn1\.to_q\.weight' has 64 inf/NaN value\(s\) after rounding to float16"),
    Case("trainable tokens index out of range", trainable_tokens_out_of_range, 1,
         r"tokens: module 'model\.embed_tokens': token index 100000 is outside the weight's 128 rows"),
    Case("LoRA file with only metadata (--from diffusers)", only_metadata("--from", "diffusers"), 1,
         r"m\.safetensors: no LoRA tensors found; the file is empty"),
    Case("LoRA file with only metadata (auto-detect)", only_metadata(), 2,
         r"m\.safetensors: cannot tell which adapter format this is .*; pass --from FORMAT"),
]
