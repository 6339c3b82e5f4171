"""The speed benchmark end to end on a 2-block DiT: the timings are meaningless, the plumbing is not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_speed_bench_writes_json_and_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "bench/speed.py", "--shapes", "tiny", "--threads", "1", "--repeats", "1",
         "--calibration", "2", "--no-preset-row", "--workdir", str(tmp_path / "work"),
         "--json", str(tmp_path / "speed.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["config"]: r for r in result["shapes"]["tiny"]["rows"]}
    assert list(rows) == ["eager fp32", "torch-int8 W8A8", "ort W8A8", "ort W8A8 s8-act", "ort W4A8", "ort fp32",
                          "quantize_static"]
    assert rows["ort fp32"]["speedup_vs_ort_fp32"] == 1.0 and rows["ort fp32"]["size_vs_fp32"] == 1.0
    assert rows["ort W8A8"]["kernels"]["quantized_layers"] == {"MatMulIntegerToFloat": 15}   # 7 per block + final
    assert rows["ort W4A8"]["size_vs_fp32"] < rows["ort W8A8"]["size_vs_fp32"] < 1   # tiny: embeddings dominate
    assert rows["ort W8A8"]["sqnr_vs_reference_db"] > 35 and rows["ort fp32"]["sqnr_vs_fp32_db"] > 60
    assert all(len(r["times_ms"]) == 1 and r["median_ms"] > 0 for r in rows.values())
    table = (tmp_path / "speed.md").read_text()
    assert "| ort W8A8 | 15 MatMulIntegerToFloat |" in table
