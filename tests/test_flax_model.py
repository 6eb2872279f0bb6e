"""The Flax NNX modules declare the parameters; everything else reads them.

- For every preset, the modules' parameter tree (nnx.eval_shape: nothing allocated) is the tree
  the converters fill: every HF tensor transformers' LlamaForCausalLM has (built on the meta
  device), mapped through convert/hf_layout and stacked over layers, and nothing else.
- A checkpoint written before the model moved into Flax (assets/tiny_base, whose config.json
  still carries the retired `scan_layers`) loads, and gives the logits the pre-Flax model gave
  (tests/data/tiny_base_logits.npy, written by that model for the tokens below).
- `pi_jax.Llama(config, rngs=...)` is a module whose call is `forward` of its own state.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pi_jax
from convert import hf_layout
from pi_jax import model as model_lib
from pi_jax import sharding as sharding_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BASE = os.path.join(REPO, "assets", "tiny_base")
# The golden logits were computed at commit cded79a (the pure-functional model) by
# `jax.jit(pi_jax.forward, static_argnums=0)(config, params, TOKENS)` on assets/tiny_base.
GOLDEN = os.path.join(REPO, "tests", "data", "tiny_base_logits.npy")
TOKENS = jnp.asarray([list(b"Position Interpolation extends the RoPE window.")], jnp.int32)
SMALL = pi_jax.ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=3,
                           num_heads=6, num_kv_heads=2, max_position_embeddings=64)


def _flat(tree, is_leaf=None):
  return {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _converter_tree(config, hf_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  """{pi_jax path: shape} the converters build from tensors of these HF shapes."""
  out = {}
  for hf_name, path, kind, layer in hf_layout.hf_names(config):
    # a zero-stride view stands for the tensor: its shape is all hf_to_pi looks at (no memory)
    hf = np.broadcast_to(np.float32(0), hf_shapes[hf_name])
    shape = hf_layout.hf_to_pi(config, kind, hf).shape
    key = "".join(f"['{p}']" for p in path)
    if layer is None:
      out[key] = tuple(shape)
    else:
      assert out.setdefault(key, (config.num_layers, *shape)) == (config.num_layers, *shape)
  return out


@pytest.mark.parametrize("name", sorted(pi_jax.PRESETS))
def test_module_tree_is_the_converters_tree(name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from test_presets import RELEASED
  config = pi_jax.preset(name)
  with torch.device("meta"):
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**RELEASED[name][0]))
  hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
  converted = _converter_tree(config, hf_shapes)
  # Every HF tensor is converted (tied models have no separate lm_head).
  names = {n for n, *_ in hf_layout.hf_names(config)}
  assert names == set(hf_shapes) - ({"lm_head.weight"} if config.tie_word_embeddings else set())

  state = nnx.state(model_lib.abstract_model(config), nnx.Param)
  declared = _flat(nnx.to_pure_dict(state))
  assert {k: tuple(v.shape) for k, v in declared.items()} == converted
  assert all(isinstance(v, jax.ShapeDtypeStruct) and v.dtype == jnp.float32
             for v in declared.values())
  # param_shapes / abstract_params / param_axes are that same tree
  assert _flat(model_lib.param_shapes(config), lambda x: isinstance(x, tuple)) == converted
  assert {k: v.shape for k, v in _flat(pi_jax.abstract_params(config)).items()} == converted
  axes = _flat(model_lib.param_axes(config), lambda x: isinstance(x, tuple))
  assert axes.keys() == converted.keys()
  for key, names in axes.items():
    assert len(names) == len(converted[key])
    assert (names[0] == "layers") == key.startswith("['layers']"), (key, names)
    assert all(n in sharding_lib.LOGICAL_AXIS_RULES for n in names)


def test_bfloat16_params_are_declared_bfloat16():
  abstract = pi_jax.abstract_params(SMALL, "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}
  params = pi_jax.init_params(SMALL, jax.random.key(0), "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_axis_table_keeps_the_divisibility_fallback():
  """SmolLM2-135M's 9 query / 3 kv heads on tensor=2: heads stay whole, the rest is split."""
  config = pi_jax.preset("smollm2-135m")
  axes, shapes = model_lib.param_axes(config), model_lib.param_shapes(config)
  mesh = {"data": 1, "fsdp": 2, "tensor": 2, "sequence": 1}

  def spec(name):
    return sharding_lib.logical_to_spec(axes["layers"][name], shapes["layers"][name], mesh)

  assert tuple(spec("wq")) == (None, "fsdp", None, None)  # 9 heads: not split on tensor
  assert tuple(spec("wk")) == (None, "fsdp", None, None)  # 3 kv heads
  assert tuple(spec("w_gate")) == (None, "fsdp", "tensor")  # 1536 = 2 · 768
  assert tuple(sharding_lib.logical_to_spec(axes["embed"], shapes["embed"], mesh)) == (
      "tensor", "fsdp")


