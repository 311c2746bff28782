"""Throughput of the pinned NOLA basis generator vs torch.rand on the same device.

    python bench/bench_nola_generator.py [--device cpu|cuda] [--numel N] [--reps R]

Prints elements/s (median over repetitions) for ``nola_basis`` and
``torch.rand`` and their ratio.  With ``--device cuda`` it also checks that
the GPU basis is bit-identical to the CPU one.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from adapterfmt import nola_generator as g  # noqa: E402


def _median_seconds(fn, device, reps):
    fn()  # warm-up (allocator, CUDA context, wrapping-mul probe)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seed", type=int, default=2**40 + 12345)
    ap.add_argument("--chunk-counters", type=int, default=None,
                    help="override adapterfmt.methods.nola.generator.CHUNK_COUNTERS")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA requested but torch.cuda.is_available() is False")
    if args.chunk_counters:
        g.CHUNK_COUNTERS = args.chunk_counters
    dev = torch.device(args.device)
    n = args.numel

    t_gen = _median_seconds(lambda: g.nola_basis(args.seed, (n,), device=dev), dev, args.reps)
    t_rand = _median_seconds(lambda: torch.rand(n, device=dev), dev, args.reps)
    print(f"device={dev} numel={n} threads={torch.get_num_threads()} "
          f"chunk_counters={g.CHUNK_COUNTERS} wrapping_mul={g._wrapping_mul_ok(dev)}")
    print(f"nola_basis : {n / t_gen:,.0f} elements/s ({t_gen * 1e3:.1f} ms)")
    print(f"torch.rand : {n / t_rand:,.0f} elements/s ({t_rand * 1e3:.1f} ms)")
    print(f"ratio      : nola_basis is {t_gen / t_rand:.2f}x the time of torch.rand")

    if dev.type == "cuda":
        m = min(n, 1 << 22)  # keep the CPU side of the check quick
        same = torch.equal(g.nola_basis(args.seed, (m,), device=dev).cpu(),
                           g.nola_basis(args.seed, (m,)))
        print(f"cpu == cuda (first {m} elements, bit-exact): {same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
