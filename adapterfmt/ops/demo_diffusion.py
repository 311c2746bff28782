"""The demo's diffusion half: a kohya sd-scripts LoRA/LoCon file on a tiny SD 1.x pipeline, read against the
pipeline, written back as kohya and as a diffusers LoRA, checked for diffusers and ComfyUI, merged into the
pipeline's component directories and into a single-file (LDM layout) checkpoint."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from .demo_measure import Steps, merge_error, verdicts, worst_merge_error
from .demo_sd_files import diffusers_view_of_single_file, kohya_delta, save_single_file, tiny_sd15, write_kohya_lora

#: component -> its weights file in a diffusers pipeline directory
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}


def diffusion_steps(work: Path, step: Steps) -> Iterator[str]:
    """Yield the diffusion half's lines (files go under ``work``)."""
    from .convert import convert
    from .load import load_adapter
    work.mkdir(parents=True, exist_ok=True)
    pipe = work / "sd15-pipe"
    models = tiny_sd15(pipe)
    sizes = ", ".join(f"{name} {sum(p.numel() for p in m.parameters()):,}" for name, m in models.items())
    yield step("built a tiny SD 1.x pipeline from configs", f"{sizes} params -> {pipe.name}/")
    kohya = work / "kohya-locon.safetensors"
    targets = write_kohya_lora(models, kohya)
    ours = work / "sd15-lora.safetensors"
    report = convert(kohya, ours, base=pipe, overwrite=True)
    kinds = Counter(f"{e.component} {e.layer}" for e in load_adapter(ours).manifest.modules.values())
    yield step(f"kohya LoRA/LoCon file --base {pipe.name}/ -> {ours.name}",
               f"{report.worst}, {len(report.modules)} of {len(targets)} modules placed "
               f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
    yield from _round_trip(kohya, ours, work, step)
    diffusers_lora = work / "sd15-diffusers-lora.safetensors"
    report = convert(ours, diffusers_lora, to="diffusers", overwrite=True)
    yield step(f"{ours.name} -> diffusers LoRA", f"{report.worst}, {len(report.modules)} modules")
    yield from _checks(pipe, {"kohya file": kohya, "diffusers LoRA": diffusers_lora}, step)
    merged = yield from _merge_pipeline(pipe, ours, kohya, targets, work, models, step)
    yield from _merge_single_file(models, ours, merged, work, step)


def _round_trip(kohya: Path, ours: Path, work: Path, step: Steps) -> Iterator[str]:
    from safetensors import safe_open
    from .convert import convert
    back = work / "kohya-again.safetensors"
    report = convert(ours, back, to="kohya", overwrite=True)
    with safe_open(str(kohya), "pt") as a, safe_open(str(back), "pt") as b:
        same_keys = set(a.keys()) == set(b.keys())
        identical = same_keys and all(_bits_equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        metadata = a.metadata() == b.metadata()
    yield step(f"{ours.name} -> kohya", f"{report.worst}; tensors {'bit-identical' if identical else 'DIFFER'}, "
                                        f"metadata {'kept' if metadata else 'CHANGED'}")


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8),
                                                                     y.reshape(-1).view(torch.uint8))


def _checks(pipe: Path, files: dict[str, Path], step: Steps) -> Iterator[str]:
    from .check import check_adapter
    for label, path in files.items():
        report = check_adapter(path, ["diffusers", "comfyui"], base=str(pipe))
        yield step(f"check {path.name} -t diffusers -t comfyui", f"as is {verdicts(report)}")


def _merge_pipeline(pipe: Path, ours: Path, kohya: Path, targets: dict[str, str], work: Path, models: dict,
                    step: Steps) -> Iterator[str]:
    """Merge into each component directory of a copy of the pipeline; measure against the kohya formula."""
    from safetensors.torch import load_file
    from .merge import merge
    merged = work / "sd15-merged"
    shutil.rmtree(merged, ignore_errors=True)
    merged.mkdir()
    shutil.copy2(pipe / "model_index.json", merged / "model_index.json")
    changed = sum(merge(pipe / c, [(ours, 1.0)], merged / c, overwrite=True).tensors_changed for c in WEIGHTS)
    state = load_file(str(kohya))
    before = {c: load_file(str(pipe / c / f)) for c, f in WEIGHTS.items()}
    after = {c: load_file(str(merged / c / f)) for c, f in WEIGHTS.items()}
    errors = []
    for name, target in targets.items():
        component, path = target.split(".", 1)
        key = _weight_key(before[component], path)
        weight = before[component][key]
        exact = weight.double() + kohya_delta(state, name).reshape(weight.shape)
        errors.append(merge_error(after[component][key], exact))
    yield step(f"merge into {pipe.name}/unet + /text_encoder -> {merged.name}/",
               f"{changed} tensors changed, {worst_merge_error(errors)} from the kohya formula in float64")
    yield from _run_merged_unet(merged, models, step)
    return merged


def _weight_key(state: dict, path: str) -> str:
    # transformers 5 saves CLIPTextModel without the 'text_model.' prefix, older versions with it
    return next(k for k in (f"{path}.weight", f"text_model.{path}.weight", f"{path.removeprefix('text_model.')}.weight")
                if k in state)


def _run_merged_unet(merged: Path, models: dict, step: Steps) -> Iterator[str]:
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(str(merged / "unet"), low_cpu_mem_usage=False).eval()
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 16, generator=gen)
    with torch.no_grad():
        new = unet(x, torch.tensor([3]), context).sample
        old = models["unet"](x, torch.tensor([3]), context).sample
    yield step("diffusers loads the merged UNet", f"output finite: {bool(torch.isfinite(new).all())}, "
                                                  f"moved by max {float((new - old).abs().max()):.2g} from the base's")


def _merge_single_file(models: dict, ours: Path, merged_pipe: Path, work: Path, step: Steps) -> Iterator[str]:
    """Merge into the pipeline saved as one LDM-layout file; diffusers' own conversion reads the result."""
    from safetensors.torch import load_file
    from .merge import merge
    from .validate import validate
    single = save_single_file(models, work / "sd15-single-file.safetensors")
    out = work / "sd15-single-file-merged.safetensors"
    summary = merge(single, [(ours, 1.0)], out, overwrite=True)
    view = diffusers_view_of_single_file(out, models["unet"].config)
    worst, compared = 0.0, 0
    for component, file in WEIGHTS.items():
        directory = load_file(str(merged_pipe / component / file))
        for key, value in directory.items():
            other = view[component].get(key.removeprefix("text_model."))
            if other is not None:
                worst, compared = max(worst, float((other - value).abs().max())), compared + 1
    yield step(f"merge into {single.name} (LDM keys) -> {out.name}",
               f"{summary.tensors_changed} tensors changed; read by diffusers' convert_ldm_*: "
               f"{compared} tensors, max |Δ| {worst:g} from {merged_pipe.name}/")
    valid = [validate(ours, base=b).valid for b in (work / "sd15-pipe", single)]
    yield step(f"validate {ours.name} against the pipeline dir / the single file",
               " / ".join("valid" if v else "INVALID" for v in valid))
