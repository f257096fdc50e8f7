"""Evaluations say how many examples they covered of the split's count.

A corrupt TFRecord ends the reading of its file and an unreadable image is
skipped; the evaluation then covers fewer examples than the source holds, and
says so, in its output and in metrics.json. Tiny CIFAR-style ResNeXts on
generated 32x32 images.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import keras_resnext as kr
import pipelines
from conftest import REPO_ROOT
from tfrecord_files import corrupt_record_data, write_tfrecords

training = pytest.importorskip("keras_resnext.training")

IMAGE_SIZE = 32
NUM_CLASSES = 2


def png(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def tiny_model():
    return kr.ResNeXt29(depth=11, cardinality=2, width=4, classes=NUM_CLASSES,
                        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), classifier_activation=None)


@pytest.fixture
def tfrecords_with_a_corrupt_val_record(tmp_path):
    """8 train records; a val file of 32 whose record 20 is corrupt."""
    directory = tmp_path / "tfrecords"
    directory.mkdir()
    write_tfrecords(str(directory), "train", 1, [(png(i), 1 + i % 2) for i in range(8)])
    (val_path,) = write_tfrecords(str(directory), "validation", 1,
                                  [(png(100 + i), 1 + i % 2) for i in range(32)])
    corrupt_record_data(val_path, 20)
    return f"tfrecord:{directory}", val_path


def split(source, name):
    info = pipelines.describe_source(source, name, tfrecord_num_classes=NUM_CLASSES)
    return training.Split(
        lambda batch_size, context: pipelines.build_dataset(
            source, name, batch_size, name == "train", image_size=IMAGE_SIZE,
            tfrecord_num_classes=NUM_CLASSES, input_context=context),
        info.num_examples)


def test_training_metrics_record_examples_evaluated_and_expected(
        tmp_path, tfrecords_with_a_corrupt_val_record, capfd):
    source, val_path = tfrecords_with_a_corrupt_val_record
    lines = []
    config = training.TrainConfig(model_dir=str(tmp_path / "model"), epochs=1, batch_size=4,
                                  learning_rate=0.01, weight_decay=0.0, steps_per_epoch=1,
                                  validation_freq=0)
    training.train(tiny_model, split(source, "train"), split(source, "val"), config,
                   log=lambda *args, **kwargs: lines.append(" ".join(map(str, args))))
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert (metrics["eval_examples"], metrics["eval_examples_expected"]) == (20, 32)
    assert any(line.startswith("Final evaluation on 20 of 32 examples") for line in lines), lines
    report = capfd.readouterr().err
    assert "evaluated 20 of 32 examples: 12 could not be read" in report, report
    assert f"{val_path} record 20 (records 20-31 of 32 lost)" in report


def test_folder_evaluation_counts_skipped_images_against_the_split(tmp_path, capfd):
    for name, data in (("a/0.png", png(0)), ("a/1.png", png(1)), ("b/2.png", png(2)),
                       ("b/broken.png", png(3)[:40])):
        path = tmp_path / "val" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    evaluated = training.evaluate_model(tiny_model(), split(f"folder:{tmp_path}", "val"), 4)
    assert (evaluated["num_examples"], evaluated["num_examples_expected"]) == (3, 4)
    report = capfd.readouterr().err
    assert "evaluated 3 of 4 examples: 1 could not be read" in report
    assert str(tmp_path / "val" / "b" / "broken.png") in report


def test_eval_only_cli_reports_and_records_examples_evaluated_and_expected(
        tmp_path, tfrecords_with_a_corrupt_val_record):
    source, val_path = tfrecords_with_a_corrupt_val_record
    weights = str(tmp_path / "tiny.weights.h5")
    tiny_model().save_weights(weights)
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "train", "cifar.py"), "--eval_only",
         f"--weights={weights}", f"--dataset={source}", f"--tfrecord_num_classes={NUM_CLASSES}",
         "--depth=11", "--cardinality=2", "--width=4", "--batch_size=8",
         f"--model_dir={tmp_path / 'eval'}"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"on {source} val (20 of 32 images)" in completed.stdout
    assert f"{val_path} record 20 (records 20-31 of 32 lost)" in completed.stderr
    assert "evaluated 20 of 32 examples: 12 could not be read" in completed.stderr
    metrics = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert (metrics["num_examples"], metrics["num_examples_expected"]) == (20, 32)
