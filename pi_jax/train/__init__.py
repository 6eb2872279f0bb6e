"""Training: run configs, data pipeline, sharded state, the loop (see train.py)."""

from typing import Callable

from pi_jax.train import stages
from pi_jax.train.config import TrainConfig, apply_overrides, load_config_file
from pi_jax.train.optim import learning_rate_schedule, make_optimizer
from pi_jax.train.trainer import NonFiniteError, StepInfo, Trainer


def train(config: TrainConfig, callbacks: list[Callable[[StepInfo], None]] = ()) -> dict:
  """Runs (or resumes) `config` and returns the summary; a config with stages runs them in turn
  in one workdir (train/stages.py)."""
  if config.stages:
    return stages.train_stages(config, callbacks)
  return Trainer(config, callbacks).run()
