"""Torch building blocks of the models: linear + quant methods, attention over a paged KV cache, norms, rope."""
