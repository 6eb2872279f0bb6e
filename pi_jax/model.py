"""A pure-functional LLaMA-family decoder: parameters are a plain pytree, the model is functions.

Shape legend (used in every name and einsum in pi_jax):
  B batch, L length (queries), S length (keys / KV cache), D model dim, N query heads,
  K kv heads, G query heads per kv head (N = K·G), H head dim, F mlp dim, V vocab,
  Y layers (the stacked, scanned axis).

Parameters (stacked over layers so the decoder runs under one `jax.lax.scan`):
  embed [V, D]; layers/{attn_norm [Y, D], wq [Y, D, N, H], wk/wv [Y, D, K, H], wo [Y, N, H, D],
  mlp_norm [Y, D], w_gate/w_up [Y, D, F], w_down [Y, F, D]}; final_norm [D]; lm_head [D, V]
  (absent when the embeddings are tied).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pi_jax import attention as attn_lib
from pi_jax import rope
from pi_jax.config import ModelConfig
from pi_jax.sharding import shard

Params = dict


def param_axes(config: ModelConfig) -> Params:
  """Logical axis names of every parameter (the pytree matches `init_params`)."""
  layers = {
      "attn_norm": ("layers", "norm"),
      "wq": ("layers", "embed", "heads", "head_dim"),
      "wk": ("layers", "embed", "kv_heads", "head_dim"),
      "wv": ("layers", "embed", "kv_heads", "head_dim"),
      "wo": ("layers", "heads", "head_dim", "embed"),
      "mlp_norm": ("layers", "norm"),
      "w_gate": ("layers", "embed", "mlp"),
      "w_up": ("layers", "embed", "mlp"),
      "w_down": ("layers", "mlp", "embed"),
  }
  axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("norm",)}
  if not config.tie_word_embeddings:
    axes["lm_head"] = ("embed", "vocab")
  return axes


def param_shapes(config: ModelConfig) -> Params:
  c = config
  y, d, n, k, h, f, v = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                         c.intermediate_size, c.vocab_size)
  layers = {
      "attn_norm": (y, d), "wq": (y, d, n, h), "wk": (y, d, k, h), "wv": (y, d, k, h),
      "wo": (y, n, h, d), "mlp_norm": (y, d), "w_gate": (y, d, f), "w_up": (y, d, f),
      "w_down": (y, f, d),
  }
  shapes = {"embed": (v, d), "layers": layers, "final_norm": (d,)}
  if not c.tie_word_embeddings:
    shapes["lm_head"] = (d, v)
  return shapes


def init_params(config: ModelConfig, key: jax.Array) -> Params:
  """Random parameters: N(0, 0.02) matrices, unit norms (LLaMA's initializer_range)."""
  dtype = jnp.dtype(config.param_dtype)
  shapes = param_shapes(config)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
  keys = jax.random.split(key, len(leaves))
  out = []
  for path, shape, k in zip(paths, leaves, keys):
    if "norm" in path:
      out.append(jnp.ones(shape, dtype))
    else:
      out.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


def abstract_params(config: ModelConfig) -> Params:
  """ShapeDtypeStructs of the parameters, with nothing allocated."""
  return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def count_params(config: ModelConfig) -> int:
  return sum(x.size for x in jax.tree.leaves(abstract_params(config)))


def rms_norm(x_BLD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in float32, cast back before the scale, as LLaMA (and transformers) do."""
  x = x_BLD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return scale_D.astype(x_BLD.dtype) * x.astype(x_BLD.dtype)


def _attention_block(config, layer, x_BLD, cos, sin, cache_kv, cache_index):
  """Pre-norm attention sublayer. Returns (output [B, L, D], updated (k, v) cache or None)."""
  dt = jnp.dtype(config.compute_dtype)
  h_BLD = rms_norm(x_BLD, layer["attn_norm"], config.rms_norm_eps)
  q_BLNH = checkpoint_name(jnp.einsum("BLD,DNH->BLNH", h_BLD, layer["wq"].astype(dt)), "q_proj")
  k_BLKH = checkpoint_name(jnp.einsum("BLD,DKH->BLKH", h_BLD, layer["wk"].astype(dt)), "k_proj")
  v_BLKH = checkpoint_name(jnp.einsum("BLD,DKH->BLKH", h_BLD, layer["wv"].astype(dt)), "v_proj")
  q_BLNH = shard(rope.apply_rope(q_BLNH, cos, sin), ("batch", "length", "act_heads", None))
  k_BLKH = shard(rope.apply_rope(k_BLKH, cos, sin), ("batch", "length", "act_kv_heads", None))
  v_BLKH = shard(v_BLKH, ("batch", "length", "act_kv_heads", None))

  new_cache = None
  if cache_kv is not None:
    k_cache, v_cache = cache_kv
    start = 0 if cache_index is None else cache_index
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BLKH.astype(k_cache.dtype), start, 1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BLKH.astype(v_cache.dtype), start, 1)
    new_cache = (k_cache, v_cache)
  if cache_index is None:  # a full sequence (or a prefill into an empty cache): causal attention
    o_BLNH = attn_lib.attention(q_BLNH, k_BLKH, v_BLKH, impl=config.attention_impl,
                                block_size=config.attention_block_size)
  else:  # decoding: the new queries attend to everything cached so far
    o_BLNH = attn_lib.reference_attention(q_BLNH, new_cache[0].astype(dt), new_cache[1].astype(dt),
                                          q_offset=cache_index,
                                          kv_length=cache_index + q_BLNH.shape[1])
  out_BLD = checkpoint_name(jnp.einsum("BLNH,NHD->BLD", o_BLNH, layer["wo"].astype(dt)),
                            "out_proj")
  return out_BLD, new_cache


def _mlp_block(config, layer, x_BLD):
  dt = jnp.dtype(config.compute_dtype)
  h_BLD = rms_norm(x_BLD, layer["mlp_norm"], config.rms_norm_eps)
  gate_BLF = jnp.einsum("BLD,DF->BLF", h_BLD, layer["w_gate"].astype(dt))
  up_BLF = jnp.einsum("BLD,DF->BLF", h_BLD, layer["w_up"].astype(dt))
  act_BLF = shard(jax.nn.silu(gate_BLF) * up_BLF, ("batch", "length", "act_mlp"))
  return jnp.einsum("BLF,FD->BLD", act_BLF, layer["w_down"].astype(dt))


def _remat_policy(policy: str):
  """The jax.checkpoint policy of a remat name (config.REMAT_POLICIES; docs/tpu.md measures them).

  full: save only each layer's input (compute dtype) and recompute the rest in the backward pass.
  offload: the same, with the saved layer inputs in pinned host memory instead of HBM.
  save_qkv_out: also keep the q/k/v and attention-output projections (cheap matmul outputs,
    (2N + 2K)·H per token), so the backward pass does not redo those four matmuls.
  """
  cp = jax.checkpoint_policies
  if policy == "full":
    return cp.nothing_saveable
  if policy == "offload":
    return cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host")
  if policy == "save_qkv_out":
    return cp.save_only_these_names("q_proj", "k_proj", "v_proj", "out_proj")
  return getattr(cp, policy)


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  # prevent_cse=False: the scan over layers already keeps XLA from merging the recompute with
  # the forward pass (jax.checkpoint's documentation), and the barriers only cost memory.
  return jax.checkpoint(fn, policy=_remat_policy(policy), prevent_cse=False)


def hidden_states(config: ModelConfig, params: Params, tokens_BL: jax.Array,
                  positions_BL: jax.Array | None = None, cache: dict | None = None,
                  cache_index: jax.Array | int | None = None):
  """Final-normed hidden states [B, L, D] in the compute dtype.

  With `cache` ({'k','v': [Y, B, S, K, H]}) also returns the updated cache: cache_index None
  means a prefill of an empty cache from position 0; an index means decode after that many
  cached tokens.
  """
  dt = jnp.dtype(config.compute_dtype)
  b, l = tokens_BL.shape
  if positions_BL is None:
    start = 0 if cache_index is None else cache_index
    positions_BL = jnp.broadcast_to(start + jnp.arange(l, dtype=jnp.int32), (b, l))
  cos, sin = rope.rope_tables(config, positions_BL)
  x_BLD = shard(params["embed"].astype(dt)[tokens_BL], ("batch", "length", "act_embed"))

  def layer_fn(x_BLD, xs):
    layer, cache_kv = xs
    # The one activation remat keeps per layer (the "offload" policy moves it to host memory).
    x_BLD = checkpoint_name(x_BLD, "layer_input")
    a_BLD, new_kv = _attention_block(config, layer, x_BLD, cos, sin, cache_kv, cache_index)
    x_BLD = shard(x_BLD + a_BLD, ("batch", "length", "act_embed"))
    x_BLD = shard(x_BLD + _mlp_block(config, layer, x_BLD), ("batch", "length", "act_embed"))
    return x_BLD, new_kv

  layer_fn = _remat(layer_fn, config.remat)
  cache_xs = None if cache is None else (cache["k"], cache["v"])
  x_BLD, new_kv = jax.lax.scan(layer_fn, x_BLD, (params["layers"], cache_xs))
  # Under remat the final norm is recomputed too: its float32 intermediates ([B, L, D], 4·D bytes
  # a token) are not kept for the backward pass.
  final_norm = functools.partial(rms_norm, eps=config.rms_norm_eps)
  if config.remat != "none":
    final_norm = jax.checkpoint(final_norm)
  x_BLD = final_norm(x_BLD, params["final_norm"])
  if cache is None:
    return x_BLD
  return x_BLD, {"k": new_kv[0], "v": new_kv[1]}


def unembed_matrix(config: ModelConfig, params: Params) -> jax.Array:
  """[D, V] output projection (the transposed embeddings when tied)."""
  return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(config: ModelConfig, params: Params, h_BLD: jax.Array) -> jax.Array:
  w_DV = unembed_matrix(config, params).astype(h_BLD.dtype)
  logits_BLV = jnp.einsum("BLD,DV->BLV", h_BLD, w_DV, preferred_element_type=jnp.float32)
  return shard(logits_BLV, ("batch", "length", "act_vocab"))


def forward(config: ModelConfig, params: Params, tokens_BL: jax.Array,
            positions_BL: jax.Array | None = None) -> jax.Array:
  """Logits float32 [B, L, V] for int32 tokens [B, L]; positions default to 0..L-1."""
  h_BLD = hidden_states(config, params, tokens_BL, positions_BL)
  return logits_from_hidden(config, params, h_BLD)


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype=None) -> dict:
  """An empty KV cache [Y, B, S, K, H] for up to `max_length` tokens."""
  dtype = jnp.dtype(dtype or config.compute_dtype)
  shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
