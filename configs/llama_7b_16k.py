"""LLaMA 7B, 2048 -> 16384 by Position Interpolation (lr 2e-5, batch 128, 1000 steps)."""

from pi_jax.train.recipes import extend


def get_config():
  return extend("llama-7b", "7b", 16384, "pi")
