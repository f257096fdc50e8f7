"""Issue 13's named recipes (torchvision_v2, rsb_a3): their tables and the
lines printed at start, weight decay per parameter group, the losses on soft
(mixup/cutmix) targets, torchvision's EMA convention, resume checks, and each
recipe from the CLI, resumed after SIGKILL. The paper's recipe stays the
default (test_training.py, test_train_options.py)."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import keras_resnext as kr
from conftest import REPO_ROOT, run_until_line
from image_folder import write_image_folder
from test_training import colour_images, config, data  # noqa: F401 (data: a fixture)

tf = pytest.importorskip("tensorflow")
training = pytest.importorskip("keras_resnext.training")
# train/ is scripts, not an installed package: import it from the checkout.
sys.path.insert(0, REPO_ROOT)
from train import options  # noqa: E402

NUM_CLASSES = 3
AUGMENTATION_ARGUMENTS = ("auto_augment", "random_erasing", "mixup_alpha", "cutmix_alpha",
                          "repeated_augmentations", "num_classes")


def quiet(*args, **kwargs):
    pass


def tiny_model():
    return kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=NUM_CLASSES,
                        input_shape=(16, 16, 3), classifier_activation=None)


def flag_values(family, **given):
    """What absl's FLAGS holds after parsing `given` (the others at their defaults)."""
    values = {}
    for option in options.OPTIONS:
        default = option.flag_arguments(family)["default"]
        values[option.name] = types.SimpleNamespace(value=given.get(option.name, default),
                                                    present=option.name in given)
    return values


# -- the recipes' tables ---------------------------------------------------------


def test_the_paper_recipe_is_the_old_config_field_for_field():
    assert training.config_from_recipe("imagenet", "x") == training.TrainConfig(
        model_dir="x", epochs=100, batch_size=256, learning_rate=0.1, weight_decay=1e-4,
        lr_decay_epochs=(30, 60, 90))
    assert training.recipe_named("imagenet", "paper") is training.RECIPES["imagenet"]
    assert training.recipe_named("cifar", "paper") is training.RECIPES["cifar"]


def test_torchvision_v2_is_torchvisions_published_recipe():
    recipe = training.RECIPES["torchvision_v2"]
    config = training.config_from_recipe(recipe, "x")
    assert (config.batch_size, config.learning_rate, config.epochs) == (1024, 0.5, 600)
    assert (config.optimizer, config.momentum, config.nesterov) == ("sgd", 0.9, False)
    assert (config.lr_schedule, config.warmup_epochs, config.warmup_start_factor) == \
        ("cosine", 5, 0.01)
    assert (config.weight_decay, config.norm_weight_decay, config.bias_weight_decay) == \
        (2e-5, 0.0, None)
    assert (config.loss, config.label_smoothing) == ("softmax", 0.1)
    assert (config.ema_decay, config.ema_every_steps, config.ema_convention) == \
        (0.99998, 32, "torchvision")
    assert (recipe.train_image_size, recipe.resize_size) == (176, 232)
    assert (recipe.auto_augment, recipe.random_erasing, recipe.mixup_alpha, recipe.cutmix_alpha,
            recipe.repeated_augmentations) == ("trivial_augment_wide", 0.1, 0.2, 1.0, 4)


def test_rsb_a3_is_timms_a3():
    recipe = training.RECIPES["rsb_a3"]
    config = training.config_from_recipe(recipe, "x")
    assert (config.batch_size, config.learning_rate, config.epochs) == (2048, 8e-3, 100)
    assert (config.optimizer, config.loss, config.label_smoothing) == ("lamb", "bce", 0.0)
    assert (config.weight_decay, config.norm_weight_decay, config.bias_weight_decay) == \
        (0.02, 0.0, 0.0)
    assert (config.lr_schedule, config.warmup_epochs, config.ema_decay) == ("cosine", 5, None)
    assert (recipe.train_image_size, recipe.resize_size) == (160, 235)  # 224 / 0.95
    assert (recipe.auto_augment, recipe.random_erasing, recipe.mixup_alpha, recipe.cutmix_alpha,
            recipe.repeated_augmentations) == ("rand-m6-mstd0.5-inc1", 0.0, 0.1, 1.0, 1)


