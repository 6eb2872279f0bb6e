"""pi_jax checkpoints: orbax-checkpoint arrays with the model config beside them as JSON.

Layout of a checkpoint directory CKPT:
  CKPT/config.json     ModelConfig.to_dict() (architecture and RoPE scaling; never run options)
  CKPT/params/         orbax (OCDBT + tensorstore) arrays of the parameter pytree; the stacked
                       layer arrays in chunks of one layer (older checkpoints: chunks that
                       span every layer; both restore alike)
  CKPT/tokenizer/      optional: the source model's tokenizer files (see pi_jax.tokenizer)
  CKPT/checksums.json  a checksum per array, verified on load (checkpoints written before it
                       existed have none and load unverified)

Writes go to a temporary sibling directory that is renamed into place at the end, so a failed
save never leaves a half-written CKPT. Restores go straight into the requested shardings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from pi_jax import files
from pi_jax import model as model_lib
from pi_jax.config import ModelConfig, run_keys_in
from pi_jax.files import atomic_directory  # noqa: F401  (re-exported: the one atomic writer)

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
CHECKSUMS_FILE = "checksums.json"
CHECKSUM_FORMAT = "sum32x2"
OCDBT_FILE_BYTES = 32 * 2**20


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
      os.path.join(path, PARAMS_DIR))


def load_config(path: str) -> ModelConfig:
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    hint = ""
    step, workdir = os.path.basename(os.path.normpath(path)), os.path.dirname(
        os.path.dirname(os.path.normpath(path)))
    if step.isdigit() and os.path.isdir(os.path.join(path, "state")):
      hint = (f" (it is step {step} of the training run {workdir}: `python -m "
              f"pi_jax.train.export {workdir} {step} OUT` writes it as a checkpoint)")
    raise FileNotFoundError(f"{path} is not a pi_jax checkpoint: {file} does not exist{hint}")
  try:
    with open(file) as f:
      d = json.load(f)
    config = ModelConfig.from_dict(d)
  except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
    raise ValueError(f"{file}: not a valid pi_jax config: {e}") from None
  _note_run_keys(file, d)
  return config


_NOTED: set[str] = set()


def _note_run_keys(file: str, d: dict) -> None:
  """Says once per file that an older config.json's run options are ignored (rule 15)."""
  old = run_keys_in(d)
  if old and file not in _NOTED:
    _NOTED.add(file)
    shown = ", ".join(f"{k}={v}" for k, v in old.items())
    print(f"pi_jax: note: {file} stores run options from an older pi_jax ({shown}); they are "
          "ignored: a run sets them itself (--set run.FIELD=VALUE)", file=sys.stderr)


