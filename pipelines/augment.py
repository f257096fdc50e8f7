"""The augmentations of the post-2017 training recipes (issue 13), for tf.data.

- `TrivialAugmentWide` (torchvision's, used by its ResNet V2 recipe) and
  `RandAugment` (timm's `rand-m6-mstd0.5-inc1` strings, used by "ResNet
  strikes back"), chosen by `parse_auto_augment`: per image.
- `random_erasing` (torchvision's RandomErasing): per image.
- `mix_batch`: MixUp or CutMix (one of them per batch, as torchvision's
  RandomChoice and timm's switch probability): per batch.
- `repeated_records`: repeated augmentation (torchvision's RASampler).

Every random op is stateless and takes a `seed` ([2] integers), so the
pipeline's per-element and per-batch seeds make all of it reproducible.

Keras 3.15 has RandAugment, MixUp, CutMix and RandomErasing layers; none of
them is used, because none does what the recipes do:
- all four take an integer seed or a stateful `SeedGenerator`, not a seed
  tensor per element: under tf.data's parallel map the order in which
  elements advance the generator varies, so the same seed does not give the
  same batches (MixUp(seed=1) gives different labels in two builds);
- RandAugment draws its ops once per batch (not per image), runs all 11
  ops on every batch, has neither Invert nor SolarizeAdd nor timm's
  per-op probability 0.5, and draws magnitudes uniformly instead of timm's
  `m` with Gaussian noise `mstd`;
- MixUp draws one lambda per example and a random permutation; the recipes
  draw one lambda per batch and pair each image with its neighbour;
- CutMix draws its Beta alpha uniformly from `factor` instead of using the
  recipe's alpha, keeps the box inside the image (the recipes clip a box with
  a uniform centre) and weights labels by the float box, not the pasted pixels;
- RandomErasing has no aspect-ratio range and draws the erasing probability
  itself from [0, factor] instead of using p.
Keras has no TrivialAugment-wide (its op set and 31 magnitude bins) and no
repeated augmentation at all.
"""

import dataclasses
import math

import tensorflow as tf

from keras_resnext.preprocessing import IMAGENET_MEAN_RGB

__all__ = [
    "GRAYSCALE_WEIGHTS",
    "OPS",
    "RandAugment",
    "TrainingAugmentations",
    "TrivialAugmentWide",
    "apply_op",
    "grayscale",
    "mix_batch",
    "mixing_seeds",
    "parse_auto_augment",
    "random_erasing",
    "repeated_records",
]

GRAYSCALE_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's "L".
TRIVIAL_AUGMENT_WIDE = "trivial_augment_wide"
TRIVIAL_AUGMENT_WIDE_BINS = 31
# timm's RandAugment levels run from 0 to 10 (_LEVEL_DENOM).
TIMM_LEVEL_DENOMINATOR = 10.0
# timm fills the corners its geometric ops uncover with the mean colour.
TIMM_FILL = tuple(min(255, round(255 * mean)) for mean in IMAGENET_MEAN_RGB)
TIMM_TRANSLATE_FRACTION = 0.45
RANDOM_ERASING_SCALE = (0.02, 0.33)
RANDOM_ERASING_RATIO = (0.3, 3.3)
RANDOM_ERASING_ATTEMPTS = 10
SMOOTH_KERNEL = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # PIL's SMOOTH.
# Seeds folded from an element's seed, one stream per use. A batch's mixing
# seed folds the seed of the element at the same index, so its stream must
# differ from the per-image ones.
AUTO_AUGMENT_SEED_STREAM = 1
RANDOM_ERASING_SEED_STREAM = 2
MIXING_SEED_STREAM = 3


def grayscale(image):
    return tf.tensordot(image, tf.constant(GRAYSCALE_WEIGHTS), axes=1)


