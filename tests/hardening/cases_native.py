"""Corpus rows for the adapterfmt container (safetensors header, manifest, tensors, versions)."""
from __future__ import annotations

import json

import torch

from .corpus import Case, Env, edit_manifest, set_tensor, split_file, st_bytes

F = r"bad\.safetensors"  # every row names the damaged file


def bad(env: Env) -> tuple:
    return env.copy(env.shared.adapter, "bad.safetensors"), env.tmp / "out.safetensors"


def raw(data: bytes):
    def build(env: Env):
        path = env.tmp / "bad.safetensors"
        path.write_bytes(data)
        return ["inspect", path]
    return build


def header_with(**tensors) -> bytes:
    """A metadata-bearing header (so detection routes to our reader) plus the given tensor entries."""
    header = {"__metadata__": {"adapterfmt.format": "adapterfmt", "adapterfmt.version": "1.0"}}
    header.update(tensors)
    return header


def truncated(env):
    path, out = bad(env)
    path.write_bytes(path.read_bytes()[:-100])
    return ["convert", path, out]


def manifest_edit(edit, command="validate", version=None):
    def build(env):
        path, out = bad(env)
        edit_manifest(path, edit, version=version)
        return [command, path] + ([out] if command == "convert" else [])
    return build


def first_module(manifest: dict) -> dict:
    return manifest["modules"][sorted(manifest["modules"])[0]]


def retarget(manifest: dict, name: str) -> None:
    key = sorted(manifest["modules"])[0]
    manifest["modules"][name] = manifest["modules"].pop(key)


def huge_manifest(env):
    path, _ = bad(env)
    header, data = split_file(path)
    manifest = json.loads(header["__metadata__"]["adapterfmt.manifest"])
    manifest["source"] = {"pad": "x" * (70 * 1024 * 1024)}
    header["__metadata__"]["adapterfmt.manifest"] = json.dumps(manifest)
    path.write_bytes(st_bytes(header, data))
    return ["inspect", path]


def nested_manifest(env):
    path, _ = bad(env)
    header, data = split_file(path)
    header["__metadata__"]["adapterfmt.manifest"] = '{"source":' + "[" * 100000 + "]" * 100000 + "}"
    path.write_bytes(st_bytes(header, data))
    return ["inspect", path]


def retensor(keep=None, add=None):
    """Rewrite the tensors (dropping/adding some) while keeping the metadata."""
    def build(env):
        from safetensors.torch import load_file, save_file
        path, out = bad(env)
        header, _ = split_file(path)
        tensors = load_file(str(path))
        if keep:
            tensors = {k: v for k, v in tensors.items() if keep(k)}
        tensors.update(add or {})
        save_file(tensors, str(path), metadata=header["__metadata__"])
        return ["validate", path]
    return build


def nonfinite(value: float, command: str):
    def build(env):
        path, out = bad(env)
        header, _ = split_file(path)
        name = next(k for k in header if k.endswith("lora_B"))
        shape = header[name]["shape"]
        tensor = torch.zeros(shape)
        tensor[0, 0] = value
        set_tensor(path, name, tensor)
        if command == "merge":
            return ["merge", "--base", env.shared.base, "--adapter", path, "--out", env.tmp / "merged"]
        return [command, path] + ([out] if command == "convert" else [])
    return build


def input_is_dir(env):
    (env.tmp / "bad.safetensors").mkdir()
    return ["inspect", env.tmp / "bad.safetensors"]


def _not_json(env):
    path, _ = bad(env)
    header, data = split_file(path)
    header["__metadata__"]["adapterfmt.manifest"] = "{not json"
    path.write_bytes(st_bytes(header, data))
    return ["inspect", path]


