"""LyCORIS files made by LyCORIS itself (``create_lycoris`` + ``save_weights``) on tiny conv models.

Two bottleneck ResNets built from configs (Conv2d only: 7×7 stem, 1×1 and 3×3 convs): a narrow one for LoCon
and LoHa, and a wider one for LoKr, whose Kronecker halves are factored (and Tucker-decomposed) only when the
channel counts are large enough. Trained-looking weights: every trainable parameter set to N(0, 0.5²).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

#: (algo, use_tucker) -> create_lycoris keyword arguments (beyond algo and use_tucker).
CASES = {("lora", False): {}, ("lora", True): {}, ("loha", False): {}, ("loha", True): {},
         ("lokr", False): {"decompose_both": True}, ("lokr", True): {"decompose_both": True}}
WIDE = {"lokr"}
IMAGE = 16


def tiny_conv_resnet(path: Path, wide: bool) -> Path:
    """A bottleneck ResNet (Conv2d layers only), weights ~N(0, 0.05), saved with save_pretrained."""
    from transformers import ResNetConfig, ResNetModel
    config = ResNetConfig(num_channels=3, embedding_size=16 if wide else 8,
                          hidden_sizes=[64, 96] if wide else [16, 24], depths=[1, 1], layer_type="bottleneck")
    model = ResNetModel(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval().save_pretrained(path)
    return path


def load_resnet(path: Path):
    from transformers import ResNetModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ResNetModel.from_pretrained(path).eval()


def outputs(model) -> torch.Tensor:
    """Every stage's hidden state, flattened (the last one alone is mostly ReLU zeros in such a tiny net)."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    return torch.cat([h.float().flatten() for h in states])


def lycoris_network(model, algo: str, tucker: bool, seed: int = 3):
    """LyCORIS's own network on every Conv2d of ``model``, applied, with non-zero weights."""
    from lycoris import create_lycoris
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    dim = 1 if algo in WIDE else 3
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, conv_dim=dim, conv_alpha=2.0, algo=algo,
                             use_tucker=tucker, factor=-1, **CASES[(algo, tucker)])
    network.apply_to()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return network


def make_lycoris_file(work: Path, base: Path, algo: str, tucker: bool) -> tuple[Path, torch.Tensor]:
    """(the LyCORIS file, the outputs of LyCORIS's own forward pass with the network applied)."""
    model = load_resnet(base)
    network = lycoris_network(model, algo, tucker)
    path = work / f"{algo}{'_tucker' if tucker else ''}.safetensors"
    network.save_weights(str(path), torch.float32, None)
    return path, outputs(model)


_MADE: dict[tuple, tuple] = {}


def shared_case(tmp_path_factory, algo: str, tucker: bool) -> tuple[Path, Path, torch.Tensor]:
    """(base, LyCORIS file, LyCORIS's outputs) of one case, made once per test session (files are only read)."""
    if "bases" not in _MADE:
        work = tmp_path_factory.mktemp("lycoris-conv-bases")
        _MADE["bases"] = {False: tiny_conv_resnet(work / "narrow", False), True: tiny_conv_resnet(work / "wide", True)}
    if (algo, tucker) not in _MADE:
        base = _MADE["bases"][algo in WIDE]
        path, want = make_lycoris_file(tmp_path_factory.mktemp(f"lycoris-{algo}"), base, algo, tucker)
        _MADE[(algo, tucker)] = (base, path, want)
    return _MADE[(algo, tucker)]
