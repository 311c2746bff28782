"""The probe that learns, from a conversion function, which stored rows each converted tensor is."""
import torch

from adapterfmt.checkpoint.single_file_map import Probe
from adapterfmt.engine.merge_single_file import _put
from adapterfmt.engine.single_file_plan import SliceJob

SHAPES = {"qkv": (6, 4), "proj": (4, 4, 1, 1), "mod": (4, 3), "scale": ()}


def convert(sd):
    """A converter doing what diffusers' do: chunk fused rows, drop 1x1 conv dims, swap halves, transpose,
    compute, and mix two tensors."""
    q, k, v = torch.chunk(sd["qkv"], 3, dim=0)
    shift, scale = sd["mod"].chunk(2, dim=0)
    return {"q": torch.cat([q]), "k": k.clone(), "v": v, "proj": sd["proj"][:, :, 0, 0],
            "mod": torch.cat([scale, shift]), "t": sd["mod"].T.contiguous(), "eye": torch.eye(2),
            "mixed": torch.cat([q, sd["proj"][:2, :, 0, 0]]), "scale": sd["scale"]}


def test_probe_places_row_slices_permutations_and_reshapes_and_refuses_the_rest():
    result = Probe(SHAPES).run(convert)
    placed, unplaced = result.placed, result.unplaced
    assert (placed["q"].stored, placed["q"].rows, placed["q"].shape) == ("qkv", slice(0, 2), (2, 4))
    assert placed["k"].rows == slice(2, 4) and placed["v"].rows == slice(4, 6)
    assert placed["proj"].stored == "proj" and placed["proj"].rows is None and placed["proj"].shape == (4, 4)
    assert placed["mod"].rows.tolist() == [2, 3, 0, 1]
    assert placed["scale"].whole and placed["scale"].shape == ()
    assert "transposes" in unplaced["t"] and "computes" in unplaced["eye"] and "several" in unplaced["mixed"]


def test_merging_into_permuted_rows_lands_on_the_stored_rows():
    source = Probe(SHAPES).run(convert).placed["mod"]
    full = torch.zeros(4, 3)
    delta = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # converted row j is stored row [2,3,0,1][j]
    _put(full, SliceJob("mod", source), delta, add=True)
    assert torch.equal(full, delta[[2, 3, 0, 1]])
    _put(full, SliceJob("mod", source), torch.ones(4, 3), add=False)
    assert torch.equal(full, torch.ones(4, 3))
