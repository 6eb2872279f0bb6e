"""The training loop: wiring of model, data, sharded state, jitted step, checkpoints, metrics.

`train(config)` runs (or resumes) a run in config.workdir and returns a summary. The step is
one jitted function with the state donated; gradients are accumulated over micro-batches with
`lax.scan`. A non-finite loss or gradient keeps the previous state (in the same jitted step) and
stops the run with NonFiniteError; SIGTERM or Ctrl-C (SIGINT) saves a checkpoint and returns
cleanly (a second Ctrl-C stops at once). The workdir is locked against a second run; a resume
restores the newest checkpoint that loads and verifies, moving damaged ones aside.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import signal
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from pi_jax import files
from pi_jax import loss as loss_lib
from pi_jax import model as model_lib
from pi_jax import sharding as sharding_lib
from pi_jax.config import ModelConfig
from pi_jax.tokenizer import ByteTokenizer, load_tokenizer
from pi_jax.train import metrics as metrics_lib
from pi_jax.train import episodes, optim, pipeline
from pi_jax.train import resume as resume_lib
from pi_jax.train import state as state_lib
from pi_jax.train.config import TrainConfig


class NonFiniteError(RuntimeError):
  """The loss or the gradient norm was NaN/inf; the run stopped before applying that step."""


@dataclasses.dataclass
class StepInfo:
  """What a callback sees after each completed step."""
  step: int  # 0-based index of the optimizer step just applied
  record: dict
  trainer: "Trainer"


# --- multi-process -----------------------------------------------------------------------------

def _cluster_in_env() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def maybe_initialize_distributed(config: TrainConfig) -> None:
  """jax.distributed.initialize() for multi-process runs; must precede any other jax call.

  Explicit: coordinator/num_processes/process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID). Otherwise JAX's own detection (TPU pod slices, SLURM) when the environment
  says there is a cluster, or always with distributed=on.
  """
  if config.distributed == "off" or jax.distributed.is_initialized():
    return
  env = os.environ
  coordinator = config.coordinator or env.get("JAX_COORDINATOR_ADDRESS")
  num = config.num_processes or (int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None)
  pid = config.process_id if config.process_id is not None else (
      int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None)
  if not (config.distributed == "on" or coordinator or _cluster_in_env()):
    return
  if coordinator and (num is None or pid is None):
    raise ValueError("coordinator is set: also set num_processes and process_id "
                     "(--set num_processes=N --set process_id=I)")
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    # CPU collectives across processes need gloo (harmless when the backend is GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
  else:
    jax.distributed.initialize()


# --- model and tokenizer -----------------------------------------------------------------------

def _runtime_overrides(config: TrainConfig) -> dict:
  names = ("param_dtype", "compute_dtype", "remat", "attention_impl")
  return {n: getattr(config, n) for n in names if getattr(config, n) is not None}


def _model_from_config(config: TrainConfig) -> ModelConfig:
  model = config.model
  if model is None:
    raise ValueError("the run config gives neither init_checkpoint nor model: set one "
                     "(--set init_checkpoint=PATH, or model=PRESET_NAME)")
  if isinstance(model, str):
    try:
      from pi_jax import presets
    except ImportError:
      raise ValueError(f"model preset {model!r}: pi_jax.presets is not available") from None
    model = presets.preset(model)
  return model.replace(**_runtime_overrides(config))


def _final_model_config(config: TrainConfig, model: ModelConfig) -> ModelConfig:
  """Applies rope_scaling / max_position_embeddings and checks seq_len fits the window."""
  if config.rope_scaling is not None:
    model = model.with_rope_scaling(config.rope_scaling)
  if config.max_position_embeddings is not None:
    model = model.replace(max_position_embeddings=config.max_position_embeddings)
  if config.seq_len > model.max_position_embeddings:
    raise ValueError(
        f"seq_len {config.seq_len} exceeds the model's window {model.max_position_embeddings}: "
        f"extend it with PI (--set rope_scaling=linear:{config.seq_len / model.original_window:g}) "
        f"or directly (--set max_position_embeddings={config.seq_len})")
  return model


def _load_model(config: TrainConfig, mesh, fresh: bool) -> tuple[ModelConfig, dict | None]:
  """(model config, init parameters or None): from the init checkpoint (its parameters only for
  a fresh run), else the run config's model (random init later)."""
  if not config.init_checkpoint:
    return _model_from_config(config), None
  overrides = _runtime_overrides(config)
  if fresh:
    model, params = state_lib.load_init_params(config.init_checkpoint, mesh, overrides)
  else:
    model, params = state_lib.load_init_config(config.init_checkpoint, overrides), None
  if config.model is not None:  # the run config names the architecture it expects
    expected = _model_from_config(config)
    if model_lib.param_shapes(expected) != model_lib.param_shapes(model):
      name = repr(config.model) if isinstance(config.model, str) else "the run config's model"
      raise ValueError(
          f"init_checkpoint {config.init_checkpoint} does not have the architecture of "
          f"{name} (parameter shapes differ); fix init_checkpoint, or --set model=null to "
          "take the architecture from the checkpoint")
  return model, params


