"""Encoded images to model inputs with TensorFlow: decoding, the eval views, headers.

The dataset pipelines and SavedModel export share `preprocess_for_eval`, the
evaluation view of an `EvalTransform` (the paper's, §4, by default), so there
is one definition of it in the project; `read_image_header` and
`header_problem` let a serving graph refuse an image before decoding it.
"""

import tensorflow as tf

from keras_resnext.preprocessing import preprocess_input
from keras_resnext.transforms import EVAL_VIEWS, resolve_eval_transform

TEN_CROPS = 10


def decode_image(image_bytes):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes to uint8 RGB [height, width, 3].

    The format comes from the bytes, not the file name: ImageNet has PNG files
    named .JPEG, and CMYK or greyscale JPEGs become RGB.
    """
    return tf.io.decode_image(
        image_bytes, channels=3, expand_animations=False, dtype=tf.uint8
    )


def resize_shorter_side(image, resize_size, interpolation="bilinear"):
    """Resize so the shorter side is `resize_size` and the other
    `round(side * resize_size / shorter)`, antialiased "bilinear" or
    "bicubic" (as PIL's resize, which torchvision and timm evaluate with)."""
    shape = tf.shape(image)
    height = tf.cast(shape[0], tf.float64)
    width = tf.cast(shape[1], tf.float64)
    shorter = tf.minimum(height, width)
    scale = tf.cast(resize_size, tf.float64) / shorter
    new_height = tf.cast(tf.round(height * scale), tf.int32)
    new_width = tf.cast(tf.round(width * scale), tf.int32)
    if interpolation == "bilinear":
        return tf.image.resize(
            image, tf.stack([new_height, new_width]), method="bilinear", antialias=True
        )
    # Bicubic overshoots at edges. PIL (timm's eval) and torchvision's uint8
    # kernels resize one axis at a time, widths first, and keep the image in
    # uint8 between the passes, so the overshoot is clipped there too: done in
    # one float pass, 0.2% of the pixels differed from PIL's by 2 to 7 levels.
    wide = tf.image.resize(
        image, tf.stack([shape[0], new_width]), method="bicubic", antialias=True
    )
    wide = tf.cast(tf.round(tf.clip_by_value(wide, 0.0, 255.0)), tf.uint8)
    resized = tf.image.resize(
        wide, tf.stack([new_height, new_width]), method="bicubic", antialias=True
    )
    return tf.clip_by_value(resized, 0.0, 255.0)


def center_crop(image, image_size):
    """The centre `image_size` square, offset `(side - image_size) // 2`."""
    shape = tf.shape(image)
    top = (shape[0] - image_size) // 2
    left = (shape[1] - image_size) // 2
    return image[top : top + image_size, left : left + image_size]


def ten_crop(image, image_size):
    """fb.resnet.torch's TenCrop: [10, image_size, image_size, channels], the
    centre, top-left, top-right, bottom-left and bottom-right squares of
    `image`, then the same five of its mirror image."""
    shape = tf.shape(image)
    bottom, right = shape[0] - image_size, shape[1] - image_size
    crops = []
    for view in (image, tf.image.flip_left_right(image)):
        crops.append(center_crop(view, image_size))
        for top, left in ((0, 0), (0, right), (bottom, 0), (bottom, right)):
            crops.append(view[top:top + image_size, left:left + image_size])
    return tf.stack(crops)


def preprocess_for_eval(image_bytes, image_size=None, resize_size=None, max_pixels=None, *,
                        transform=None, model=None, crop_pct=None, interpolation=None,
                        view="center"):
    """The evaluation view of one encoded image.

    Decode, resize the shorter side to `resize_size` (antialiased), take the
    centre `image_size` x `image_size` crop and normalise: a float32
    [image_size, image_size, 3] tensor, exactly what the models take. With
    `view="ten_crop"`, the ten crops of `ten_crop`: [10, size, size, 3].

    The view is `transform` (a `keras_resnext.transforms.EvalTransform` or
    its dict), else `model`'s recorded or family one, else the paper's (§4:
    shorter side 256, centre 224, bilinear, ImageNet mean/std); `image_size`,
    `resize_size`, `crop_pct` and `interpolation` override its fields (see
    `EvalTransform.with_overrides`: a new size alone keeps the proportion).

    With `max_pixels`, an image whose header says it has more pixels (or
    whose header is unreadable) fails with InvalidArgumentError before it
    is decoded, so a small file cannot claim gigabytes of memory.
    """
    transform = resolve_eval_transform(transform, model, image_size=image_size,
                                       resize_size=resize_size, crop_pct=crop_pct,
                                       interpolation=interpolation)
    if view not in EVAL_VIEWS:
        raise ValueError(f"view must be one of {', '.join(EVAL_VIEWS)}; got {view!r}.")
    image_size = transform.image_size
    checks = []
    if max_pixels is not None:
        problem = header_problem(*read_image_header(image_bytes), max_pixels)
        checks.append(tf.debugging.Assert(tf.equal(problem, ""), [problem]))
    with tf.control_dependencies(checks):
        image = decode_jpeg_accurately_or_any(image_bytes)
    # Resizing the uint8 image gives the same float32 result, bit for bit, as
    # resizing a float32 copy, without that copy of the full-size image.
    image = resize_shorter_side(image, transform.resize_size, transform.interpolation)
    if view == "ten_crop":
        image = tf.ensure_shape(ten_crop(image, image_size),
                                [TEN_CROPS, image_size, image_size, 3])
    else:
        image = tf.ensure_shape(center_crop(image, image_size), [image_size, image_size, 3])
    return preprocess_input(image, mean=transform.mean, std=transform.std)


def decode_jpeg_accurately_or_any(image_bytes):
    """JPEGs with the exact integer IDCT (as libjpeg in PIL); other formats as they are."""
    return tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: decode_image(image_bytes),
    )


