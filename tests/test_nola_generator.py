"""Tests for the pinned NOLA basis generator (philox4x32-10/v1)."""
import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import adapterfmt.methods.nola.generator as g
from adapterfmt.methods.nola.generator import (GENERATOR_ID, GENERATOR_VERSION, _basis_range,
                                       basis_fingerprint, nola_basis, philox4x32_10)
from adapterfmt.methods.nola.reference_numpy import nola_basis_numpy, philox4x32_10_numpy

# Random123 kat_vectors, "philox4x32 10": counter, key -> output (hex words).
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
SEEDS = [0, 1, 2**32 - 1, 2**32, 2**40 + 12345, 2**64 - 1]
SHAPES = [(3, 5, 7), (1, 1, 1), (2, 3), (5,), (4, 8), (0,), (2, 0, 3)]

# adapterfmt-level vectors, copied from spec/nola-generator.md section 5.
VECTORS = [
    (0, (2, 3), "-0x1.9d818p-3 0x1.85a714p-1 0x1.e2bd6p-2 0x1.b00dbp-3 0x1.e3933p-1 -0x1.1a7p-2",
     "2e00c97a0fd037cfeda51427a96b663ad572373627bd25d2af20d48232b228fb"),
    (2**40 + 12345, (5,), "0x1.66e65p-2 -0x1.01a7ap-1 0x1.aaefep-1 0x1.2eb534p-1 -0x1.c71ae8p-1",
     "1b0d128d6411e922fa60b045fdc1c41cb33d5f55cc7b3de3b55a4bbfaef06467"),
    (2**64 - 1, (1, 2, 3), "-0x1.ab712p-4 -0x1.aae2e4p-1 0x1.f41bp-3 -0x1.761998p-1 "
     "-0x1.9804acp-1 -0x1.a4c1p-2",
     "a3e02d828a158052d0b6655c03cdc640f4fa121f1e34c035eb5e3682a844affc"),
]



@pytest.fixture(params=[True, False], ids=["wrapmul", "split16"])
def mul_path(request, monkeypatch):
    """Run a test under both exact multiply strategies."""
    monkeypatch.setattr(g, "USE_WRAPPING_MUL", request.param)
    return request.param


def test_ids():
    assert GENERATOR_ID == "philox4x32-10" and GENERATOR_VERSION == 1


@pytest.mark.parametrize("ctr,key,want", KATS)
def test_kat_torch(ctr, key, want, mul_path):
    got = philox4x32_10(torch.tensor(ctr), torch.tensor(key))
    assert tuple(got.tolist()) == want


@pytest.mark.parametrize("ctr,key,want", KATS)
def test_kat_numpy(ctr, key, want):
    assert tuple(int(w) for w in philox4x32_10_numpy(ctr, key)) == want


def test_kat_torch_batched(mul_path):
    # All three at once, with per-row keys: exercises tensor-valued keys.
    c = torch.tensor([k[0] for k in KATS])
    k = torch.tensor([k[1] for k in KATS])
    assert philox4x32_10(c, k).tolist() == [list(k[2]) for k in KATS]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_matches_numpy(seed, shape, mul_path):
    t = nola_basis(seed, shape)
    n = nola_basis_numpy(seed, shape)
    assert t.dtype == torch.float32 and n.dtype == np.float32
    assert tuple(t.shape) == shape == n.shape
    assert t.numpy().tobytes() == n.tobytes()


@pytest.mark.parametrize("seed,shape,hexes,fp", VECTORS)
def test_spec_vectors(seed, shape, hexes, fp, mul_path):
    want = [float.fromhex(h) for h in hexes.split()]
    assert nola_basis(seed, shape).reshape(-1).tolist() == want
    assert nola_basis_numpy(seed, shape).reshape(-1).tolist() == want
    assert basis_fingerprint(seed, shape) == fp


