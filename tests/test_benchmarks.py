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


def run_benchmark(script, *args):
    """Runs benchmarks/`script` with `args` to its end; its CompletedProcess."""
    command = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", script), *args]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def test_models_benchmark_reports_paired_ratios(tmp_path):
    result_path = tmp_path / "run.json"
    run = run_benchmark("models.py", "--modes", "inference", "--batch_size", "2",
                        "--image_size", "32", "--repeats", "3", "--steps", "1", "--warmup", "1",
                        "--settle", "0",
                        "--torch_python", os.path.join(str(tmp_path), "no-such-python"),
                        "--json", str(result_path))
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


@pytest.fixture
def models_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO_ROOT, "benchmarks"))
    import models
    return models


def test_latency_percentiles_interpolate_between_calls(models_benchmark):
    calls = [0.010 * (i + 1) for i in range(100)][::-1]
    assert models_benchmark.percentile(calls, 0.5) == pytest.approx(0.505)
    assert models_benchmark.percentile(calls, 0.99) == pytest.approx(0.9901)
    assert models_benchmark.percentile([0.2], 0.99) == 0.2


def test_results_keep_one_file_per_cpu_and_one_entry_per_configuration(models_benchmark,
                                                                      tmp_path):
    import machine

    def keep(precision, batch_size, figure):
        entry = {"args": dict(backend="tensorflow", device="cpu", precision=precision,
                              batch_size=batch_size, image_size=224), "figure": figure}
        return machine.keep_per_cpu(str(tmp_path), "models",
                                    models_benchmark.configuration(entry["args"]), entry)

    first = keep("float32", 1, 1.0)
    keep("bfloat16", 1, 2.0)
    again = keep("float32", 1, 3.0)
    assert first == again and os.listdir(tmp_path) == [os.path.basename(first)]
    assert os.path.basename(first).startswith("models_") and " " not in first
    runs = json.loads(open(first).read())
    assert {key: run["figure"] for key, run in runs.items()} == {
        "tensorflow cpu bfloat16 batch1 224px": 2.0, "tensorflow cpu float32 batch1 224px": 3.0}
    # Each entry names where and when it was measured, and how.
    assert {"cpu", "date", "command"} <= set(runs["tensorflow cpu float32 batch1 224px"])


@pytest.mark.slow
def test_batch_size_1_reports_latency_percentiles_and_the_served_model(tmp_path):
    result_path = tmp_path / "run.json"
    run = run_benchmark("models.py", "--modes", "inference", "--models", "resnext50_32x4d",
                        "--batch_size", "1", "--image_size", "32", "--repeats", "2",
                        "--steps", "1", "--latency_calls", "4", "--warmup", "1", "--settle", "0",
                        "--torch_python", os.path.join(str(tmp_path), "no-such-python"),
                        "--json", str(result_path))
    saved = json.loads(result_path.read_text())
    assert sorted(saved["results"]) == ["ours_served|resnext50_32x4d|inference",
                                        "ours|resnext50_32x4d|inference"]
    for key, result in saved["results"].items():
        # 4 calls over 2 rounds: each round's rate is its 2 calls' images/s.
        assert result["calls"] == 4 and len(result["rates"]) == 2, key
        assert 0 < result["p50_ms"] <= result["p99_ms"], key
        implementation, model, mode = key.split("|")
        row = re.search(rf"^{implementation} +{model} +{mode} +p50 +(\S+) +p99 +(\S+)",
                        run.stdout, re.M)
        assert row, run.stdout
        assert [float(v) for v in row.groups()] == pytest.approx(
            [result["p50_ms"], result["p99_ms"]], abs=0.051)
    assert list(saved["ratios"]) == ["inference: served / predict_on_batch (ResNeXt-50)"]


@pytest.mark.slow
def test_serving_benchmark_pairs_each_served_model_with_predict_under_its_onednn(tmp_path):
    run = run_benchmark("serving.py", "--image_size", "32", "--batch_size", "2", "--repeats", "2",
                        "--steps", "1", "--warmup", "1", "--settle", "0",
                        "--results_dir", str(tmp_path))
    assert run.stdout.startswith("CPU: ")
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("serving_")
    entry = json.loads(path.read_text())["resnext50_32x4d float32 batch2 32px"]
    results = entry["results"]
    assert sorted(results) == sorted([
        "predict_on_batch, oneDNN on", "predict_on_batch, oneDNN off", "served, oneDNN on",
        "served, oneDNN off", "served, oneDNN on, fusable export"])
    assert "oneDNN off" in results["served, oneDNN off"]["version"]

    def paired(served, anchor):
        return statistics.median(a / b for a, b in zip(results[served]["rates"],
                                                       results[anchor]["rates"]))

    # Each served figure is paired with predict_on_batch under the same oneDNN setting.
    for served, anchor in [("served, oneDNN on", "predict_on_batch, oneDNN on"),
                           ("served, oneDNN off", "predict_on_batch, oneDNN off")]:
        assert results[served]["paired_over_anchor"] == paired(served, anchor)
    assert {"cpu", "date", "command"} <= set(entry)
