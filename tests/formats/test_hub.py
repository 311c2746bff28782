"""hf://owner/repo[@revision][/sub] inputs, resolved offline from a fake Hugging Face cache."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from adapterfmt.cli import main
from adapterfmt.ops.convert import convert
from adapterfmt.errors import InputIOError
from adapterfmt.ops.hub import parse_hub, resolve_path
from adapterfmt.ops.inspection import inspect_adapter
from adapterfmt.ops.validate import validate

COMMIT, TAGGED = "a" * 40, "b" * 40


def add_repo(cache, repo_id: str, files: dict, commit: str = COMMIT, ref: str = "main"):
    """Lay out models--owner--repo/{refs/<ref>, snapshots/<commit>/...} as huggingface_hub does."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    for rel, src in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, snap / rel)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)


@pytest.fixture()
def hub(tmp_path, monkeypatch, base, native, peft_dirs):
    cache = tmp_path / "hub"
    add_repo(cache, "org/base", {".": base})
    add_repo(cache, "org/peft", {"adapters/patterns": peft_dirs["patterns"]})
    add_repo(cache, "org/lora", {"adapter.safetensors": native["patterns"]})
    add_repo(cache, "org/lora", {"adapter.safetensors": native["rslora"]}, commit=TAGGED, ref="v1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_parse():
    assert parse_hub("hf://org/repo") == ("org/repo", None, "")
    assert parse_hub("hf:/org/repo@v1/a/b.safetensors") == ("org/repo", "v1", "a/b.safetensors")


def test_resolve_offline_with_revision_and_subfolder(hub):
    assert resolve_path("hf://org/lora/adapter.safetensors") == hub / "models--org--lora/snapshots" / COMMIT / \
        "adapter.safetensors"
    assert TAGGED in str(resolve_path("hf://org/lora@v1/adapter.safetensors"))
    assert inspect_adapter("hf://org/lora@v1/adapter.safetensors")["parameter_count"] > 0


def test_convert_and_validate_from_the_hub(hub, tmp_path):
    out = tmp_path / "from-hub.safetensors"
    report = convert("hf://org/peft/adapters/patterns", out, base="hf://org/base")
    assert report.worst == "lossless"
    assert validate(out, "hf://org/base").valid
    convert("hf://org/lora/adapter.safetensors", tmp_path / "from-hub.gguf", to="gguf")


def test_cli_accepts_hub_paths(hub):
    result = CliRunner().invoke(main, ["inspect", "hf://org/lora/adapter.safetensors"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["validate", "hf://org/lora/adapter.safetensors", "--base", "hf://org/base"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("spec, words", [("hf://org/missing", "cannot get org/missing"),
                                         ("hf://org/lora/nope.safetensors", "'nope.safetensors' is not in the repo"),
                                         ("hf://org/lora@v9/adapter.safetensors", "cannot get org/lora@v9")])
def test_missing_repo_or_file_is_one_line(hub, spec, words):
    with pytest.raises(InputIOError) as info:
        resolve_path(spec)
    line = info.value.one_line()
    assert words in line and "\n" not in line
    result = CliRunner().invoke(main, ["inspect", spec])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and result.output.startswith("error: ")


def test_push_to_hub_uploads_the_output(native, tmp_path, monkeypatch):
    import huggingface_hub
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id))

        def upload_file(self, **kw):
            calls.append(("file", kw["repo_id"], kw["path_in_repo"]))

        def upload_folder(self, **kw):
            calls.append(("folder", kw["repo_id"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    result = CliRunner().invoke(main, ["convert", str(native["patterns"]), str(tmp_path / "x.gguf"), "--to", "gguf",
                                       "--push-to-hub", "me/x-gguf"])
    assert result.exit_code == 0, result.output
    assert calls == [("create", "me/x-gguf"), ("file", "me/x-gguf", "x.gguf")]
    assert "uploaded to https://huggingface.co/me/x-gguf" in result.output
