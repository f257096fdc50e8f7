"""Pure Keras 3: the same model on JAX (and torch where installed), and no TF needed."""

import importlib.util
import json

import numpy as np
import pytest

import keras_resnext as kr

BLOCK_TF_IMPORT = (
    "import sys\n"
    "class _NoTensorFlow:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'tensorflow' or name.startswith('tensorflow.'):\n"
    "            raise ImportError('tensorflow is blocked in this test')\n"
    "sys.meta_path.insert(0, _NoTensorFlow())\n"
)

RUN_SAVED_WEIGHTS = r"""
import numpy as np, keras, keras_resnext as kr
assert keras.backend.backend() == {backend!r}
model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3),
                     block_form={form!r}, weights={weights!r})
x = np.load({inputs!r})
np.save({outputs!r}, keras.ops.convert_to_numpy(model.predict_on_batch(x)))
print("tensorflow loaded:", "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None)
"""


def reference_run(tmp_path):
    model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3))
    x = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype("float32")
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, np.array([0, 1, 2]))  # moving statistics away from 0/1
    weights = str(tmp_path / "m.weights.h5")
    model.save_weights(weights)
    inputs = str(tmp_path / "x.npy")
    np.save(inputs, x)
    return weights, inputs, model.predict_on_batch(x)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backend_matches_tensorflow(python_subprocess, tmp_path, backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (CI tests TensorFlow and JAX)")
    weights, inputs, expected = reference_run(tmp_path)
    outputs = str(tmp_path / "y.npy")
    code = "import sys\n" + RUN_SAVED_WEIGHTS.format(
        backend=backend, form="c", weights=weights, inputs=inputs, outputs=outputs)
    result = python_subprocess(code, env={"KERAS_BACKEND": backend})
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(outputs), expected, rtol=1e-4, atol=1e-5)


NO_TENSORFLOW_EXTRAS = r"""
import json
try:
    import tensorflow
except ImportError:
    print("blocked ok")
scores = np.zeros((2, 1000), "float32")
scores[0, [1, 999, 3, 5]] = [0.5, 0.25, 0.125, 0.125]
scores[1] = -1.0
scores[1, 0] = 2.0
results = {{"flops": {{}}, "decoded": kr.decode_predictions(keras.ops.convert_to_tensor(scores),
                                                         top=4)}}
for form in "ab":
    other = kr.reformulate(model, form)
    np.save({folder!r} + f"/y_{{form}}.npy", keras.ops.convert_to_numpy(other.predict_on_batch(x)))
    results["flops"][form] = kr.count_flops(other)
with open({folder!r} + "/results.json", "w") as f:
    json.dump(results, f)
"""


@pytest.mark.slow
def test_imports_and_runs_without_tensorflow(python_subprocess, tmp_path):
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    weights, inputs, expected = reference_run(tmp_path)
    outputs = str(tmp_path / "y.npy")
    code = BLOCK_TF_IMPORT + RUN_SAVED_WEIGHTS.format(
        backend="jax", form="c", weights=weights, inputs=inputs, outputs=outputs)
    code += NO_TENSORFLOW_EXTRAS.format(folder=str(tmp_path))
    result = python_subprocess(code, env={"KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorflow loaded: False" in result.stdout
    assert "blocked ok" in result.stdout
    np.testing.assert_allclose(np.load(outputs), expected, rtol=1e-4, atol=1e-5)
    for form in "ab":  # Fig. 3's forms agree on JAX too
        np.testing.assert_allclose(np.load(str(tmp_path / f"y_{form}.npy")), expected,
                                   rtol=1e-4, atol=1e-5)
    results = json.loads((tmp_path / "results.json").read_text())
    # Fig. 3's forms have one complexity, and JAX counts it as TensorFlow does
    # (test_complexity checks that count against hand-counted multiply-adds).
    tiny = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3))
    flops = kr.count_flops(tiny)
    assert results["flops"] == {"a": flops, "b": flops}
    # ImageNet label order; highest score first, ties in label order.
    assert results["decoded"] == [
        [["n01443537", "goldfish", 0.5], ["n15075141", "toilet tissue", 0.25],
         ["n01491361", "tiger shark", 0.125], ["n01496331", "electric ray", 0.125]],
        [["n01440764", "tench", 2.0], ["n01443537", "goldfish", -1.0],
         ["n01484850", "great white shark", -1.0], ["n01491361", "tiger shark", -1.0]],
    ]
