"""SavedModel export for TF Serving, checked from a process without keras_resnext."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import keras_resnext as kr
from conftest import REPO_ROOT

tf = pytest.importorskip("tensorflow")
export = pytest.importorskip("keras_resnext.export")
predict = pytest.importorskip("keras_resnext.predict")

CLASS_NAMES = ["cat", "dog", "owl", "eel"]


def tiny_model(**overrides):
    arguments = dict(depth=11, cardinality=2, width=4, classes=len(CLASS_NAMES),
                     input_shape=(32, 32, 3), classifier_activation=None)
    arguments.update(overrides)
    model = kr.ResNeXt29(**arguments)
    # Non-trivial BN statistics, so inference differs from training mode.
    for weight in model.non_trainable_weights:
        rng = np.random.default_rng(len(weight.path))
        weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))
    return model


def encoded_images(directory):
    """A JPEG and two PNGs of different sizes and aspect ratios, as files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for name, (height, width), fmt in (("a.jpg", (48, 40), "JPEG"), ("b.png", (32, 32), "PNG"),
                                       ("c.png", (45, 70), "PNG")):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = os.path.join(directory, name)
        Image.fromarray(pixels).save(path, format=fmt)
        paths.append(path)
    return paths


SERVE = r"""
import json, sys
import numpy as np
import tensorflow as tf

directory, paths = sys.argv[1], sys.argv[2:]
loaded = tf.saved_model.load(directory)
image_bytes = tf.constant([open(p, "rb").read() for p in paths])
served = loaded.signatures["serving_default"](image_bytes=image_bytes)
preprocessed = loaded.signatures["serving_preprocessed"](
    images=tf.constant(np.load(directory + "-images.npy")))
metadata = loaded.signatures["metadata"]()
to_list = lambda outputs: {k: np.asarray(v.numpy()).tolist() for k, v in outputs.items()}
decode = lambda x: [[s.decode() for s in row] for row in x]
result = dict(served=to_list(served), preprocessed=to_list(preprocessed),
              metadata=to_list(metadata),
              keras_resnext_imported=any(m.startswith("keras_resnext") for m in sys.modules))
for outputs in (result["served"], result["preprocessed"]):
    outputs["class_names"] = decode(outputs["class_names"])
    outputs["error"] = [s.decode() for s in outputs["error"]]
result["metadata"]["class_names"] = [s.decode() for s in result["metadata"]["class_names"]]
for key in ("preprocessing", "interpolation", "eval_transform", "dtype"):
    result["metadata"][key] = result["metadata"][key].decode()
print("RESULT" + json.dumps(result))
"""


def test_served_probabilities_match_the_keras_model_in_a_fresh_process(tmp_path):
    model = tiny_model()
    paths = encoded_images(str(tmp_path))
    # An ImageNet-style eval view: shorter side to 36, centre 32x32.
    path = export.export_saved_model(model, str(tmp_path / "models"), top_k=3,
                                     class_names=CLASS_NAMES, image_size=32, resize_size=36)
    assert path == str(tmp_path / "models" / "1")
    images = np.stack([kr.preprocess_for_eval(open(p, "rb").read(), 32, 36).numpy()
                       for p in paths])
    np.save(path + "-images.npy", images)
    expected = tf.nn.softmax(model(images, training=False)).numpy()

    completed = subprocess.run([sys.executable, "-c", SERVE, path, *paths], capture_output=True,
                               text=True, timeout=300, cwd=str(tmp_path),
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.split("RESULT")[-1])
    assert not result["keras_resnext_imported"]
    for outputs in (result["served"], result["preprocessed"]):
        probabilities = np.asarray(outputs["probabilities"])
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=2e-6)
        best = np.argsort(-expected, axis=1, kind="stable")[:, :3]
        np.testing.assert_array_equal(outputs["classes"], best)
        np.testing.assert_allclose(outputs["scores"], np.take_along_axis(expected, best, 1),
                                   atol=2e-6)
        assert outputs["class_names"] == [[CLASS_NAMES[i] for i in row] for row in best]
        assert outputs["valid"] == [True] * len(paths)
        assert outputs["error"] == [""] * len(paths)
    transform = kr.applications.model_eval_transform(model).with_overrides(resize_size=36)
    assert json.loads(result["metadata"].pop("eval_transform")) == transform.get_config()
    np.testing.assert_allclose(result["metadata"].pop("mean"), transform.mean, rtol=1e-7)
    np.testing.assert_allclose(result["metadata"].pop("std"), transform.std, rtol=1e-7)
    assert result["metadata"] == dict(image_size=32, resize_size=36, class_names=CLASS_NAMES,
                                      preprocessing="keras_resnext.preprocess_for_eval",
                                      max_pixels=export.DEFAULT_MAX_PIXELS,
                                      interpolation="bilinear", dtype="float32")
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        graph = f.read()
    assert b"_XlaMustCompile" not in graph
    # The model's groups of 4 and 8 channels run on our AVX2 op in Keras'
    # steps; the SavedModel must hold only TensorFlow's own ops.
    assert b"KerasResnextGroupedConv2D" not in graph


