"""Diffusion merge benchmark: `cp` (I/O floor) vs diffusers fuse_lora vs `adapterfmt merge`, side by side.

    python bench/bench_diffusion_merge.py [--scale 1.0] [--reps 3] [--device cpu|cuda]

Builds (once, cached under bench/out/diffusion, git-ignored; no downloads) an SDXL-shaped UNet:
diffusers' UNet2DConditionModel with SDXL base 1.0's config (320/640/1280 channels, 2 ResBlocks per
level, cross-attention 2048, text_time embedding), random fp16 weights, written tensor by tensor
from a meta-device model (never the whole model in memory). ``--scale`` < 1 keeps every layer shape
and scales only the transformer depth per level ([1, 2, 10] at 1.0; at 0.2 it is [1, 1, 2]). The
same tensors are written twice: as a diffusers component directory (``unet/``) and as an SGM-layout
single-file checkpoint (``model.diffusion_model.*``, as published SDXL files). Three kohya (sd-scripts)
SDXL LoRAs, rank 32, alpha 16, fp16, on every Linear of every transformer block (proj_in/out,
attn1/attn2 q/k/v/out, ff), are written and converted once with ``adapterfmt convert``.

Each repetition runs, each in its own subprocess (peak RSS from wait4; this parent never imports
torch): ``cp`` + sync of the UNet file (I/O floor); diffusers (from_pretrained fp16,
lora_state_dict + load_lora_into_unet, set_adapters, fuse_lora, unload_lora, save_pretrained,
fsync); ``adapterfmt merge`` into the component directory; ``adapterfmt merge`` into the single
file; for one LoRA and for a weighted 3-LoRA merge (0.7, 0.5, -0.3). Outputs are then compared.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
RANK, ALPHA = 32, 16.0
WEIGHTS = (0.7, 0.5, -0.3)  # the 3-LoRA merge; the 1-LoRA merge is the first at 1.0
UNET_FILE = "diffusion_pytorch_model.safetensors"
DTYPES = {"F16": "float16", "BF16": "bfloat16"}

DIFFUSERS_SCRIPT = """
import json, os, sys, torch
from diffusers import StableDiffusionXLPipeline as P, UNet2DConditionModel
base, out, loras = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
unet = UNet2DConditionModel.from_pretrained(base, torch_dtype=torch.float16)
names = []
for i, (path, weight) in enumerate(loras):
    state, alphas = P.lora_state_dict(path, unet_config=unet.config)  # kohya (SGM) -> diffusers, as load_lora_weights
    P.load_lora_into_unet(state, alphas, unet=unet, adapter_name=f"a{i}", low_cpu_mem_usage=True)
    names.append(f"a{i}")
