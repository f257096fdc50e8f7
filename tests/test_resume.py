"""One run per --model_dir, and resuming it: the lock, refused flag changes,
corrupt checkpoints, leftovers of a kill, and deterministic resumption.

In-process on the tiny model and data of test_training.py, except where a
second process or the CLI is the point.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT
from image_folder import write_image_folder
from test_training import config, data, tiny_model  # noqa: F401  (data is a fixture)

tf = pytest.importorskip("tensorflow")
training = pytest.importorskip("keras_resnext.training")


def quiet(*args, **kwargs):
    pass


class Lines:
    """A `log` for `training.train` that keeps what it says."""

    def __init__(self):
        self.lines = []

    def __call__(self, *args, **kwargs):
        self.lines.append(" ".join(str(a) for a in args))


def csv_rows(model_dir):
    with open(os.path.join(model_dir, "training_log.csv")) as f:
        return list(csv.DictReader(f))


# -- one run per model_dir ------------------------------------------------------

HOLDER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_training import colour_images, config, split, tiny_model
from keras_resnext import training

def model_fn():
    print("HOLDING", flush=True)
    time.sleep(600)

data = split(*colour_images(32), True), split(*colour_images(11, seed=1), False)
training.train(model_fn, *data, config({model_dir!r}))
"""


def test_a_second_run_in_the_same_model_dir_fails_naming_the_holders_pid(tmp_path, data):
    model_dir = tmp_path / "model"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(tests=os.path.join(REPO_ROOT, "tests"),
                                             model_dir=str(model_dir))],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in holder.stdout:
            seen.append(line)
            if line.startswith("HOLDING"):
                break
        assert seen and seen[-1].startswith("HOLDING"), "".join(seen)[-3000:]
        with pytest.raises(training.UserError) as error:
            training.train(tiny_model, *data, config(model_dir), log=quiet)
        message = str(error.value)
        assert f"pid {holder.pid}" in message and str(model_dir) in message
        assert "\n" not in message
        assert not (model_dir / "checkpoints").exists() or not os.listdir(
            model_dir / "checkpoints")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without releasing: its lock went with it.
    result = training.train(tiny_model, *data, config(model_dir), log=quiet)
    assert result.metrics["epochs_completed"] == 1


def test_the_lock_is_released_when_train_returns_or_raises(tmp_path, data):
    fcntl = pytest.importorskip("fcntl")

    def assert_unlocked():
        with open(tmp_path / ".lock") as lock_file:  # a second open file: flock conflicts
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)

    training.train(tiny_model, *data, config(tmp_path), log=quiet)
    assert_unlocked()
    with pytest.raises(training.UserError, match="does not match"):
        training.train(lambda: tiny_model(cardinality=4), *data, config(tmp_path), log=quiet)
    assert_unlocked()


# -- flags that change what the run means ----------------------------------------

def test_resuming_with_a_flag_that_changes_the_run_is_refused(tmp_path, data):
    training.train(tiny_model, *data, config(tmp_path, epochs=1), log=quiet)
    changes = [(dict(batch_size=16), "--batch_size"),
               (dict(steps_per_epoch=3), "--steps_per_epoch"),
               (dict(mixed_precision="bfloat16"), "--mixed_precision"),
               (dict(label_smoothing=0.1), "--label_smoothing"),
               (dict(learning_rate=0.5), "--lr"),
               (dict(ema_decay=0.9), "--ema_decay")]
    for change, flag in changes:
        with pytest.raises(training.UserError) as error:
            training.train(tiny_model, *data, config(tmp_path, epochs=2, **change), log=quiet)
        message = str(error.value)
        assert flag in message and "use a new --model_dir" in message, message
        assert "\n" not in message
    assert [row["epoch"] for row in csv_rows(tmp_path)] == ["1"]  # nothing trained


# -- corrupt checkpoints -----------------------------------------------------------

