"""The one seam that picks the kernels: attention (and its tile), the projections, the NLL's
log-sum-exp and the decoding attention, from a run's options and the platform compiled for.

`choose(run)` resolves everything once (a `Kernels`, cached per run options, platform, mesh and
native-kernel state); the model asks the result and never decides itself. What `auto` means:
- attention: ring under a mesh with a `sequence` axis > 1 (the only implementation that splits
  the sequence), else splash on TPU, cudnn on GPU for bf16/fp16, cpu_flash on the CPU for float32
  when the native kernels build, else xla_blockwise.
- tile: the run's attention_block_size, else the implementation's measured default: 256 for
  cpu_flash and for xla_blockwise/ring on the CPU (the [3·256, 256] float32 score tile stays
  near the cache: ~10% faster at 8K than 512, docs/performance.md), 512 elsewhere (splash's).
- projections and log-sum-exp: the native sgemm / log-sum-exp kernels on the CPU, for float32
  on one device (XLA cannot partition an FFI call), unless run.native is off; else XLA.
"The platform" is the one the program is compiled FOR: under `jax.set_mesh`, that of the mesh's
devices (a mesh of TPU topology devices compiles for TPU from a CPU host).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from pi_jax import attention as attn_lib
from pi_jax import native
from pi_jax.attention import kernels as vendor
from pi_jax.attention.cpu import FORWARD_BLOCK as CPU_FLASH_BLOCK
from pi_jax.attention.ring import SEQUENCE_AXIS
from pi_jax.run import RunOptions

DEFAULT_BLOCK = 512
CPU_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The kernels one run uses (see the module docstring for how they are chosen)."""

  attention: str  # a concrete implementation, never "auto"
  block_size: int
  # The projections (pi_jax.linear.project) and the NLL's log-sum-exp (pi_jax.loss) by
  # pi_jax.native's kernels rather than XLA's.
  native_matmul: bool
  platform: str

  def attend(self, q_BLNH, k_BLKH, v_BLKH, *, segment_ids_BL=None, interpret: bool = False):
    """Causal self-attention over a whole sequence (or a prefill of an empty cache); with
    segment ids int [B, L], only within each segment (packed documents)."""
    return attn_lib.attention(q_BLNH, k_BLKH, v_BLKH, impl=self.attention,
                              block_size=self.block_size,
                              kv_heads_in_turn=self.platform == "cpu",
                              segment_ids_BL=segment_ids_BL, interpret=interpret)

  def attend_cached(self, q_BLNH, k_BSKH, v_BSKH, *, offset, length):
    """Decoding: new queries at positions offset.. attend to the first `length` cached keys."""
    return attn_lib.reference_attention(q_BLNH, k_BSKH, v_BSKH, q_offset=offset,
                                        kv_length=length)

  def describe(self) -> str:
    matmul = "native" if self.native_matmul else "XLA"
    return (f"attention {self.attention} (tile {self.block_size}), projections and loss "
            f"{matmul}, on {self.platform}")


def _mesh_key():
  """What the choice depends on: (platform, devices, sequence-axis size) of the current mesh,
  or of the default backend without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return vendor.backend(), jax.device_count(), 1
  return vendor.backend(), mesh.size, dict(mesh.shape).get(SEQUENCE_AXIS, 1)


def choose(run: RunOptions | None = None) -> Kernels:
  """The kernels `run` stands for on the platform compiled for (inside `jax.set_mesh`, the
  mesh's). An explicit implementation that cannot run here is an error naming why."""
  run = run or RunOptions()
  platform, devices, sequence = _mesh_key()
  return _choose(run, platform, devices, sequence, run.native != "off" and native.available())


@functools.lru_cache(maxsize=256)
def _choose(run: RunOptions, platform: str, devices: int, sequence: int,
            native_ok: bool) -> Kernels:
  float32 = run.compute_dtype == "float32"
  impl = run.attention_impl
  if impl == "auto":
    if sequence > 1:
      impl = "ring"
    elif platform == "tpu":
      impl = "splash"
    elif platform == "gpu" and not float32:
      impl = "cudnn"
    elif platform == "cpu" and float32 and native_ok:
      impl = "cpu_flash"
    else:
      impl = "xla_blockwise"
  elif impl == "cpu_flash" and not native_ok:
    why = "run.native is off" if run.native == "off" else native.unavailable_reason()
    raise ValueError(f"attention impl 'cpu_flash' is unavailable: {why}. Use 'xla_blockwise' "
                     "(or 'auto', which falls back to it).")
  block = run.attention_block_size
  if block is None:
    if impl == "cpu_flash":
      block = CPU_FLASH_BLOCK
    elif impl in ("xla_blockwise", "ring") and platform == "cpu":
      block = CPU_BLOCK
    else:
      block = DEFAULT_BLOCK
  native_matmul = platform == "cpu" and float32 and devices == 1 and native_ok
  return Kernels(attention=impl, block_size=block, native_matmul=native_matmul,
                 platform=platform)