def test_a_recipe_prints_one_line_per_setting_that_differs_from_the_paper():
    paper = training.RECIPES["imagenet"]
    lines = training.recipe_differences("torchvision_v2", training.RECIPES["torchvision_v2"],
                                        paper)
    assert "recipe torchvision_v2: lr 0.5 per 1024 images (paper: 0.1 per 256)" in lines
    assert "recipe torchvision_v2: epochs 600 (paper: 100)" in lines
    assert "recipe torchvision_v2: mixup_alpha 0.2 (paper: 0)" in lines
    assert len(lines) == len(set(lines)) == 18
    assert not any("momentum" in line for line in lines)  # 0.9 in both
    assert training.recipe_differences("paper", paper, paper) == []
    rsb = training.recipe_differences("rsb_a3", training.RECIPES["rsb_a3"], paper,
                                      {"learning_rate": "--lr 0.004"})
    assert "recipe rsb_a3: optimizer lamb (paper: sgd)" in rsb
    assert ("recipe rsb_a3: lr 0.008 per 2048 images (paper: 0.1 per 256); --lr 0.004 "
            "overrides it") in rsb
    assert not any(" epochs " in line for line in rsb)  # 100 in both


# -- the CLI's options -------------------------------------------------------------


def test_recipe_flag_gives_every_default_and_each_given_flag_overrides_it():
    run = options.run_from("imagenet", flag_values("imagenet", recipe="torchvision_v2",
                                                   epochs=30))
    recipe = training.recipe_named("imagenet", run.recipe)
    config = training.config_from_recipe(recipe, "x", **run.training_overrides)
    assert config == training.config_from_recipe("torchvision_v2", "x", epochs=30)
    assert (run.batch_size, run.train_image_size, run.resize_size, run.image_size) == \
        (1024, 176, 232, 224)
    assert run.recipe_overrides == {"epochs": "--epochs 30"}
    lines = training.recipe_differences(run.recipe, recipe, training.RECIPES["imagenet"],
                                        run.recipe_overrides)
    assert "recipe torchvision_v2: epochs 600 (paper: 100); --epochs 30 overrides it" in lines
    # "none" switches a recipe's policy off.
    run = options.run_from("imagenet", flag_values("imagenet", recipe="rsb_a3",
                                                   auto_augment="none"))
    assert run.auto_augment is None and run.mixup_alpha == 0.1


def test_auto_augment_takes_any_timm_randaugment_string_and_refuses_others_in_one_line():
    """The CLI took only rsb_a3's "rand-m6-mstd0.5-inc1" (an enum), although
    the pipeline reads any timm RandAugment string."""
    from absl import flags

    from train import common

    option = next(option for option in options.OPTIONS if option.name == "auto_augment")
    parsed = flags.FlagValues()
    common._DEFINE[option.kind](flag_values=parsed, **option.flag_arguments("imagenet"))
    parsed(["imagenet.py", "--auto_augment=rand-m9-n3-mstd0.5"])
    run = options.run_from("imagenet", flag_values(
        "imagenet", auto_augment=parsed.auto_augment, eval_only=True, weights="imagenet"))
    common.check_flags(run)
    assert run.auto_augment == "rand-m9-n3-mstd0.5"
    run = dataclasses.replace(run, auto_augment="rand-m9-x1")
    with pytest.raises(training.UserError, match=r"^--auto_augment: Unknown auto_augment "
                                                 r"'rand-m9-x1'; use 'trivial_augment_wide'"):
        common.check_flags(run)

def test_a_mistyped_weights_name_is_refused_with_the_names(tmp_path):
    """--weights IMAGENET1K_V9 said "no such file or folder"; a missing file
    still does."""
    from train import common

    for weights, message in (("IMAGENET1K_V9", r"Unknown weights 'IMAGENET1K_V9': use one of "
                                               r"imagenet, IMAGENET1K_V1, IMAGENET1K_V2"),
                             (str(tmp_path / "r50.pth"), "no such file or folder")):
        run = options.run_from("imagenet", flag_values("imagenet", eval_only=True,
                                                       weights=weights))
        with pytest.raises(training.UserError, match=f"^--weights {weights}: {message}"):
            common.check_flags(run)

