"""NOLA merge vs LoRA merge of the same modules (k = l = 1024 by default).

    python bench/bench_nola_merge.py [--modules 4] [--dim 1024] [--rank 8] [--k 1024] [--reps 3]

Times, per device (cpu, and cuda when present), the median of ``reps`` runs of
(a) the method's ``merged`` (W + ΔW in fp32) over all modules, and (b) the whole
``adapterfmt merge`` of a synthetic base directory (CPU engine: read, merge, write).
NOLA's cost is regenerating k·r·(in+out) basis values per module (Philox), LoRA's is one
matmul, so expect NOLA/LoRA ratios far above 1 on CPU; the target is ≤ 2×.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from adapterfmt.engine.merge import merge  # noqa: E402
from adapterfmt.format import Adapter, Manifest, ModuleEntry, TensorRef, write_adapter  # noqa: E402
from adapterfmt.methods import get_method  # noqa: E402
from adapterfmt.methods.lora import lora_params  # noqa: E402
from adapterfmt.methods.nola import nola_module  # noqa: E402


def build(n_modules, dim, rank, k):
    gen = torch.Generator().manual_seed(0)
    base, lora, nola = {}, Adapter(Manifest()), Adapter(Manifest())
    for i in range(n_modules):
        target = f"layers.{i}.proj"
        base[f"{target}.weight"] = torch.randn(dim, dim, generator=gen) * 0.02
        a, b = torch.randn(rank, dim, generator=gen), torch.randn(dim, rank, generator=gen)
        lora.manifest.modules[target] = ModuleEntry(
            "lora", f"{target}.weight", [dim, dim], lora_params(rank, 2 * rank, False),
            {"lora_A": TensorRef(f"{target}.lora_A", "F32", [rank, dim]),
             "lora_B": TensorRef(f"{target}.lora_B", "F32", [dim, rank])})
        lora.tensors.update({f"{target}.lora_A": a, f"{target}.lora_B": b})
        coefs = {"coef_A": torch.randn(k, generator=gen), "coef_B": torch.randn(k, generator=gen)}
        entry, coefs = nola_module(target, f"{target}.weight", [dim, dim], rank, 2.0,
                                   {"A": {"seed": 2 * i + 1, "num_basis": k}, "B": {"seed": 2 * i + 2, "num_basis": k}},
                                   coefs)
        nola.manifest.modules[target] = entry
        nola.tensors.update({entry.tensors[r].name: t for r, t in coefs.items()})
    return base, lora, nola


def median_time(fn, reps, device):
    if device == "cuda":
        fn()  # CUDA context and kernels; CPU runs need no warm-up worth its cost here
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def merge_all(adapter, base, device):
    tensors = {n: t.to(device) for n, t in adapter.tensors.items()}
    for target, entry in adapter.manifest.modules.items():
        method = get_method(entry.method)
        method.merged(entry, {r: tensors[ref.name] for r, ref in entry.tensors.items()}, base[entry.base_weight])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", type=int, default=4)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    base, lora, nola = build(args.modules, args.dim, args.rank, args.k)
    print(f"{args.modules} modules {args.dim}x{args.dim}, r={args.rank}, k=l={args.k}, torch threads "
          f"{torch.get_num_threads()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        dev_base = {n: t.to(device) for n, t in base.items()}
        t_lora = median_time(lambda: merge_all(lora, dev_base, device), args.reps, device)
        t_nola = median_time(lambda: merge_all(nola, dev_base, device), args.reps, device)
        print(f"[{device}] W+ΔW only: LoRA {t_lora * 1e3:.1f} ms, NOLA {t_nola * 1e3:.1f} ms, "
              f"ratio NOLA/LoRA {t_nola / t_lora:.1f}x (target <= 2x)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        save_file(base, str(tmp / "base" / "model.safetensors"))
        write_adapter(lora, tmp / "lora.safetensors")
        write_adapter(nola, tmp / "nola.safetensors")
        runs = {}
        for name in ("lora", "nola"):
            out = tmp / f"out_{name}"
            runs[name] = median_time(lambda: merge(tmp / "base", [(tmp / f"{name}.safetensors", 1.0)], out,
                                                   force=True, overwrite=True), args.reps, "cpu")
        print(f"[cpu] adapterfmt merge end to end: LoRA {runs['lora'] * 1e3:.1f} ms, NOLA {runs['nola'] * 1e3:.1f} "
              f"ms, ratio {runs['nola'] / runs['lora']:.1f}x; NOLA file "
              f"{(tmp / 'nola.safetensors').stat().st_size:,} B vs LoRA {(tmp / 'lora.safetensors').stat().st_size:,} B")


if __name__ == "__main__":
    main()
