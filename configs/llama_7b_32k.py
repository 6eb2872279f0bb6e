"""LLaMA 7B, 2048 -> 32768 by Position Interpolation (lr 2e-5, batch 128, 1000 steps)."""

from pi_jax.train.recipes import extend


def get_config():
  return extend("llama-7b", "7b", 32768, "pi")
