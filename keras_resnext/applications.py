"""Named variants of the family, as data, and `build(name, **overrides)`."""

from keras_resnext import models

# Each preset fixes the architecture. `num_params` counts trainable parameters
# (torchvision's `num_params`, the paper's "# params"); `gflops` counts
# multiply-adds at the eval size (Table 1, torchvision's `_ops`).
# `eval_transform` is the transform the preset is evaluated with (§4).
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

EVAL_TRANSFORMS = {
    "imagenet": dict(image_size=224, resize_size=256),
    "cifar": dict(image_size=32, resize_size=32),
}

ARCHITECTURE_KEYS = ("depth", "cardinality", "width")


def default_resize_size(image_size):
    """The ImageNet eval resize for a crop size: 256 for 224, in proportion otherwise."""
    imagenet = EVAL_TRANSFORMS["imagenet"]
    return round(image_size * imagenet["resize_size"] / imagenet["image_size"])


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
    if preset["family"] == "cifar":
        return models.ResNeXt29(
            cardinality=preset["cardinality"], width=preset["width"],
            depth=preset["depth"], **overrides,
        )
    builder = {50: models.ResNeXt50, 101: models.ResNeXt101, 152: models.ResNeXt152}
    return builder[preset["depth"]](
        cardinality=preset["cardinality"], width=preset["width"], **overrides
    )
