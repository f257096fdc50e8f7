"""The training library: §4's recipe, coupled weight decay, resume, EMA, NaN stop.

In-process, default strategy, a 1-block-per-stage CIFAR ResNeXt on 16x16
synthetic images. The multi-replica and multi-process cases are in
test_distributed.py.
"""

import csv
import json
import math
import os

import numpy as np
import pytest

import keras_resnext as kr

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
training = pytest.importorskip("keras_resnext.training")

IMAGE_SIZE = 16
NUM_CLASSES = 3


def tiny_model(cardinality=2):
    return kr.ResNeXt29(depth=11, cardinality=cardinality, width=4, classes=NUM_CLASSES,
                        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), classifier_activation=None)


def colour_images(num_examples, seed=0):
    """Images whose class is the brightest channel: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, num_examples).astype("int32")
    images = rng.normal(0.0, 0.3, (num_examples, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    images[np.arange(num_examples), :, :, labels] += 1.0
    return images, labels


def split(images, labels, training_split):
    def dataset_fn(batch_size, input_context):
        dataset = tf.data.Dataset.from_tensor_slices((images, labels))
        if input_context is not None:
            dataset = dataset.shard(input_context.num_input_pipelines,
                                    input_context.input_pipeline_id)
        if training_split:
            dataset = dataset.shuffle(len(labels), seed=0)
        return dataset.batch(batch_size, drop_remainder=training_split)

    return training.Split(dataset_fn, len(labels))


def config(model_dir, **overrides):
    fields = dict(model_dir=str(model_dir), epochs=1, batch_size=8, learning_rate=0.05,
                  weight_decay=5e-4, steps_per_epoch=2, validation_freq=0, seed=1)
    fields.update(overrides)
    return training.TrainConfig(**fields)


@pytest.fixture(scope="module")
def data():
    return split(*colour_images(32), True), split(*colour_images(11, seed=1), False)


# -- the recipe ---------------------------------------------------------------


def test_recipe_defaults_are_the_papers():
    imagenet = training.config_from_recipe("imagenet", "unused")
    assert (imagenet.batch_size, imagenet.learning_rate, imagenet.weight_decay) == (256, 0.1, 1e-4)
    assert (imagenet.epochs, imagenet.lr_decay_epochs) == (100, (30, 60, 90))
    assert (imagenet.momentum, imagenet.nesterov, imagenet.lr_schedule) == (0.9, True, "step")
    cifar = training.config_from_recipe("cifar", "unused")
    assert (cifar.batch_size, cifar.learning_rate, cifar.weight_decay) == (128, 0.1, 5e-4)
    assert (cifar.epochs, cifar.lr_decay_epochs) == (300, (150, 225))


def test_learning_rate_scales_linearly_with_the_global_batch():
    assert training.config_from_recipe("imagenet", "unused", batch_size=1024).learning_rate == \
        pytest.approx(0.4)
    assert training.config_from_recipe("cifar", "unused", batch_size=64,
                                       base_learning_rate=0.2).learning_rate == pytest.approx(0.1)
    # The step boundaries follow the recipe's fractions of a shorter run.
    assert training.config_from_recipe("cifar", "unused", epochs=10).lr_decay_epochs == (5, 8)


def test_step_schedule_is_section_4s_formula():
    steps_per_epoch = 3
    schedule = training.RecipeSchedule(0.1, steps_per_epoch, 100, "step", (30, 60, 90))
    for epoch in range(1, 101):  # 1-based, as the paper writes it
        expected = 0.1 * 0.1 ** math.floor((epoch - 1) / 30)
        for step in ((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch - 1):
            assert float(schedule(step)) == pytest.approx(expected, rel=1e-5), (epoch, step)


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    schedule = training.RecipeSchedule(0.4, 10, 20, "cosine", warmup_epochs=2)
    warmup = [float(schedule(step)) for step in range(20)]
    np.testing.assert_allclose(warmup, 0.4 * np.arange(1, 21) / 20, rtol=1e-6)
    decay = [float(schedule(step)) for step in range(20, 200)]
    assert decay[0] == pytest.approx(0.4)
    assert all(later <= earlier for earlier, later in zip(decay, decay[1:]))
    assert float(schedule(199)) < 1e-4
    halfway = 20 + (200 - 20) // 2
    assert float(schedule(halfway)) == pytest.approx(0.2, rel=1e-5)


def test_config_rejects_bad_values_with_user_errors(tmp_path):
    with pytest.raises(training.UserError, match="warmup_epochs"):
        config(tmp_path, warmup_epochs=1)
    with pytest.raises(training.UserError, match="mixed_precision"):
        config(tmp_path, mixed_precision="float8")
    with pytest.raises(training.UserError, match="lr_schedule"):
        config(tmp_path, lr_schedule="linear")


def test_label_smoothing_loss():
    logits = tf.constant([[2.0, -1.0, 0.5], [0.0, 0.3, -0.2]])
    labels = tf.constant([0, 2])
    got = training.per_example_loss(labels, logits, 3, label_smoothing=0.1).numpy()
    targets = 0.9 * np.eye(3)[[0, 2]] + 0.1 / 3
    expected = -(targets * tf.nn.log_softmax(logits).numpy()).sum(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_ema_decay_warms_up_like_tf_exponential_moving_average():
    assert float(training.ema_decay_at(0.9999, 0)) == pytest.approx(0.1)
    assert float(training.ema_decay_at(0.9999, 10)) == pytest.approx(11 / 20)
    assert float(training.ema_decay_at(0.9, 10_000)) == pytest.approx(0.9)


def test_strategies_by_name(monkeypatch):
    assert training.create_strategy("default") is tf.distribute.get_strategy()
    assert training.worker_info(training.create_strategy("mirrored")) == (True, 0, 1)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(training.UserError, match="TF_CONFIG"):
        training.create_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(training.UserError, match="TF_CONFIG must be JSON"):
        training.create_strategy("multi_worker")
    with pytest.raises(training.UserError, match="Unknown strategy"):
        training.create_strategy("horovod")


# -- the loop -------------------------------------------------------------------


def test_weight_decay_is_coupled_l2_on_every_parameter_under_nesterov(tmp_path):
    """Two steps equal torch.optim.SGD(nesterov=True, weight_decay=wd): the
    decay enters the momentum buffer, for BN's gamma/beta and biases too."""
    images, labels = colour_images(8)
    cfg = config(tmp_path, weight_decay=0.05, learning_rate=0.1, steps_per_epoch=2)
    model = tiny_model()
    reference = tiny_model()
    reference.set_weights(model.get_weights())
    optimizer = training.build_optimizer(cfg, steps_per_epoch=2)
    optimizer.build(model.trainable_variables)
    train_loop = training.make_train_loop(model, optimizer, tf.distribute.get_strategy(), cfg)
    batches = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())

    names = [v.path for v in reference.trainable_variables]
    assert any("bn/gamma" in n for n in names) and any("predictions/bias" in n for n in names)
    weights = [v.numpy().astype("float64") for v in reference.trainable_variables]
    velocity = [np.zeros_like(w) for w in weights]
    for _ in range(2):
        # The reference gradient is taken at the loop's own weights: float32
        # round-off between the two would flip ReLUs and change gradients by
        # far more than the update rule's tolerance.
        for mine, theirs in zip(reference.trainable_variables, model.trainable_variables):
            mine.assign(theirs)
        with tf.GradientTape() as tape:
            logits = reference(images, training=True)
            loss = tf.reduce_mean(training.per_example_loss(labels, logits, NUM_CLASSES))
        gradients = tape.gradient(loss, reference.trainable_variables)
        train_loop(batches, tf.constant(1))
        for i, gradient in enumerate(gradients):
            d = gradient.numpy() + 0.05 * weights[i]
            velocity[i] = 0.9 * velocity[i] + d
            weights[i] = weights[i] - 0.1 * (d + 0.9 * velocity[i])
    for variable, expected in zip(model.trainable_variables, weights):
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(variable.numpy(), expected, rtol=0, atol=2e-5 * scale,
                                   err_msg=variable.path)
    assert int(optimizer.iterations.numpy()) == 2