def test_a_recipes_warmup_longer_than_the_run_is_refused_naming_the_flags():
    """It said "warmup_epochs must be in [0, epochs=1); got 5." after reading the
    data, naming neither flag nor recipe."""
    from train import common

    for given, message in ((dict(), r"--warmup_epochs 5 \(--recipe rsb_a3's\)"),
                           (dict(warmup_epochs=2.0), r"--warmup_epochs 2 must")):
        run = options.run_from("imagenet", flag_values("imagenet", recipe="rsb_a3", epochs=1,
                                                       model_dir="run", **given))
        with pytest.raises(training.UserError, match=f"^{message}.* --epochs 1; lower it"):
            common.check_flags(run)

def test_only_imagenet_has_named_recipes():
    choices = {family: next(o for o in options.OPTIONS if o.name == "recipe")
               .flag_arguments(family)["enum_values"] for family in ("imagenet", "cifar")}
    assert choices == {"imagenet": ["paper", "torchvision_v2", "rsb_a3"], "cifar": ["paper"]}


def test_the_pipeline_gets_a_recipes_augmentations_only_when_they_are_on(monkeypatch):
    from train import common

    calls = []
    monkeypatch.setattr(common.pipelines, "build_dataset",
                        lambda *arguments, **keywords: calls.append(keywords))
    recipe_run = options.run_from("imagenet", flag_values("imagenet", recipe="torchvision_v2"))
    paper_run = options.run_from("imagenet", flag_values("imagenet"))
    common._dataset_fn(recipe_run, "train", "imagenet", 232, 10)(8, None)
    common._dataset_fn(recipe_run, "val", "imagenet", 232, 10)(8, None)
    common._dataset_fn(paper_run, "train", "imagenet", 256, 10)(8, None)
    recipe_train, recipe_val, paper_train = calls
    assert {k: recipe_train[k] for k in AUGMENTATION_ARGUMENTS} == dict(
        auto_augment="trivial_augment_wide", random_erasing=0.1, mixup_alpha=0.2,
        cutmix_alpha=1.0, repeated_augmentations=4, num_classes=10)
    assert recipe_train["image_size"] == 176 and recipe_val["image_size"] == 224
    assert not set(AUGMENTATION_ARGUMENTS) & (set(recipe_val) | set(paper_train))
    # Training and evaluation crops differ: the model takes any input size.
    small = options.run_from("imagenet", flag_values(
        "imagenet", recipe="torchvision_v2", depth=50, cardinality=1, width=1))
    assert common.build_model(small, 10).input_shape == (None, None, None, 3)
    assert common.build_model(dataclasses.replace(small, train_image_size=None),
                              10).input_shape == (None, 224, 224, 3)


def test_crop_pct_replaces_a_recipes_eval_resize():
    """rsb_a3's resize 235 is a default: --crop_pct replaces it (it was refused
    as "--resize_size and --crop_pct both set the eval resize")."""
    from train import common

    run = options.run_from("imagenet", flag_values("imagenet", recipe="rsb_a3", crop_pct=0.9,
                                                   eval_only=True, weights="imagenet"))
    common.check_flags(run)
    assert common.eval_transform_of(run, "imagenet").resize_size == 248  # floor(224 / 0.9)
    lines = training.recipe_differences(run.recipe, training.recipe_named("imagenet", "rsb_a3"),
                                        training.RECIPES["imagenet"], run.recipe_overrides)
    assert any(line.startswith("recipe rsb_a3: resize_size 235") and
               line.endswith("--crop_pct 0.9 overrides it") for line in lines)
    both = options.run_from("imagenet", flag_values("imagenet", recipe="rsb_a3", crop_pct=0.9,
                                                    resize_size=240, model_dir="run"))
    with pytest.raises(training.UserError, match="--resize_size and --crop_pct both set"):
        common.check_flags(both)


def test_a_recipes_eval_resize_keeps_its_proportion_and_yields_to_the_weights_view():
    """The recipe's resize is for a 224 crop (--image_size 288 was refused:
    "resize_size (235) must be at least image_size (288)"), and a model whose
    weights record their view is evaluated with it (torchvision_v2's 232 used
    to replace IMAGENET1K_V1's 256); --resize_size given still wins."""
    from train import common
    from keras_resnext.transforms import EvalTransform

    run = options.run_from("imagenet", flag_values("imagenet", recipe="rsb_a3", image_size=288))
    assert common.eval_transform_of(run, "imagenet") == EvalTransform(288, 302)
    model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3),
                         eval_transform=EvalTransform(16, 20, "bicubic"))
    run = options.run_from("imagenet", flag_values("imagenet", recipe="torchvision_v2",
                                                   image_size=16))
    assert common.eval_transform_of(run, "imagenet", model) == EvalTransform(16, 20, "bicubic")
    run = options.run_from("imagenet", flag_values("imagenet", recipe="torchvision_v2",
                                                   image_size=16, resize_size=18))
    assert common.eval_transform_of(run, "imagenet", model).resize_size == 18


