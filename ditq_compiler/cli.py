"""The ``ditq`` command line (exit codes: 0 success, 1 failure, 2 bad usage)."""

from __future__ import annotations

import sys

import click

from ditq_compiler.recipe import Recipe


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """ditq: quantize diffusion transformers and U-Nets."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.option("--recipe", default="w8a8", show_default=True, help="Preset name or recipe file.")
@click.option("--backend", type=click.Choice(["torch", "torch-int8"]), default="torch", show_default=True)
@click.option("--samples", default=100, show_default=True, help="Digits sampled per model.")
@click.option("--steps", default=100, show_default=True, help="DDPM steps.")
@click.option("--grid", default="ditq-demo.png", show_default=True, help="Where to write the sample grid.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(recipe: str, backend: str, samples: int, steps: int, grid: str, quiet: bool) -> None:
    """Quantize the bundled dit-digits model and compare its samples with FP."""
    from ditq_compiler.demo import run_demo

    result = run_demo(recipe, backend, samples=samples, steps=steps, grid=grid, progress=not quiet)
    click.echo(result.compiled.summary())
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
        click.echo(f"error: {type(e).__name__}: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
