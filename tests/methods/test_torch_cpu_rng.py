"""The numpy torch-CPU stream (adapterfmt.methods.torch_cpu_rng) against torch itself and PEFT's buffers."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from adapterfmt.errors import UsageError
from adapterfmt.methods.torch_cpu_rng import (
    RANDPERM_INSIDE_OUT_FROM,
    TorchCpuGenerator,
    initial_state,
    kaiming_uniform,
    rand,
    randperm,
    uniform,
)
from adapterfmt.methods.torch_cpu_rng_peft import fourierft_indices, vera_projections

SEEDS = [0, 1, 5, 777, 2**32 + 5, 2**40 + 12345, 2**63 - 1, 2**64 - 1, -1, -(2**63)]
# Around the 16-element and 624-word boundaries, odd, prime, and one bulk (numpy engine) size.
SIZES = [1, 2, 3, 15, 16, 17, 31, 623, 624, 625, 1249, 4099, 70001]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# AVX2/AVX512 kernels contract uniform_'s x * (to - from) + from into an FMA; the default one does not.
TORCH_FMA = torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def torch_gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def torch_state(gen: torch.Generator) -> tuple[np.ndarray, int]:
    """(624 state words, next index) from torch's serialized CPU generator state."""
    raw = gen.get_state().numpy().tobytes()
    nxt = int(np.frombuffer(raw[16:24], dtype=np.uint64)[0])
    return np.frombuffer(raw[24:24 + 624 * 8], dtype=np.uint64).astype(np.uint32), nxt


def as_f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().numpy()


@pytest.mark.parametrize("seed", SEEDS)
def test_seeding_matches_torch_state(seed):
    words, nxt = torch_state(torch_gen(seed))
    assert np.array_equal(words, initial_state(seed)) and nxt == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_state_and_words_after_draws_match_torch(seed):
    t_gen, ours = torch_gen(seed), TorchCpuGenerator(seed)
    # int64 random_() keeps the low 63 bits of each 64-bit draw (two words, first one high).
    t_words = torch.empty(1249, dtype=torch.int64).random_(generator=t_gen).numpy()
    ours_words = (ours.random64(1249) & np.uint64(2**63 - 1)).astype(np.int64)
    assert np.array_equal(t_words, ours_words)
    t_state, t_next = torch_state(t_gen)
    o_state, o_next = ours.state()
    assert np.array_equal(t_state, o_state) and t_next == o_next


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("seed", SEEDS[::2])
def test_uniform_matches_torch(seed, dtype):
    for size in SIZES:
        expected = as_f32(torch.empty(size, dtype=TORCH_DTYPES[dtype]).uniform_(-0.37, 0.81, generator=torch_gen(seed)))
        got = uniform(TorchCpuGenerator(seed), (size,), -0.37, 0.81, dtype=dtype, fma=TORCH_FMA)
        assert np.array_equal(expected, got), (seed, size, dtype)


def test_fma_and_plain_variants_differ_and_rand_is_exact_in_both():
    fused = uniform(TorchCpuGenerator(3), (4096,), -0.2, 0.2, fma=True)
    plain = uniform(TorchCpuGenerator(3), (4096,), -0.2, 0.2, fma=False)
    assert (fused != plain).sum() > 1000  # ~half the elements differ by one ulp
    assert np.max(np.abs(fused - plain)) <= np.spacing(np.float32(0.2))
    expected = torch.rand(3, 5, 7, generator=torch_gen(11)).numpy()
    assert np.array_equal(expected, rand(TorchCpuGenerator(11), (3, 5, 7)))


@pytest.mark.parametrize("a", [0, math.sqrt(5)])
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_kaiming_uniform_matches_torch(a, dtype):
    for seed in SEEDS[:6]:
        for shape in [(4, 17), (17, 4), (3, 1, 33), (2, 3, 5, 5), (1, 4099)]:
            tensor = torch.empty(shape, dtype=TORCH_DTYPES[dtype])
            expected = as_f32(torch.nn.init.kaiming_uniform_(tensor, a=a, generator=torch_gen(seed)))
            got = kaiming_uniform(TorchCpuGenerator(seed), shape, a=a, dtype=dtype, fma=TORCH_FMA)
            assert np.array_equal(expected, got), (seed, shape)


def test_zero_element_kaiming_draws_nothing():
    gen = TorchCpuGenerator(9)
    assert kaiming_uniform(gen, (0, 4)).shape == (0, 4)
    assert np.array_equal(rand(gen, (3,)), rand(TorchCpuGenerator(9), (3,)))


