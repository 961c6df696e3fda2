"""Qwen2.5-VL in Flax NNX (see model.py for the call and decoding API)."""