def test_nan_loss_stops_the_run_with_a_clear_message(tmp_path, data):
    def diverged_model():
        model = tiny_model()
        model.get_layer("predictions").bias.assign([np.nan] * NUM_CLASSES)
        return model

    with pytest.raises(training.TrainingDiverged, match=r"loss is nan at epoch 1, step 1"):
        training.train(diverged_model, *data, config(tmp_path, epochs=2),
                       log=lambda *a, **k: None)
    assert not tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert not (tmp_path / "metrics.json").exists()


def test_resume_restores_weights_optimizer_and_epoch(tmp_path, data):
    lines = []

    def log(*args, **kwargs):
        lines.append(" ".join(str(a) for a in args))

    first = training.train(tiny_model, *data, config(tmp_path, epochs=1), log=log)
    weights_after_epoch_1 = first.model.get_weights()
    assert lines[0] == "Epoch 1/1"
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs_completed"] == 1

    # The same command again: nothing left to train, the state comes back as saved.
    lines.clear()
    again = training.train(tiny_model, *data, config(tmp_path, epochs=1), log=log)
    assert not any(line.startswith("Epoch") for line in lines)
    assert "1 of 1 epochs done, optimizer step 2" in lines[0]
    assert again.metrics["images_per_sec"] == first.metrics["images_per_sec"]
    for restored, saved in zip(again.model.get_weights(), weights_after_epoch_1):
        np.testing.assert_array_equal(restored, saved)

    # A longer run continues at epoch 2 from that state; a stale CSV row for
    # an epoch that no checkpoint holds is dropped, not duplicated.
    with open(tmp_path / "training_log.csv", "a") as f:
        f.write("2,0.1,9,0,,,,1,1\n")
    lines.clear()
    longer = training.train(tiny_model, *data, config(tmp_path, epochs=2), log=log)
    assert [line for line in lines if line.startswith("Epoch")] == ["Epoch 2/2"]
    checkpoint = tf.train.load_checkpoint(str(tmp_path / "checkpoints"))
    assert checkpoint.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 4
    assert checkpoint.get_tensor("completed_epochs/.ATTRIBUTES/VARIABLE_VALUE") == 2
    with open(tmp_path / "training_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert float(rows[1]["loss"]) == pytest.approx(longer.metrics["train_loss"], rel=1e-5)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2
    assert (metrics["num_workers"], metrics["num_replicas"]) == (1, 1)
    assert metrics["eval_examples"] == 11  # every val example once, partial batch included
    assert 0 <= metrics["top5"] <= 1 and metrics["top1"] <= metrics["top5"]
    assert metrics["images_per_sec"] > 0
    assert sorted(os.listdir(tmp_path / "logs")) == ["train", "validation"]


def test_restoring_another_architecture_fails_with_a_user_error(tmp_path, data):
    training.train(tiny_model, *data, config(tmp_path), log=lambda *a, **k: None)
    with pytest.raises(training.UserError, match="use a new --model_dir"):
        training.train(lambda: tiny_model(cardinality=4), *data, config(tmp_path),
                       log=lambda *a, **k: None)


def test_ema_weights_are_evaluated_and_returned(tmp_path, data):
    result = training.train(tiny_model, *data, config(tmp_path, ema_decay=0.5, steps_per_epoch=3),
                            log=lambda *a, **k: None)
    assert result.metrics["weights"] == "ema"
    checkpoint = tf.train.load_checkpoint(str(tmp_path / "checkpoints"))
    model = result.model
    ema_names = {f"ema/{i}/.ATTRIBUTES/VARIABLE_VALUE": w for i, w in enumerate(model.weights)}
    differs = 0
    for name, weight in ema_names.items():
        np.testing.assert_array_equal(weight.numpy(), checkpoint.get_tensor(name))
    raw = tiny_model()
    tf.train.Checkpoint(model=raw).read(tf.train.latest_checkpoint(
        str(tmp_path / "checkpoints"))).expect_partial()
    for trained, averaged in zip(raw.trainable_weights, model.trainable_weights):
        differs += not np.array_equal(trained.numpy(), averaged.numpy())
    assert differs > 0  # the returned model is the average, not the last step
    again = training.evaluate_model(model, data[1], 8)
    assert again["top1"] == pytest.approx(result.metrics["top1"])


def test_float16_mixed_precision_trains_with_loss_scaling(tmp_path, data):
    # Cardinality 1: TensorFlow's CPU kernels have no half-precision grouped
    # convolution gradient (GPUs do).
    result = training.train(lambda: tiny_model(cardinality=1), *data,
                            config(tmp_path, mixed_precision="float16"),
                            log=lambda *a, **k: None)
    assert result.model.get_layer("conv1_conv").compute_dtype == "float16"
    assert result.model.get_layer("conv1_conv").kernel.dtype == "float32"
    assert np.isfinite(result.metrics["train_loss"])
    checkpoint = tf.train.load_checkpoint(str(tmp_path / "checkpoints"))
    names = [name for name, _ in tf.train.list_variables(
        tf.train.latest_checkpoint(str(tmp_path / "checkpoints")))]
    assert any("dynamic_scale" in name for name in names), names
    # The checkpoint keeps the loss scale the run reached: Keras starts it at
    # 2**15, halves it on a step whose gradients overflow and doubles it only
    # after 2000 good steps, so two steps leave one of three values.
    scale = checkpoint.get_tensor("optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE")
    assert scale in (2.0**15, 2.0**14, 2.0**13), scale
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left alone
