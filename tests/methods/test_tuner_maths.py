"""Building blocks of the PEFT tuner methods against PEFT's own functions."""
from __future__ import annotations

import pytest
import torch

from adapterfmt.formats.peft.tuners.lokr_layout import factorization, peft_layout
from adapterfmt.methods.oft import OftParams, rotations


def test_lokr_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization
    for dim in range(1, 400):
        for factor in (-1, 0, 1, 2, 3, 4, 5, 8, 16):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


def test_lokr_layout_matches_peft_linear_layers():
    from peft import LoKrConfig, get_peft_model
    for out_f, in_f, rank, factor, both in [(64, 96, 2, -1, False), (64, 64, 4, -1, False), (96, 64, 2, 4, True),
                                            (128, 48, 1, -1, True), (60, 90, 3, 5, False)]:
        model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f))
        peft = get_peft_model(model, LoKrConfig(r=rank, target_modules=["0"], decompose_factor=factor,
                                                decompose_both=both))
        layer = peft.base_model.model[0]
        names = {n.split(".")[0] for n, _ in layer.named_parameters() if n.startswith("lokr_")}
        (a, b), (c, d), w1_full, w2_full = peft_layout(out_f, in_f, rank, factor, both)
        assert ("lokr_w1" in names) == w1_full and ("lokr_w2" in names) == w2_full
        w1 = layer.lokr_w1["default"] if w1_full else layer.lokr_w1_a["default"] @ layer.lokr_w1_b["default"]
        w2 = layer.lokr_w2["default"] if w2_full else layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]
        assert tuple(w1.shape) == (a, c) and tuple(w2.shape) == (b, d)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("coft", [False, True])
def test_oft_rotations_bit_identical_to_peft(terms, coft):
    from peft.tuners.oft.layer import OFTRotationModule
    gen = torch.Generator().manual_seed(terms)
    block, count = 6, 4
    vectors = torch.randn(count, block * (block - 1) // 2, generator=gen) * 0.1
    for neumann in (True, False):
        module = OFTRotationModule(count, vectors.shape[1], block, block * count, coft=coft, eps=1e-2,
                                   use_cayley_neumann=neumann, num_cayley_neumann_terms=terms)
        with torch.no_grad():
            module.weight.copy_(vectors)
        want = module.get_weight()  # block diagonal, projected first when coft
        params = OftParams(block_size=block, block_share=False, cayley="neumann" if neumann else "exact",
                           neumann_terms=terms, coft=coft, eps=1e-2)
        got = torch.block_diag(*rotations(vectors, params))
        assert torch.equal(got, want), (terms, coft, neumann)


def test_adalora_denominator_is_peft_fp32():
    from adapterfmt.methods.adalora import ranknum_denominator
    for init_r in (1, 6, 12, 64):
        ranknum = torch.nn.Parameter(torch.randn(1), requires_grad=False)
        ranknum.data.fill_(float(init_r))
        assert torch.equal(ranknum_denominator(init_r), ranknum + 1e-5)
