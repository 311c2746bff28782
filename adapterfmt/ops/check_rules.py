"""The consumer rules of ``adapterfmt check``, one table per target, each rule read from that consumer's
source (file and function in ``source``; versions and details in ``docs/consumers.md``).

A rule's predicate looks at :class:`~adapterfmt.ops.adapter_facts.AdapterFacts` only. Scale rules are
functions ``(facts, module) -> the scale the consumer applies``, compared with our per-module scale.
"""
from __future__ import annotations

import math
import re

from .adapter_facts import AdapterFacts
from .check_model import IGNORED, MISSCALED, OK, REFUSE, Rule

TARGETS = ("peft", "vllm", "sglang", "tgi", "llama.cpp", "mlx", "diffusers", "comfyui")
TARGET_ALIASES = {"llamacpp": "llama.cpp", "llama_cpp": "llama.cpp", "gguf": "llama.cpp", "mlx-lm": "mlx",
                  "mlx_lm": "mlx", "text-generation-inference": "tgi", "comfy": "comfyui"}

MERGE_FIX = "adapterfmt merge --base {base} --adapter {file} --out {out}"
VLLM_DEFAULT_MAX_RANK = 16
TGI_MIN_SGMV_RANK, TGI_SGMV_BLOCK = 8, 16
TGI_LAYER_TYPES = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def for_fix(target: str, to: str = "peft") -> str:
    """The ``convert --for`` command template for a target.

    Example:
        >>> for_fix("vllm")
        'adapterfmt convert {file} {out} --to peft --for vllm'
    """
    return "adapterfmt convert {file} {out} --to " + to + " --for " + target


def some(names: list[str], limit: int = 2) -> str:
    """``a, b and 3 more``: a short list of module names for a message.

    Example:
        >>> some(["q", "k", "v", "o"])
        'k, o and 2 more'
    """
    names = sorted(names)
    head = ", ".join(names[:limit])
    return head + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------ scale rules (what the consumer applies)
def global_scale(facts: AdapterFacts, module: dict) -> float:
    """vLLM / TGI: one scale from the config's global r and lora_alpha (rsLoRA honoured), for every module."""
    c = facts.config
    return c.lora_alpha / math.sqrt(c.r) if c.use_rslora else c.lora_alpha / c.r


def global_scale_no_rslora(facts: AdapterFacts, module: dict) -> float:
    """SGLang: lora_alpha / r from the config; use_rslora is not read."""
    return facts.config.lora_alpha / facts.config.r


def llamacpp_scale(facts: AdapterFacts, module: dict) -> float:
    """llama.cpp via convert_lora_to_gguf.py: the config's scalar lora_alpha over the tensor's own rank."""
    return facts.config.lora_alpha / module["rank"]


