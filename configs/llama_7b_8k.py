"""LLaMA 7B, 2048 -> 8192 by Position Interpolation (paper §3.1: lr 2e-5, batch 64, 1000 steps)."""

from pi_jax.train.recipes import extend


def get_config():
  return extend("llama-7b", "7b", 8192, "pi")
