"""benchmarks/models.py end to end at a toy size: its workers, its interleaved
rounds and its paired ratios (the figures themselves are not checked here)."""

import json
import os
import re
import statistics
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

CARDINALITY_COST = "inference: cost of cardinality (ResNeXt-50 / ResNet-50 time)"
PRINTED = 0.0051  # the log shows figures to 2 decimals


def test_models_benchmark_reports_paired_ratios(tmp_path):
    result_path = tmp_path / "run.json"
    command = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "models.py"),
               "--modes", "inference", "--batch_size", "2", "--image_size", "32",
               "--repeats", "3", "--steps", "1", "--warmup", "1", "--settle", "0",
               "--torch_python", os.path.join(str(tmp_path), "no-such-python"),
               "--json", str(result_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.loads(result_path.read_text())
    # Without torchvision only our two models are measured, and only their ratio reported.
    assert sorted(saved["results"]) == ["ours|resnet50|inference",
                                        "ours|resnext50_32x4d|inference"]
    assert list(saved["ratios"]) == [CARDINALITY_COST]
    assert (saved["args"]["batch_size"], saved["args"]["repeats"]) == (2, 3)

    for key, result in saved["results"].items():
        assert len(result["rates"]) == 3 and min(result["rates"]) > 0, key
        assert result["median"] == statistics.median(result["rates"]), key
        # The printed table shows the saved figures: median, then each round.
        implementation, model, mode = key.split("|")
        row = re.search(rf"^{implementation} +{model} +{mode} +(.*)$", run.stdout, re.M)
        assert row, run.stdout
        printed = [float(value) for value in row.group(1).split()]
        assert printed == pytest.approx([result["median"], *result["rates"]], abs=PRINTED)

    # ResNeXt-50 time over ResNet-50 time, round by round: the inverse ratio of rates.
    resnext = saved["results"]["ours|resnext50_32x4d|inference"]
    resnet = saved["results"]["ours|resnet50|inference"]
    per_round = [b / a for a, b in zip(resnext["rates"], resnet["rates"])]
    ratio = saved["ratios"][CARDINALITY_COST]
    assert ratio["paired"] == statistics.median(per_round)
    assert ratio["quartiles"] == statistics.quantiles(per_round, n=4)
    assert ratio["of_medians"] == resnet["median"] / resnext["median"]
    line = re.search(rf"^{re.escape(CARDINALITY_COST)}: (.*)x \((.*)-(.*)\) \| (.*)x$",
                     run.stdout, re.M)
    assert line, run.stdout
    expected = [ratio["paired"], ratio["quartiles"][0], ratio["quartiles"][2], ratio["of_medians"]]
    assert [float(value) for value in line.groups()] == pytest.approx(expected, abs=PRINTED)
