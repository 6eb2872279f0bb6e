"""The LLaMA-family decoder: parameters declared once in Flax NNX modules, run as pure functions.

`Llama` (an `nnx.Module`) and its stacked `DecoderLayer`s declare every parameter once: shape,
initializer and logical axes (the Params' `out_sharding` metadata, read by pi_jax.sharding's
axis table). Everything else is derived from them: `param_shapes`, `param_axes`,
`abstract_params` (nnx.eval_shape: nothing is allocated) and `init_params`. The parameter
pytree is the plain dict `nnx.to_pure_dict(nnx.state(model, nnx.Param))`, and the functional API
takes it: `forward(config, params, tokens)` is `Llama.from_params(config, params)(tokens)`.

The layers are built by `nnx.vmap` (every parameter gets a leading [Y] axis named "layers") and
run under one `jax.lax.scan` over their pure arrays; the scan body views one layer's slice as a
`DecoderLayer` (`nnx.merge`), so compile time does not grow with depth. RoPE, attention,
the loss and sharding are plain JAX.

Shape legend (the suffix of every array name and the letters of every einsum in pi_jax):
  B batch; L length (queries); S length of the keys / KV cache; D model dim; N query heads;
  K kv heads; G query heads per kv head (N = K·G); H head dim; h = H/2 (RoPE's rotated pairs);
  F mlp dim; V vocab; Y layers (the stacked, scanned axis).
  Blocked attention (attention/): R query rows and T key columns of one block; C the sequence
  length one device holds (ring attention).
  Generation: P the padded prompt length. Loss: C chunks of T positions. Passkey: M the scored
  key positions. Training: T the joined token stream (pipeline); G the global batch and A
  micro-batches of gradient accumulation (train step); L1 = L + 1 (token rows with their next
  token). A literal 1 is an axis of size one (B1, B1D).

Parameters (stacked over layers; `param_shapes` derives the same tree):
  embed [V, D]; layers/{attn_norm [Y, D], wq [Y, D, N, H], wk/wv [Y, D, K, H], wo [Y, N, H, D],
  mlp_norm [Y, D], w_gate/w_up [Y, D, F], w_down [Y, F, D]}; final_norm [D]; lm_head [D, V]
  (absent when the embeddings are tied).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pi_jax import attention as attn_lib
from pi_jax import dispatch, rope
from pi_jax.config import ModelConfig
from pi_jax.inputs import check_token_ids
from pi_jax.linear import project
from pi_jax.run import RunOptions
from pi_jax.sharding import shard

Params = dict
INIT_STDDEV = 0.02  # LLaMA's initializer_range


def normal_init(key, shape, dtype):
  """N(0, 0.02) drawn in float32, then cast (so bf16 parameters get the same distribution)."""
  return (INIT_STDDEV * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def ones_init(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
  """A Param with its logical axes as metadata. Eager sharding stays off: pi_jax.sharding maps
  the names through its axis table (with the divisibility fallback) when it places arrays."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def rms_norm(x_BLD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in float32, cast back before the scale, as LLaMA (and transformers) do."""
  x = x_BLD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return scale_D.astype(x_BLD.dtype) * x.astype(x_BLD.dtype)


