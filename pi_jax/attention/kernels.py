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
import inspect
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pi_jax import sharding as sharding_lib
from pi_jax.attention.blockwise import RESIDUALS_NAME

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
MAX_DQ_COPIES = 8
MAX_DKV_BLOCK = 4096


def splash_block_sizes(length: int, blk: int, max_dq_copies: int | None = None):
  """Splash's BlockSizes for a padded `length` and tile `blk` (see MAX_DQ_COPIES, the default
  of max_dq_copies); with max_dq_copies=0, always the separate dq kernel."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  if max_dq_copies is None:
    max_dq_copies = MAX_DQ_COPIES
  n = length // blk
  per_block = next(d for d in range(-(-n // max(max_dq_copies, 1)), n + 1) if n % d == 0)
  fused = max_dq_copies > 0 and per_block * blk <= MAX_DKV_BLOCK
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
  pad = (-l) % SPLASH_TILE  # trailing padding is hidden from every real query by the causal mask
  lp = l + pad
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q_BLNH, k_BLKH, v_BLKH = (jnp.pad(x, widths) for x in (q_BLNH, k_BLKH, v_BLKH))
    if seg_BL is not None:  # padding is a segment of its own: its queries see only padding
      seg_BL = jnp.pad(seg_BL, ((0, 0), (0, pad)), constant_values=-1)
  blk = splash_block(lp, block_size)
  sizes = splash_block_sizes(lp, blk)
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


# --- splash on one chunk pair, for ring attention ---------------------------------------------

# Ring attention's pairs use splash's separate dq kernel (no partial dq copies; Q·Kᵀ computed
# again): with the fused kernel's 8 copies the ring's per-chip memory for 7B at 128K on a
# v5p-128 (fsdp 8 × sequence 8) was 23.47 GiB of temporaries, with the separate one 16.68 GiB.
RING_DQ_COPIES = 0


def splash_pair_kernel(length: int, num_heads: int, block_size: int, causal: bool,
                       interpret: bool):
  """A splash kernel for one query chunk against one key chunk, both `length` positions (a
  multiple of 128): causal (the chunk against itself) or full (against an earlier chunk). It
  returns the log-sum-exp beside the output, which ring attention merges by."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  blk = splash_block(length, block_size)
  shape = (length, length)
  one = sm.CausalMask(shape) if causal else sm.FullMask(shape)
  return sk.make_splash_mha(mask=sm.MultiHeadMask([one] * num_heads),
                            block_sizes=splash_block_sizes(length, blk, RING_DQ_COPIES),
                            head_shards=1, q_seq_shards=1, save_residuals=True,
                            interpret=interpret)


def _segment_ids(q_seg_C, kv_seg_C):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  return None if q_seg_C is None else sk.SegmentIds(q=q_seg_C, kv=kv_seg_C)


def splash_pair(kernel, q_BNCH, k_BKCH, v_BKCH, q_seg_BC=None, kv_seg_BC=None):
  """(out [B, N, C, H] in q's dtype, lse [B, N, C] float32) of `kernel` (splash_pair_kernel) on
  scaled queries, vmapped over the batch. A query row with no visible key (its document has no
  key in this chunk) gets lse ≈ the mask value: weight exactly 0 in a log-sum-exp merge."""
  def one(q, k, v, q_seg, kv_seg):
    out, (lse,) = kernel(q, k, v, segment_ids=_segment_ids(q_seg, kv_seg))
    return out, lse
  return jax.vmap(one)(q_BNCH, k_BKCH, v_BKCH, q_seg_BC, kv_seg_BC)


# splash_pair_grads calls splash's backward, a private function of jax, with these arguments
# (jax 0.10.2, as requirements.txt pins).
SPLASH_BWD_PARAMS = ("save_residuals", "mask_value", "is_mqa", "block_sizes",
                     "residual_checkpoint_name", "mask_function", "attn_logits_soft_cap",
                     "interpret", "res", "do")


def splash_pair_unsupported() -> str | None:
  """Why this jax's splash cannot run ring attention's chunk pairs (its private backward is
  missing or takes other arguments), or None when it can."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  fn = getattr(sk, "_splash_attention_bwd", None)
  if fn is None:
    return f"jax {jax.__version__}'s splash has no _splash_attention_bwd"
  params = tuple(inspect.signature(fn).parameters)
  if params != SPLASH_BWD_PARAMS:
    return (f"jax {jax.__version__}'s splash _splash_attention_bwd takes {params}, not "
            f"{SPLASH_BWD_PARAMS}")
  return None


def splash_pair_grads(kernel, q_BNCH, k_BKCH, v_BKCH, q_seg_BC, kv_seg_BC, out_BNCH, lse_BNC,
                      dout_BNCH):
  """(dq, dk, dv) of one chunk pair's share of an attention whose softmax spans more keys:
  `out` and `lse` are those of the WHOLE attention (all chunks merged), so the probabilities
  exp(s − lse) and the row terms Σ out·dout are the global ones and the shares of all chunk
  pairs sum to the gradient. Splash's own backward kernels (the jax version requirements.txt
  pins; splash has no public entry point that takes outside statistics)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  kw = kernel.kwargs
  # What _splash_attention does to the mask infos before its custom VJP (a no-op for static
  # masks of one partial-block table, kept so the kernels see what they always see).
  collapse = lambda info: None if info is None or info.partial_mask_blocks is None else (
      info._replace(partial_mask_blocks=info.partial_mask_blocks.reshape(
          -1, *info.partial_mask_blocks.shape[-2:])))
  dq_info = collapse(kernel.dq_mask_info) or kernel.dq_mask_info
  dkv_info = collapse(kernel.dkv_mask_info) or kernel.dkv_mask_info

  def one(q, k, v, q_seg, kv_seg, out, lse, dout):
    res = (q, k, v, _segment_ids(q_seg, kv_seg), None, out, lse, dq_info, dkv_info)
    grads = sk._splash_attention_bwd(  # pylint: disable=protected-access
        False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None, kw["mask_function"],
        kw["attn_logits_soft_cap"], kw["interpret"], res, dout)
    return grads[3:6]
  return jax.vmap(one)(q_BNCH, k_BKCH, v_BKCH, q_seg_BC, kv_seg_BC, out_BNCH, lse_BNC, dout_BNCH)