def test_versions_are_numbered_and_written_atomically(tmp_path):
    model = tiny_model()
    base = str(tmp_path / "serving")
    assert export.export_saved_model(model, base).endswith(os.sep + "1")
    assert export.export_saved_model(model, base, version=7).endswith(os.sep + "7")
    assert export.export_saved_model(model, base).endswith(os.sep + "8")
    assert sorted(os.listdir(base)) == ["1", "7", "8"]  # no temporary folders left
    with pytest.raises(FileExistsError, match="already exists"):
        export.export_saved_model(model, base, version=7)


def test_softmax_heads_are_not_softmaxed_twice_and_cifar_keeps_its_32x32_view(tmp_path):
    model = tiny_model(classifier_activation="softmax")
    path = export.export_saved_model(model, str(tmp_path), top_k=10)
    loaded = tf.saved_model.load(path)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    served = loaded.signatures["serving_preprocessed"](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               model(images, training=False).numpy(), atol=2e-6)
    assert served["classes"].shape == (2, len(CLASS_NAMES))  # top_k capped at the classes
    metadata = loaded.signatures["metadata"]()
    assert (int(metadata["image_size"]), int(metadata["resize_size"])) == (32, 32)
    assert [s.decode() for s in metadata["class_names"].numpy()] == ["0", "1", "2", "3"]


def test_default_eval_transform_follows_the_family():
    assert kr.applications.eval_transform(tiny_model()) == (32, 32)
    imagenet_style = kr.ResNeXt50(cardinality=2, width=4, input_shape=(64, 64, 3), classes=5)
    assert kr.applications.eval_transform(imagenet_style) == (64, 73)  # 64 * 256 / 224
    assert kr.applications.eval_transform(imagenet_style, image_size=224) == (224, 256)
    with pytest.raises(ValueError, match="include_top"):
        export.export_saved_model(kr.ResNeXt29(depth=11, cardinality=2, width=4,
                                               include_top=False, pooling="avg"), "unused")


def test_predict_command_prints_top_labels(tmp_path):
    model = tiny_model()
    export.export_saved_model(model, str(tmp_path / "models"), class_names=CLASS_NAMES)
    paths = encoded_images(str(tmp_path))
    command = [sys.executable, "-m", "keras_resnext.predict",
               f"--saved_model={tmp_path / 'models'}", *paths]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    images = np.stack([kr.preprocess_for_eval(open(p, "rb").read(), 32, 32).numpy()
                       for p in paths])
    expected = tf.nn.softmax(model(images, training=False)).numpy()
    lines = completed.stdout.splitlines()
    for index, path in enumerate(paths):
        block = lines[lines.index(path) + 1:lines.index(path) + 5]
        best = np.argsort(-expected[index], kind="stable")
        for rank, line in enumerate(block):
            number, name, probability = line.split()
            assert (number, name) == (f"{rank + 1}.", CLASS_NAMES[best[rank]])
            assert float(probability) == pytest.approx(expected[index, best[rank]], abs=1e-4)

    with pytest.raises(predict.PredictError, match="missing.jpg does not exist"):
        predict.predict_files(str(tmp_path / "models" / "1"), [str(tmp_path / "missing.jpg")])
    with pytest.raises(predict.PredictError, match="holds no saved_model.pb"):
        predict.resolve_saved_model(str(tmp_path))


def test_predict_refuses_resize_size_with_crop_pct_naming_the_flags(tmp_path):
    """It said "Give resize_size or crop_pct, not both." after loading the model."""
    with pytest.raises(predict.PredictError, match="^--resize_size and --crop_pct both set"):
        predict.predict_files(str(tmp_path / "not_loaded"), encoded_images(str(tmp_path)),
                              resize_size=256, crop_pct=0.9)
