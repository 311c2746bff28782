"""Official NOLA checkpoints (UCDvision/NOLA): ViT ``*.safetensors``, GPT-2 ``model.{step}.pt``,
LLaMA/QLoRA ``adapter_config.json`` (``use_nola: true``) + ``adapter_model.{safetensors,bin}``.

GPT-2 and LLaMA modules are ``NOLALinear`` pairs: per side an int64 seed, coefficients and the
layer's own frozen weight (dense offset A0 or B0). Their bases came from torch's CUDA
generator, whose values depend on the GPU (SM count, threads per SM): with
``--cuda-sm-count``/``--cuda-threads-per-sm`` the import records generator
``torch-cuda-philox-grid`` (a CPU emulation, marked unverified); without them it is refused,
or with ``--nola-materialise`` on a CUDA machine the bases are drawn there and stored as LoRA.
Reference: ``/work/shared/reference/nola-official.md`` §§4-12.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from .._files import load_pickled_tensors, load_safetensors, safetensors_keys
from ...jsonio import peek_json_object, read_json_file
from ...errors import ForeignFormatError, UsageError
from ...format import Adapter, BaseWeight, Manifest
from ...methods.nola import SIDES, fl32, nola_module
from ...methods.nola.convert import nola_to_lora
from ...conversion_report import EXACT_MATH, LOSSY
from pydantic import Field

from ..base import AdapterFormat, FormatOptions
from .vit import is_vit_state, vit_to_adapter

GPT2_RE = re.compile(r"^(?:module\.)?(?:transformer\.)?h\.(\d+)\.(attn\.nola_query|attn\.nola_value|mlp\.p1_nola|"
                     r"mlp\.p2_nola)\.lora_([AB])\.(weight|seed|coefficients)$")
LLAMA_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.(weight|seed|coefficients)$")
#: GPT-2 role -> (HF module, which third of c_attn's output rows, or None for a whole MLP layer).
GPT2_TARGETS = {"attn.nola_query": ("attn.c_attn", 0), "attn.nola_value": ("attn.c_attn", 2),
                "mlp.p1_nola": ("mlp.c_fc", None), "mlp.p2_nola": ("mlp.c_proj", None)}


class NolaOfficialReadOptions(FormatOptions):
    nola_rank: int | None = Field(default=None, ge=1, description="Official NOLA import: rank r (not stored by ViT/GPT-2).")
    nola_alpha: float | None = Field(default=None, description="Official NOLA GPT-2 import: lora alpha (not stored).")
    cuda_sm_count: int | None = Field(default=None, ge=1,
                                      description="Official NOLA GPT-2/LLaMA: the training GPU's SM count.")
    cuda_threads_per_sm: int | None = Field(default=None, ge=256,
                                            description="... and its max threads per SM (e.g. 2048).")
    nola_materialise: bool = Field(default=False, description=(
        "Official NOLA GPT-2/LLaMA without GPU geometry: regenerate on this CUDA device, store LoRA."))


class NolaOfficialFormat(AdapterFormat):
    name = "nola_official"
    summary = "official UCDvision/NOLA checkpoints (ViT safetensors, GPT-2 .pt, LLaMA QLoRA dir), read only"
    priority = 15
    writes_methods = ()
    can_write = False
    read_options = NolaOfficialReadOptions

    def detect(self, path: Path) -> bool:
        if path.is_dir():
            return (peek_json_object(path / "adapter_config.json") or {}).get("use_nola") is True
        if path.suffix == ".safetensors":
            found = safetensors_keys(path)
            return found is not None and "adapterfmt.format" not in found[1] and is_vit_state(found[0])
        return path.suffix in (".pt", ".pth", ".bin") and _pickle_mentions_nola(path)

    def read(self, path: Path, options, report) -> Adapter:
        if path.is_dir():
            adapter = _read_llama(path, options, report)
        elif path.suffix == ".safetensors":
            adapter = vit_to_adapter(load_safetensors(path)[0], path, options, report)
        else:
            adapter = _read_gpt2(path, options, report)
        return adapter


def _pickle_mentions_nola(path: Path) -> bool:
    # Peek at the pickle bytes inside torch's zip container without unpickling anything.
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            return pkl is not None and b"nola_" in archive.read(pkl)
    except (zipfile.BadZipFile, OSError):
        return False


def _generator(options, path) -> dict | None:
    """The CUDA-grid generator from the user's GPU geometry, or None (materialise or refuse)."""
    sm, tps = options.format.cuda_sm_count, options.format.cuda_threads_per_sm
    if sm and tps:
        return {"id": "torch-cuda-philox-grid", "version": 1, "sm_count": int(sm), "threads_per_sm": int(tps),
                "verified": False}
    if options.format.nola_materialise:
        if not torch.cuda.is_available():
            raise UsageError("--nola-materialise needs a CUDA device to redraw the official bases", path=path,
                             hint="run on the training GPU type, or give --cuda-sm-count/--cuda-threads-per-sm")
        return None
    raise UsageError("the official NOLA bases were drawn by torch's CUDA generator, whose values depend on the "
                     "training GPU's SM count and threads per SM, which the checkpoint does not record", path=path,
                     hint="pass --cuda-sm-count N --cuda-threads-per-sm M (e.g. 108 and 2048 for an A100), or "
                          "--nola-materialise on a machine with the training GPU")


