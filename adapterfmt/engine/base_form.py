"""The base form an adapter was trained against: QLoRA trains ΔW against dequant(quant(W)), not W.

The quantization is done by the real library (bitsandbytes on CPU), never re-implemented here,
and which weights it touches follows transformers' own rules (its skip list, its default
exclusion of the output embedding and tied weights), asked of the model built on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checkpoint.bnb_checkpoint import BnbCheckpoint, bnb_functional
from ..errors import UsageError
from ..format.dtypes import DTYPE_FROM_NAME
from ..format.manifest import BaseQuantization

#: ``--compute-dtype`` / ``--load-dtype`` spellings -> manifest dtype names.
FLAG_DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
#: transformers' ``bnb_4bit_compute_dtype`` spellings -> manifest dtype names.
TORCH_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
BNB_SCHEMES = ("nf4", "fp4", "int8")
#: bitsandbytes' Linear4bit default block size (transformers never changes it).
BNB_4BIT_BLOCK = 64
#: quantization_config.quant_method values we cannot reproduce on CPU (no dequantizer installs here).
UNSUPPORTED_METHODS = ("gptq", "awq", "aqlm", "eetq", "hqq", "quanto", "fbgemm_fp8", "fp8", "compressed-tensors",
                       "torchao", "bitnet", "vptq", "spqr", "higgs", "mxfp4", "fouroversix")
BASE_FORMS = ("trained", "original")


def bnb_form(scheme: str, compute_dtype: str | None = None, *, block_size: int | None = None,
             double_quant: bool = False, load_dtype: str | None = None,
             skip_modules: list[str] | None = None) -> BaseQuantization:
    """A bitsandbytes base form; defaults are ``BitsAndBytesConfig``'s (fp32 compute, block 64, no double quant).

    Example:
        >>> bnb_form("nf4", "bf16", double_quant=True).compute_dtype
        'BF16'
    """
    if scheme == "none":
        return BaseQuantization(scheme="none")
    if scheme not in BNB_SCHEMES:
        raise UsageError(f"--trained-on {scheme!r} is not a bitsandbytes scheme",
                         hint=f"use one of {', '.join(BNB_SCHEMES)} or none")
    default_compute = "fp16" if scheme == "int8" else "fp32"
    for flag, value in (("--compute-dtype", compute_dtype), ("--load-dtype", load_dtype)):
        if value is not None and value not in FLAG_DTYPES:
            raise UsageError(f"{flag} {value!r} is not a float dtype", hint=f"use one of {', '.join(FLAG_DTYPES)}")
    return BaseQuantization(
        scheme=scheme, block_size=(block_size or BNB_4BIT_BLOCK) if scheme != "int8" else None,
        compute_dtype=FLAG_DTYPES[compute_dtype or default_compute],
        weight_dtype=FLAG_DTYPES[load_dtype] if load_dtype else None,
        double_quant=bool(double_quant) if scheme != "int8" else None, skip_modules=skip_modules,
        library="bitsandbytes", library_version=_bnb_version())


def form_from_quantization_config(config: dict) -> BaseQuantization | None:
    """The base form a transformers ``quantization_config`` describes (None when there is none).

    GPTQ, AWQ and the other schemes no CPU dequantizer here reproduces are refused by name.

    Example:
        >>> form_from_quantization_config({"quant_method": "bitsandbytes", "load_in_4bit": True,
        ...     "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}).scheme
        'nf4'
    """
    if not config:
        return None
    method = str(config.get("quant_method", "")).lower()
    if method != "bitsandbytes":
        known = method in UNSUPPORTED_METHODS
        raise UsageError(f"the base is quantized with {method or 'an unnamed scheme'!r} (quantization_config."
                         "quant_method); adapterfmt cannot reproduce that form"
                         + ("" if known else " (unknown scheme)"),
                         hint="merge into the unquantized base with --base-form original, knowing that the "
                              "adapter was trained against the quantized weights")
    scheme = "int8" if config.get("load_in_8bit") else str(config.get("bnb_4bit_quant_type", "fp4"))
    compute = TORCH_DTYPE_NAMES.get(str(config.get("bnb_4bit_compute_dtype") or "float32").replace("torch.", ""))
    flag = {v: k for k, v in FLAG_DTYPES.items()}.get(compute or "F32")
    return bnb_form(scheme, None if scheme == "int8" else flag,
                    double_quant=bool(config.get("bnb_4bit_use_double_quant", False)),
                    skip_modules=config.get("llm_int8_skip_modules"))


def _bnb():
    return bnb_functional("merging against a bitsandbytes-quantized base form needs bitsandbytes",
                          "pip install bitsandbytes, or merge with --base-form original")


def _bnb_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("bitsandbytes")
    except Exception:  # not installed: recorded as unknown
        return None


def trained_weight(weight: torch.Tensor, form: BaseQuantization) -> torch.Tensor:
    """dequant(quant(W)) in the form's compute dtype, computed by bitsandbytes; ``weight`` is (out, in).

    Example:
        >>> trained_weight(torch.randn(8, 64), bnb_form("nf4")).dtype
        torch.float32
    """
    functional = _bnb()
    if form.weight_dtype:
        weight = weight.to(DTYPE_FROM_NAME[form.weight_dtype])
    compute = DTYPE_FROM_NAME[form.compute_dtype or "F32"]
    weight = weight.contiguous()
    if form.scheme == "int8":
        # Linear8bitLt quantizes from fp16, row-wise (LLM.int8's weight side).
        codes, scales, _ = functional.int8_vectorwise_quant(weight.to(torch.float16))
        return functional.int8_vectorwise_dequant(codes, scales).to(compute)
    packed, state = functional.quantize_4bit(weight, blocksize=form.block_size or BNB_4BIT_BLOCK,
                                             compress_statistics=bool(form.double_quant), quant_type=form.scheme)
    # Linear4bit's matmul dequantizes straight into the compute dtype (one rounding from fp32).
    state.dtype = compute
    return functional.dequantize_4bit(packed, state)


def quantized_weights(checkpoint, form: BaseQuantization) -> dict[str, bool]:
    """Weight names the scheme quantizes -> whether they are stored transposed (GPT-2 ``Conv1D``).

    transformers replaces every ``nn.Linear`` (and ``Conv1D``) except its skip list: the given
    ``llm_int8_skip_modules``, or by default the output embedding, tied weights and the last module.

    Example:
        >>> quantized_weights(StreamingCheckpoint("tiny-llama"), bnb_form("nf4"))  # doctest: +SKIP
        {'model.layers.0.self_attn.q_proj.weight': False, ...}
    """
    model = _meta_model(checkpoint)
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module
    skip = list(form.skip_modules) if form.skip_modules is not None else get_keys_to_not_convert(model)
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    found = {}
    for name, module in model.named_modules():
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip):
            if f"{name}.weight" in checkpoint:
                found[f"{name}.weight"] = isinstance(module, Conv1D)
    return found


def _meta_model(checkpoint):
    arch = checkpoint.architecture
    try:
        import transformers
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(str(checkpoint.root), local_files_only=True)
        with torch.device("meta"):
            return getattr(transformers, arch)(config)
    except Exception as exc:  # unknown or custom architecture, no config
        raise UsageError(f"cannot tell which weights {arch or 'this base'} quantizes ({type(exc).__name__})",
                         path=checkpoint.path, hint="the trained base form needs a transformers architecture "
                         "and config.json; merge with --base-form original") from None


def choose_form(adapter_forms: list[BaseQuantization | None], requested: str | None) -> tuple[str, BaseQuantization | None]:
    """(``trained`` or ``original``, the form) for ``merge --base-form``; ``None`` = trained when known.

    Asking for ``trained`` when no adapter records its form is refused (never silently original).

    Example:
        >>> choose_form([None], None)
        ('original', None)
    """
    if requested is not None and requested not in BASE_FORMS:
        raise UsageError(f"--base-form {requested!r} is not known", hint="use trained or original")
    known = [f for f in adapter_forms if f is not None]
    distinct = {None if f is None else (f.scheme, f.block_size, f.compute_dtype, f.weight_dtype, f.double_quant,
                                        tuple(f.skip_modules or ())) for f in adapter_forms}
    if len(distinct) > 1:  # several forms, or some known and some not: no single trained base exists
        if requested == "original":
            return "original", None
        raise UsageError("the adapters were trained against different base forms",
                         hint="merge them one at a time, or all with --base-form original")
    form = known[0] if known else None
    if requested == "trained" and (form is None or len(known) < len(adapter_forms)):
        raise UsageError("--base-form trained: an adapter does not record the base form it was trained against",
                         hint="record it with `adapterfmt convert SRC DST --trained-on nf4 --compute-dtype bf16` "
                              "(or the scheme used), or merge with --base-form original")
    mode = requested or ("trained" if form is not None and form.scheme != "none" else "original")
    return mode, form


@dataclass
class FormReport:
    """Per adapted quantized layer: ‖W − dequant(quant(W))‖ and ‖ΔW‖ (the ratio says if the form matters)."""

    mode: str
    form: BaseQuantization | None
    layers: list[dict] = field(default_factory=list)

    def add(self, name: str, quant_error: float, delta: float) -> None:
        ratio = quant_error / delta if delta > 0 else float("inf") if quant_error > 0 else 0.0
        self.layers.append({"tensor": name, "quant_error_norm": quant_error, "delta_norm": delta,
                            "ratio": ratio})

    def to_dict(self) -> dict:
        form = None if self.form is None else {k: v for k, v in vars(self.form).items() if v is not None}
        return {"mode": self.mode, "form": form, "layers": self.layers}

    def notes(self) -> list[str]:
        if not self.layers:
            return []
        worst = max(self.layers, key=lambda row: row["ratio"])
        above = [row for row in self.layers if row["ratio"] > 1]
        text = (f"base form {self.mode} ({self.form.scheme}): ‖W − dequant(quant(W))‖ / ‖ΔW‖ up to "
                f"{worst['ratio']:.3g} ({worst['tensor']}), above 1 on {len(above)} of {len(self.layers)} layer(s)")
        if self.mode == "original" and above:
            text = ("warning: " + text + "; the quantization error the adapter was trained against outweighs "
                    "ΔW, so this merge differs from the trained model: use --base-form trained")
        return [text]


def plan_base_form(jobs: list, base, loaded, requested: str | None, ctx, stats) -> None:
    """Mark the jobs that become dequant(quant(W)) (``trained``) and the adapted ones whose ratio is reported.

    ``ctx`` (the merge's MathContext) gets the report and the measured names; ``stats`` the notes.

    Example:
        >>> plan_base_form(jobs, base, loaded, None, ctx, stats)  # doctest: +SKIP
    """
    if isinstance(base, BnbCheckpoint):
        prequantized_base_notes(base, loaded, requested, stats)
        return
    mode, form = choose_form([adapter.manifest.base.quantization for adapter, _ in loaded], requested)
    if form is None or form.scheme == "none":
        return
    if form.scheme.startswith("gguf:"):
        raise UsageError(f"base form {form.scheme} cannot be reproduced on a safetensors base yet",
                         hint="merge with --base-form original")
    quantized = quantized_weights(base, form)
    ctx.form_report = FormReport(mode, form)
    ctx.measured = set(quantized)
    if mode != "trained":
        return
    narrowed = set()
    for job in jobs:
        if job.out.name in quantized and job.replacement is None:
            job.form, job.form_transposed = form, quantized[job.out.name]
            if job.out.dtype != form.compute_dtype and form.compute_dtype == "F32":
                narrowed.add(job.out.dtype)
    stats.notes.append(f"base form trained: {len(quantized)} weight(s) became dequant(quant(W)) with "
                       f"{form.library or 'bitsandbytes'} ({form.scheme}, compute {form.compute_dtype})")
    if narrowed:
        stats.notes.append(f"the trained form is {form.compute_dtype} (the compute dtype); writing it as "
                           f"{', '.join(sorted(narrowed))} rounds it: --dtype fp32 keeps it exact")
    if form.scheme == "int8":
        stats.notes.append("LLM.int8 also quantizes activations at run time; merged weights reproduce the "
                           "weight side only")


def prequantized_base_notes(base: BnbCheckpoint, loaded, requested: str | None, stats) -> None:
    """A bitsandbytes-quantized base already is the trained form; the original weights are not there."""
    if requested == "original":
        raise UsageError(f"--base-form original: the base is quantized ({base.scheme}); it does not hold the "
                         "original weights", path=base.path, hint="give the unquantized base as --base, or drop "
                         "--base-form (a quantized base is merged as the adapter was trained against it)")
    stats.notes.append(f"base is bitsandbytes-quantized ({base.scheme}): {len(base.quantized_names())} weight(s) "
                       f"dequantized by bitsandbytes into {base.compute_dtype} (the trained form); fingerprints of "
                       "quantized weights cannot be checked, and ‖W − dequant(quant(W))‖ needs the float base")
    for adapter, _ in loaded:
        form = adapter.manifest.base.quantization
        if form is not None and (form.scheme, form.compute_dtype) != (base.scheme, base.compute_dtype):
            stats.notes.append(f"warning: an adapter records base form {form.scheme} (compute {form.compute_dtype}), "
                               f"the base is {base.scheme} (compute {base.compute_dtype})")
