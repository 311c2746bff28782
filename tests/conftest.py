import os
import warnings

import pytest

from .helpers import tiny_gpt2, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def llama_base_bf16(tmp_path_factory):
    import torch
    return tiny_llama(tmp_path_factory.mktemp("llama-bf16") / "base", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory):
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "base")