def test_eval_image_size_reaches_the_view_of_a_model_that_takes_any_size():
    """With a recipe's smaller training crop the model takes any input size:
    --image_size 288 evaluated 288 crops but reported (and wrote to
    eval_metrics.json) the recorded 224 view."""
    from train import common
    from keras_resnext.transforms import EvalTransform

    model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3,
                         eval_transform=EvalTransform(224, 256, "bicubic"))
    run = options.run_from("imagenet", flag_values("imagenet", recipe="rsb_a3", image_size=288,
                                                   eval_only=True, weights="imagenet"))
    assert common.build_model(run, 3).input_shape == (None, None, None, 3)
    assert common.eval_transform_of(run, "imagenet", model) == EvalTransform(288, 329,
                                                                              "bicubic")


def test_fine_tuning_records_the_view_the_run_validates_and_exports_with(tmp_path,
                                                                         monkeypatch):
    """Initial weights that record their view (named weights: 232) no longer
    leave the fine-tuned model recording it while the run validates and
    exports with the recipe's (256)."""
    from train import common
    from keras_resnext.transforms import EvalTransform

    weights = tmp_path / "initial.weights.h5"
    tiny_model().save_weights(str(weights))
    root = write_image_folder(str(tmp_path / "data"), train_per_class=1, val_per_class=1,
                              size=20)

    def load_recording_a_view(model, path):
        model.eval_transform = EvalTransform(16, 18, "bicubic")

    seen = {}

    def train(model_fn, train_split, val_split, config, strategy):
        seen["model"] = model_fn()
        raise KeyboardInterrupt  # the model is all this test needs

    monkeypatch.setattr(common, "load_weights", load_recording_a_view)
    monkeypatch.setattr(common.training, "train", train)
    monkeypatch.setattr(common, "_dataset_fn", lambda run, split, preprocessing, transform, n:
                        seen.setdefault(split, transform))
    run = options.run_from("cifar", flag_values(
        "cifar", depth=11, cardinality=4, width=4, image_size=16, weights=str(weights),
        dataset=f"folder:{root}", preprocessing="imagenet", model_dir=str(tmp_path / "run")))
    with pytest.raises(KeyboardInterrupt):
        common.execute(run)
    assert seen["val"] == EvalTransform(16, 18)  # 256/224 at 16
    assert seen["model"].eval_transform == seen["val"]


# -- parameter groups ----------------------------------------------------------------


@pytest.mark.parametrize("norm_rate, bias_rate", [(None, None), (0.0, None), (None, 0.0),
                                                  (1e-5, 3e-5)])
def test_weight_decay_groups_on_a_real_model(tmp_path, norm_rate, bias_rate):
    model = tiny_model()
    cfg = config(tmp_path, weight_decay=2e-5, norm_weight_decay=norm_rate,
                 bias_weight_decay=bias_rate)
    rates = dict(zip((v.path for v in model.trainable_variables),
                     training.weight_decay_rates(model, cfg)))
    norm = [path for path in rates if path.endswith(("_bn/gamma", "_bn/beta"))]
    biases = [path for path in rates if path.endswith("/bias")]
    batch_norms = [layer for layer in model.layers if "BatchNormalization" in type(layer).__name__]
    assert len(norm) == 2 * len(batch_norms) == 2 * 13  # the stem, 4 per block (shortcut too)
    assert biases == ["predictions/bias"]
    for path, rate in rates.items():
        if path in norm:
            assert rate == (2e-5 if norm_rate is None else norm_rate), path
        elif path in biases:
            assert rate == (2e-5 if bias_rate is None else bias_rate), path
        else:
            assert path.endswith("/kernel") and rate == 2e-5, path


