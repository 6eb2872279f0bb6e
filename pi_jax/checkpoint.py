"""pi_jax checkpoints: orbax-checkpoint arrays with the model config beside them as JSON.

Layout of a checkpoint directory CKPT:
  CKPT/config.json     ModelConfig.to_dict() (architecture, RoPE scaling, dtypes)
  CKPT/params/         orbax (OCDBT + tensorstore) arrays of the parameter pytree
  CKPT/tokenizer/      optional: the source model's tokenizer files (see pi_jax.tokenizer)

Writes go to a temporary sibling directory that is renamed into place at the end, so a failed
save never leaves a half-written CKPT. Restores go straight into the requested shardings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid

import jax
import orbax.checkpoint as ocp

from pi_jax import model as model_lib
from pi_jax.config import ModelConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
OCDBT_FILE_BYTES = 32 * 2**20


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
      os.path.join(path, PARAMS_DIR))


def load_config(path: str) -> ModelConfig:
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} is not a pi_jax checkpoint: {file} does not exist")
  try:
    with open(file) as f:
      return ModelConfig.from_dict(json.load(f))
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise ValueError(f"{file}: not a valid pi_jax config: {e}") from None


@contextlib.contextmanager
def atomic_directory(path: str):
  """Yields a temporary sibling directory that replaces `path` only if the block succeeds.

  On any error the temporary directory is removed and `path` (new or old) is untouched, so a
  failed write never leaves a half-written checkpoint or export.
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    os.makedirs(tmp)
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(path: str, config: ModelConfig, params, *, force: bool = False,
                    extra_files: dict[str, str] | None = None) -> str:
  """Saves `params` (jax or numpy arrays) and `config` to `path` atomically.

  extra_files maps a relative name inside the checkpoint to a source file to copy (tokenizer).
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not force:
    raise FileExistsError(f"{path} already exists (pass force=True / --force to replace it)")
  _check_params_match(config, params)
  with atomic_directory(path) as tmp:
    # Small OCDBT data files: tensorstore keeps a data file's bytes in memory until it is
    # written, so orbax's default (~2 GB files) adds up to a second model copy to peak host
    # memory (benchmarks/convert_memory.py). Restores read it like any orbax checkpoint.
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(
          params, ocdbt_target_data_file_size=OCDBT_FILE_BYTES))
    for name, src in (extra_files or {}).items():
      dst = os.path.join(tmp, name)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copyfile(src, dst)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      f.write(config.to_json())
  return path


def load_checkpoint(path: str, *, mesh: jax.sharding.Mesh | None = None,
                    config_overrides: dict | None = None):
  """(config, params) from a pi_jax checkpoint.

  With `mesh`, every array is restored directly into its sharding from the logical axis table
  (no full copy on one device or host); otherwise onto the default device. config_overrides
  replace run-time fields (compute_dtype, attention_impl, remat, ...); param_dtype casts on load.
  """
  config = load_config(path)
  if config_overrides:
    config = config.replace(**config_overrides)
  abstract = model_lib.abstract_params(config)
  if mesh is not None:
    from pi_jax import sharding as sharding_lib
    shardings = sharding_lib.tree_shardings(mesh, model_lib.param_axes(config), abstract)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{path} is not a pi_jax checkpoint: {params_dir} does not exist")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir, target)
  except Exception as e:  # orbax raises many types; name the file and the cause
    raise ValueError(f"{params_dir}: could not restore parameters for this config: {e}") from e
  return config, params


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
