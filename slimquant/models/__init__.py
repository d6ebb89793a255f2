"""Model code (llama, qwen2, qwen3) and the loader that builds it from a checkpoint folder."""