# ----------------------------------------------------------------------------
# Image ops on float32 RGB [H, W, 3] holding whole numbers in [0, 255], as
# PIL's and torchvision's uint8 ops see them. Each takes its argument in its
# own units (degrees, pixels, a blend factor, bits, a threshold).
#
# A policy draws one op per image inside tf.data, and every op it did not
# draw still costs a little per element (its graph nodes are visited), so
# ops that differ only in parameters share one branch: the five geometric
# ops one affine transform, Brightness/Color/Contrast one blend.


def _clip(image):
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def _blend(degenerate, image, factor):
    """PIL's ImageEnhance: factor 0 gives `degenerate`, 1 the image."""
    return _clip(degenerate + factor * (image - degenerate))


def affine(image, geometry, fill, interpolation):
    """Rotation about the centre, shear about the top-left corner and
    translation, as PIL and torchvision do them; what falls outside is `fill`.

    `geometry` is [counter-clockwise degrees, shear x, shear y, translate x,
    translate y (pixels)]; the recipes' ops set one of them at a time.
    """
    degrees, shear_x, shear_y, translate_x, translate_y = tf.unstack(geometry)
    radians = degrees * (math.pi / 180.0)
    cos, sin = tf.cos(radians), tf.sin(radians)
    height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
    center_x, center_y = width / 2.0, height / 2.0
    # Output (x, y) to input, in PIL's coordinates (pixel centres at + 0.5);
    # TF's transform works on pixel indices, hence the half-pixel terms.
    a, b, d, e = cos, shear_x - sin, sin + shear_y, cos
    c = center_x - cos * center_x + sin * center_y - translate_x
    f = center_y - sin * center_x - cos * center_y - translate_y
    c += 0.5 * (a + b) - 0.5
    f += 0.5 * (d + e) - 0.5
    fill = tf.constant(fill, tf.float32)
    # The op fills with one scalar; shifting by the fill colour makes it 0.
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=(image - fill)[None], transforms=tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None],
        output_shape=tf.shape(image)[:2], fill_value=0.0,
        interpolation=interpolation, fill_mode="CONSTANT",
    )
    return _clip(moved[0] + fill)


def enhance(image, factor, gray_weight, mean_gray_weight):
    """Brightness (weights 0, 0), Color (1, 0) or Contrast (0, 1): a blend
    with black, the grey image or its mean grey."""
    gray = grayscale(image)
    degenerate = gray_weight * gray[..., None] + mean_gray_weight * tf.reduce_mean(gray)
    return _blend(degenerate, image, factor)


def sharpness(image, factor):
    """Blend with PIL's SMOOTH filter of the image; the border keeps its pixels."""
    kernel = tf.constant(SMOOTH_KERNEL) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = _clip(tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0])
    interior = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return _blend(degenerate, image, factor)


def posterize(image, bits):
    """Keep the top `bits` (0-8) bits of each value."""
    step = tf.pow(2.0, 8.0 - bits)
    return tf.floor(image / step) * step


def solarize(image, threshold):
    """Invert the values at or above `threshold`."""
    return tf.where(image >= threshold, 255.0 - image, image)


def solarize_add(image, addition, threshold=128.0):
    """timm's SolarizeAdd: add `addition` to the values below `threshold`."""
    return tf.where(image < threshold, tf.minimum(image + addition, 255.0), image)


def auto_contrast(image):
    """Stretch each channel to [0, 255]; a flat channel is kept."""
    low = tf.reduce_min(image, axis=[0, 1])
    high = tf.reduce_max(image, axis=[0, 1])
    spread = high > low
    scale = tf.where(spread, 255.0 / tf.maximum(high - low, 1.0), 1.0)
    offset = tf.where(spread, low, 0.0)
    return _clip((image - offset) * scale)


