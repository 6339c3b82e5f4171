"""The ``ditq`` command line.

    ditq compile MODEL --recipe R --out DIR     quantize and save an artifact
    ditq export DIR --target ort|tensorrt       lower a saved artifact to ONNX
    ditq inspect DIR [--html FILE] [--plot DIR] what was done to every layer
    ditq bench BENCHMARK [ARGS]...              run a benchmark script from bench/ (`ditq bench` lists them)
    ditq demo                                   quantize dit-digits, sample, compare with FP
    ditq recipes                                list the preset recipes
    ditq --version

Exit codes: 0 success; 2 bad input, caught before any work: an unknown command, option, recipe or
model, a bad recipe file (with a "did you mean" where a name is close); 1 a failure while working.
Errors print as one line on stderr (``--debug`` for the traceback). ``--quiet`` / ``-q`` (before or
after the command) turns progress bars off; they are off by themselves when stderr is not a
terminal (a log file gets no bar redraws).

Under ``torchrun --nproc-per-node N -m ditq_compiler.cli compile ...`` the N processes compile together
(``ditq_compiler.distributed``): rank 0 draws the calibration set and sends it to the others, shows the
progress and the summary and writes the artifact; every rank's error line starts with its rank.
"""

from __future__ import annotations

import ast
import difflib
import os
import subprocess
import sys
from pathlib import Path

import click

from ditq_compiler.recipe import Recipe, RecipeError
from ditq_compiler.version import __version__

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
EXPORT_TARGETS = ("ort", "tensorrt")


def _quiet(ctx: click.Context, quiet: bool) -> bool:
    """No progress bars: asked for, or stderr is not a terminal (bars would be redrawn into a log)."""
    return quiet or bool(ctx.find_root().obj and ctx.find_root().obj.get("quiet")) or not sys.stderr.isatty()


def did_you_mean(name: str, known) -> str:
    """' (did you mean 'w8a8'?)' when ``name`` is close to one of ``known``, else ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_recipe(text: str) -> Recipe:
    """``Recipe.load``, its errors as bad usage (exit 2) with a suggestion for a mistyped preset name."""
    try:
        return Recipe.load(text)
    except RecipeError as e:
        hint = did_you_mean(text, Recipe.presets()) if not Path(text).exists() else ""
        raise click.BadParameter(f"{e}{hint}", param_hint="--recipe") from None


def quiet_option(command):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(command)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def print_summary(console, summary) -> None:
    """The rich table at its natural width (colours on a terminal), never squeezed to the terminal's."""
    from rich.console import Console

    width = max(map(len, str(summary).splitlines()))
    Console(file=console.file, width=width, highlight=False, soft_wrap=True).print(summary)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def size_line(manifest: dict) -> str:
    sizes = manifest["sizes"]
    artifact, fp = sizes["artifact_bytes"], sizes["fp_checkpoint_bytes"]
    ratio = f", {fp / artifact:.2f}x smaller" if artifact and fp else ""
    return (f"{_mib(artifact)} on disk (tensors {_mib(sizes['tensor_bytes'])}) vs the FP checkpoint's "
            f"{_mib(fp)}{ratio}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="ditq",
                      message="%(prog)s (ditq-compiler) %(version)s")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, for every command.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """ditq: quantize diffusion transformers and U-Nets."""
    ctx.obj = {"debug": debug, "quiet": quiet}


