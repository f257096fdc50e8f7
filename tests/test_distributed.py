"""tf.distribute: one MirroredStrategy step against a one-device reference,
a two-process MultiWorkerMirroredStrategy run over loopback, and resuming the
CLI after SIGKILL.

Each case runs in fresh interpreters: logical devices and TF_CONFIG must be
set before TensorFlow starts.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, run_python, run_until_line
from image_folder import write_image_folder

pytestmark = pytest.mark.slow

MIRRORED_STEP = r"""
import json
import keras_resnext as kr
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
import keras
from keras_resnext import training

GLOBAL_BATCH, HALF = 8, 4
rng = np.random.default_rng(0)
images = rng.normal(size=(GLOBAL_BATCH, 16, 16, 3)).astype("float32")
labels = rng.integers(0, 3, GLOBAL_BATCH).astype("int32")
val_images = rng.normal(size=(7, 16, 16, 3)).astype("float32")
val_labels = rng.integers(0, 3, 7).astype("int32")
config = training.TrainConfig(model_dir="unused", epochs=1, batch_size=GLOBAL_BATCH,
                              learning_rate=0.1, weight_decay=1e-3, steps_per_epoch=1)

def tiny_model():
    return kr.ResNeXt29(depth=11, cardinality=2, width=4, classes=3, input_shape=(16, 16, 3),
                        classifier_activation=None)

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
keras.utils.set_random_seed(0)
with strategy.scope():
    model = tiny_model()
    optimizer = training.build_optimizer(config, steps_per_epoch=1)
    optimizer.build(model.trainable_variables)
initial = model.get_weights()
initial_trainable = [w.numpy() for w in model.trainable_weights]

# Replica r gets the r-th per-replica batch: examples [4r, 4r + 4).
def dataset_fn(context):
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(
        context.get_per_replica_batch_size(GLOBAL_BATCH))
batches = iter(strategy.distribute_datasets_from_function(dataset_fn))
training.make_train_loop(model, optimizer, strategy, config)(batches, tf.constant(1))
training.make_average_local_state(strategy, model.non_trainable_weights)()

# The one-device reference: each half-batch with its own BN statistics, the
# two gradients averaged, coupled L2 added, one Nesterov SGD step.
reference = tiny_model()
gradients, statistics = [], []
for half in range(2):
    reference.set_weights(initial)
    x, y = images[half * HALF:(half + 1) * HALF], labels[half * HALF:(half + 1) * HALF]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(training.per_example_loss(y, reference(x, training=True), 3))
    gradients.append(tape.gradient(loss, reference.trainable_variables))
    statistics.append([w.numpy() for w in reference.non_trainable_weights])
reference.set_weights(initial)
mean_gradients = [(a + b) / 2 for a, b in zip(*gradients)]
mean_gradients = training.add_weight_decay(mean_gradients, reference.trainable_variables,
                                           config.weight_decay)
reference_optimizer = training.build_optimizer(config, steps_per_epoch=1)
reference_optimizer.apply(mean_gradients, reference.trainable_variables)
for weight, a, b in zip(reference.non_trainable_weights, *statistics):
    weight.assign((a + b) / 2)

def relative_error(variables, expected):
    worst = 0.0
    for variable, want in zip(variables, expected):
        for local in strategy.experimental_local_results(variable.value):  # every replica
            scale = max(1.0, float(np.abs(want).max()))
            worst = max(worst, float(np.abs(local.numpy() - want).max()) / scale)
    return worst

moved = max(float(np.abs(w.numpy() - i).max())
            for w, i in zip(model.trainable_weights, initial_trainable))
def val_fn(batch_size, context):
    return tf.data.Dataset.from_tensor_slices((val_images, val_labels)).batch(batch_size)
evaluated = training.evaluate_model(model, training.Split(val_fn, 7), 4, strategy)
reference_logits = reference(val_images, training=False).numpy()
# float16 on two replicas: loss scaling with every replica agreeing on
# whether to skip a step. Cardinality 1: TF's CPU kernels have no half-precision
# grouped convolution gradient.
keras.config.set_dtype_policy("mixed_float16")
with strategy.scope():
    half_model = kr.ResNeXt29(depth=11, cardinality=1, width=4, classes=3,
                              input_shape=(16, 16, 3), classifier_activation=None)
    half_optimizer = training.build_optimizer(
        training.TrainConfig(model_dir="unused", epochs=1, batch_size=GLOBAL_BATCH,
                             learning_rate=0.1, weight_decay=1e-3, mixed_precision="float16"),
        steps_per_epoch=2)
    half_optimizer.build(half_model.trainable_variables)
keras.config.set_dtype_policy("float32")
half_before = [w.numpy() for w in half_model.trainable_weights]
half_batches = iter(strategy.distribute_datasets_from_function(
    lambda context: dataset_fn(context).repeat()))
half_sums = training.make_train_loop(half_model, half_optimizer, strategy, config)(
    half_batches, tf.constant(2)).numpy()
