"""What the evaluations share: batch placement on a mesh and the memory check before work."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from pi_jax import sharding as sharding_lib

# Leave room for the allocator, the parameters' own growth and the host process.
MEMORY_HEADROOM = 0.9


def run_config(config, dtype: str | None):
  """The one place an evaluation's dtype option meets the model config (it moves to
  RunOptions with issue 27)."""
  if dtype is None:
    return config
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: expected float32 or bfloat16")
  return config.replace(compute_dtype=dtype)


def mesh_context(mesh):
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def batch_shards(mesh) -> int:
  """How many ways a batch is split on `mesh` (the data axes of the logical name `batch`)."""
  if mesh is None:
    return 1
  axes = sharding_lib.LOGICAL_AXIS_RULES["batch"] or ()
  return int(np.prod([mesh.shape[a] for a in axes]))


def check_batch_size(batch: int, mesh) -> int:
  shards = batch_shards(mesh)
  if batch < 1 or batch % shards:
    raise ValueError(f"--batch-size {batch} must be a positive multiple of {shards}, the number "
                     f"of data shards of the mesh {dict(mesh.shape) if mesh else ''}".rstrip())
  return batch


def _batch_sharding(shape, mesh):
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return sharding_lib.named_sharding(mesh, ("batch", None), shape)


def batch_struct(shape, mesh, dtype=np.int32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=_batch_sharding(shape, mesh))


def put_batch(array: np.ndarray, mesh) -> jax.Array:
  """Places a host batch [B, ...] split over the mesh's data axes (one device without a mesh)."""
  return jax.device_put(array, _batch_sharding(array.shape, mesh))


def free_device_memory() -> tuple[int | None, str]:
  """(bytes free on one device, its name); on CPU the host's available memory."""
  device = jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # some backends do not implement it
    pass
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), device.device_kind
  if device.platform == "cpu":
    import psutil
    return int(psutil.virtual_memory().available), "CPU host memory"
  return None, device.device_kind


def check_memory(compiled, what: str, hint: str) -> int | None:
  """XLA's per-device estimate of the scratch + output + input memory a call needs.

  Parameters already on the device are not counted again. Raises MemoryError before the call
  runs when the estimate is above what the device has free.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:
    stats = None
  if stats is None:
    return None
  need = int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
  free, name = free_device_memory()
  if free is not None and need > MEMORY_HEADROOM * free:
    raise MemoryError(
        f"{what} needs about {need / 2**30:.2f} GiB of activation memory per device (XLA's "
        f"estimate) but {name} has {free / 2**30:.2f} GiB free; {hint}")
  return need
