"""The ``adapterfmt`` command line: inspect | validate | convert | extract | merge | unmerge | demo."""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import click

from . import __version__
from .errors import EXIT_USAGE, AdapterFmtError


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


class _Group(click.Group):
    """Turns our errors into one line and an exit code; never a traceback."""

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda msg, *a, **k: click.echo(f"warning: {msg}", err=True)
            try:
                return super().invoke(ctx)
            except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise
            except AdapterFmtError as exc:
                click.echo(f"error: {exc.one_line()}", err=True)
                ctx.exit(exc.exit_code)
            except KeyboardInterrupt:
                click.echo("error: interrupted; no output was left behind", err=True)
                ctx.exit(130)
            except MemoryError:
                click.echo("error: out of memory", err=True)
                ctx.exit(EXIT_USAGE)
            except Exception as exc:  # pragma: no cover - the last line of defence
                if os.environ.get("ADAPTERFMT_DEBUG"):
                    raise
                click.echo(f"error: internal error {type(exc).__name__}: {str(exc)[:300]} "
                           "(set ADAPTERFMT_DEBUG=1 for a traceback and please report it)", err=True)
                ctx.exit(3)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adapterfmt")
def main():
    """adapterfmt: store, convert, merge and check fine-tuning adapters.

    \b
    Examples:
      adapterfmt demo
      adapterfmt convert ./peft-adapter adapter.safetensors --to adapterfmt --base ./base-model
      adapterfmt inspect adapter.safetensors
      adapterfmt validate adapter.safetensors --base ./base-model
      adapterfmt merge --base ./base-model --adapter adapter.safetensors --out ./merged
    """


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (fields in README).")
def inspect(file: Path, as_json: bool):
    """Show an adapter's methods, base, modules, ranks, size and compression.

    \b
    Examples:
      adapterfmt inspect adapter.safetensors
      adapterfmt inspect adapter.safetensors --json | jq .parameter_count
    """
    from .ops.inspection import format_inspection, inspect_adapter
    info = inspect_adapter(file)
    if as_json:
        _emit_json(info)
    else:
        click.echo("\n".join(format_inspection(info)))


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), help="Base model directory to check against.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(file: Path, base: Path | None, as_json: bool):
    """Check structure, schema, tensors, finite values and every ΔW (and the base, if given).

    Exit code 0: valid; 1: invalid (reasons printed); 2: usage or I/O error.

    \b
    Examples:
      adapterfmt validate adapter.safetensors
      adapterfmt validate adapter.safetensors --base ./base-model --json
    """
    from .ops.validate import validate as run_validate
    result = run_validate(file, base)
    if as_json:
        _emit_json(result.to_dict())
    else:
        from .ops.validate import format_validation
        for line, to_stderr in format_validation(result):
            click.echo(line, err=to_stderr)
    sys.exit(result.exit_code)


def format_option_decorators():
    """click options generated from every format's and method conversion's typed options (one
    declaration per option). The help text is the model field's description plus who takes it.
    """
    from .ops.convert import option_fields, option_models
    owners = option_fields()
    seen: dict[str, object] = {}
    for model, _ in option_models():
        for name, info in model.model_fields.items():
            seen.setdefault(name, info)
    decorators = []
    for name, info in seen.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description or ''} [{', '.join(owners[name])}]".strip()
        if info.annotation is bool:
            decorators.append(click.option(flag, name, is_flag=True, default=None, help=help_text))
        else:
            kind = _click_type(info.annotation)
            decorators.append(click.option(flag, name, type=kind, default=None, help=help_text))
    return decorators


def _click_type(annotation):
    """The click type of a pydantic field annotation (``int | None`` -> INT, ``Path | None`` -> Path)."""
    args = [a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None)]
    table = {int: click.INT, float: click.FLOAT, str: click.STRING, Path: click.Path(path_type=Path)}
    return table.get(args[0], click.STRING) if args else click.STRING


def with_format_options(command):
    for decorator in reversed(format_option_decorators()):
        command = decorator(command)
    return command


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "to", default=None, help="Target format (default: from DST's suffix, else adapterfmt).")
@click.option("--from", "source_format", default=None, help="Source format (auto-detected by default).")
@click.option("--base", type=click.Path(path_type=Path), help="Base model: records shapes, dtypes, fingerprints.")
@click.option("--method", default=None, help="Convert every module to this method (e.g. lora).")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt inputs (torch.load(weights_only=True)).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (atomically).")
@click.option("--strict", is_flag=True, help="Fail, writing nothing, if any module would be lossy "
              "or need a scale fold that is not exact (only power-of-two folds are).")