def tgi_padded_rank(rank: int) -> int:
    """The rank TGI's pad_rank gives a LoRA (world size 1, SGMV kernels present).

    Example:
        >>> tgi_padded_rank(4), tgi_padded_rank(8), tgi_padded_rank(24), tgi_padded_rank(32)
        (8, 8, 32, 32)
    """
    if rank <= TGI_MIN_SGMV_RANK:
        return TGI_MIN_SGMV_RANK
    return -(-rank // TGI_SGMV_BLOCK) * TGI_SGMV_BLOCK


def _misscaled_message(facts: AdapterFacts, rule, why: str) -> str:
    bad = facts.misscaled(rule)
    name = sorted(bad)[0]
    ours, theirs = bad[name]
    return f"{why}: {len(bad)} module(s) get a different scale, e.g. {name} {theirs:.6g} instead of {ours:.6g}"


# ------------------------------------------------------------------ rules shared by several targets
def _has_payload(kind: str):
    return lambda f: bool(f.payload_kinds.get(kind))


def non_lora_rule(target: str, fix: str) -> Rule:
    return Rule("non_lora_method", OK, lambda f: bool(f.non_lora_methods),
                lambda f: f"methods {', '.join(f.non_lora_methods)} are not LoRA: the export materialises them as "
                          "LoRA (exact up to fp32 rounding; OLoRA/PiSSA/SORSA become rank 2r)", fix,
                source="adapterfmt conversion (convert_methods)")


def no_lora_form_rule(target: str) -> Rule:
    return Rule("no_lora_form", REFUSE, lambda f: bool(f.no_lora_form_methods),
                lambda f: f"methods {', '.join(f.no_lora_form_methods)} have no exact LoRA form (ΔW depends on the "
                          f"base, is full rank, or replaces rows): no {target} adapter file computes them",
                MERGE_FIX, exact_fix=False, source="adapterfmt method descriptors (converts_to)")


def dense_rule(target: str) -> Rule:
    return Rule("dense_method", REFUSE, lambda f: bool(f.dense_methods),
                lambda f: f"method {', '.join(f.dense_methods)} (a dense ΔW) has no LoRA form and no place in a "
                          f"{target} adapter", MERGE_FIX, exact_fix=False,
                source="adapterfmt methods/full.py (no conversion to lora)")


def fused_rule(target: str) -> Rule:
    return Rule("fused_block", REFUSE, lambda f: bool(f.fused),
                lambda f: f"{some(f.fused)} adapt a block of a fused weight; {target} keys LoRA by module name",
                MERGE_FIX, exact_fix=False, source="adapterfmt PEFT writer (adapter_to_peft)")


def bias_rule(target: str) -> Rule:
    return Rule("bias_delta", REFUSE, _has_payload("bias_delta"),
                lambda f: f"bias deltas ({some(f.payload_kinds['bias_delta'])}) have no {target} LoRA representation",
                MERGE_FIX, exact_fix=False, source="adapterfmt PEFT writer (adapter_to_peft)")


# ------------------------------------------------------------------ PEFT (peft 0.21.2, installed)
PEFT_SRC = "peft 0.21.2 src/peft/tuners/lora/{config.py LoraConfig, layer.py LoraLayer.update_layer}"
PEFT_RULES = (
    Rule("peft_features", OK, lambda f: True,
         lambda f: "PEFT applies per-module rank/alpha (rank_pattern/alpha_pattern), rsLoRA, DoRA, embeddings "
                   "and modules_to_save exactly as stored", "adapterfmt convert {file} {out} --to peft", source=PEFT_SRC),
    Rule("mixed_methods", REFUSE, lambda f: {"lora", "dora"} <= set(f.methods),
         lambda f: "one PEFT config has one use_dora flag, but the adapter mixes LoRA and DoRA modules",
         MERGE_FIX, exact_fix=False, source="peft LoraConfig.use_dora (one flag per adapter)"),
    Rule("mixed_fan_in_fan_out", REFUSE, lambda f: bool(f.conv1d) and
         len(f.conv1d) < len([m for m in f.modules.values() if m["layer"] != "embedding"]),
         lambda f: "one PEFT config has one fan_in_fan_out flag, but the adapter mixes Linear and Conv1D targets",
         MERGE_FIX, exact_fix=False, source="peft LoraConfig.fan_in_fan_out"),
    non_lora_rule("peft", "adapterfmt convert {file} {out} --to peft"), dense_rule("peft"),
    fused_rule("PEFT"),
    bias_rule("PEFT"),
)

# ------------------------------------------------------------------ vLLM
VLLM_HELPER = "vllm/lora/peft_helper.py PEFTHelper"
VLLM_FIX = for_fix("vllm")
VLLM_RULES = (
    Rule("dora", REFUSE, lambda f: "dora" in f.methods,
         lambda f: "use_dora: vLLM refuses with 'vLLM does not yet support DoRA.'", MERGE_FIX, exact_fix=False,
         source=f"{VLLM_HELPER}._validate_features; vllm/lora/lora_model.py LoRAModel.from_lora_tensors"),
    Rule("modules_to_save", REFUSE, _has_payload("modules_to_save"),
         lambda f: f"modules_to_save ({some(f.payload_kinds['modules_to_save'])}): vLLM refuses with "
                   "'vLLM only supports modules_to_save being None.'", MERGE_FIX, exact_fix=False,
         source=f"{VLLM_HELPER}._validate_features"),
    Rule("rank_limit", REFUSE, lambda f: f.max_rank > VLLM_DEFAULT_MAX_RANK,
         lambda f: f"rank {f.max_rank} > vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}: refused "
                   "('LoRA rank ... is greater than max_lora_rank' for the config r; a larger tensor does not fit "
                   f"the LoRA buffers) unless the server runs with --max-lora-rank >= {f.max_rank}",
         "vllm serve {base} --enable-lora --max-lora-rank {max_rank}", source=f"{VLLM_HELPER}.validate_legal"),
    Rule("patterns_ignored", MISSCALED, lambda f: f.config is not None and bool(f.misscaled(global_scale)),
         lambda f: _misscaled_message(f, global_scale, "vLLM drops rank_pattern/alpha_pattern (from_dict keeps "
                                      "only its own fields) and scales every module by lora_alpha/r"),
         VLLM_FIX, source=f"{VLLM_HELPER}.from_dict, __post_init__; vllm/lora/lora_weights.py "
                          "LoRALayerWeights.from_config/optimize"),
    Rule("rslora", OK, lambda f: bool(f.rslora_modules),
         lambda f: "use_rslora is honoured (lora_alpha/sqrt(r)), with the config's global r",
         VLLM_FIX, source=f"{VLLM_HELPER}.__post_init__"),
    Rule("embeddings", OK, lambda f: bool(f.embeddings or f.lm_head),
         lambda f: f"{some(f.embeddings + f.lm_head)}: loads only where the model class lists them as LoRA "
                   "modules (else 'expected target modules in ... but received ...'); the embedding A must "
                   "span the base vocabulary", VLLM_FIX,
         source="vllm/lora/lora_model.py LoRAModel.from_local_checkpoint.check_unexpected_modules, "
                "from_lora_tensors"),
    Rule("dtype", OK, lambda f: True,
         lambda f: "vLLM casts lora_A/lora_B to the model dtype and multiplies the scale into lora_B in that "
                   "dtype", VLLM_FIX, source="vllm/lora/lora_model.py from_lora_tensors; lora_weights.py optimize"),
    non_lora_rule("vllm", VLLM_FIX), dense_rule("vllm"),
    no_lora_form_rule("vllm"), fused_rule("vLLM"), bias_rule("vLLM"),
)

# ------------------------------------------------------------------ SGLang
SGL = "python/sglang/srt/lora/"
SGLANG_FIX = for_fix("sglang")
SGLANG_RULES = (
    Rule("dora", REFUSE, lambda f: "dora" in f.methods,
         lambda f: "use_dora: SGLang refuses ('LoRA serving currently doesn't support DoRA adapters')",
         MERGE_FIX, exact_fix=False, source=f"{SGL}lora_manager.py LoRAManager.validate_new_adapter"),
    Rule("patterns_refused", REFUSE, lambda f: bool(f.pattern_modules()),
         lambda f: f"{len(f.pattern_modules())} module(s) need rank_pattern/alpha_pattern entries (e.g. "
                   f"{some(f.pattern_modules(), 1)}); current SGLang refuses any pattern entry that changes a "
                   "module's rank or alpha (older releases ignored them and mis-scaled)", SGLANG_FIX,
         source=f"{SGL}lora_config.py LoRAConfig.rank_overrides/alpha_overrides; validate_new_adapter"),
    Rule("rslora_ignored", MISSCALED, lambda f: f.config is not None and f.config.use_rslora
         and bool(f.misscaled(global_scale_no_rslora)),
         lambda f: _misscaled_message(f, global_scale_no_rslora, "SGLang does not read use_rslora and scales "
                                      "by lora_alpha/r"), SGLANG_FIX, source=f"{SGL}lora.py LoRAAdapter.__init__"),
    Rule("rank_limit", OK, lambda f: True,
         lambda f: f"rank {f.max_rank}: must be <= --max-lora-rank when set (else inferred from the adapters "
                   "given at startup) and every target module within --lora-target-modules",
         SGLANG_FIX, source=f"{SGL}lora_manager.py validate_new_adapter (memory_pool.can_support)"),
    Rule("modules_to_save", IGNORED, _has_payload("modules_to_save"),
         lambda f: f"modules_to_save ({some(f.payload_kinds['modules_to_save'])}): only lora_A/lora_B of target "
                   "modules are copied into SGLang's LoRA memory pool; full weights are not applied",
         MERGE_FIX, exact_fix=False, source=f"{SGL}lora.py LoRAAdapter.initialize_weights; mem_pool.py"),
    non_lora_rule("sglang", SGLANG_FIX), dense_rule("sglang"),
    no_lora_form_rule("sglang"), fused_rule("SGLang"), bias_rule("SGLang"),
)

# ------------------------------------------------------------------ TGI
TGI = "server/text_generation_server/"
TGI_FIX = for_fix("tgi")


TGI_NAME_RE = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def _tgi_unmapped_names(f: AdapterFacts) -> list[str]:
    """LoRA modules TGI never applies: outside q/k/v/o/gate/up/down of model.layers.N (embeddings, and
    lm_head, which the lookup maps but get_model_with_lora_adapters never prepares)."""
    return [n for n in f.lora_modules if not TGI_NAME_RE.match(n)]


def _tgi_partial_types(f: AdapterFacts) -> list[str]:
    """TGI layer types present in some blocks only (compared with the base's layer count when known)."""
    n_layers = f.base_config.get("num_hidden_layers")
    return [f"{path} (layers {sorted(layers)})" for path, layers in sorted(f.layer_types().items())
            if path in TGI_LAYER_TYPES and len(layers) != int(n_layers or max(layers) + 1)]


def _tgi_padding_changes(f: AdapterFacts) -> bool:
    return f.config is not None and len(f.layer_types()) > 1 and tgi_padded_rank(f.config.r) != f.config.r


TGI_RULES = (
    Rule("dora_ignored", IGNORED, lambda f: "dora" in f.methods,
         lambda f: "DoRA: TGI maps only lora_A/lora_B weights; the magnitudes are dropped, so it runs plain LoRA",
         MERGE_FIX, exact_fix=False, source=f"{TGI}adapters/lora.py LoraConfig.map_weights_for_model"),
    Rule("modules_to_save", IGNORED, _has_payload("modules_to_save"),
         lambda f: f"modules_to_save ({some(f.payload_kinds['modules_to_save'])}) are never mapped onto the model",
         MERGE_FIX, exact_fix=False, source=f"{TGI}adapters/lora.py LoraConfig.map_weights_for_model"),
    Rule("unmapped_modules", IGNORED, lambda f: bool(_tgi_unmapped_names(f)),
         lambda f: f"not applied: {some(_tgi_unmapped_names(f), 3)}; TGI adapts only q/k/v/o/gate/up/down_proj "
                   "of model.layers.N (lm_head only draws an 'unused adapter weights' warning)", MERGE_FIX,
         exact_fix=False, source=f"{TGI}utils/adapter.py build_layer_weight_lookup; adapters/lora.py "
                                 "map_weights_for_model; models/__init__.py get_model_with_lora_adapters"),
    Rule("partial_layers", IGNORED, lambda f: bool(_tgi_partial_types(f)),
         lambda f: f"{some(_tgi_partial_types(f), 2)}: TGI drops a layer type entirely when any layer lacks it "
                   "(--for tgi adds zero LoRA to the missing layers; needs the layer count from --base)",
         TGI_FIX, source=f"{TGI}adapters/lora.py LoraWeights.prepare_weights ('return None'); "
                         "models/__init__.py get_model_with_lora_adapters"),
    Rule("mixed_rank_in_type", REFUSE, lambda f: any(len(r) > 1 for r in f.ranks_by_layer_type().values()),
         lambda f: "a layer type has modules of different ranks; TGI stacks one type across layers "
                   "(torch.stack fails)", TGI_FIX, source=f"{TGI}adapters/lora.py LoraWeights.__init__"),
    Rule("patterns_ignored", MISSCALED, lambda f: f.config is not None and bool(f.misscaled(global_scale)),
         lambda f: _misscaled_message(f, global_scale, "TGI reads r, lora_alpha and use_rslora only "
                                      "(rank_pattern/alpha_pattern ignored)"),
         TGI_FIX, source=f"{TGI}adapters/lora.py LoraConfig.load, get_scaling_factor"),
    Rule("rank_padding", MISSCALED, _tgi_padding_changes,
         lambda f: f"rank {f.config.r} is padded to {tgi_padded_rank(f.config.r)} for the SGMV kernels and "
                   "prepare_weights writes the padded rank back into the config, so every layer type after the "
                   f"first is scaled by lora_alpha/{tgi_padded_rank(f.config.r)}",
         TGI_FIX, source=f"{TGI}adapters/lora.py LoraWeights.prepare_weights (config.r = padded_rank); "
                         "utils/sgmv.py pad_rank; models/__init__.py get_model_with_lora_adapters (one "
                         "config for q, k, v, o, gate, up, down in that order)"),
    Rule("rslora", OK, lambda f: bool(f.rslora_modules),
         lambda f: "use_rslora is honoured (lora_alpha/sqrt(r)) with the global r", TGI_FIX,
         source=f"{TGI}adapters/lora.py get_scaling_factor"),
    non_lora_rule("tgi", TGI_FIX), dense_rule("tgi"),
    no_lora_form_rule("tgi"), fused_rule("TGI"), bias_rule("TGI"),
)

# ------------------------------------------------------------------ llama.cpp
LCPP = "llama.cpp (vendored in llama-cpp-python 0.3.36) "
GGUF_FIX = "adapterfmt convert {file} {out} --to gguf --base {base}"
LLAMACPP_RULES = (
    Rule("dora", REFUSE, lambda f: "dora" in f.methods,
         lambda f: "DoRA: convert_lora_to_gguf.py exits on lora_magnitude_vector ('Not a lora_A or lora_B "
                   "tensor') and the runtime accepts only .lora_a/.lora_b", MERGE_FIX, exact_fix=False,
         source=LCPP + "convert_lora_to_gguf.py LoraModel.get_tensors; src/llama-adapter.cpp"),
    Rule("modules_to_save", REFUSE, _has_payload("modules_to_save"),
         lambda f: f"modules_to_save ({some(f.payload_kinds['modules_to_save'])}): convert_lora_to_gguf.py "
                   "exits ('Embeddings is present in the adapter' for embed_tokens/lm_head)", MERGE_FIX,
         exact_fix=False, source=LCPP + "convert_lora_to_gguf.py LoraModel.get_tensors"),
    Rule("tied_head", REFUSE, lambda f: f.tied_embeddings and bool(f.lm_head or f.embeddings),
         lambda f: f"{some(f.lm_head + f.embeddings)} on a tied-embedding base: llama.cpp has no separate "
                   "output tensor to adapt (lm_head raises at conversion; an embed_tokens LoRA aborts at run time)",
         MERGE_FIX, exact_fix=False, source=LCPP + "convert_hf_to_gguf.py (tied output); src/llama-adapter.cpp"),
    Rule("scalar_alpha", MISSCALED, lambda f: f.config is not None and bool(f.misscaled(llamacpp_scale)),
         lambda f: _misscaled_message(f, llamacpp_scale, "convert_lora_to_gguf.py writes only the scalar "
                                      "lora_alpha (use_rslora and alpha_pattern are dropped); llama.cpp scales "
                                      "by alpha/rank with the rank read from each tensor"),
         GGUF_FIX, source=LCPP + "convert_lora_to_gguf.py LoraModel.set_gguf_parameters; src/llama-adapter.h "
                               "llama_adapter_lora_weight::get_scale"),
    Rule("gguf_export", OK, lambda f: True,
         lambda f: "adapterfmt's GGUF writer maps names per architecture and folds per-module scales into B "
                   "under one global alpha (fold error reported)", GGUF_FIX,
         source="adapterfmt formats/gguf_lora.py"),
    non_lora_rule("llama.cpp", GGUF_FIX), dense_rule("llama.cpp"),
    no_lora_form_rule("llama.cpp"), fused_rule("llama.cpp"), bias_rule("llama.cpp"),
)

# ------------------------------------------------------------------ MLX-LM (mlx_lm 0.32.2, installed)
MLX = "mlx_lm 0.32.2 tuner/utils.py "
MLX_FIX = "adapterfmt convert {file} {out} --to mlx"
MLX_RULES = (
    Rule("modules_to_save", REFUSE, _has_payload("modules_to_save"),
         lambda f: f"modules_to_save ({some(f.payload_kinds['modules_to_save'])}): load_adapters refuses any "
                   "tensor that is not lora_a/lora_b/m ('contains incompatible tensors')", MERGE_FIX,
         exact_fix=False, source=MLX + "load_adapters"),
    Rule("one_rank", OK, lambda f: len(f.ranks) > 1,
         lambda f: f"ranks {f.ranks}: mlx-lm has one rank (a wrong shape is refused); the MLX export zero-pads "
                   "to the largest rank, which is exact", MLX_FIX, source=MLX + "linear_to_lora_layers, load_adapters"),
    Rule("one_scale", OK, lambda f: len({m["scale"] for m in f.lora_modules.values()}) > 1,
         lambda f: "mlx-lm has one absolute scale; the MLX export folds the other scales into B (fp32, error "
                   "reported)", MLX_FIX, source=MLX + "linear_to_lora_layers (lora_parameters.scale)"),
    Rule("dora", OK, lambda f: "dora" in f.methods,
         lambda f: "DoRA loads as fine_tune_type 'dora' (magnitude .m, per output row as in PEFT)", MLX_FIX,
         source=MLX + "load_adapters; tuner/dora.py DoRALinear"),
    Rule("rslora", OK, lambda f: bool(f.rslora_modules),
         lambda f: "rsLoRA needs no flag: mlx-lm stores the absolute scale", MLX_FIX, source=MLX + "linear_to_lora_layers"),
    non_lora_rule("mlx", MLX_FIX), dense_rule("mlx"),
    no_lora_form_rule("mlx"), fused_rule("mlx-lm"), bias_rule("mlx-lm"),
)

# ------------------------------------------------------------------ diffusion loaders
LLM_NAME_RE = re.compile(r"^(model\.)?(layers|h|decoder\.layers|transformer\.h|gpt_neox\.layers)\.\d+\.")


def _llm_adapter(f: AdapterFacts) -> bool:
    arch = str(f.base_config.get("architectures") or "")
    return "CausalLM" in arch or "LMHeadModel" in arch or any(LLM_NAME_RE.match(n) for n in f.modules)


DIFFUSERS = "diffusers 0.42.1 "


def _alphas(f: AdapterFacts) -> set:
    """The distinct alpha = scale·rank values of the LoRA modules."""
    return {round(float(m["scale"]) * int(m["rank"]), 9) for m in f.modules.values()
            if m.get("scale") is not None and m.get("rank")}
KOHYA_FOR = "adapterfmt convert {file} {out} --to kohya --for "
DIFFUSERS_RULES = (
    Rule("not_a_pipeline_adapter", IGNORED, _llm_adapter,
         lambda f: "a causal-LM adapter: diffusers maps LoRA keys onto pipeline components (unet, transformer, "
                   "text encoders) only; unmatched keys raise 'Incompatible keys' or warn 'No LoRA keys "
                   "associated' and change nothing", None, exact_fix=False,
         source=DIFFUSERS + "loaders/lora_pipeline.py load_lora_weights; loaders/peft.py load_lora_adapter"),
    Rule("dora", REFUSE, lambda f: "dora" in f.methods and not f.kohya_dora,
         lambda f: "DoRA: no adapterfmt export writes a diffusers DoRA file", MERGE_FIX, exact_fix=False,
         source=DIFFUSERS + "loaders/lora_conversion_utils.py (dora_scale rename)"),
    Rule("dora_scale_ignored", IGNORED, lambda f: bool(f.kohya_dora),
         lambda f: f"kohya/LyCORIS dora_scale ({some(f.kohya_dora)}): diffusers drops every dora_scale key of an "
                   "SD/SDXL file with a warning ('It seems like you are using a DoRA checkpoint that is not "
                   "compatible') and applies the plain LoRA, so the weights differ; --to diffusers refuses it",
         MERGE_FIX, exact_fix=False,
         source=DIFFUSERS + "loaders/lora_conversion_utils.py _convert_non_diffusers_lora_to_diffusers"),
    Rule("payloads", REFUSE, lambda f: bool(f.payload_kinds) or bool(f.embeddings),
         lambda f: "modules_to_save / embedding LoRA: no place in a diffusers LoRA file", MERGE_FIX,
         exact_fix=False, source=DIFFUSERS + "utils/peft_utils.py get_peft_kwargs"),
    Rule("per_module_alphas", MISSCALED, lambda f: len(_alphas(f)) > 1,
         lambda f: "kohya files with per-module alphas: diffusers builds alpha_pattern keys that match no module "
                   "and PEFT ignores them, so every module gets the most common alpha (measured: outputs off by "
                   "up to 0.99 on a tiny SD 1.x); a diffusers-format file carries the exact alpha_pattern",
         "adapterfmt convert {file} {out} --to diffusers",
         source=DIFFUSERS + "loaders/lora_conversion_utils.py _convert_kohya_lora_to_diffusers; "
                            "utils/peft_utils.py get_peft_kwargs"),
    Rule("alphas", OK, lambda f: len(_alphas(f)) <= 1,
         lambda f: "one alpha for every module: diffusers reads it exactly (a file without alphas is read with "
                   "alpha = rank, scale 1)", "adapterfmt convert {file} {out} --to diffusers",
         source=DIFFUSERS + "utils/peft_utils.py get_peft_kwargs"),
    non_lora_rule("diffusers", "adapterfmt convert {file} {out} --to diffusers"), dense_rule("diffusers"),
    no_lora_form_rule("diffusers"),
)

COMFY = "ComfyUI comfy/weight_adapter/"
COMFYUI_RULES = (
    Rule("not_a_comfy_model", IGNORED, _llm_adapter,
         lambda f: "a causal-LM adapter: ComfyUI maps keys only onto the diffusion model / text encoders it "
                   "loaded; every other key is reported 'lora key not loaded' and skipped", None,
         exact_fix=False, source="ComfyUI comfy/lora.py model_lora_keys_unet/model_lora_keys_clip, load_lora"),
    Rule("dora", MISSCALED, lambda f: "dora" in f.methods,
         lambda f: "DoRA: for an output-axis magnitude ComfyUI divides by the norm of the base W instead of "
                   "W + ΔW (PEFT), and no adapterfmt export writes dora_scale", MERGE_FIX, exact_fix=False,
         source=COMFY + "base.py weight_decompose (@9c0cf36)"),
    Rule("payloads", REFUSE, lambda f: bool(f.payload_kinds) or bool(f.embeddings),
         lambda f: "modules_to_save / embedding LoRA: the kohya export has no place for them", MERGE_FIX,
         exact_fix=False, source="adapterfmt formats/kohya.py (require_linear)"),
    Rule("alphas", OK, lambda f: True,
         lambda f: "scale = .alpha / rank per module (1.0 without .alpha), patched in fp32; rsLoRA and "
                   "per-module alpha survive as alpha = scale*rank", KOHYA_FOR + "comfyui",
         source=COMFY + "lora.py LoRAAdapter.load/calculate_weight (@6fd406f)"),
    non_lora_rule("comfyui", KOHYA_FOR + "comfyui"), no_lora_form_rule("comfyui"),
    Rule("dense_method", OK, lambda f: bool(f.dense_methods),
         lambda f: "full (dense ΔW): the kohya export writes <name>.diff / .diff_b, which ComfyUI applies as weight "
                   "and bias patches", KOHYA_FOR + "comfyui", source="ComfyUI comfy/lora.py load_lora ('.diff')"),
)

RULES: dict[str, tuple[Rule, ...]] = {
    "peft": PEFT_RULES, "vllm": VLLM_RULES, "sglang": SGLANG_RULES, "tgi": TGI_RULES, "llama.cpp": LLAMACPP_RULES,
    "mlx": MLX_RULES, "diffusers": DIFFUSERS_RULES, "comfyui": COMFYUI_RULES,
}