class DecoderLayer(nnx.Module):
  """One pre-norm LLaMA block: attention then SwiGLU MLP, each added to the residual."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, param_dtype: str = "float32"):
    c = config
    d, n, k, h, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    dt = jnp.dtype(param_dtype)
    self.config = config
    self.attn_norm = _param(rngs, ones_init, (d,), ("norm",), dt)
    self.wq = _param(rngs, normal_init, (d, n, h), ("embed", "heads", "head_dim"), dt)
    self.wk = _param(rngs, normal_init, (d, k, h), ("embed", "kv_heads", "head_dim"), dt)
    self.wv = _param(rngs, normal_init, (d, k, h), ("embed", "kv_heads", "head_dim"), dt)
    self.wo = _param(rngs, normal_init, (n, h, d), ("heads", "head_dim", "embed"), dt)
    self.mlp_norm = _param(rngs, ones_init, (d,), ("norm",), dt)
    self.w_gate = _param(rngs, normal_init, (d, f), ("embed", "mlp"), dt)
    self.w_up = _param(rngs, normal_init, (d, f), ("embed", "mlp"), dt)
    self.w_down = _param(rngs, normal_init, (f, d), ("mlp", "embed"), dt)

  def attention(self, x_BLD, cos, sin, kernels: dispatch.Kernels, cache_kv=None,
                cache_index=None, segment_ids_BL=None):
    """Pre-norm attention sublayer: (output [B, L, D], updated (k, v) cache or None)."""
    config = self.config
    dt, native = x_BLD.dtype, kernels.native_matmul
    h_BLD = rms_norm(x_BLD, self.attn_norm[...], config.rms_norm_eps)
    q_BLNH = checkpoint_name(project(h_BLD, self.wq[...].astype(dt), native=native), "q_proj")
    k_BLKH = checkpoint_name(project(h_BLD, self.wk[...].astype(dt), native=native), "k_proj")
    v_BLKH = checkpoint_name(project(h_BLD, self.wv[...].astype(dt), native=native), "v_proj")
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
      o_BLNH = kernels.attend(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL=segment_ids_BL)
    else:  # decoding: the new queries attend to everything cached so far
      o_BLNH = kernels.attend_cached(q_BLNH, new_cache[0].astype(dt), new_cache[1].astype(dt),
                                     offset=cache_index, length=cache_index + q_BLNH.shape[1])
    out_BLD = checkpoint_name(
        project(o_BLNH, self.wo[...].astype(dt), contract=2, native=native), "out_proj")
    return out_BLD, new_cache

  def mlp(self, x_BLD, kernels: dispatch.Kernels):
    dt, native = x_BLD.dtype, kernels.native_matmul
    h_BLD = rms_norm(x_BLD, self.mlp_norm[...], self.config.rms_norm_eps)
    gate_BLF = project(h_BLD, self.w_gate[...].astype(dt), native=native)
    up_BLF = project(h_BLD, self.w_up[...].astype(dt), native=native)
    act_BLF = shard(jax.nn.silu(gate_BLF) * up_BLF, ("batch", "length", "act_mlp"))
    return project(act_BLF, self.w_down[...].astype(dt), native=native)

  def __call__(self, x_BLD, cos, sin, kernels: dispatch.Kernels, cache_kv=None,
               cache_index=None, segment_ids_BL=None):
    """(x + attention + MLP [B, L, D] in x's dtype, updated (k, v) cache or None)."""
    a_BLD, new_kv = self.attention(x_BLD, cos, sin, kernels, cache_kv, cache_index,
                                   segment_ids_BL)
    x_BLD = shard(x_BLD + a_BLD, ("batch", "length", "act_embed"))
    x_BLD = shard(x_BLD + self.mlp(x_BLD, kernels), ("batch", "length", "act_embed"))
    return x_BLD, new_kv


def _remat_policy(policy: str):
  """The jax.checkpoint policy of a remat name (config.REMAT_POLICIES; docs/tpu.md).

  full: save only each layer's input (compute dtype) and recompute the rest in the backward pass.
  offload: the same, with the saved layer inputs in pinned host memory instead of HBM.
  save_qkv_out: also keep the q/k/v and attention-output projections (cheap matmul outputs,
    (2N + 2K)·H per token), so the backward pass does not redo those four matmuls.
  save_attention: also keep the attention kernel's output and log-sum-exp (splash, xla_blockwise
    and ring: N·H per token in the kernel's output dtype plus 4·N), so the backward pass does
    not run the attention forward again: the long-context lever against remat's recompute.
  offload_save_attention: both: layer inputs in host memory, attention residuals kept.
  """
  cp = jax.checkpoint_policies
  if policy == "full":
    return cp.nothing_saveable
  if policy in ("offload", "offload_save_attention"):
    kept = [attn_lib.RESIDUALS_NAME] if policy == "offload_save_attention" else []
    return cp.save_and_offload_only_these_names(
        names_which_can_be_saved=kept, names_which_can_be_offloaded=["layer_input"],
        offload_src="device", offload_dst="pinned_host")
  if policy == "save_qkv_out":
    return cp.save_only_these_names("q_proj", "k_proj", "v_proj", "out_proj")
  if policy == "save_attention":
    return cp.save_only_these_names(attn_lib.RESIDUALS_NAME)
  return getattr(cp, policy)


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  # prevent_cse=False: the scan over layers already keeps XLA from merging the recompute with
  # the forward pass (jax.checkpoint's documentation), and the barriers only cost memory.
  return jax.checkpoint(fn, policy=_remat_policy(policy), prevent_cse=False)


class Llama(nnx.Module):
  """A LLaMA-family causal LM as a Flax NNX module: `Llama(config, rngs=nnx.Rngs(0))`.

  `model(tokens)` equals `forward(config, params, tokens)` for
  `params = nnx.to_pure_dict(nnx.state(model, nnx.Param))`; `Llama.from_params(config, params)`
  goes the other way (no copy).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, param_dtype: str = "float32"):
    c = config
    dt = jnp.dtype(param_dtype)
    self.config = config
    self.embed = _param(rngs, normal_init, (c.vocab_size, c.hidden_size), ("vocab", "embed"), dt)

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked_layers(rngs):
      return DecoderLayer(config, rngs=rngs, param_dtype=param_dtype)

    self.layers = stacked_layers(rngs)  # every parameter [Y, ...]
    self.final_norm = _param(rngs, ones_init, (c.hidden_size,), ("norm",), dt)
    if not c.tie_word_embeddings:
      self.lm_head = _param(rngs, normal_init, (c.hidden_size, c.vocab_size), ("embed", "vocab"),
                            dt)

  @classmethod
  def from_params(cls, config: ModelConfig, params: Params) -> Llama:
    """The module holding `params` (the plain parameter dict); works on tracers under jit."""
    try:
      return nnx.merge(_model_graphdef(config), params)
    except (ValueError, KeyError, TypeError) as e:
      def paths(tree, is_leaf=None):
        return {jax.tree_util.keystr(p) for p, _ in
                jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}
      want = paths(param_shapes(config), lambda x: isinstance(x, tuple))
      got = paths(params)
      raise ValueError(f"parameters do not match the config: missing {sorted(want - got)}, "
                       f"unexpected {sorted(got - want)} ({e})") from None

  def hidden_states(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None,
                    cache: dict | None = None, cache_index: jax.Array | int | None = None,
                    segment_ids_BL: jax.Array | None = None, *,
                    run: RunOptions | None = None):
    """See `hidden_states`."""
    config, run = self.config, run or RunOptions()
    kernels = dispatch.choose(run)
    check_token_ids(tokens_BL, config.vocab_size)  # outside jit; a no-op on traced ids
    dt = jnp.dtype(run.compute_dtype)
    b, l = tokens_BL.shape
    if segment_ids_BL is not None:
      if cache is not None:
        raise ValueError("segment ids are for training and scoring whole rows; generation (a KV "
                         "cache) runs one document per row")
      if tuple(segment_ids_BL.shape) != (b, l):
        raise ValueError(f"segment ids of shape {tuple(segment_ids_BL.shape)} do not match the "
                         f"tokens {(b, l)}")
      segment_ids_BL = shard(segment_ids_BL.astype(jnp.int32), ("batch", "length"))
      if positions_BL is None:
        positions_BL = positions_from_segments(segment_ids_BL)
    if positions_BL is None:
      start = 0 if cache_index is None else cache_index
      positions_BL = jnp.broadcast_to(start + jnp.arange(l, dtype=jnp.int32), (b, l))
    cos, sin = rope.rope_tables(config, positions_BL)
    x_BLD = shard(self.embed[...].astype(dt)[tokens_BL], ("batch", "length", "act_embed"))
    layer_def = _layer_graphdef(config)

    def layer_fn(x_BLD, xs):
      layer_params, cache_kv = xs
      layer = nnx.merge(layer_def, layer_params)  # this layer's [Y] slice as a DecoderLayer
      # The one activation remat keeps per layer (the "offload" policy moves it to host memory).
      x_BLD = checkpoint_name(x_BLD, "layer_input")
      return layer(x_BLD, cos, sin, kernels, cache_kv, cache_index, segment_ids_BL)

    layer_fn = _remat(layer_fn, run.remat)
    cache_xs = None if cache is None else (cache["k"], cache["v"])
    stacked = nnx.to_pure_dict(nnx.state(self.layers, nnx.Param))
    x_BLD, new_kv = jax.lax.scan(layer_fn, x_BLD, (stacked, cache_xs))
    # Under remat the final norm is recomputed too: its float32 intermediates ([B, L, D], 4·D
    # bytes a token) are not kept for the backward pass.
    final_norm = functools.partial(rms_norm, eps=config.rms_norm_eps)
    if run.remat != "none":
      final_norm = jax.checkpoint(final_norm)
    x_BLD = final_norm(x_BLD, self.final_norm[...])
    if cache is None:
      return x_BLD
    return x_BLD, {"k": new_kv[0], "v": new_kv[1]}

  def logits_from_hidden(self, h_BLD: jax.Array, *, run: RunOptions | None = None) -> jax.Array:
    # Tied: h @ embed.T ([V, D] read transposed, never copied); else h @ lm_head [D, V].
    tied = self.config.tie_word_embeddings
    w = (self.embed if tied else self.lm_head)[...].astype(h_BLD.dtype)
    logits_BLV = project(h_BLD, w, transpose_w=tied, preferred_element_type=jnp.float32,
                         native=dispatch.choose(run).native_matmul)
    return shard(logits_BLV, ("batch", "length", "act_vocab"))

  def __call__(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None,
               segment_ids_BL: jax.Array | None = None, *,
               run: RunOptions | None = None) -> jax.Array:
    """Logits float32 [B, L, V] for int32 tokens [B, L]; see `forward`."""
    return self.logits_from_hidden(
        self.hidden_states(tokens_BL, positions_BL, segment_ids_BL=segment_ids_BL, run=run),
        run=run)


# --- what the modules declare, derived without allocating -------------------------------------

def _unsharded_eval_shape(fn):
  """nnx.eval_shape outside any mesh: the Params' logical axes ('norm', 'embed', ...) are not
  mesh axes, and pi_jax.sharding maps them; under `jax.set_mesh` (a train or eval step being
  traced) Flax would otherwise try to use them as a PartitionSpec of the active mesh."""
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    return nnx.eval_shape(fn)


@functools.lru_cache(maxsize=64)
def abstract_model(config: ModelConfig, param_dtype: str = "float32") -> Llama:
  """`Llama(config)` with ShapeDtypeStructs for arrays (nnx.eval_shape: nothing is allocated)."""
  return _unsharded_eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))


@functools.lru_cache(maxsize=64)
def _model_graphdef(config: ModelConfig):
  return nnx.graphdef(abstract_model(config))


@functools.lru_cache(maxsize=64)
def _layer_graphdef(config: ModelConfig):
  return nnx.graphdef(_unsharded_eval_shape(lambda: DecoderLayer(config, rngs=nnx.Rngs(0))))


def _param_tree(config: ModelConfig, leaf, param_dtype: str = "float32") -> Params:
  """A plain nested dict of leaf(param) over every Param of `Llama(config)`, by path."""
  out: dict = {}
  model = abstract_model(config, param_dtype)
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf(variable)
  return out


def param_axes(config: ModelConfig) -> Params:
  """Logical axis names of every parameter (the pytree matches `init_params`)."""
  return _param_tree(config, lambda v: tuple(v.get_metadata()["out_sharding"]))


def param_shapes(config: ModelConfig) -> Params:
  """The shape of every parameter (the pytree matches `init_params`)."""
  return _param_tree(config, lambda v: tuple(v.shape))


def abstract_params(config: ModelConfig, param_dtype: str = "float32") -> Params:
  """ShapeDtypeStructs of the parameters, with nothing allocated."""
  return _param_tree(config, lambda v: jax.ShapeDtypeStruct(v.shape, v.get_value().dtype),
                     param_dtype)


def count_params(config: ModelConfig) -> int:
  return sum(x.size for x in jax.tree.leaves(abstract_params(config)))


def init_params(config: ModelConfig, key: jax.Array, param_dtype: str = "float32") -> Params:
  """Random parameters as the modules initialize them: N(0, 0.02) matrices, unit norms."""
  model = Llama(config, rngs=nnx.Rngs(params=key), param_dtype=param_dtype)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# --- the functional API: plain parameter dicts in, arrays out ---------------------------------

def positions_from_segments(segment_ids_BL: jax.Array) -> jax.Array:
  """int32 [B, L]: each token's offset from the first token of its run of equal segment ids, so
  RoPE positions restart at 0 with every packed document (before PI's scaling, as for a
  document alone)."""
  b, l = segment_ids_BL.shape
  index_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  starts_BL = jnp.concatenate([jnp.ones((b, 1), bool),
                               segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
  start_BL = jax.lax.cummax(jnp.where(starts_BL, index_BL, 0), axis=1)
  return index_BL - start_BL


def hidden_states(config: ModelConfig, params: Params, tokens_BL: jax.Array,
                  positions_BL: jax.Array | None = None, cache: dict | None = None,
                  cache_index: jax.Array | int | None = None,
                  segment_ids_BL: jax.Array | None = None, *,
                  run: RunOptions | None = None):
  """Final-normed hidden states [B, L, D] in the run's compute dtype.

  With `cache` ({'k','v': [Y, B, S, K, H]}) also returns the updated cache: cache_index None
  means a prefill of an empty cache from position 0; an index means decode after that many
  cached tokens. segment_ids_BL: see `forward` (not with a cache). run: how to compute
  (pi_jax.run.RunOptions; None: float32, kernels chosen for the backend).
  """
  return Llama.from_params(config, params).hidden_states(tokens_BL, positions_BL, cache,
                                                         cache_index, segment_ids_BL, run=run)


def logits_from_hidden(config: ModelConfig, params: Params, h_BLD: jax.Array, *,
                       run: RunOptions | None = None) -> jax.Array:
  """Logits float32 [B, L, V] from final-normed hidden states [B, L, D]."""
  return Llama.from_params(config, params).logits_from_hidden(h_BLD, run=run)


def forward(config: ModelConfig, params: Params, tokens_BL: jax.Array,
            positions_BL: jax.Array | None = None,
            segment_ids_BL: jax.Array | None = None, *,
            run: RunOptions | None = None) -> jax.Array:
  """Logits float32 [B, L, V] for int32 tokens [B, L]; positions default to 0..L-1.

  segment_ids_BL (int [B, L]): packed documents. A token attends only to earlier tokens with the
  same id, and positions (when not given) restart at each run of equal ids
  (`positions_from_segments`); given positions win.
  """
  return Llama.from_params(config, params)(tokens_BL, positions_BL, segment_ids_BL, run=run)


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype=None) -> dict:
  """An empty KV cache [Y, B, S, K, H] for up to `max_length` tokens (dtype: float32 unless
  given; generate passes the run's compute dtype)."""
  dtype = jnp.dtype(dtype or jnp.float32)
  shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
