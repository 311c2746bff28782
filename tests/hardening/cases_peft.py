"""Corpus rows for the PEFT directory reader (config, weights, pickle policy)."""
from __future__ import annotations

import builtins
import json
import pickle
import shutil

import torch
from safetensors.torch import load_file, save_file

from .corpus import Case, Env, Result, run_subprocess, split_file, st_bytes

CFG = r"adapter_config\.json"
MARKER = "PWNED-marker"


def peft(env: Env):
    return env.copy(env.shared.peft, "peft"), env.tmp / "out.safetensors"


def config_edit(edit, text: str | None = None):
    def build(env):
        src, out = peft(env)
        cfg = src / "adapter_config.json"
        if text is not None:
            cfg.write_text(text)
        else:
            config = json.loads(cfg.read_text())
            edit(config)
            cfg.write_text(json.dumps(config).replace('"ALPHA"', "1e400"))
        return ["convert", src, out]
    return build


def weights_edit(edit):
    def build(env):
        src, out = peft(env)
        path = src / "adapter_model.safetensors"
        tensors = load_file(str(path))
        tensors = edit(tensors) or tensors
        save_file(tensors, str(path), metadata={"format": "pt"})
        return ["convert", src, out]
    return build


def rename_first(new_module: str):
    def edit(tensors):
        old = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0][: -len(".lora_A.weight")]
        return {k.replace(old, "base_model.model." + new_module): v for k, v in tensors.items()}
    return edit


def truncated_weights(env):
    src, out = peft(env)
    path = src / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    return ["convert", src, out]


def pickle_only(allow: bool):
    def build(env):
        src, out = peft(env)
        st = src / "adapter_model.safetensors"
        torch.save(load_file(str(st)), src / "adapter_model.bin")
        st.unlink()
        return ["convert", src, out] + (["--allow-pickle"] if allow else [])
    return build


class _Plant:
    """Unpickling this would create the marker file (builtins.open(path, 'w'))."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def malicious_pickle(zip_format: bool):
    def build(env):
        src, out = peft(env)
        (src / "adapter_model.safetensors").unlink()
        payload = {"base_model.model.x.lora_A.weight": _Plant(str(env.tmp / MARKER))}
        if zip_format:
            torch.save(payload, src / "adapter_model.bin")
        else:
            (src / "adapter_model.bin").write_bytes(pickle.dumps(payload, protocol=2))
        return ["convert", src, out, "--allow-pickle"]
    return build


def no_marker(env: Env, result: Result) -> None:
    assert not (env.tmp / MARKER).exists(), "the malicious pickle ran"


def no_weights(env):
    src, out = peft(env)
    (src / "adapter_model.safetensors").unlink()
    return ["convert", src, out]


def nonfinite_weights(tensors):
    name = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[name][0, 0] = float("nan")


def deep(env):
    return config_edit(None, '{"peft_type": "LORA", "r": ' + "[" * 100000 + "]" * 100000 + "}")(env)


CASES = [
    Case("peft config not JSON", config_edit(None, "{peft_type: LORA"), 1, rf"{CFG}: not valid JSON.*; the config"),
    Case("peft config deeply nested", deep, 1, rf"{CFG}: not valid JSON"),
    Case("peft config not an object", config_edit(None, "[1]"), 1, rf"{CFG}: config is not a JSON object"),
    Case("peft config without peft_type", config_edit(lambda c: c.pop("peft_type")), 1,
         rf"{CFG}: peft_type None is not supported"),
    Case("peft config r is a string", config_edit(lambda c: c.update(r="4")), 1,
         rf"{CFG}: config field r must be a number, got '4'"),
    Case("peft config lora_alpha NaN", config_edit(lambda c: c.update(lora_alpha=float("nan"))), 1,
         rf"{CFG}: not valid JSON.*NaN"),
    Case("peft config lora_alpha 1e400", config_edit(lambda c: c.update(lora_alpha="ALPHA")), 1,
         rf"{CFG}: not valid JSON \(number 1e400 overflows a float\)"),
    Case("peft config unknown field", config_edit(lambda c: c.update(use_magic=True)), 1,
         rf"{CFG}: config field\(s\) not understood: use_magic"),
    Case("peft config fan_in_fan_out is a string", config_edit(lambda c: c.update(fan_in_fan_out="false")), 1,
         rf"{CFG}: config field fan_in_fan_out must be true or false"),
    Case("peft config rank_pattern is a list", config_edit(lambda c: c.update(rank_pattern=["q_proj"])), 1,
         rf"{CFG}: config field rank_pattern must be an object"),
    Case("peft config rank_pattern bad regex", config_edit(lambda c: c.update(rank_pattern={"q_proj(": 2})), 1,
         rf"{CFG}: rank_pattern key 'q_proj\(' is not a valid regular expression"),
    Case("peft config alpha_pattern value is a string", config_edit(
        lambda c: c.update(alpha_pattern={"v_proj": "16"})), 1, rf"{CFG}: alpha_pattern\['v_proj'\] must be a number"),
    Case("peft config base name is a number", config_edit(lambda c: c.update(base_model_name_or_path=7)), 1,
         rf"{CFG}: config field base_model_name_or_path must be a string or null"),
    Case("peft rank disagrees with config", config_edit(lambda c: c.update(r=8)), 1,
         r"peft: module .* has rank 4 but the config resolves to 8"),
    Case("peft weights missing lora_B", weights_edit(
        lambda t: {k: v for k, v in t.items() if not k.endswith("q_proj.lora_B.weight")}), 1,
         r"peft: module .*q_proj' has \['lora_A.weight'\], needs both A and B"),
    Case("peft target name with ..", weights_edit(rename_first("model/../../etc.q_proj")), 1,
         r"peft: module name 'model/\.\./\.\./etc\.q_proj' is not a dotted parameter name"),
    Case("peft weights truncated", truncated_weights, 1,
         r"adapter_model\.safetensors: not a valid safetensors file.*; the file is truncated"),
    Case("peft weights NaN", weights_edit(nonfinite_weights), 1, r"peft: tensor .* 1 NaN/Inf"),
    Case("peft no weights file", no_weights, 2, r"peft: no adapter_model\.safetensors \(or adapter_model\.bin\)"),
    Case("peft pickle-only .bin refused", pickle_only(False), 2,
         r"adapter_model\.bin: the only weights file, adapter_model\.bin, is a pickle; pickle can execute code; "
         r"pass --allow-pickle"),
    Case("peft pickle .bin with --allow-pickle reads", pickle_only(True), 0, r"overall lossless",
         creates=("out.safetensors",)),
    Case("malicious pickle (raw) with --allow-pickle", malicious_pickle(False), 1,
         r"adapter_model\.bin: refused by the safe unpickler", check=no_marker),
    Case("malicious pickle (torch zip) in a fresh process", malicious_pickle(True), 1,
         r"adapter_model\.bin: refused by the safe unpickler", check=no_marker, runner=run_subprocess),
]
