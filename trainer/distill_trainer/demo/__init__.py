"""Offline CPU demo: a generated task, a tokenizer and tiny Qwen2 models built from scratch."""
