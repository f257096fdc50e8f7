"""`train/imagenet.py` and `train/cifar.py`: one-line errors, failing fast
offline, and --eval_only."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import keras_resnext as kr
from conftest import REPO_ROOT
from image_folder import write_image_folder

# TensorFlow's own start-up lines (glog format), which no flag of ours controls.
TF_LOG_LINE = re.compile(r"^(WARNING: All log messages before absl|[IWE]\d{4} )")


def run_cli(script, *flags, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    env.pop("TF_CONFIG", None)
    started = time.monotonic()
    completed = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train", script),
                                *flags], capture_output=True, text=True, timeout=timeout,
                               env=env, cwd=REPO_ROOT)
    return completed, time.monotonic() - started


def our_error_lines(completed):
    return [line for line in completed.stderr.splitlines()
            if line.strip() and not TF_LOG_LINE.match(line)]


@pytest.mark.parametrize("flags, exit_code, message", [
    (["--batch_size=0"], 2, "Error: flag --batch_size=0: "),
    (["--strategy=horovod"], 2, "Error: flag --strategy=horovod: value should be one of"),
    (["--no_such_flag"], 2, "Error: Unknown command line flag 'no_such_flag'"),
    (["--dataset=folder:/no/such/folder", "--model_dir=/tmp/unused"], 1,
     "Error: Image folder '/no/such/folder'"),
    (["--dataset=folder:/no/such/folder"], 1, "Error: --model_dir is required for training."),
    (["--strategy=multi_worker", "--model_dir=/tmp/unused"], 1,
     "Error: --strategy multi_worker reads the cluster from the TF_CONFIG environment"),
])
def test_bad_flags_and_paths_give_one_line_and_a_nonzero_exit(flags, exit_code, message):
    completed, _ = run_cli("cifar.py", *flags)
    assert completed.returncode == exit_code, completed.stderr[-3000:]
    lines = our_error_lines(completed)
    assert len(lines) == 1 and lines[0].startswith(message), lines


# Runs a CLI with every Python socket connection refused, as on a machine with
# no network, so the test itself never reaches out to a download host.
OFFLINE_RUNNER = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network unreachable (test)")
socket.create_connection = refuse
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_default_dataset_fails_fast_offline_naming_the_dataset_flag(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-c", OFFLINE_RUNNER, os.path.join(REPO_ROOT, "train", "imagenet.py"),
         f"--model_dir={tmp_path / 'model'}", f"--data_dir={tmp_path / 'tfds'}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    seconds = time.monotonic() - started
    assert completed.returncode == 1, completed.stderr[-3000:]
    lines = our_error_lines(completed)
    assert len(lines) == 1 and "imagenette/160px-v2" in lines[0] and "--dataset" in lines[0]
    assert seconds < 60  # no download retries


def test_eval_only_reports_top1_and_top5_of_the_weights(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), classes=4, val_per_class=3)
    model = kr.ResNeXt29(depth=11, cardinality=2, width=4, classes=4, input_shape=(32, 32, 3))
    weights = str(tmp_path / "tiny.weights.h5")
    model.save_weights(weights)
    completed, _ = run_cli(
        "cifar.py", "--eval_only", f"--weights={weights}", f"--dataset=folder:{data}",
        "--depth=11", "--cardinality=2", "--width=4", "--batch_size=5",
        f"--model_dir={tmp_path / 'eval'}")
    assert completed.returncode == 0, completed.stderr[-3000:]

    # The expected numbers, from the files directly: 32x32 images are
    # evaluated as they are (CIFAR-style), normalised by preprocess_input.
    from PIL import Image

    images, labels = [], []
    for label in range(4):
        directory = os.path.join(data, "val", f"class_{label}")
        for name in sorted(os.listdir(directory)):
            images.append(np.asarray(Image.open(os.path.join(directory, name)), "float32"))
            labels.append(label)
    scores = np.asarray(model(kr.preprocess_input(np.stack(images)), training=False))
    ranked = np.argsort(-scores, axis=1)
    expected_top1 = np.mean(ranked[:, 0] == labels)
    expected_top5 = 1.0  # 4 classes: the label is always among the best 5

    metrics = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert metrics["num_examples"] == 12
    assert metrics["top1"] == pytest.approx(expected_top1)
    assert metrics["top5"] == pytest.approx(expected_top5)
    assert f"top1 {expected_top1:.4f} - top5 1.0000" in completed.stdout
