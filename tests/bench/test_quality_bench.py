"""The quality benchmark end to end at smoke size: the numbers are meaningless, the plumbing is not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quality_bench_writes_json_table_plot_and_grids(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "bench/quality.py", "--samples", "20", "--steps", "5", "--recipes", "w8a8-minmax",
         "--sqnr-samples", "4", "--calibration-trajectories", "4", "--batch-size", "10", "--threads", "1",
         "--out", str(tmp_path), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "quality-dit-digits.json").read_text())
    assert result["complete"] is True and result["settings"]["steps"] == 5
    assert [r["config"] for r in result["rows"]] == ["fp", "fp-seed1", "w8a8-minmax"]
    assert [r["seed"] for r in result["rows"]] == [0, 1, 0]
    quantized = result["rows"][2]
    assert len(quantized["timesteps"]) == len(quantized["noise_sqnr_db"]) == 5
    assert quantized["timesteps"] == sorted(quantized["timesteps"], reverse=True)
    assert 10 < quantized["noise_sqnr_median_db"] < 80  # W8A8 on a trained DiT: far from 0 dB and from exact
    for row in result["rows"]:
        assert 0.0 <= row["class_accuracy"] <= 1.0 and row["fd_digits"] > 0
    assert "fd_to_fp" not in result["rows"][0] and all(r["fd_to_fp"] > 0 for r in result["rows"][1:])
    assert result["fp_seed_gap"] == pytest.approx(abs(result["rows"][1]["fd_digits"] - result["rows"][0]["fd_digits"]))
    table = (tmp_path / "quality-dit-digits.md").read_text()
    assert "| w8a8-minmax |" in table and "Real-vs-real FD floor (20 training digits" in table
    assert (tmp_path / "quality-dit-digits-sqnr.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "quality-dit-digits").iterdir()) == [
        "fp-seed1.png", "fp.png", "w8a8-minmax.png"]


def test_quality_bench_rejects_unknown_recipe_before_sampling(tmp_path):
    done = subprocess.run([sys.executable, "bench/quality.py", "--recipes", "w9a9", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "unknown recipe 'w9a9'" in done.stderr
    assert not any(tmp_path.iterdir())


def test_ablation_table_has_the_papers_table_iv_layout():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "bench" / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = dict(class_accuracy=1.0, noise_sqnr_median_db=20.0)
    rows = [dict(row, config="fp", fd_digits=10.0), dict(row, config="w4a8-minmax", fd_digits=30.0),
            dict(row, config="taq-dit-w4a8-separate", fd_digits=20.0),
            dict(row, config="taq-dit-w4a8-noshift", fd_digits=15.0), dict(row, config="taq-dit-w4a8", fd_digits=12.5)]
    table = bench.markdown(rows, float("nan"), 1.6, 1438)
    ablation = table[table.index("TaQ-DiT ablation"):].splitlines()
    assert ablation[2].startswith("| joint reconstruction | static transformation | FD-digits")
    assert ablation[4:8] == ["| - | - | 10.00 | +0.00 | - | 100.0% | - |",
                             "| ✗ | ✗ | 20.00 | +10.00 | - | 100.0% | 20.0 |",
                             "| ✓ | ✗ | 15.00 | +5.00 | - | 100.0% | 20.0 |",
                             "| ✓ | ✓ | 12.50 | +2.50 | - | 100.0% | 20.0 |"]
    assert "seed-to-seed" not in table and "Real-vs-real FD floor (1438 training digits" in table


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "bench" / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_tq_ablation_table_has_the_papers_table_iii_layout():
    bench = _bench()
    row = dict(class_accuracy=1.0, noise_sqnr_median_db=25.0, fd_to_fp=0.5)
    fds = {"fp": 10.0, "w6a6-minmax": 8.0, "tq-dit-w6a6-baseline": 12.0, "tq-dit-w6a6-ho": 11.0,
           "tq-dit-w6a6-ho-mrq": 10.5, "tq-dit-w6a6": 10.25, "tq-dit-w8a8": 10.1}
    rows = [dict(row, config=config, fd_digits=fd) for config, fd in fds.items()]
    table = bench.markdown(rows, 1.3, 1.6, 1438)
    assert "TaQ-DiT ablation" not in table and "| tq-dit-w8a8 | 10.10 | +0.10 | 0.50 |" in table
    ablation = table[table.index("TQ-DiT ablation"):].splitlines()
    assert ablation[2] == ("| HO | MRQ | TGQ | FD-digits | FD gap | FD to FP samples | class accuracy "
                           "| median noise SQNR dB |")
    assert ablation[4:9] == ["| - | - | - | 10.00 | +0.00 | - | 100.0% | - |",
                             "| ✗ | ✗ | ✗ | 12.00 | +2.00 | 0.50 | 100.0% | 25.0 |",
                             "| ✓ | ✗ | ✗ | 11.00 | +1.00 | 0.50 | 100.0% | 25.0 |",
                             "| ✓ | ✓ | ✗ | 10.50 | +0.50 | 0.50 | 100.0% | 25.0 |",
                             "| ✓ | ✓ | ✓ | 10.25 | +0.25 | 0.50 | 100.0% | 25.0 |"]


def test_the_ablations_are_separate_runs(tmp_path):
    done = subprocess.run([sys.executable, "bench/quality.py", "--ablation", "--tq-ablation", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--ablation, --tq-ablation, --robuq, --composed and --bidm are separate runs" in done.stderr


def test_robuq_set_names_presets_and_ampn_variants():
    bench = _bench()
    for name in bench.ROBUQ:
        recipe = bench.recipe_for(name)
        assert recipe.name == name
    variant = bench.recipe_for("ampn-a2.5-ptq", iterations=7)
    assert (variant.mixed_precision.budget, variant.mixed_precision.sensitivity) == (2.5, "ptq")
    assert variant.distillation.iterations == 7 and variant.mixed_precision.search_iterations == 7
    assert bench.recipe_for("robuq-w1.58a4", iterations=3).distillation.iterations == 3


def test_robuq_tables_state_the_gap_criterion_and_the_chosen_bits():
    bench = _bench()
    row = dict(class_accuracy=0.9, noise_sqnr_median_db=15.0, fd_to_fp=1.0, compile_seconds=10.0,
               compile_cpu_seconds=8.0, stage_seconds={"capture": 1.0, "distillation": 9.0})
    ampn = {"budget": 3.0, "sensitivity_from": "distilled", "average_bits": 3.0, "layer_average_bits": 2.5,
            "bits": {"blocks.0.q": 2, "blocks.0.fc1": 4}}
    rows = [dict(config="fp", fd_digits=10.0, class_accuracy=1.0), dict(row, config="w1.58a4-minmax", fd_digits=110.0),
            dict(row, config="robuq-w1.58a4", fd_digits=30.0),
            dict(row, config="robuq-w1.58a3", fd_digits=40.0, ampn=ampn),
            dict(row, config="ampn-a3-ptq", fd_digits=50.0, ampn=dict(ampn, sensitivity_from="ptq",
                                                                       bits={"blocks.0.q": 4, "blocks.0.fc1": 3}))]
    table = bench.markdown(rows, float("nan"), 1.6, 1438)
    assert "robuq-w1.58a4 +20.00 vs w1.58a4-minmax +100.00: |ratio| 0.200 (must be <= 0.5)" in table
    assert "| robuq-w1.58a3 | 10 (8) | 1.0 | 9.0 |" in table
    assert "| 3 | distilled | 3.00 / 2.50 | 40.00 | 1.00 | 90.0% | 15.0 |" in table
    assert "| layer | A3 distilled | A3 ptq |" in table
    assert "| blocks.0.q | 2 | 4 |" in table and "| blocks.0.fc1 | 4 | 3 |" in table
    rows[3]["ampn"]["sensitivity"] = {"blocks.0.q": {"2": 0.1, "3": 0.05}, "blocks.0.fc1": {"2": 0.3, "3": 0.01}}
    rows[4]["ampn"]["sensitivity"] = {"blocks.0.q": {"2": 0.5, "3": 0.02}, "blocks.0.fc1": {"2": 0.2, "3": 0.03}}
    table = bench.markdown(rows, float("nan"), 1.6, 1438)
    assert "before vs after distillation: -1.00 at 2 bits, -1.00 at 3 bits." in table


def test_compile_time_columns_follow_the_compile_order_whatever_the_rows():
    bench = _bench()
    row = dict(class_accuracy=0.9, noise_sqnr_median_db=15.0, compile_seconds=10.0, compile_cpu_seconds=8.0)
    fp = dict(config="fp", fd_digits=10.0, class_accuracy=1.0)
    plain = dict(row, config="w4a4-minmax", fd_digits=11.0, stage_seconds={"capture": 1.0, "rewrite": 2.0})
    mixed = dict(row, config="robuq-w1.58a3", fd_digits=12.0,
                 stage_seconds={"capture": 1.0, "distillation": 5.0, "mixed precision": 3.0, "rewrite": 2.0})
    header = "| config | compile s (CPU s) | capture | mixed precision | distillation | rewrite |"
    for rows in ([fp, plain, mixed], [fp, mixed, plain]):
        table = bench.markdown(rows, float("nan"), 1.6, 1438)
        assert header in table
        assert "| w4a4-minmax | 10 (8) | 1.0 | 0.0 | 0.0 | 2.0 |" in table


@pytest.mark.slow
def test_robuq_bench_records_compile_times_rotations_and_the_allocation(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "bench/quality.py", "--robuq", "--recipes", "hadamard-only", "ampn-a3-ptq", "--samples", "20",
         "--steps", "5", "--sqnr-samples", "4", "--calibration-trajectories", "4", "--batch-size", "10",
         "--threads", "1", "--fp-seeds", "1", "--distillation-iterations", "2", "--out", str(tmp_path), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "quality-dit-digits-robuq.json").read_text())
    assert result["settings"]["calibration_steps"] == 5 and result["settings"]["samples_per_step"] == 16
    exact, ampn = result["rows"][1], result["rows"][2]
    assert exact["noise_sqnr_median_db"] > 80 and len(exact["rotations"]) == 36
    assert ampn["ampn"]["sensitivity_from"] == "ptq" and ampn["ampn"]["average_bits"] <= 3.0
    assert len(ampn["ampn"]["bits"]) == 36 and "distillation" in ampn["stage_seconds"]
    assert ampn["compile_cpu_seconds"] > 0
    assert "AMPN" in (tmp_path / "quality-dit-digits-robuq.md").read_text()


def test_paired_seed_table_and_the_tq_dit_criterion():
    bench = _bench()
    fp = dict(config="fp", fd_digits=10.0, class_accuracy=1.0, seeds={"fd_digits": [10.0, 11.0, 12.0],
                                                                         "class_accuracy": [1.0, 1.0, 0.9]})

    def row(name, fds):
        return dict(config=name, fd_digits=fds[0], class_accuracy=1.0, fd_to_fp=0.1, noise_sqnr_median_db=25.0,
                    seeds={"fd_digits": fds, "class_accuracy": [1.0] * 3, "fd_to_fp": [0.1, 0.2, 0.3]})

    rows = [fp, row("w6a6-minmax", [8.0, 9.0, 10.0]), row("tq-dit-w6a6", [9.0, 10.5, 11.0])]
    assert bench.paired_gap(rows[1], fp) == pytest.approx(-2.0)       # the same -2 at every seed
    assert bench.paired_gap(rows[2], fp) == pytest.approx(-2.5 / 3)
    table = bench.markdown(rows, 1.0, 1.6, 1438)
    assert "Over 3 noise seeds (0..2" in table
    assert "| w6a6-minmax | 9.00 +- 1.00 | -2.00 +- 0.00 | 0.20 | 100.0% |" in table   # paired: no seed noise
    assert "| fp | 11.00 +- 1.00 | +0.00 +- 0.00 | - | 96.7% |" in table
    assert "tq-dit-w6a6 -0.83 (|ratio| 0.42) vs w6a6-minmax -2.00 (target: |ratio| <= 0.5)" in table
    # without --seeds the gap is seed 0's
    assert bench.paired_gap({"fd_digits": 9.0}, {"fd_digits": 10.0}) == -1.0


def test_tgq_softmax_variant_keeps_the_preset_but_groups_post_softmax_only():
    bench = _bench()
    preset, variant = bench.recipe_for("tq-dit-w6a6"), bench.recipe_for("tq-dit-w6a6-tgq-softmax")
    assert variant.time_groups.sites == ("post_softmax",) and variant.time_groups.groups == preset.time_groups.groups
    assert (variant.weights, variant.activations, variant.scale_search, variant.multi_region) == (
        preset.weights, preset.activations, preset.scale_search, preset.multi_region)


@pytest.mark.slow
def test_compile_only_artifacts_are_sampled_later_with_their_compile_figures(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [sys.executable, "bench/quality.py", "--recipes", "w8a8-minmax", "--samples", "20", "--steps", "5",
              "--sqnr-samples", "4", "--calibration-trajectories", "4", "--batch-size", "10", "--threads", "1",
              "--fp-seeds", "1", "--artifacts", str(tmp_path / "art"), "--quiet"]
    compiled = subprocess.run(common + ["--compile-only", "--out", str(tmp_path / "a")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr
    assert not (tmp_path / "a").exists()                          # nothing sampled
    figures = json.loads((tmp_path / "art" / "quality-dit-digits-w8a8-minmax.json").read_text())
    assert figures["compile_cpu_seconds"] > 0 and figures["compile_torch"]
    for out in ("b", "c"):   # from the artifact, twice: the same model, the same numbers, no compile
        done = subprocess.run(common + ["--seeds", "2", "--out", str(tmp_path / out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    rows = [json.loads((tmp_path / o / "quality-dit-digits.json").read_text())["rows"] for o in ("b", "c")]
    assert rows[0][1]["seeds"] == rows[1][1]["seeds"] and len(rows[0][1]["seeds"]["fd_digits"]) == 2
    assert rows[0][1]["compile_seconds"] == figures["compile_seconds"]
    assert "Sampled on the CPU" in (tmp_path / "b" / "quality-dit-digits.md").read_text()


@pytest.mark.slow
def test_error_budget_bench_writes_a_table_per_recipe(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "bench/error_budget.py", "--recipes", "w8a8-minmax", "--steps", "4",
                           "--threads", "1", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "error-budget-dit-digits.json").read_text())
    budget = result["budgets"][0]
    assert budget["recipe"] == "w8a8-minmax" and budget["weights_db"] > budget["all_db"]
    assert {r["quantizers"] for r in budget["rows"]} == {"input of qkv", "input of attn_out", "input of fc1",
                                                         "input of fc2"}
    assert "### w8a8-minmax" in (tmp_path / "error-budget-dit-digits.md").read_text()


def test_bench_recipe_files_load_and_are_named_after_their_file():
    import ditq_compiler as dq

    files = sorted((ROOT / "bench" / "recipes").glob("*.yaml"))
    assert files, "bench/recipes holds the recipe variants the README's tables quote"
    for path in files:
        recipe = dq.Recipe.load(path)
        assert recipe.name == path.stem and recipe.name not in dq.Recipe.presets(), path.name
        assert recipe.description, path.name


@pytest.mark.slow
def test_a_recipe_file_names_its_artifact_and_row(tmp_path):
    recipe = tmp_path / "variant.yaml"
    recipe.write_text((ROOT / "ditq_compiler" / "presets" / "w8a8-minmax.yaml").read_text()
                      .replace("name: w8a8-minmax", "name: my-w8a8"))
    done = subprocess.run(
        [sys.executable, "bench/quality.py", "--recipes", str(recipe), "--steps", "5", "--calibration-trajectories",
         "4", "--threads", "1", "--artifacts", str(tmp_path / "art"), "--compile-only", "--quiet"],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "my-w8a8: compiled in" in done.stdout
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["quality-dit-digits-my-w8a8.ditq",
                                                                     "quality-dit-digits-my-w8a8.json"]
