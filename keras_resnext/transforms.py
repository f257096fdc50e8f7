"""The eval transform: how an image becomes a model's evaluation input.

An `EvalTransform` is data, as torchvision's and timm's weights carry it:
resize the shorter side to `resize_size` (antialiased `interpolation`), take
the centre `image_size` square and normalise with `mean`/`std`. A model
records the one its weights were evaluated with (`ResNeXt(eval_transform=)`);
`model_eval_transform` finds it, else its family's default (§4: shorter side
256, centre 224; CIFAR, §5.3: the image as it is).

Backend-neutral and pure Python: the TensorFlow view that applies it is
`keras_resnext.kernels.images.preprocess_for_eval`.
"""

import dataclasses
import math

from keras_resnext.preprocessing import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

IMAGENET_MEAN = IMAGENET_MEAN_RGB
IMAGENET_STD = IMAGENET_STD_RGB
INTERPOLATIONS = ("bilinear", "bicubic")
# How the view is cut from the resized image: the single centre crop (§4), or
# fb.resnet.torch's TenCrop, the centre and four corners of it and of its
# mirror image (the model's probabilities are then averaged over the ten).
EVAL_VIEWS = ("center", "ten_crop")


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Shorter side to `resize_size` (antialiased `interpolation`), centre
    `image_size` crop, then `(x / 255 - mean) / std` per RGB channel.

    `crop_pct` is `image_size / resize_size`, timm's name for the proportion.
    """

    image_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        for name in ("image_size", "resize_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalTransform {name} must be a positive integer; "
                                 f"got {value!r}.")
        if self.resize_size < self.image_size:
            raise ValueError(f"EvalTransform resize_size ({self.resize_size}) must be at "
                             f"least image_size ({self.image_size}).")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"EvalTransform interpolation must be one of "
                             f"{', '.join(INTERPOLATIONS)}; got {self.interpolation!r}.")
        for name in ("mean", "std"):
            values = getattr(self, name)
            try:
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                values = ()
            if len(values) != 3:
                raise ValueError(f"EvalTransform {name} must be 3 numbers (RGB); "
                                 f"got {getattr(self, name)!r}.")
            object.__setattr__(self, name, values)
        if not all(s > 0 for s in self.std):
            raise ValueError(f"EvalTransform std must be positive; got {self.std!r}.")

    @property
    def crop_pct(self):
        return self.image_size / self.resize_size

    def get_config(self):
        """A plain JSON dict; `EvalTransform.from_config` reads it back."""
        return dict(image_size=self.image_size, resize_size=self.resize_size,
                    interpolation=self.interpolation, mean=list(self.mean),
                    std=list(self.std))

    @classmethod
    def from_config(cls, config):
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"EvalTransform config has unknown keys {unknown}; "
                             f"expected {sorted(known)}.")
        return cls(**config)

    @classmethod
    def from_crop_pct(cls, image_size, crop_pct, **fields):
        """timm's rule: `resize_size = floor(image_size / crop_pct)`
        (timm.data.transforms_factory.transforms_imagenet_eval)."""
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1]; got {crop_pct!r}.")
        return cls(image_size, math.floor(image_size / crop_pct), **fields)

    @classmethod
    def from_timm_config(cls, config, use_test_size=False):
        """The transform of a timm `pretrained_cfg` (or a Hugging Face
        `config.json` holding one): `input_size` [3, H, W], `crop_pct`,
        `interpolation`, `mean`, `std`. With `use_test_size`, its
        `test_input_size` and `test_crop_pct` where it gives them."""
        config = config.get("pretrained_cfg", config)
        size_key = "input_size"
        if use_test_size and config.get("test_input_size"):
            size_key = "test_input_size"
        input_size = config.get(size_key)
        if not input_size or len(input_size) != 3 or input_size[1] != input_size[2]:
            raise ValueError(f"timm config {size_key} must be [3, size, size]; "
                             f"got {input_size!r}.")
        crop_mode = config.get("crop_mode") or "center"
        if crop_mode != "center":
            raise ValueError(f"timm config crop_mode {crop_mode!r} is not supported; "
                             "only 'center' is.")
        crop_pct = config.get("crop_pct") or TIMM_DEFAULT_CROP_PCT
        if use_test_size and config.get("test_crop_pct"):
            crop_pct = config["test_crop_pct"]
        fields = {name: config[name] for name in ("mean", "std") if config.get(name)}
        return cls.from_crop_pct(int(input_size[1]), float(crop_pct),
                                 interpolation=config.get("interpolation") or "bilinear",
                                 **fields)

    def describe(self, view="center"):
        """One line for people, e.g. "shorter side to 256 (bilinear,
        antialiased), centre 224x224 crop, mean [...] std [...]"."""
        size = f"{self.image_size}x{self.image_size}"
        crops = (f"centre {size} crop" if view == "center"
                 else f"ten {size} crops (centre, corners and their mirrors)")
        return (f"shorter side to {self.resize_size} ({self.interpolation}, antialiased), "
                f"{crops}, mean {_listed(self.mean)} std {_listed(self.std)}")

    def at_size(self, image_size):
        """The same view at another crop size, keeping `resize_size /
        image_size` (256 for 224 gives 366 for 320, 73 for 64)."""
        if image_size == self.image_size:
            return self
        return dataclasses.replace(
            self, image_size=image_size,
            resize_size=round(image_size * self.resize_size / self.image_size))

    def with_overrides(self, image_size=None, resize_size=None, crop_pct=None,
                       interpolation=None):
        """This transform with the fields a user gave (None: keep). A new
        `image_size` alone keeps the proportion (`at_size`); `crop_pct`
        sets the resize by timm's rule; `resize_size` sets it outright."""
        if resize_size is not None and crop_pct is not None:
            raise ValueError("Give resize_size or crop_pct, not both.")
        transform = self.at_size(image_size) if image_size is not None else self
        if crop_pct is not None:
            transform = EvalTransform.from_crop_pct(
                transform.image_size, crop_pct, interpolation=transform.interpolation,
                mean=transform.mean, std=transform.std)
        elif resize_size is not None:
            transform = dataclasses.replace(transform, resize_size=resize_size)
        if interpolation is not None:
            transform = dataclasses.replace(transform, interpolation=interpolation)
        return transform


