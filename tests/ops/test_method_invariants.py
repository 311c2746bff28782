"""``validate`` reports each method's own invariants (spec/methods-tuners.md §7): every finding fires on a
crafted bad file, by module name and with the measured number, and stays silent on a good one."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import adapterfmt
from adapterfmt.cli import main
from adapterfmt.format import write_adapter
from adapterfmt.methods.adalora import adalora_params
from adapterfmt.methods.oft import ORTHOGONALITY_LIMIT
from tests.matrix.builders import Target, build_adapter
from tests.tuner_helpers import make_tuner_adapter

TARGETS = [Target("model.layers.0.self_attn.q_proj", [16, 16]), Target("model.layers.0.mlp.down_proj", [16, 24])]
FIRST = TARGETS[0].name


def crafted(variant: str, tmp_path, edit=None, name="a.safetensors"):
    """A file of ``variant`` on two modules; ``edit(adapter)`` breaks the first one."""
    adapter = build_adapter(variant, TARGETS, torch.Generator().manual_seed(0))
    if edit is not None:
        edit(adapter)
    return write_adapter(adapter, tmp_path / name)


def set_role(adapter, role: str, change):
    tensors = adapter.module_tensors(FIRST)
    adapter.tensors[adapter.manifest.modules[FIRST].tensors[role].name] = change(tensors[role].clone())


def codes(result, severity: str) -> set[str]:
    return {f["code"] for f in result.findings if f["severity"] == severity}


def test_ia3_zero_scale_is_a_warning_by_module_name(tmp_path):
    good = adapterfmt.validate(crafted("ia3", tmp_path))
    assert good.valid and not good.warnings and codes(good, "warning") == set()
    bad = adapterfmt.validate(crafted("ia3", tmp_path, lambda a: set_role(a, "scale", lambda t: t.index_fill_(0, torch.tensor([0, 3]), 0.0)),
                                      "bad.safetensors"))
    assert bad.valid and codes(bad, "warning") == {"ia3_zero_scale"}
    (line,) = bad.warnings
    assert FIRST in line and "2 zero scale(s)" in line and "--base" in line
    assert bad.measurements[FIRST]["zero_scales"] == 2.0


def small_blocks(adapter, first_value=None):
    """Trained-looking OFT blocks (entries ~0.01); with ``first_value`` the first module's set to it."""
    for target, entry in adapter.manifest.modules.items():
        name = entry.tensors["blocks"].name
        adapter.tensors[name] = adapter.tensors[name] * 0.01
    if first_value is not None:
        set_role(adapter, "blocks", lambda t: t.fill_(first_value))


def test_oft_orthogonality_is_measured_and_an_error_only_above_the_limit(tmp_path):
    good = adapterfmt.validate(crafted("oft", tmp_path, small_blocks))
    assert good.valid and codes(good, "error") == set() and codes(good, "info") == {"orthogonality"}
    assert all(0 < good.measurements[t.name]["orthogonality_error"] <= ORTHOGONALITY_LIMIT for t in TARGETS)
    bad = adapterfmt.validate(crafted("oft", tmp_path, lambda a: small_blocks(a, 0.6), "bad.safetensors"))
    assert not bad.valid and codes(bad, "error") == {"not_orthogonal"}
    assert any(FIRST in p and "not orthogonal" in p for p in bad.problems)
    assert bad.measurements[FIRST]["orthogonality_error"] > ORTHOGONALITY_LIMIT


def test_peft_default_neumann_oft_passes_with_its_measured_error(llama_base, tmp_path):
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", "oft")
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=llama_base)
    result = adapterfmt.validate(native)
    errors = [m["orthogonality_error"] for m in result.measurements.values()]
    assert result.valid and errors and 1e-6 < max(errors) < ORTHOGONALITY_LIMIT  # the series is not exact


def test_boft_zero_scale_warning_and_orthogonal_butterfly(tmp_path):
    good = adapterfmt.validate(crafted("boft", tmp_path))
    assert good.valid and not good.warnings
    assert max(m["orthogonality_error"] for m in good.measurements.values()) < 1e-5  # exact Cayley
    bad = adapterfmt.validate(crafted("boft", tmp_path, lambda a: set_role(a, "scale", lambda t: t.index_fill_(0, torch.tensor([1]), 0.0)),
                                      "bad.safetensors"))
    assert bad.valid and codes(bad, "warning") == {"boft_zero_scale"} and FIRST in bad.warnings[0]


def test_adalora_rank_ranknum_and_zero_singular_values(tmp_path):
    good = adapterfmt.validate(crafted("adalora", tmp_path))
    assert good.valid and not good.warnings and codes(good, "error") == set()

    def above(adapter):
        entry = adapter.manifest.modules[FIRST]
        entry.params = adalora_params(entry.params["rank"], entry.params["scaling"], entry.params["rank"] - 1)
    bad = adapterfmt.validate(crafted("adalora", tmp_path, above, "above.safetensors"))
    assert not bad.valid and codes(bad, "error") == {"adalora_rank_above_ranknum"}
    assert any(FIRST in p and "exceeds ranknum" in p for p in bad.problems)
    zero = adapterfmt.validate(crafted("adalora", tmp_path, lambda a: set_role(a, "lora_E", lambda t: t.index_fill_(0, torch.tensor([0]), 0.0)),
                                       "zero.safetensors"))
    assert zero.valid and codes(zero, "warning") == {"adalora_zero_singular_value"}
    assert zero.measurements[FIRST]["zero_singular_values"] == 1.0


@pytest.mark.parametrize("variant", ["lokr", "loha"])
def test_lokr_loha_scale_against_the_convention(variant, tmp_path):
    assert adapterfmt.validate(crafted(variant, tmp_path)).valid

    def wrong(adapter):
        adapter.manifest.modules[FIRST].params["scale"] *= 1.5
    bad = adapterfmt.validate(crafted(variant, tmp_path, wrong, "bad.safetensors"))
    assert not bad.valid and FIRST in bad.problems[0] and "disagrees with the" in bad.problems[0]


def test_cli_prints_warnings_and_json_findings(tmp_path):
    path = crafted("ia3", tmp_path, lambda a: set_role(a, "scale", lambda t: t.index_fill_(0, torch.tensor([0]), 0.0)))
    runner = CliRunner()
    text = runner.invoke(main, ["validate", str(path)])
    assert text.exit_code == 0 and "valid" in text.output and f"warning: {path}: module '{FIRST}'" in text.output
    data = json.loads(runner.invoke(main, ["validate", str(path), "--json"]).output)
    assert data["valid"] and {"module": FIRST, "severity": "warning", "code": "ia3_zero_scale"}.items() <= \
        next(f for f in data["findings"] if f["code"] == "ia3_zero_scale").items()


@pytest.mark.parametrize("kind", ["ia3", "adalora", "boft", "trainable_tokens"])
def test_real_peft_adapters_raise_no_warning_or_error(kind, llama_base, tmp_path):
    peft_dir = make_tuner_adapter(llama_base, tmp_path / "peft", kind)
    native = tmp_path / "a.safetensors"
    adapterfmt.convert(peft_dir, native, base=llama_base)
    result = adapterfmt.validate(native)
    assert result.valid and not result.warnings
    assert {f["severity"] for f in result.findings} <= {"info"}
