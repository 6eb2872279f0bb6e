"""Rotary position embedding with every scaling method behind one call.

Position Interpolation (Chen et al. 2023, §2.3) computes RoPE of position m at m·L/L'. Dividing
every inverse frequency by s = L'/L is the same rotation, so PI is the `linear` table below;
NTK, dynamic NTK, YaRN, llama3 and LongRoPE are other tables (and an attention factor that
scales cos/sin). Angles are always float32: at 32K positions a bf16 angle is off by whole
radians.

Layout: HF's half-split rotation ("rotate_half"), so converters only transpose and reshape.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pi_jax.config import ModelConfig, RopeScaling


def _base_exponents(head_dim: int) -> np.ndarray:
  return np.arange(0, head_dim, 2, dtype=np.float32) / head_dim


def _yarn_attention_factor(s: RopeScaling) -> float:
  if s.attention_factor is not None:
    return float(s.attention_factor)

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if s.mscale and s.mscale_all_dim:
    return float(mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim))
  return mscale(s.factor)


def _yarn_inv_freq(theta: float, head_dim: int, s: RopeScaling) -> np.ndarray:
  """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp between."""
  pos_freqs = theta ** _base_exponents(head_dim)
  extrapolated = 1.0 / pos_freqs
  interpolated = 1.0 / (s.factor * pos_freqs)

  def correction_dim(rotations):
    return (head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta)))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # the ramp needs a non-empty interval
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = 1.0 - ramp  # 1 where the dimension is extrapolated (high frequency)
  return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)


def _llama3_inv_freq(theta: float, head_dim: int, s: RopeScaling) -> np.ndarray:
  """Llama 3.1: divide long wavelengths by the factor, keep short ones, smooth between."""
  inv_freq = (1.0 / theta ** _base_exponents(head_dim)).astype(np.float32)
  old = s.original_max_position_embeddings
  low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq_and_factor(config: ModelConfig, seq_len=None):
  """The inverse frequencies [H/2] (float32) and attention factor for `config`'s scaling.

  seq_len (the largest position + 1) matters only for dynamic NTK and LongRoPE; it may be a
  traced scalar. Without it they use their short-sequence table.
  """
  s, theta, dim = config.rope_scaling, config.rope_theta, config.head_dim
  exps = _base_exponents(dim)
  if s.kind == "none":
    return (1.0 / theta ** exps).astype(np.float32), 1.0
  if s.kind == "linear":  # PI: positions × 1/s  ≡  frequencies × 1/s
    return (1.0 / theta ** exps / s.factor).astype(np.float32), 1.0
  if s.kind == "ntk":  # fixed NTK-aware base change (bloc97): θ' = θ·s^(d/(d-2))
    base = theta * s.factor ** (dim / (dim - 2))
    return (1.0 / base ** exps).astype(np.float32), 1.0
  if s.kind == "dynamic":
    original = config.original_window
    if seq_len is None:
      return (1.0 / theta ** exps).astype(np.float32), 1.0
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(original))
    base = theta * (s.factor * length / original - (s.factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base ** jnp.asarray(exps), 1.0
  if s.kind == "yarn":
    return _yarn_inv_freq(theta, dim, s), _yarn_attention_factor(s)
  if s.kind == "llama3":
    return _llama3_inv_freq(theta, dim, s), 1.0
  if s.kind == "longrope":
    original = s.original_max_position_embeddings
    factor = s.factor if s.factor else config.max_position_embeddings / original
    attn = s.attention_factor
    if attn is None:
      attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = (1.0 / (np.asarray(s.short_factor, np.float32) * theta ** exps)).astype(np.float32)
    long = (1.0 / (np.asarray(s.long_factor, np.float32) * theta ** exps)).astype(np.float32)
    if seq_len is None:
      return short, attn
    return jnp.where(jnp.asarray(seq_len) > original, long, short), attn
  raise ValueError(f"unknown RoPE scaling kind {s.kind!r}")


def rope_tables(config: ModelConfig, positions_BL: jax.Array):
  """cos and sin [B, L, H/2] in float32 (attention factor folded in) for these positions."""
  seq_len = None
  if config.rope_scaling.depends_on_length:
    seq_len = jnp.max(positions_BL) + 1  # as transformers: the largest position seen
  inv_freq, attn_factor = inv_freq_and_factor(config, seq_len)
  angles_BLh = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  return jnp.cos(angles_BLh) * attn_factor, jnp.sin(angles_BLh) * attn_factor


def apply_rope(x_BLNH: jax.Array, cos_BLh: jax.Array, sin_BLh: jax.Array) -> jax.Array:
  """Rotates the half-split pairs (x[i], x[i + H/2]) by the tabled angles; computes in float32."""
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos_BLh[:, :, None, :], sin_BLh[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLNH.dtype)
