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


def test_exit_codes_bad_usage_and_failure(tmp_path):
    assert run("no-such-command").returncode == 2
    bad = run("demo", "--quiet", "--recipe", "w9a9")         # bad input, caught before any work: 2
    assert bad.returncode == 2
    assert "unknown recipe 'w9a9'" in bad.stderr and "Traceback" not in bad.stderr
    failed = run("export", str(tmp_path), "--target", "ort")  # a failure while working: 1
    assert failed.returncode == 1 and failed.stderr.startswith("error: ") and "Traceback" not in failed.stderr


# ---- compile / export / inspect / bench ------------------------------------------------------------
import onnx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import ditq_compiler as dq  # noqa: E402
import ditq_compiler.cli as cli_module  # noqa: E402
from ditq_compiler.cli import main  # noqa: E402
from ditq_compiler.artifact import FORMAT_VERSION  # noqa: E402

FACTORY = """
from ditq_compiler.toy import small_dit

def make():
    return small_dit()
"""


def run_main(args, monkeypatch, capsys):
    """``ditq ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["ditq", *args])
    with pytest.raises(SystemExit) as stop:
        main()
        sys.exit(0)
    out = capsys.readouterr()
    return stop.value.code or 0, out.out, out.err


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with a model factory module and a saved calibration set for it."""
    from ditq_compiler.calibration import CalibrationSet

    (tmp_path / "toyfactory.py").write_text(FACTORY)
    g = torch.Generator().manual_seed(0)
    CalibrationSet(sample_name="hidden_states", inputs=torch.randn(16, 4, 8, 8, generator=g),
                   timesteps=torch.randint(0, 1000, (16,), generator=g),
                   class_labels=torch.randint(0, 10, (16,), generator=g),
                   step_index=torch.arange(16), batch_size=8).save(tmp_path / "calibration.safetensors")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_compile_a_factory_model_then_inspect_and_export(project, monkeypatch, capsys):
    code, out, err = run_main(["--quiet", "compile", "toyfactory:make", "--recipe", "w8a8-minmax", "--out", "art",
                               "--calibration", "calibration.safetensors"], monkeypatch, capsys)
    assert code == 0, err
    assert "12 of 23 linear/conv layers quantized" in out and "artifact: art" in out and "x smaller" in out
    assert dq.load(project / "art").provenance.calibration["source"] == "batches"

    code, out, err = run_main(["inspect", "art", "--html", "view.html", "--plot", "plots"], monkeypatch, capsys)
    assert code == 0, err
    assert f"format {FORMAT_VERSION}" in out and "vs the FP checkpoint" in out
    assert "transformer_blocks.1.ff.net.2" in out
    assert (project / "view.html").stat().st_size > 0 and len(list((project / "plots").glob("*.png"))) == 12

    code, out, err = run_main(["-q", "export", "art", "--target", "ort"], monkeypatch, capsys)
    assert code == 0, err
    assert "model-ort.onnx" in out
    onnx.checker.check_model(str(project / "art" / "model-ort.onnx"), full_check=True)


