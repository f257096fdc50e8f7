"""The family as Keras applications: the paper's builders with `weights=`,
named presets as data, `build(name, **overrides)` and the eval transform."""

from keras_resnext.models import IMAGENET_STAGE_DEPTHS, ResNeXt, cifar_stage_depths, default_name
from keras_resnext.transforms import (
    FAMILY_EVAL_TRANSFORMS, family_eval_transform, model_eval_transform)
from keras_resnext.weights import catalog, fetch, loading

# Each preset fixes the architecture. `num_params` counts trainable parameters
# (torchvision's `num_params`, the paper's "# params"); `gflops` counts
# multiply-adds at the eval size (Table 1, torchvision's `_ops`); a preset is
# evaluated with its family's `eval_transform` (§4).
PRESETS = {
    "resnet50": dict(family="imagenet", depth=50, cardinality=1, width=64,
                     num_params=25_557_032, gflops=4.09),
    "resnet101": dict(family="imagenet", depth=101, cardinality=1, width=64,
                      num_params=44_549_160, gflops=7.80),
    "resnet152": dict(family="imagenet", depth=152, cardinality=1, width=64,
                      num_params=60_192_808, gflops=11.51),
    "resnext50_32x4d": dict(family="imagenet", depth=50, cardinality=32, width=4,
                            num_params=25_028_904, gflops=4.23),
    "resnext101_32x4d": dict(family="imagenet", depth=101, cardinality=32, width=4,
                             num_params=44_177_704, gflops=7.97),
    "resnext101_32x8d": dict(family="imagenet", depth=101, cardinality=32, width=8,
                             num_params=88_791_336, gflops=16.41),
    "resnext101_64x4d": dict(family="imagenet", depth=101, cardinality=64, width=4,
                             num_params=83_455_272, gflops=15.46),
    "resnext152_32x4d": dict(family="imagenet", depth=152, cardinality=32, width=4,
                             num_params=59_951_400, gflops=11.71),
    "resnext29_8x64d": dict(family="cifar", depth=29, cardinality=8, width=64,
                            num_params=34_426_698, gflops=5.39),
    "resnext29_16x64d": dict(family="cifar", depth=29, cardinality=16, width=64,
                             num_params=68_155_210, gflops=10.69),
}

# Each family's eval view (`keras_resnext.transforms`), under its old name.
EVAL_TRANSFORMS = FAMILY_EVAL_TRANSFORMS

ARCHITECTURE_KEYS = ("depth", "cardinality", "width")


def eval_transform(family_or_model, image_size=None):
    """`(image_size, resize_size)` of the eval view: resize the shorter side to
    `resize_size`, then take the centre `image_size` square.

    `family_or_model` is "imagenet" or "cifar", or a model (see
    `model_eval_transform`, which gives the whole `EvalTransform`). Other
    sizes keep the proportion: 256 for 224 (73 for 64); CIFAR-style views
    resize to `image_size` itself, so the crop removes nothing.
    """
    if isinstance(family_or_model, str):
        transform = family_eval_transform(family_or_model, image_size)
    else:
        transform = model_eval_transform(family_or_model, image_size)
    return transform.image_size, transform.resize_size


def _require_family(family):
    family_eval_transform(family)  # raises for an unknown family
    return family


def builder(family, depth):
    """The builder of a `family` network of `depth`: ResNeXt50/101/152 for
    ImageNet; for CIFAR, ResNeXt29 with `depth` (any 9n + 2) fixed."""
    if _require_family(family) == "cifar":
        cifar_stage_depths(depth)  # a depth that isn't 9n + 2 fails here, before building
        return lambda **arguments: ResNeXt29(depth=depth, **arguments)
    builders = {50: ResNeXt50, 101: ResNeXt101, 152: ResNeXt152}
    if depth not in builders:
        raise ValueError(f"ImageNet ResNeXt depth must be 50, 101 or 152; got {depth!r}.")
    return builders[depth]


def build(name, **overrides):
    """Build a preset by name, e.g. `build("resnext50_32x4d", classes=10)`.

    Any builder argument may be overridden except the architecture that the
    name fixes (`depth`, `cardinality`, `width`); contradicting it raises.
    """
    if name not in PRESETS:
        raise ValueError(
            f"Unknown preset {name!r}. Known presets: {', '.join(sorted(PRESETS))}."
        )
    preset = PRESETS[name]
    for key in ARCHITECTURE_KEYS:
        if key in overrides and overrides[key] != preset[key]:
            raise ValueError(
                f"Preset {name!r} has {key}={preset[key]}; got {key}={overrides[key]!r}. "
                f"Use the builder (e.g. keras_resnext.ResNeXt50) for other architectures."
            )
        overrides.pop(key, None)
    overrides.setdefault("name", name)
    return builder(preset["family"], preset["depth"])(
        cardinality=preset["cardinality"], width=preset["width"], **overrides
    )