@pytest.mark.parametrize("seed", SEEDS)
def test_randperm_and_prefix_and_advance_match_torch(seed):
    for n in [0, 1, 2, 3, 16, 17, 625, 4096, 20011]:
        t_gen, ours = torch_gen(seed), TorchCpuGenerator(seed)
        expected = torch.randperm(n, generator=t_gen).numpy()
        assert np.array_equal(expected, randperm(ours, n)), (seed, n)
        # The generator advances as torch's does: the next draws still agree.
        assert np.array_equal(torch.rand(5, generator=t_gen).numpy(), rand(ours, (5,)))
        for prefix in {0, min(1, n), n // 3, n}:
            assert np.array_equal(expected[:prefix], randperm(TorchCpuGenerator(seed), n, prefix))


@pytest.mark.skipif(os.environ.get("ADAPTERFMT_SLOW_TESTS") != "1",
                    reason="2 GB and ~30 s: set ADAPTERFMT_SLOW_TESTS=1")
def test_randperm_inside_out_path_matches_torch():
    n = RANDPERM_INSIDE_OUT_FROM  # first n that takes torch's 64-bit inside-out shuffle
    t_gen, ours = torch_gen(777), TorchCpuGenerator(777)
    expected = torch.randperm(n, generator=t_gen)[:3000].numpy()
    assert np.array_equal(expected, randperm(ours, n, 3000))
    assert np.array_equal(torch.rand(5, generator=t_gen).numpy(), rand(ours, (5,)))


def test_bad_arguments_are_usage_errors():
    for seed in [2**64, -(2**63) - 1, 1.5, True, "7"]:
        with pytest.raises(UsageError):
            TorchCpuGenerator(seed)
    with pytest.raises(UsageError):
        randperm(TorchCpuGenerator(0), 5, 6)
    with pytest.raises(UsageError):
        uniform(TorchCpuGenerator(0), (2,), 1.0, -1.0)
    with pytest.raises(UsageError):
        uniform(TorchCpuGenerator(0), (2,), 0.0, 1.0, dtype="float64")


NO_TORCH_SCRIPT = """
import sys, types
sys.modules["torch"] = None  # any torch import now fails
for name, path in [("adapterfmt", "adapterfmt"), ("adapterfmt.methods", "adapterfmt/methods")]:
    package = types.ModuleType(name)  # bare packages: skip __init__ files that may import torch
    package.__path__ = [path]
    sys.modules[name] = package
from adapterfmt.methods.torch_cpu_rng_peft import fourierft_indices, vera_projections
vera_a, vera_b = vera_projections(0, 2, 3, 2)
print(vera_a.tobytes().hex(), vera_b.tobytes().hex(), fourierft_indices(777, 4, 5, 3).tobytes().hex())
"""


def test_numpy_side_runs_without_torch():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    vera_a, vera_b = vera_projections(0, 2, 3, 2)
    expected = [vera_a.tobytes().hex(), vera_b.tobytes().hex(), fourierft_indices(777, 4, 5, 3).tobytes().hex()]
    assert out.stdout.split() == expected


# torch 2.11.0 (measured, see tools/torch_rng_versions/): kaiming_uniform_(empty((3, 1, 1000), dtype), a=sqrt(5),
# generator=manual_seed(1)), first 8 values. torch 2.12 changed bfloat16/float16 uniform_ on CPU.
TORCH_2_11_NARROW = {
    "bfloat16": ["-0x1.72p-6", "0x1.b2p-6", "0x1.86p-9", "-0x1.c8p-7", "0x1.02p-5", "0x1.24p-9", "0x1.3p-6", "0x1.44p-10"],
    "float16": ["0x1.2b8p-10", "-0x1.8fp-6", "0x1.cb4p-6", "0x1.238p-9", "0x1.84p-6", "-0x1.e18p-9", "-0x1.388p-7",
                "0x1.464p-6"],
}


@pytest.mark.parametrize("dtype", list(TORCH_2_11_NARROW))
def test_legacy_narrow_reproduces_torch_2_11(dtype):
    expected = np.array([float.fromhex(v) for v in TORCH_2_11_NARROW[dtype]], dtype=np.float32)
    for fma in (True, False):  # the legacy products are exact: no FMA dependence
        got = kaiming_uniform(TorchCpuGenerator(1), (3, 1, 1000), a=math.sqrt(5), dtype=dtype, fma=fma,
                              legacy_narrow=True)
        assert np.array_equal(got.ravel()[:8], expected)
    current = kaiming_uniform(TorchCpuGenerator(1), (3, 1, 1000), a=math.sqrt(5), dtype=dtype)
    assert not np.array_equal(current.ravel()[:8], expected)


def test_own_twist_and_numpy_bulk_engine_give_the_same_words(monkeypatch):
    from adapterfmt.methods import torch_cpu_rng
    sizes = [1000, 200_000, 777, 70_000]  # crossing BULK_WORDS both ways, mid-block positions
    bulk = TorchCpuGenerator(2**63 - 1)
    bulk_words = [bulk.random(n) for n in sizes]
    monkeypatch.setattr(torch_cpu_rng, "BULK_WORDS", 1 << 40)  # own twist only
    own = TorchCpuGenerator(2**63 - 1)
    for n, words in zip(sizes, bulk_words):
        assert np.array_equal(own.random(n), words)
    assert np.array_equal(own.state()[0], bulk.state()[0]) and own.state()[1] == bulk.state()[1]
