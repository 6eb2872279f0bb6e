"""Staged lengths: one run config, several windows in turn (e.g. 2K -> 8K -> 32K), one workdir.

Stage k trains global steps [start_k, end_k) with its own window, RoPE scaling, batch and
learning rate; the parameters and the optimizer state carry over (their shapes do not depend on
the window). One optimizer serves the whole run: its schedule (train/optim.py) is the stages' schedules joined at
their first steps (each warms up from warmup_start_fraction × its peak over its warmup_steps,
then holds), so a checkpoint's optimizer state means the same whichever stage restores it.

Each stage is an ordinary Trainer over the stage's config (`stage_config`: steps = end_k), so
checkpoints, metrics and signals work as in one run. A stage always saves at its last step: a
rerun finds that checkpoint and starts the next stage from it (its data, built for the previous
window, are not compared with the new stage's). Resuming at any step, a stage boundary included,
therefore gives the losses of an uninterrupted run. Sampling stays a function of (seed, global
step).

Checked at start, before anything is compiled or read (`check`): windows never shrink, a stage's
scaling factor matches its window (factor × the trained window = seq_len), the batch splits.
"""

from __future__ import annotations

import dataclasses

from pi_jax.train import setup
from pi_jax.train import step as step_lib
from pi_jax.train import trainer as trainer_lib
from pi_jax.train.config import Stage, TrainConfig


@dataclasses.dataclass(frozen=True)
class PlannedStage:
  index: int
  start: int  # first global step
  end: int  # one past the last
  config: TrainConfig  # the run config of this stage (steps = end)


def stage_config(config: TrainConfig, stage: Stage, end: int) -> TrainConfig:
  """The run config that trains `stage` up to global step `end`."""
  changes = {"seq_len": stage.seq_len, "steps": end}
  if stage.rope_scaling is not None:
    changes["rope_scaling"] = stage.rope_scaling
  if stage.global_batch is not None:
    changes["global_batch"] = stage.global_batch
  if stage.learning_rate is not None:
    changes["learning_rate"] = stage.learning_rate
  return config.replace(**changes)


def plan(config: TrainConfig) -> list[PlannedStage]:
  out, start = [], 0
  for i, stage in enumerate(config.stages):
    out.append(PlannedStage(i, start, start + stage.steps,
                            stage_config(config, stage, start + stage.steps)))
    start += stage.steps
  return out


def total_steps(config: TrainConfig) -> int:
  return sum(s.steps for s in config.stages)


def check(config: TrainConfig, base_model=None) -> list[PlannedStage]:
  """The plan, or a ValueError naming the first stage that cannot run (module docstring).
  base_model: the model config before any stage's scaling (default: the run config's)."""
  if not config.stages:
    raise ValueError("the run config has no stages")
  if config.lr_decay != "constant":
    raise ValueError("stages set their learning rates themselves: lr_decay must be constant")
  if base_model is None:
    base_model, _ = setup.abstract_model_config(
        config.replace(rope_scaling=None, max_position_embeddings=None, seq_len=1))
  trained = base_model.original_window
  stages = plan(config)
  previous = None
  for p in stages:
    name = f"stage {p.index + 1} (seq_len {p.config.seq_len})"
    if previous is not None and p.config.seq_len < previous:
      raise ValueError(f"{name}: the window shrinks from {previous}; stages go from short to "
                       "long windows")
    previous = p.config.seq_len
    try:
      model = setup.final_model_config(p.config, base_model)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None
    factor = model.rope_scaling.factor if model.rope_scaling.kind != "none" else 1.0
    if factor > 1 and round(factor * trained) != p.config.seq_len:
      raise ValueError(f"{name}: rope_scaling {p.config.rope_scaling} makes a window of "
                       f"{factor * trained:g} ({factor:g} x the trained {trained}), not the "
                       f"stage's {p.config.seq_len}: use "
                       f"{model.rope_scaling.kind}:{p.config.seq_len / trained:g}")
    if p.config.accum_steps and p.config.global_batch % p.config.accum_steps:
      raise ValueError(f"{name}: global_batch {p.config.global_batch} does not split into "
                       f"{p.config.accum_steps} micro-batches")
  return stages


def _latest_step(workdir: str) -> int:
  from pi_jax.train import state as state_lib
  checkpoints = state_lib.RunCheckpoints(workdir, keep=1, async_save=False)
  try:
    return checkpoints.latest_step() or 0
  finally:
    checkpoints.close()


def stage_of(stages: list[PlannedStage], step: int) -> int:
  """Index of the stage that trains global step `step` (the last one once all are done)."""
  for p in stages:
    if step < p.end:
      return p.index
  return stages[-1].index


def make_trainer(p: PlannedStage, previous: PlannedStage | None, last: bool, callbacks=()):
  """A Trainer for stage `p` that starts from the previous stage's last checkpoint."""

  class StageTrainer(trainer_lib.Trainer):
    write_final = last

    def _saved_setting(self, base_model, step, meta):
      if previous is not None and step == p.start and (meta or {}).get("stage") == p.index - 1:
        # the previous stage's last step: saved under that stage's window and scaling
        return (step_lib.batch_config_for_mesh(previous.config, self.mesh),
                setup.final_model_config(previous.config, base_model))
      return super()._saved_setting(base_model, step, meta)

    def _check_meta(self, step, meta):
      if step == p.start and meta.get("stage") == p.index - 1:
        return  # the previous stage's last step: its data were built for its own window
      super()._check_meta(step, meta)

    def _data_meta(self, step):
      return dict(super()._data_meta(step), stage=p.index)

  return StageTrainer(p.config, list(callbacks))


def train_stages(config: TrainConfig, callbacks=(), log=print) -> dict:
  """Runs (or resumes) every stage in turn; the summary of the last Trainer that ran."""
  stages = check(config)
  k = stage_of(stages, _latest_step(config.workdir))
  summary = None
  while k < len(stages):
    p = stages[k]
    trainer = make_trainer(p, stages[k - 1] if k else None, last=k == len(stages) - 1,
                           callbacks=callbacks)
    if trainer.step < p.start:  # the newest checkpoint was damaged: resume where one loaded
      trainer.close()
      k = stage_of(stages, trainer.step)
      continue
    log(f"stage {k + 1}/{len(stages)}: steps {p.start}..{p.end - 1}, seq_len "
        f"{p.config.seq_len}, rope_scaling {trainer.model.rope_scaling.kind}:"
        f"{trainer.model.rope_scaling.factor:g}, global_batch {p.config.global_batch}"
        + (f" ({trainer.resume_message})" if trainer.resume_message else ""))
    summary = trainer.run()
    if summary["status"] != "finished":
      return summary
    k += 1
  return summary
