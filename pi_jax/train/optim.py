"""AdamW with the paper's schedule: linear warm-up from a fraction of the peak, then constant
(or, for pre-training, decayed to a fraction of the peak by the last step)."""

from __future__ import annotations

import optax

from pi_jax.train.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """PI §3.1: warm up linearly over `warmup_steps` from warmup_start_fraction × peak, then hold.

  Step s (0-based) uses peak · (f + (1 - f) · s / W) for s < W and the peak afterwards.
  With lr_decay cosine or linear, steps W..steps-1 go from the peak to final_lr_fraction × peak.
  """
  if config.stages:
    return _staged_schedule(config)
  peak = config.learning_rate
  if config.warmup_steps == 0:
    warmup = optax.constant_schedule(peak)
  else:
    # linear_schedule holds its end value after transition_steps.
    warmup = optax.linear_schedule(init_value=peak * config.warmup_start_fraction,
                                   end_value=peak, transition_steps=config.warmup_steps)
  if config.lr_decay == "constant":
    return warmup
  decay_steps = max(1, config.steps - 1 - config.warmup_steps)
  end = peak * config.final_lr_fraction
  if config.lr_decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.final_lr_fraction)
  else:
    decay = optax.linear_schedule(peak, end, decay_steps)
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


def _staged_schedule(config: TrainConfig) -> optax.Schedule:
  """A staged run's one schedule (train/stages.py): the stages' schedules joined at their first
  global steps, each warming up from warmup_start_fraction x its peak, then holding."""
  schedules, boundaries, start = [], [], 0
  for stage in config.stages:
    peak = config.learning_rate if stage.learning_rate is None else stage.learning_rate
    warmup = config.warmup_steps if stage.warmup_steps is None else stage.warmup_steps
    if warmup == 0:
      schedules.append(optax.constant_schedule(peak))
    else:
      schedules.append(optax.linear_schedule(peak * config.warmup_start_fraction, peak, warmup))
    if start:
      boundaries.append(start)
    start += stage.steps
  return optax.join_schedules(schedules, boundaries)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay)
  if config.grad_clip:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw
