"""Vendor attention kernels, imported lazily: they exist only on their own backends.

- cudnn: jax.nn.dot_product_attention's cuDNN flash kernel (NVIDIA GPU, bf16/fp16).
- splash: the Pallas TPU splash-attention kernel with a causal mask (and its SegmentIds for
  document masking), inside `shard_map`.

The platform is the one the program is compiled FOR: under `jax.set_mesh`, that of the mesh's
devices (a mesh over TPU topology devices compiles for TPU from a CPU host), else the default
backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pi_jax import sharding as sharding_lib
from pi_jax.attention.blockwise import RESIDUALS_NAME, per_call

# Splash tiles the sequence by this many positions (the TPU lane width).
SPLASH_TILE = 128


def backend() -> str:
  """The platform the current computation targets (see the module docstring)."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def cudnn_attention(q_BLNH, k_BLKH, v_BLKH):
  """cuDNN flash attention (NVIDIA GPU; bf16 or fp16). Causality comes from is_causal, never a
  dense mask."""
  if backend() != "gpu":
    raise ValueError(f"attention impl 'cudnn' needs an NVIDIA GPU; the JAX backend is {backend()!r}."
                     " Use 'xla_blockwise' (or 'auto').")
  if q_BLNH.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got {q_BLNH.dtype};"
                     " set run.compute_dtype=bfloat16 or use 'xla_blockwise'.")
  return jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, is_causal=True,
                                      implementation="cudnn")


