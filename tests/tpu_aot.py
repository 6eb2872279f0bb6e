"""Compile-only (AOT) helpers: the real train step compiled for a TPU topology on the CPU host.

`jax.experimental.topologies.get_topology_desc(platform="tpu", ...)` gives abstract TPU devices
(libtpu, from the dev requirement `jax[tpu]`); a mesh over them and `jit(...).lower(abstract
arguments with shardings).compile()` run the real TPU compiler, Mosaic (Pallas) included.
Without libtpu the calling test FAILS with that message: it never skips.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from pi_jax import sharding
from pi_jax.train import optim
from pi_jax.train import step as train_step
from pi_jax.train import state as state_lib


def tpu_devices(topology: str):
  """The compile-only devices of a TPU topology such as 'v5e:2x2'."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    pytest.fail("libtpu is not installed, so nothing can be compiled for a TPU topology: "
                "pip install -r requirements-dev.txt (it pins jax[tpu] to our jax version)",
                pytrace=False)
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def tpu_mesh(topology: str, mesh_spec: str):
  return sharding.make_mesh(mesh_spec, tpu_devices(topology))


def compile_train_step(model, config, mesh):
  """(lowered, compiled) of pi_jax.train.step.make_train_step for abstract, sharded state and batch."""
  optimizer = optim.make_optimizer(config)
  abstract = state_lib.abstract_state(model, optimizer)
  shardings = state_lib.state_shardings(mesh, model, optimizer, abstract)
  shape = (config.global_batch, config.seq_len + 1)
  batch_sharding = sharding.named_sharding(mesh, ("batch", None), shape)
  rows = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)
  with jax.set_mesh(mesh):
    step = train_step.make_train_step(config, model, optimizer, shardings, batch_sharding)
    lowered = step.lower(state_lib.with_shardings(abstract, shardings), rows)
    return lowered, lowered.compile()


def pallas_int_operands(text: str) -> list[list[str]]:
  """For each Pallas (Mosaic) call of a compiled program's text, the dims of its int32
  operands, e.g. [["2", "1,1,1024", "1,1,1024"], []] (from the call's operand layouts)."""
  calls = [line for line in text.splitlines() if "tpu_custom_call" in line and " = " in line]
  return [re.findall(r"s32\[([\d,]*)\]", _braced(line, "operand_layout_constraints={"))
          for line in calls]


def _braced(line: str, opening: str) -> str:
  """The text between `opening` (which ends with "{") and its matching "}"."""
  start = line.index(opening) + len(opening)
  depth = 1
  for end in range(start, len(line)):
    depth += {"{": 1, "}": -1}.get(line[end], 0)
    if depth == 0:
      return line[start:end]
  raise ValueError(f"no closing brace after {opening!r}")
