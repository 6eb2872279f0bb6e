"""pi_jax: extend the context window of LLaMA-family models by Position Interpolation, in JAX."""

from pi_jax.checkpoint import load_checkpoint, save_checkpoint
from pi_jax.config import ModelConfig, RopeScaling
from pi_jax.generate import generate
from pi_jax.model import (DecoderLayer, Llama, abstract_params, count_params, forward,
                          hidden_states, init_cache, init_params, logits_from_hidden, param_axes,
                          param_shapes, positions_from_segments)
from pi_jax.presets import PRESETS, preset
from pi_jax.rope import apply_rope, inv_freq_and_factor, rope_tables
from pi_jax.tokenizer import ByteTokenizer, load_tokenizer

__version__ = "0.1.0"