@cli.command("compile")
@click.argument("model")
@click.option("--recipe", "-r", default="w8a8", show_default=True, help="Preset name or recipe file.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Artifact directory to write.")
@click.option("--backend", type=click.Choice(["torch", "torch-int8", "cpu-binary"]), default="torch",
              show_default=True)
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help="A saved CalibrationSet (.safetensors) instead of sampling.")
@click.option("--scheduler", help="Scheduler folder (scheduler_config.json) or module:factory, where MODEL has none.")
@click.option("--steps", default=100, show_default=True, help="Sampler steps for calibration (25 are kept).")
@click.option("--guidance", default=2.0, show_default=True, help="Classifier-free guidance scale when sampling.")
@click.option("--trajectories", default=32, show_default=True, help="Sampled trajectories for calibration.")
@click.option("--seed", default=0, show_default=True, help="Calibration seed (recorded in the artifact).")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="Also write the HTML view here.")
@quiet_option
@click.pass_context
def compile_command(ctx, model, recipe, out, backend, calibration, scheduler, steps, guidance, trajectories, seed,
                    html_file, quiet):
    """Quantize MODEL with a recipe and save the artifact to --out.

    MODEL: a zoo name (dit-digits, unet-digits), a diffusers model or pipeline folder, or
    module:factory. Calibration comes from the model's own sampler when its scheduler is known,
    or from --calibration.
    """
    import ditq_compiler as dq
    from ditq_compiler.distributed import SINGLE, init_from_environment, launched_by_torchrun
    from ditq_compiler.model_source import ModelSourceError, calibration_for, resolve_model

    recipe = load_recipe(recipe)                        # bad recipes fail before any work
    dq.artifact.check_destination(out)                  # so does a destination the save would refuse
    try:
        source = resolve_model(model, scheduler)
    except ModelSourceError as e:
        from ditq_compiler.zoo.specs import MODELS

        raise click.BadParameter(f"{e}{did_you_mean(model, MODELS)}", param_hint="MODEL") from None
    group = init_from_environment(_device(source.model)) if launched_by_torchrun() else SINGLE
    quiet = _quiet(ctx, quiet) or not group.is_main      # one progress bar and one summary: rank 0's
    drawn, failure = None, None
    if group.is_main:                                   # rank 0 draws the calibration set, the others get it
        try:
            drawn = calibration_for(source, calibration_file=calibration, num_inference_steps=steps,
                                    guidance_scale=guidance, trajectories=trajectories, seed=seed,
                                    progress=not quiet)
        except Exception as e:   # every rank stops with it
            failure = e
    drawn, failure = group.broadcast((drawn, failure))
    if isinstance(failure, ModelSourceError):
        raise click.UsageError(str(failure)) from None
    if failure is not None:
        raise failure
    compiled = dq.compile(source.model, recipe, calibration=drawn, backend=backend, progress=not quiet,
                          distributed=group.active)
    path = compiled.save(out, progress=not quiet)
    if not group.is_main:
        return
    console = _console()
    print_summary(console, compiled.summary())
    manifest = dq.artifact.read_manifest(path)
    console.print(f"\nartifact: {path} — {size_line(manifest)}")
    if html_file:
        from ditq_compiler.inspection.html import write_html

        console.print(f"HTML view: {write_html(compiled, html_file, manifest)}")


@cli.command("export")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--target", type=click.Choice(EXPORT_TARGETS), required=True, help="ONNX flavour to write.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="ONNX file (default: ARTIFACT/model-TARGET.onnx).")
@quiet_option
@click.pass_context
def export_command(ctx, artifact, target, out, quiet):
    """Export a saved artifact to ONNX for ONNX Runtime (ort) or TensorRT."""
    import ditq_compiler as dq

    compiled = dq.load(artifact)
    out = Path(out) if out else Path(artifact) / f"model-{target}.onnx"
    console = _console(stderr=True)
    if _quiet(ctx, quiet):
        compiled.export_onnx(out, target=target)
    else:
        with console.status(f"exporting {compiled.captured.model_class} to {out} (target {target})"):
            compiled.export_onnx(out, target=target)
    _console().print(f"wrote {out} ({_mib(Path(out).stat().st_size)})")


@cli.command("inspect")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="Write the interactive HTML view here.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False),
              help="Write activation-range PNGs (per layer, before/after the transformations) here; needs "
                   "matplotlib: pip install -e '.[plot]'.")
@quiet_option
@click.pass_context
def inspect_command(ctx, artifact, html_file, plot_dir, quiet):
    """Show what was done to every layer of a saved artifact."""
    import ditq_compiler as dq

    if plot_dir:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib, an optional extra: pip install -e '.[plot]' "
                                   "(or pip install matplotlib)") from None
    compiled = dq.load(artifact, progress=not _quiet(ctx, quiet))
    manifest = compiled.manifest
    console = _console()
    versions = manifest["library_versions"]
    calibration = manifest.get("calibration", {})
    console.print(f"artifact {artifact}: format {manifest['format_version']}, written {manifest['created']} by "
                  f"ditq-compiler {versions.get('ditq-compiler')} (torch {versions.get('torch')})")
    console.print(f"size: {size_line(manifest)}; {packed_line(manifest.get('packed_bits') or {})}")
    console.print(f"calibration: {calibration.get('source')}"
                  + (f", seed {calibration['seed']}" if "seed" in calibration else ""))
    print_summary(console, compiled.summary())
    if html_file:
        from ditq_compiler.inspection.html import write_html

        console.print(f"HTML view: {write_html(compiled, html_file, manifest)}")
    if plot_dir:
        paths = compiled.plot(plot_dir)
        console.print(f"{len(paths)} plots in {plot_dir}")