def _corrupt(checkpoint_prefix):
    for suffix in (".index", ".data-00000-of-00001"):
        with open(checkpoint_prefix + suffix, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(size // 2)
            f.write(b"\xde\xad\xbe\xef" * 64)
            f.truncate(size // 2 + 100)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, data):
    training.train(tiny_model, *data, config(tmp_path, epochs=2), log=quiet)
    latest = str(tmp_path / "checkpoints" / "ckpt-2")
    _corrupt(latest)
    log = Lines()
    result = training.train(tiny_model, *data, config(tmp_path, epochs=2), log=log)
    warnings = [line for line in log.lines if latest in line]
    assert len(warnings) == 1 and warnings[0].startswith("Warning:"), log.lines
    assert "\n" not in warnings[0]
    assert any("ckpt-1: 1 of 2 epochs done" in line for line in log.lines), log.lines
    assert [line for line in log.lines if line.startswith("Epoch")] == ["Epoch 2/2"]
    assert result.metrics["epochs_completed"] == 2
    assert [row["epoch"] for row in csv_rows(tmp_path)] == ["1", "2"]


def test_no_intact_checkpoint_fails_with_one_line_naming_it(tmp_path, data):
    training.train(tiny_model, *data, config(tmp_path, epochs=1), log=quiet)
    latest = str(tmp_path / "checkpoints" / "ckpt-1")
    _corrupt(latest)
    with pytest.raises(training.UserError) as error:
        training.train(tiny_model, *data, config(tmp_path, epochs=2), log=quiet)
    message = str(error.value)
    assert latest in message and "\n" not in message, message


# -- leftovers of a kill -------------------------------------------------------------

def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporary_checkpoint_and_file_leftovers_are_removed_at_start(tmp_path, data):
    training.train(tiny_model, *data, config(tmp_path, epochs=1), log=quiet)
    leftovers = [tmp_path / "checkpoints" / "ckpt-2_temp",
                 tmp_path / "checkpoints" / ".worker1-tmp"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "part-00000").write_text("half a checkpoint")
    stale_file = tmp_path / f"metrics.json.tmp-{_dead_pid()}"
    stale_file.write_text("{")
    training.train(tiny_model, *data, config(tmp_path, epochs=2), log=quiet)
    assert not any(path.exists() for path in leftovers + [stale_file])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index",
        "ckpt-2.data-00000-of-00001", "ckpt-2.index"]


def test_metrics_after_a_kill_before_metrics_json_come_from_the_csv(tmp_path, data):
    training.train(tiny_model, *data, config(tmp_path, epochs=1), log=quiet)
    # As a kill between the final checkpoint and metrics.json leaves it.
    os.remove(tmp_path / "metrics.json")
    last_row = csv_rows(tmp_path)[-1]
    metrics = training.train(tiny_model, *data, config(tmp_path, epochs=1), log=quiet).metrics
    assert metrics["train_loss"] == pytest.approx(float(last_row["loss"]))
    assert metrics["train_top1"] == pytest.approx(float(last_row["top1"]))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["train_loss"] is not None and written["images_per_sec"] is not None


@pytest.mark.slow
def test_a_rerun_of_a_finished_run_does_not_export_again(tmp_path):
    data_root = write_image_folder(str(tmp_path / "data"), train_per_class=4, val_per_class=1)
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    stale_export = export_dir / f".tmp-1-{_dead_pid()}"
    stale_export.mkdir()
    command = [sys.executable, os.path.join(REPO_ROOT, "train", "cifar.py"),
               "--depth=11", "--cardinality=2", "--width=4", f"--dataset=folder:{data_root}",
               "--epochs=1", "--batch_size=4", f"--model_dir={tmp_path / 'model'}",
               f"--export_dir={export_dir}"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    env.pop("TF_CONFIG", None)
    for _ in range(2):
        completed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True,
                                   text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
    assert os.listdir(export_dir) == ["1"]
    assert "already exported" in completed.stdout, completed.stdout


# -- deterministic resumption ---------------------------------------------------------

def folder_split(root, split_name):
    pipelines = pytest.importorskip("pipelines")

    def dataset_fn(batch_size, input_context):
        return pipelines.build_dataset(
            f"folder:{root}", split_name, batch_size, training=split_name == "train",
            image_size=16, preprocessing="cifar", deterministic=True, seed=5,
            input_context=input_context)

    return training.Split(dataset_fn, 24 if split_name == "train" else 3)


@pytest.mark.parametrize("source", ["in-memory", pytest.param("folder", marks=pytest.mark.slow)])
def test_a_seeded_run_resumed_after_a_stop_equals_the_uninterrupted_run(
        tmp_path, data, source):
    if source == "folder":  # shuffled paths, random crops and flips from the seed
        root = write_image_folder(str(tmp_path / "images"), train_per_class=8, val_per_class=1)
        data = folder_split(root, "train"), folder_split(root, "val")
    # Epochs of one pass each: the default steps_per_epoch.
    whole = training.train(tiny_model, *data, config(tmp_path / "whole", epochs=3,
                                                     steps_per_epoch=None), log=quiet)
    # Stopped after epoch 1 (all a kill leaves is the checkpoint), then resumed.
    training.train(tiny_model, *data, config(tmp_path / "resumed", epochs=1,
                                             steps_per_epoch=None), log=quiet)
    resumed = training.train(tiny_model, *data, config(tmp_path / "resumed", epochs=3,
                                                       steps_per_epoch=None), log=quiet)
    for mine, theirs in zip(resumed.model.get_weights(), whole.model.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    losses = [row["loss"] for row in csv_rows(tmp_path / "whole")]
    assert [row["loss"] for row in csv_rows(tmp_path / "resumed")] == losses
    assert resumed.metrics["top1"] == whole.metrics["top1"]


def recorded_data_seed(model_dir):
    checkpoint = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    return int(tf.train.load_variable(checkpoint, "data_seed/.ATTRIBUTES/VARIABLE_VALUE"))


def test_an_unseeded_run_draws_its_data_seed_once_and_keeps_it_on_resume(tmp_path, data):
    unseeded = dict(seed=None, steps_per_epoch=None)
    for name in ("first", "second"):
        training.train(tiny_model, *data, config(tmp_path / name, epochs=1, **unseeded),
                       log=quiet)
    first = recorded_data_seed(tmp_path / "first")
    # Two unseeded runs don't share one data order.
    assert first != recorded_data_seed(tmp_path / "second")
    training.train(tiny_model, *data, config(tmp_path / "first", epochs=2, **unseeded),
                   log=quiet)
    assert recorded_data_seed(tmp_path / "first") == first
    # --seed given is the data seed.
    training.train(tiny_model, *data, config(tmp_path / "seeded", epochs=1, seed=7,
                                             steps_per_epoch=None), log=quiet)
    assert recorded_data_seed(tmp_path / "seeded") == 7