def splash_block(length: int, block_size: int) -> int:
  """The splash tile: the largest multiple of 128 that is ≤ block_size and divides `length`
  (itself a multiple of 128)."""
  blk = max(SPLASH_TILE, min(block_size, length) // SPLASH_TILE * SPLASH_TILE)
  while length % blk:
    blk -= SPLASH_TILE
  return blk


# Splash's fused backward kernel (dq, dk and dv in one pass) writes one partial dq per key block
# of `block_kv_dkv` rows, [L/T, N, L, H] in the compute dtype, and sums them afterwards: with
# T = the 512 tile that is quadratic in L (16 GiB per chip for 7B at 32K). The key block is
# therefore widened to L/MAX_DQ_COPIES rows (the kernel still computes in tile-wide steps), so
# the partial dq is at most MAX_DQ_COPIES copies of dq: linear in L. A wider key block computes
# the masked tiles of the diagonal block too (+~11% of the backward's attention work at 8
# copies). Past MAX_DKV_BLOCK rows (its k, v and float32 dk, dv accumulators live in VMEM) the
# separate dq kernel is used instead: no partial dq, but Q·Kᵀ and dO·Vᵀ computed twice.
# With segment ids the fused dk/dv kernel also holds the ids' blocks (the queries' lane-wide):
# at 4096 key rows, head dim 128, it asks Mosaic for 17.03 MiB of VMEM, over the 16 MiB scoped
# limit, and 7B at 32K with packing=documents did not compile (8 Dec 2026). It fits at 2048.
MAX_DQ_COPIES = 8
MAX_DKV_BLOCK = 4096
MAX_DKV_BLOCK_SEGMENTED = 2048


def splash_block_sizes(length: int, blk: int, segmented: bool = False):
  """Splash's BlockSizes for a padded `length` and tile `blk` (see MAX_DQ_COPIES); segmented:
  with segment ids (MAX_DKV_BLOCK_SEGMENTED)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  n = length // blk
  per_block = next(d for d in range(-(-n // MAX_DQ_COPIES), n + 1) if n % d == 0)
  fused = per_block * blk <= (MAX_DKV_BLOCK_SEGMENTED if segmented else MAX_DKV_BLOCK)
  dq = {} if fused else {"block_q_dq": blk, "block_kv_dq": blk}
  return sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                       block_kv_dkv=per_block * blk if fused else blk, block_kv_dkv_compute=blk,
                       use_fused_bwd_kernel=fused, **dq)


def splash_scale(q_BLNH):
  """Splash does not scale the scores: q·1/√H once, in float32, back in the compute dtype."""
  return (q_BLNH.astype(jnp.float32) * (1.0 / math.sqrt(q_BLNH.shape[-1]))).astype(q_BLNH.dtype)


def _splash_local(q_BLNH, k_BLKH, v_BLKH, seg_BL=None, *, block_size: int, interpret: bool):
  """Splash on one device's arrays: GQA natively (q head n reads kv head n // G), vmapped over B.
  seg_BL: segment ids [B, L] or None, splash's SegmentIds for both queries and keys."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  _, l, n, _ = q_BLNH.shape
  seg_BL = per_call(seg_BL, q_BLNH)  # splash's lane-wide copy of the ids lives per call
  pad = (-l) % SPLASH_TILE  # trailing padding is hidden from every real query by the causal mask
  lp = l + pad
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q_BLNH, k_BLKH, v_BLKH = (jnp.pad(x, widths) for x in (q_BLNH, k_BLKH, v_BLKH))
    if seg_BL is not None:  # padding is a segment of its own: its queries see only padding
      seg_BL = jnp.pad(seg_BL, ((0, 0), (0, pad)), constant_values=-1)
  blk = splash_block(lp, block_size)
  sizes = splash_block_sizes(lp, blk, segmented=seg_BL is not None)
  mask = sm.MultiHeadMask([sm.CausalMask((lp, lp)) for _ in range(n)])
  kernel = sk.make_splash_mha(mask=mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              residual_checkpoint_name=RESIDUALS_NAME, interpret=interpret)
  q_BLNH = splash_scale(q_BLNH)
  qkv = (q_BLNH.transpose(0, 2, 1, 3), k_BLKH.transpose(0, 2, 1, 3), v_BLKH.transpose(0, 2, 1, 3))
  if seg_BL is None:
    out_BNLH = jax.vmap(kernel)(*qkv)
  else:
    masked = lambda q, k, v, seg_L: kernel(q, k, v, segment_ids=sk.SegmentIds(q=seg_L, kv=seg_L))
    out_BNLH = jax.vmap(masked)(*qkv, seg_BL.astype(jnp.int32))
  return out_BNLH.transpose(0, 2, 1, 3)[:, :l]


def splash_attention(q_BLNH, k_BLKH, v_BLKH, *, block_size: int = 512, interpret: bool = False,
                     segment_ids_BL=None):
  """Pallas TPU splash attention with a lazy causal mask (no L×L mask is ever built).

  Under a mesh the kernel runs inside `shard_map` (XLA cannot partition a Mosaic kernel; see
  `over_batch_and_heads`). `interpret=True` runs the same kernel in Pallas interpret mode on any
  backend (tests on CPU). segment_ids_BL (int [B, L] or None): document masking, by splash's
  SegmentIds.
  """
  if not interpret and backend() != "tpu":
    raise ValueError(f"attention impl 'splash' needs a TPU; the JAX backend is {backend()!r}."
                     " Use 'xla_blockwise' (or 'auto').")
  fn = functools.partial(_splash_local, block_size=block_size, interpret=interpret)
  return over_batch_and_heads(fn, "splash", q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)


def over_batch_and_heads(fn, name: str, q_BLNH, k_BLKH, v_BLKH, segment_ids_BL=None):
  """fn(q, k, v) -> out on each device's part of a mesh, for a kernel XLA cannot partition;
  fn(q, k, v, segment_ids) when segment ids [B, L] are given (split over batch like q).

  Inside `shard_map`: batch split over data/fsdp and heads over tensor where they divide (heads
  only when the kv heads divide too, so GQA groups stay whole), the rest replicated. The
  sequence is not split: a mesh with a `sequence` axis > 1 is refused (use ring). Without a
  mesh (or on one device), fn runs as it is.
  """
  args = (q_BLNH, k_BLKH, v_BLKH) + (() if segment_ids_BL is None else (segment_ids_BL,))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  mesh_shape = dict(mesh.shape)
  (seq_axis,) = sharding_lib.LOGICAL_AXIS_RULES["length"]
  if mesh_shape.get(seq_axis, 1) > 1:
    raise ValueError(
        f"attention impl {name!r} does not split the sequence, and the mesh's {seq_axis!r} axis "
        f"has size {mesh_shape[seq_axis]}: use run.attention_impl='ring' (context parallelism over "
        f"{seq_axis!r}), or a mesh without a {seq_axis!r} axis")
  q_spec = sharding_lib.logical_to_spec(("batch", None, "act_heads", None), q_BLNH.shape,
                                        mesh_shape)
  kv_spec = sharding_lib.logical_to_spec(("batch", None, "act_kv_heads", None), k_BLKH.shape,
                                         mesh_shape)
  if q_spec[2] != kv_spec[2]:  # heads split only when query and kv heads split alike
    q_spec = kv_spec = P(q_spec[0], None, None, None)
  specs = (q_spec, kv_spec, kv_spec, P(q_spec[0], None))[:len(args)]
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=q_spec,
                       check_vma=False)(*args)
