"""Training checkpoints: saving them per worker, restoring the newest intact
one, the run settings a resume must keep, and loading a checkpoint's weights
into a model for evaluation or fine-tuning."""

import dataclasses
import gc
import glob
import json
import os
import re
import shutil

import tensorflow as tf

from keras_resnext.training.errors import UserError, first_line

CHECKPOINT_SUBDIR = "checkpoints"
# What a run means beyond its architecture: resuming with any of these changed
# would continue one run under another's recipe (a 100x learning-rate jump for
# steps_per_epoch, say), so the checkpoint records them and a resume must
# match. More --epochs is not among them: extending a run is resuming it.
# The input pipeline's recipe settings (TrainConfig.input_settings) join them.
RUN_SETTINGS = ("batch_size", "steps_per_epoch", "learning_rate", "lr_schedule",
                "lr_decay_rate", "warmup_epochs", "weight_decay", "momentum", "nesterov",
                "label_smoothing", "mixed_precision", "ema_decay", "optimizer", "loss",
                "warmup_start_factor", "norm_weight_decay", "bias_weight_decay",
                "ema_every_steps", "ema_convention")
SETTING_FLAGS = {"learning_rate": "--lr (the peak learning rate)",
                 "steps_per_epoch": "--steps_per_epoch (given, or training examples // batch)"}


class Checkpoints:
    """Checkpoint saving and restoring for chief and non-chief workers.

    The chief keeps `max_to_keep` checkpoints in `model_dir/checkpoints`,
    numbered by completed epochs. Other workers must take part in each save
    (saving may need collectives), so they write into their own temporary
    folder and delete it. Every worker restores from the chief's folder,
    which therefore must be shared storage in a multi-host run.
    """

    def __init__(self, checkpoint, model_dir, chief, task_id, max_to_keep):
        self.directory = os.path.join(model_dir, CHECKPOINT_SUBDIR)
        self.chief = chief
        write_directory = self.directory if chief else os.path.join(
            self.directory, f".worker{task_id}-tmp")
        if chief:
            remove_leftovers(model_dir, self.directory)
        self.manager = tf.train.CheckpointManager(
            checkpoint, write_directory, max_to_keep=max_to_keep if chief else 1
        )
        self.checkpoint = checkpoint
        self.write_directory = write_directory

    def restore_latest(self, run_settings, warn):
        """Restore the newest intact checkpoint and return its path (None if
        there is none). An unreadable one is passed over with a warning; one
        written by another model, optimizer or `RUN_SETTINGS` is an error."""
        unreadable = []
        for path in _checkpoints_newest_first(self.directory):
            try:
                _check_run_settings(path, run_settings)
                status = self.checkpoint.restore(path)
                status.assert_existing_objects_matched()
                # save_counter is created on the next save; nothing else is left over.
                status.expect_partial()
            except (AssertionError, ValueError) as error:
                raise UserError(
                    f"The checkpoint {path} does not match this model and optimizer "
                    f"(another architecture or recipe?); use a new --model_dir. "
                    f"({first_line(error)})"
                ) from None
            except tf.errors.OpError as error:
                unreadable.append(path)
                warn(f"Warning: the checkpoint {path} is unreadable ({first_line(error)}); "
                     "trying the one before it.", flush=True)
                continue
            return path
        if unreadable:
            raise UserError(
                f"No intact checkpoint in {self.directory}: {', '.join(unreadable)} cannot be "
                "read; move them away to start afresh, or use a new --model_dir.")
        return None

    def save(self, epoch):
        path = self.manager.save(checkpoint_number=epoch)
        if not self.chief:
            shutil.rmtree(self.write_directory, ignore_errors=True)
        return path


