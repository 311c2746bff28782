"""The ``adapterfmt`` command line: inspect | validate | convert | merge | demo."""
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
    from .inspect import format_inspection, inspect_adapter
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
    from .validate import validate as run_validate
    result = run_validate(file, base)
    if as_json:
        _emit_json(result.to_dict())
    elif result.valid:
        click.echo(f"{file}: valid ({result.checked_modules} module(s)"
                   f"{', base checked' if result.base_checked else ''})")
    else:
        prefix = "invalid" if result.exit_code == 1 else "error"  # 2: the input could not be read
        for problem in result.problems:
            click.echo(f"{prefix}: {problem}", err=True)
    sys.exit(result.exit_code)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "to", default="adapterfmt", show_default=True, help="Target format.")
@click.option("--from", "source_format", default=None, help="Source format (auto-detected by default).")
@click.option("--base", type=click.Path(path_type=Path), help="Base model: records shapes, dtypes, fingerprints.")
@click.option("--method", default=None, help="Convert every module to this method (e.g. lora).")
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt inputs (torch.load(weights_only=True)).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (atomically).")
@click.option("--strict", is_flag=True, help="Fail, writing nothing, if any module would be lossy.")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON.")
def convert(src, dst, to, source_format, base, method, allow_pickle, overwrite, strict, as_json):
    """Convert an adapter between formats and methods, printing a per-module report.

    Every module is reported as lossless (bit-exact), exact (same maths, fp32 rounding),
    scale_folded (scale moved into B) or lossy (with measured error).

    \b
    Examples:
      adapterfmt convert ./peft-adapter adapter.safetensors --base ./base-model
      adapterfmt convert adapter.safetensors ./peft-out --to peft
    """
    from .convert import convert as run_convert
    report = run_convert(src, dst, to=to, source_format=source_format, base=base, method=method,
                         allow_pickle=allow_pickle, overwrite=overwrite, strict=strict)
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo("\n".join(report.lines()))
        click.echo(f"wrote {dst}")


def _parse_adapter_arg(value: str) -> tuple[str, float]:
    path, sep, weight = value.rpartition(":")
    if sep and path and not Path(value).exists():
        try:
            return path, float(weight)
        except ValueError:
            pass
    return value, 1.0


@main.command()
@click.option("--base", required=True, type=click.Path(path_type=Path), help="Base model directory.")
@click.option("--adapter", "adapters", required=True, multiple=True, help="FILE[:WEIGHT], repeatable.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output model directory.")
@click.option("--dtype", type=click.Choice(["keep", "bf16", "fp16", "fp32"]), default="keep", show_default=True)
@click.option("--force", is_flag=True, help="Merge even if the base fingerprints do not match.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def merge(base, adapters, out, dtype, force, overwrite, as_json):
    """Merge adapters into a base model (fp32 maths, one rounding) and write a model directory.

    \b
    Examples:
      adapterfmt merge --base ./base-model --adapter adapter.safetensors --out ./merged
      adapterfmt merge --base ./base --adapter a.safetensors:0.7 --adapter b.safetensors:0.3 --out ./m
    """
    from .engine.merge import merge as run_merge
    summary = run_merge(base, [_parse_adapter_arg(a) for a in adapters], out, dtype=dtype, force=force,
                        overwrite=overwrite, progress=not as_json and sys.stderr.isatty())
    if as_json:
        _emit_json(summary.to_dict())
    else:
        click.echo(f"merged {summary.tensors_changed} of {summary.tensors_total} tensors into {out} "
                   f"in {summary.seconds:.2f}s")


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Keep the demo's files here (default: a temporary directory).")
def demo(out_dir):
    """Run the whole job on a tiny random model: make adapters, convert, merge, validate.

    Needs no network: the model is built from a config on the spot.

    \b
    Example:
      adapterfmt demo --out ./demo-out
    """
    from .demo import run_demo
    for line in run_demo(out_dir):
        click.echo(line)


if __name__ == "__main__":  # pragma: no cover
    main()
