"""Llama 2 7B, 4096 -> 32768 by Position Interpolation (the paper's 7B recipe: lr 2e-5, batch 128, 1000 steps)."""

from pi_jax.train.recipes import extend


def get_config():
  return extend("llama2-7b", "7b", 32768, "pi")
