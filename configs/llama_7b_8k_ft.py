"""LLaMA 7B, 2048 -> 8192 by direct fine-tuning, the paper's FT baseline (no interpolation, 10000 steps)."""

from pi_jax.train.recipes import extend


def get_config():
  return extend("llama-7b", "7b", 8192, "ft")