# What tf.io.decode_image looks for in each format it reads, as (offset, bytes).
# It also reads JPEG XL, whose size is bit-packed after variable-length boxes;
# serving refuses it rather than decode it unbounded.
_SIGNATURES = (
    ("JPEG", ((0, b"\xff\xd8\xff"),)),
    ("PNG", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ("GIF", ((0, b"GIF8"),)),
    ("BMP", ((0, b"BM"),)),
    ("WebP", ((0, b"RIFF"), (8, b"WEBP"))),
)
ACCEPTED_FORMATS = "JPEG, PNG, GIF, BMP or WebP"
# Real JPEGs have a few dozen segments before the frame header; the cap only
# bounds the time a crafted file of empty segments can take.
_MAX_JPEG_SEGMENTS = 1024


def read_image_header(image_bytes):
    """`(format, height, width)` of one encoded image, from its header only.

    `format` is "JPEG", "PNG", "GIF", "BMP" or "WebP", or "" for anything
    else; `height` and `width` are int64, -1 when the header is truncated or
    malformed. Never raises on bad bytes, so a serving graph can reject an
    image before decoding it. GIFs give their
    logical screen size, BMPs the absolute value of their height (negative
    for top-down rows), extended WebPs their canvas size.
    """
    length = tf.strings.length(image_bytes)
    head = _bytes_at(image_bytes, 0, 30, length)
    readers = {
        "JPEG": lambda: _jpeg_dimensions(image_bytes, length),
        # IHDR is always the first chunk: big-endian width, then height.
        "PNG": lambda: _checked(
            (length >= 24) & _equals(head[12:16], b"IHDR"),
            _unsigned(head[20:24], big_endian=True), _unsigned(head[16:20], big_endian=True)),
        # The logical screen descriptor: little-endian uint16 width, height.
        "GIF": lambda: _checked(
            length >= 10, _unsigned(head[8:10], big_endian=False),
            _unsigned(head[6:8], big_endian=False)),
        # BITMAPINFOHEADER: little-endian int32 width and height.
        "BMP": lambda: _checked(
            length >= 26, tf.abs(_signed32(head[22:26])), _signed32(head[18:22])),
        "WebP": lambda: _webp_dimensions(head, length),
    }
    format_name = tf.constant("")
    height = width = tf.constant(-1, tf.int64)
    for name, signature in reversed(_SIGNATURES):
        matches = tf.reduce_all([
            (length >= offset + len(expected)) & _equals(head[offset:offset + len(expected)],
                                                         expected)
            for offset, expected in signature])
        format_name = tf.where(matches, name, format_name)
        height, width = tf.cond(
            matches, readers[name], lambda h=height, w=width: (h, w))
    return format_name, height, width


def header_problem(format_name, height, width, max_pixels=None):
    """"" for an image `read_image_header` says may be decoded, else why not.

    Works on scalars or on batches of headers; the reason is one line such as
    "not a JPEG, PNG, GIF, BMP or WebP image" or "20000x20000 pixels is over the
    64000000-pixel limit".
    """
    problem = tf.where(
        (height < 1) | (width < 1),
        tf.strings.join(["truncated or malformed ", format_name, " header"]),
        "",
    )
    if max_pixels is not None:
        too_large = tf.strings.join([
            tf.strings.as_string(width), "x", tf.strings.as_string(height),
            f" pixels is over the {int(max_pixels)}-pixel limit",
        ])
        problem = tf.where((problem == "") & (height * width > max_pixels), too_large, problem)
    return tf.where(format_name == "", f"not a {ACCEPTED_FORMATS} image", problem)


def _bytes_at(image_bytes, position, count, length):
    """`count` bytes from `position` as int64, zeros past the end."""
    position = tf.minimum(tf.cast(position, tf.int32), length)
    raw = tf.io.decode_raw(tf.strings.substr(image_bytes, position, count), tf.uint8)
    raw = tf.reshape(raw, [-1])
    return tf.reshape(tf.pad(tf.cast(raw, tf.int64), [[0, count - tf.size(raw)]]), [count])


def _equals(values, expected):
    return tf.reduce_all(tf.equal(values, tf.constant(list(expected), tf.int64)))


def _unsigned(values, big_endian):
    weights = [256**i for i in range(int(values.shape[0]))]
    if big_endian:
        weights.reverse()
    return tf.reduce_sum(values * tf.constant(weights, tf.int64))


def _signed32(little_endian_bytes):
    value = _unsigned(little_endian_bytes, big_endian=False)
    return value - 2**32 * (value // 2**31)


def _checked(readable, height, width):
    unknown = tf.constant(-1, tf.int64)
    return tf.where(readable, height, unknown), tf.where(readable, width, unknown)


def _webp_dimensions(head, length):
    """From the first chunk: lossy VP8 frame, lossless VP8L or extended VP8X."""
    chunk = head[12:16]
    lossy = _equals(chunk, b"VP8 ") & _equals(head[23:26], b"\x9d\x01\x2a")
    lossless = _equals(chunk, b"VP8L") & tf.equal(head[20], 0x2F)
    extended = _equals(chunk, b"VP8X")
    fourteen_bits = 0x3FFF
    # VP8L packs width - 1 and height - 1 in 14 bits each; VP8X has 24-bit
    # canvas width - 1 and height - 1; VP8 has 14-bit sizes and 2 scale bits.
    packed = _unsigned(head[21:25], big_endian=False)
    width = tf.where(
        lossy, tf.bitwise.bitwise_and(_unsigned(head[26:28], big_endian=False), fourteen_bits),
        tf.where(lossless, tf.bitwise.bitwise_and(packed, fourteen_bits) + 1,
                 _unsigned(head[24:27], big_endian=False) + 1))
    height = tf.where(
        lossy, tf.bitwise.bitwise_and(_unsigned(head[28:30], big_endian=False), fourteen_bits),
        tf.where(lossless,
                 tf.bitwise.bitwise_and(tf.bitwise.right_shift(packed, 14), fourteen_bits) + 1,
                 _unsigned(head[27:30], big_endian=False) + 1))
    return _checked((length >= 30) & (lossy | lossless | extended), height, width)


def _jpeg_dimensions(image_bytes, length):
    """Walk the JPEG's marker segments to its frame header (SOFn)."""
    searching, found, malformed = 0, 1, -1

    def step(position, state, height, width, steps):
        segment = _bytes_at(image_bytes, position, 9, length)
        marker = segment[1]
        fill = marker == 0xFF
        standalone = (marker == 0x01) | ((marker >= 0xD0) & (marker <= 0xD7))
        # SOF0..SOF15, less DHT (C4), JPG (C8) and DAC (CC).
        frame = ((marker >= 0xC0) & (marker <= 0xCF) & (marker != 0xC4)
                 & (marker != 0xC8) & (marker != 0xCC))
        segment_length = segment[2] * 256 + segment[3]
        bad = ((position + 4 > length) | (segment[0] != 0xFF)
               | (marker == 0xD8) | (marker == 0xD9) | (marker == 0xDA)
               | (~fill & ~standalone & (segment_length < 2))
               | (frame & (position + 9 > length)) | (steps >= _MAX_JPEG_SEGMENTS))
        state = tf.where(bad, malformed, tf.where(frame, found, searching))
        advance = tf.where(fill, 1, tf.where(standalone, 2, 2 + tf.cast(segment_length, tf.int32)))
        return (position + advance, state,
                segment[5] * 256 + segment[6], segment[7] * 256 + segment[8], steps + 1)

    _, state, height, width, _ = tf.while_loop(
        lambda position, state, *_: tf.equal(state, searching),
        step,
        (tf.constant(2), tf.constant(searching), tf.constant(-1, tf.int64),
         tf.constant(-1, tf.int64), tf.constant(0)),
    )
    return _checked(tf.equal(state, found), height, width)
