"""Multi-process start-up: jax.distributed for TPU pod slices, SLURM and explicit clusters."""

from __future__ import annotations

import os

import jax

from pi_jax.train.config import TrainConfig


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