CASES = [
    Case("empty file", raw(b""), 1, rf"{F}: not a valid safetensors file .*; the file is truncated or corrupt"),
    Case("truncated file (convert)", truncated, 1, rf"{F}: not a valid safetensors file.*truncated"),
    Case("header length larger than the file", raw(st_bytes(header_with(), length=1 << 20)), 1,
         rf"{F}: not a valid safetensors file"),
    Case("header length 2**63", raw(st_bytes(header_with(), length=1 << 63)), 1, rf"{F}: not a valid safetensors"),
    Case("header is not JSON", raw(st_bytes({}, raw_header=b'{"adapterfmt.format": nope')), 1,
         rf"{F}: not a valid safetensors"),
    Case("header JSON is a list", raw(st_bytes({}, raw_header=b"[1, 2, 3]")), 1, rf"{F}: not a valid safetensors"),
    Case("overlapping tensor offsets", raw(st_bytes(header_with(
        a={"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        b={"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}), bytes(24))), 1, rf"{F}: not a valid safetensors"),
    Case("tensor offsets past the end", raw(st_bytes(header_with(
        a={"dtype": "F32", "shape": [4], "data_offsets": [0, 16000]}), bytes(16))), 1,
         rf"{F}: not a valid safetensors"),
    Case("dtype/shape disagree with byte length", raw(st_bytes(header_with(
        a={"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}), bytes(20))), 1,
         rf"{F}: not a valid safetensors"),
    Case("data buffer has unindexed bytes", raw(st_bytes(header_with(
        a={"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}), bytes(64))), 1, rf"{F}: not a valid safetensors"),
    Case("unknown dtype", raw(st_bytes(header_with(
        a={"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}), bytes(16))), 1, rf"{F}: not a valid safetensors"),
    Case("metadata value not a string", raw(st_bytes({"__metadata__": {"adapterfmt.format": 1}})), 1,
         rf"{F}: not a valid safetensors"),
    Case("plain safetensors, no manifest", raw(st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                                        bytes(4))), 1,
         rf"{F}: not an adapterfmt file.*; convert it first"),
    Case("input is a directory", input_is_dir, 2, rf"{F}: is a directory, not an adapterfmt file"),
    Case("input does not exist", lambda env: ["inspect", env.tmp / "bad.safetensors"], 2, rf"{F}: no such file"),
    Case("manifest is not JSON", _not_json, 1, rf"{F}: manifest is not valid JSON.*; the file was damaged"),
    Case("manifest deeply nested JSON", nested_manifest, 1, rf"{F}: manifest is not valid JSON"),
    Case("manifest 70 MB", huge_manifest, 1, rf"{F}: manifest is \d+ bytes, over the \d+ limit"),
    Case("manifest NaN constant", manifest_edit(
        lambda m: first_module(m)["params"].update(alpha=float("nan"), scale=float("nan"))), 1,
         rf"{F}: manifest is not valid JSON .*NaN"),
    Case("manifest number overflows (1e400)", manifest_edit(
        lambda m: first_module(m)["params"].update(alpha="ALPHA"), "convert"), 1,
         rf"{F}: manifest is not valid JSON \(number 1e400 overflows a float\)"),
    Case("merge weight NaN", lambda env: ["merge", "--base", env.shared.base, "--adapter",
                                          f"{env.copy(env.shared.adapter, 'bad.safetensors')}:nan",
                                          "--out", env.tmp / "merged"], 2,
         rf"{F}: adapter weight nan is not a finite number; give --adapter FILE:WEIGHT"),
    Case("manifest shape disagrees with tensor", manifest_edit(
        lambda m: first_module(m)["tensors"]["lora_A"].update(shape=[5, 64])), 1, rf"{F}: tensor .* manifest says"),
    Case("manifest dtype disagrees with tensor", manifest_edit(
        lambda m: first_module(m)["tensors"]["lora_A"].update(dtype="F16")), 1, rf"{F}: tensor .* manifest says"),
    Case("manifest rank disagrees with tensors", manifest_edit(
        lambda m: first_module(m)["params"].update(rank=2, scale=4.0)), 1, rf"{F}: module .* lora_A has shape"),
    Case("manifest scale disagrees with alpha/rank", manifest_edit(
        lambda m: first_module(m)["params"].update(scale=3.0)), 1, rf"{F}: module .* scale 3.0 disagrees"),
    Case("manifest unknown method", manifest_edit(lambda m: first_module(m).update(method="mystery")), 1,
         rf"{F}: unknown adapter method 'mystery'"),
    Case("manifest missing required key", manifest_edit(lambda m: m.pop("modules")), 1,
         rf"{F}: manifest fails the schema"),
    Case("target name with ..", manifest_edit(lambda m: retarget(m, "model/../../etc.q")), 1,
         rf"{F}: manifest fails the schema at modules"),
    Case("target name with path separator", manifest_edit(lambda m: retarget(m, "model\\layers.q")), 1,
         rf"{F}: manifest fails the schema at modules"),
    Case("unknown major version 2.0", manifest_edit(lambda m: None, "inspect", version="2.0"), 1,
         rf"{F}: adapterfmt format version 2.0 is not supported.*; upgrade adapterfmt"),
    Case("malformed version string", manifest_edit(lambda m: None, "inspect", version="1.0.0"), 1,
         rf"{F}: format version '1.0.0' is not MAJOR.MINOR"),
    Case("newer minor 1.7 with unknown fields reads", manifest_edit(
        lambda m: (m.update(future={"x": 1}), first_module(m).update(future_field=True)), "inspect",
        version="1.7"), 0, rf"warning: .*{F}: written with format 1.7"),
    Case("missing tensor", retensor(keep=lambda k: not k.endswith("q_proj.lora_B")), 1,
         rf"{F}: tensor .*lora_B' named in the manifest is missing"),
    Case("extra tensor", retensor(add={"stray": torch.zeros(2)}), 1, rf"{F}: tensor 'stray' is not described"),
    Case("NaN tensor (validate)", nonfinite(float("nan"), "validate"), 1, rf"invalid: .*{F}: tensor .* 1 NaN/Inf"),
    Case("Inf tensor (convert)", nonfinite(float("inf"), "convert"), 1, rf"{F}: tensor .* 1 NaN/Inf"),
    Case("NaN tensor (merge)", nonfinite(float("nan"), "merge"), 1, rf"{F}: tensor .* 1 NaN/Inf"),
]