def test_checkpoint_from_before_flax_loads_with_identical_logits():
  config, params = pi_jax.load_checkpoint(TINY_BASE)
  with open(os.path.join(TINY_BASE, "config.json")) as f:
    assert '"scan_layers"' in f.read()  # written before the field was retired
  want = np.load(GOLDEN)
  got = jax.jit(pi_jax.forward, static_argnums=0)(config, params, TOKENS)
  # The golden logits (|x| up to ~15) came from XLA's dot; the CPU's native sgemm
  # (pi_jax.linear) sums in another order: float32 rounding, ~1e-6 relative.
  np.testing.assert_allclose(np.asarray(got), want, rtol=5e-6, atol=1e-5)
  # ...and through the module holding the restored arrays
  module = pi_jax.Llama.from_params(config, params)
  np.testing.assert_allclose(np.asarray(module(TOKENS)), want, rtol=5e-6, atol=1e-5)


def test_module_call_equals_forward_of_its_state():
  model = pi_jax.Llama(SMALL, rngs=nnx.Rngs(3))
  assert isinstance(model, nnx.Module) and isinstance(model.layers, pi_jax.DecoderLayer)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert jax.tree.structure(params) == jax.tree.structure(pi_jax.abstract_params(SMALL))
  tokens = jnp.asarray([[1, 5, 9, 2, 7, 7, 30]], jnp.int32)
  want = pi_jax.forward(SMALL, params, tokens)
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(want))
  # a module built from the dict is the same model, sharing the arrays
  again = pi_jax.Llama.from_params(SMALL, params)
  assert again.layers.wq[...] is params["layers"]["wq"]
  np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, t: m(t))(again, tokens)),
                                np.asarray(want))


def test_init_follows_the_declared_initializers():
  params = pi_jax.init_params(SMALL, jax.random.key(0))
  assert _flat(params).keys() == _flat(pi_jax.abstract_params(SMALL)).keys()
  for name in ("attn_norm", "mlp_norm"):
    np.testing.assert_array_equal(params["layers"][name], 1.0)
  np.testing.assert_array_equal(params["final_norm"], 1.0)
  wq = np.asarray(params["layers"]["wq"])
  assert abs(wq.std() - 0.02) < 0.002 and abs(wq.mean()) < 0.002
  assert not np.allclose(wq[0], wq[1])  # each stacked layer draws its own keys
  again = pi_jax.init_params(SMALL, jax.random.key(0))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
  other = pi_jax.init_params(SMALL, jax.random.key(1))
  assert not np.array_equal(params["embed"], other["embed"])


def test_a_dict_that_is_not_the_configs_tree_is_named():
  params = dict(pi_jax.init_params(SMALL, jax.random.key(0)))
  tokens = jnp.zeros((1, 4), jnp.int32)
  del params["lm_head"]
  with pytest.raises(ValueError, match=r"missing \[\"\['lm_head'\]\"\], unexpected \[\]"):
    pi_jax.forward(SMALL, params, tokens)
  params["lm_head"] = params["q_norm"] = jnp.zeros((48, 96))
  with pytest.raises(ValueError, match=r"unexpected \[\"\['q_norm'\]\"\]"):
    pi_jax.forward(SMALL, params, tokens)
