"""Training memory is linear in the sequence length (compiled memory analysis, no execution)."""

import jax
import jax.numpy as jnp
import pytest

from pi_jax import loss as loss_lib
from pi_jax import model as model_lib
from pi_jax.config import ModelConfig

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=4096,
                  attention_block_size=64)


def train_step_temp_bytes(config: ModelConfig, length: int) -> int:
  """Temporary bytes of a compiled loss + gradient step over one window of `length` tokens."""
  params = model_lib.abstract_params(config)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def step(params, tokens):
    mask = jnp.ones_like(tokens)
    return jax.value_and_grad(
        lambda p: loss_lib.mean_loss(config, p, tokens, tokens, mask, chunk=256)[0])(params)
  return jax.jit(step).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_training_memory_grows_linearly():
  short, long = train_step_temp_bytes(CFG, 256), train_step_temp_bytes(CFG, 2048)
  assert long / short < 16, (short, long)


def test_reference_attention_memory_grows_quadratically():
  """The same measurement tells the difference: dense attention's L×L scores make it blow up."""
  config = CFG.replace(attention_impl="reference")
  short, long = train_step_temp_bytes(config, 256), train_step_temp_bytes(config, 2048)
  assert long / short > 16, (short, long)
