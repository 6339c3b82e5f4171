import subprocess
import sys

from click.testing import CliRunner

from ditq_compiler.cli import cli


def test_demo_prints_summary():
    result = CliRunner().invoke(cli, ["demo", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "12 of 23 linear/conv layers quantized" in result.output
    assert "transformer_blocks.1.ff.net.2" in result.output


def test_recipes_lists_presets():
    result = CliRunner().invoke(cli, ["recipes"])
    assert result.exit_code == 0
    assert "w8a8-minmax" in result.output and "w6a6" in result.output


def run(*args):
    return subprocess.run([sys.executable, "-m", "ditq_compiler.cli", *args], capture_output=True, text=True)


def test_exit_codes_bad_usage_and_failure():
    assert run("no-such-command").returncode == 2
    failed = run("demo", "--quiet", "--recipe", "w9a9")
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: RecipeError: unknown recipe 'w9a9'")
    assert "Traceback" not in failed.stderr
