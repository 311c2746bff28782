"""Real llama.cpp as the reference for our GGUF LoRA exports.

Builds a tiny transformers model per architecture from a config, gives it an offline tokenizer, converts it to a
GGUF base with llama.cpp's own ``convert_hf_to_gguf.py`` (run from the llama.cpp tree that
``scripts/test-consumers.sh`` unpacks), and evaluates base + LoRA with ``llama_cpp`` (llama-cpp-python).

Environment: ``ADAPTERFMT_LLAMA_CPP_DIR`` = the llama.cpp source tree (holds convert_hf_to_gguf.py),
``LLAMA_CPP_LIB_PATH`` = the directory with libllama.so (read by llama_cpp itself).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SEQ = [5, 17, 33, 8, 61, 42, 9, 77, 23, 14, 50, 3]  # token ids fed to both runtimes (no BOS added)
VOCAB = 320


def llama_cpp_dir() -> Path:
    """The llama.cpp source tree, or skip the test when the consumer environment is absent."""
    path = Path(os.environ.get("ADAPTERFMT_LLAMA_CPP_DIR", ""))
    if not (path / "convert_hf_to_gguf.py").is_file():
        pytest.skip("set ADAPTERFMT_LLAMA_CPP_DIR to a llama.cpp tree (scripts/test-consumers.sh does)",
                    allow_module_level=True)
    return path


def import_llama_cpp():
    """llama_cpp, or skip: it raises more than ImportError when its shared library is missing."""
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - any failure means "consumer not available"
        pytest.skip(f"llama_cpp not usable ({type(exc).__name__}: {str(exc)[:80]})", allow_module_level=True)
    return llama_cpp


# ---------------------------------------------------------------------------------------------- tokenizers
def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(60)]
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n)]


def write_spm_tokenizer(model_dir: Path, vocab: int = VOCAB) -> None:
    """A sentencepiece ``tokenizer.model`` trained on a synthetic corpus (the converter's SPM route)."""
    import io

    import sentencepiece as spm
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=buffer, vocab_size=vocab - 8,
                                   model_type="bpe", hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
                                   user_defined_symbols=["<|endoftext|>"],
                                   minloglevel=2)
    (model_dir / "tokenizer.model").write_bytes(buffer.getvalue())


def write_bpe_tokenizer(model_dir: Path, vocab: int = VOCAB) -> None:
    """A byte-level BPE ``tokenizer.json`` (the converter's GPT-2 route)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 8, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:64], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------- conversion
# convert_hf_to_gguf identifies a BPE pre-tokenizer by hashing its output on a fixed text; a tiny trained
# tokenizer has no known hash, so this launcher answers "default" (the token ids we feed make it irrelevant).
# It also lets config.json fields that transformers 5 folds away (GPT-NeoX ``rotary_pct``) reach the converter.
_LAUNCHER = """
import json, runpy, sys
from pathlib import Path
tree = sys.argv.pop(1)
sys.path[:0] = [tree, tree + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
load = base.ModelBase.load_hparams
def load_with_raw_fields(dir_model, *args, **kwargs):
    raw = json.loads((Path(dir_model) / "config.json").read_text())
    return raw | load(dir_model, *args, **kwargs)
base.ModelBase.load_hparams = staticmethod(load_with_raw_fields)
sys.argv[0] = tree + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(args: list[str], what: str) -> None:
    # the vendored gguf-py must win over the installed gguf (NO_LOCAL_GGUF would disable it)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        raise AssertionError(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def convert_base(model_dir: Path, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on a transformers directory, F32 (no rounding of the base)."""
    _run([sys.executable, "-c", _LAUNCHER, str(llama_cpp_dir()), str(model_dir), "--outfile", str(out),
          "--outtype", "f32"], "convert_hf_to_gguf.py")
    return out


def convert_lora_llama_cpp(peft_dir: Path, base_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own convert_lora_to_gguf.py (the baseline we compare against)."""
    _run([sys.executable, str(llama_cpp_dir() / "convert_lora_to_gguf.py"), str(peft_dir), "--base",
          str(base_dir), "--outfile", str(out), "--outtype", outtype], "convert_lora_to_gguf.py")
    return out


# ---------------------------------------------------------------------------------------------- evaluation
_EVAL = """
import json, sys
import llama_cpp
base, lora, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
kwargs = {"lora_path": lora} if lora else {}
model = llama_cpp.Llama(model_path=base, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2,
                        seed=0, type_k=0, type_v=0, **kwargs)  # F32 KV cache: no rounding of k/v
model.eval(ids)
print(json.dumps([float(x) for x in model.scores[len(ids) - 1]]))
"""


def llama_cpp_logits(base_gguf: Path, lora_gguf: Path | None, ids: list[int] = SEQ) -> np.ndarray:
    """Last-token logits from llama.cpp with the adapter applied at scale 1.

    Runs in a child process: llama.cpp aborts (GGML_ASSERT) on some files, which must fail one test, not the run.
    Raises LlamaCppFailed with llama.cpp's last words when it refuses or crashes.
    """
    import_llama_cpp()
    done = subprocess.run([sys.executable, "-c", _EVAL, str(base_gguf), str(lora_gguf or ""), json.dumps(ids)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        said = [x for x in lines if "GGML_ASSERT" in x or "error" in x.lower()] or lines[-1:]
        what = "crashed (signal {})".format(-done.returncode) if done.returncode < 0 else f"exit {done.returncode}"
        raise LlamaCppFailed(f"llama.cpp {what}: {' | '.join(said)[-300:]}")
    return np.array(json.loads(done.stdout.strip().splitlines()[-1]), dtype=np.float64)


class LlamaCppFailed(RuntimeError):
    """llama.cpp refused or crashed on a file."""


def peft_logits(base_dir: Path, peft_dir: Path | None, ids: list[int] = SEQ) -> np.ndarray:
    """Last-token logits from transformers (+ PEFT), fp32, eager attention."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    if peft_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, peft_dir)
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0, -1]
    return out.double().numpy()


def record(row: dict) -> None:
    """Append one measurement to $ADAPTERFMT_CONSUMER_RESULTS (JSON lines) for the summary table."""
    target = os.environ.get("ADAPTERFMT_CONSUMER_RESULTS")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
