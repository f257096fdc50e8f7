"""ImageNet-style views of one encoded image (§4 of the paper).

Training follows fb.resnet.torch, the code the paper's models were trained
with: a random crop of 8%-100% of the area with aspect ratio 3/4-4/3 (Szegedy
et al.), resized bicubically to `image_size` and flipped, with its colour
jitter and PCA lighting on request. Only the crop of a JPEG is decoded.
Evaluation is `keras_resnext`'s eval view (a single centre crop, or
fb.resnet.torch's ten crops), re-exported here so that datasets and serving
share one definition.

Random ops are stateless: each call takes a `seed` ([2] integers), so a
pipeline that hands out seeds deterministically is reproducible.
"""

import tensorflow as tf

from keras_resnext.kernels.images import decode_image, preprocess_for_eval
from keras_resnext.preprocessing import IMAGENET_MEAN_RGB, preprocess_input
from pipelines import augment

__all__ = [
    "AREA_RANGE",
    "ASPECT_RATIO_RANGE",
    "decode_random_crop",
    "preprocess_for_eval",
    "preprocess_for_train",
    "random_color_jitter",
    "random_pca_lighting",
    "resize_crop",
    "sample_crop_window",
]

AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
MAX_CROP_ATTEMPTS = 10

# fb.resnet.torch's ImageNet augmentation strengths (datasets/imagenet.lua):
# brightness, contrast and saturation each by up to 40%, and AlexNet-style PCA
# lighting with standard deviation 0.1 along the RGB eigenvectors of ImageNet.
COLOR_JITTER_STRENGTH = 0.4
LIGHTING_STD = 0.1
LIGHTING_EIGENVALUES = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
# Random erasing fills with the mean colour: torchvision erases the normalised image with 0.
ERASING_FILL = tuple(255.0 * mean for mean in IMAGENET_MEAN_RGB)


def sample_crop_window(image_height_width, seed, area_range=AREA_RANGE,
                       aspect_ratio_range=ASPECT_RATIO_RANGE,
                       max_attempts=MAX_CROP_ATTEMPTS):
    """A random crop window `[top, left, height, width]` (int32) of an image.

    The crop covers `area_range` of the image with width/height in
    `aspect_ratio_range`. If `max_attempts` samples all fail, the centre
    square is used, as in fb.resnet.torch.
    """
    height_width = tf.cast(image_height_width[:2], tf.int32)
    image_shape = tf.concat([height_width, [3]], axis=0)
    whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape, whole_image, seed=seed, min_object_covered=0.0,
        aspect_ratio_range=aspect_ratio_range, area_range=area_range,
        max_attempts=max_attempts, use_image_if_no_bounding_boxes=True,
    )
    sampled = tf.concat([begin[:2], size[:2]], axis=0)
    # The sampler returns the whole image when every attempt failed.
    failed = tf.reduce_all(tf.equal(size[:2], height_width))
    return tf.cond(failed, lambda: _center_square(height_width), lambda: sampled)


