"""Real PEFT adapters of the non-LoRA tuners (IA³, LoHa, LoKr, AdaLoRA, OFT) with non-zero weights."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import load_model

TUNER_METHODS = ("ia3", "loha", "lokr", "adalora", "oft", "boft", "vera", "fourierft")
#: Every PEFT tuner ``make_tuner_adapter`` builds (trainable tokens: tests/formats/test_peft_trainable_tokens.py).
PEFT_TUNERS = TUNER_METHODS + ("trainable_tokens",)


def _perturb(model, std: float) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(std * torch.randn_like(param))


def _train_adalora(model) -> None:
    """A few real AdaLoRA steps so that rank_pattern prunes modules to different ranks (0 included)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    for step in range(8):
        ids = torch.randint(0, vocab, (2, 10), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()


def tuner_config(method: str):
    """(PEFT config, how to move the weights off their init) for ``method`` on Llama-like models."""
    from peft import (AdaLoraConfig, BOFTConfig, FourierFTConfig, IA3Config, LoHaConfig, LoKrConfig, OFTConfig,
                      TrainableTokensConfig, VeraConfig)
    return {
        "ia3": (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), 0.3),
        "loha": (LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "down_proj"], init_weights=False,
                            rank_pattern={"down_proj": 3}, alpha_pattern={"layers.1.self_attn.q_proj": 2}), None),
        "lokr": (LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj", "k_proj"], init_weights=False,
                            rank_pattern={"k_proj": 4}), None),
        "adalora": (AdaLoraConfig(init_r=6, target_r=3, lora_alpha=16, tinit=1, tfinal=2, total_step=8,
                                  target_modules=["q_proj", "v_proj", "down_proj"]), "train"),
        "oft": (OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "down_proj"]), 0.05),
        # On CPU PEFT builds one butterfly factor whatever boft_n_butterfly_factor says.
        "boft": (BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"]),
                 0.1),
        "vera": (VeraConfig(r=32, projection_prng_key=1234, target_modules=["q_proj", "v_proj", "down_proj"]), 0.3),
        "fourierft": (FourierFTConfig(n_frequency=40, scaling=150.0, random_loc_seed=4321,
                                      target_modules=["q_proj", "v_proj", "down_proj"],
                                      n_frequency_pattern={"down_proj": 24}), 0.3),
        "trainable_tokens": (TrainableTokensConfig(token_indices=[0, 5, 77, 127]), 0.3),
    }[method]


_MADE: dict[tuple[str, str, int], Path] = {}


def make_tuner_adapter(base: Path, out: Path, method: str, seed: int = 1) -> Path:
    """A PEFT adapter of ``method`` for the model at ``base``, saved into ``out``.

    Deterministic, so one session reuses the first directory made for the same (base, method, seed)
    (AdaLoRA trains a few steps; the directories are only read).
    """
    key = (str(base), method, seed)
    if key in _MADE and _MADE[key].is_dir():
        return _MADE[key]
    _MADE[key] = _make(base, out, method, seed)
    return _MADE[key]


def _make(base: Path, out: Path, method: str, seed: int) -> Path:
    from peft import get_peft_model
    config, perturb = tuner_config(method)
    torch.manual_seed(seed)
    model = get_peft_model(load_model(base), config)
    if perturb == "train":
        _train_adalora(model)
    elif perturb is not None:
        _perturb(model, perturb)
    model.save_pretrained(out)
    return out
