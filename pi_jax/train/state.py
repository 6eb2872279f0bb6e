"""Train state (step, params, optimizer state) created and restored straight into its shardings.

Shapes come first (jax.eval_shape), then shardings from the logical axis table (optimizer
moments follow their parameter's sharding; scalars are replicated), then a jitted init with
out_shardings, so no full copy of a large model ever exists on one device or host.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import types

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from pi_jax import checkpoint as ckpt_lib
from pi_jax import files
from pi_jax import model as model_lib
from pi_jax import sharding as sharding_lib
from pi_jax.config import ModelConfig


def param_shardings(mesh, config: ModelConfig):
  return sharding_lib.tree_shardings(mesh, model_lib.param_axes(config),
                                     model_lib.abstract_params(config))


def abstract_state(config: ModelConfig, optimizer: optax.GradientTransformation,
                   param_dtype: str = "float32") -> dict:
  def make(key):
    params = model_lib.init_params(config, key, param_dtype)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
  return jax.eval_shape(make, jax.random.key(0))


def state_shardings(mesh, config: ModelConfig, optimizer: optax.GradientTransformation,
                    abstract: dict) -> dict:
  """Shardings of the train state: optimizer leaves shaped like a parameter share its sharding."""
  replicated = NamedSharding(mesh, P())
  p_shard = param_shardings(mesh, config)
  opt_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract["opt_state"], p_shard,
                                    transform_non_params=lambda _: replicated)
  return {"step": replicated, "params": p_shard, "opt_state": opt_shard}


def init_state(config: ModelConfig, optimizer, shardings: dict, seed: int,
               param_dtype: str = "float32") -> dict:
  """A random-init train state, computed directly into `shardings`."""
  def make():
    params = model_lib.init_params(config, jax.random.key(seed), param_dtype)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
  return jax.jit(make, out_shardings=shardings)()


def state_from_params(params, optimizer, shardings: dict) -> dict:
  """A fresh train state around already-sharded `params` (donated: no second copy)."""
  def make(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
  return jax.jit(make, out_shardings=shardings, donate_argnums=0)(params)


def load_init_params(path: str, mesh, param_dtype: str | None = None):
  """(ModelConfig, params) from a pi_jax checkpoint, restored straight into the mesh (cast to
  param_dtype when given)."""
  if not ckpt_lib.is_checkpoint(path):
    raise FileNotFoundError(
        f"init_checkpoint {path!r} is not a pi_jax checkpoint (no config.json + params/); "
        "convert a model first: python -m convert.to_pi_jax --help")
  return ckpt_lib.load_checkpoint(path, mesh=mesh, param_dtype=param_dtype)


def load_init_config(path: str) -> ModelConfig:
  """The ModelConfig of a pi_jax checkpoint, without reading its parameters."""
  return ckpt_lib.load_config(path)


def with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


class RunCheckpoints:
  """WORKDIR/checkpoints/<step>/{state, data}: orbax CheckpointManager, async, keeps the last K.

  `step` is the number of completed optimizer steps. Only complete checkpoints are listed, so
  a save interrupted by SIGKILL is never resumed from. Each save records a checksum per array
  in its `data` item; `restore` verifies them, and `restore_newest_good` falls back past
  checkpoints that do not load or verify (moving them to WORKDIR/damaged_checkpoints/).
  """

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.damaged_directory = os.path.join(os.path.abspath(workdir), "damaged_checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))
    self._closed = self._failed = False
    # orbax logs a failed background write (a full disk) as several tracebacks before it
    # raises; the raise becomes one CheckpointWriteError line here, so its logs are dropped.
    self._filter = ckpt_lib.DropOrbaxErrors()
    logging.getLogger("absl").addFilter(self._filter)
    self._previous_hook = sys.unraisablehook
    sys.unraisablehook = ckpt_lib.drop_event_loop_closed(self._previous_hook)

  def _write_error(self, e: Exception, step) -> CheckpointWriteError:
    self._failed = True
    ckpt_lib.silence_failed_write_noise()
    text = str(e)
    if "No space left" in text or "os_error_code='28'" in text or getattr(e, "errno", 0) == 28:
      reason = "no space left on device"
    else:
      reason = (text.splitlines()[0][:300] if text else type(e).__name__)
    done = [s for s in self.all_steps() if step is None or s < step]
    last = f"step {done[-1]}" if done else "none"
    return CheckpointWriteError(
        f"cannot write checkpoint {step if step is not None else ''} in {self.directory}: "
        f"{reason}. The last complete checkpoint: {last}. Free space (or fix the folder) and "
        "rerun the same command to resume from it")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: dict, data_meta: dict) -> None:
    meta = dict(data_meta, checksums=ckpt_lib.checksums(state),
                checksum_format=ckpt_lib.CHECKSUM_FORMAT)
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # this save, or the previous (async) one it waits for
      raise self._write_error(e, self.latest_step_in_flight() or step) from None

  def restore(self, step: int, target: dict) -> tuple[dict, dict]:
    """(state, data meta) of checkpoint `step`, checksums verified when it has them."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    meta = out["data"]
    if meta.get("checksums"):
      ckpt_lib.verify_checksums(out["state"], meta["checksums"], self.path(step),
                                os.path.join(self.path(step), "data"))
    return out["state"], meta

  def restore_newest_good(self, target: dict, check=None, log=print):
    """(step, state, meta) of the newest checkpoint that restores, verifies and passes
    `check(step, meta)` (which raises ValueError to reject); (None, None, None) when there are
    none. Damaged ones are moved aside, never deleted, and named with the reason."""
    skipped = []
    for step in reversed(self.all_steps()):
      try:
        with _quiet_abandoned_reads():
          state, meta = self.restore(step, target)
      except Exception as e:  # orbax/tensorstore raise many types for a damaged file
        mismatch = self.state_mismatch(step, target)
        if mismatch:  # a good checkpoint of another run setting: not damaged, not to be moved
          raise ValueError(
              f"checkpoint {self.path(step)} holds a train state of another shape than this "
              f"run's ({mismatch}): the run config changed since it was written. Nothing was "
              "moved: use a new workdir, or restore the old settings to resume") from None
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        moved = self._move_aside(step)
        log(f"skipping checkpoint {step} ({self.path(step)}): it does not load or verify: "
            f"{reason}; moved to {moved}")
        skipped.append((step, reason))
        continue
      if check is not None:
        check(step, meta)  # a mismatch with the run config is the user's to fix: no fallback
      return step, state, meta
    if skipped:
      raise ValueError(f"{self.directory}: no checkpoint loads ({len(skipped)} damaged, moved to "
                       f"{self.damaged_directory}); remove the workdir's checkpoints to start "
                       "over, or use a new workdir")
    return None, None, None

  def newest_meta(self) -> tuple[int | None, dict | None]:
    """(newest step, its `data` item) without reading the arrays; (step, None) when that item
    does not read (a damaged checkpoint: restore_newest_good deals with it)."""
    step = self.latest_step()
    if step is None:
      return None, None
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
      return step, out["data"]
    except Exception:  # orbax raises many types for a damaged item
      return step, None

  def state_mismatch(self, step: int, target: dict) -> str | None:
    """How checkpoint `step`'s arrays differ from `target`'s (shapes, dtypes), or None when
    they match or its metadata does not read (then it is damaged, not of another run)."""
    import logging
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns about an optional metadata file
    try:
      with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(os.path.join(self.path(step), "state"))
      tree = getattr(metadata, "item_metadata", metadata)
      saved = sorted((tuple(m.shape), str(m.dtype)) for m in jax.tree.leaves(tree))
    except Exception:
      return None
    finally:
      absl_logger.setLevel(level)
    want = sorted((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(target))
    if saved == want:
      return None
    only_saved = [a for a in saved if a not in want]
    only_want = [a for a in want if a not in saved]
    show = lambda a: f"{list(a[0])} {a[1]}" if a else "nothing"
    return (f"{len(saved)} arrays, e.g. {show(only_saved[0] if only_saved else None)}, where "
            f"this run has {len(want)}, e.g. {show(only_want[0] if only_want else None)}")

  def _move_aside(self, step: int) -> str:
    import time
    os.makedirs(self.damaged_directory, exist_ok=True)
    dest = os.path.join(self.damaged_directory, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    if jax.process_index() == 0:
      os.replace(self.path(step), dest)
    from jax.experimental import multihost_utils
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"pi_jax_move_aside_{step}")
    self.manager.reload()
    return dest

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(e, self.latest_step_in_flight()) from None

  def latest_step_in_flight(self) -> int | None:
    names = [n.split(".")[0] for n in os.listdir(self.directory) if "tmp" in n] if os.path.isdir(
        self.directory) else []
    steps = [int(n) for n in names if n.isdigit()]
    return max(steps) if steps else None

  def close(self) -> None:
    """Waits for pending saves and stops orbax's threads; safe to call more than once."""
    if self._closed:
      return
    self._closed = True
    try:
      if not self._failed:
        self.wait()
    finally:
      with contextlib.suppress(Exception):
        self.manager.close()  # its pending write already failed and was reported
      logging.getLogger("absl").removeFilter(self._filter)
      if not self._failed:
        sys.unraisablehook = self._previous_hook


class CheckpointWriteError(RuntimeError):
  """A training checkpoint could not be written (a full disk, a folder gone read-only)."""


def save_final(path: str, config: ModelConfig, params, tokenizer_files: dict[str, str]) -> str:
  """WORKDIR/final as a pi_jax checkpoint (what eval.py --ckpt and convert.to_hf read).

  Written by every process (orbax coordinates the sharded arrays); config.json goes last, so a
  directory without it is never mistaken for a checkpoint. (Not through files.atomic_directory:
  every process must write the same directory; the config-last order gives the same guarantee.)
  """
  path = os.path.abspath(path)
  config_file = os.path.join(path, ckpt_lib.CONFIG_FILE)
  if jax.process_index() == 0 and os.path.exists(config_file):
    os.remove(config_file)  # not a checkpoint again until the new parameters are complete
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, ckpt_lib.PARAMS_DIR), params, force=True)
    ckptr.wait_until_finished()
  sums = ckpt_lib.checksums(params)  # every process: the arrays may span hosts
  if jax.process_index() == 0:
    for name, src in tokenizer_files.items():
      files.copy_file(src, os.path.join(path, ckpt_lib.TOKENIZER_DIR, name))
    files.write_json(os.path.join(path, ckpt_lib.CHECKSUMS_FILE),
                     {"format": ckpt_lib.CHECKSUM_FORMAT, "arrays": sums})
    files.write_text(os.path.join(path, ckpt_lib.CONFIG_FILE), config.to_json())
  return path


class _AbandonedReadFilter(logging.Filter):
  """Drops asyncio's 'Future exception was never retrieved' records of orbax's array reads (a
  damaged checkpoint's other reads, gathered and then abandoned); other records pass."""

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not ("exception was never retrieved" in record.getMessage()
                and "while reading array index" in str(error))


_ABANDONED_READS = _AbandonedReadFilter()


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """Drops the errors of orbax's abandoned array reads while a checkpoint restores.

  orbax reads a checkpoint's arrays in concurrent coroutines; when one fails on a damaged file,
  the others' failures surface later, when their coroutines and futures are collected, as
  'Exception ignored in: <coroutine ...>' tracebacks or asyncio's 'exception was never
  retrieved' log records on stderr, after the one-line message that already names the damage.
  Only coroutine objects' errors and those records of array reads are dropped (the log filter
  stays: a future may be collected later); anything else reaches the previous hook."""
  logging.getLogger("asyncio").addFilter(_ABANDONED_READS)  # once: a filter is added once
  previous = sys.unraisablehook

  def hook(unraisable):
    if not isinstance(unraisable.object, types.CoroutineType):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()  # collect the abandoned coroutines while the hook is in place
    sys.unraisablehook = previous
