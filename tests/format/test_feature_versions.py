"""Feature-level version stamping (spec README §3 "Features by minor", format/versions.py FEATURE_SINCE).

A file using a feature added in 1.3 is written as 1.3; the same file declaring 1.2 is refused with
ManifestError (the 1.2 schema has no such feature), as a 1.2 method in a 1.1 file is refused with
UnknownMethodError. Files without such features keep the version of their methods.
"""
from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterfmt import read_adapter
from adapterfmt.errors import ManifestError
from adapterfmt.format import Adapter, Manifest, ModuleEntry, TensorRef, write_adapter
from adapterfmt.format.versions import KEY_VERSION, METHOD_SINCE, version_for_methods
from adapterfmt.methods.lora import lora_params

ROOT = Path(__file__).resolve().parents[2]
EPS = 2.0**-23


def _adapter(method, shape, params, tensors, layer="linear"):
    gen = torch.Generator().manual_seed(0)
    manifest = Manifest(created_by="feature test")
    refs, values = {}, {}
    for role, dims in tensors.items():
        values[f"m.{role}"] = torch.randn(*dims, generator=gen).abs() + 0.5
        refs[role] = TensorRef(f"m.{role}", "F32", list(dims))
    manifest.modules["m"] = ModuleEntry(method, "m.weight", list(shape), params, refs, False, layer)
    return Adapter(manifest, values)


def dora(axis="out", eps=None, conv=False):
    params = dict(lora_params(1, 2, False), magnitude_axis=axis)
    if eps is not None:
        params["norm_eps"] = eps
    if conv:
        return _adapter("dora", (4, 3, 3, 3), params, {"lora_A": (1, 3, 3, 3), "lora_B": (4, 1, 1, 1),
                                                       "magnitude": (4,)}, "conv2d")
    return _adapter("dora", (4, 6), params, {"lora_A": (1, 6), "lora_B": (4, 1), "magnitude": (6 if axis == "in" else 4,)})


LOHA = {"rank": 2, "alpha": 2.0, "scale": 1.0}
FEATURES = {
    "loha_conv2d_flat": lambda: _adapter("loha", (4, 3, 3, 3), LOHA, {"w1_a": (4, 2), "w1_b": (2, 3, 3, 3),
                                                                     "w2_a": (4, 2), "w2_b": (2, 3, 3, 3)}, "conv2d"),
    "loha_conv2d_tucker": lambda: _adapter("loha", (4, 3, 3, 3), LOHA, {
        "w1_a": (2, 4), "w1_b": (2, 3), "w2_a": (2, 4), "w2_b": (2, 3), "t1": (2, 2, 3, 3), "t2": (2, 2, 3, 3)},
        "conv2d"),
    "lokr_conv2d": lambda: _adapter("lokr", (4, 3, 3, 3), {"w1_shape": [2, 1], "w2_shape": [2, 3], "rank": 2,
                                                           "alpha": 2.0, "convention": "lycoris", "scale": 1.0},
                                    {"w1": (2, 1), "w2": (2, 3, 3, 3)}, "conv2d"),
    "dora_axis_in": lambda: dora("in"),
    "dora_norm_eps": lambda: dora("out", EPS),
    "dora_in_eps": lambda: dora("in", EPS),
    "dora_conv2d": lambda: dora(conv=True),
}
NO_FEATURE = {
    "lora": lambda: _adapter("lora", (4, 6), lora_params(1, 2, False), {"lora_A": (1, 6), "lora_B": (4, 1)}),
    "dora_out": lambda: dora("out"),
    "loha_linear": lambda: _adapter("loha", (4, 6), LOHA, {"w1_a": (4, 2), "w1_b": (2, 6), "w2_a": (4, 2),
                                                          "w2_b": (2, 6)}),
    "lora_conv2d": lambda: _adapter("lora", (4, 3, 3, 3), lora_params(1, 2, False),
                                    {"lora_A": (1, 3, 3, 3), "lora_B": (4, 1, 1, 1)}, "conv2d"),
}


def version_of(path: Path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])["__metadata__"][KEY_VERSION]


def redeclare(path: Path, version: str, out: Path) -> Path:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    metadata = json.loads(raw[8:8 + n])["__metadata__"]
    save_file(load_file(str(path)), str(out), metadata=dict(metadata, **{KEY_VERSION: version}))
    return out


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_a_1_3_feature_is_stamped_1_3_and_refused_in_a_1_2_file(name, tmp_path):
    path = write_adapter(FEATURES[name](), tmp_path / "a.safetensors")
    assert version_of(path) == "1.3"
    read_adapter(path)
    for older in ("1.2", "1.1"):
        with pytest.raises(ManifestError, match="defined from format 1.3, but the file declares " + older):
            read_adapter(redeclare(path, older, tmp_path / f"{older}.safetensors"))


@pytest.mark.parametrize("name", sorted(NO_FEATURE))
def test_files_without_1_3_features_keep_their_methods_version(name, tmp_path):
    path = write_adapter(NO_FEATURE[name](), tmp_path / "a.safetensors")
    assert version_of(path) == "1.1"


def _vectors():
    for version in ("v1.1", "v1.2"):
        index = json.loads((ROOT / "spec" / "vectors" / version / "INDEX.json").read_text())
        yield from (pytest.param(version, e["file"], id=f"{version}/{e['file']}") for e in index["positive"]
                    if e["version"] in ("1.0", "1.1", "1.2"))  # a newer minor's unknown members are not written


@pytest.mark.parametrize("version, name", list(_vectors()))
def test_released_vectors_round_trip_with_the_version_of_their_methods(version, name, tmp_path):
    """The writer's only change is the version string; the released vectors' round trips keep it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = read_adapter(ROOT / "spec" / "vectors" / version / name)
    path = write_adapter(adapter, tmp_path / "out.safetensors")
    methods = adapter.manifest.methods()
    assert version_of(path) == "{}.{}".format(*version_for_methods(methods))
    assert not any(METHOD_SINCE.get(m, (1, 1)) > (1, 2) for m in methods)
