"""Logical axis names -> mesh axes: the one table, the mesh, and the `shard` helper.

Parameters carry logical names where the Flax modules declare them (their Params'
`out_sharding` metadata, collected by model.param_axes);
activations pass through `shard(x, names)`. An unknown name is an error, never a silent
replication. A dimension that a mesh axis does not divide is left unsharded on that axis
(SmolLM2's 9 heads on tensor=2, say): that is a property of the shape, not a typo.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical name -> mesh axes it is split over (None: replicated).
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...] | None] = {
    # parameters
    "layers": None,  # the scanned layer axis
    "embed": ("fsdp", "sequence"),  # the sequence axis shards parameters too (FSDP over both)
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": ("sequence",),
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def parse_mesh_spec(spec: str | dict | None) -> dict[str, int]:
  """`data:2,fsdp:2,tensor:2` -> {'data': 2, 'fsdp': 2, 'tensor': 2, 'sequence': 1}.

  One axis may be -1 (or omitted entirely from the spec, then fsdp takes the rest): it takes
  all remaining devices.
  """
  sizes = {}
  if isinstance(spec, dict):
    sizes = {k: int(v) for k, v in spec.items()}
  elif spec:
    for part in spec.split(","):
      name, sep, size = part.strip().partition(":")
      if not sep or not size.strip().lstrip("-").isdigit():
        raise ValueError(f"mesh spec {spec!r}: expected AXIS:SIZE items like data:2,fsdp:4")
      sizes[name.strip()] = int(size)
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh spec {spec!r}: unknown axes {sorted(unknown)}; known: {MESH_AXES}")
  for name, size in sizes.items():  # 0 would divide by zero below; -2 means nothing
    if size < 1 and size != -1:
      raise ValueError(f"mesh spec {spec!r}: axis {name} has size {size}; sizes are positive "
                       "(or -1: the devices the other axes leave)")
  if not sizes:
    sizes = {"fsdp": -1}  # no spec: plain FSDP over every device
  return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str | dict | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor, sequence) mesh over `devices` (default: all devices).

  One axis of size -1 takes the devices the others leave (`fsdp:-1,tensor:4`), so one spec
  fits any slice size.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = parse_mesh_spec(spec)
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1")
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if len(devices) % known:
      raise ValueError(f"mesh spec {spec!r}: {len(devices)} devices not divisible by {known}")
    sizes[free[0]] = len(devices) // known
  total = math.prod(sizes.values())
  if total != len(devices):
    raise ValueError(
        f"mesh spec {spec!r} needs {total} devices ({sizes}); {len(devices)} are available")
  shape = tuple(sizes[a] for a in MESH_AXES)
  types = (AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:  # multi-slice: the data axis crosses the data-center network, the rest stay on ICI
    if sizes["data"] % slices:
      raise ValueError(f"mesh spec {spec!r}: the devices span {slices} slices; the data axis "
                       f"({sizes['data']}) must be a multiple of {slices} (e.g. data:{slices})")
    ici = tuple(sizes[a] // (slices if a == "data" else 1) for a in MESH_AXES)
    dcn = tuple(slices if a == "data" else 1 for a in MESH_AXES)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, MESH_AXES, axis_types=types)
  if devices[0].platform == "cpu":  # fake CPU devices: no physical topology to follow
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=types)
  # Accelerators (real or compile-only TPU devices): jax orders them along the physical torus,
  # giving each mesh axis whole torus axes where it can; an axis that is no product of them
  # (sequence:8 on a 4x4x4 v5p-128) splits a physical axis instead of failing.
  grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=types)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh_shape: dict[str, int] | None = None) -> P:
  """PartitionSpec for logical `names`; axes that do not divide `shape` are dropped."""
  spec, used = [], set()
  for i, name in enumerate(names):
    if name is None:
      spec.append(None)
      continue
    if name not in LOGICAL_AXIS_RULES:
      raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
    axes = [a for a in (LOGICAL_AXIS_RULES[name] or ()) if a not in used]
    if mesh_shape is not None:
      axes = [a for a in axes if mesh_shape.get(a, 1) > 1]
      if shape is not None:
        kept, size = [], 1
        for a in axes:  # keep the leading axes whose product divides the dimension
          if shape[i] % (size * mesh_shape[a]) == 0:
            kept.append(a)
            size *= mesh_shape[a]
        axes = kept
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def named_sharding(mesh: Mesh, names, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, dict(mesh.shape)))


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree):
  """NamedShardings for a pytree of logical-name tuples and matching ShapeDtypeStructs."""
  return jax.tree.map(lambda names, s: named_sharding(mesh, names, s.shape), axes_tree, shapes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains activation `x` to the logical layout `names` under the current mesh (else no-op)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    for name in names:  # still reject typos off-mesh, so single-device tests catch them
      if name is not None and name not in LOGICAL_AXIS_RULES:
        raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
    return x
  spec = logical_to_spec(names, x.shape, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


def batch_shards(mesh) -> int:
  """How many ways a batch is split on `mesh` (the data axes of the logical name `batch`)."""
  if mesh is None:
    return 1
  axes = LOGICAL_AXIS_RULES["batch"] or ()
  return int(np.prod([mesh.shape[a] for a in axes]))
