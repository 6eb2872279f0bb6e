"""LLaMA 65B, 2048 -> 8192 by Position Interpolation (lr 1e-5, batch 128, 1000 steps)."""

from pi_jax.train.recipes import extend


def get_config():
  return extend("llama-65b", "65b", 8192, "pi")
