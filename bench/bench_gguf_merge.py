"""adapterfmt's GGUF merge next to llama.cpp's ``llama-export-lora`` on the same base and adapter.

Builds a random Llama (no download), writes it as F32 GGUF with q/k permuted as convert_hf_to_gguf
does, quantizes it with ``llama-quantize`` (Q8_0 and Q4_K), makes a PEFT LoRA, converts it to our file
and to a GGUF LoRA, then times both tools (wall time, peak RSS from ``/usr/bin/time -v``) and
compares the merged tensors of our F16 output with llama-export-lora's.

Usage: ``python bench/bench_gguf_merge.py --llama-bin /work/llamacpp/build/bin [--hidden 1024 --layers 8]``
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402

from adapterfmt.ops.merge_gguf import quantizable_types  # noqa: E402
from tests.ops.test_merge_gguf import write_llama_gguf  # noqa: E402


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds and peak RSS in MiB."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    hours, minutes, seconds = (float(g or 0) for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    return {"wall_s": round(hours * 3600 + minutes * 60 + seconds, 2), "peak_rss_mib": round(rss / 1024, 1)}


def build(work: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 256 * 256 or 256,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(work / "hf")
    path = work / "base-F32.gguf"
    write_llama_gguf(model, path)
    return work / "hf", path


def make_adapter(work: Path, hf: Path) -> tuple[Path, Path]:
    from tests.helpers import make_peft_adapter

    import adapterfmt
    make_peft_adapter(hf, work / "peft", r=16, lora_alpha=32,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    adapterfmt.convert(work / "peft", work / "a.safetensors", base=hf)
    adapterfmt.convert(work / "a.safetensors", work / "a.gguf", base=hf)
    return work / "a.safetensors", work / "a.gguf"


def compare(ours: Path, theirs: Path) -> dict:
    """Over the merged tensors: fraction bit-identical, largest difference in F16 ulps."""
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same = total = 0
    worst = 0.0
    for name, tensor in a.items():
        if tensor.tensor_type != gguf.GGMLQuantizationType.F16 or b[name].tensor_type != tensor.tensor_type:
            continue
        x, y = np.asarray(tensor.data), np.asarray(b[name].data)
        same += int((x.view(np.uint16) == y.view(np.uint16)).sum())
        total += x.size
        ulp = np.spacing(np.maximum(np.abs(x), np.abs(y)).astype(np.float16)).astype(np.float32)
        worst = max(worst, float((np.abs(x.astype(np.float32) - y.astype(np.float32)) / ulp).max()))
    return {"elements": total, "fraction_bit_identical": same / total if total else None, "max_diff_f16_ulps": worst}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-bin", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--types", default="Q8_0,Q4_K")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf, f32 = build(work, args.hidden, args.layers, args.vocab)
        adapter, adapter_gguf = make_adapter(work, hf)
        for kind in args.types.split(","):
            base = work / f"base-{kind}.gguf"
            subprocess.run([str(args.llama_bin / "llama-quantize"), str(f32), str(base), kind], check=True,
                           capture_output=True)
            row = {"base_bytes": base.stat().st_size}
            row["llama-export-lora"] = timed([str(args.llama_bin / "llama-export-lora"), "-m", str(base),
                                              "--lora", str(adapter_gguf), "-o", str(work / "ref.gguf"), "-t", "2"])
            cli = [sys.executable, "-m", "adapterfmt.cli", "merge", "--base", str(base), "--adapter", str(adapter)]
            row["adapterfmt_f16"] = timed(cli + ["--out", str(work / "ours-f16.gguf"), "--gguf-type", "F16", "--force"])
            if kind in quantizable_types():  # else the requantized output is refused by name
                row["adapterfmt_requantized"] = timed(cli + ["--out", str(work / "ours-q.gguf"), "--force"])
            row["f16_vs_export_lora"] = compare(work / "ours-f16.gguf", work / "ref.gguf")
            results[kind] = row
            for name in ("ref.gguf", "ours-f16.gguf", "ours-q.gguf"):
                (work / name).unlink(missing_ok=True)
    print(json.dumps({"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "results": results},
                     indent=2))


if __name__ == "__main__":
    main()