def _build(stage_depths, stem, default, weights, arguments):
    name = arguments.pop("name") or default
    source = None
    if weights is not None:
        # Before building: a name or handle the architecture has no weights
        # under fails at once.
        architecture = catalog.architecture_name(
            stem, stage_depths, arguments["cardinality"], arguments["width"])
        source = fetch.resolve(weights, architecture)
    model = ResNeXt(stage_depths, stem=stem, name=name, **arguments)
    if source is not None:
        loading.load_source(model, source)  # records the weights' eval transform unless given one
    return model


def _imagenet(depth, arguments):
    """Build the ImageNet ResNeXt of `depth` from its builder's arguments."""
    arguments = dict(arguments)
    weights = arguments.pop("weights")
    return _build(IMAGENET_STAGE_DEPTHS[depth], "imagenet",
                  default_name(depth, arguments["cardinality"], arguments["width"]), weights,
                  arguments)


def ResNeXt50(cardinality=32, width=4, include_top=True, weights=None, input_tensor=None,
              input_shape=None, pooling=None, classes=1000,
              classifier_activation="softmax", block_form="c", name=None,
              replace_stride_with_dilation=None, freeze_batch_norm=False,
              trainable_stages=None, drop_path_rate=0.0, zero_init_last=False,
              eval_transform=None):
    """ResNeXt-50 (C x d), Table 1. `cardinality=1, width=64` is ResNet-50. Backbone and
    regularisation options as in `ResNeXt`."""
    return _imagenet(50, locals())


def ResNeXt101(cardinality=32, width=4, include_top=True, weights=None, input_tensor=None,
               input_shape=None, pooling=None, classes=1000,
               classifier_activation="softmax", block_form="c", name=None,
               replace_stride_with_dilation=None, freeze_batch_norm=False,
               trainable_stages=None, drop_path_rate=0.0, zero_init_last=False,
               eval_transform=None):
    """ResNeXt-101 (C x d). `cardinality=1, width=64` is ResNet-101. Backbone and
    regularisation options as in `ResNeXt`."""
    return _imagenet(101, locals())


def ResNeXt152(cardinality=32, width=4, include_top=True, weights=None, input_tensor=None,
               input_shape=None, pooling=None, classes=1000,
               classifier_activation="softmax", block_form="c", name=None,
               replace_stride_with_dilation=None, freeze_batch_norm=False,
               trainable_stages=None, drop_path_rate=0.0, zero_init_last=False,
               eval_transform=None):
    """ResNeXt-152 (C x d). `cardinality=1, width=64` is ResNet-152. Backbone and
    regularisation options as in `ResNeXt`."""
    return _imagenet(152, locals())


def ResNeXt29(cardinality=8, width=64, classes=10, depth=29, include_top=True, weights=None,
              input_tensor=None, input_shape=None, pooling=None,
              classifier_activation="softmax", block_form="c", name=None,
              replace_stride_with_dilation=None, freeze_batch_norm=False,
              trainable_stages=None, drop_path_rate=0.0, zero_init_last=False,
              eval_transform=None):
    """The CIFAR ResNeXt of §5.3: 3x3 stem, 3 stages of (depth - 2) / 9 blocks.

    `depth=11` gives one block per stage for quick runs. Backbone and
    regularisation options as in `ResNeXt` (two dilation flags, for conv3
    and conv4).
    """
    arguments = dict(
        cardinality=cardinality, width=width, include_top=include_top,
        input_tensor=input_tensor, input_shape=input_shape, pooling=pooling,
        classes=classes, classifier_activation=classifier_activation,
        block_form=block_form, name=name,
        replace_stride_with_dilation=replace_stride_with_dilation,
        freeze_batch_norm=freeze_batch_norm, trainable_stages=trainable_stages,
        drop_path_rate=drop_path_rate, zero_init_last=zero_init_last,
        eval_transform=eval_transform,
    )
    return _build(cifar_stage_depths(depth), "cifar",
                  f"resnext{depth}_{cardinality}x{width}d", weights, arguments)
