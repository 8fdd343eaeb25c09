"""The tiny models the tests build (``conftest.tiny_dir``): the model families they come in."""

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
