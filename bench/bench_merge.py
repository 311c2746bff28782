"""Merge benchmark: `cp -r` (I/O floor) vs PEFT merge_and_unload vs `adapterfmt merge`, side by side.

    python bench/bench_merge.py [--size-gb 1.0] [--reps 3] [--device cpu|cuda]

Builds a synthetic llama-shaped bf16 sharded checkpoint (7B layer shapes: hidden 4096,
intermediate 11008, 32 heads; fewer layers; the vocabulary sized to hit --size-gb) and a
rank-16 LoRA on every linear layer (PEFT directory + its adapterfmt conversion), then runs
each pipeline in a subprocess per repetition (peak RSS from wait4) and prints medians and
ratios. Every pipeline ends with its output fsynced; all read the same (warm) base.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, INTER, HEADS = 4096, 11008, 32
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PEFT_SCRIPT = """
import os, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
for name in os.listdir(out):
    fd = os.open(os.path.join(out, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def _torch():
    import torch
    return torch


def layer_shapes() -> dict[str, tuple[int, int]]:
    return {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
            "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
            "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def build(work: Path, size_gb: float, shard_bytes: int) -> tuple[Path, Path, Path]:
    """The base checkpoint, a PEFT LoRA directory and its adapterfmt file (cached between runs)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    torch = _torch()
    base, peft_dir, native = work / "base", work / "peft", work / "adapter.safetensors"
    stamp = work / f"built-v2-{size_gb}-{shard_bytes}"
    if stamp.exists():
        return base, peft_dir, native
    shutil.rmtree(work, ignore_errors=True)
    base.mkdir(parents=True)
    layer_bytes = 2 * sum(o * i for o, i in layer_shapes().values())
    layers = max(1, round(size_gb * 1e9 * 0.8 / layer_bytes))
    vocab = max(256, int((size_gb * 1e9 - layers * layer_bytes) / (2 * 2 * HIDDEN)) // 64 * 64)
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    for i in range(layers):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
        for module, shape in layer_shapes().items():
            tensors[f"model.layers.{i}.{module}.weight"] = shape
    tensors["model.norm.weight"] = (HIDDEN,)
    tensors["lm_head.weight"] = (vocab, HIDDEN)
    shards, current, size = [], {}, 0
    for name, shape in tensors.items():
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
        size += nbytes
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(base / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(2 * torch.Size(s).numel() for s in tensors.values())
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=False,
                dtype="bfloat16", architectures=["LlamaForCausalLM"]).to_json_file(base / "config.json")
    # The LoRA: PEFT layout, fp32 factors (PEFT's default), then converted with base fingerprints.
    peft_dir.mkdir()
    lora = {}
    for i in range(layers):
        for module, (out_f, in_f) in layer_shapes().items():
            key = f"base_model.model.model.layers.{i}.{module}"
            lora[f"{key}.lora_A.weight"] = torch.randn(16, in_f, generator=gen) * 0.01
            lora[f"{key}.lora_B.weight"] = torch.randn(out_f, 16, generator=gen) * 0.01
    save_file(lora, str(peft_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (peft_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "target_modules": LINEAR,
         "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
         "init_lora_weights": True, "base_model_name_or_path": str(base), "modules_to_save": None}))
    from adapterfmt.ops.convert import convert
    convert(peft_dir, native, base=base)
    stamp.touch()
    return base, peft_dir, native


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def compare(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors differing) between two model directories."""
    from safetensors import safe_open
    torch = _torch()

    def handles(path):
        out = {}
        for shard in sorted(path.glob("*.safetensors")):
            h = safe_open(str(shard), framework="pt")
            out.update({k: h for k in h.keys()})
        return out

    ha, hb = handles(a), handles(b)
    differ = sum(not torch.equal(ha[k].get_tensor(k), hb[k].get_tensor(k)) for k in ha)
    return len(ha), differ + len(set(ha) ^ set(hb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shard-mb", type=int, default=512, help="source shard size (MB, 10^6)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # helpers run in a child so the timing parent stays small (ru_maxrss is inherited)
        if args.child[0] == "build":
            build(args.work, args.size_gb, args.shard_mb * 10**6)
        else:
            print(json.dumps(compare(Path(args.child[1]), Path(args.child[2]))))
        return
    me = [sys.executable, __file__, "--work", str(args.work), "--size-gb", str(args.size_gb),
          "--shard-mb", str(args.shard_mb)]
    subprocess.run(me + ["--child", "build"], check=True)
    base, peft_dir, native = args.work / "base", args.work / "peft", args.work / "adapter.safetensors"
    shard_sizes = [p.stat().st_size for p in base.glob("*.safetensors")]
    total = sum(shard_sizes)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1", CUDA_VISIBLE_DEVICES=os.environ.get(
        "CUDA_VISIBLE_DEVICES", "") if args.device == "cuda" else "")
    out = args.work / "result"
    pipelines = {
        # Interpreter + torch start-up alone: what any torch-based merge pays before its first byte.
        "python + import torch": [sys.executable, "-c", "import torch"],
        "cp -r + fsync": ["sh", "-c", f'cp -r "{base}" "{out}" && sync "{out}"/*'],
        "PEFT merge_and_unload": [sys.executable, "-c", PEFT_SCRIPT, str(base), str(peft_dir), str(out)],
        "adapterfmt merge": [sys.executable, "-m", "adapterfmt.cli", "merge", "--base", str(base), "--adapter",
                             str(native), "--out", str(out), "--device", args.device, "--json"],
    }
    kept = {"PEFT merge_and_unload": args.work / "peft-result", "adapterfmt merge": args.work / "ours-result"}
    results = {name: [] for name in pipelines}
    timed(["cat", *map(str, base.glob("*.safetensors"))])  # warm the page cache once for all
    names = list(pipelines)
    for rep in range(args.reps):
        # The disk writes fast in bursts and then throttles, so whoever runs right after a big
        # writer is penalised: rotate the order every repetition.
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            results[name].append(timed(pipelines[name], env))
            print(f"rep {rep + 1} {name:24s} {results[name][-1][0]:7.2f} s  "
                  f"peak RSS {results[name][-1][1] / 2**20:7.0f} MiB", flush=True)
            if rep == 0 and name in kept:
                shutil.rmtree(kept[name], ignore_errors=True)
                out.rename(kept[name])
    checked, differ = json.loads(subprocess.run(me + ["--child", "compare", *map(str, kept.values())],
                                                check=True, capture_output=True, text=True).stdout)
    for path in [out, *kept.values()]:
        shutil.rmtree(path, ignore_errors=True)
    med = {n: (statistics.median(t for t, _ in r), statistics.median(m for _, m in r)) for n, r in results.items()}
    start_t, cp_t, peft_t, ours_t = (med[n][0] for n in pipelines)
    largest = max(shard_sizes)
    print(f"\ncheckpoint: {total / 1e9:.2f} GB in {len(shard_sizes)} shards (largest {largest / 1e9:.3f} GB), "
          f"rank-16 LoRA on all linear layers; {args.reps} reps, medians; device {args.device}")
    for name, (t, m) in med.items():
        print(f"  {name:24s} {t:7.2f} s  {total / 1e9 / t:5.2f} GB/s  peak RSS {m / 2**20:7.0f} MiB")
    print(f"  adapterfmt / cp floor     {ours_t / cp_t:5.2f}x   (target <= 1.25)")
    print(f"  (adapterfmt - start-up) / cp floor {(ours_t - start_t) / cp_t:5.2f}x   "
          f"(merge work alone; start-up {start_t:.2f} s)")
    print(f"  PEFT / adapterfmt         {peft_t / ours_t:5.2f}x   (target >= 3)")
    print(f"  adapterfmt RSS / shard    {med['adapterfmt merge'][1] / largest:5.2f}x   (target <= 1.5)")
    print(f"  output vs PEFT: {checked} tensors compared, {differ} differ")


if __name__ == "__main__":
    main()
