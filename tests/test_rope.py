"""RoPE tables: pi_jax.rope.inv_freq_and_factor equals transformers' ROPE_INIT_FUNCTIONS.

For every scaling kind the inverse frequencies and the attention factor are checked to 1e-6
relative against transformers (the independent oracle), for head dims 64 and 128 and
theta 1e4 and 5e5. Fixed NTK has no transformers type; it is proven against transformers' dynamic
formula at the one length where the two coincide, and against its closed form.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from pi_jax import rope as rope_lib
from pi_jax.config import ModelConfig, RopeScaling

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

HEAD_DIMS = (64, 128)
THETAS = (1e4, 5e5)
RTOL = 1e-6
WINDOW = 2048  # the trained window L


def both_configs(head_dim, theta, scaling: RopeScaling, hf_rope: dict, window=WINDOW):
  """The same model written independently for pi_jax and for transformers."""
  num_heads = 4
  ours = ModelConfig(vocab_size=32, hidden_size=head_dim * num_heads, intermediate_size=32,
                     num_layers=1, num_heads=num_heads, head_dim=head_dim,
                     max_position_embeddings=window, rope_theta=theta, rope_scaling=scaling)
  hf = transformers.LlamaConfig(vocab_size=32, hidden_size=head_dim * num_heads,
                                intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=num_heads, head_dim=head_dim,
                                max_position_embeddings=window,
                                rope_parameters={"rope_theta": theta, **hf_rope})
  return ours, hf


def hf_table(hf_config, seq_len=None):
  rope_type = hf_config.rope_parameters["rope_type"]
  if rope_type == "default":
    inv_freq, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
  else:
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, seq_len=seq_len)
  return inv_freq.double().numpy(), float(factor)


def our_table(config, seq_len=None):
  inv_freq, factor = rope_lib.inv_freq_and_factor(config, seq_len)
  inv_freq = np.asarray(inv_freq)
  assert inv_freq.dtype == np.float32 and inv_freq.shape == (config.head_dim // 2,)
  return inv_freq.astype(np.float64), float(factor)


def assert_tables_equal(ours, hf):
  np.testing.assert_allclose(ours[0], hf[0], rtol=RTOL, atol=0)
  assert ours[1] == pytest.approx(hf[1], rel=RTOL)


grid = pytest.mark.parametrize("head_dim,theta", [(h, t) for h in HEAD_DIMS for t in THETAS])


@grid
def test_none_equals_transformers_default(head_dim, theta):
  ours, hf = both_configs(head_dim, theta, RopeScaling(), {"rope_type": "default"})
  assert_tables_equal(our_table(ours), hf_table(hf))


@grid
@pytest.mark.parametrize("factor", [2.0, 4.0, 16.0])
def test_linear_equals_transformers(head_dim, theta, factor):
  ours, hf = both_configs(head_dim, theta, RopeScaling("linear", factor),
                          {"rope_type": "linear", "factor": factor})
  table = our_table(ours)
  assert_tables_equal(table, hf_table(hf))
  # PI is exactly "frequencies / s" of the plain table.
  plain, _ = our_table(ours.replace(rope_scaling=RopeScaling()))
  np.testing.assert_allclose(table[0] * factor, plain, rtol=RTOL)


@grid
@pytest.mark.parametrize("factor", [2.0, 4.0])
@pytest.mark.parametrize("len_over_window", [0.25, 1.0, 1.5, 3.0, 7.0])
def test_dynamic_equals_transformers_at_each_length(head_dim, theta, factor, len_over_window):
  seq_len = int(WINDOW * len_over_window)
  ours, hf = both_configs(head_dim, theta, RopeScaling("dynamic", factor),
                          {"rope_type": "dynamic", "factor": factor})
  want = hf_table(hf, seq_len)
  assert_tables_equal(our_table(ours, seq_len), want)
  # seq_len may be a traced jnp scalar (the model passes max(positions) + 1).
  assert_tables_equal(our_table(ours, jnp.int32(seq_len)), want)
  base, _ = our_table(ours.replace(rope_scaling=RopeScaling()))
  if len_over_window <= 1.0:  # at or below the window dynamic NTK is plain RoPE
    np.testing.assert_allclose(want[0], base, rtol=RTOL)
  else:  # past it every frequency but the first is lowered
    assert np.all(want[0][1:] < base[1:])


def test_dynamic_with_explicit_original_window():
  """An explicit original window is the trained window transformers reads from max_position."""
  ours = ModelConfig(hidden_size=256, num_heads=4, max_position_embeddings=8192,
                     rope_scaling=RopeScaling("dynamic", 4.0, original_max_position_embeddings=2048))
  _, hf = both_configs(64, 1e4, RopeScaling(), {"rope_type": "dynamic", "factor": 4.0}, window=2048)
  assert_tables_equal(our_table(ours, 6000), hf_table(hf, 6000))


YARN_CASES = {
    "default": {},
    "mscale": {"mscale": 0.707, "mscale_all_dim": 0.707},
    "mscale_unequal": {"mscale": 1.0, "mscale_all_dim": 0.5},
    "attention_factor": {"attention_factor": 1.3},
    "betas": {"beta_fast": 16.0, "beta_slow": 2.0},
    "no_truncate": {"truncate": False},
}


@grid
@pytest.mark.parametrize("factor", [4.0, 16.0])
@pytest.mark.parametrize("case", list(YARN_CASES))
def test_yarn_equals_transformers(head_dim, theta, factor, case):
  extra = YARN_CASES[case]
  ours, hf = both_configs(
      head_dim, theta,
      RopeScaling("yarn", factor, original_max_position_embeddings=WINDOW, **extra),
      {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": WINDOW,
       **extra}, window=int(WINDOW * factor))
  table = our_table(ours)
  assert_tables_equal(table, hf_table(hf))
  if case == "attention_factor":
    assert table[1] == 1.3
  if case == "default":
    assert table[1] == pytest.approx(0.1 * math.log(factor) + 1.0)


@grid
@pytest.mark.parametrize("factor,low,high,original", [(8.0, 1.0, 4.0, 8192), (4.0, 1.0, 4.0, 2048),
                                                      (32.0, 2.0, 8.0, 4096)])
def test_llama3_equals_transformers(head_dim, theta, factor, low, high, original):
  rope = {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
          "original_max_position_embeddings": original}
  ours, hf = both_configs(head_dim, theta, RopeScaling("llama3", **rope),
                          {"rope_type": "llama3", **rope}, window=int(original * factor))
  table = our_table(ours)
  assert_tables_equal(table, hf_table(hf))
  base, _ = our_table(ours.replace(rope_scaling=RopeScaling()))
  # llama3 keeps the highest frequency and divides the lowest by the factor.
  assert table[0][0] == pytest.approx(base[0], rel=RTOL)
  assert table[0][-1] == pytest.approx(base[-1] / factor, rel=RTOL)


@grid
@pytest.mark.parametrize("attention_factor", [None, 1.2])
def test_longrope_short_and_long_tables(head_dim, theta, attention_factor):
  n = head_dim // 2
  rng = np.random.RandomState(head_dim)
  short = [float(x) for x in 1.0 + 0.2 * rng.rand(n)]
  long = [float(x) for x in np.linspace(1.0, 40.0, n)]
  rope = {"factor": 8.0, "original_max_position_embeddings": WINDOW, "short_factor": short,
          "long_factor": long}
  if attention_factor is not None:
    rope["attention_factor"] = attention_factor
  ours, hf = both_configs(head_dim, theta, RopeScaling("longrope", **rope),
                          {"rope_type": "longrope", **rope}, window=8 * WINDOW)
  for seq_len in (None, 100, WINDOW):  # at or below the trained window: the short table
    assert_tables_equal(our_table(ours, seq_len), hf_table(hf, seq_len))
  for seq_len in (WINDOW + 1, 3 * WINDOW, 8 * WINDOW):  # past it: the long table
    want = hf_table(hf, seq_len)
    assert_tables_equal(our_table(ours, seq_len), want)
    assert_tables_equal(our_table(ours, jnp.int32(seq_len)), want)
  assert not np.allclose(hf_table(hf, WINDOW)[0], hf_table(hf, WINDOW + 1)[0])


@grid
@pytest.mark.parametrize("factor,window", [(2.0, 2048), (4.0, 2048), (8.0, 4096)])
def test_fixed_ntk_equals_dynamic_where_they_coincide(head_dim, theta, factor, window):
  """Dynamic NTK's base θ·(s·len/L − (s−1))^(d/(d−2)) is θ·s^(d/(d−2)) at len = L·(2s−1)/s."""
  seq_len = window * (2 * factor - 1) / factor
  assert seq_len == int(seq_len)
  seq_len = int(seq_len)
  ours, _ = both_configs(head_dim, theta, RopeScaling("ntk", factor), {}, window=window)
  _, hf = both_configs(head_dim, theta, RopeScaling(), {"rope_type": "dynamic", "factor": factor},
                       window=window)
  table = our_table(ours)
  assert_tables_equal(table, hf_table(hf, seq_len))
  # ...and one token later transformers' dynamic table has moved on: the match is not trivial.
  assert not np.allclose(table[0], hf_table(hf, seq_len + window)[0], rtol=1e-4)


