"""The training loop (being split into modules; see loop.py)."""

from keras_resnext.training.loop import *  # noqa: F401,F403
