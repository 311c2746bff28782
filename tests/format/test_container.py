"""The container: golden header bytes, round trips, schema, and the reader's refusals."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from adapterfmt.errors import HeaderError, ManifestError, TensorError, UnknownMethodError, VersionError
from adapterfmt import read_adapter
from adapterfmt.format import Adapter, Manifest, ModuleEntry, TensorRef, write_adapter
from adapterfmt.format.schema import validate_manifest_dict
from adapterfmt.format.versions import KEY_MANIFEST, KEY_VERSION
from adapterfmt.methods.lora import lora_params


def one_module_adapter(a=None, b=None):
    a = torch.arange(6, dtype=torch.float32).view(1, 6) if a is None else a
    b = torch.ones(4, 1) if b is None else b
    manifest = Manifest(created_by="golden")
    manifest.modules["m.q"] = ModuleEntry(
        "lora", "m.q.weight", [4, 6], lora_params(1, 2, False),
        {"lora_A": TensorRef("m.q.lora_A", "F32", [1, 6]), "lora_B": TensorRef("m.q.lora_B", "F32", [4, 1])})
    return Adapter(manifest, {"m.q.lora_A": a, "m.q.lora_B": b})


def header_of(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8:8 + length]), raw


def test_golden_header(tmp_path):
    path = write_adapter(one_module_adapter(), tmp_path / "a.safetensors")
    length, header, raw = header_of(path)
    assert length % 8 == 0 and len(raw) == 8 + length + (6 + 4) * 4
    meta = header.pop("__metadata__")
    assert header == {"m.q.lora_A": {"dtype": "F32", "shape": [1, 6], "data_offsets": [0, 24]},
                      "m.q.lora_B": {"dtype": "F32", "shape": [4, 1], "data_offsets": [24, 40]}}
    assert meta["adapterfmt.format"] == "adapterfmt" and meta["adapterfmt.version"] == "1.1"
    assert meta["format"] == "pt"
    assert meta[KEY_MANIFEST] == (
        '{"base":{"architecture":null,"name_or_path":null,"revision":null,"weights":{}},"created_by":"golden",'
        '"modules":{"m.q":{"base_weight":"m.q.weight","fan_in_fan_out":false,"layer":"linear",'
        '"method":"lora","params":{"alpha":2.0,"rank":1,"scale":2.0,"use_rslora":false},'
        '"shape":[4,6],"tensors":{"lora_A":{"dtype":"F32","name":"m.q.lora_A","shape":[1,6]},'
        '"lora_B":{"dtype":"F32","name":"m.q.lora_B","shape":[4,1]}}}},"payloads":{}}')
    assert raw[8 + length:8 + length + 24] == torch.arange(6, dtype=torch.float32).numpy().tobytes()


def test_round_trip_is_bit_exact(tmp_path):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(1, 6).to(dtype), torch.randn(4, 1).to(dtype)
        adapter = one_module_adapter(a, b)
        for role in ("lora_A", "lora_B"):
            adapter.manifest.modules["m.q"].tensors[role].dtype = {torch.float32: "F32", torch.bfloat16: "BF16",
                                                                   torch.float16: "F16"}[dtype]
        back = read_adapter(write_adapter(adapter, tmp_path / f"{dtype}.safetensors"))
        assert torch.equal(back.tensors["m.q.lora_A"].view(torch.uint8), a.view(torch.uint8))
        assert torch.equal(back.tensors["m.q.lora_B"].view(torch.uint8), b.view(torch.uint8))
        assert back.manifest.to_json() == adapter.manifest.to_json()


def rewrite_metadata(tmp_path, edit, tensors=None):
    src = write_adapter(one_module_adapter(), tmp_path / "a.safetensors", overwrite=True)
    _, header, _ = header_of(src)
    meta = dict(header["__metadata__"])
    edit(meta)
    dst = tmp_path / "edited.safetensors"
    save_file(tensors or {"m.q.lora_A": torch.arange(6.0).view(1, 6), "m.q.lora_B": torch.ones(4, 1)},
              str(dst), metadata=meta)
    return dst


def test_unknown_major_is_refused(tmp_path):
    path = rewrite_metadata(tmp_path, lambda m: m.update({KEY_VERSION: "2.0"}))
    with pytest.raises(VersionError, match="2.0 is not supported"):
        read_adapter(path)


def test_newer_minor_with_unknown_fields_reads_with_warning(tmp_path):
    def edit(meta):
        manifest = json.loads(meta[KEY_MANIFEST])
        manifest["future_field"] = {"x": 1}
        manifest["modules"]["m.q"]["future_module_field"] = True
        meta[KEY_MANIFEST] = json.dumps(manifest)
        meta[KEY_VERSION] = "1.7"
    path = rewrite_metadata(tmp_path, edit)
    with pytest.warns(UserWarning, match="1.7"):
        adapter = read_adapter(path)
    assert list(adapter.manifest.modules) == ["m.q"]


@pytest.mark.parametrize("edit, error, match", [
    (lambda m: m.pop(KEY_MANIFEST), ManifestError, "manifest metadata key is missing"),
    (lambda m: m.update({KEY_MANIFEST: "{not json"}), ManifestError, "not valid JSON"),
    (lambda m: m.update({KEY_VERSION: "one"}), ManifestError, "MAJOR.MINOR"),
    (lambda m: m.pop("adapterfmt.format"), ManifestError, "not an adapterfmt file"),
    (lambda m: m.update({KEY_MANIFEST: m[KEY_MANIFEST].replace('"lora"', '"mystery"')}),
     UnknownMethodError, "unknown adapter method 'mystery'"),
    (lambda m: m.update({KEY_MANIFEST: m[KEY_MANIFEST].replace('"shape":[4,1]', '"shape":[4,2]')}),
     ManifestError, "disagrees|manifest says"),
    (lambda m: m.update({KEY_MANIFEST: m[KEY_MANIFEST].replace('"m.q":{', '"../etc":{')}),
     ManifestError, "schema"),
])
def test_reader_refusals(tmp_path, edit, error, match):
    with pytest.raises(error, match=match):
        read_adapter(rewrite_metadata(tmp_path, edit))


def test_extra_and_missing_tensors(tmp_path):
    extra = rewrite_metadata(tmp_path, lambda m: None, {"m.q.lora_A": torch.zeros(1, 6),
                                                       "m.q.lora_B": torch.zeros(4, 1), "stray": torch.zeros(1)})
    with pytest.raises(TensorError, match="'stray' is not described"):
        read_adapter(extra)
    missing = rewrite_metadata(tmp_path, lambda m: None, {"m.q.lora_A": torch.zeros(1, 6)})
    with pytest.raises(TensorError, match="'m.q.lora_B' named in the manifest is missing"):
        read_adapter(missing)


def test_truncated_file(tmp_path):
    path = write_adapter(one_module_adapter(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    for cut in (4, 20, len(data) - 3):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(HeaderError) as info:
            read_adapter(bad)
        assert "truncated or corrupt" in info.value.one_line() and str(bad) in info.value.one_line()


def test_schema_rejects_inconsistent_manifests():
    data = json.loads(one_module_adapter().manifest.to_json())
    validate_manifest_dict(data)
    data["modules"]["m.q"]["params"].pop("scale")
    with pytest.raises(ManifestError, match="scale"):
        validate_manifest_dict(data)


def test_write_refuses_manifest_tensor_disagreement(tmp_path):
    adapter = one_module_adapter(b=torch.ones(4, 2))
    with pytest.raises(ManifestError):
        write_adapter(adapter, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    from adapterfmt.errors import UsageError
    path = write_adapter(one_module_adapter(), tmp_path / "a.safetensors")
    before = path.read_bytes()
    with pytest.raises(UsageError, match="output already exists"):
        write_adapter(one_module_adapter(b=torch.zeros(4, 1)), path)
    assert path.read_bytes() == before
    write_adapter(one_module_adapter(b=torch.zeros(4, 1)), path, overwrite=True)
    assert path.read_bytes() != before