def test_compile_a_zoo_model_calibrates_on_its_own_sampler(tmp_path):
    out = tmp_path / "dit"
    result = CliRunner().invoke(cli, ["compile", "dit-digits", "-r", "w8a8-minmax", "-o", str(out), "--quiet",
                                      "--steps", "5", "--trajectories", "4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    manifest = dq.artifact.read_manifest(out)
    assert manifest["calibration"]["source"] == "from_sampler" and manifest["calibration"]["seed"] == 3
    assert manifest["calibration"]["num_inference_steps"] == 5 and manifest["calibration"]["null_class"] == 10


def test_bad_usage_exits_2_with_one_message(project, monkeypatch, capsys):
    code, _, err = run_main(["compile", "no-such-model", "--out", "x"], monkeypatch, capsys)
    assert code == 2 and "MODEL 'no-such-model' is not a zoo model" in err
    code, _, err = run_main(["compile", "toyfactory:make", "--out", "x"], monkeypatch, capsys)
    assert code == 2 and "no scheduler is known for DiTTransformer2DModel from toyfactory:make" in err
    code, _, err = run_main(["export", ".", "--target", "coreml"], monkeypatch, capsys)
    assert code == 2 and "'coreml' is not one of 'ort', 'tensorrt'" in err
    code, _, err = run_main(["inspect", str(project)], monkeypatch, capsys)
    assert code == 1 and "is not a ditq artifact: it has no manifest.json" in err and "Traceback" not in err
    with pytest.raises(dq.ArtifactError):
        run_main(["--debug", "inspect", str(project)], monkeypatch, capsys)


def test_bench_wraps_the_scripts_and_says_when_one_is_missing(tmp_path, monkeypatch, capsys):
    assert run("bench", "speed", "--help").returncode == 0 and run("bench", "quality", "--help").returncode == 0
    monkeypatch.setattr(cli_module, "BENCH_DIR", tmp_path / "site-packages" / "bench")  # an installed package has none
    code, _, err = run_main(["bench", "speed", "--threads", "1"], monkeypatch, capsys)
    assert code == 2 and "no benchmark 'speed'" in err


@pytest.mark.parametrize("command", [[], ["compile"], ["export"], ["inspect"], ["bench"], ["demo"], ["recipes"]])
def test_help_everywhere(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_compile_a_diffusers_pipeline_folder_uses_its_scheduler(tmp_path, dit):
    from diffusers import DDPMScheduler

    folder = tmp_path / "pipeline"
    dit.save_pretrained(folder / "transformer")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text("{}")
    result = CliRunner().invoke(cli, ["-q", "compile", str(folder), "-r", "w8a8-minmax", "-o", str(tmp_path / "art"),
                                      "--steps", "3", "--trajectories", "2"])
    assert result.exit_code == 0, result.output
    assert "DiTTransformer2DModel compiled with recipe 'w8a8-minmax'" in result.output
    calibration = dq.artifact.read_manifest(tmp_path / "art")["calibration"]
    assert calibration["source"] == "from_sampler" and calibration["null_class"] == 10
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"_class_name": "DDPMScheduler"}')   # only model classes load
    bad = CliRunner().invoke(cli, ["compile", str(tmp_path / "bad"), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "_class_name 'DDPMScheduler' is not a diffusers model class" in bad.output
    bad = CliRunner().invoke(cli, ["compile", str(folder / "scheduler"), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a diffusers model folder (no config.json)" in bad.output


# ---- frictions a new user met ------------------------------------------------------------------------
def test_version_did_you_mean_and_one_exit_code_for_bad_input():
    from ditq_compiler.version import __version__

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    typo = run("demo", "--quiet", "--recipe", "w8a9")
    assert typo.returncode == 2 and "did you mean 'w8a8'?" in typo.stderr
    model = run("compile", "dit-digit", "--out", "nowhere")
    assert model.returncode == 2 and "did you mean 'dit-digits'?" in model.stderr


def test_bench_lists_every_benchmark_and_passes_help_to_the_script():
    from ditq_compiler.cli import benchmarks

    listing = CliRunner().invoke(cli, ["bench"])
    assert listing.exit_code == 0 and all(name in listing.output for name in benchmarks())
    assert {"quality", "speed", "lora_digits"} <= set(benchmarks())
    for args in (["bench", "presets", "--help"], ["bench", "presets", "--", "--help"]):
        shown = run(*args)
        assert shown.returncode == 0 and "usage: presets.py" in shown.stdout, shown.stderr
    assert run("bench", "qualty").returncode == 2


def test_inspect_is_quiet_on_request_and_explains_packed_tensors(tmp_path, monkeypatch, capsys):
    from ditq_compiler.cli import packed_line
    from ditq_compiler.toy import random_dit_batches, small_dit

    path = dq.compile(small_dit(), "w8a8", calibration=random_dit_batches(2), progress=False).save(tmp_path / "a")
    code, out, err = run_main(["inspect", str(path), "-q"], monkeypatch, capsys)
    assert code == 0 and "constant (every value equal" in out and "{'0'" not in out
    assert packed_line({"0": 72, "4": 12}).count("bits") == 2


def test_progress_bars_are_labelled_and_off_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    import io

    from ditq_compiler.sampling import sample
    from ditq_compiler.toy import small_unet

    monkeypatch.setattr(sys, "stderr", io.StringIO())                   # a log file: no terminal
    assert cli_module._quiet(cli_module.click.Context(cli), False)
    monkeypatch.undo()
    sample(small_unet(), __import__("diffusers").DDPMScheduler(num_train_timesteps=10), torch.tensor([1, 2]),
           num_inference_steps=2, desc="FP samples: 2 digits")
    assert "FP samples: 2 digits" in capsys.readouterr().err