def _module(target: str, base_weight: str, shape: list[int], parts: dict, scale: float, gen: dict | None,
            path: Path, rank: int, **extra):
    """One NOLA (or, without a generator, materialised LoRA) module from NOLALinear tensors."""
    _check_parts(target, parts, path)
    sides, tensors = {}, {}
    for side in SIDES:
        p = parts[side]
        seed = int(p["seed"].reshape(-1)[0])
        if seed < 0:
            raise ForeignFormatError(f"{target}: negative seed {seed}", path=path, hint="the checkpoint is damaged")
        k = p["coefficients"].numel()
        sides[side] = {"seed": seed, "num_basis": k, "basis_scale": fl32(k ** -0.5)}
        tensors[f"coef_{side}"] = p["coefficients"].reshape(-1)
        if bool(p["weight"].any()):  # an all-zero offset (LLaMA's B0) adds nothing: dropped exactly
            tensors[f"offset_{side}"] = p["weight"]
    provenance = {"id": "torch-cuda-philox-grid", "torch_uniform": "uniform_(-1,1) then *fl32(1/sqrt(k))",
                  "dtype": str(parts["A"]["coefficients"].dtype).replace("torch.", "")}
    if gen is not None:
        provenance.update(sm_count=gen["sm_count"], threads_per_sm=gen["threads_per_sm"], verified=False)
        return nola_module(target, base_weight, shape, rank, scale, sides, tensors, generator=gen,
                           provenance=provenance, **extra)
    cuda_gen = {"id": "torch-cuda-device", "version": 1}
    entry, tensors = nola_module(target, base_weight, shape, rank, scale,
                                 {s: dict(v, fingerprint="sha256:" + "0" * 64) for s, v in sides.items()},
                                 tensors, generator=cuda_gen, **extra)
    lora_entry, lora_tensors, _, _ = nola_to_lora(target, entry, tensors, draw=_draw_on_this_cuda_device)
    return lora_entry, lora_tensors


def _check_parts(target: str, parts: dict, path: Path) -> None:
    for side in SIDES:
        p = parts.get(side, {})
        if set(p) != {"weight", "seed", "coefficients"}:
            raise ForeignFormatError(f"{target}: lora_{side} has {sorted(p)}, needs weight, seed, coefficients",
                                     path=path, hint="the checkpoint is incomplete")


def _llama_config(path: Path) -> tuple[dict, int, float, int | None]:
    """adapter_config.json of a NOLA LLaMA save: (config, r, lora_alpha, nola_num_basis or None)."""
    cfg = path / "adapter_config.json"
    config = read_json_file(cfg)
    wanted = {"r": (int, "a positive integer"), "lora_alpha": ((int, float), "a number"),
              "nola_num_basis": (int, "a positive integer")}
    for key, (types, what) in wanted.items():
        value = config.get(key)
        if key == "nola_num_basis" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types) or what.startswith("a positive") and value < 1:
            raise ForeignFormatError(f"config field {key} must be {what}, got {value!r}", path=cfg,
                                     hint="the config is damaged")
    return config, config["r"], float(config["lora_alpha"]), config.get("nola_num_basis")


def _draw_on_this_cuda_device(generator, side, dims, start, stop):
    """Draws exactly what the official code drew on this CUDA device (torch.manual_seed + uniform_)."""
    state = torch.cuda.get_rng_state()
    try:
        torch.cuda.manual_seed(int(side["seed"]))
        full = torch.zeros(int(side["num_basis"]), *dims, device="cuda").uniform_(-1, 1)
    finally:
        torch.cuda.set_rng_state(state)
    return full[start:stop].cpu()


def _finish(manifest: Manifest, tensors: dict, entry, parts: dict, target: str, report, gen, note: str) -> None:
    manifest.modules[target] = entry
    tensors.update({entry.tensors[r].name: t for r, t in parts.items()})
    if gen is None:
        report.add(target, EXACT_MATH, f"{note}; bases drawn on this CUDA device and materialised as LoRA")
    else:
        status = LOSSY if note.startswith("bf16") else EXACT_MATH
        report.add(target, status, f"{note}; basis = UNVERIFIED CPU emulation of torch CUDA uniform_ for "
                                   f"{gen['sm_count']} SMs x {gen['threads_per_sm']} threads")


