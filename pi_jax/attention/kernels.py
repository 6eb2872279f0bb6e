"""Vendor attention kernels, imported lazily: they exist only on their own backends.

- cudnn: jax.nn.dot_product_attention's cuDNN flash kernel (NVIDIA GPU, bf16/fp16).
- splash: the Pallas TPU splash-attention kernel with a causal mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pi_jax.attention.reference import group_queries


def backend() -> str:
  return jax.default_backend()


def cudnn_attention(q_BLNH, k_BLKH, v_BLKH):
  """cuDNN flash attention (NVIDIA GPU; bf16 or fp16). Causality comes from is_causal, never a
  dense mask."""
  if backend() != "gpu":
    raise ValueError(f"attention impl 'cudnn' needs an NVIDIA GPU; the JAX backend is {backend()!r}."
                     " Use 'xla_blockwise' (or 'auto').")
  if q_BLNH.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got {q_BLNH.dtype};"
                     " set compute_dtype=bfloat16 or use 'xla_blockwise'.")
  return jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, is_causal=True,
                                      implementation="cudnn")


def splash_attention(q_BLNH, k_BLKH, v_BLKH, *, block_size: int = 512):
  """Pallas TPU splash attention with a lazy causal mask; GQA as one MQA kernel per K/V head."""
  if backend() != "tpu":
    raise ValueError(f"attention impl 'splash' needs a TPU; the JAX backend is {backend()!r}."
                     " Use 'xla_blockwise' (or 'auto').")
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b, l, n, h = q_BLNH.shape
  kh = k_BLKH.shape[2]
  g = n // kh
  pad = (-l) % 128  # the kernel tiles by 128; trailing padding is hidden by the causal mask
  lp = l + pad
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q_BLNH, k_BLKH, v_BLKH = (jnp.pad(x, widths) for x in (q_BLNH, k_BLKH, v_BLKH))
  blk = max(128, min(block_size, lp) // 128 * 128)
  while lp % blk:
    blk -= 128
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                        block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  mask = sm.MultiHeadMask([sm.CausalMask((lp, lp)) for _ in range(g)])
  kernel = sk.make_splash_mqa_single_device(mask=mask, block_sizes=sizes)
  q_BKGLH = (group_queries(q_BLNH, kh) / jnp.sqrt(jnp.float32(h)).astype(q_BLNH.dtype)
             ).transpose(0, 2, 3, 1, 4)  # splash does not scale the scores itself
  k_BKLH, v_BKLH = k_BLKH.transpose(0, 2, 1, 3), v_BLKH.transpose(0, 2, 1, 3)
  out_BKGLH = jax.vmap(jax.vmap(kernel))(q_BKGLH, k_BKLH, v_BKLH)
  return out_BKGLH.transpose(0, 3, 1, 2, 4).reshape(b, lp, n, h)[:, :l]