unet.set_adapters(names, [w for _, w in loras])
unet.fuse_lora(adapter_names=names)
unet.unload_lora()
unet.save_pretrained(out)
for name in os.listdir(out):
    fd = os.open(os.path.join(out, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def unet_config(scale: float) -> dict:
    """SDXL's UNet config with the transformer depth per level scaled (layer shapes unchanged)."""
    config = dict(SDXL_UNET)
    config["transformer_layers_per_block"] = [max(1, round(d * scale)) for d in SDXL_UNET["transformer_layers_per_block"]]
    return config


def write_safetensors(path: Path, specs: list[tuple[str, str, tuple]], tensors, metadata: dict) -> None:
    """Header first, then each tensor's bytes as ``tensors`` yields them (one in memory at a time)."""
    import math

    import torch
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape in specs:
        nbytes = 2 * math.prod(shape)  # F16 / BF16
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for tensor in tensors:
            f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def build(work: Path, scale: float, dtype: str) -> None:
    """The UNet (diffusers directory + SGM single file), three kohya LoRAs and their conversions."""
    import math

    import torch
    from diffusers import UNet2DConditionModel
    from tests.diffusion.kohya_files import sgm_path, unet_linear_targets
    from tests.diffusion.ldm_files import ldm_unet_name
    stamp = work / f"built-v1-{scale}-{dtype}"
    if stamp.exists():
        return
    shutil.rmtree(work, ignore_errors=True)
    (work / "unet").mkdir(parents=True)
    config = unet_config(scale)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    unet.register_to_config(**{"_name_or_path": "sdxl-shaped"})
    unet.save_config(work / "unet")
    with_attention = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    ldm = {k: "model.diffusion_model." + ldm_unet_name(k, config["layers_per_block"], with_attention) for k in shapes}
    names = sorted(shapes)
    torch_dtype = getattr(torch, DTYPES[dtype])

    def tensors():
        gen = torch.Generator().manual_seed(0)
        for name in names:
            yield (torch.randn(shapes[name], generator=gen) * 0.02).to(torch_dtype)

    # Both files hold the same tensors: generate each once and write it twice.
    specs = [(n, dtype, shapes[n]) for n in names]
    ldm_specs = [(ldm[n], dtype, shapes[n]) for n in names]
    import threading
    import queue
    q: queue.Queue = queue.Queue(maxsize=2)
    single = threading.Thread(target=write_safetensors, args=(
        work / "sdxl.safetensors", ldm_specs, iter(q.get, None), {"modelspec.architecture": "stable-diffusion-xl-v1-base"}))
    single.start()

    def both():
        for t in tensors():
            q.put(t)
            yield t
        q.put(None)
    write_safetensors(work / "unet" / UNET_FILE, specs, both(), {"format": "pt"})
    single.join()
    # kohya LoRAs (sd-scripts names on SGM blocks), fp16 factors, one alpha per module.
    targets = unet_linear_targets(unet)
    modules = {"lora_unet_" + sgm_path(p, config["layers_per_block"]).replace(".", "_"): p for p in targets}
    for seed in range(len(WEIGHTS)):
        gen = torch.Generator().manual_seed(100 + seed)
        state = {}
        for kname, path in modules.items():
            layer = unet.get_submodule(path)
            state[f"{kname}.lora_down.weight"] = (torch.randn(RANK, layer.in_features, generator=gen) * 0.05).half()
            state[f"{kname}.lora_up.weight"] = (torch.randn(layer.out_features, RANK, generator=gen) * 0.05).half()
            state[f"{kname}.alpha"] = torch.tensor(ALPHA).half()
        from safetensors.torch import save_file
        save_file(state, str(work / f"lora{seed}.safetensors"), metadata={
            "ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA),
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    (work / "lora_modules.json").write_text(json.dumps(modules))
    params = sum(math.prod(s) for s in shapes.values())
    (work / "info.json").write_text(json.dumps({"params": params, "tensors": len(shapes), "lora_modules": len(modules),
                                                "transformer_layers_per_block": config["transformer_layers_per_block"]}))
    stamp.touch()


def convert(work: Path, env: dict) -> dict:
    """Each kohya LoRA converted to adapterfmt against the single file and the directory (timed once)."""
    times = {}
    for seed in range(len(WEIGHTS)):
        for base, tag in ((work / "sdxl.safetensors", "single"), (work / "unet", "dir")):
            out = work / f"lora{seed}-{tag}.af.safetensors"
            if out.exists():
                continue
            cmd = [sys.executable, "-m", "adapterfmt.cli", "convert", str(work / f"lora{seed}.safetensors"),
                   str(out), "--base", str(base)]
            times[f"convert-{tag}"] = timed(cmd, env)
    return times


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def pipelines(work: Path, device: str, count: int) -> dict[str, list[str]]:
    loras = [(str(work / f"lora{i}.safetensors"), WEIGHTS[i] if count > 1 else 1.0) for i in range(count)]
    tag = f"{count} LoRA" + ("s" if count > 1 else "")

    def ours(base: Path, kind: str, out: str) -> list[str]:
        adapters = []
        for i, (_, w) in enumerate(loras):
            adapters += ["--adapter", f"{work / f'lora{i}-{kind}.af.safetensors'}:{w}"]
        return [sys.executable, "-m", "adapterfmt.cli", "merge", "--base", str(base), *adapters, "--out",
                str(work / out), "--device", device, "--json"]
    return {
        f"diffusers fuse_lora, {tag}": [sys.executable, "-c", DIFFUSERS_SCRIPT, str(work / "unet"),
                                         str(work / "result"), json.dumps(loras)],
        f"adapterfmt merge dir, {tag}": ours(work / "unet", "dir", "result"),
        f"adapterfmt merge single, {tag}": ours(work / "sdxl.safetensors", "single", "result.safetensors"),
    }


# ---- comparisons (run in a child: they import torch) ----

def _ulps(a, b):
    """|a - b| in units of b's ulp, elementwise (float32 result)."""
    import torch
    inf = torch.tensor(float("inf"), dtype=b.dtype)
    ulp = (torch.nextafter(b.abs(), inf) - b.abs()).float()
    return (a.float() - b.float()).abs() / ulp


def compare(work: Path, kept: dict[str, Path], count: int) -> dict:
    """Ours (dir) vs diffusers and both vs the exact merge (float64 W + Σ w·alpha/r·up@down, rounded once),
    elementwise in ulps, on every changed tensor; ours (single file, read back under diffusers' names) vs
    ours (dir), expected bit-identical; untouched tensors expected bit-identical to diffusers'."""
    import torch
    from safetensors import safe_open
    from tests.diffusion.ldm_files import ldm_unet_name
    config = json.loads((work / "unet" / "config.json").read_text())
    with_attention = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    tag = f"{count} LoRA" + ("s" if count > 1 else "")
    theirs = safe_open(str(kept[f"diffusers fuse_lora, {tag}"] / UNET_FILE), "pt")
    ours = safe_open(str(kept[f"adapterfmt merge dir, {tag}"] / UNET_FILE), "pt")
    single = safe_open(str(kept[f"adapterfmt merge single, {tag}"]), "pt")
    base = safe_open(str(work / "unet" / UNET_FILE), "pt")
    modules = json.loads((work / "lora_modules.json").read_text())
    by_weight = {f"{path}.weight": k for k, path in modules.items()}
    loras = [(safe_open(str(work / f"lora{i}.safetensors"), "pt"), WEIGHTS[i] if count > 1 else 1.0)
             for i in range(count)]
    stats = {"tensors": 0, "changed": 0, "untouched_differ": 0, "elements": 0, "ours_eq_exact": 0,
             "ours_max_ulp_exact": 0.0, "theirs_eq_exact": 0, "theirs_max_ulp_exact": 0.0, "ours_eq_theirs": 0,
             "ours_1ulp_theirs": 0, "ours_max_ulp_theirs": 0.0, "tolerance_ok": 0, "single_vs_dir_differ": 0,
             "names_differ": len(set(ours.keys()) ^ set(theirs.keys()))}
    for name in ours.keys():
        a, b = ours.get_tensor(name), theirs.get_tensor(name)
        ldm = "model.diffusion_model." + ldm_unet_name(name, config["layers_per_block"], with_attention)
        stats["single_vs_dir_differ"] += not torch.equal(single.get_tensor(ldm), a)
        stats["tensors"] += 1
        if name not in by_weight:
            stats["untouched_differ"] += not torch.equal(a, b)
            continue
        k = by_weight[name]
        exact = base.get_tensor(name).double()
        for handle, weight in loras:
            down = handle.get_tensor(f"{k}.lora_down.weight").double()
            up = handle.get_tensor(f"{k}.lora_up.weight").double()
            exact += (weight * float(handle.get_tensor(f"{k}.alpha")) / down.shape[0] * (up @ down)).reshape(exact.shape)
        exact = exact.to(a.dtype)
        ours_exact, theirs_exact, ours_theirs = _ulps(a, exact), _ulps(b, exact), _ulps(a, b)
        stats["changed"] += 1
        stats["elements"] += a.numel()
        stats["ours_eq_exact"] += int((ours_exact == 0).sum())
        stats["theirs_eq_exact"] += int((theirs_exact == 0).sum())
        stats["ours_eq_theirs"] += int((ours_theirs == 0).sum())
        stats["ours_1ulp_theirs"] += int((ours_theirs <= 1).sum())
        stats["tolerance_ok"] += int(((ours_theirs <= 1) | (ours_exact <= 1)).sum())  # issue 14's tolerance
        for key, u in (("ours_max_ulp_exact", ours_exact), ("theirs_max_ulp_exact", theirs_exact),
                       ("ours_max_ulp_theirs", ours_theirs)):
            stats[key] = max(stats[key], float(u.max()))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="transformer depth factor (1.0 = full SDXL)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="F16")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "diffusion")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # helpers run in a child so the timing parent stays small (ru_maxrss is inherited)
        if args.child[0] == "build":
            build(args.work, args.scale, args.dtype)
        else:
            kept = json.loads(args.child[1])
            print(json.dumps(compare(args.work, {k: Path(v) for k, v in kept.items()}, int(args.child[2]))))
        return
    me = [sys.executable, __file__, "--work", str(args.work), "--scale", str(args.scale), "--dtype", args.dtype]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=
               os.environ.get("CUDA_VISIBLE_DEVICES", "") if args.device == "cuda" else "")
    start = time.perf_counter()
    subprocess.run(me + ["--child", "build"], check=True, env=env)
    print(f"built in {time.perf_counter() - start:.1f} s", flush=True)
    conversions = convert(args.work, env)
    info = json.loads((args.work / "info.json").read_text())
    size = (args.work / "unet" / UNET_FILE).stat().st_size
    result, result_file = args.work / "result", args.work / "result.safetensors"
    runs = {"python + import torch": [sys.executable, "-c", "import torch"],
            "cp + sync (floor)": ["sh", "-c", f'cp "{args.work / "sdxl.safetensors"}" "{result_file}" && sync "{result_file}"']}
    for count in (1, len(WEIGHTS)):
        runs.update(pipelines(args.work, args.device, count))
    results = {name: [] for name in runs}
    kept = {}
    names = list(runs)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate: the disk throttles after bursts
            shutil.rmtree(result, ignore_errors=True)
            result_file.unlink(missing_ok=True)
            os.sync()
            # Every pipeline reads a warm base: a big writer before it may have evicted it from the cache.
            timed(["cat", str(args.work / "unet" / UNET_FILE), str(args.work / "sdxl.safetensors")])
            results[name].append(timed(runs[name], env))
            print(f"rep {rep + 1} {name:34s} {results[name][-1][0]:7.2f} s  "
                  f"peak RSS {results[name][-1][1] / 2**20:7.0f} MiB", flush=True)
            if rep == 0 and name not in ("python + import torch", "cp + sync (floor)"):
                made = result if result.exists() else result_file
                kept[name] = args.work / ("kept-" + name.replace(" ", "_").replace(",", ""))
                shutil.rmtree(kept[name], ignore_errors=True) if kept[name].is_dir() else kept[name].unlink(missing_ok=True)
                made.rename(kept[name])
    checks = {}
    for count in (1, len(WEIGHTS)):
        out = subprocess.run(me + ["--child", "compare", json.dumps({k: str(v) for k, v in kept.items()}), str(count)],
                             check=True, capture_output=True, text=True, env=env).stdout
        checks[count] = json.loads(out.strip().splitlines()[-1])
    for path in kept.values():
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    result_file.unlink(missing_ok=True)
    shutil.rmtree(result, ignore_errors=True)
    med = {n: (statistics.median(t for t, _ in r), statistics.median(m for _, m in r)) for n, r in results.items()}
    print(f"\nSDXL-shaped UNet, scale {args.scale} (transformer depth {info['transformer_layers_per_block']}): "
          f"{info['params'] / 1e9:.3f} G params, {info['tensors']} tensors, {size / 1e9:.2f} GB {args.dtype}; "
          f"kohya LoRA rank {RANK} on {info['lora_modules']} Linear modules; {args.reps} reps, medians; "
          f"device {args.device}; load average {os.getloadavg()[0]:.2f}")
    for name, (t, m) in conversions.items():
        print(f"  {name + ' (once, 1 LoRA)':34s} {t:7.2f} s  peak RSS {m / 2**20:7.0f} MiB")
    for name, (t, m) in med.items():
        print(f"  {name:34s} {t:7.2f} s  peak RSS {m / 2**20:7.0f} MiB")
    for count in (1, len(WEIGHTS)):
        tag = f"{count} LoRA" + ("s" if count > 1 else "")
        ref_t, ref_m = med[f"diffusers fuse_lora, {tag}"]
        for kind in ("dir", "single"):
            t, m = med[f"adapterfmt merge {kind}, {tag}"]
            print(f"  {tag}, {kind:6s}: diffusers / adapterfmt time {ref_t / t:5.2f}x, RSS {ref_m / m:5.2f}x; "
                  f"adapterfmt / cp {t / med['cp + sync (floor)'][0]:5.2f}x")
        c = checks[count]
        pct = lambda k: 100 * c[k] / c["elements"]  # noqa: E731
        print(f"  {tag} outputs: {c['tensors']} tensors, {c['changed']} changed ({c['elements'] / 1e6:.0f} M elements), "
              f"names differ {c['names_differ']}, untouched tensors differing from diffusers' {c['untouched_differ']}, "
              f"single file vs dir {c['single_vs_dir_differ']} tensors differ")
        print(f"    equal to exact rounded once: adapterfmt {pct('ours_eq_exact'):.4f}% (max {c['ours_max_ulp_exact']:.0f} ulp), "
              f"diffusers {pct('theirs_eq_exact'):.4f}% (max {c['theirs_max_ulp_exact']:.0f} ulp)")
        print(f"    adapterfmt vs diffusers: {pct('ours_eq_theirs'):.4f}% equal, {pct('ours_1ulp_theirs'):.4f}% within 1 ulp "
              f"(max {c['ours_max_ulp_theirs']:.0f}); within 1 ulp of diffusers or of exact: {pct('tolerance_ok'):.4f}%")


if __name__ == "__main__":
    main()
