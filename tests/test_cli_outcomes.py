"""How a training CLI run ends: divergence, unreadable data, --eval_only on a
run's own checkpoints, flag errors before data, and its piped output."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import keras_resnext as kr
from conftest import REPO_ROOT
from image_folder import write_image_folder
from test_train_cli import our_error_lines, run_cli

TINY_MODEL = ("--depth=11", "--cardinality=2", "--width=4")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data") / "images"), classes=3)


def train(data, model_dir, *flags):
    return run_cli("cifar.py", f"--dataset=folder:{data}", f"--model_dir={model_dir}",
                   "--batch_size=8", *TINY_MODEL, *flags)[0]


def error_line(completed):
    lines = our_error_lines(completed)
    assert lines and lines[-1].startswith("Error: "), completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    return lines[-1]


# Item 3: the loss is computed before each update, so the update that breaks
# the model shows only afterwards.
@pytest.mark.parametrize("flags, epoch", [
    # One step at lr 1e9: the weights stay finite but the logits overflow.
    (["--lr=1e9", "--epochs=1"], 1),
    # No validation after epoch 1; epoch 1's checkpoint must not be written.
    (["--lr=1e38", "--epochs=2", "--validation_freq=0"], 1),
])
def test_a_model_broken_by_an_epoch_is_never_checkpointed_or_exported(data, tmp_path, flags,
                                                                      epoch):
    model_dir = tmp_path / "model"
    completed = train(data, model_dir, "--steps_per_epoch=1", f"--export_dir={tmp_path / 'x'}",
                      *flags)
    assert completed.returncode == 1, completed.stderr[-3000:]
    line = error_line(completed)
    assert line.startswith("Error: Training stopped: ") and f"after epoch {epoch}" in line, line
    assert not (model_dir / "metrics.json").exists()
    assert not list((model_dir / "checkpoints").glob("ckpt-*"))
    assert not (tmp_path / "x").exists()


# Item 5
def test_every_training_image_unreadable_is_one_line_naming_the_split(tmp_path):
    data = write_image_folder(str(tmp_path / "images"), classes=3)
    for root, _, files in os.walk(os.path.join(data, "train")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"not an image")
    completed = train(data, tmp_path / "model", "--epochs=1")
    assert completed.returncode == 1, completed.stderr[-3000:]
    line = error_line(completed)
    assert line.startswith(f"Error: The training split of folder:{data} yielded no batch"), line
    assert "End of sequence" not in completed.stderr


# Item 16
@pytest.mark.slow  # a training run and three evaluations
def test_eval_only_scores_the_runs_own_latest_checkpoint(data, tmp_path):
    model_dir = tmp_path / "model"
    # With an EMA, which the run evaluates and which --eval_only must score too.
    completed = train(data, model_dir, "--epochs=2", "--steps_per_epoch=2", "--lr=0.4",
                      "--ema_decay=0.5")
    assert completed.returncode == 0, completed.stderr[-3000:]
    trained = json.loads((model_dir / "metrics.json").read_text())
    checkpoint = str(model_dir / "checkpoints" / "ckpt-2")
    for where in ([f"--model_dir={model_dir}"], [f"--weights={model_dir}"],
                  [f"--weights={checkpoint}"]):
        completed = run_cli("cifar.py", "--eval_only", f"--dataset=folder:{data}",
                            "--batch_size=8", *TINY_MODEL, *where)[0]
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert (f"{checkpoint} on folder:{data} val (9 of 9 images): top1 {trained['top1']:.4f}"
                in completed.stdout), (where, completed.stdout)
    evaluated = json.loads((model_dir / "eval_metrics.json").read_text())
    assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-5)


def test_eval_only_refuses_weights_with_another_classifier(data, tmp_path):
    weights = str(tmp_path / "five_classes.weights.h5")
    kr.ResNeXt29(depth=11, cardinality=2, width=4, classes=5,
                 input_shape=(32, 32, 3)).save_weights(weights)
    completed = run_cli("cifar.py", "--eval_only", f"--weights={weights}",
                        f"--dataset=folder:{data}", "--batch_size=8", *TINY_MODEL)[0]
    assert completed.returncode == 1, completed.stderr[-3000:]
    line = error_line(completed)
    assert line.startswith(
        "Error: --eval_only needs a classifier for the dataset's 3 classes"), line
    assert "top1" not in completed.stdout


# Item 17
def test_a_bad_model_flag_fails_before_the_data_is_read(tmp_path):
    model_dir = tmp_path / "new"
    completed, _ = run_cli("cifar.py", "--model=resnext_bogus", "--dataset=folder:/no/such/folder",
                           f"--model_dir={model_dir}")
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert error_line(completed).startswith("Error: --model resnext_bogus: not a preset")
    assert not model_dir.exists()


def test_a_failed_start_leaves_no_empty_model_dir(data, tmp_path):
    weights = tmp_path / "broken.weights.h5"
    weights.write_bytes(b"not weights")
    model_dir = tmp_path / "new"
    completed = train(data, model_dir, f"--weights={weights}")
    assert completed.returncode == 1, completed.stderr[-3000:]
    error_line(completed)
    assert not model_dir.exists()


def test_the_synthetic_benchmark_writes_its_images_without_pillow(tmp_path):
    code = f"""
import sys
sys.modules["PIL"] = None  # as in a `.[cpu]` install, which has no Pillow
sys.path.insert(0, {os.path.join(REPO_ROOT, 'benchmarks')!r})
import train_synthetic
train_synthetic.write_dataset({str(tmp_path)!r}, train_per_class=2, val_per_class=1)
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=300, env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert completed.returncode == 0, completed.stderr[-3000:]
    import tensorflow as tf

    for split, count in (("train", 2), ("val", 1)):
        for name in ("checkerboard", "disk", "horizontal_stripes", "vertical_stripes"):
            files = sorted((tmp_path / split / name).iterdir())
            assert len(files) == count
            image = tf.io.decode_png(files[0].read_bytes()).numpy()
            assert image.shape == (32, 32, 3) and np.ptp(image) > 50


# Item 18
def test_piped_output_has_progress_lines_within_an_epoch(data, tmp_path):
    completed = train(data, tmp_path / "model", "--epochs=1", "--steps_per_epoch=3",
                      "--progress_seconds=0")
    assert completed.returncode == 0, completed.stderr[-3000:]
    progress = re.findall(r"^Epoch 1/1 step (\d)/3 - [\d.]+ images/s - loss: [\d.]+ - top1: ",
                          completed.stdout, re.MULTILINE)
    assert progress == ["1", "2"], completed.stdout  # the epoch's own line ends it


def test_the_onednn_banner_is_printed_at_most_once(tmp_path):
    completed, _ = run_cli("cifar.py", "--batch_size=0")  # loads TensorFlow, then fails
    assert completed.returncode == 2
    assert completed.stderr.count("oneDNN custom operations are on") <= 1, completed.stderr
    assert completed.stderr.count("All log messages before absl::InitializeLog") <= 1