def equalize(image):
    """PIL's (and torchvision's) histogram equalisation, per channel."""
    # The three channels' histograms as one bincount: few ops, which matters
    # because every op of an op not drawn still costs a little in tf.data.
    values = tf.cast(image, tf.int32) + 256 * tf.range(3)
    histograms = tf.reshape(tf.math.bincount(values, minlength=768, maxlength=768), [3, 256])
    highest_value = 255 - tf.argmax(tf.reverse(tf.cast(histograms > 0, tf.int32), [1]), axis=1)
    highest_count = tf.gather(histograms, highest_value, batch_dims=1)
    steps = (tf.reduce_sum(histograms, axis=1) - highest_count) // 255
    luts = (tf.cumsum(histograms, axis=1) + steps[:, None] // 2) // tf.maximum(steps, 1)[:, None]
    luts = tf.clip_by_value(tf.pad(luts[:, :-1], [[0, 0], [1, 0]]), 0, 255)
    equalized = tf.cast(tf.gather(tf.reshape(luts, [-1]), values), tf.float32)
    # A channel of one value (step 0) is kept, as PIL does.
    return tf.where(steps > 0, equalized, image)


def invert(image):
    return 255.0 - image


# op name (torchvision's and timm's): (family, parameters). The parameters of
# "affine" say which entry of `affine`'s geometry the argument sets; those of
# "enhance" are its two weights.
OPS = {
    "Identity": ("identity", ()),
    "ShearX": ("affine", (0.0, 1.0, 0.0, 0.0, 0.0)),
    "ShearY": ("affine", (0.0, 0.0, 1.0, 0.0, 0.0)),
    "TranslateX": ("affine", (0.0, 0.0, 0.0, 1.0, 0.0)),
    "TranslateY": ("affine", (0.0, 0.0, 0.0, 0.0, 1.0)),
    "Rotate": ("affine", (1.0, 0.0, 0.0, 0.0, 0.0)),
    "Brightness": ("enhance", (0.0, 0.0)),
    "Color": ("enhance", (1.0, 0.0)),
    "Contrast": ("enhance", (0.0, 1.0)),
    "Sharpness": ("sharpness", ()),
    "Posterize": ("posterize", ()),
    "Solarize": ("solarize", ()),
    "SolarizeAdd": ("solarize_add", ()),
    "AutoContrast": ("auto_contrast", ()),
    "Equalize": ("equalize", ()),
    "Invert": ("invert", ()),
}


def apply_op(names, op_index, argument, image, fill, interpolation):
    """Op `names[op_index]` (a tensor) with `argument`, on one image."""
    families = list(dict.fromkeys(OPS[name][0] for name in names))
    family_of_op = tf.constant([families.index(OPS[name][0]) for name in names])

    def parameters(family, size):
        rows = [OPS[name][1] if OPS[name][0] == family else (0.0,) * size for name in names]
        return tf.gather(tf.constant(rows, tf.float32), op_index)

    branches = {
        "identity": lambda: image,
        "affine": lambda: affine(image, argument * parameters("affine", 5), fill, interpolation),
        "enhance": lambda: enhance(image, argument, *tf.unstack(parameters("enhance", 2))),
        "sharpness": lambda: sharpness(image, argument),
        "posterize": lambda: posterize(image, argument),
        "solarize": lambda: solarize(image, argument),
        "solarize_add": lambda: solarize_add(image, argument),
        "auto_contrast": lambda: auto_contrast(image),
        "equalize": lambda: equalize(image),
        "invert": lambda: invert(image),
    }
    if len(families) == 1:
        return branches[families[0]]()
    return tf.switch_case(tf.gather(family_of_op, op_index),
                          [branches[family] for family in families])


def _random_sign(seed):
    return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)


# ----------------------------------------------------------------------------
# Policies


