"""Train state (step, params, optimizer state) created and restored straight into its shardings.

Shapes come first (jax.eval_shape), then shardings from the logical axis table (optimizer
moments follow their parameter's sharding; scalars are replicated), then a jitted init with
out_shardings, so no full copy of a large model ever exists on one device or host.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from pi_jax import checkpoint as ckpt_lib
from pi_jax import model as model_lib
from pi_jax import sharding as sharding_lib
from pi_jax.config import ModelConfig


def param_shardings(mesh, config: ModelConfig):
  return sharding_lib.tree_shardings(mesh, model_lib.param_axes(config),
                                     model_lib.abstract_params(config))


def abstract_state(config: ModelConfig, optimizer: optax.GradientTransformation) -> dict:
  def make(key):
    params = model_lib.init_params(config, key)
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


def init_state(config: ModelConfig, optimizer, shardings: dict, seed: int) -> dict:
  """A random-init train state, computed directly into `shardings`."""
  def make():
    params = model_lib.init_params(config, jax.random.key(seed))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
  return jax.jit(make, out_shardings=shardings)()


def state_from_params(params, optimizer, shardings: dict) -> dict:
  """A fresh train state around already-sharded `params` (donated: no second copy)."""
  def make(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
  return jax.jit(make, out_shardings=shardings, donate_argnums=0)(params)


def load_init_params(path: str, mesh, runtime_overrides: dict):
  """(ModelConfig, params) from a pi_jax checkpoint, restored straight into the mesh."""
  if not ckpt_lib.is_checkpoint(path):
    raise FileNotFoundError(
        f"init_checkpoint {path!r} is not a pi_jax checkpoint (no config.json + params/); "
        "convert a model first: python -m convert.to_pi_jax --help")
  return ckpt_lib.load_checkpoint(path, mesh=mesh, config_overrides=runtime_overrides or None)


def load_init_config(path: str, runtime_overrides: dict) -> ModelConfig:
  """The ModelConfig of a pi_jax checkpoint, without reading its parameters."""
  config = ckpt_lib.load_config(path)
  return config.replace(**runtime_overrides) if runtime_overrides else config


def with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


class RunCheckpoints:
  """WORKDIR/checkpoints/<step>/{state, data}: orbax CheckpointManager, async, keeps the last K.

  `step` is the number of completed optimizer steps. Only complete checkpoints are listed, so
  a save interrupted by SIGKILL is never resumed from.
  """

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                         options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_meta)), force=True)

  def restore(self, step: int, target: dict) -> tuple[dict, dict]:
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_final(path: str, config: ModelConfig, params, tokenizer_files: dict[str, str]) -> str:
  """WORKDIR/final as a pi_jax checkpoint (what eval.py --ckpt and convert.to_hf read).

  Written by every process (orbax coordinates the sharded arrays); config.json goes last, so a
  directory without it is never mistaken for a checkpoint.
  """
  import shutil
  path = os.path.abspath(path)
  config_file = os.path.join(path, ckpt_lib.CONFIG_FILE)
  if jax.process_index() == 0 and os.path.exists(config_file):
    os.remove(config_file)  # not a checkpoint again until the new parameters are complete
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, ckpt_lib.PARAMS_DIR), params, force=True)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    for name, src in tokenizer_files.items():
      dst = os.path.join(path, ckpt_lib.TOKENIZER_DIR, name)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copyfile(src, dst)
    tmp = os.path.join(path, ckpt_lib.CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
      f.write(config.to_json())
    os.replace(tmp, os.path.join(path, ckpt_lib.CONFIG_FILE))
  return path
