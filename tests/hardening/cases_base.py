"""Corpus rows for the base checkpoint reader and adapter/base binding (shape, fingerprint)."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from .corpus import Case, Env

Q0 = "model.layers.0.self_attn.q_proj.weight"


def base_copy(env: Env):
    return env.copy(env.shared.base, "base")


def with_base(edit, command="validate"):
    """Damage a copy of the base, then run ``command`` against it."""
    def build(env):
        base = base_copy(env)
        edit(base)
        adapter = env.shared.adapter
        if command == "merge":
            return ["merge", "--base", base, "--adapter", adapter, "--out", env.tmp / "merged"]
        if command == "convert":
            return ["convert", env.shared.peft, env.tmp / "out.safetensors", "--base", base]
        return ["validate", adapter, "--base", base]
    return build


def edit_weights(edit):
    def apply(base):
        path = base / "model.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return apply


def shard(base, index: dict):
    """Turn the base into an index + one shard; ``index`` overrides parts of the index."""
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    names = load_file(str(base / "model-00001-of-00001.safetensors")).keys()
    data = {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}
    data.update(index)
    (base / "model.safetensors.index.json").write_text(json.dumps(data))


def first_shard_is(name: str):
    def apply(base):
        shard(base, {})
        path = base / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        index["weight_map"][Q0] = name
        path.write_text(json.dumps(index))
    return apply


def duplicate_shard(base):
    """Two shards both holding q_proj of layer 0."""
    shard(base, {})
    save_file({Q0: torch.zeros(64, 64)}, str(base / "model-extra.safetensors"))
    path = base / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["extra.weight"] = "model-extra.safetensors"
    path.write_text(json.dumps(index))


def perturb(tensors):
    tensors[Q0] = tensors[Q0].clone()
    tensors[Q0].view(-1)[0] += 1.0


def wrong_shape(tensors):
    tensors[Q0] = torch.zeros(32, 64)


def only_pickle(base):
    torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()


def truncate(base):
    path = base / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


B = r"base"
CASES = [
    Case("base does not exist", lambda env: ["validate", env.shared.adapter, "--base", env.tmp / "base"], 2,
         rf"{B}: base model not found; check the --base path"),
    Case("base has no weights", with_base(lambda b: (b / "model.safetensors").unlink()), 2,
         rf"{B}: no model\.safetensors or model\.safetensors\.index\.json"),
    Case("base has only pickle weights", with_base(only_pickle), 2,
         rf"{B}: base model has only pickle \(\.bin/\.pt\) weights; convert it to safetensors"),
    Case("base weights truncated", with_base(truncate), 2,
         rf"model\.safetensors: not a readable safetensors file .*; the checkpoint is damaged"),
    Case("base index not JSON", with_base(lambda b: (shard(b, {}), (b / "model.safetensors.index.json")
                                                     .write_text("{oops"))), 2,
         r"model\.safetensors\.index\.json: not valid JSON"),
    Case("base index deeply nested", with_base(lambda b: (shard(b, {}), (b / "model.safetensors.index.json")
                                                          .write_text("[" * 100000 + "]" * 100000))), 2,
         r"model\.safetensors\.index\.json: not valid JSON"),
    Case("base index without weight_map", with_base(lambda b: shard(b, {"weight_map": []})), 2,
         r"model\.safetensors\.index\.json: index has no weight_map"),
    Case("base index names a missing shard", with_base(first_shard_is("model-00002-of-00002.safetensors")), 2,
         r"model-00002-of-00002\.safetensors: shard listed in the index is missing"),
    Case("base index shard path escapes the directory", with_base(first_shard_is("../../adapter.safetensors")), 2,
         r"model\.safetensors\.index\.json: shard name '\.\./\.\./adapter\.safetensors' is not a file name"),
    Case("base tensor in two shards", with_base(duplicate_shard, "merge"), 2,
         r"base: tensor '.*q_proj\.weight' is in two shards \(model-00001-of-00001\.safetensors, "
         r"model-extra\.safetensors\); the checkpoint is damaged"),
    Case("base config.json not JSON", with_base(lambda b: (b / "config.json").write_text("{"), "convert"), 2,
         r"config\.json: not valid JSON"),
    Case("wrong base: shape", with_base(edit_weights(wrong_shape)), 1,
         r"base parameter '.*q_proj\.weight' has shape \[32, 64\], the adapter expects \[64, 64\]; this adapter"),
    Case("wrong base: fingerprint", with_base(edit_weights(perturb)), 1,
         r"different content than the adapter's base \(fingerprint mismatch\); use the base"),
    Case("wrong base: fingerprint (merge)", with_base(edit_weights(perturb), "merge"), 1,
         r"adapter\.safetensors: base parameter .* \(fingerprint mismatch\)"),
    Case("wrong base: parameter missing", with_base(edit_weights(lambda t: t.pop(Q0))), 1,
         r"base model has no parameter '.*q_proj\.weight'; the adapter was made for a different model"),
]