@grid
@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_fixed_ntk_closed_form(head_dim, theta, factor):
  ours, _ = both_configs(head_dim, theta, RopeScaling("ntk", factor), {})
  d = head_dim
  base = theta * factor ** (d / (d - 2))
  want = np.array([base ** (-2.0 * i / d) for i in range(d // 2)])
  inv_freq, attn = our_table(ours)
  np.testing.assert_allclose(inv_freq, want, rtol=RTOL)
  assert attn == 1.0
  # The NTK trick: the highest frequency is untouched, the lowest is divided by exactly ~s.
  assert inv_freq[0] == 1.0
  plain, _ = our_table(ours.replace(rope_scaling=RopeScaling()))
  assert inv_freq[-1] == pytest.approx(plain[-1] / factor, rel=1e-5)


@pytest.mark.parametrize("kind", ["none", "linear", "yarn", "llama3"])
def test_rope_tables_follow_inv_freq(kind):
  """cos/sin tables are cos/sin(position · inv_freq) · attention factor, in float32."""
  scaling = RopeScaling.parse(f"{kind}:4", original=256) if kind != "none" else RopeScaling()
  config = ModelConfig(hidden_size=128, num_heads=2, max_position_embeddings=1024,
                       rope_scaling=scaling)
  positions = jnp.asarray([[0, 1, 7, 1000, 32767]], jnp.int32)
  cos, sin = rope_lib.rope_tables(config, positions)
  assert cos.dtype == jnp.float32 and cos.shape == (1, 5, 32)
  inv_freq, attn = rope_lib.inv_freq_and_factor(config)
  # The angle is rounded to float32 as in transformers (at 32767 one float32 ulp is 0.004 rad);
  # only the cos/sin themselves are checked here.
  angles = (np.asarray(positions, np.float32)[..., None] * np.asarray(inv_freq, np.float32))
  angles = angles.astype(np.float64)
  np.testing.assert_allclose(cos, np.cos(angles) * attn, atol=2e-5)
  np.testing.assert_allclose(sin, np.sin(angles) * attn, atol=2e-5)


def test_apply_rope_is_the_half_split_rotation():
  """apply_rope equals transformers' rotate_half formula, and preserves norms."""
  from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
  rng = np.random.RandomState(0)
  x = rng.randn(2, 5, 3, 16).astype(np.float32)  # [B, L, N, H]
  config = ModelConfig(hidden_size=48, num_heads=3, max_position_embeddings=64)
  positions = jnp.asarray(rng.randint(0, 5000, (2, 5)), jnp.int32)
  cos, sin = rope_lib.rope_tables(config, positions)
  got = np.asarray(rope_lib.apply_rope(jnp.asarray(x), cos, sin))
  cos_full = torch.tensor(np.concatenate([cos, cos], -1))
  sin_full = torch.tensor(np.concatenate([sin, sin], -1))
  xt = torch.tensor(x).transpose(1, 2)  # transformers: [B, N, L, H]
  want, _ = apply_rotary_pos_emb(xt, xt, cos_full, sin_full)
  np.testing.assert_allclose(got, want.transpose(1, 2).numpy(), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope"])
def test_depends_on_length_says_whether_a_prefix_table_changes(kind):
  """RopeScaling.depends_on_length (what generation reads before padding a prompt) is true
  exactly when the cos/sin of the first positions change once the sequence grows past L."""
  original, head_dim = 256, 16
  if kind == "none":
    scaling = RopeScaling()
  elif kind == "longrope":
    n = head_dim // 2
    scaling = RopeScaling("longrope", 4.0, original, short_factor=[1.0] * n,
                          long_factor=list(np.linspace(1.0, 8.0, n)))
  else:
    scaling = RopeScaling.parse(f"{kind}:4", original=original)
  config = ModelConfig(hidden_size=2 * head_dim, num_heads=2, max_position_embeddings=4 * original,
                       rope_scaling=scaling)
  short = jnp.arange(original // 2, dtype=jnp.int32)[None]
  long = jnp.arange(4 * original, dtype=jnp.int32)[None]
  cos_short, _ = rope_lib.rope_tables(config, short)
  cos_long, _ = rope_lib.rope_tables(config, long)
  changed = not np.allclose(cos_short[0], cos_long[0, :original // 2], atol=1e-6)
  assert changed == scaling.depends_on_length
