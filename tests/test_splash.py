"""Splash attention (Pallas TPU kernel): equal to dense attention in Pallas interpret mode on the
CPU, sharded inside shard_map, and compiled inside the real train step for a TPU topology.

The TPU compile needs libtpu (dev requirement `jax[tpu]`); without it these tests FAIL, never skip.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pi_jax import attention as attn_lib
from pi_jax import dispatch, rope
from pi_jax.config import ModelConfig
from pi_jax.run import RunOptions
from pi_jax.train.config import TrainConfig

from tests import tpu_aot
from tests.train_utils import check_sharded_attention


def _pi_config(head_dim):
  # Trained window 96, PI to 384 (linear:4): positions 0..L-1 become fractional 0..(L-1)/4.
  return ModelConfig(vocab_size=32, hidden_size=4 * head_dim, intermediate_size=32, num_layers=1,
                     num_heads=4, num_kv_heads=4, head_dim=head_dim,
                     max_position_embeddings=96).with_rope_scaling("linear:4")


def _pi_attention(attend, config, l):
  """attention(RoPE(q), RoPE(k), v) at PI-scaled global positions, as the model runs it."""
  cos, sin = rope.rope_tables(config, jnp.arange(l, dtype=jnp.int32)[None])
  return lambda q, k, v: attend(rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v)


def _max_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


# (query heads, kv heads, length): GQA groups 1, 3 and 8; three 128-blocks, and 300 (padded).
CASES = [(2, 2, 384), (6, 2, 300), (8, 1, 384)]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("n,kh,l", CASES, ids=["gqa1", "gqa3", "gqa8"])
def test_splash_interpret_equals_reference(n, kh, l, dtype, tol):
  """Outputs and q/k/v gradients of splash (interpret mode, block 128) vs dense float32."""
  h = 32
  ks = jax.random.split(jax.random.key(n + l), 4)
  q = jax.random.normal(ks[0], (1, l, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (1, l, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (1, l, kh, h), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[3], (1, l, n, h), jnp.float32)
  config = _pi_config(h)
  splash = _pi_attention(lambda q, k, v: attn_lib.attention(
      q, k, v, impl="splash", block_size=128, interpret=True), config, l)
  ref = _pi_attention(attn_lib.reference_attention, config, l)

  def out_and_grads(fn, *args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(w.astype(out.dtype))

  got, got_g = jax.jit(functools.partial(out_and_grads, splash))(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want, want_g = out_and_grads(ref, *f32)
  assert got.dtype == dtype and all(g.dtype == dtype for g in got_g)
  assert _max_rel(got, want) < tol
  for name, g, gw in zip("qkv", got_g, want_g):
    assert _max_rel(g, gw) < tol, name


def test_splash_block_size():
  from pi_jax.attention.kernels import splash_block
  assert splash_block(384, 512) == 384
  assert splash_block(1024, 512) == 512
  assert splash_block(384, 256) == 128  # 256 does not divide 384
  assert splash_block(128, 64) == 128  # never below the 128 tile


def test_splash_sharded_in_interpret_mode_on_eight_devices():
  """Inside shard_map over data/fsdp/tensor on 8 fake CPU devices: outputs and gradients."""
  check_sharded_attention("lambda q, k, v: attn_lib.attention(q, k, v, impl='splash', "
                          "block_size=128, interpret=True)", length=256, head_dim=32)


# --- compiled for a TPU topology (libtpu) ------------------------------------------------------

def _tiny_splash_model():
  return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=256).with_rope_scaling("linear:4")


SPLASH_RUN = RunOptions(attention_impl="splash", attention_block_size=256,
                        compute_dtype="bfloat16")


def test_splash_compiles_in_the_real_train_step_for_tpu():
  """trainer.make_train_step with splash, lowered and compiled for v5e:2x2 (4 chips) on a mesh
  fsdp:2 × tensor:2: the Mosaic kernel is in the program, inside a shard_map."""
  model = _tiny_splash_model()
  config = TrainConfig(model=model, seq_len=1024, global_batch=2, loss_chunk=256, run=SPLASH_RUN)
  lowered, compiled = tpu_aot.compile_train_step(model, config,
                                                 tpu_aot.tpu_mesh("v5e:2x2", "fsdp:2,tensor:2"))
  assert "manual_computation" in lowered.as_text() or "shard_map" in lowered.as_text()
  assert "tpu_custom_call" in compiled.as_text()  # splash forward and fused backward
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes > 0


def test_splash_and_auto_on_a_tpu_mesh():
  """Under a mesh of TPU devices, `auto` means splash (ring with a sequence axis); splash
  refuses a sequence axis with a message that names ring."""
  x = jax.ShapeDtypeStruct((2, 512, 4, 16), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 512, 2, 16), jnp.bfloat16)
  bf16 = RunOptions(compute_dtype="bfloat16")
  with jax.set_mesh(tpu_aot.tpu_mesh("v5e:2x2", "fsdp:2,tensor:2")):
    assert dispatch.choose(bf16).attention == "splash"
  with jax.set_mesh(tpu_aot.tpu_mesh("v5e:2x2", "fsdp:2,sequence:2")):
    assert dispatch.choose(bf16).attention == "ring"
    with pytest.raises(ValueError, match="does not split the sequence.*'ring'"):
      jax.eval_shape(lambda q, k, v: attn_lib.attention(q, k, v, impl="splash"), x, kv, kv)


def test_splash_block_sizes_cap_the_partial_dq():
  from pi_jax.attention import kernels
  short = kernels.splash_block_sizes(2048, 512)  # 4 key blocks: the plain fused kernel
  assert short.use_fused_bwd_kernel and short.block_kv_dkv == 512
  mid = kernels.splash_block_sizes(32768, 512)  # 64 tiles: 8 key blocks of 4096 rows
  assert mid.use_fused_bwd_kernel and (mid.block_kv_dkv, mid.block_kv_dkv_compute) == (4096, 512)
  long = kernels.splash_block_sizes(131072, 512)  # 16384-row key blocks: too wide for VMEM
  assert not long.use_fused_bwd_kernel and (long.block_q_dq, long.block_kv_dq) == (512, 512)
  # With segment ids the fused kernel's key block stops at 2048 rows (VMEM).
  assert kernels.splash_block_sizes(16384, 512, segmented=True).block_kv_dkv == 2048
  assert kernels.splash_block_sizes(16384, 512, segmented=True).use_fused_bwd_kernel
  assert not kernels.splash_block_sizes(32768, 512, segmented=True).use_fused_bwd_kernel


def test_splash_wide_key_blocks_equal_reference(monkeypatch):
  """The fused backward with key blocks wider than the compute tile (used from 9 tiles on to
  cap the partial dq): forced here with 2 dq copies on four 128-tiles (500 -> 512 padded)."""
  from pi_jax.attention import kernels
  monkeypatch.setattr(kernels, "MAX_DQ_COPIES", 2)
  sizes = kernels.splash_block_sizes(512, 128)
  assert sizes.use_fused_bwd_kernel
  assert (sizes.block_kv_dkv, sizes.block_kv_dkv_compute) == (256, 128)
  test_splash_interpret_equals_reference(6, 2, 500, jnp.float32, 1e-5)


def test_splash_separate_dq_kernel_equals_reference(monkeypatch):
  """The unfused backward (dq kernel + dk/dv kernel, used past MAX_DKV_BLOCK rows) gives the
  same outputs and gradients: forced here on a short sequence."""
  from pi_jax.attention import kernels
  monkeypatch.setattr(kernels, "MAX_DKV_BLOCK", 0)
  assert not kernels.splash_block_sizes(384, 128).use_fused_bwd_kernel
  test_splash_interpret_equals_reference(6, 2, 300, jnp.float32, 1e-5)


def _largest_tensor_bytes(text: str) -> int:
  """Bytes of the largest tensor<...> type in a lowered (StableHLO) module's text."""
  import re
  sizes = {"bf16": 2, "f32": 4, "i32": 4, "f16": 2}
  best = 0
  for dims, dtype in re.findall(r"tensor<((?:\d+x)+)(bf16|f32|i32|f16)>", text):
    best = max(best, int(np.prod([int(d) for d in dims.split("x") if d])) * sizes[dtype])
  return best