half_moved = max(float(np.abs(w.numpy() - b).max())
                 for w, b in zip(half_model.trainable_weights, half_before))

print("RESULT" + json.dumps(dict(
    half_loss=float(half_sums[0] / half_sums[2]), half_moved=half_moved,
    half_scale=float(half_optimizer.dynamic_scale.numpy()),
    half_finite=all(bool(np.isfinite(w.numpy()).all()) for w in half_model.weights),
    trainable=relative_error(model.trainable_weights,
                             [w.numpy() for w in reference.trainable_weights]),
    statistics=relative_error(model.non_trainable_weights,
                              [w.numpy() for w in reference.non_trainable_weights]),
    moved=moved, num_replicas=strategy.num_replicas_in_sync,
    eval_examples=evaluated["num_examples"], eval_top1=evaluated["top1"],
    reference_top1=float(np.mean(reference_logits.argmax(-1) == val_labels)),
)))
"""


def _result(completed):
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = [line for line in completed.stdout.splitlines() if line.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_mirrored_step_equals_averaged_half_batch_gradients():
    result = _result(run_python(MIRRORED_STEP, timeout=300))
    assert result["num_replicas"] == 2
    assert result["moved"] > 1e-3  # the step changed the weights measurably
    # fp32 round-off only: the all-reduce sums in another order than (a + b) / 2.
    assert result["trainable"] < 1e-6, result
    assert result["statistics"] < 1e-6, result
    # Evaluation over 2 replicas counts all 7 examples once (batches 4 + 3).
    assert result["eval_examples"] == 7
    assert result["eval_top1"] == pytest.approx(result["reference_top1"])
    # Mixed float16 under loss scaling takes finite steps on both replicas.
    assert result["half_finite"] and np.isfinite(result["half_loss"]) and result["half_moved"] > 0
    assert result["half_scale"] > 1


# -- CLI runs on a generated image folder ----------------------------------------


CIFAR_CLI = [sys.executable, os.path.join(REPO_ROOT, "train", "cifar.py")]
TINY_MODEL_FLAGS = ["--depth", "11", "--cardinality", "2", "--width", "4"]


def _cli_env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_worker_loopback_run_completes_and_only_the_chief_writes(tmp_path):
    data = write_image_folder(str(tmp_path / "data"))
    model_dir, export_dir = tmp_path / "model", tmp_path / "export"
    workers = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers},
                                "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            CIFAR_CLI + TINY_MODEL_FLAGS + [
                f"--dataset=folder:{data}", "--strategy=multi_worker", "--epochs=2",
                "--batch_size=8", "--lr=0.8", "--steps_per_loop=2", f"--model_dir={model_dir}",
                f"--export_dir={export_dir}"],
            env=_cli_env(TF_CONFIG=tf_config), cwd=REPO_ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=400)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
        assert "Epoch 2/2" in output
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert (metrics["num_workers"], metrics["num_replicas"]) == (2, 2)
    assert metrics["epochs_completed"] == 2
    assert metrics["eval_examples"] == 9  # each val image once, across both workers
    assert "Final evaluation" in outputs[0] and "Final evaluation" not in outputs[1]
    # The worker's throwaway checkpoint folder is gone; the chief's checkpoints remain.
    assert sorted(os.listdir(model_dir / "checkpoints")) == [
        "checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index",
        "ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    assert os.listdir(export_dir) == ["1"]


def test_cli_killed_mid_epoch_resumes_at_that_epoch(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), train_per_class=8)
    model_dir = tmp_path / "model"
    command = CIFAR_CLI + TINY_MODEL_FLAGS + [
        f"--dataset=folder:{data}", "--epochs=3", "--batch_size=4", "--lr=0.4",
        f"--model_dir={model_dir}"]
    steps_per_epoch = 3 * 8 // 4

    seen = run_until_line(command, _cli_env(), "Epoch 2/3")
    assert "Epoch 2/3\n" in seen, "".join(seen)[-3000:]
    assert not (model_dir / "metrics.json").exists()

    rerun = subprocess.run(command, env=_cli_env(), cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    epochs = [line for line in rerun.stdout.splitlines() if line.startswith("Epoch ")]
    assert epochs == ["Epoch 2/3", "Epoch 3/3"], rerun.stdout
    assert f"1 of 3 epochs done, optimizer step {steps_per_epoch}." in rerun.stdout
    assert "ckpt-1" in rerun.stdout
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 3
    with open(model_dir / "training_log.csv") as f:
        assert [line.split(",")[0] for line in f.read().split()[1:]] == ["1", "2", "3"]
    # The final checkpoint counts every step once: epoch 1 was not trained twice.
    check = run_python(
        "import tensorflow as tf\n"
        f"r = tf.train.load_checkpoint({str(model_dir / 'checkpoints')!r})\n"
        "print('STEPS', r.get_tensor('optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE'))\n")
    assert f"STEPS {3 * steps_per_epoch}" in check.stdout, check.stderr[-2000:]
