"""Corpus rows for ``unmerge`` (merged model + adapters) and ``extract`` (base + full fine-tune)."""
from __future__ import annotations

import warnings

import torch
from safetensors.torch import load_file, save_file

from .corpus import Case, Env

Q0 = "model.layers.0.self_attn.q_proj.weight"


def merged(env: Env, adapter=None):
    from adapterfmt.engine.merge import merge
    out = env.tmp / "merged"
    merge(env.shared.base, [(adapter or env.shared.adapter, 1.0)], out)
    return out


def dora_adapter(env: Env):
    from adapterfmt.ops.convert import convert

    from ..helpers import make_peft_adapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = make_peft_adapter(env.shared.base, env.tmp / "dora-peft", r=4, lora_alpha=8, use_dora=True,
                                 target_modules=["q_proj"])
    convert(peft, env.tmp / "dora.safetensors")
    return env.tmp / "dora.safetensors"


def unmerge_args(env, merged_dir, adapter, *extra):
    return ["unmerge", "--merged", merged_dir, "--adapter", adapter, "--out", env.tmp / "restored", *extra]


def dora_without_base(env: Env):
    adapter = dora_adapter(env)
    return unmerge_args(env, merged(env, adapter), adapter)


def other_model(env: Env):
    from ..helpers import tiny_gpt2
    return unmerge_args(env, tiny_gpt2(env.tmp / "gpt2"), env.shared.adapter)


def wrong_base(env: Env):
    from ..helpers import tiny_llama
    return unmerge_args(env, merged(env), env.shared.adapter, "--base", tiny_llama(env.tmp / "other", seed=3))


def tuned_copy(edit, rank: int = 2):
    """A 'fine-tune': a copy of the shared base with ``edit`` applied to its tensors."""
    def build(env: Env):
        tuned = env.copy(env.shared.base, "tuned")
        path = tuned / "model.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
        return ["extract", "--base", env.shared.base, "--tuned", tuned, "--rank", rank, env.tmp / "lora.safetensors"]
    return build


def reshape_q(tensors):
    tensors[Q0] = torch.randn(32, 64)


def nan_q(tensors):
    tensors[Q0] = tensors[Q0].clone()
    tensors[Q0][0, 0] = float("nan")


def tuned_gpt2(env: Env):
    from ..helpers import tiny_gpt2
    return ["extract", "--base", env.shared.base, "--tuned", tiny_gpt2(env.tmp / "gpt2"), "--rank", "2",
            env.tmp / "lora.safetensors"]


CASES = [
    Case("unmerge DoRA without --base", dora_without_base, 2,
         r"dora\.safetensors: dora is not invertible from the merged weight; pass --base BASE"),
    Case("unmerge adapter for a different model", other_model, 1, r"gpt2: base model has no parameter"),
    Case("unmerge --base is a different model", wrong_base, 1,
         r"adapter\.safetensors: base parameter .* \(fingerprint mismatch\); use the base the adapter was made for"),
    Case("unmerge adapter weight Inf", lambda env: unmerge_args(env, merged(env), f"{env.shared.adapter}:inf"), 2,
         r"adapter\.safetensors: adapter weight inf is not a finite number; give --adapter FILE:WEIGHT"),
    Case("unmerge merged model missing", lambda env: unmerge_args(env, env.tmp / "nope", env.shared.adapter), 2,
         r"nope: merged model not found; check the --merged path"),
    Case("extract tuned of another architecture", tuned_gpt2, 1,
         r"gpt2: shares no weight with --base .*; --tuned must be a fine-tune of --base"),
    Case("extract tuned with a different shape", tuned_copy(reshape_q), 1,
         rf"tuned: tensor '{Q0}' has shape \[32, 64\], --base has \[64, 64\]; --tuned must be a fine-tune of --base"),
    Case("extract tuned identical to base", tuned_copy(lambda t: None), 2,
         r"tuned: no linear weight differs between base and tuned; check that --tuned is a fine-tune of --base"),
    Case("extract tuned weight NaN", tuned_copy(nan_q), 1, rf"tuned: tensor '{Q0}' has 1 NaN/Inf value"),
    Case("extract rank 0", tuned_copy(nan_q, rank=0), 2, r"--rank must be at least 1, got 0; give the LoRA rank"),
]
