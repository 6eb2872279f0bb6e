"""TPU slices as the compiler sees them: names, topologies, chip memory, compile-only devices.

`jax.experimental.topologies` (with libtpu installed: `pip install pi_jax[tpu]`) returns abstract
devices of a TPU topology on any host; a mesh over them and `jax.jit(...).lower(...).compile()`
run the real TPU compiler, and `memory_analysis()` gives the bytes per chip. Slice names follow
Cloud TPU: v4-N and v5p-N count TensorCores (2 per chip, one JAX device per chip in megacore
mode), v5litepod-N / v5e-N and v6e-N count chips. A topology (`v5e:4x4`, `v5p:2x2x4`) is taken
as written; `2xv5e-16` is two slices of v5e-16 joined over the data-center network.
"""

from __future__ import annotations

import dataclasses
import os
import re

GiB = 2**30

# HBM per chip (Cloud TPU system architecture pages), as JAX sees one device per chip.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Cores per chip counted in slice names; 3D (twisted-torus) generations.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
THREE_D = ("v4", "v5p")
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5e": "v5e", "v5p": "v5p", "v5": "v5p",
            "v4": "v4", "v6e": "v6e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One (or several identical) TPU slices: what `--topology` names."""
  name: str  # as given
  generation: str  # v4, v5e, v5p, v6e
  topology: str  # chips per axis, e.g. "4x4" or "2x2x4"
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    n = 1
    for d in self.topology.split("x"):
      n *= int(d)
    return n

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def hbm_bytes_per_chip(self) -> int:
    return HBM_GIB[self.generation] * GiB

  @property
  def topology_name(self) -> str:
    return f"{self.generation}:{self.topology}"

  def describe(self) -> str:
    n = f"{self.num_slices}× " if self.num_slices > 1 else ""
    return (f"{n}{self.generation} {self.topology} ({self.chips} chips, "
            f"{HBM_GIB[self.generation]} GiB HBM each)")


def _topology_for_chips(generation: str, chips: int, name: str) -> str:
  """The usual chip grid of a slice: 2x2(x1), then doubling one axis at a time."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"TPU slice {name!r}: {chips} chips is not a power of two")
  if generation in THREE_D:
    if chips < 4:
      raise ValueError(f"TPU slice {name!r}: the smallest {generation} slice has 4 chips "
                       f"({generation}-{4 * CORES_PER_CHIP[generation]})")
    dims, axis = [2, 2, 1], 2
    while dims[0] * dims[1] * dims[2] < chips:  # 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
      dims[axis] *= 2
      axis = (axis - 1) % 3
    dims = sorted(d for d in dims if d > 1) + [1] * dims.count(1)  # 2x2x1, 2x2x4, 2x4x4, 4x4x8
  else:
    if chips > 256:
      raise ValueError(f"TPU slice {name!r}: a {generation} slice has at most 256 chips")
    dims = {1: [1, 1], 2: [1, 2]}.get(chips)
    if dims is None:
      dims, axis = [2, 2], 1
      while dims[0] * dims[1] < chips:  # 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16
        dims[axis] *= 2
        axis = 1 - axis
  return "x".join(str(d) for d in dims)


def parse_slice(text: str) -> TpuSlice:
  """`v5p-64`, `v5litepod-16`, `v5e-16`, `v6e-64`, `v4-32`, `v5e:4x4`, `2xv5p-128`."""
  name = text.strip().lower()
  slices = 1
  m = re.fullmatch(r"(\d+)x(.+)", name)
  if m and not re.fullmatch(r"[\dx]+", name):
    slices, name = int(m.group(1)), m.group(2)
    if slices < 1:
      raise ValueError(f"TPU slice {text!r}: {slices} slices; give at least 1 (e.g. 2xv5p-128)")
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", name)
  if m:
    gen = _ALIASES.get(m.group(1))
    if gen is None:
      raise ValueError(f"TPU topology {text!r}: unknown generation {m.group(1)!r}; "
                       f"known: {sorted(HBM_GIB)}")
    dims = m.group(2).split("x")
    if any(int(d) < 1 for d in dims):
      raise ValueError(f"TPU topology {text!r}: every axis of the chip grid needs at least 1 chip")
    if (len(dims) == 3) != (gen in THREE_D):
      raise ValueError(f"TPU topology {text!r}: {gen} chips form a "
                       f"{'3D' if gen in THREE_D else '2D'} grid")
    return TpuSlice(text, gen, m.group(2), slices)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
  if not m or m.group(1) not in _ALIASES:
    raise ValueError(f"TPU slice {text!r}: expected a Cloud TPU slice name (v4-32, v5p-128, "
                     "v5litepod-16 / v5e-16, v6e-64) or a topology (v5e:4x4, v5p:2x2x4)")
  gen = _ALIASES[m.group(1)]
  count = int(m.group(2))
  cores = CORES_PER_CHIP[gen]
  if count % cores:
    raise ValueError(f"TPU slice {text!r}: {gen} slice names count TensorCores, {cores} per chip")
  return TpuSlice(text, gen, _topology_for_chips(gen, count // cores, text), slices)


def _quiet_libtpu_env() -> None:
  # Compile-only use on a host without TPUs: libtpu otherwise probes the metadata server.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def libtpu_available() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def compile_only_devices(slice_: TpuSlice) -> list:
  """Abstract devices (one per chip) of the slice; nothing runs on them, they only compile."""
  if not libtpu_available():
    raise RuntimeError("compiling for a TPU slice needs libtpu, the TPU compiler: "
                       "pip install 'pi_jax[tpu]' (jax[tpu] pinned to the installed jax)")
  _quiet_libtpu_env()
  from jax.experimental import topologies
  kwargs = {"num_slices": slice_.num_slices} if slice_.num_slices > 1 else {}
  if slice_.generation in THREE_D:
    kwargs["chip_config_name"] = "megacore"  # one device per chip, both cores in it
  return list(topologies.get_topology_desc(
      platform="tpu", topology_name=slice_.topology_name, **kwargs).devices)