def packed_line(counts: dict[str, int]) -> str:
    """The manifest's packed-tensor counts in words: 0 bits is a constant tensor (all values equal)."""
    if not counts:
        return "no bit-packed tensors"
    parts = [f"{n} constant (every value equal, stored as one number: zero points, mostly)" if bits == "0"
             else f"{n} at {bits} bits" for bits, n in counts.items()]
    return "integer tensors stored at the bits their values need: " + ", ".join(parts) + \
        " (8-bit codes are stored as int8 as they are)"


def benchmarks() -> dict[str, str]:
    """bench/*.py in this checkout, with the first line of each script's docstring."""
    found = {}
    for script in sorted(BENCH_DIR.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(script.read_text())) or ""
        except SyntaxError:
            doc = ""
        found[script.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


@cli.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                        "help_option_names": []}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(args):
    """Run bench/BENCHMARK.py with ARGS: `ditq bench BENCHMARK --help` is the script's own help;
    `ditq bench` lists the benchmarks."""
    found = benchmarks()
    if not args or args[0] in ("-h", "--help"):
        width = max(map(len, found), default=0)
        click.echo("Usage: ditq bench BENCHMARK [ARGS]...  (ARGS, --help included, go to bench/BENCHMARK.py)\n\n"
                   "Benchmarks:\n" + "\n".join(f"  {name.ljust(width)}  {doc}" for name, doc in found.items()))
        if not found:
            click.echo("  (none: benchmarks ship with the source repository, not with an installed package)")
        return
    name, rest = args[0], [a for a in args[1:] if a != "--"] if args[1:2] == ("--",) else list(args[1:])
    if name not in found:
        raise click.BadParameter(f"no benchmark {name!r} in {BENCH_DIR}{did_you_mean(name, found)}; "
                                 f"benchmarks: {', '.join(found)}", param_hint="BENCHMARK")
    code = subprocess.call([sys.executable, str(BENCH_DIR / f"{name}.py"), *rest], cwd=BENCH_DIR.parent)
    sys.exit(code)


@cli.command()
@click.option("--recipe", default="w8a8", show_default=True, help="Preset name or recipe file.")
@click.option("--backend", type=click.Choice(["torch", "torch-int8"]), default="torch", show_default=True)
@click.option("--samples", default=50, show_default=True, help="Digits sampled per model.")
@click.option("--steps", default=50, show_default=True, help="DDPM steps.")
@click.option("--grid", default="ditq-demo.png", show_default=True, help="Where to write the sample grid.")
@quiet_option
@click.pass_context
def demo(ctx, recipe: str, backend: str, samples: int, steps: int, grid: str, quiet: bool) -> None:
    """Quantize the bundled dit-digits model and compare its samples with FP."""
    from ditq_compiler.demo import run_demo

    load_recipe(recipe)                                 # a bad name is bad usage, before any work
    result = run_demo(recipe, backend, samples=samples, steps=steps, grid=grid, progress=not _quiet(ctx, quiet))
    console = _console()
    print_summary(console, result.compiled.summary())
    click.echo("")
    click.echo(result.quality_table)
    click.echo(f"\nsamples (FP rows on top, {recipe} below): {result.grid}")


@cli.command()
def recipes() -> None:
    """List the preset recipes."""
    presets = Recipe.presets()
    width = max(map(len, presets))
    for name, description in presets.items():
        click.echo(f"{name.ljust(width)}  {description}")


def _device(model) -> str:
    from ditq_compiler.distributed import model_device

    return str(model_device(model))


def _rank_prefix() -> str:
    """'[rank r] ' in a process of a torchrun job (their lines interleave on one terminal), else ''."""
    from ditq_compiler.distributed import launched_by_torchrun

    return f"[rank {os.environ['RANK']}] " if launched_by_torchrun() else ""


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.UsageError as e:
        e.show()
        sys.exit(2)
    except click.Abort:
        sys.exit(1)
    except Exception as e:  # one readable line unless --debug
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        click.echo(f"{_rank_prefix()}error: {type(e).__name__}: {message}", err=True)
        sys.exit(1)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """A torchrun job's process group ends with the command."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
