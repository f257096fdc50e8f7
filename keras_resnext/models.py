"""The ResNeXt family as one Keras model class, and its stage tables."""

import keras
from keras import layers

from keras_resnext import blocks
from keras_resnext.layers import NativeKernelSteps
from keras_resnext.transforms import as_eval_transform

# Table 1: blocks per stage (conv2..conv5) for the ImageNet networks.
IMAGENET_STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
IMAGENET_STAGE_FILTERS = (64, 128, 256, 512)
# §5.3: 3 stages whose blocks output 256, 512 and 1024 channels.
CIFAR_STAGE_FILTERS = (64, 128, 256)

STEMS = ("imagenet", "cifar")
POOLINGS = (None, "avg", "max")


def cifar_stage_depths(depth):
    """Blocks per stage of the CIFAR network: depth = 9n + 2 (§5.3)."""
    if not isinstance(depth, int) or depth < 11 or (depth - 2) % 9:
        raise ValueError(
            f"CIFAR ResNeXt depth must be 9n + 2 with n >= 1 (11, 20, 29, ...); got {depth!r}."
        )
    n = (depth - 2) // 9
    return (n, n, n)


def default_name(depth, cardinality, width):
    if cardinality == 1 and width == 64 and depth in IMAGENET_STAGE_DEPTHS:
        return f"resnet{depth}"
    return f"resnext{depth}_{cardinality}x{width}d"


def is_positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def require_positive_int(value, what):
    if not is_positive_int(value):
        raise ValueError(f"`{what}` must be a positive integer; got {value!r}.")


@keras.saving.register_keras_serializable(package="keras_resnext")
class ResNeXt(NativeKernelSteps, keras.Model):
    """A ResNeXt (or ResNet, cardinality 1 and width 64) as a functional model.

    Args:
        stage_depths: blocks per stage, e.g. `(3, 4, 6, 3)`.
        cardinality: C, the number of paths (groups) per block.
        width: d, the bottleneck width of each path at the first stage.
        block_form: "a", "b" or "c", Fig. 3's equivalent forms.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max pool) or "cifar" (3x3 conv).
        include_top, input_shape, input_tensor, pooling, classes,
        classifier_activation: as in `keras.applications`.
        eval_transform: the `keras_resnext.transforms.EvalTransform` (or its
            config dict) the weights are evaluated with; None: the family's.
    """

    def __init__(
        self,
        stage_depths,
        cardinality=32,
        width=4,
        block_form="c",
        stem="imagenet",
        include_top=True,
        input_shape=None,
        input_tensor=None,
        pooling=None,
        classes=1000,
        classifier_activation="softmax",
        name=None,
        eval_transform=None,
        **kwargs,
    ):
        stage_depths = tuple(stage_depths)
        _validate(stage_depths, cardinality, width, block_form, stem, include_top,
                  pooling, classes)
        if keras.config.image_data_format() != "channels_last":
            raise ValueError(
                "keras_resnext models are channels_last; set "
                "keras.config.set_image_data_format('channels_last')."
            )
        stage_filters = IMAGENET_STAGE_FILTERS if stem == "imagenet" else CIFAR_STAGE_FILTERS
        if len(stage_depths) != len(stage_filters):
            raise ValueError(
                f"The {stem} stem takes {len(stage_filters)} stages; got "
                f"stage_depths={stage_depths}."
            )
        inputs, x = _inputs(input_shape, input_tensor, include_top, stem)

        if stem == "imagenet":
            x = blocks.conv_bn(x, 64, 7, 2, "conv1")
            x = layers.ZeroPadding2D(1, name="pool1_pad")(x)  # zeros never win after ReLU
            x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
        else:
            x = blocks.conv_bn(x, 64, 3, 1, "conv1")
        for stage, (num_blocks, filters) in enumerate(zip(stage_depths, stage_filters)):
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = blocks.bottleneck(
                    x, filters, cardinality, width, stride, block_form,
                    name=f"conv{stage + 2}_block{block + 1}",
                )
        if include_top:
            x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
            x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
        elif pooling == "avg":
            x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        elif pooling == "max":
            x = layers.GlobalMaxPooling2D(name="max_pool")(x)

        super().__init__(inputs=inputs, outputs=x, name=name, **kwargs)
        self.stage_depths = stage_depths
        self.cardinality = cardinality
        self.width = width
        self.block_form = block_form
        self.stem = stem
        self.include_top = include_top
        self.pooling = pooling
        self.classes = classes
        self.classifier_activation = keras.activations.serialize(
            keras.activations.get(classifier_activation)
        ) if classifier_activation is not None else None
        self.image_shape = tuple(self.inputs[0].shape[1:])
        self.eval_transform = eval_transform

    @property
    def eval_transform(self):
        return self._eval_transform

    @eval_transform.setter
    def eval_transform(self, value):
        self._eval_transform = as_eval_transform(value)

    @property
    def depth(self):
        # Three convolutions per bottleneck, plus the stem and the classifier.
        return 3 * sum(self.stage_depths) + 2

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "stage_depths": list(self.stage_depths),
            "cardinality": self.cardinality,
            "width": self.width,
            "block_form": self.block_form,
            "stem": self.stem,
            "include_top": self.include_top,
            "input_shape": list(self.image_shape),
            "pooling": self.pooling,
            "classes": self.classes,
            "classifier_activation": self.classifier_activation,
            "eval_transform": (self.eval_transform.get_config()
                               if self.eval_transform is not None else None),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _validate(stage_depths, cardinality, width, block_form, stem, include_top, pooling,
              classes):
    if not stage_depths or not all(map(is_positive_int, stage_depths)):
        raise ValueError(f"`stage_depths` must be positive integers; got {stage_depths!r}.")
    require_positive_int(cardinality, "cardinality")
    require_positive_int(width, "width")
    require_positive_int(classes, "classes")
    if block_form not in blocks.BLOCK_FORMS:
        raise ValueError(
            f"`block_form` must be one of 'a', 'b', 'c' (Fig. 3); got {block_form!r}."
        )
    if stem not in STEMS:
        raise ValueError(f"`stem` must be one of {STEMS}; got {stem!r}.")
    if not isinstance(include_top, bool):
        raise ValueError(f"`include_top` must be True or False; got {include_top!r}.")
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be None, 'avg' or 'max'; got {pooling!r}.")


def _inputs(input_shape, input_tensor, include_top, stem):
    if input_shape is None:
        if input_tensor is not None:
            input_shape = tuple(input_tensor.shape[1:])
        elif include_top:
            input_shape = (224, 224, 3) if stem == "imagenet" else (32, 32, 3)
        else:
            input_shape = (None, None, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(
            f"`input_shape` must be (height, width, 3) with RGB channels last; got {input_shape}."
        )
    min_size = 32 if stem == "imagenet" else 8
    for side in input_shape[:2]:
        if side is not None and side < min_size:
            raise ValueError(
                f"`input_shape` {input_shape} is too small: each side must be at least "
                f"{min_size} for the {stem} network."
            )
    if input_tensor is None:
        x = layers.Input(shape=input_shape, name="image")
        return x, x
    if not keras.backend.is_keras_tensor(input_tensor):
        x = layers.Input(tensor=input_tensor, shape=input_shape, name="image")
        return x, x
    return keras.utils.get_source_inputs(input_tensor), input_tensor
