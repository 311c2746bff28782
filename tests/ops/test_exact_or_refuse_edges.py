"""Regression tests for the small exact-or-refuse defects of the consumer issue (one test per defect)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.cli import main
from adapterfmt.errors import BaseMismatchError, UsageError
from tests.helpers import make_peft_adapter, tiny_llama

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory, llama_base):
    root = tmp_path_factory.mktemp("edges")
    peft_dir = make_peft_adapter(llama_base, root / "peft", r=4, lora_alpha=8, target_modules=TARGETS)
    native = root / "lora.safetensors"
    adapterfmt.convert(peft_dir, native, base=llama_base)
    return peft_dir, native


def test_convert_without_to_infers_gguf_from_the_suffix(lora, llama_base, tmp_path):
    _, native = lora
    report = adapterfmt.convert(native, tmp_path / "a.gguf", base=llama_base)
    assert report.target_format == "gguf"
    assert (tmp_path / "a.gguf").read_bytes()[:4] == b"GGUF"


def test_to_contradicting_the_suffix_is_refused(lora, tmp_path):
    _, native = lora
    with pytest.raises(UsageError, match=r"--to peft but the output name ends in '\.gguf'"):
        adapterfmt.convert(native, tmp_path / "a.gguf", to="peft")
    assert not (tmp_path / "a.gguf").exists()


def test_to_is_case_insensitive_and_read_only_formats_are_refused(lora, tmp_path):
    _, native = lora
    assert adapterfmt.convert(native, tmp_path / "p", to="PEFT").target_format == "peft"
    with pytest.raises(UsageError, match="'nola_official' is read-only") as err:
        adapterfmt.convert(native, tmp_path / "x.safetensors", to="nola_official")
    assert "nola_official" not in err.value.hint and "gguf" in err.value.hint


def test_validate_fingerprint_mismatch_does_not_name_a_flag_validate_lacks(lora, tmp_path):
    _, native = lora
    other = tiny_llama(tmp_path / "other", seed=5)
    result = adapterfmt.validate(native, base=other)
    assert not result.valid and "fingerprint mismatch" in result.problems[0]
    assert "--force" not in result.problems[0]
    runner = CliRunner()
    out = runner.invoke(main, ["merge", "--base", str(other), "--adapter", str(native), "--out", str(tmp_path / "m")])
    assert out.exit_code == 1 and "--force" in out.output  # merge has --force, so it may name it


def test_api_merge_accepts_plain_adapter_paths(lora, llama_base, tmp_path):
    _, native = lora
    stats = adapterfmt.merge(llama_base, [str(native)], tmp_path / "m")
    assert stats.tensors_changed == 4
    with pytest.raises(UsageError, match="not a number"):
        adapterfmt.merge(llama_base, [(str(native), "heavy")], tmp_path / "m2")


def test_inspect_and_validate_on_a_peft_directory_say_convert_first(lora):
    peft_dir, _ = lora
    runner = CliRunner()
    out = runner.invoke(main, ["validate", str(peft_dir)])
    assert out.exit_code == 2, out.output
    assert "is a peft adapter, not an adapterfmt file; convert it first" in out.output
    assert "not a regular file" not in out.output
    out = runner.invoke(main, ["inspect", str(peft_dir)])  # inspect reads it as convert would
    assert out.exit_code == 0 and "(peft, created by" in out.output


def test_demo_twice_into_one_directory_is_refused_with_the_flag_demo_has(tmp_path):
    (tmp_path / "old").write_text("x")
    runner = CliRunner()
    out = runner.invoke(main, ["demo", "--out", str(tmp_path)])
    assert out.exit_code == 2 and "--overwrite" in out.output
    help_text = runner.invoke(main, ["demo", "--help"]).output
    assert "--overwrite" in help_text


def test_unmerge_of_a_bf16_merge_output_is_verified_not_refused(lora, llama_base, tmp_path):
    _, native = lora
    merged = tmp_path / "merged-bf16"
    adapterfmt.merge(llama_base, [native], merged, dtype="bf16")
    stats = adapterfmt.unmerge(merged, [native], tmp_path / "restored", base=llama_base)
    assert stats.verification["elements_compared"] > 0
    # Against the base rounded to bf16, each element is off by at most the merged value's rounding
    # (half an ulp of it) plus one bf16 ulp at the base value (the restored value's own rounding).
    from adapterfmt.engine.unmerge import ulp_of
    name = "model.layers.0.self_attn.q_proj.weight"
    restored = load_file(str(tmp_path / "restored" / "model.safetensors"))[name].double()
    merged_w = load_file(str(merged / "model.safetensors"))[name]
    original = load_file(str(llama_base / "model.safetensors"))[name].to(torch.bfloat16)
    bound = 0.5 * ulp_of(merged_w) + ulp_of(original)
    assert bool(((restored - original.double()).abs() <= bound).all())


def test_unmerge_help_does_not_promise_one_ulp_for_dora():
    text = CliRunner().invoke(main, ["unmerge", "--help"]).output
    assert "DoRA" in text and "additive methods" in text


def test_convert_base_with_other_architecture_is_refused(lora, tmp_path, gpt2_base):
    _, native = lora
    with pytest.raises(BaseMismatchError):
        adapterfmt.convert(native, tmp_path / "x.safetensors", base=gpt2_base)


def test_unknown_format_option_for_the_chosen_formats_is_refused(lora, tmp_path):
    _, native = lora
    with pytest.raises(UsageError, match="--cuda-sm-count does not apply to --from adapterfmt --to peft"):
        adapterfmt.convert(native, tmp_path / "p2", to="peft", format_options={"cuda_sm_count": 108})


def test_tensor_bytes_checked_before_merge(tmp_path, llama_base):
    # A base shard whose header lies about a tensor's byte length is refused by the checked span reader.
    state = load_file(str(llama_base / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, str(bad / "model.safetensors"))
    raw = bytearray((bad / "model.safetensors").read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + header_len].decode()
    raw[8:8 + header_len] = header.replace('"F32"', '"F16"', 1).encode()
    (bad / "model.safetensors").write_bytes(bytes(raw))
    from adapterfmt.errors import AdapterFmtError
    with pytest.raises(AdapterFmtError):
        adapterfmt.merge(bad, [tmp_path], tmp_path / "m")


def test_check_and_convert_for_target_from_the_command_line(lora, tmp_path):
    _, native = lora
    runner = CliRunner()
    out = runner.invoke(main, ["check", str(native), "-t", "peft", "--json"])
    assert out.exit_code == 0, out.output
    assert '"verdict": "ok"' in out.output
    out = runner.invoke(main, ["check", str(native)])
    assert "VERDICT vllm" in out.output and "VERDICT llama.cpp" in out.output
    out = runner.invoke(main, ["convert", str(native), str(tmp_path / "for-vllm"), "--to", "peft", "--for", "vllm"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "for-vllm" / "adapter_config.json").is_file()


def test_commands_taking_an_adapter_recognise_a_gguf_we_wrote(lora, llama_base, tmp_path):
    _, native = lora
    gguf_file = tmp_path / "a.gguf"
    adapterfmt.convert(native, gguf_file, base=llama_base)
    runner = CliRunner()
    out = runner.invoke(main, ["validate", str(gguf_file)])
    assert out.exit_code == 2 and "is a gguf adapter, not an adapterfmt file; convert it first" in out.output
    assert "corrupt" not in out.output
    info = adapterfmt.inspect_adapter(gguf_file)
    assert info["format"] == "gguf" and info["module_count"] == 4 and info["format_version"] is None
    out = runner.invoke(main, ["inspect", str(gguf_file)])
    assert out.exit_code == 0 and "(gguf, created by" in out.output
