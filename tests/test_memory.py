"""Training memory is linear in the sequence length (compiled memory analysis, no execution)."""

import jax
import jax.numpy as jnp
import pytest

from pi_jax import loss as loss_lib
from pi_jax import model as model_lib
from pi_jax.config import ModelConfig
from pi_jax.run import RunOptions

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=4096)


def train_step_temp_bytes(config: ModelConfig, length: int,
                          run: RunOptions = RunOptions(attention_impl="xla_blockwise",
                                                       attention_block_size=64)) -> int:
  """Temporary bytes of a compiled loss + gradient step over one window of `length` tokens."""
  params = model_lib.abstract_params(config)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def step(params, tokens):
    mask = jnp.ones_like(tokens)
    return jax.value_and_grad(
        lambda p: loss_lib.mean_loss(config, p, tokens, tokens, mask, chunk=256,
                                     run=run)[0])(params)
  return jax.jit(step).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_training_memory_grows_linearly():
  short, long = train_step_temp_bytes(CFG, 256), train_step_temp_bytes(CFG, 2048)
  assert long / short < 16, (short, long)


def test_reference_attention_memory_grows_quadratically():
  """The same measurement tells the difference: dense attention's L×L scores make it blow up."""
  run = RunOptions(attention_impl="reference")
  short, long = train_step_temp_bytes(CFG, 256, run), train_step_temp_bytes(CFG, 2048, run)
  assert long / short > 16, (short, long)
