"""TensorFlow-only code under the backend-neutral modules: kernels and image ops."""
