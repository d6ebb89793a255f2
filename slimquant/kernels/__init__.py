"""The kernels themselves: native CPU kernels (csrc/, loaded by native.py), Triton kernels for CUDA (cuda_int8.py,
cuda_layers.py), exact int8 products in torch (int_mm.py). slimquant/backends composes them into ops."""
