"""TensorFlow-only kernels, the lowest level of keras_resnext.

`tf_ops` holds the TensorFlow functions our layers (`keras_resnext.layers`)
call on the TensorFlow backend: the grouped convolution, the fused batch norm,
the inference fusions, and the AVX2 op's gradient with its registration.
`avx2/` compiles, verifies, caches and loads the AVX2 op's library and knows
nothing else. `images` decodes images and takes the eval view (§4) with
TensorFlow's image ops, for the pipelines and serving. Nothing here imports
Keras layers or anything above it in keras_resnext. `tf_ops` and `avx2`
import TensorFlow inside their functions, so the layers can import them where
TensorFlow isn't installed; `images` imports it at load, and only TensorFlow
code imports it.
"""