@dataclasses.dataclass(frozen=True)
class TrivialAugmentWide:
    """torchvision's TrivialAugmentWide: one op of 14, at one of 31 magnitudes.

    Ops, magnitude bins, random sign of the signed ones, nearest-neighbour
    sampling and a black fill as `torchvision.transforms.TrivialAugmentWide`.
    """

    num_magnitude_bins: int = TRIVIAL_AUGMENT_WIDE_BINS
    fill: tuple = (0, 0, 0)
    interpolation: str = "NEAREST"

    def magnitudes(self):
        """{op name: (magnitudes, signed)}, torchvision's augmentation space."""
        bins = self.num_magnitude_bins

        def linspace(start, stop):
            return tuple(start + (stop - start) * i / (bins - 1) for i in range(bins))

        return {
            "Identity": ((0.0,), False),
            "ShearX": (linspace(0.0, 0.99), True),
            "ShearY": (linspace(0.0, 0.99), True),
            "TranslateX": (linspace(0.0, 32.0), True),
            "TranslateY": (linspace(0.0, 32.0), True),
            "Rotate": (linspace(0.0, 135.0), True),
            "Brightness": (linspace(0.0, 0.99), True),
            "Color": (linspace(0.0, 0.99), True),
            "Contrast": (linspace(0.0, 0.99), True),
            "Sharpness": (linspace(0.0, 0.99), True),
            "Posterize": (tuple(8.0 - round(i / ((bins - 1) / 6)) for i in range(bins)), False),
            "Solarize": (linspace(255.0, 0.0), False),
            "AutoContrast": ((0.0,), False),
            "Equalize": ((0.0,), False),
        }

    def choose(self, seed):
        """(op index, magnitude with its sign) for one image."""
        op_seed, bin_seed, sign_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, num=3)
        )
        table = list(self.magnitudes().values())
        op_index = tf.random.stateless_uniform([], op_seed, 0, len(table), tf.int32)
        magnitude_bin = tf.random.stateless_uniform(
            [], bin_seed, 0, self.num_magnitude_bins, tf.int32
        )
        # One row per op: its magnitudes, the single-valued ones repeated.
        magnitudes = tf.constant(
            [values * (self.num_magnitude_bins // len(values)) for values, _ in table],
            tf.float32,
        )
        signed = tf.constant([signed for _, signed in table])
        magnitude = magnitudes[op_index, magnitude_bin]
        sign = tf.where(signed[op_index], _random_sign(sign_seed), 1.0)
        return op_index, sign * magnitude

    def __call__(self, image, seed):
        op_index, magnitude = self.choose(seed)
        return self.apply(op_index, magnitude, image)

    def apply(self, op_index, magnitude, image):
        """Op `op_index` at a signed `magnitude` of its table, as torchvision's
        `_apply_op`: 1 + magnitude for the blends, int() of pixels and bits."""
        names = list(self.magnitudes())
        plus_one = tf.constant([name in ("Brightness", "Color", "Contrast", "Sharpness")
                                for name in names])
        truncated = tf.constant([name in ("TranslateX", "TranslateY", "Posterize")
                                 for name in names])
        argument = tf.where(plus_one[op_index], 1.0 + magnitude, magnitude)
        argument = tf.where(truncated[op_index],
                            tf.sign(argument) * tf.floor(tf.abs(argument)), argument)
        return apply_op(names, op_index, argument, image, self.fill, self.interpolation)


TIMM_RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
    "ShearY", "TranslateXRel", "TranslateYRel",
)


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment (`rand_augment_transform`), from its string.

    `num_layers` ops, drawn with replacement from timm's 15 (`_RAND_TRANSFORMS`,
    or `_RAND_INCREASING_TRANSFORMS` with `increasing`), each applied with
    `probability` at level `magnitude` plus Gaussian noise of `magnitude_std`
    (uniform in [0, magnitude] for an infinite one), clipped to
    [0, magnitude_max]; levels map to op arguments as timm's `LEVEL_TO_ARG`.
    Geometric ops fill with timm's mean colour and sample bilinearly (timm
    picks bilinear or bicubic at random; TF's transform has no bicubic).
    """

    magnitude: float
    num_layers: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = TIMM_LEVEL_DENOMINATOR
    probability: float = 0.5
    increasing: bool = False
    fill: tuple = TIMM_FILL
    interpolation: str = "BILINEAR"

    def __call__(self, image, seed):
        for layer_seed in tf.unstack(
            tf.random.experimental.stateless_split(seed, num=self.num_layers)
        ):
            image = self._layer(image, layer_seed)
        return image

    def _layer(self, image, seed):
        op_seed, apply_seed, level_seed, sign_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, num=4)
        )
        op_index = tf.random.stateless_uniform([], op_seed, 0, len(TIMM_RAND_OPS), tf.int32)
        if math.isinf(self.magnitude_std):
            level = tf.random.stateless_uniform([], level_seed, 0.0, self.magnitude)
        elif self.magnitude_std > 0:
            level = self.magnitude + self.magnitude_std * tf.random.stateless_normal(
                [], level_seed
            )
        else:
            level = tf.constant(float(self.magnitude))
        level = tf.clip_by_value(level, 0.0, float(self.magnitude_max))
        apply = tf.random.stateless_uniform([], apply_seed) < self.probability
        return tf.cond(
            apply, lambda: self._apply(op_index, image, level, _random_sign(sign_seed)),
            lambda: image,
        )

    def _arguments(self, image, level, sign):
        """{timm op name: its argument at `level`}, as timm's `LEVEL_TO_ARG`."""
        fraction = level / TIMM_LEVEL_DENOMINATOR
        height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
        posterize_bits = tf.floor(fraction * 4.0)
        solarize_threshold = tf.minimum(256.0, tf.floor(fraction * 256.0))
        if self.increasing:
            posterize_bits = 4.0 - posterize_bits
            solarize_threshold = 256.0 - solarize_threshold
            enhance_factor = tf.maximum(0.1, 1.0 + sign * fraction * 0.9)
        else:
            enhance_factor = fraction * 1.8 + 0.1
        return {
            "AutoContrast": 0.0, "Equalize": 0.0, "Invert": 0.0,
            "Rotate": sign * fraction * 30.0,
            "Posterize": posterize_bits,
            "Solarize": solarize_threshold,
            "SolarizeAdd": tf.minimum(128.0, tf.floor(fraction * 110.0)),
            "Color": enhance_factor, "Contrast": enhance_factor,
            "Brightness": enhance_factor, "Sharpness": enhance_factor,
            "ShearX": sign * fraction * 0.3, "ShearY": sign * fraction * 0.3,
            "TranslateXRel": sign * fraction * TIMM_TRANSLATE_FRACTION * width,
            "TranslateYRel": sign * fraction * TIMM_TRANSLATE_FRACTION * height,
        }

    def _apply(self, op_index, image, level, sign):
        """timm's op `op_index` of `TIMM_RAND_OPS` at `level`."""
        arguments = self._arguments(image, level, sign)
        argument = tf.gather(tf.stack([
            tf.convert_to_tensor(arguments[name], tf.float32) for name in TIMM_RAND_OPS
        ]), op_index)
        names = [{"TranslateXRel": "TranslateX", "TranslateYRel": "TranslateY"}.get(name, name)
                 for name in TIMM_RAND_OPS]
        return apply_op(names, op_index, argument, image, self.fill, self.interpolation)


