"""Ring attention: equal to one device (outputs, gradients, the whole PI model) on 8 fake CPU
devices, load-balanced (work per shard counted at run time), and compiled for a TPU slice."""

import textwrap

import jax
import numpy as np
import pytest

from pi_jax import attention as attn_lib
from pi_jax.attention import ring
from pi_jax.config import ModelConfig
from pi_jax.run import RunOptions
from pi_jax.train.config import TrainConfig
from tests.train_utils import run_on_devices


def test_ring_without_mesh_is_blockwise():
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (1, 30, 4, 8))
  k, v = (jax.random.normal(x, (1, 30, 2, 8)) for x in ks[1:])
  out = attn_lib.attention(q, k, v, impl="ring", block_size=8)
  np.testing.assert_allclose(out, attn_lib.reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_schedule_work_per_shard():
  """The schedule's forward block pairs: zigzag equal on every shard, contiguous 1 : … : 2n−1."""
  n, nb = 8, 4
  zigzag = ring.block_pairs_per_shard(n, "zigzag", nb)
  contiguous = ring.block_pairs_per_shard(n, "contiguous", nb)
  assert np.all(zigzag == zigzag[0])
  assert zigzag.sum() == contiguous.sum()  # the same causal triangle, split differently
  assert contiguous[0] == 2 * nb * nb + nb  # step 0 only: two diagonals and one full pair
  assert contiguous[-1] == contiguous[0] + 4 * (n - 1) * nb * nb  # + every earlier chunk
  # The whole triangle of 2n·nb blocks: (2n·nb)(2n·nb + 1)/2.
  assert zigzag.sum() == (2 * n * nb) * (2 * n * nb + 1) // 2
  assert sorted(ring.shard_chunks(4, "zigzag").ravel().tolist()) == list(range(8))
  with pytest.raises(ValueError, match="layout 'striped'"):
    ring.shard_chunks(4, "striped")


@pytest.mark.parametrize("layout", ring.LAYOUTS)
def test_chunk_starts_are_the_shard_chunks_in_positions(layout):
  """The Pallas ring's traced chunk starts (where each pair reads its ids) agree with
  shard_chunks, the table the XLA ring and the schedule tests use."""
  for n in (1, 2, 4, 8):
    for shard in range(n):
      got = ring._chunk_starts(shard, n, layout, 256)
      assert list(got) == (ring.shard_chunks(n, layout)[shard] * 256).tolist()


_RING_SCRIPT = textwrap.dedent("""
    import sys
    from pi_jax import attention as attn_lib, model, sharding
    from pi_jax.attention import blockwise, ring
    from pi_jax.config import ModelConfig
    from pi_jax.run import RunOptions

    def inputs(l, b=2):
      ks = jax.random.split(jax.random.key(1), 4)
      return (jax.random.normal(ks[0], (b, l, 6, 16)), jax.random.normal(ks[1], (b, l, 2, 16)),
              jax.random.normal(ks[2], (b, l, 2, 16)), jax.random.normal(ks[3], (b, l, 6, 16)))

    def out_and_grads(fn, w):
      def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w)
      return run

    # 1. The kernel alone: outputs and gradients vs dense attention, batch over data, heads over
    # tensor, sequence over 2 shards; 40 / (2·2) = 10-position half-chunks with blocks of 4:
    # padded chunks. (The contiguous layout's outputs are checked in 2.)
    q, k, v, w = inputs(40)
    fn = lambda q, k, v: ring.ring_attention(q, k, v, block_size=4)
    with jax.set_mesh(sharding.make_mesh("data:2,sequence:2,tensor:2")):
      out, grads = jax.jit(out_and_grads(fn, w))(q, k, v)
    want, want_grads = out_and_grads(attn_lib.reference_attention, w)(q, k, v)
    assert rel(out, want) < 1e-5, rel(out, want)
    for g, gw in zip(grads, want_grads):
      assert rel(g, gw) < 1e-5, rel(g, gw)
    print("KERNEL_OK", flush=True)

    # 1b. The TPU ring (the Pallas pair kernel on every chunk pair, one custom VJP round the
    # ring) in interpret mode: both layouts, with and without segment ids (documents crossing the
    # half-chunks of 128, so some query rows see no key of a chunk), outputs and gradients.
    q, k, v, w = inputs(1024)
    seg = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 6, (2, 1024)), axis=1),
                      jnp.int32)
    for layout in ring.LAYOUTS:
      for ids in (None, seg):
        fn = lambda q, k, v: ring.ring_attention(q, k, v, block_size=128, layout=layout,
                                                 segment_ids_BL=ids, interpret=True)
        with jax.set_mesh(sharding.make_mesh("data:2,sequence:4")):
          out, grads = jax.jit(out_and_grads(fn, w))(q, k, v)
          assert "pallas_call" in str(jax.make_jaxpr(fn)(q, k, v)), "not the Pallas ring"
        dense = lambda q, k, v: attn_lib.reference_attention(q, k, v, segment_ids_BL=ids)
        want, want_grads = out_and_grads(dense, w)(q, k, v)
        assert rel(out, want) < 1e-5, (layout, ids is None, rel(out, want))
        for g, gw in zip(grads, want_grads):
          assert rel(g, gw) < 1e-5, (layout, ids is None, rel(g, gw))
    print("PALLAS_RING_OK", flush=True)

    # 2. Work per shard, counted at run time: every query-key block product the forward pass
    # executes reports its shard (a block product of a batch stacked s times counts s).
    calls = []
    original = blockwise._scores
    def counting_scores(q, k, scale):
      stacked = q.shape[0]  # static: the batch of this block product
      jax.debug.callback(lambda i: calls.append((int(i), stacked)), jax.lax.axis_index("sequence"))
      return original(q, k, scale)
    blockwise._scores = counting_scores
    n, nb, t = 8, 2, 8
    q, k, v, _ = inputs(2 * n * nb * t, b=1)
    counted = {}
    for layout in ring.LAYOUTS:
      calls.clear()
      with jax.set_mesh(sharding.make_mesh(f"sequence:{n}")):
        out = jax.jit(lambda q, k, v: ring.ring_attention(q, k, v, block_size=t, layout=layout))(q, k, v)
      jax.block_until_ready(out)
      jax.effects_barrier()
      per_shard = np.zeros(n, np.int64)
      for i, b in calls:
        per_shard[i] += b
      counted[layout] = per_shard
      expected = ring.block_pairs_per_shard(n, layout, nb)
      assert per_shard.tolist() == expected.tolist(), (layout, per_shard, expected)
      assert rel(out, attn_lib.reference_attention(q, k, v)) < 1e-5, layout
    blockwise._scores = original
    assert len(set(counted["zigzag"].tolist())) == 1, counted
    print("COUNTS", {k: v.tolist() for k, v in counted.items()}, flush=True)

    # 3. The whole model with PI (linear:4): global positions reach every shard's RoPE.
    base = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2,
                       num_heads=6, num_kv_heads=2,
                       max_position_embeddings=16).with_rope_scaling("linear:4")
    params = model.init_params(base, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 64), 0, 97)
    ref_run = RunOptions(attention_impl="reference")
    want = model.forward(base, params, tokens, run=ref_run)
    loss_fn = lambda run: (lambda p: jnp.mean(
        jax.nn.log_softmax(model.forward(base, p, tokens, run=run))[..., 0]))
    model_grads = "grads" in sys.argv[1:]
    want_g = jax.grad(loss_fn(ref_run))(params) if model_grads else None
    ring_run = RunOptions(attention_impl="ring", attention_block_size=4)
    for spec, with_grads in (("data:2,sequence:4", model_grads),):
      with jax.set_mesh(sharding.make_mesh(spec)):
        fwd = jax.jit(lambda p, t: model.forward(base, p, t, run=ring_run))
        got = fwd(params, tokens)
        hlo = fwd.lower(params, tokens).as_text()
        got_g = jax.jit(jax.grad(loss_fn(ring_run)))(params) if with_grads else None
      assert "collective_permute" in hlo or "collective-permute" in hlo, "no ring in the program"
      assert rel(got, want) < 1e-5, (spec, rel(got, want))
      if with_grads:
        for (path, g), (_, gw) in zip(jax.tree_util.tree_leaves_with_path(got_g),
                                      jax.tree_util.tree_leaves_with_path(want_g)):
          assert rel(g, gw) < 1e-4, (spec, jax.tree_util.keystr(path), rel(g, gw))
    # The PI scaling matters at these positions: without it the result differs.
    plain = model.forward(base.with_rope_scaling("none").replace(max_position_embeddings=64),
                          params, tokens, run=ref_run)
    assert rel(plain, want) > 1e-3
    print("RING_OK")
""")


def _run_ring_script(*args):
  return run_on_devices(_RING_SCRIPT, *args, marker="RING_OK", timeout=1800)


def test_ring_attention_on_eight_devices_equals_single_device():
  """Kernel outputs and gradients (the XLA ring, and the TPU ring's Pallas kernel in interpret mode,
  with and without segment ids), the work per shard counted at run time (zigzag: equal on
  every shard; contiguous: the schedule's 1 : 3 : … ratio) with both layouts' outputs, and the
  whole PI model's logits, on 8 fake CPU devices."""
  out = _run_ring_script()
  assert "COUNTS" in out and "PALLAS_RING_OK" in out


@pytest.mark.slow
def test_ring_attention_whole_model_gradients():
  """As above, plus every parameter gradient of the PI model on mesh data:2,sequence:4."""
  _run_ring_script("grads")


# --- compiled for a TPU slice (libtpu) ---------------------------------------------------------

@pytest.mark.slow  # over 90 s of CPU per length for the TPU compiler on the test host
@pytest.mark.parametrize("seq_len", [32768, 131072], ids=["32K", "128K"])
def test_ring_compiles_in_the_real_train_step_for_tpu(seq_len):
  """trainer.make_train_step with zigzag ring attention, compiled for v5e:2x4 (8 chips) on a mesh
  fsdp:2 × sequence:4, PI linear:4: the K/V ring (collective-permute) and the pair kernels
  (tpu_custom_call) are in the program."""
  from tests import tpu_aot
  model = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=seq_len // 4).with_rope_scaling("linear:4")
  config = TrainConfig(model=model, seq_len=seq_len, global_batch=2, loss_chunk=1024,
                       run=RunOptions(attention_impl="ring", compute_dtype="bfloat16"))
  _, compiled = tpu_aot.compile_train_step(model, config,
                                           tpu_aot.tpu_mesh("v5e:2x4", "fsdp:2,sequence:4"))
  text = compiled.as_text()
  assert "collective-permute" in text
  assert "tpu_custom_call" in text  # pair_flash on every chunk pair
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes > 0
