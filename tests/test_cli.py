"""The CLI: validate's refusals (one line, exit code, no traceback), inspect --json, convert (demo: tests/ops/test_demo.py)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adapterfmt.cli import main
from adapterfmt.ops.convert import convert
from adapterfmt.format.container import read_header

from .helpers import make_peft_adapter, tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, llama_base):
    work = tmp_path_factory.mktemp("cli")
    peft_dir = make_peft_adapter(llama_base, work / "peft", r=4, target_modules=["q_proj", "v_proj"])
    path = work / "adapter.safetensors"
    convert(peft_dir, path, base=llama_base)
    return path


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code, output, expected_code, pattern):
    assert code == expected_code, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert re.search(pattern, lines[0]), lines[0]


def test_validate_ok(adapter, llama_base):
    code, out = run_cli("validate", adapter, "--base", llama_base)
    assert code == 0 and "valid (4 module(s), base checked)" in out


def test_validate_truncated(adapter, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(adapter.read_bytes()[:-10])
    assert_one_line_error(*run_cli("validate", bad), 1, r"cut\.safetensors.*truncated or corrupt")


def test_validate_manifest_disagrees(adapter, tmp_path):
    meta, _ = read_header(adapter)
    tensors = load_file(adapter)
    name = next(k for k in tensors if k.endswith("lora_A"))
    tensors[name] = torch.zeros(3, tensors[name].shape[1])
    bad = tmp_path / "disagree.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert_one_line_error(*run_cli("validate", bad), 1, r"disagree\.safetensors.*manifest says")


def test_validate_nan(adapter, tmp_path):
    meta, _ = read_header(adapter)
    tensors = load_file(adapter)
    name = next(k for k in tensors if k.endswith("lora_B"))
    tensors[name][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    code, out = run_cli("validate", bad)
    assert code == 1 and "Traceback" not in out
    assert re.search(r"nan\.safetensors: tensor .*lora_B' has 1 NaN/Inf", out.splitlines()[0])


def test_validate_wrong_base_shape(adapter, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    assert_one_line_error(*run_cli("validate", adapter, "--base", tmp_path / "other"), 1,
                          r"has shape \[32, 32\], the adapter expects \[64, 64\]")


def test_validate_wrong_base_fingerprint(adapter, tmp_path):
    other = tiny_llama(tmp_path / "other", seed=99)
    assert_one_line_error(*run_cli("validate", adapter, "--base", other), 1, r"fingerprint mismatch")


def test_validate_missing_file_is_usage_error(tmp_path):
    assert_one_line_error(*run_cli("validate", tmp_path / "nope.safetensors"), 2, r"no such file")


def test_subprocess_error_has_no_traceback(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\xff" * 64)
    proc = subprocess.run([sys.executable, "-m", "adapterfmt.cli", "inspect", str(bad)], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr


def test_inspect_json_fields_are_documented(adapter):
    code, out = run_cli("inspect", adapter, "--json")
    assert code == 0
    info = json.loads(out)
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", README.read_text(), re.M))
    assert set(info) <= documented, set(info) - documented
    assert info["methods"] == ["lora"] and info["module_count"] == 4
    assert info["parameter_count"] == 4 * 4 * (64 + 64) - 2 * 4 * 32
    assert info["compression_vs_rank1_lora"] == pytest.approx(info["rank1_lora_parameter_count"] / info["parameter_count"])


def test_convert_report_and_help(adapter, tmp_path):
    code, out = run_cli("convert", adapter, tmp_path / "peft-out", "--to", "peft")
    assert code == 0 and "overall lossless" in out
    code, out = run_cli("convert", adapter, tmp_path / "peft-out", "--to", "peft")
    assert_one_line_error(code, out, 2, "output already exists")
    for command in ("inspect", "validate", "convert", "extract", "merge", "unmerge", "demo"):
        code, out = run_cli(command, "--help")
        assert code == 0 and "Example" in out


def test_output_inside_input_is_refused(adapter, tmp_path, llama_base):
    assert_one_line_error(*run_cli("merge", "--base", llama_base, "--adapter", adapter, "--out",
                                   llama_base / "merged"), 2, "inside the input directory")
    assert_one_line_error(*run_cli("convert", adapter, adapter), 2, "output path is the input")


def test_python_api_mirrors_the_cli(adapter, llama_base, tmp_path):
    import adapterfmt
    import adapterfmt.ops.convert  # noqa: F401  (a submodule import must not shadow the API function)
    import adapterfmt.ops.validate  # noqa: F401
    assert adapterfmt.validate(adapter, base=llama_base).valid
    assert adapterfmt.inspect_adapter(adapter)["module_count"] == 4
    assert adapterfmt.convert(adapter, tmp_path / "peft", to="peft").worst == "lossless"
    assert adapterfmt.merge(llama_base, [(adapter, 1.0)], tmp_path / "merged").tensors_changed == 4
    assert adapterfmt.nola_basis(1, (2, 3)).shape == (2, 3)