def parse_auto_augment(spec):
    """The policy for an `auto_augment` value: None, "trivial_augment_wide" or
    a timm RandAugment string such as "rand-m6-mstd0.5-inc1"."""
    if spec is None:
        return None
    if spec == TRIVIAL_AUGMENT_WIDE:
        return TrivialAugmentWide()
    usage = (f"Unknown auto_augment {spec!r}; use {TRIVIAL_AUGMENT_WIDE!r} or a timm "
             "RandAugment string rand-m<level>[-n<ops>][-mstd<std>][-mmax<level>]"
             "[-p<prob>][-inc<0|1>], e.g. 'rand-m6-mstd0.5-inc1'.")
    if not isinstance(spec, str):
        raise ValueError(usage)
    name, *sections = spec.split("-")
    keys = {"m": ("magnitude", float), "n": ("num_layers", int),
            "mstd": ("magnitude_std", float), "mmax": ("magnitude_max", float),
            "p": ("probability", float), "inc": ("increasing", lambda v: bool(int(v)))}
    arguments = {}
    for section in sections:
        # Longest key first, so that "mstd0.5" is not read as "m" "std0.5".
        key = next((k for k in sorted(keys, key=len, reverse=True) if section.startswith(k)), None)
        if key is None:
            raise ValueError(usage)
        field, convert = keys[key]
        try:
            arguments[field] = convert(section[len(key):])
        except ValueError:
            raise ValueError(usage) from None
    if name != "rand" or "magnitude" not in arguments:
        raise ValueError(usage)
    if arguments.get("num_layers", 1) < 1 or not 0 <= arguments.get("probability", 0) <= 1:
        raise ValueError(usage)
    return RandAugment(**arguments)


