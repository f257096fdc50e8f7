"""The ResNeXt family as one Keras model class, and its stage tables."""

import re

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
# Pyramid level (log2 of the stride) of the first stage's output: the ImageNet
# stem divides by 4 (7x7/2 conv, 3x3/2 pool), the CIFAR stem by 1.
FIRST_STAGE_LEVEL = {"imagenet": 2, "cifar": 0}
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


def require_bool(value, what):
    if not isinstance(value, bool):
        raise ValueError(f"`{what}` must be True or False; got {value!r}.")


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

    Backbone and regularisation options (all off by default; none changes the
    weights, so pretrained weights load into any of them):
        replace_stride_with_dilation: one flag per stage after the first
            (torchvision's argument): that stage keeps its resolution and its
            3x3s dilate instead, so `(False, True, True)` has output stride 8.
        freeze_batch_norm: every BN is non-trainable and normalizes with its
            moving statistics, in training too (torchvision's FrozenBatchNorm2d).
        trainable_stages: train only the last K of [stem, conv2, ..., conv5]
            (torchvision's `trainable_layers`); None trains all. The head, if
            any, always trains. Frozen BNs normalize with moving statistics.
        drop_path_rate: stochastic depth, rising linearly over blocks (timm).
        zero_init_last: the last BN gamma of each residual branch starts at 0
            (torchvision's `zero_init_residual`, timm's `zero_init_last`).

    `model.pyramid_outputs` maps "P1" (the ImageNet stem's conv, after its
    ReLU) and "P2".."P5" (conv2..conv5 outputs) to their KerasTensors, keras-hub's
    convention; a CIFAR model has "P0".."P2" for its three stages. A level is
    log2 of its map's stride, so under dilation the deepest stage at a stride
    holds its level and the dilated levels are gone: `(False, True, True)`
    gives "P1".."P3", "P3" being conv5's output.
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
        replace_stride_with_dilation=None,
        freeze_batch_norm=False,
        trainable_stages=None,
        drop_path_rate=0.0,
        zero_init_last=False,
        name=None,
        eval_transform=None,
        **kwargs,
    ):
        stage_depths = tuple(stage_depths)
        _validate(stage_depths, cardinality, width, block_form, stem, include_top,
                  pooling, classes)
        replace_stride_with_dilation = _dilated_stages(replace_stride_with_dilation,
                                                       stage_depths)
        _validate_training_options(freeze_batch_norm, trainable_stages, drop_path_rate,
                                   zero_init_last, stage_depths)
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

        pyramid_outputs = {}
        if stem == "imagenet":
            x = blocks.conv_bn(x, 64, 7, 2, "conv1")
            pyramid_outputs["P1"] = x
            x = layers.ZeroPadding2D(1, name="pool1_pad")(x)  # zeros never win after ReLU
            x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
        else:
            x = blocks.conv_bn(x, 64, 3, 1, "conv1")
        level = FIRST_STAGE_LEVEL[stem]
        drop_path_rates = iter(_drop_path_rates(drop_path_rate, sum(stage_depths)))
        dilation = 1
        for stage, (num_blocks, filters) in enumerate(zip(stage_depths, stage_filters)):
            stride = 1 if stage == 0 else 2
            # torchvision's `_make_layer(dilate=True)`: the stage's stride becomes
            # dilation, which its first block's 3x3 doesn't have yet.
            first_block_dilation = dilation
            if stage > 0 and replace_stride_with_dilation[stage - 1]:
                dilation, stride = dilation * stride, 1
            level += stride // 2
            for block in range(num_blocks):
                x = blocks.bottleneck(
                    x, filters, cardinality, width, stride if block == 0 else 1, block_form,
                    name=f"conv{stage + 2}_block{block + 1}",
                    dilation=first_block_dilation if block == 0 else dilation,
                    drop_path_rate=next(drop_path_rates),
                    zero_init_last=zero_init_last,
                )
            # Level = log2 of the stride, which keras-hub's consumers compute
            # scales from: a dilated stage's map replaces the previous one's.
            pyramid_outputs[f"P{level}"] = x
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
        self.replace_stride_with_dilation = replace_stride_with_dilation
        self.freeze_batch_norm = freeze_batch_norm
        self.trainable_stages = trainable_stages
        self.drop_path_rate = drop_path_rate
        self.zero_init_last = zero_init_last
        self._freeze_layers()
        # keras-hub's FeaturePyramidBackbone convention, read by its
        # RetinaNetBackbone: "P{level}" is the map whose stride is 2**level.
        self.pyramid_outputs = pyramid_outputs
        self.eval_transform = eval_transform

    @property
    def eval_transform(self):
        return self._eval_transform

    @eval_transform.setter
    def eval_transform(self, value):
        self._eval_transform = as_eval_transform(value)

    def _freeze_layers(self):
        """Frozen layers are non-trainable, and a non-trainable BN normalizes
        with its moving statistics even when called with training=True."""
        num_stages = len(self.stage_depths) + 1  # the stem counts as one
        first_trainable = (
            0 if self.trainable_stages is None else num_stages - self.trainable_stages
        )
        for layer in self.layers:
            stage = _stage_index(layer.name)
            if stage is not None and stage < first_trainable:
                layer.trainable = False
            if self.freeze_batch_norm and isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False

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
            "replace_stride_with_dilation": list(self.replace_stride_with_dilation),
            "freeze_batch_norm": self.freeze_batch_norm,
            "trainable_stages": self.trainable_stages,
            "drop_path_rate": self.drop_path_rate,
            "zero_init_last": self.zero_init_last,
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
    require_bool(include_top, "include_top")
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be None, 'avg' or 'max'; got {pooling!r}.")


def _dilated_stages(replace_stride_with_dilation, stage_depths):
    """One flag per strided stage (all but the first), False by default."""
    strided_stages = len(stage_depths) - 1
    if replace_stride_with_dilation is None:
        return (False,) * strided_stages
    flags = tuple(replace_stride_with_dilation)
    if len(flags) != strided_stages or not all(isinstance(f, bool) for f in flags):
        raise ValueError(
            f"`replace_stride_with_dilation` must be {strided_stages} booleans, one per "
            f"stage after the first; got {replace_stride_with_dilation!r}."
        )
    return flags


def _validate_training_options(freeze_batch_norm, trainable_stages, drop_path_rate,
                               zero_init_last, stage_depths):
    require_bool(freeze_batch_norm, "freeze_batch_norm")
    require_bool(zero_init_last, "zero_init_last")
    num_stages = len(stage_depths) + 1
    if trainable_stages is not None and (
        isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int)
        or not 0 <= trainable_stages <= num_stages
    ):
        raise ValueError(
            f"`trainable_stages` must be None (all) or 0 to {num_stages} (the stem counts "
            f"as one stage); got {trainable_stages!r}."
        )
    if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) or not (
        0.0 <= drop_path_rate < 1.0
    ):
        raise ValueError(f"`drop_path_rate` must be in [0, 1); got {drop_path_rate!r}.")


def _drop_path_rates(drop_path_rate, num_blocks):
    # timm's "stochastic depth linear decay rule" (timm/models/resnet.py,
    # make_blocks): block i of N, counted over the whole network, drops its
    # residual branch with probability drop_path_rate * i / (N - 1).
    return [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


_STAGE_LAYER = re.compile(r"^(?:conv|pool)(\d+)_")


def _stage_index(layer_name):
    """0 for the stem (conv1_*, pool1_*), k - 1 for stage convk; None for the
    input and the head."""
    match = _STAGE_LAYER.match(layer_name)
    return int(match[1]) - 1 if match else None


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