def tokenizer_and_files(config: TrainConfig, model: ModelConfig):
  """(tokenizer, {file name: source path} to copy into the final checkpoint's tokenizer/)."""
  source = config.tokenizer or config.init_checkpoint
  if source:
    tok = load_tokenizer(source)
    folder = os.path.join(source, "tokenizer")
    if not os.path.isdir(folder):
      folder = source
    files = {}
    for root, _, names in os.walk(folder):
      for name in names:
        src = os.path.join(root, name)
        files[os.path.relpath(src, folder)] = src
  else:
    tok = ByteTokenizer()
    files = {"bytes.json": tok.save(os.path.join(config.workdir, "tokenizer"))}
  if model.vocab_size < tok.vocab_size:
    raise ValueError(f"the tokenizer ({source or 'bytes'}) has {tok.vocab_size} ids, more than "
                     f"the model's vocab_size {model.vocab_size}")
  return tok, files


def _train_data(config: TrainConfig, tokenizer, vocab_size: int):
  """The run config's data, with passkey episodes mixed in when passkey_fraction > 0."""
  data = pipeline.load_train_data(config, tokenizer, vocab_size)
  if config.passkey_fraction > 0:
    data = episodes.PasskeyMixture(data, tokenizer, config.seq_len, config.global_batch,
                                   config.passkey_fraction, config.seed, config.passkey_template)
  return data


# --- the step ----------------------------------------------------------------------------------

def _summed_loss(model: ModelConfig, chunk: int, params, rows_BL1):
  """(sum of next-token NLL, token count) of packed rows [B, L+1]: rows hold tokens and targets."""
  tokens_BL, targets_BL = rows_BL1[:, :-1], rows_BL1[:, 1:]
  mean, count = loss_lib.mean_loss(model, params, tokens_BL, targets_BL,
                                   jnp.ones(tokens_BL.shape, jnp.bool_), chunk=chunk)
  return mean * count, count


