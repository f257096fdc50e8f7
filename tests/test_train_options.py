"""train/options.py: the one declaration of the training CLIs' options."""

import dataclasses
import os
import sys
import types

import pytest

training = pytest.importorskip("keras_resnext.training")
# train/ is scripts, not an installed package: import it from the checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import options  # noqa: E402


def _defaults(family):
    return {option.name: types.SimpleNamespace(value=option.flag_arguments(family)["default"])
            for option in options.OPTIONS}


@pytest.mark.parametrize("family", ["imagenet", "cifar"])
def test_default_flags_give_the_recipe_unchanged(family):
    run = options.run_from(family, _defaults(family))
    config = training.config_from_recipe(family, "runs/x", **run.training_overrides)
    assert config == training.config_from_recipe(family, "runs/x")
    assert run.batch_size == training.RECIPES[family].batch_size


def test_every_training_option_is_a_recipe_override():
    settings = {field.name for field in dataclasses.fields(training.TrainConfig)}
    settings.add("base_learning_rate")
    for option in options.OPTIONS:
        assert set(option.goes_to) <= {options.RUN, options.TRAINING}, option.name
        if options.TRAINING in option.goes_to:
            assert (option.setting or option.name) in settings, option.name
    run_fields = {field.name for field in dataclasses.fields(options.Run)}
    assert {o.name for o in options.OPTIONS if options.RUN in o.goes_to} < run_fields