def _center_square(height_width):
    side = tf.reduce_min(height_width)
    top, left = tf.unstack((height_width - side) // 2)
    return tf.stack([top, left, side, side])


def decode_random_crop(image_bytes, seed, area_range=AREA_RANGE,
                       aspect_ratio_range=ASPECT_RATIO_RANGE):
    """Decode only a random crop (see `sample_crop_window`): uint8 RGB.

    JPEGs are decoded inside the window only (`decode_and_crop_jpeg`); PNG and
    other formats are decoded whole and then cropped. The format comes from
    the bytes, not the file name.
    """

    def jpeg_crop():
        window = sample_crop_window(
            tf.image.extract_jpeg_shape(image_bytes)[:2], seed, area_range,
            aspect_ratio_range,
        )
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other_format_crop():
        image = decode_image(image_bytes)
        top, left, height, width = tf.unstack(sample_crop_window(
            tf.shape(image)[:2], seed, area_range, aspect_ratio_range,
        ))
        return image[top:top + height, left:left + width]

    return tf.cond(tf.io.is_jpeg(image_bytes), jpeg_crop, other_format_crop)


def preprocess_for_train(image_bytes, image_size=224, seed=None, *,
                         color_jitter=False, pca_lighting=False, auto_augment=None,
                         random_erasing_probability=0.0):
    """The paper's training view of one encoded image: float32 [size, size, 3].

    Random-area/aspect crop, resized to `image_size`, random horizontal flip,
    optionally fb.resnet.torch's colour jitter and PCA lighting, then
    `keras_resnext.preprocess_input`. `seed` is a [2] integer tensor for the
    stateless random ops; None draws one.

    The later recipes' per-image augmentations, off by default: `auto_augment`
    ("trivial_augment_wide", a timm string such as "rand-m6-mstd0.5-inc1", or a
    `pipelines.augment` policy) after the resize, and random erasing with
    `random_erasing_probability` last.
    """
    return preprocess_input(augment_for_train(
        image_bytes, image_size, seed, color_jitter=color_jitter, pca_lighting=pca_lighting,
        auto_augment=auto_augment, random_erasing_probability=random_erasing_probability,
    ))


def augment_for_train(image_bytes, image_size=224, seed=None, *,
                      color_jitter=False, pca_lighting=False, auto_augment=None,
                      random_erasing_probability=0.0):
    """`preprocess_for_train` before normalisation: float32 RGB in [0, 255]."""
    if seed is None:
        seed = tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    crop_seed, flip_seed, jitter_seed, lighting_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4)
    )
    image = decode_random_crop(image_bytes, crop_seed)
    # Flip the uint8 crop, before the resize makes it float and larger on average.
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = resize_crop(image, image_size)
    if color_jitter:
        image = random_color_jitter(image, jitter_seed)
    if pca_lighting:
        image = random_pca_lighting(image, lighting_seed)
    # Seeds of their own, so that the four above stay what they were.
    if isinstance(auto_augment, str):
        auto_augment = augment.parse_auto_augment(auto_augment)
    if auto_augment is not None:
        # Its ops are PIL's on uint8 images: whole values in [0, 255].
        image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
        image = auto_augment(image, tf.random.experimental.stateless_fold_in(
            seed, augment.AUTO_AUGMENT_SEED_STREAM
        ))
    if random_erasing_probability > 0:
        image = augment.random_erasing(
            image, tf.random.experimental.stateless_fold_in(
                seed, augment.RANDOM_ERASING_SEED_STREAM
            ),
            random_erasing_probability, ERASING_FILL,
        )
    return tf.ensure_shape(image, [image_size, image_size, 3])


def resize_crop(image, image_size):
    """The training crop resized to `image_size` square: float32."""
    # Bicubic without antialiasing, as fb.resnet.torch's image.scale; an
    # antialiased resize would add about half to the CPU time of this view.
    # TF's bicubic kernel reads uint8 pixels about 40% slower than float32 ones,
    # and gives the same result bit for bit from either.
    return tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size],
                           method="bicubic")


def random_color_jitter(image, seed, strength=COLOR_JITTER_STRENGTH):
    """fb.resnet.torch's ColorJitter on float RGB in [0, 255].

    Brightness, contrast and saturation, each blending the image with a
    reference by a factor in [1 - strength, 1 + strength], in a random order.
    Like the original, nothing is clipped.
    """
    order_seed, *factor_seeds = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4)
    )
    factors = [
        tf.random.stateless_uniform([], s, 1.0 - strength, 1.0 + strength)
        for s in factor_seeds
    ]

    def brightness(x):
        return x * factors[0]

    def contrast(x):
        mean_gray = tf.reduce_mean(augment.grayscale(x))
        return mean_gray + factors[1] * (x - mean_gray)

    def saturation(x):
        gray = augment.grayscale(x)[..., None]
        return gray + factors[2] * (x - gray)

    orders = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    transforms = (brightness, contrast, saturation)

    def apply_in_order(order):
        def apply():
            x = image
            for index in order:
                x = transforms[index](x)
            return x
        return apply

    which = tf.random.stateless_uniform([], order_seed, 0, len(orders), tf.int32)
    return tf.switch_case(which, [apply_in_order(order) for order in orders])


def random_pca_lighting(image, seed, std=LIGHTING_STD):
    """AlexNet/fb.resnet.torch PCA lighting on float RGB in [0, 255]."""
    alpha = tf.random.stateless_normal([3], seed, stddev=std)
    eigenvalues = tf.constant(LIGHTING_EIGENVALUES)
    eigenvectors = tf.constant(LIGHTING_EIGENVECTORS)
    rgb_shift = tf.linalg.matvec(eigenvectors, alpha * eigenvalues)
    # The eigen-decomposition is of RGB in [0, 1].
    return image + 255.0 * rgb_shift