def _checkpoints_newest_first(directory):
    # From the files rather than the `checkpoint` state file, which a kill
    # can leave naming a checkpoint that was never finished.
    numbers = []
    for index in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index")):
        match = re.fullmatch(r"ckpt-([0-9]+)\.index", os.path.basename(index))
        if match:
            numbers.append(int(match.group(1)))
    return [os.path.join(directory, f"ckpt-{number}") for number in sorted(numbers, reverse=True)]


def run_settings(config, steps_per_epoch):
    values = dict(dataclasses.asdict(config), steps_per_epoch=steps_per_epoch)
    return dict({name: values[name] for name in RUN_SETTINGS}, **dict(config.input_settings))


def _check_run_settings(path, run_settings):
    """Raise, naming the flag, if the checkpoint at `path` was written with
    other `RUN_SETTINGS` (checkpoints that predate the record pass)."""
    reader = tf.train.load_checkpoint(path)
    key = "run_settings/.ATTRIBUTES/VARIABLE_VALUE"
    if not reader.has_tensor(key):
        return
    recorded = json.loads(reader.get_tensor(key))
    for name in run_settings:
        if name in recorded and recorded[name] != run_settings[name]:
            flag = SETTING_FLAGS.get(name, f"--{name}")
            raise UserError(
                f"The checkpoint {path} was written with {flag} {recorded[name]}; this run has "
                f"{run_settings[name]}. Resuming would mix two runs: pass the same value, or "
                "use a new --model_dir.")


def remove_leftovers(model_dir, checkpoint_dir):
    """Remove what killed runs leave: half-written checkpoints (TensorFlow's
    `ckpt-N_temp` folders), other workers' throwaway folders and half-written
    files (`name.tmp-PID`). The caller holds the model_dir lock, so no live
    run owns them."""
    for folder in (glob.glob(os.path.join(glob.escape(checkpoint_dir), "*_temp"))
                   + glob.glob(os.path.join(glob.escape(checkpoint_dir), ".worker*-tmp"))):
        shutil.rmtree(folder, ignore_errors=True)
    for path in glob.glob(os.path.join(glob.escape(model_dir), "*.tmp-*")):
        if os.path.isfile(path):
            os.remove(path)


def latest_checkpoint(path):
    """The newest training checkpoint in `path`: a `model_dir`, its
    checkpoints folder, or a checkpoint itself; None if there is none."""
    for directory in (os.path.join(path, CHECKPOINT_SUBDIR), path):
        latest = tf.train.latest_checkpoint(directory)
        if latest:
            return latest
    return path if tf.io.gfile.exists(f"{path}.index") else None


def restore_model_weights(model, path):
    """Load into `model` the weights of the newest training checkpoint in
    `path` (see `latest_checkpoint`), the EMA where the run kept one (as
    `train` evaluates and returns it). Returns the checkpoint's path; raises
    `UserError` if there is none or it doesn't fit `model`."""
    checkpoint_path = latest_checkpoint(path)
    if checkpoint_path is None:
        raise UserError(f"No training checkpoint in {path}.")
    problem = None
    logger = tf.get_logger()
    level = logger.level
    # A failed restore lists every value it did not restore when it is
    # garbage-collected; the one line below says what matters.
    logger.setLevel("ERROR")
    try:
        status = tf.train.Checkpoint(model=model).restore(checkpoint_path)
        status.expect_partial()  # the optimizer and epoch counter are not wanted
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
        problem = first_line(error)
    finally:
        gc.collect()
        logger.setLevel(level)
    if problem:
        raise UserError(
            f"The checkpoint {checkpoint_path} does not fit this model (another architecture, "
            f"or a classifier for another number of classes?): {problem}")
    reader = tf.train.load_checkpoint(checkpoint_path)
    ema_keys = [f"ema/{index}/.ATTRIBUTES/VARIABLE_VALUE" for index in range(len(model.weights))]
    if all(reader.has_tensor(key) for key in ema_keys):
        for weight, key in zip(model.weights, ema_keys):
            weight.assign(tf.cast(reader.get_tensor(key), weight.dtype))
    return checkpoint_path