# ----------------------------------------------------------------------------
# Random erasing, per image


def random_erasing(image, seed, probability, fill, scale=RANDOM_ERASING_SCALE,
                   ratio=RANDOM_ERASING_RATIO, attempts=RANDOM_ERASING_ATTEMPTS):
    """torchvision's RandomErasing: with `probability`, one rectangle of
    `scale` of the area and aspect `ratio` (log-uniform) set to `fill`.

    As torchvision, up to `attempts` rectangles are drawn and the first that
    fits is used; if none fits the image is kept. torchvision erases the
    normalised image with 0, i.e. `fill` = the mean colour here.
    """
    apply_seed, area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=5)
    )
    height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
    areas = height * width * tf.random.stateless_uniform([attempts], area_seed, *scale)
    aspects = tf.exp(tf.random.stateless_uniform(
        [attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1])
    ))
    erase_heights = tf.round(tf.sqrt(areas * aspects))
    erase_widths = tf.round(tf.sqrt(areas / aspects))
    fits = (erase_heights < height) & (erase_widths < width)
    first = tf.argmax(tf.cast(fits, tf.int32))
    erase_height, erase_width = erase_heights[first], erase_widths[first]
    top = tf.floor(tf.random.stateless_uniform([], top_seed) * (height - erase_height + 1))
    left = tf.floor(tf.random.stateless_uniform([], left_seed) * (width - erase_width + 1))
    rows = tf.range(height)[:, None, None]
    columns = tf.range(width)[None, :, None]
    inside = ((rows >= top) & (rows < top + erase_height)
              & (columns >= left) & (columns < left + erase_width))
    erase = (tf.random.stateless_uniform([], apply_seed) < probability) & tf.reduce_any(fits)
    return tf.where(inside & erase, tf.constant(fill, tf.float32), image)


# ----------------------------------------------------------------------------
# MixUp and CutMix, per batch


def mixing_seeds(seed):
    """A dataset of [2] seeds, one per batch, beside the per-element ones.

    The same `Dataset.random` stream as the elements' seeds, folded into a
    stream of its own, so that one `seed` still fixes everything.
    """
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2).map(
        lambda pair: tf.random.experimental.stateless_fold_in(pair, MIXING_SEED_STREAM)
    )


def _sample_beta(alpha, seed):
    first_seed, second_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    # In float64: with alpha 0.2 both float32 gammas underflow to 0 now and then.
    first = tf.random.stateless_gamma([], first_seed, alpha, dtype=tf.float64)
    second = tf.random.stateless_gamma([], second_seed, alpha, dtype=tf.float64)
    return tf.cast(first / (first + second), tf.float32)


