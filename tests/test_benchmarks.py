"""The benchmark command runs end to end (quick mode) and writes its figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_mode_prints_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)], cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())["train_throughput"]
    assert [row["model"] for row in figures] == ["pit-n", "vit-n/2", "resnet-n"]
    assert all(row["images_per_s"] > 0 for row in figures)
    assert "images/s" in result.stdout
    comparison = json.loads(out.read_text())["ours_vs_usual"]
    assert [row["model"] for row in comparison] == ["pit-n", "vit-n/2", "resnet-n"]
    assert all(row["ratio"] == row["ours_images_per_s"] / row["usual_images_per_s"] for row in comparison)
