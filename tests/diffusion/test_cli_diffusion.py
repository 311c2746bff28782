"""The CLI with diffusion pipelines: --base takes a pipeline directory; merge takes a component directory."""
from click.testing import CliRunner

from adapterfmt.cli import main

from .kohya_files import sd_scripts_lora


def test_convert_validate_merge_with_a_pipeline_base(sdxl, tmp_path):
    pipe, models = sdxl
    src = tmp_path / "lora.safetensors"
    sd_scripts_lora("sdxl", models, src)
    runner = CliRunner()
    steps = [(["convert", src, tmp_path / "a.safetensors", "--base", pipe], 0, "96 module(s), overall lossless"),
             (["validate", tmp_path / "a.safetensors", "--base", pipe], 0, "valid (96 module(s), base checked)"),
             (["validate", tmp_path / "a.safetensors", "--base", pipe / "unet"], 1, "pass the diffusers pipeline"),
             (["convert", tmp_path / "a.safetensors", tmp_path / "d.safetensors", "--to", "diffusers"], 0, "lossless"),
             (["merge", "--base", pipe / "unet", "--adapter", tmp_path / "a.safetensors", "--out", tmp_path / "m"],
              0, "merged 72 of"),
             (["convert", src, tmp_path / "b.safetensors"], 2, "SGM block layout")]
    for args, code, text in steps:
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code == code, result.output
        assert text in result.output, result.output
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file() and (tmp_path / "m" / "config.json").is_file()
