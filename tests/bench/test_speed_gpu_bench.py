"""The GPU speed benchmark's --smoke mode on the CPU (toy models, Triton's interpreter): the timings are
meaningless, the plumbing is not."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "bench/speed_gpu.py", "--smoke", "--out", str(out), *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_speed_gpu_smoke_writes_json_and_table(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "speed-gpu-smoke.json").read_text())
    assert result["complete"] is True and result["settings"]["smoke"] is True
    assert {r["kernel"] for r in result["gemm"]} == {"bf16 mm", "torch._int_mm", "ours prologue (bf16 x)",
                                                     "ours codes (int8 x)", "fp8 per-token quant + _scaled_mm"}
    assert all(r["status"] == "ok" for r in result["gemm"])
    for name, linears in (("dit-xl", 12), ("pixart-1024", 10)):
        rows = {r["config"]: r for r in result["models"][name]["batches"]["2"]}
        assert list(rows) == ["bf16 eager", "bf16 compile", "ours W8A8", "ours FP8", "torchao int8 dyn",
                              "torchao fp8 dyn", "ours W8A8 prologue"]
        for config in ("bf16 eager", "bf16 compile", "ours W8A8", "ours FP8", "ours W8A8 prologue"):
            row = rows[config]
            assert row["status"] == "ok" and len(row["times_ms"]) == 2 and row["median_ms"] > 0, row
            assert row["sqnr_vs_fp32_db"] > 30 and row["weight_mb"] > 0
        assert rows["ours W8A8"]["linears_quantized"] == linears == rows["ours FP8"]["linears_quantized"]
        if importlib.util.find_spec("torchao") is None:
            assert rows["torchao int8 dyn"]["status"] == rows["torchao fp8 dyn"]["status"] == "not installed"
    table = (tmp_path / "speed-gpu-smoke.md").read_text()
    assert "| ours W8A8 |" in table and "| 16x32x48 | ours codes (int8 x) |" in table


@pytest.mark.slow
def test_speed_gpu_stops_cleanly_when_the_time_budget_is_spent(tmp_path):
    done = _run(tmp_path, "--time-budget", "0", "--models", "dit-xl")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "speed-gpu-smoke.json").read_text())
    assert result["complete"] is False and result["gemm"] == []
    assert result["models"]["dit-xl"] == {"status": "skipped: time budget"}
    assert "INCOMPLETE" in (tmp_path / "speed-gpu-smoke.md").read_text()
