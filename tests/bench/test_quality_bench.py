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


def test_tq_ablation_table_has_the_papers_table_iii_layout():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "bench" / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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


def test_the_two_ablations_are_separate_runs(tmp_path):
    done = subprocess.run([sys.executable, "bench/quality.py", "--ablation", "--tq-ablation", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--ablation and --tq-ablation are separate runs" in done.stderr
