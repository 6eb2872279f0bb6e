"""What the evaluations share: batch placement on a mesh (memory checks: pi_jax.memory)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from pi_jax import sharding as sharding_lib

def mesh_context(mesh):
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def check_batch_size(batch: int, mesh) -> int:
  shards = sharding_lib.batch_shards(mesh)
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
