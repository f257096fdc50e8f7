"""train/detection.py end to end on a tiny COCO-format folder: train, a
SIGKILL and the resume, metrics.json with COCO box AP, TensorBoard, the
SavedModel; and its one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest

import keras_resnext as kr
from conftest import REPO_ROOT, run_until_line
from detection_data import import_keras_hub, write_coco_folder

import_keras_hub()

# The CLI with every preset built as a tiny network, kr.ResNeXt with one block
# per stage (the only change), so that a run takes seconds; the CLI's
# arguments (weights, frozen batch norm, trainable stages) pass through.
TINY_BACKBONE_CLI = [sys.executable, "-c", """
import sys
sys.argv[0] = "train/detection.py"
import keras_resnext as kr
from train import common, detection

def tiny(name, weights=None, **arguments):
    model = kr.ResNeXt((1, 1, 1, 1), cardinality=2, width=4, **arguments)
    return kr.load_weights(model, weights) if weights else model

kr.build = tiny
if "--offline" in sys.argv:
    sys.argv.remove("--offline")
    common._network_reachable = lambda host: False
common.main(detection.FAMILY, lambda: detection.execute(detection.run_from_flags()))
"""]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_CONFIG", None)
    return env


@pytest.mark.slow
def test_trains_resumes_after_sigkill_and_exports(tmp_path):
    data = tmp_path / "coco"
    write_coco_folder(str(data))
    weights = str(tmp_path / "backbone.weights.h5")
    kr.ResNeXt((1, 1, 1, 1), cardinality=2, width=4, include_top=False).save_weights(weights)
    model_dir, export_dir = tmp_path / "model", tmp_path / "export"
    command = TINY_BACKBONE_CLI + [
        f"--dataset=coco:{data}", f"--weights={weights}", "--image_size=128", "--batch_size=4",
        "--epochs=3", "--lr=0.0001", "--seed=1", f"--model_dir={model_dir}",
        f"--export_dir={export_dir}"]
    steps_per_epoch = 8 // 4

    seen = run_until_line(command, _env(), "Epoch 2/3")
    assert "Epoch 2/3\n" in seen, "".join(seen)[-3000:]
    assert not (model_dir / "metrics.json").exists()

    rerun = subprocess.run(command, env=_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"1 of 3 epochs done, optimizer step {steps_per_epoch}." in rerun.stdout
    epochs = [line for line in rerun.stdout.splitlines() if line.startswith("Epoch ")]
    assert epochs == ["Epoch 2/3", "Epoch 3/3"], rerun.stdout
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 3
    assert metrics["eval_images"] == 4
    for key in ("AP", "AP50", "AP75"):
        assert 0.0 <= metrics[key] <= 1.0
    with open(model_dir / "training_log.csv") as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["1", "2", "3"]
    assert os.listdir(model_dir / "logs" / "train")  # TensorBoard events

    assert os.listdir(export_dir) == ["1"]
    check = subprocess.run([sys.executable, "-c", f"""
import numpy as np, tensorflow as tf
serve = tf.saved_model.load({str(export_dir / "1")!r}).signatures["serving_default"]
out = serve(images=tf.zeros([2, 128, 128, 3]))
print("SERVED", sorted(out), tuple(out["boxes"].shape))
"""], env=_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert "SERVED ['boxes', 'confidence', 'labels', 'num_detections'] (2, 100, 4)" in \
        check.stdout, check.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("arguments, error", [
    (["--dataset=coco/2017", "--offline"],
     "Error: TFDS dataset coco/2017 is not in {tmp}/coco/2017/<version> and "
     "images.cocodataset.org cannot be "
     "reached to download it; point --dataset at local data (coco:ROOT) or --data_dir at a "
     "prepared copy."),
    (["--dataset=coco:{tmp}"], "Error: coco:{tmp}: no file matching {tmp}/annotations/"
     "instances_train*.json; the train split needs one, with its images in {tmp}/train<suffix>/."),
    (["--strategy=multi_worker"], "Error: --strategy multi_worker: detection trains with "
     "Keras' fit, on one machine; use default, one_device, mirrored."),
    (["--backbone=resnext29_8x64d"], "Error: --backbone resnext29_8x64d: a CIFAR network has "
     "no P3-P5 pyramid; choose an ImageNet preset."),
])
def test_one_line_errors(tmp_path, arguments, error):
    tmp = str(tmp_path)
    command = TINY_BACKBONE_CLI + [a.format(tmp=tmp) for a in arguments] + [
        f"--data_dir={tmp}", f"--model_dir={tmp}/model"]
    result = subprocess.run(command, env=_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    expected = re.escape(error.format(tmp=tmp)).replace("<version>", "[0-9.]+")
    assert re.fullmatch(expected, result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(f"{tmp}/model")


def test_without_keras_hub_the_cli_says_how_to_install_it():
    result = subprocess.run([sys.executable, "-c", """
import runpy, sys
sys.modules["keras_hub"] = None  # as if it were not installed
sys.argv = ["train/detection.py", "--model_dir=unused"]
runpy.run_path("train/detection.py", run_name="__main__")
"""], env=_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'Error: train/detection.py needs keras-hub: pip install -e ".[hub]" && '
        'pip install --no-deps "keras-hub==0.32.*"')
