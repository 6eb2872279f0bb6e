"""The training loop: wiring of model, data, sharded state, jitted step, checkpoints, metrics.

`Trainer(config).run()` runs (or resumes) a run in config.workdir and returns a summary
(`pi_jax.train.train` also runs a staged config, train/stages.py). The step is
one jitted function with the state donated; gradients are accumulated over micro-batches with
`lax.scan`. A non-finite loss or gradient keeps the previous state (in the same jitted step) and
stops the run with NonFiniteError; SIGTERM or Ctrl-C (SIGINT) saves a checkpoint and returns
cleanly (a second Ctrl-C stops at once). The workdir is locked against a second run; a resume
restores the newest checkpoint that loads and verifies, moving damaged ones aside.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Callable

import jax
import numpy as np

from pi_jax import dispatch, files, memory
from pi_jax import sharding as sharding_lib
from pi_jax.train import metrics as metrics_lib
from pi_jax.train import pipeline, setup
from pi_jax.train import resume as resume_lib
from pi_jax.train import state as state_lib
from pi_jax.train import step as step_lib
from pi_jax.train.config import TrainConfig
from pi_jax.train.distributed import maybe_initialize_distributed
from pi_jax.train.workdir import WorkdirLock


class NonFiniteError(RuntimeError):
  """The loss or the gradient norm was NaN/inf; the run stopped before applying that step."""


@dataclasses.dataclass
class StepInfo:
  """What a callback sees after each completed step."""
  step: int  # 0-based index of the optimizer step just applied
  record: dict
  trainer: "Trainer"


class Trainer:
  """One run: build everything, then `run()`. Use `pi_jax.train.train(config)` unless you need the parts."""

  write_final = True  # WORKDIR/final at the end (a staged run's earlier stages do not)

  def __init__(self, config: TrainConfig, callbacks: list[Callable[[StepInfo], None]] = (),
               data: pipeline.TrainData | None = None):
    """Builds the run; `data` replaces the run config's data spec (see pipeline.TrainData)."""
    maybe_initialize_distributed(config)
    self.config = config
    self.callbacks = list(callbacks)
    self.is_main = jax.process_index() == 0
    self._stop_requested = None  # the signal name once one asks to stop
    self._lock = self.checkpoints = self.writer = None
    if config.init_checkpoint:  # the run writes WORKDIR/final: never over its own input
      files.check_separate(config.workdir, [config.init_checkpoint], "workdir")
    setup.validate_config(config)  # a config error leaves no WORKDIR behind
    resume_lib.check_workdir(config.workdir)
    os.makedirs(config.workdir, exist_ok=True)
    if self.is_main:
      self._lock = WorkdirLock(config.workdir)
    try:
      self._build(config, data)
    except BaseException:
      self.close()  # orbax's threads, the lock, the metrics file: on every exit path
      raise

  def _build(self, config: TrainConfig, data) -> None:
    self.mesh = sharding_lib.make_mesh(config.mesh)
    config = self.config = step_lib.batch_config_for_mesh(config, self.mesh)
    self.checkpoints = state_lib.RunCheckpoints(config.workdir, config.keep_checkpoints,
                                                config.async_checkpoints)
    has_checkpoints = bool(self.checkpoints.all_steps())

    # Shapes and memory first: a model that cannot fit fails before anything big is read.
    model, _ = setup.load_model(config, self.mesh, fresh=False)
    self.model = setup.final_model_config(config, model)
    self.param_dtype = setup.param_dtype(config)
    if has_checkpoints:  # refuse a mismatch before a checkpoint is read, moved or overwritten
      newest_step, newest_meta = self.checkpoints.newest_meta()
      saved_config, saved_model = self._saved_setting(model, newest_step, newest_meta)
      resume_lib.check_resume(config.workdir, _jsonable(saved_config.to_dict()),
                              saved_model.to_dict(), newest_step, newest_meta,
                              param_dtype=self.param_dtype, log=self._log)
    with jax.set_mesh(self.mesh):
      self.kernels = dispatch.choose(config.run)  # what the traced steps will use
    specs = step_lib.step_specs(config, self.model, self.mesh, self.param_dtype)
    self.optimizer, abstract, self.shardings = specs.optimizer, specs.abstract, specs.shardings
    memory.check_state_fits(abstract, self.shardings)
    # The init checkpoint's parameters are read only for a fresh run: a resume reads its own.
    init_params = None
    if not has_checkpoints and config.init_checkpoint:
      _, init_params = setup.load_model(config, self.mesh, fresh=True)
    self.tokenizer, self.tokenizer_files = setup.tokenizer_and_files(config, self.model)
    self.data = data or setup.train_data(config, self.tokenizer, self.model.vocab_size)
    self.batch_sharding, self.eval_sharding = specs.batch_sharding, specs.eval_sharding
    micro = config.global_batch // config.accum_steps
    if config.eval_every and self.data.num_eval < micro:
      raise ValueError(f"eval_sequences {config.eval_sequences} is less than one micro-batch "
                       f"({micro} sequences)")
    self.resumed_from = None
    self.resume_message = None
    restored = None
    if has_checkpoints:
      step, restored, _ = self.checkpoints.restore_newest_good(
          state_lib.with_shardings(abstract, self.shardings), check=self._check_meta,
          log=self._log)
      if step is not None:
        self.resumed_from = step
        self.resume_message = (f"resuming from step {step} (checkpoint "
                               f"{self.checkpoints.path(step)})")
    if restored is not None:
      self.state = restored
    elif init_params is not None:
      self.state = state_lib.state_from_params(init_params, self.optimizer, self.shardings)
    elif config.init_checkpoint:  # every checkpoint was damaged: start again from the init
      _, init_params = setup.load_model(config, self.mesh, fresh=True)
      self.state = state_lib.state_from_params(init_params, self.optimizer, self.shardings)
    else:
      self.state = state_lib.init_state(self.model, self.optimizer, self.shardings, config.seed,
                                        self.param_dtype)
    self.step = int(jax.device_get(self.state["step"]))
    self._start_step = self.step

    with jax.set_mesh(self.mesh):
      self.train_step = step_lib.make_train_step(config, self.model, self.optimizer,
                                                 self.shardings, self.batch_sharding)
      self.eval_step = step_lib.make_eval_step(config, self.model, self.shardings,
                                               self.eval_sharding)
    self.flops_per_token = metrics_lib.flops_per_token(self.model, config.seq_len)
    self.peak_flops = metrics_lib.peak_flops_per_device(jax.devices()[0], config.peak_tflops)
    # Every step appears once: records after the restored step (the run went on past its last
    # checkpoint before it stopped) are dropped, from metrics.jsonl and from TensorBoard.
    self.writer = metrics_lib.MetricsWriter(config.workdir, config.tensorboard, self.is_main,
                                            resume_step=self.step)
    if self.is_main:
      files.write_json(os.path.join(config.workdir, "run_config.json"),
                       _jsonable(config.to_dict()), sort_keys=True)

  def _log(self, message: str) -> None:
    if self.is_main:
      print(f"pi_jax.train: {message}", file=sys.stderr, flush=True)

  def close(self) -> None:
    """Releases what the run holds (checkpoint manager, metrics files, workdir lock)."""
    try:
      if self.checkpoints is not None:
        self.checkpoints.close()
    finally:
      if self.writer is not None:
        self.writer.close()
      if self._lock is not None:
        self._lock.release()
        self._lock = None

  def _saved_setting(self, base_model, step, meta):
    """The run config and final model config that checkpoint `step` (its data item `meta`) must
    have been saved under for this run to resume it: this run's own (a staged run's stage
    boundary: the previous stage's)."""
    del base_model, step, meta
    return self.config, self.model

  def _check_meta(self, step: int, meta: dict) -> None:
    """Checkpoint `step` was trained on this data and sampler, or resuming would be wrong."""
    config = self.config
    if meta.get("data_fingerprint") != self.data.fingerprint():
      raise ValueError(pipeline.resume_mismatch(f"{config.workdir}: checkpoint {step}", meta,
                                                self.data))
    for key in ("seed", "global_batch"):  # the sampler's position depends on both
      if key in meta and meta[key] != getattr(config, key):
        raise ValueError(f"{config.workdir}: checkpoint {step} was trained with {key}="
                         f"{meta[key]}, this run has {getattr(config, key)}; resuming would "
                         "repeat or skip batches (use a new workdir)")

  # -- pieces --

  def _batch(self, step: int) -> jax.Array:
    shape = (self.config.global_batch, *step_lib.row_shape(self.config))
    return pipeline.global_batch_array(lambda rows: self.data.train_batch(step, rows), shape,
                                       self.batch_sharding)

  def _data_meta(self, step: int) -> dict:
    return {"step": step, "seed": self.config.seed, "global_batch": self.config.global_batch,
            "data": self.config.data,
            "data_fingerprint": self.data.fingerprint(), "model": self.model.to_dict(),
            "param_dtype": self.param_dtype,
            "data_store": self.data.store_meta() if hasattr(self.data, "store_meta") else None}

  def save(self) -> None:
    if self.checkpoints.latest_step() != self.step:
      self.checkpoints.save(self.step, self.state, self._data_meta(self.step))

  def evaluate(self) -> float:
    """Mean loss over the held-out packed sequences."""
    micro = self.config.global_batch // self.config.accum_steps
    shape = (micro, *step_lib.row_shape(self.config))
    total = count = 0.0
    for i in range(self.data.num_eval // micro):
      rows = pipeline.global_batch_array(lambda r: self.data.eval_batch(i, micro, r), shape,
                                         self.eval_sharding)
      with jax.set_mesh(self.mesh):
        t, c = jax.device_get(self.eval_step(self.state["params"], rows))
      total, count = total + float(t), count + float(c)
    return total / count

  def _stop_now(self) -> bool:
    flag = bool(self._stop_requested)
    if jax.process_count() > 1:  # every process must stop at the same step
      from jax.experimental import multihost_utils
      flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag

  def _on_signal(self, signum, frame):
    if signum == signal.SIGINT and self._stop_requested:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
    self._stop_requested = signal.Signals(signum).name
    if signum == signal.SIGINT:
      self._log("Ctrl-C: saving a checkpoint at the end of this step (press again to stop "
                "without saving)")

  # -- the loop --

  def run(self) -> dict:
    """Trains to config.steps (or until SIGTERM / Ctrl-C); returns a summary dict."""
    c = self.config
    previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    n_devices = jax.device_count()
    status = "finished"
    try:
      if c.eval_every and self.step == 0:  # the starting point (Table 3's step 0)
        self.writer.write({"after_steps": 0, "eval_loss": self.evaluate()})
      batch = self._batch(self.step) if self.step < c.steps else None
      while self.step < c.steps:
        if self._stop_now():
          status = "preempted"
          self.save()
          break
        step = self.step
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
          self.state, out = self.train_step(self.state, batch)
        if step + 1 < c.steps:  # the next batch is built while the device works
          batch = self._batch(step + 1)
        out = jax.device_get(out)
        seconds = time.perf_counter() - t0
        if not bool(out["ok"]):
          raise NonFiniteError(
              f"non-finite {_what_failed(out)} at step "
              f"{step} (loss {float(out['loss'])}, grad_norm {float(out['grad_norm'])}); the step "
              f"was not applied and nothing was saved after it; "
              + (f"the last checkpoint is step {self.checkpoints.latest_step()} in "
                 f"{c.workdir}/checkpoints" if self.checkpoints.latest_step() is not None
                 else "no checkpoint was saved before it"))
        self.step = step + 1
        tokens_per_second = float(out["tokens"]) / seconds
        mfu = None
        if self.peak_flops:
          mfu = tokens_per_second * self.flops_per_token / (self.peak_flops * n_devices)
        record = {"step": step, "loss": float(out["loss"]),
                  "learning_rate": float(out["learning_rate"]),
                  "grad_norm": float(out["grad_norm"]), "tokens_per_second": tokens_per_second,
                  "mfu": mfu, "step_seconds": seconds}
        self.writer.write(record, tensorboard=(step % c.log_every == 0))
        if c.eval_every and self.step % c.eval_every == 0:
          record["eval_loss"] = self.evaluate()
          self.writer.write({"after_steps": self.step, "eval_loss": record["eval_loss"]})
        if self.step % c.checkpoint_every == 0 or self.step == c.steps:
          self.save()
        for callback in self.callbacks:
          callback(StepInfo(step, record, self))
      if status == "finished":
        self.checkpoints.wait()
      if status == "finished" and self.write_final:
        final = os.path.join(c.workdir, "final")
        # Rewritten when this invocation trained (a longer rerun), else only if missing.
        if self.step != self._start_step or not os.path.isfile(os.path.join(final, "config.json")):
          state_lib.save_final(final, self.model, self.state["params"], self.tokenizer_files)
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
      self.close()
    return {"status": status, "step": self.step, "workdir": c.workdir,
            "resumed_from": self.resumed_from, "signal": self._stop_requested,
            "final": os.path.join(c.workdir, "final") if status == "finished" else None}


def _what_failed(out) -> str:
  if not np.isfinite(out["loss"]):
    return "loss"
  return "gradient" if not np.isfinite(out["grad_norm"]) else "parameter update"


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)