@click.option("--compact", is_flag=True, help="Re-factor LoRA modules at their numerical rank (exact).")
@click.option("--rank", "new_rank", type=click.IntRange(min=1), default=None,
              help="Truncate LoRA modules to this rank (lossy).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Keep this fraction of each ΔW's energy (lossy).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Device for the SVDs (auto: GPU if present).")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON.")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO",
              help="Upload DST to this Hugging Face model repo afterwards (needs a login token).")
@click.option("--for", "for_target", default=None, metavar="TARGET",
              help="Lay the adapter out so that TARGET (vllm, sglang, tgi, llama.cpp, mlx, peft, ...) computes "
                   "exactly our ΔW (folds scales, pads ranks), or refuse with the reason.")
@click.option("--trained-on", "trained_on", type=click.Choice(["nf4", "fp4", "int8", "none"]), default=None,
              help="Record the base form the adapter was trained against (QLoRA: nf4); merge then reproduces it.")
@click.option("--compute-dtype", "compute_dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="With --trained-on: bnb_4bit_compute_dtype used in training (default fp32, as BitsAndBytesConfig).")
@click.option("--block-size", "block_size", type=click.IntRange(min=1), default=None,
              help="With --trained-on nf4/fp4: quantization block size (default 64).")
@click.option("--double-quant", "double_quant", is_flag=True, default=False,
              help="With --trained-on nf4/fp4: bnb_4bit_use_double_quant was on.")
@click.option("--load-dtype", "load_dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="With --trained-on: dtype the base was loaded in before quantizing (default: as stored).")
@with_format_options
def convert(src, dst, to, source_format, base, method, allow_pickle, overwrite, strict, compact, new_rank, energy,
            device, as_json, push_to_hub, for_target, trained_on, compute_dtype, block_size, double_quant,
            load_dtype, **options):
    """Convert an adapter between formats and methods, printing a per-module report.

    Formats (--to/--from): adapterfmt, peft, gguf (llama.cpp), kohya (A1111/ComfyUI), mlx (MLX-LM);
    read only: nola_official, sorsa_official. Without --to, DST's suffix decides (.gguf -> gguf).
    SRC and --base may be hf://owner/repo[@revision][/subfolder] (Hub cache; HF_HUB_OFFLINE honoured).
    Every module is reported as lossless (bit-exact), exact (same maths, fp32 rounding),
    scale_folded (scale moved into B; ΔW error measured) or lossy (with measured error).

    \b
    Examples:
      adapterfmt convert ./peft-adapter adapter.safetensors --base ./base-model
      adapterfmt convert adapter.safetensors ./peft-out --to peft
      adapterfmt convert ./raw-pissa pissa.safetensors --base ./original-base
      adapterfmt convert pissa.safetensors small.safetensors --compact
      adapterfmt convert hf://org/lora adapter.gguf --base hf://org/base-model
      adapterfmt convert adapter.safetensors ./mlx-adapter --to mlx --json
      adapterfmt convert lora.safetensors nola.safetensors --method nola --nola-basis 1024 --seed 7
      adapterfmt convert vit_nola.safetensors out.safetensors --from nola_official --nola-rank 1
      adapterfmt convert adapter.safetensors ./for-vllm --to peft --for vllm
    """
    from .errors import UsageError
    from .ops.convert import convert as run_convert
    if sum([compact, new_rank is not None, energy is not None]) > 1:
        raise UsageError("use only one of --compact, --rank, --energy")
    resize = None
    if compact or new_rank is not None or energy is not None:
        resize = {"rank": new_rank, "energy": energy, "device": device}
    report = run_convert(src, dst, to=to, source_format=source_format, base=base, method=method,
                         allow_pickle=allow_pickle, overwrite=overwrite, strict=strict,
                         format_options=options, resize=resize, for_target=for_target, trained_on=trained_on,
                         trained_options={"compute_dtype": compute_dtype, "block_size": block_size,
                                          "double_quant": double_quant, "load_dtype": load_dtype})
    if push_to_hub:
        from .ops.hub import push_to_hub as run_push
        report.notes.append(f"uploaded to {run_push(dst, push_to_hub)}")
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo("\n".join(report.lines()))
        click.echo(f"wrote {dst}")


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--target", "-t", "targets", multiple=True, metavar="TARGET",
              help="Consumer to check against, repeatable: peft, vllm, sglang, tgi, llama.cpp, mlx, diffusers, "
                   "comfyui (default: all).")
@click.option("--out", default="OUT", show_default=True, help="Output path shown in the suggested commands.")
@click.option("--base", default="BASE", show_default=True,
              help="Base model path shown in the suggested commands; when it exists, diffusion LoRA files "
                   "are also checked against it (module names, SDXL's UNet config).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(file, targets, out, base, as_json):
    """Say where an adapter will work: per consumer, will it load, what it ignores or mis-scales, and the
    convert command that produces a file computing exactly our ΔW there.

    Exit code 0 when every target computes our ΔW as is, 1 otherwise.

    \b
    Examples:
      adapterfmt check adapter.safetensors
      adapterfmt check adapter.safetensors --target vllm --target llama.cpp --json
      adapterfmt check ./my-peft-adapter -t mlx
    """
    from .ops.check import OK, check_adapter
    from .ops.check_rules import TARGETS
    report = check_adapter(file, list(targets) or list(TARGETS), out=out, base=base)
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo("\n".join(report.lines()))
    sys.exit(0 if all(t.severity == OK for t in report.targets) else 1)


@main.command()
@click.option("--base", required=True, type=click.Path(path_type=Path), help="Base model directory.")
@click.option("--tuned", required=True, type=click.Path(path_type=Path), help="Fully fine-tuned model directory.")
@click.option("--rank", required=True, type=int, help="LoRA rank to extract.")
@click.option("--device", default="auto", show_default=True, help="Device for the SVDs (auto: GPU if present).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-module report as JSON.")
@click.argument("out", type=click.Path(path_type=Path))
def extract(base, tuned, rank, device, overwrite, as_json, out):
    """Extract a LoRA from a full fine-tune (truncated SVD of tuned − base), reporting each module's error.

    \b
    Example:
      adapterfmt extract --base ./base-model --tuned ./finetuned --rank 16 lora.safetensors
    """
    from .ops.extract import extract as run_extract
    report = run_extract(base, tuned, out, rank=rank, device=device, overwrite=overwrite)
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo("\n".join(report.lines(limit=10**6)))
        click.echo(f"wrote {out}")


class AdapterWeight(click.ParamType):
    """``--adapter FILE[:WEIGHT]``: a path and its merge weight (1 when omitted)."""

    name = "FILE[:WEIGHT]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        path, sep, weight = value.rpartition(":")
        if sep and path and not Path(value).exists():
            try:
                return path, float(weight)
            except ValueError:
                pass
        return value, 1.0


class ByteSize(click.ParamType):
    """``--shard-size``: bytes, optionally with a unit (5GB, 500MB, 2GiB)."""

    name = "BYTES"
    UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper()
        number = text.rstrip("KMGIB")
        try:
            size = int(float(number) * self.UNITS[text[len(number):]])
        except (KeyError, ValueError):
            self.fail(f"{value!r} is not a size (e.g. 5000000000, 5GB, 500MiB)", param, ctx)
        if size <= 0:
            self.fail("must be positive", param, ctx)
        return size


def _print_stream_summary(summary, verb: str, out: Path, as_json: bool) -> None:
    if as_json:
        _emit_json(summary.to_dict())
        return
    click.echo(f"{verb} {summary.tensors_changed} of {summary.tensors_total} tensors into {out} "
               f"({summary.shards} shard(s), {summary.bytes_written / 1e9:.2f} GB written) "
               f"in {summary.seconds:.2f}s, peak RSS {summary.peak_rss_bytes / 2**20:.0f} MiB")
    for note in summary.notes:
        click.echo(f"note: {note}")


_DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                       help="Where ΔW is computed (auto: CUDA when available).")
_SHARD = click.option("--shard-size", "shard_size", type=ByteSize(), default=None,
                      help="Re-shard the output (bytes, or 5GB / 500MiB); default: like the input.")


@main.command()
@click.option("--base", required=True, type=click.Path(path_type=Path),
              help="Base model directory, or a single-file SD 1.x/2.x/SDXL checkpoint (.safetensors, LDM/SGM layout).")
@click.option("--adapter", "adapters", required=True, multiple=True, type=AdapterWeight(),
              help="FILE[:WEIGHT], repeatable.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output model directory (a .safetensors file for a single-file --base, same layout).")
@_DEVICE
@click.option("--dtype", type=click.Choice(["keep", "bf16", "fp16", "fp32"]), default="keep", show_default=True)
@_SHARD
@click.option("--force", is_flag=True, help="Merge even if the base fingerprints do not match.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically).")
@click.option("--base-form", "base_form", type=click.Choice(["trained", "original"]), default=None,
              help="trained: merge into dequant(quant(W)), the base the adapter was trained against (QLoRA; "
                   "default when the adapter records it, see convert --trained-on); original: into the stored W.")
@click.option("--gguf-type", "gguf_type", default=None, metavar="TYPE",
              help="GGUF base (a .gguf file): type of the merged tensors, F16, F32 or a type gguf can quantize "
                   "(Q8_0, ...); default: requantize each to its own type.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def merge(base, adapters, out, device, dtype, shard_size, force, overwrite, base_form, gguf_type, as_json):
    """Merge adapters into a base model (fp32 maths, one rounding), streaming tensor by tensor.

    With several adapters, ΔW = Σ weight·ΔW of each, all computed against the original base.

    \b
    Examples:
      adapterfmt merge --base ./base-model --adapter adapter.safetensors --out ./merged
      adapterfmt merge --base ./base --adapter a.safetensors:0.7 --adapter b.safetensors:0.3 --out ./m
    """
    from .ops.merge import merge as run_merge
    summary = run_merge(base, list(adapters), out, dtype=dtype, force=force, overwrite=overwrite,
                        progress=not as_json and sys.stderr.isatty(), device=device, shard_size=shard_size,
                        base_form=base_form, gguf_type=gguf_type)
    _print_stream_summary(summary, "merged", out, as_json)


@main.command()
@click.option("--merged", required=True, type=click.Path(path_type=Path), help="Merged model directory.")
@click.option("--adapter", "adapters", required=True, multiple=True, type=AdapterWeight(),
              help="FILE[:WEIGHT] as merged, repeatable.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output model directory.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Original base: verify the result against it (needed for DoRA and replaced tensors).")
@_DEVICE
@_SHARD
@click.option("--force", is_flag=True, help="Skip the fingerprint check against --base.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def unmerge(merged, adapters, out, base, device, shard_size, force, overwrite, as_json):
    """Subtract merged adapters again: W = round(fp32(W') − Σ weight·ΔW), rounded once.

    Low-precision unmerge is approximate: for additive methods (LoRA, NOLA, OLoRA, PiSSA, SORSA) at most
    about one ulp of the merged value per element; DoRA's row normalisation is inverted in fp32 and can
    be off by more. With --base the fraction restored bit-exactly and the worst error in ulps are reported.

    \b
    Examples:
      adapterfmt unmerge --merged ./merged --adapter adapter.safetensors --out ./restored
      adapterfmt unmerge --merged ./merged --adapter adapter.safetensors --out ./restored --base ./base-model
    """
    from .ops.merge import unmerge as run_unmerge
    summary = run_unmerge(merged, list(adapters), out, base=base, force=force, overwrite=overwrite,
                          progress=not as_json and sys.stderr.isatty(), device=device, shard_size=shard_size)
    _print_stream_summary(summary, "unmerged", out, as_json)
    if summary.verification and not as_json:
        v = summary.verification
        click.echo(f"verified against {base}: {v['fraction_exact']:.4%} of {v['elements_compared']} changed "
                   f"elements restored bit-exactly; largest error {v['max_error_ulps']} ulp(s) of the base value, "
                   f"{v['max_error_merged_ulps']:.2f} ulp(s) of the merged value (its rounding bounds the error)")


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Keep the demo's files here (default: a temporary directory).")
@click.option("--overwrite", is_flag=True, help="Replace the demo's files in a non-empty --out directory.")
def demo(out_dir, overwrite):
    """Run the whole job on tiny random models: make adapters, convert, merge, validate.

    An LLM half (a tiny Llama; PEFT LoRA/rsLoRA/DoRA, LoHa, IA³ files and NOLA; GGUF/MLX/PEFT exports;
    LoHa -> LoRA exactly, IA³ -> LoRA at --rank 2 and 16 with the measured error) and a diffusion half (a
    tiny SD 1.x pipeline; a kohya LoRA/LoCon file; diffusers/kohya exports; merges into the pipeline and
    into a single-file checkpoint). Each step prints one line with what it measured. Needs no network
    and no optional dependency: the models are built from configs on the spot.

    \b
    Example:
      adapterfmt demo --out ./demo-out
      adapterfmt demo --out ./demo-out --overwrite
    """
    from .ops.demo import run_demo
    for line in run_demo(out_dir, overwrite=overwrite):
        click.echo(line)


if __name__ == "__main__":  # pragma: no cover
    main()
