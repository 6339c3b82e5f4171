import subprocess
import sys

from click.testing import CliRunner

from ditq_compiler.cli import cli


def test_demo_quantizes_dit_digits_and_writes_the_grid(tmp_path):
    grid = tmp_path / "demo.png"
    result = CliRunner().invoke(cli, ["demo", "--quiet", "--samples", "20", "--steps", "10", "--grid", str(grid)])
    assert result.exit_code == 0, result.output
    assert "DiTTransformer2DModel compiled with recipe 'w8a8'" in result.output
    assert "36 of 59 linear/conv layers quantized" in result.output  # 6 blocks x (q, k, v, out, fc1, fc2)
    assert "transformer_blocks.5.ff.net.2" in result.output
    assert "FD-digits (20 samples)" in result.output and "w8a8" in result.output.split("FD-digits")[1]
    from PIL import Image

    assert Image.open(grid).size == (10 * 9 * 4, 4 * 9 * 4)  # 40 digits: 20 FP, 20 quantized


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