def _one_sgd_step(cfg, weights, images, labels):
    model = tiny_model()
    model.set_weights(weights)
    optimizer = training.build_optimizer(cfg, steps_per_epoch=1)
    optimizer.build(model.trainable_variables)
    loop = training.make_train_loop(model, optimizer, tf.distribute.get_strategy(), cfg)
    loop(iter(tf.data.Dataset.from_tensors((images, labels)).repeat()), tf.constant(1))
    return {v.path: v.numpy() for v in model.trainable_variables}


def test_coupled_l2_reaches_each_group_at_its_rate(tmp_path):
    """One plain SGD step: `w - lr * (g + rate * w)`, so two runs that differ
    only in the BN group's rate differ by `lr * rate * w` there, nowhere else."""
    images, labels = colour_images(8)
    start = tiny_model()
    weights = start.get_weights()
    initial = {v.path: v.numpy() for v in start.trainable_variables}
    base = dict(weight_decay=0.05, learning_rate=0.1, momentum=0.0, nesterov=False)
    decayed = _one_sgd_step(config(tmp_path, **base), weights, images, labels)
    undecayed_norm = _one_sgd_step(config(tmp_path, norm_weight_decay=0.0, **base), weights,
                                   images, labels)
    for path, value in decayed.items():
        difference = undecayed_norm[path] - value
        if path.endswith(("_bn/gamma", "_bn/beta")):
            # Same gradient, so the difference is the decay alone.
            np.testing.assert_allclose(difference, 0.1 * 0.05 * initial[path], atol=1e-6,
                                       err_msg=path)
        else:
            np.testing.assert_array_equal(difference, 0, err_msg=path)


def test_decoupled_decay_scales_each_group_by_its_rate_under_a_strategy():
    keras = pytest.importorskip("keras")
    strategy = tf.distribute.MirroredStrategy(["CPU:0"])
    with strategy.scope():  # Keras variables, as a model's
        kernel, gamma = keras.Variable([1.0, 2.0]), keras.Variable([3.0])

    @tf.function
    def step():
        strategy.run(lambda: training.recipe.apply_decoupled_weight_decay(
            [kernel, gamma], [0.5, 0.0], tf.constant(0.1)))

    step()
    np.testing.assert_allclose(kernel.numpy(), [0.95, 1.9], rtol=1e-6)
    np.testing.assert_array_equal(gamma.numpy(), [3.0])


TWO_REPLICA_DECAY = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_resnext import training
strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
with strategy.scope():
    kernel, gamma = keras.Variable([1.0, 2.0]), keras.Variable([3.0])

@tf.function
def step():
    strategy.run(lambda: training.recipe.apply_decoupled_weight_decay(
        [kernel, gamma], [0.5, 0.0], tf.constant(0.1)))

