"""AdamW with the paper's schedule: linear warm-up from a fraction of the peak, then constant."""

from __future__ import annotations

import optax

from pi_jax.train.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """PI §3.1: warm up linearly over `warmup_steps` from warmup_start_fraction × peak, then hold.

  Step s (0-based) uses peak · (f + (1 - f) · s / W) for s < W and the peak afterwards.
  """
  peak = config.learning_rate
  if config.warmup_steps == 0:
    return optax.constant_schedule(peak)
  # linear_schedule holds its end value after transition_steps.
  return optax.linear_schedule(init_value=peak * config.warmup_start_fraction, end_value=peak,
                               transition_steps=config.warmup_steps)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay)
  if config.grad_clip:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw
