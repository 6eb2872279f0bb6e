"""Training: run configs, data pipeline, sharded state, the loop (see train.py)."""

from pi_jax.train.config import TrainConfig, apply_overrides, load_config_file
from pi_jax.train.optim import learning_rate_schedule, make_optimizer
from pi_jax.train.trainer import NonFiniteError, StepInfo, Trainer, train