step()
print("KERNEL", [v.numpy().tolist() for v in kernel.value.values])
print("GAMMA", [v.numpy().tolist() for v in gamma.value.values])
"""


def test_decoupled_decay_is_applied_once_across_two_replicas(python_subprocess):
    completed = python_subprocess(TWO_REPLICA_DECAY, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in completed.stdout.splitlines()
                 if line.startswith(("KERNEL", "GAMMA")))
    kernels, gammas = json.loads(lines["KERNEL"]), json.loads(lines["GAMMA"])
    for kernel in kernels:  # each replica's copy, decayed once
        np.testing.assert_allclose(kernel, [0.95, 1.9], rtol=1e-6)
    assert gammas == [[3.0], [3.0]]


# -- losses on soft targets -----------------------------------------------------------

LOGITS = np.array([[2.0, -1.0, 0.5], [0.0, 0.3, -0.2]], "float32")
SOFT = np.array([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]], "float32")  # mixed one-hot targets


def _log_softmax(x):
    x = x.astype("float64")
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_softmax_loss_smooths_soft_targets_as_torchvision():
    got = training.per_example_loss(tf.constant(SOFT), tf.constant(LOGITS), 3,
                                    label_smoothing=0.1).numpy()
    targets = 0.9 * SOFT + 0.1 / 3
    np.testing.assert_allclose(got, -(targets * _log_softmax(LOGITS)).sum(axis=1), rtol=1e-6)


def test_bce_is_the_mean_over_classes_of_each_class_binary_cross_entropy():
    got = training.per_example_loss(tf.constant(SOFT), tf.constant(LOGITS), 3,
                                    loss="bce").numpy()
    probabilities = 1 / (1 + np.exp(-LOGITS.astype("float64")))
    expected = -(SOFT * np.log(probabilities) + (1 - SOFT) * np.log(1 - probabilities))
    np.testing.assert_allclose(got, expected.mean(axis=1), rtol=1e-6)


@pytest.mark.parametrize("loss", ["softmax", "bce"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_one_hot_targets_give_the_class_id_loss(loss, smoothing):
    labels = np.array([0, 2], "int32")
    by_id = training.per_example_loss(tf.constant(labels), tf.constant(LOGITS), 3, smoothing,
                                      loss).numpy()
    one_hot = np.eye(3, dtype="float32")[labels]
    by_target = training.per_example_loss(tf.constant(one_hot), tf.constant(LOGITS), 3,
                                          smoothing, loss).numpy()
    np.testing.assert_allclose(by_target, by_id, rtol=1e-6)


def test_the_train_step_takes_soft_targets_and_counts_top1_by_their_argmax(tmp_path):
    images, labels = colour_images(8)
    targets = np.eye(NUM_CLASSES, dtype="float32")[labels]
    mixed = 0.6 * targets + 0.4 * targets[::-1]  # mixup of the batch with its reverse
    model = tiny_model()
    for cfg in (config(tmp_path, label_smoothing=0.1),
                config(tmp_path, optimizer="lamb", loss="bce", learning_rate=1e-3,
                       norm_weight_decay=0.0, bias_weight_decay=0.0)):
        optimizer = training.build_optimizer(cfg, steps_per_epoch=2)
        optimizer.build(model.trainable_variables)
        loop = training.make_train_loop(model, optimizer, tf.distribute.get_strategy(), cfg)
        batches = iter(tf.data.Dataset.from_tensors((images, mixed)).repeat())
        loss, correct, count = loop(batches, tf.constant(2)).numpy()
        assert np.isfinite(loss) and count == 16 and 0 <= correct <= 16
    hard = training.recipe.hard_labels(tf.constant(mixed)).numpy()
    np.testing.assert_array_equal(hard, np.argmax(mixed, axis=1))


# -- EMA: torchvision's convention ------------------------------------------------------


def test_torchvision_adjusts_the_ema_decay_for_batch_interval_and_epochs():
    cfg = training.config_from_recipe("torchvision_v2", "x")
    # references/classification/train.py: adjust = world_size * batch_size *
    # model_ema_steps / epochs; alpha = min(1, (1 - decay) * adjust).
    assert training.ema_decay_per_update(cfg) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    huge = dataclasses.replace(cfg, batch_size=10**7)
    assert training.ema_decay_per_update(huge) == 0.0  # alpha capped at 1


def test_ema_every_n_steps_copies_in_warmup_then_averages(tmp_path):
    """3 steps per epoch, every 2nd step of an epoch, 1 warm-up epoch:
    steps 0 and 2 (warm-up) and 3 (the first update after it) copy the
    weights, 5 and 6 average, 1 and 4 skip."""
    images, labels = colour_images(8)
    cfg = config(tmp_path, batch_size=8, epochs=4, steps_per_epoch=3, ema_decay=0.95,
                 ema_every_steps=2, ema_convention="torchvision", warmup_epochs=1)
    decay = training.ema_decay_per_update(cfg)
    assert decay == pytest.approx(1 - 0.05 * 8 * 2 / 4)
    model = tiny_model()
    strategy = tf.distribute.get_strategy()
    optimizer = training.build_optimizer(cfg, steps_per_epoch=3)
    optimizer.build(model.trainable_variables)
    ema = training.recipe.create_ema_weights(model, strategy)
    loop = training.make_train_loop(model, optimizer, strategy, cfg, ema, steps_per_epoch=3)
    batches = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    expected = [w.numpy().astype("float64") for w in model.weights]
    for step in range(7):
        loop(batches, tf.constant(1))
        current = [w.numpy().astype("float64") for w in model.weights]
        if step in (0, 2, 3):
            expected = current
        elif step in (5, 6):
            expected = [decay * e + (1 - decay) * c for e, c in zip(expected, current)]
    for average, wanted in zip(ema, expected):
        np.testing.assert_allclose(average.numpy(), wanted, rtol=1e-5, atol=1e-6)


# -- resume ----------------------------------------------------------------------------


def test_resuming_with_a_changed_recipe_setting_is_refused(tmp_path, data):  # noqa: F811
    settings = (("mixup_alpha", 0.0), ("train_image_size", 16))
    training.train(tiny_model, *data, config(tmp_path, input_settings=settings), log=quiet)
    changes = [(dict(norm_weight_decay=0.0), "--norm_weight_decay"),
               (dict(loss="bce"), "--loss"),
               (dict(warmup_start_factor=0.01), "--warmup_start_factor"),
               (dict(input_settings=(("mixup_alpha", 0.2), ("train_image_size", 16))),
                "--mixup_alpha"),
               (dict(input_settings=(("mixup_alpha", 0.0), ("train_image_size", 12))),
                "--train_image_size")]
    for change, flag in changes:
        fields = dict(dict(input_settings=settings), **change)
        with pytest.raises(training.UserError) as error:
            training.train(tiny_model, *data, config(tmp_path, epochs=2, **fields), log=quiet)
        message = str(error.value)
        assert flag in message and "use a new --model_dir" in message, message
    # The same settings resume.
    result = training.train(tiny_model, *data,
                            config(tmp_path, epochs=2, input_settings=settings), log=quiet)
    assert result.metrics["epochs_completed"] == 2


# -- each recipe from the CLI, killed and resumed -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["torchvision_v2", "rsb_a3"])
def test_each_recipe_trains_from_the_cli_and_resumes_after_sigkill(tmp_path, recipe):
    data_root = write_image_folder(str(tmp_path / "data"), classes=3, train_per_class=4,
                                   val_per_class=1)
    model_dir = tmp_path / "model"
    command = [sys.executable, os.path.join(REPO_ROOT, "train", "imagenet.py"),
               f"--recipe={recipe}", "--depth=50", "--cardinality=1", "--width=2",
               f"--dataset=folder:{data_root}", "--preprocessing=imagenet", "--image_size=32",
               "--train_image_size=24", "--resize_size=36", "--batch_size=4", "--epochs=2",
               "--warmup_epochs=1", "--progress_seconds=3600", f"--model_dir={model_dir}"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    env.pop("TF_CONFIG", None)
    seen = run_until_line(command, env, "Epoch 2/2")
    assert "Epoch 2/2\n" in seen, "".join(seen)[-4000:]
    differences = [line for line in seen if line.startswith(f"recipe {recipe}: ")]
    assert any(line.startswith(f"recipe {recipe}: batch_size ") and
               line.rstrip().endswith("; --batch_size 4 overrides it")
               for line in differences), differences
    assert any(line.startswith(f"recipe {recipe}: lr ") for line in differences), differences
    # The view the run validates (and would export) with, --resize_size beating the recipe's.
    assert any(line.startswith("Eval view: shorter side to 36 (") and "centre 32x32 crop" in line
               for line in seen), seen

    rerun = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    epochs = [line for line in rerun.stdout.splitlines() if line.startswith("Epoch ")]
    assert epochs == ["Epoch 2/2"], rerun.stdout
    assert "1 of 2 epochs done, optimizer step 3." in rerun.stdout
    assert json.loads((model_dir / "metrics.json").read_text())["epochs_completed"] == 2
    recorded = json.loads(tf.train.load_checkpoint(str(model_dir / "checkpoints")).get_tensor(
        "run_settings/.ATTRIBUTES/VARIABLE_VALUE"))
    recipe_config = training.RECIPES[recipe]
    assert recorded["optimizer"] == recipe_config.optimizer
    assert recorded["loss"] == recipe_config.loss
    assert recorded["train_image_size"] == 24


def test_a_recipes_training_crop_keeps_its_proportion_to_image_size():
    """torchvision_v2 trains at 176 for a 224 eval crop: at --image_size 32 it
    trained at 176 all the same; now 25, and --train_image_size still wins."""
    from train import common

    run = options.run_from("imagenet", flag_values("imagenet", recipe="torchvision_v2",
                                                   image_size=32))
    assert common._train_image_size(run) == 25  # round(176 * 32 / 224)
    at_224 = options.run_from("imagenet", flag_values("imagenet", recipe="torchvision_v2"))
    assert common._train_image_size(at_224) == 176
    given = options.run_from("imagenet", flag_values("imagenet", recipe="torchvision_v2",
                                                     image_size=32, train_image_size=24))
    assert common._train_image_size(given) == 24
    paper = options.run_from("imagenet", flag_values("imagenet", image_size=32))
    assert common._train_image_size(paper) == 32
