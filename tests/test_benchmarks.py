"""benchmarks/models.py end to end at a toy size: its workers, its interleaved
rounds and its paired ratios (the figures themselves are not checked here)."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_models_benchmark_reports_paired_ratios(tmp_path):
    result_path = tmp_path / "run.json"
    command = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "models.py"),
               "--modes", "inference", "--batch_size", "2", "--image_size", "32",
               "--repeats", "3", "--steps", "1", "--warmup", "1", "--settle", "0",
               "--torch_python", os.path.join(str(tmp_path), "no-such-python"),
               "--json", str(result_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "measuring ours only" in run.stdout
    assert "inference: cost of cardinality (ResNeXt-50 / ResNet-50 time)" in run.stdout
    saved = json.loads(result_path.read_text())
    resnext = saved["results"]["ours|resnext50_32x4d|inference"]["rates"]
    resnet = saved["results"]["ours|resnet50|inference"]["rates"]
    assert len(resnext) == len(resnet) == 3 and min(resnext + resnet) > 0
    ratio = saved["ratios"]["inference: cost of cardinality (ResNeXt-50 / ResNet-50 time)"]
    per_round = sorted(b / a for a, b in zip(resnext, resnet))
    assert ratio["paired"] == per_round[1]
    assert ratio["quartiles"][0] <= ratio["paired"] <= ratio["quartiles"][2]
