"""TensorFlow-only kernels, the lowest level of keras_resnext.

`tf_ops` holds the TensorFlow functions our layers (`keras_resnext.layers`)
call on the TensorFlow backend: the grouped convolution, the fused batch norm,
the inference fusions, and the AVX2 op's gradient with its registration.
`avx2/` compiles, verifies, caches and loads the AVX2 op's library and knows
nothing else. Nothing here imports Keras or anything above it in
keras_resnext, and TensorFlow is imported inside the functions, so importing
the package works where TensorFlow isn't installed.
"""
