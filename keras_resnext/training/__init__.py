"""The paper's training recipe (§4), and later published ones, as one
distributed custom training loop.

TensorFlow only. `import keras_resnext` does not import this package.

    errors       UserError, TrainingDiverged: what the CLIs print as one line
    recipe       Recipe, RECIPES, TrainConfig, the schedule, losses, optimizers,
                 weight decay per parameter group, EMA
    distribute   strategies, workers, cross-replica helpers
    steps        the distributed train and eval steps, one epoch of steps
    checkpoints  saving, restoring and the run settings a resume must keep
    run_dir      the model_dir's lock, CSV log, metrics.json, TensorBoard, export record
    loop         train(): setup, restore, epochs, final metrics; evaluate_model
"""

from keras_resnext.training.checkpoints import (
    CHECKPOINT_SUBDIR, RUN_SETTINGS, latest_checkpoint, restore_model_weights)
from keras_resnext.training.distribute import (
    STRATEGIES, create_strategy, is_chief, make_average_local_state, wait_for_all_workers,
    worker_info)
from keras_resnext.training.errors import TrainingDiverged, UserError, first_line
from keras_resnext.training.loop import InputSplit, TrainResult, evaluate_model, train
from keras_resnext.training.recipe import (
    EMA_CONVENTIONS, INPUT_SETTINGS, LOSSES, LR_SCHEDULES, MIXED_PRECISION_POLICIES,
    NAMED_RECIPES, OPTIMIZERS, PAPER, RECIPES, Recipe, RecipeSchedule, TrainConfig,
    add_weight_decay, build_optimizer, config_from_recipe, ema_decay_at, ema_decay_per_update,
    per_example_loss, recipe_differences, recipe_named, weight_decay_rates)
from keras_resnext.training.run_dir import (
    CSV_COLUMNS, CSV_LOG_NAME, EXPORT_RECORD_NAME, LOCK_NAME, METRICS_NAME, ModelDirLock,
    export_once, write_metrics)
from keras_resnext.training.steps import make_evaluate, make_train_loop

# The name the tests use for InputSplit.
Split = InputSplit

__all__ = [
    "EMA_CONVENTIONS", "INPUT_SETTINGS", "LOSSES", "NAMED_RECIPES", "OPTIMIZERS", "PAPER",
    "ema_decay_per_update", "recipe_differences", "recipe_named", "weight_decay_rates",
    "CHECKPOINT_SUBDIR", "CSV_COLUMNS", "CSV_LOG_NAME", "EXPORT_RECORD_NAME", "LOCK_NAME",
    "LR_SCHEDULES", "METRICS_NAME", "MIXED_PRECISION_POLICIES", "RECIPES", "RUN_SETTINGS",
    "STRATEGIES", "InputSplit", "ModelDirLock", "Recipe", "RecipeSchedule", "Split",
    "TrainConfig", "TrainResult", "TrainingDiverged", "UserError", "add_weight_decay",
    "build_optimizer", "config_from_recipe", "create_strategy", "ema_decay_at",
    "evaluate_model", "export_once", "first_line", "is_chief", "latest_checkpoint",
    "make_average_local_state", "make_evaluate", "make_train_loop", "per_example_loss",
    "restore_model_weights", "train", "wait_for_all_workers", "worker_info", "write_metrics",
]