def make_train_step(config: TrainConfig, model: ModelConfig, optimizer, shardings, batch_sharding):
  accum = config.accum_steps
  schedule = optim.learning_rate_schedule(config)
  replicated = NamedSharding(batch_sharding.mesh, P())

  summed_loss = functools.partial(_summed_loss, model, config.loss_chunk)
  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

  def step(state, rows_GL1):
    params = state["params"]
    if accum == 1:
      (total, count), grads = grad_fn(params, rows_GL1)
      grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    else:
      g, l1 = rows_GL1.shape
      # Micro-batch a takes rows a, A+a, 2A+a, ...: each device keeps its own rows in every
      # micro-batch, so the split moves no data between devices.
      micro_ABL1 = rows_GL1.reshape(g // accum, accum, l1).swapaxes(0, 1)
      micro_ABL1 = sharding_lib.shard(micro_ABL1, (None, "batch", None))

      def body(carry, rows_BL1):
        total, count, grads = carry
        (t, c), g_ = grad_fn(params, rows_BL1)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g_)
        return (total + t, count + c, grads), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (total, count, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro_ABL1)
    loss = total / count
    grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
           "opt_state": opt_state}
    # A finite loss and gradient can still make a non-finite update (a huge learning rate):
    # such a state is never kept, so never saved as "the last checkpoint".
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    # Keep the old state on a bad step: the state is donated, so this is the only copy left.
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    out = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state["step"]),
           "ok": ok, "tokens": count}
    return new, out

  return jax.jit(step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def make_eval_step(config: TrainConfig, model: ModelConfig, shardings, batch_sharding):
  replicated = NamedSharding(batch_sharding.mesh, P())

  evaluate = functools.partial(_summed_loss, model, config.loss_chunk)
  return jax.jit(evaluate, in_shardings=(shardings["params"], batch_sharding),
                 out_shardings=replicated)


@dataclasses.dataclass
class StepSpecs:
  """Everything the jitted steps are built from, without a single parameter allocated."""
  optimizer: optax.GradientTransformation
  abstract: dict  # ShapeDtypeStructs of the train state
  shardings: dict  # NamedShardings of the train state
  batch_sharding: NamedSharding  # [global_batch, seq_len + 1] rows of the train step
  eval_sharding: NamedSharding  # [micro_batch, seq_len + 1] rows of the eval step

  def abstract_state(self) -> dict:
    """The state's ShapeDtypeStructs carrying their shardings (what `.lower` takes)."""
    return state_lib.with_shardings(self.abstract, self.shardings)


def batch_config_for_mesh(config: TrainConfig, mesh) -> TrainConfig:
  """`config` on `mesh`: micro_batch=-1 resolved to one sequence per batch shard, and an error
  when a micro-batch does not split over the batch shards (data × fsdp)."""
  from pi_jax.evals import runtime
  shards = runtime.batch_shards(mesh)
  config = config.for_batch_shards(shards)
  micro = config.global_batch // config.accum_steps
  if micro % shards:
    raise ValueError(
        f"global_batch {config.global_batch} in {config.accum_steps} micro-batch(es) of {micro} "
        f"cannot be split over the {shards} data shards of mesh {dict(mesh.shape)}: each "
        f"micro-batch must be a multiple of {shards} (otherwise every device would get the "
        "whole batch: no data parallelism), or use a tensor / sequence axis for some chips")
  return config


def step_specs(config: TrainConfig, model: ModelConfig, mesh) -> StepSpecs:
  """Optimizer, abstract state and shardings of a run on `mesh` (real or compile-only devices)."""
  optimizer = optim.make_optimizer(config)
  abstract = state_lib.abstract_state(model, optimizer)
  shardings = state_lib.state_shardings(mesh, model, optimizer, abstract)
  micro = config.global_batch // config.accum_steps
  rows = lambda b: sharding_lib.named_sharding(mesh, ("batch", None), (b, config.seq_len + 1))
  return StepSpecs(optimizer, abstract, shardings, rows(config.global_batch), rows(micro))


def abstract_model_config(config: TrainConfig) -> tuple[ModelConfig, str]:
  """(final model config, where its architecture came from) without reading any parameter.

  The init checkpoint's config.json when it exists, else the run config's `model` (the
  architecture the checkpoint must have): what a compile-only run needs before the weights are
  downloaded or converted.
  """
  from pi_jax import checkpoint as ckpt_lib
  if config.init_checkpoint and ckpt_lib.is_checkpoint(config.init_checkpoint):
    model, source = _load_model(config, None, fresh=False)[0], config.init_checkpoint
  elif config.model is not None:
    model, source = _model_from_config(config), (
        f"preset {config.model}" if isinstance(config.model, str) else "the run config's model")
  else:
    raise ValueError(f"init_checkpoint {config.init_checkpoint!r} is not a pi_jax checkpoint and "
                     "the run config names no model: set model=PRESET for a compile-only run")
  return _final_model_config(config, model), source


def validate_config(config: TrainConfig, need_checkpoint: bool = True) -> ModelConfig | None:
  """The run's final model config, or the error the run would stop with (unknown RoPE kind,
  window too short, missing init_checkpoint); reads no parameter and creates nothing. Without
  need_checkpoint (--print-config before a download), a missing init_checkpoint is checked
  against the run config's model, or not at all when it names none (then None)."""
  from pi_jax import checkpoint as ckpt_lib
  from pi_jax.config import RopeScaling
  if config.init_checkpoint and not ckpt_lib.is_checkpoint(config.init_checkpoint):
    if need_checkpoint:
      state_lib.load_init_config(config.init_checkpoint, {})  # FileNotFoundError naming it
    RopeScaling.parse(config.rope_scaling)
    if config.model is None:
      return None
    return _final_model_config(config, _model_from_config(config))
  return _final_model_config(config, _load_model(config, None, fresh=False)[0])


# --- the run -----------------------------------------------------------------------------------

class WorkdirInUseError(ValueError):
  """Another process holds the workdir's lock."""


class WorkdirLock:
  """An exclusive lock on WORKDIR/.lock (released when the process ends, even by SIGKILL); the
  file holds the holder's PID so a second run can name it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or "unknown"
      self._file.close()
      raise WorkdirInUseError(f"workdir {workdir} is in use by another run (process {holder}, lock "
                         f"{self.path}); wait for it to finish or stop it, or use another "
                         "workdir") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"{os.getpid()}\n")
    self._file.flush()

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def state_bytes_per_device(abstract: dict, shardings: dict) -> int:
  """Bytes of one device's shard of the train state, plus float32 gradients of the parameters."""
  def shard_bytes(a, s):
    return int(np.prod(s.shard_shape(a.shape), dtype=np.int64)) * a.dtype.itemsize
  state = sum(jax.tree.leaves(jax.tree.map(shard_bytes, abstract, shardings)))
  grads = sum(jax.tree.leaves(jax.tree.map(
      lambda a, s: int(np.prod(s.shard_shape(a.shape), dtype=np.int64)) * 4,
      abstract["params"], shardings["params"])))
  return state + grads


def check_state_fits(abstract: dict, shardings: dict) -> None:
  """Refuses, before allocating anything, a train state that cannot fit in device memory."""
  from pi_jax.evals import runtime
  free, name = runtime.free_device_memory()
  need = state_bytes_per_device(abstract, shardings)
  if free is not None and need > runtime.MEMORY_HEADROOM * free:
    raise ValueError(
        f"the train state (parameters, optimizer moments, gradients) needs {need / 2**30:.1f} "
        f"GiB per device before any activation, but {name} has {free / 2**30:.1f} GiB free; "
        "shard it over more devices (--set mesh=fsdp:N), use a smaller model, or "
        "--set param_dtype=bfloat16")

class Trainer:
  """One run: build everything, then `run()`. Use `train(config)` unless you need the parts."""

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
    validate_config(config)  # a config error leaves no WORKDIR behind
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
    config = self.config = batch_config_for_mesh(config, self.mesh)
    self.checkpoints = state_lib.RunCheckpoints(config.workdir, config.keep_checkpoints,
                                                config.async_checkpoints)
    has_checkpoints = bool(self.checkpoints.all_steps())

    # Shapes and memory first: a model that cannot fit fails before anything big is read.
    model, _ = _load_model(config, self.mesh, fresh=False)
    self.model = _final_model_config(config, model)
    if has_checkpoints:  # refuse a mismatch before a checkpoint is read, moved or overwritten
      resume_lib.check_resume(config.workdir, _jsonable(config.to_dict()), self.model.to_dict(),
                              *self.checkpoints.newest_meta(), log=self._log)
    specs = step_specs(config, self.model, self.mesh)
    self.optimizer, abstract, self.shardings = specs.optimizer, specs.abstract, specs.shardings
    check_state_fits(abstract, self.shardings)
    # The init checkpoint's parameters are read only for a fresh run: a resume reads its own.
    init_params = None
    if not has_checkpoints and config.init_checkpoint:
      _, init_params = _load_model(config, self.mesh, fresh=True)
    self.tokenizer, self.tokenizer_files = tokenizer_and_files(config, self.model)
    self.data = data or _train_data(config, self.tokenizer, self.model.vocab_size)
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
      _, init_params = _load_model(config, self.mesh, fresh=True)
      self.state = state_lib.state_from_params(init_params, self.optimizer, self.shardings)
    else:
      self.state = state_lib.init_state(self.model, self.optimizer, self.shardings, config.seed)
    self.step = int(jax.device_get(self.state["step"]))
    self._start_step = self.step

    with jax.set_mesh(self.mesh):
      self.train_step = make_train_step(config, self.model, self.optimizer, self.shardings,
                                        self.batch_sharding)
      self.eval_step = make_eval_step(config, self.model, self.shardings, self.eval_sharding)
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
    shape = (self.config.global_batch, self.config.seq_len + 1)
    return pipeline.global_batch_array(lambda rows: self.data.train_batch(step, rows), shape,
                                       self.batch_sharding)

  def _data_meta(self, step: int) -> dict:
    return {"step": step, "seed": self.config.seed, "global_batch": self.config.global_batch,
            "data": self.config.data,
            "data_fingerprint": self.data.fingerprint(), "model": self.model.to_dict(),
            "data_store": self.data.store_meta() if hasattr(self.data, "store_meta") else None}

  def save(self) -> None:
    if self.checkpoints.latest_step() != self.step:
      self.checkpoints.save(self.step, self.state, self._data_meta(self.step))

  def evaluate(self) -> float:
    """Mean loss over the held-out packed sequences."""
    micro = self.config.global_batch // self.config.accum_steps
    shape = (micro, self.config.seq_len + 1)
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


def train(config: TrainConfig, callbacks: list[Callable[[StepInfo], None]] = ()) -> dict:
  return Trainer(config, callbacks).run()


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)