def mix_batch(images, labels, seed, *, num_classes, mixup_alpha=0.0, cutmix_alpha=0.0,
              switch_prob=0.5):
    """MixUp or CutMix of a batch, and its soft labels float32 [B, num_classes].

    As torchvision's RandomMixup/RandomCutmix (and timm's Mixup in "batch"
    mode): one lambda ~ Beta(alpha, alpha) per batch; each image is mixed with
    its neighbour in the batch (torchvision's `roll(1)`). With both alphas,
    CutMix is chosen with probability `switch_prob`. CutMix pastes one box
    whose centre is uniform in the image, of side sqrt(1 - lambda), clipped to
    the image; lambda becomes the area not pasted, so the labels weigh what
    the pixels show.
    """
    choice_seed, lambda_seed, box_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=3)
    )
    neighbours = tf.roll(images, 1, axis=0)

    def mixup():
        weight = _sample_beta(mixup_alpha, lambda_seed)
        return weight * images + (1.0 - weight) * neighbours, weight

    def cutmix():
        weight = _sample_beta(cutmix_alpha, lambda_seed)
        shape = tf.shape(images)
        height, width = shape[1], shape[2]
        center = tf.random.stateless_uniform(
            [2], box_seed, 0, tf.int32.max, tf.int32
        ) % tf.stack([height, width])
        half_side = 0.5 * tf.sqrt(1.0 - weight)
        half_height = tf.cast(half_side * tf.cast(height, tf.float32), tf.int32)
        half_width = tf.cast(half_side * tf.cast(width, tf.float32), tf.int32)
        top = tf.maximum(center[0] - half_height, 0)
        bottom = tf.minimum(center[0] + half_height, height)
        left = tf.maximum(center[1] - half_width, 0)
        right = tf.minimum(center[1] + half_width, width)
        rows = tf.range(height)[:, None, None]
        columns = tf.range(width)[None, :, None]
        box = (rows >= top) & (rows < bottom) & (columns >= left) & (columns < right)
        pasted_area = tf.cast((bottom - top) * (right - left), tf.float32)
        weight = 1.0 - pasted_area / tf.cast(height * width, tf.float32)
        return tf.where(box[None], neighbours, images), weight

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], choice_seed) < switch_prob
        images, weight = tf.cond(use_cutmix, cutmix, mixup)
    else:
        images, weight = cutmix() if cutmix_alpha > 0 else mixup()
    targets = tf.one_hot(labels, num_classes, dtype=tf.float32)
    targets = weight * targets + (1.0 - weight) * tf.roll(targets, 1, axis=0)
    return images, targets


# ----------------------------------------------------------------------------
# Repeated augmentation, on the keys before sharding


def repeated_records(records, repetitions, num_examples, num_shards, shard_index):
    """torchvision's RASampler on a stream of (key, payload) records.

    `records` is one shuffled pass over the whole split, in the same order in
    every input pipeline. Each record is repeated `repetitions` times in a
    row and the stream is cut at `num_examples`, so a pass keeps its length
    and holds 1/repetitions of the images; then pipeline i takes elements i,
    i + num_shards, ..., so that the copies of an image land on different
    pipelines (replicas), as RASampler deals its indices. Each copy gets its
    own per-element seed downstream, so its own augmentation.
    """
    repeated = records.flat_map(
        lambda *record: tf.data.Dataset.from_tensors(record).repeat(repetitions)
    )
    return repeated.take(num_examples).shard(num_shards, shard_index)


# ----------------------------------------------------------------------------
# The options of `pipelines.build_dataset`, checked once


@dataclasses.dataclass(frozen=True)
class TrainingAugmentations:
    """The later recipes' augmentations that `build_dataset` takes; all off by default."""

    auto_augment: object = None
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_switch_prob: float = 0.5
    repeated_augmentations: int = 1

    def __post_init__(self):
        # Parsed now, so that a bad string fails before any data is read.
        if not isinstance(self.auto_augment, (TrivialAugmentWide, RandAugment)):
            object.__setattr__(self, "auto_augment", parse_auto_augment(self.auto_augment))
        for name in ("random_erasing", "mixup_switch_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], not {value!r}.")
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0 (0 is off), not {value!r}.")
        value = self.repeated_augmentations
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"repeated_augmentations must be an integer >= 1 (1 is off), not {value!r}."
            )

    @property
    def per_image(self):
        return self.auto_augment is not None or self.random_erasing > 0

    @property
    def mixes(self):
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0
