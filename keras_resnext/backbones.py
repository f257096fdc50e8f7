"""A ResNeXt as a backbone: its pyramid of feature maps as a model of its own."""

import keras

DEFAULT_LEVELS = ("P2", "P3", "P4", "P5")


def feature_extractor(model, levels=DEFAULT_LEVELS, name=None):
    """A functional model from `model`'s input to `{level: feature map}`.

    `levels` are keys of `model.pyramid_outputs` ("P1".."P5" for ImageNet
    models, "P0".."P2" for CIFAR ones). The new model shares `model`'s layers,
    so it shares their weights (torchvision's `IntermediateLayerGetter`,
    timm's `features_only`).
    """
    pyramid = getattr(model, "pyramid_outputs", None)
    if not pyramid:
        raise ValueError(
            f"feature_extractor needs a model with `pyramid_outputs` (built by keras_resnext); "
            f"got {type(model).__name__} {model.name!r}."
        )
    if isinstance(levels, str):
        levels = (levels,)
    if not isinstance(levels, (list, tuple)) or not levels or not all(
        isinstance(level, str) for level in levels
    ):
        raise ValueError(
            f"`levels` must be a level name or a non-empty sequence of them; got {levels!r}; "
            f"available: {', '.join(pyramid)}."
        )
    unknown = [level for level in levels if level not in pyramid]
    if unknown:
        raise ValueError(
            f"Unknown pyramid level(s) {unknown} for {model.name!r}; "
            f"available: {', '.join(pyramid)}."
        )
    # One input as itself, not a list of one: callers pass a tensor, not [tensor].
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(
        inputs=inputs,
        outputs={level: pyramid[level] for level in levels},
        name=name or f"{model.name}_features",
    )
