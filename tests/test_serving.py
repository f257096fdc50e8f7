"""What serving does with images it cannot use: oversized, corrupt, none at all.

One bad image must fail alone (TF Serving batches requests from many
clients), and a small file that decodes to gigabytes must be refused from its
header, before decoding.
"""

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import keras_resnext as kr

tf = pytest.importorskip("tensorflow")
export = pytest.importorskip("keras_resnext.export")
predict = pytest.importorskip("keras_resnext.predict")
image_ops = pytest.importorskip("keras_resnext.kernels.images")

IMAGE_SIZE = 16
# Small enough that a 40x40 image is over it, so the limit is tested without
# big buffers; the 64-megapixel default has its own test in a subprocess.
SMALL_LIMIT = 1000


def tiny_model():
    return kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3,
                        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`(model, signatures of the loaded SavedModel)` with a 1000-pixel limit."""
    model = tiny_model()
    path = export.export_saved_model(model, str(tmp_path_factory.mktemp("models")),
                                     max_pixels=SMALL_LIMIT)
    loaded = tf.saved_model.load(path)
    return model, loaded.signatures, path


def encode(fmt, height=20, width=30, seed=0, **options):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def constant_png(height, width, value=127):
    """A valid one-colour RGB PNG, compressed a row at a time.

    tf.io.encode_png takes 18 s for 14000x14000 on this CPU (AMD EPYC Zen 4);
    this takes 3 s and never holds the decoded image.
    """
    row = b"\x00" + bytes([value]) * (width * 3)  # filter type 0, then RGB
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(
        b"IEND", b"")


def header(image_bytes):
    format_name, height, width = tf.function(image_ops.read_image_header)(
        tf.constant(image_bytes))
    return format_name.numpy().decode(), int(height), int(width)


# ----------------------------------------------------------------------------
# Dimensions from headers


@pytest.mark.parametrize("fmt, options", [
    ("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}),
    ("WebP", dict(lossless=False)),  # a VP8 chunk
    ("WebP", dict(lossless=True)),  # VP8L
    ("WebP", dict(exif=b"Exif\0\0metadata")),  # VP8X, the extended format
])
def test_headers_give_the_size_decode_image_will_produce(fmt, options):
    for height, width in ((20, 30), (37, 1), (300, 517)):
        data = encode(fmt, height, width, **options)
        assert header(data) == (fmt, height, width)
        assert tuple(image_ops.decode_image(data).shape[:2]) == (height, width)


def test_jpeg_frame_header_is_found_after_other_segments():
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.zeros((24, 40, 3), np.uint8)
    # EXIF, a comment and a progressive frame (SOF2) put segments before it.
    Image.fromarray(pixels).save(buffer, format="JPEG", progressive=True, exif=b"Exif\0\0" * 50,
                                 comment=b"x" * 300)
    assert header(buffer.getvalue()) == ("JPEG", 24, 40)


def test_top_down_bmp_has_a_negative_height_in_its_header():
    data = bytearray(encode("BMP", 7, 9))
    data[22:26] = struct.pack("<i", -7)
    assert header(bytes(data)) == ("BMP", 7, 9)
    assert tuple(image_ops.decode_image(bytes(data)).shape) == (7, 9, 3)


@pytest.mark.parametrize("data, expected", [
    (b"", ("", -1, -1)),
    (b"hello, world: not an image at all", ("", -1, -1)),
    (b"\xff\xd8\xff", ("JPEG", -1, -1)),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", ("JPEG", -1, -1)),  # segment runs past the end
    (b"\xff\xd8\xff\xda\x00\x08", ("JPEG", -1, -1)),  # a scan before any frame header
    (b"\xff\xd8" + b"\xff\xfe\x00\x02" * 5000, ("JPEG", -1, -1)),  # only empty comments
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00", ("PNG", -1, -1)),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIDAT" + bytes(12), ("PNG", -1, -1)),
    (b"GIF89a\x10", ("GIF", -1, -1)),
    (b"BM" + bytes(20), ("BMP", -1, -1)),
    (b"RIFF\0\0\0\0WEBPVP8 " + bytes(14), ("WebP", -1, -1)),  # no VP8 start code
    (b"RIFF\0\0\0\0WAVEfmt " + bytes(14), ("", -1, -1)),
    (b"\xff\x0a" + bytes(20), ("", -1, -1)),  # JPEG XL: decode_image reads it; we refuse it
])
def test_short_or_malformed_headers_read_as_unknown_without_raising(data, expected):
    assert header(data) == expected


def test_header_problems_are_one_line_each():
    problems = image_ops.header_problem(
        tf.constant(["", "PNG", "PNG", "JPEG"]), tf.constant([-1, -1, 300, 20], tf.int64),
        tf.constant([-1, -1, 400, 30], tf.int64), max_pixels=1000)
    assert [p.decode() for p in problems.numpy()] == [
        "not a JPEG, PNG, GIF, BMP or WebP image",
        "truncated or malformed PNG header",
        "400x300 pixels is over the 1000-pixel limit",
        "",
    ]


def test_eval_view_resizes_the_uint8_image_bit_for_bit_as_a_float32_copy():
    data = encode("PNG", 45, 70, seed=3)
    pixels = tf.cast(image_ops.decode_image(data), tf.float32)
    resized = image_ops.resize_shorter_side(pixels, 36)
    expected = kr.preprocess_input(image_ops.center_crop(resized, 32))
    np.testing.assert_array_equal(image_ops.preprocess_for_eval(data, 32, 36), expected)


def test_preprocess_for_eval_refuses_images_over_max_pixels_before_decoding():
    data = encode("PNG", 40, 40)
    assert image_ops.preprocess_for_eval(data, 16, 16, max_pixels=1600).shape == (16, 16, 3)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="40x40 pixels is over the 1000-pixel limit"):
        image_ops.preprocess_for_eval(data, 16, 16, max_pixels=SMALL_LIMIT)


# ----------------------------------------------------------------------------
# serving_default: one bad image fails alone


def test_bad_images_fail_alone_and_the_rest_are_classified(served):
    model, signatures, _ = served
    good = [encode("JPEG", seed=1), encode("PNG", seed=2), encode("GIF", seed=3),
            encode("BMP", seed=4), encode("WebP", seed=5)]
    truncated_png = encode("PNG", seed=5)[:120]  # a whole header, then cut
    batch = [good[0], b"not an image", truncated_png, good[1], encode("PNG", 40, 40),
             good[2], b"\x89PNG\r\n\x1a\n", good[3], good[4]]
    outputs = {key: value.numpy() for key, value in
               signatures["serving_default"](image_bytes=tf.constant(batch)).items()}

    assert [e.decode() for e in outputs["error"]] == [
        "",
        "image 1: not a JPEG, PNG, GIF, BMP or WebP image",
        "image 2: the PNG data could not be decoded (corrupt, truncated or unsupported)",
        "",
        "image 4: 40x40 pixels is over the 1000-pixel limit",
        "",
        "image 6: truncated or malformed PNG header",
        "",
        "",
    ]
    valid = outputs["valid"]
    assert valid.tolist() == [True, False, False, True, False, True, False, True, True]
    images = np.stack([image_ops.preprocess_for_eval(d, IMAGE_SIZE, IMAGE_SIZE)
                       for d in good])
    expected = model(images, training=False).numpy()  # a softmax head
    np.testing.assert_allclose(outputs["probabilities"][valid], expected, atol=2e-6)
    assert (outputs["probabilities"][~valid] == 0).all()
    assert (outputs["scores"][~valid] == 0).all()
    assert (outputs["classes"][~valid] == -1).all()
    assert (outputs["class_names"][~valid] == b"").all()
    assert (outputs["classes"][valid] >= 0).all()


def test_a_batch_of_only_bad_images_still_answers_per_image(served):
    _, signatures, _ = served
    outputs = signatures["serving_default"](image_bytes=tf.constant([b"x", b"GIF89a"]))
    assert outputs["valid"].numpy().tolist() == [False, False]
    assert outputs["probabilities"].shape == (2, 3)
    assert outputs["error"].numpy()[1] == b"image 1: truncated or malformed GIF header"


def test_an_empty_batch_is_a_clear_error(served):
    _, signatures, _ = served
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="image_bytes is an empty batch: send at least one image"):
        signatures["serving_default"](image_bytes=tf.zeros([0], tf.string))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="images is an empty batch: send at least one image"):
        signatures["serving_preprocessed"](images=tf.zeros([0, IMAGE_SIZE, IMAGE_SIZE, 3]))


@pytest.mark.parametrize("shape", [(2, 20, 20, 3), (1, IMAGE_SIZE, IMAGE_SIZE, 4),
                                   (IMAGE_SIZE, IMAGE_SIZE, 3), (1, IMAGE_SIZE, IMAGE_SIZE, 3, 1)])
def test_preprocessed_images_of_another_shape_are_refused(served, shape):
    _, signatures, _ = served
    # A rank of 5 is caught by the shape the graph then ensures, naming the tensor.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"takes float32 images of shape \[N, 16, 16, 3\] .*got shape"
                             r"|images \[1,16,16,3,1\] is not compatible with expected shape"):
        signatures["serving_preprocessed"](images=tf.zeros(shape))
    outputs = signatures["serving_preprocessed"](images=tf.zeros([2, IMAGE_SIZE, IMAGE_SIZE, 3]))
    assert outputs["valid"].numpy().tolist() == [True, True]


def test_max_pixels_is_recorded_and_validated(served, tmp_path):
    _, signatures, _ = served
    assert int(signatures["metadata"]()["max_pixels"]) == SMALL_LIMIT
    with pytest.raises(ValueError, match="max_pixels must be at least 1"):
        export.export_saved_model(tiny_model(), str(tmp_path), max_pixels=0)


def test_predict_prints_an_error_line_for_a_bad_file_and_classifies_the_rest(served, tmp_path):
    _, _, path = served
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    good.write_bytes(encode("PNG"))
    bad.write_bytes(b"\xff\xd8\xff garbage")
    predictions = predict.predict_files(path, [str(bad), str(good)], top=2)
    assert predictions[0].error == f"{bad}: truncated or malformed JPEG header"
    assert predictions[0].top == []
    assert predictions[1].error == "" and len(predictions[1].top) == 2


# ----------------------------------------------------------------------------
# The 600 KB PNG that decodes to 14000x14000

OVERSIZED = r"""
import sys
import numpy as np
import tensorflow as tf

serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
small = tf.io.encode_png(np.zeros((20, 20, 3), np.uint8))
serve(image_bytes=tf.stack([small]))  # the first call builds the graph
outputs = serve(image_bytes=tf.constant([open(sys.argv[2], "rb").read(), small.numpy()]))
# This process's own peak (ru_maxrss would carry the forking parent's over).
with open("/proc/self/status") as f:
    peak_kib = int(next(line for line in f if line.startswith("VmHWM")).split()[1])
print("RESULT", peak_kib / 1024, outputs["error"].numpy()[0].decode(),
      outputs["valid"].numpy().tolist())
"""


@pytest.mark.slow
def test_a_png_that_decodes_to_196_megapixels_is_refused_from_its_header(tmp_path):
    path = export.export_saved_model(tiny_model(), str(tmp_path / "models"))
    image = tmp_path / "huge.png"
    image.write_bytes(constant_png(14000, 14000))
    assert image.stat().st_size < 700_000
    completed = subprocess.run(
        [sys.executable, "-c", OVERSIZED, path, str(image)], capture_output=True, text=True,
        timeout=600, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = completed.stdout.split("RESULT")[-1].split(maxsplit=1)
    peak_mib, rest = float(result[0]), result[1]
    assert rest.startswith("image 0: 14000x14000 pixels is over the 64000000-pixel limit")
    assert rest.rstrip().endswith("[False, True]")
    # Decoding it took 6 GB (AMD EPYC Zen 4); loading TensorFlow and the
    # model takes about 0.7 GB.
    assert peak_mib < 2048
