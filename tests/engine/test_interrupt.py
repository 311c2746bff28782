"""An interrupted merge leaves no output directory and untouched inputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapterfmt.engine import merge as merge_module
from adapterfmt.format import write_adapter
from tests.engine.common import synthetic_lora, tree_hash

ROOT = Path(__file__).resolve().parents[2]


def big_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(0)
    weights = {f"layers.{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(48)}
    base = tmp_path / "base"
    base.mkdir()
    save_file(dict(list(weights.items())[:24]), str(base / "model-00001-of-00002.safetensors"))
    save_file(dict(list(weights.items())[24:]), str(base / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 48 * 4 * 2**20},
             "weight_map": {n: f"model-0000{1 + i // 24}-of-00002.safetensors" for i, n in enumerate(weights)}}
    import json
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    adapter = tmp_path / "adapter.safetensors"
    write_adapter(synthetic_lora(weights, rank=8, rel_norm=1e-2), adapter)
    return base, adapter


def test_sigkill_mid_merge_leaves_no_output_and_inputs_unchanged(tmp_path):
    base, adapter = big_checkpoint(tmp_path)
    before = tree_hash(base), tree_hash(adapter.parent / "adapter.safetensors")
    outdir = tmp_path / "outs"
    outdir.mkdir()
    code = ("import sys; from adapterfmt.engine.merge import merge; "
            "merge(sys.argv[1], [(sys.argv[2], 1.0)], sys.argv[3], device='cpu')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(base), str(adapter), str(outdir / "merged")],
                            cwd=ROOT)
    deadline = time.monotonic() + 60
    killed_mid_way = False
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.stat().st_size > 0 for p in outdir.glob(".adapterfmt-tmp-*/*.safetensors")):
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_way = True
            break
        time.sleep(0.002)
    proc.wait()
    assert killed_mid_way, "the merge finished before it could be killed; make the checkpoint larger"
    assert proc.returncode == -signal.SIGKILL
    assert not (outdir / "merged").exists()
    # What is left is only a hidden temporary directory that no loader mistakes for a model.
    assert [p.name.startswith(".adapterfmt-tmp-") for p in outdir.iterdir()] == [True]
    assert (tree_hash(base), tree_hash(adapter.parent / "adapter.safetensors")) == before


def test_error_mid_merge_cleans_up(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    weights = {f"w{i}": torch.randn(32, 32, generator=gen) for i in range(6)}
    (tmp_path / "base").mkdir()
    save_file(weights, str(tmp_path / "base" / "model.safetensors"))
    calls = []

    def failing(job, stored, ctx):
        calls.append(job.out.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(job, stored, ctx)

    original = merge_module.merge_tensor
    monkeypatch.setattr(merge_module, "merge_tensor", failing)
    with pytest.raises(Exception, match="No space left"):
        merge_module.merge(tmp_path / "base", [(synthetic_lora(weights, 4, 0.1), 1.0)], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