def test_mul_paths_agree_on_extremes(monkeypatch):
    # Products near 2**64 (all-ones words) are where a sloppy mul-hi breaks.
    c = torch.tensor([[0xFFFFFFFF, 0, 0xFFFFFFFF, 0], [0x80000000, 1, 0xFFFFFFFE, 2]])
    k = torch.tensor([0xFFFFFFFF, 0xFFFFFFFF])
    fast = philox4x32_10(c, k)
    monkeypatch.setattr(g, "USE_WRAPPING_MUL", False)
    assert torch.equal(philox4x32_10(c, k), fast)
    assert fast.tolist() == philox4x32_10_numpy(c.numpy(), k.numpy()).astype(np.int64).tolist()


def test_counter_layout():
    # Element n is word n % 4 of philox((lo32(n//4), hi32(n//4), 0, 0), key).
    seed = 2**40 + 12345
    key = [seed & 0xFFFFFFFF, seed >> 32]
    for n in [0, 1, 2, 3, 4, 9, 4 * 2**32 + 2]:  # last one has a nonzero hi32 word
        c = n // 4
        u = int(philox4x32_10_numpy([c & 0xFFFFFFFF, c >> 32, 0, 0], key)[n % 4])
        want = np.float32((2 * (u >> 8) - 2**24) * 2.0**-24)
        got = _basis_range(seed, n, n + 1)
        assert got.numpy().tobytes() == want.tobytes()


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_chunk_boundaries(chunk, monkeypatch, mul_path):
    seed, shape = 2**64 - 1, (3, 5, 7)
    whole = nola_basis(seed, shape)
    monkeypatch.setattr(g, "CHUNK_COUNTERS", chunk)
    assert torch.equal(nola_basis(seed, shape), whole)
    # Arbitrary unaligned sub-ranges agree with slices of the whole basis.
    flat = whole.view(-1)
    for start, stop in [(0, 1), (1, 6), (3, 4), (5, 105), (104, 105), (7, 7)]:
        assert torch.equal(_basis_range(seed, start, stop), flat[start:stop])
        assert torch.equal(_basis_range(seed, start, stop, chunk_counters=2), flat[start:stop])


def test_value_grid():
    b = nola_basis(12345, (64, 257)).double()
    assert b.min() >= -1 and b.max() < 1
    scaled = b * 2**23  # multiples of 2**-23 -> integers
    assert torch.equal(scaled, scaled.round())
    assert abs(b.mean().item()) < 0.02  # crude uniformity sanity check


def test_seed_validation():
    for bad in [-1, 2**64, 1.0, True, "1"]:
        with pytest.raises(ValueError):
            nola_basis(bad, (2,))
        with pytest.raises(ValueError):
            nola_basis_numpy(bad, (2,))


def test_fingerprint():
    fp = basis_fingerprint(7, (4, 16, 128))
    assert fp == basis_fingerprint(7, (4, 16, 128))
    assert fp != basis_fingerprint(8, (4, 16, 128))
    # Definition: SHA-256 of LE float32 bytes of the first min(numel, 4096) elements.
    want = hashlib.sha256(nola_basis_numpy(7, (4, 16, 128)).reshape(-1)[:4096]
                          .astype("<f4").tobytes()).hexdigest()
    assert fp == want
    small = hashlib.sha256(nola_basis_numpy(7, (2, 3)).astype("<f4").tobytes()).hexdigest()
    assert basis_fingerprint(7, (2, 3)) == small
    # Only numel matters past the prefix, so a huge basis is cheap to fingerprint.
    assert basis_fingerprint(7, (1 << 20, 1 << 20)) == fp


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**64 - 1),
       shape=st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple))
def test_property_torch_equals_numpy(seed, shape):
    assert nola_basis(seed, shape).numpy().tobytes() == nola_basis_numpy(seed, shape).tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    for seed in [0, 2**40 + 12345, 2**64 - 1]:
        cpu = nola_basis(seed, (3, 77, 129))
        gpu = nola_basis(seed, (3, 77, 129), device="cuda")
        assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
