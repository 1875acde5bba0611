"""Smoke test of benchmarks/pretrain_e2e.py: every suite runs and reports its fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {
    "e2e_images_per_s",
    "e2e_steady_images_per_s",
    "bare_images_per_s",
    "loader_images_per_s",
    "e2e_over_bare",
    "loader_over_bare",
    "checkpoint_s",
    "e2e_cpu_ms_per_image",
    "bare_cpu_ms_per_image",
    "num_workers",
    "precision",
    "device",
}


@pytest.mark.parametrize("suite", ["cpu", "gpu"])
def test_suite_smoke_prints_one_json_object_per_case(suite):
    # --smoke: tiny model, digits (cpu) or generated JPEG files (gpu, run here on the CPU), a few steps
    cmd = [sys.executable, "benchmarks/pretrain_e2e.py", "--suite", suite, "--smoke", "--threads", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["objective"] for r in results] == ["mae", "dino"]
    for result in results:
        assert set(result) >= FIELDS
        assert result["e2e_images_per_s"] > 0 and result["bare_images_per_s"] > 0 and result["loader_images_per_s"] > 0
        assert result["e2e_over_bare"] == pytest.approx(result["e2e_images_per_s"] / result["bare_images_per_s"], 0.01)
    assert results[0]["data"] == "digits" if suite == "cpu" else results[0]["data"].endswith("jpegs")
