"""Model code (Llama, Qwen2, Qwen3, Qwen3-MoE, DeepSeek V2 / V3) and the loader that builds it from a folder."""
