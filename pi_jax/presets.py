"""Named configurations of the real LLaMA-family models (architecture as published).

The windows are the released ones: LLaMA 2048, Llama 2 4096, Llama 3.1 131072 by llama3 RoPE
scaling of an 8192 window, SmolLM2 8192. Extending one by PI is one call:
`preset("llama-7b").with_rope_scaling("linear:4")` is the paper's LLaMA-7B at 8192.
Parameter counts are checked against transformers and the published figures in
tests/test_presets.py.
"""

from __future__ import annotations

from pi_jax.config import ModelConfig, RopeScaling


def _llama1(hidden, mlp, layers, heads):
  return ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=mlp,
                     num_layers=layers, num_heads=heads, max_position_embeddings=2048,
                     rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def _llama2(hidden, mlp, layers, heads, kv_heads=None):
  return ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=mlp,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                     max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                     bos_token_id=1, eos_token_id=2)


# Llama 3.1 ships with llama3 scaling of its 8192 pre-training window to 128K.
_LLAMA31_ROPE = RopeScaling("llama3", factor=8.0, original_max_position_embeddings=8192,
                            low_freq_factor=1.0, high_freq_factor=4.0)


def _llama31(hidden, mlp, layers, heads):
  return ModelConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=mlp,
                     num_layers=layers, num_heads=heads, num_kv_heads=8,
                     max_position_embeddings=131072, rope_theta=500000.0,
                     rope_scaling=_LLAMA31_ROPE, rms_norm_eps=1e-5, bos_token_id=128000,
                     eos_token_id=128001)


def _smollm2(hidden, mlp, layers, heads, kv_heads, theta):
  # SmolLM2 ties its embeddings; token 0 (<|endoftext|>) is both BOS and EOS of the base models.
  return ModelConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=mlp,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                     max_position_embeddings=8192, rope_theta=theta, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


PRESETS: dict[str, ModelConfig] = {
    "llama-7b": _llama1(4096, 11008, 32, 32),
    "llama-13b": _llama1(5120, 13824, 40, 40),
    "llama-33b": _llama1(6656, 17920, 60, 52),
    "llama-65b": _llama1(8192, 22016, 80, 64),
    "llama2-7b": _llama2(4096, 11008, 32, 32),
    "llama2-13b": _llama2(5120, 13824, 40, 40),
    "llama2-70b": _llama2(8192, 28672, 80, 64, kv_heads=8),
    "llama3.1-8b": _llama31(4096, 14336, 32, 32),
    "llama3.1-70b": _llama31(8192, 28672, 80, 64),
    "smollm2-135m": _smollm2(576, 1536, 30, 9, 3, 100000.0),
    "smollm2-360m": _smollm2(960, 2560, 32, 15, 5, 100000.0),
    "smollm2-1.7b": _smollm2(2048, 8192, 24, 32, 32, 130000.0),
}


def preset(name: str, **overrides) -> ModelConfig:
  """The named preset, with run-time or architecture fields replaced by `overrides`."""
  try:
    config = PRESETS[name]
  except KeyError:
    raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
  return config.replace(**overrides) if overrides else config