def test_splash_backward_buffers_are_linear_in_length():
  """Guard (lowering only, no compile): at 32768 positions in 512-tiles the splash backward holds
  no buffer larger than MAX_DQ_COPIES copies of a device's q (in float32). The fused kernel's
  partial dq with 512-row key blocks was [L/T, N, L, H]: 64 copies here."""
  from pi_jax.attention import kernels
  n, kh, h, l = 4, 2, 128, 32768
  q = jax.ShapeDtypeStruct((2, l, n, h), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, l, kh, h), jnp.bfloat16)

  def loss(q, k, v):
    return attn_lib.attention(q, k, v, impl="splash", block_size=512).astype(jnp.float32).sum()

  with jax.set_mesh(tpu_aot.tpu_mesh("v5e:2x2", "fsdp:2,tensor:2")):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).as_text()
  device_q_bytes = (2 // 2) * l * (n // 2) * h * 2  # batch over fsdp, heads over tensor
  assert "tpu_custom_call" in text
  # The partial dq is bf16 [B, MAX_DQ_COPIES, N, L, H]; its sum reads it as float32 (one
  # tensor in the lowered text, fused into the reduction by the compiler): 2× that bound.
  ratio = _largest_tensor_bytes(text) / device_q_bytes
  assert ratio <= 2 * kernels.MAX_DQ_COPIES, ratio