def stored_dtypes(path: str) -> dict:
  """{array path: dtype name} of checkpoint `path`'s parameters, from orbax's metadata."""
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{path} is not a pi_jax checkpoint: {params_dir} does not exist")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(params_dir).item_metadata
  except Exception as e:  # orbax raises many types; name the file and the cause
    raise ValueError(f"{params_dir}: unreadable parameter metadata (damaged?): {e}") from None
  tree = meta.tree if hasattr(meta, "tree") else meta
  return {jax.tree_util.keystr(p): str(m.dtype)
          for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- checksums ---------------------------------------------------------------------------------

def _array_checksum(x: jax.Array) -> jax.Array:
  """Two uint32 sums of the array's raw bits: plain, and weighted by each element's position
  (so swapped or shifted values change it). Integer sums wrap identically in any reduction
  order, so the result does not depend on the sharding; no reshape, so no gather."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= x.shape[axis]
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                    jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)])


def checksums(tree) -> dict[str, str]:
  """{array path: checksum} of a pytree of arrays (computed where the arrays live).

  On a mesh the sums come back replicated, so every process of a multi-host run can read them.
  One array at a time: summing the whole tree in one program kept every array's uint32 bits at
  once (SmolLM2-135M: +850 MB on top of its 513 MB of parameters while loading).
  """
  meshes = {leaf.sharding.mesh for leaf in jax.tree.leaves(tree)
            if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)}
  if len(meshes) == 1:
    replicated = jax.sharding.NamedSharding(meshes.pop(), jax.sharding.PartitionSpec())
    fn = jax.jit(_array_checksum, out_shardings=replicated)
  else:
    fn = jax.jit(_array_checksum)
  return {jax.tree_util.keystr(p): "{:08x}{:08x}".format(*(int(s) for s in jax.device_get(fn(x))))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def verify_checksums(tree, expected: dict[str, str], where: str, recorded_in: str) -> None:
  """Raises ValueError naming the first array whose checksum differs from the recorded one."""
  got = checksums(tree)
  for name, value in got.items():
    if name in expected and expected[name] != value:
      raise ValueError(f"{where}: array {name} does not match the checksum recorded in "
                       f"{recorded_in} (got {value}, recorded {expected[name]}): the file is "
                       "damaged")
  missing = sorted(set(expected) - set(got))
  if missing:
    raise ValueError(f"{where}: arrays {missing} listed in {recorded_in} were not restored")


def write_checksums(path: str, params) -> None:
  files.write_json(os.path.join(path, CHECKSUMS_FILE),
                   {"format": CHECKSUM_FORMAT, "arrays": checksums(params)})


def read_checksums(path: str) -> dict[str, str] | None:
  """The recorded checksums of checkpoint `path`, or None for one written without them."""
  file = os.path.join(path, CHECKSUMS_FILE)
  if not os.path.isfile(file):
    return None
  try:
    with open(file) as f:
      data = json.load(f)
    if data.get("format") != CHECKSUM_FORMAT:
      raise ValueError(f"unknown format {data.get('format')!r}")
    return dict(data["arrays"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{file}: unreadable checksums (damaged?): {e}") from None


class DropOrbaxErrors(logging.Filter):
  """Drops orbax's own ERROR logs (with tracebacks) of a failed write: the caller turns the
  exception into one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


class _DropFailedWriteNoise(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return "orbax" not in record.getMessage()


def drop_event_loop_closed(previous):
  """An unraisable hook that drops 'Event loop is closed' (orbax's write threads after their
  loop is gone) and passes everything else to `previous`."""
  def hook(unraisable):
    if "Event loop is closed" not in str(unraisable.exc_value):
      previous(unraisable)
  return hook


def silence_failed_write_noise() -> None:
  """After a failed checkpoint write (reported in one line), orbax's abandoned write tasks
  report it again when they are collected or when their event loop is gone, up to the
  process's exit: asyncio's 'Task exception was never retrieved' and tensorstore callbacks'
  'Event loop is closed'. Both are dropped from then on; nothing else is."""
  if getattr(silence_failed_write_noise, "done", False):
    return
  silence_failed_write_noise.done = True
  logging.getLogger("asyncio").addFilter(_DropFailedWriteNoise())
  sys.unraisablehook = drop_event_loop_closed(sys.unraisablehook)


@contextlib.contextmanager
def quiet_failed_write():
  """An orbax write whose failure (a full disk) its caller reports in one line: orbax's own
  error logs are dropped while it runs, and its leftovers' noise after a failure."""
  absl_logger, quiet = logging.getLogger("absl"), DropOrbaxErrors()
  previous = sys.unraisablehook
  absl_logger.addFilter(quiet)
  sys.unraisablehook = drop_event_loop_closed(previous)
  failed = False
  try:
    yield
  except BaseException:
    failed = True
    raise
  finally:
    absl_logger.removeFilter(quiet)
    sys.unraisablehook = previous
    if failed:
      silence_failed_write_noise()


def save_checkpoint(path: str, config: ModelConfig, params, *, force: bool = False,
                    extra_files: dict[str, str] | None = None) -> str:
  """Saves `params` (jax or numpy arrays) and `config` to `path` atomically.

  extra_files maps a relative name inside the checkpoint to a source file to copy (tokenizer).
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not force:
    raise FileExistsError(f"{path} already exists (pass force=True / --force to replace it)")
  _check_params_match(config, params)
  with files.atomic_directory(path) as tmp:
    # Small OCDBT data files: tensorstore keeps a data file's bytes in memory until it is
    # written, so orbax's default (~2 GB files) adds up to a second model copy to peak host
    # memory (benchmarks/convert_memory.py). Restores read it like any orbax checkpoint.
    with quiet_failed_write():
      with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(
            params, save_args=_save_args(params),
            ocdbt_target_data_file_size=OCDBT_FILE_BYTES))
    for name, src in (extra_files or {}).items():
      dst = os.path.join(tmp, name)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copyfile(src, dst)
    write_checksums(tmp, params)
    files.write_text(os.path.join(tmp, CONFIG_FILE), config.to_json())
  return path


def _save_args(params):
  """Storage chunks of each stacked array ([num_layers, ...] under "layers") hold one layer
  (orbax's shard_axes=(0,)), then split to at most OCDBT_FILE_BYTES: one layer's slice is then
  read without decoding the other layers' data (the GGUF export reads tensor by tensor)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: ocp.SaveArgs(shard_axes=(0,) if getattr(p[0], "key", None) == "layers"
                                else ()), params)


def stored_param_dtype(path: str) -> str:
  """The dtype checkpoint `path` stores its parameters in (the most common one if mixed)."""
  names = list(stored_dtypes(path).values())
  return max(set(names), key=names.count)


def load_checkpoint(path: str, *, mesh: jax.sharding.Mesh | None = None,
                    param_dtype: str | None = None):
  """(config, params) from a pi_jax checkpoint.

  With `mesh`, every array is restored directly into its sharding from the logical axis table
  (no full copy on one device or host); otherwise onto the default device. param_dtype (a run
  option) casts the parameters after they are verified; None keeps the stored dtypes.
  """
  config = load_config(path)
  expected = read_checksums(path)
  dtypes = stored_dtypes(path)
  # Restored (and verified: a checksum is of the bits on disk) at the stored dtype, then cast.
  abstract = jax.tree_util.tree_map_with_path(
      lambda p, a: jax.ShapeDtypeStruct(a.shape, dtypes.get(jax.tree_util.keystr(p), a.dtype)),
      model_lib.abstract_params(config))
  if mesh is not None:
    from pi_jax import sharding as sharding_lib
    shardings = sharding_lib.tree_shardings(mesh, model_lib.param_axes(config), abstract)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir, target)
  except Exception as e:  # orbax raises many types; name the file and the cause
    raise ValueError(f"{params_dir}: could not restore parameters for this config: {e}") from e
  if expected is not None:
    verify_checksums(params, expected, params_dir, os.path.join(path, CHECKSUMS_FILE))
  if param_dtype is not None and any(x.dtype != jnp.dtype(param_dtype)
                                     for x in jax.tree.leaves(params)):
    params = _cast_leaf_by_leaf(params, jnp.dtype(param_dtype))
  return config, params


def _cast_leaf_by_leaf(tree, dtype):
  """Casts every array, freeing each original as soon as its copy exists."""
  flat, treedef = jax.tree.flatten(tree)
  out = []
  while flat:
    x = flat.pop(0)
    y = x.astype(dtype)
    x.delete()
    out.append(y)
  return jax.tree.unflatten(treedef, out)


def _check_params_match(config: ModelConfig, params) -> None:
  expected = model_lib.param_shapes(config)
  exp_flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      expected, is_leaf=lambda x: isinstance(x, tuple))[0]}
  got_flat = {jax.tree_util.keystr(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  if exp_flat.keys() != got_flat.keys():
    missing, extra = exp_flat.keys() - got_flat.keys(), got_flat.keys() - exp_flat.keys()
    raise ValueError(f"parameters do not match the config: missing {sorted(missing)}, "
                     f"unexpected {sorted(extra)}")
  for name, shape in exp_flat.items():
    if got_flat[name] != tuple(shape):
      raise ValueError(f"parameter {name} has shape {got_flat[name]}, config expects {shape}")