def _read_gpt2(path: Path, options, report) -> Adapter:
    state = load_pickled_tensors(path, options.allow_pickle, "an official NOLA GPT-2 checkpoint", unwrap="model_state_dict")
    groups: dict[tuple[int, str], dict] = {}
    for key, tensor in state.items():
        m = GPT2_RE.match(key)
        if m:
            groups.setdefault((int(m[1]), m[2]), {}).setdefault(m[3], {})[m[4]] = tensor
    if not groups:
        raise ForeignFormatError("no NOLA keys (h.N.attn.nola_query.lora_A.seed, ...) found", path=path,
                                 hint="not an official NOLA GPT-2 checkpoint")
    alpha = options.format.nola_alpha
    if alpha is None:
        raise UsageError("official NOLA GPT-2 checkpoints store no alpha", path=path,
                         hint="pass --nola-alpha (the scripts: 8 for GPT-2 M, 2 for GPT-2 L)")
    gen = _generator(options, path)
    manifest, tensors = Manifest(), {}
    for (layer, role), parts in sorted(groups.items()):
        a0, b0 = parts.get("A", {}).get("weight"), parts.get("B", {}).get("weight")
        if a0 is None or b0 is None:
            raise ForeignFormatError(f"h.{layer}.{role} lacks lora_A.weight or lora_B.weight", path=path,
                                     hint="the checkpoint is incomplete")
        rank, n_in, n_out = a0.shape[0], a0.shape[1], b0.shape[0]
        if options.format.nola_rank not in (None, rank):
            raise UsageError(f"--nola-rank {options.format.nola_rank} but the checkpoint has rank {rank}", path=path,
                             hint="omit --nola-rank (GPT-2 checkpoints store it) or give the trained rank")
        hf_module, third = GPT2_TARGETS[role]
        base_weight = f"transformer.h.{layer}.{hf_module}.weight"
        extra = {"fan_in_fan_out": True, "layer": "conv1d"}
        shape = [n_out, n_in]
        if third is not None:  # fused c_attn: q and v own row blocks of the (3n, n) canonical ΔW
            shape = [3 * n_out, n_in]
            extra["rows"] = [third * n_out, (third + 1) * n_out]
        target = f"transformer.h.{layer}.{hf_module}" + ({0: ".q", 2: ".v"}[third] if third is not None else "")
        entry, module_tensors = _module(target, base_weight, shape, parts, alpha / rank, gen, path, rank, **extra)
        manifest.base.weights[base_weight] = BaseWeight(shape=[shape[1], shape[0]])
        _finish(manifest, tensors, entry, module_tensors, target, report, gen, "fp32 basis")
    manifest.source = {"format": "nola_official", "variant": "gpt2", "alpha": alpha}
    report.notes.append(f"GPT-2 alpha {alpha} supplied by the user (the checkpoint stores none)")
    return Adapter(manifest=manifest, tensors=tensors)


def _read_llama(path: Path, options, report) -> Adapter:
    config, rank, alpha, k = _llama_config(path)
    st, pkl = path / "adapter_model.safetensors", path / "adapter_model.bin"
    state = load_safetensors(st)[0] if st.is_file() else load_pickled_tensors(pkl, options.allow_pickle, "an official NOLA LLaMA adapter", unwrap="model_state_dict")
    groups: dict[str, dict] = {}
    for key, tensor in state.items():
        m = LLAMA_RE.match(key)
        if not m:
            raise ForeignFormatError(f"key {key!r} is not a NOLA key", path=path, hint="not an official NOLA save")
        groups.setdefault(m[1], {}).setdefault(m[2], {})[m[3]] = tensor
    gen = _generator(options, path)
    manifest, tensors = Manifest(), {}
    for module, parts in sorted(groups.items()):
        _check_parts(module, parts, path)
        coef = parts["A"]["coefficients"]
        if k is not None and coef.numel() != k:
            raise ForeignFormatError(f"{module}: {coef.numel()} coefficients but nola_num_basis is {k}", path=path,
                                     hint="the config does not match the weights")
        a0, b0 = parts["A"]["weight"], parts["B"]["weight"]
        entry, module_tensors = _module(module, f"{module}.weight", [b0.shape[0], a0.shape[1]], parts,
                                        alpha / rank, gen, path, rank)
        manifest.base.weights[f"{module}.weight"] = BaseWeight(shape=[b0.shape[0], a0.shape[1]])
        note = "bf16 training basis approximated by fp32 draws" if coef.dtype == torch.bfloat16 else "fp32 basis"
        _finish(manifest, tensors, entry, module_tensors, module, report, gen, note)
    manifest.base.name_or_path = config.get("base_model_name_or_path")
    manifest.source = {"format": "nola_official", "variant": "llama", "config": config}
    report.notes.append("base was 4/8-bit quantised during training; merging into a float base differs from it")
    return Adapter(manifest=manifest, tensors=tensors)


