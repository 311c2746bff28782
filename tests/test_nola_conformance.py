"""NOLA conformance vectors (spec/nola.md §7): the stored adapter validates and yields the stored ΔW."""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from adapterfmt.format import read_adapter
from adapterfmt.format.container import read_header
from adapterfmt.methods import get_method
from adapterfmt.methods.nola.reference_numpy import nola_basis_numpy
from adapterfmt.ops.validate import validate

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
ADAPTER, EXPECTED = VECTORS / "v1.0" / "nola_small.safetensors", VECTORS / "v1.0" / "nola_small.expected.safetensors"


def test_vectors_are_tiny_and_validate():
    assert ADAPTER.stat().st_size < 4096 and EXPECTED.stat().st_size < 4096
    result = validate(ADAPTER)
    assert result.valid, result.problems
    meta, _ = read_header(ADAPTER)
    manifest = json.loads(meta["adapterfmt.manifest"])
    seeds = {m: (p["params"]["A"]["seed"], p["params"]["B"]["seed"]) for m, p in manifest["modules"].items()}
    assert seeds["model.layers.0.mlp.down_proj"] == ("18446744073709551615", "9007199254740993")


def test_delta_matches_expected():
    adapter, expected = read_adapter(ADAPTER), load_file(EXPECTED)
    assert set(expected) == set(adapter.manifest.modules)
    for target, entry in adapter.manifest.modules.items():
        got = get_method("nola").delta(entry, adapter.module_tensors(target)).double()
        ref = expected[target]
        assert ref.dtype == torch.float64
        assert torch.allclose(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max())), target


def test_expected_delta_from_numpy_reference():
    """Recompute ΔW with the numpy Philox reference and float64 numpy arithmetic only."""
    adapter, expected = read_adapter(ADAPTER), load_file(EXPECTED)
    for target, entry in adapter.manifest.modules.items():
        t = {r: v.double().numpy() for r, v in adapter.module_tensors(target).items()}
        out_f, in_f = entry.shape
        rank = entry.params["rank"]
        factors = []
        for side, dims in (("A", (rank, in_f)), ("B", (out_f, rank))):
            info = entry.params[side]
            basis = nola_basis_numpy(int(info["seed"]), (info["num_basis"], *dims)).astype(np.float64)
            f = np.einsum("k,kij->ij", t[f"coef_{side}"], basis) * info["basis_scale"]
            factors.append(f + t.get(f"offset_{side}", 0.0))
        ref = entry.params["scale"] * factors[1] @ factors[0]
        np.testing.assert_allclose(expected[target].numpy(), ref, rtol=1e-12, atol=1e-12)