def _listed(values):
    return "[" + ", ".join(f"{value:g}" for value in values) + "]"


# timm's DEFAULT_CROP_PCT, for configs that leave crop_pct out.
TIMM_DEFAULT_CROP_PCT = 0.875

# Each family's view at its reference size: §4 resizes the shorter side to
# 256 and takes the centre 224x224; CIFAR (§5.3) takes the image as it is.
FAMILY_EVAL_TRANSFORMS = {
    "imagenet": EvalTransform(image_size=224, resize_size=256),
    "cifar": EvalTransform(image_size=32, resize_size=32),
}


def as_eval_transform(value):
    """None, an `EvalTransform` or its `get_config()` dict, as an
    `EvalTransform` (or None)."""
    if value is None or isinstance(value, EvalTransform):
        return value
    if isinstance(value, dict):
        return EvalTransform.from_config(value)
    raise ValueError(f"eval_transform must be None, an EvalTransform or its config dict; "
                     f"got {type(value).__name__}.")


def family_eval_transform(family, image_size=None):
    """`family`'s ("imagenet" or "cifar") view, at `image_size` if given."""
    if family not in FAMILY_EVAL_TRANSFORMS:
        raise ValueError(f"Unknown family {family!r}; use one of "
                         f"{', '.join(FAMILY_EVAL_TRANSFORMS)}.")
    transform = FAMILY_EVAL_TRANSFORMS[family]
    return transform if image_size is None else transform.at_size(image_size)


def model_eval_transform(model, image_size=None):
    """The view `model` is evaluated with: the transform it records
    (`model.eval_transform`), else its family's (`model.stem`,
    ImageNet-style without one), at `image_size` if given, else at the
    model's square input size (or the recorded size for a model that takes
    any size)."""
    recorded = as_eval_transform(getattr(model, "eval_transform", None))
    base = recorded or family_eval_transform(getattr(model, "stem", "imagenet"))
    if image_size is None:
        image_size = _square_input_size(model, required=recorded is None)
    return base if image_size is None else base.at_size(image_size)


def _square_input_size(model, required):
    shape = tuple(model.inputs[0].shape)
    height, width = shape[1:3]
    if height is not None and height == width:
        return int(height)
    if required:
        raise ValueError(f"Cannot infer the eval image size from the model's input shape "
                         f"{shape}; pass image_size.")
    return None


def resolve_eval_transform(transform=None, model=None, image_size=None, resize_size=None,
                           crop_pct=None, interpolation=None):
    """The one view a caller means: `transform` (an `EvalTransform` or its
    dict), else `model`'s (`model_eval_transform`), else ImageNet's (§4),
    with the fields given overridden (`EvalTransform.with_overrides`)."""
    if transform is not None and model is not None:
        raise ValueError("Give transform or model, not both.")
    if transform is not None:
        base = as_eval_transform(transform)
    elif model is not None:
        base = model_eval_transform(model, image_size)
    else:
        base = FAMILY_EVAL_TRANSFORMS["imagenet"]
    return base.with_overrides(image_size=image_size, resize_size=resize_size,
                               crop_pct=crop_pct, interpolation=interpolation)
