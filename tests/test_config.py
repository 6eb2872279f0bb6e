"""ModelConfig: transformers interop in both RoPE forms, serialization, and input validation."""

import dataclasses
import json

import pytest

from pi_jax.config import ModelConfig, RopeScaling

transformers = pytest.importorskip("transformers")

BASE_HF = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000,
               hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu")
LONGROPE_SHORT = [1.0 + 0.01 * i for i in range(64)]
LONGROPE_LONG = [1.0 + 0.5 * i for i in range(64)]

# kind -> (max_position_embeddings in config.json, transformers rope parameters without theta,
#          the RopeScaling pi_jax must read, the trained window L)
CASES = {
    "none": (4096, {"rope_type": "default"}, RopeScaling(), 4096),
    "linear": (16384, {"rope_type": "linear", "factor": 4.0},
               RopeScaling("linear", 4.0, original_max_position_embeddings=4096), 4096),
    "dynamic": (4096, {"rope_type": "dynamic", "factor": 2.0},
                RopeScaling("dynamic", 2.0, original_max_position_embeddings=4096), 4096),
    "yarn": (32768, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "truncate": False},
             RopeScaling("yarn", 8.0, original_max_position_embeddings=4096, mscale=0.707,
                         mscale_all_dim=0.707, truncate=False), 4096),
    "llama3": (131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               RopeScaling("llama3", 8.0, original_max_position_embeddings=8192), 8192),
    "longrope": (131072, {"rope_type": "longrope", "factor": 32.0,
                          "original_max_position_embeddings": 4096,
                          "short_factor": LONGROPE_SHORT, "long_factor": LONGROPE_LONG},
                 RopeScaling("longrope", 32.0, original_max_position_embeddings=4096,
                             short_factor=LONGROPE_SHORT, long_factor=LONGROPE_LONG), 4096),
}


def current_form(kind, theta=5e5):
  window, rope, _, _ = CASES[kind]
  return {**BASE_HF, "max_position_embeddings": window,
          "rope_parameters": {**rope, "rope_theta": theta}}


def legacy_form(kind, theta=5e5):
  """The pre-5.0 layout: rope_theta at the top, rope_scaling with the old 'type' key (or null)."""
  window, rope, _, _ = CASES[kind]
  scaling = None
  if kind != "none":
    scaling = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
  return {**BASE_HF, "max_position_embeddings": window, "rope_theta": theta,
          "rope_scaling": scaling}


def check_read(config: ModelConfig, kind, theta):
  window, _, scaling, original = CASES[kind]
  assert config.rope_scaling == scaling
  assert config.rope_theta == theta
  assert config.original_window == original
  assert config.max_position_embeddings == window
  assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers,
          config.num_heads, config.num_kv_heads, config.head_dim) == (
              32000, 4096, 11008, 32, 32, 8, 128)
  assert config.rms_norm_eps == 1e-5 and not config.tie_word_embeddings


def rope_of(hf: dict) -> dict:
  """transformers' own reading of the RoPE parameters of a config.json dict."""
  params = dict(transformers.LlamaConfig(**hf).rope_parameters)
  params.pop("type", None)
  return params


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("form", ["current", "legacy"])
def test_from_hf_to_hf_round_trip(kind, form):
  hf = current_form(kind) if form == "current" else legacy_form(kind)
  config = ModelConfig.from_hf(hf)
  check_read(config, kind, 5e5)
  for legacy in (False, True):
    out = config.to_hf(legacy=legacy)
    assert ModelConfig.from_hf(out) == config
    assert out["max_position_embeddings"] == hf["max_position_embeddings"]
    # transformers reads the same RoPE parameters from what we wrote as from the original.
    assert rope_of(out) == rope_of(hf)
    if legacy:
      assert "rope_parameters" not in out and out["rope_theta"] == 5e5
    else:
      assert "rope_scaling" not in out and out["rope_parameters"]["rope_theta"] == 5e5


@pytest.mark.parametrize("kind", list(CASES))
def test_loads_transformers_own_config_dicts(kind):
  hf = current_form(kind, theta=1e4)
  hf.pop("model_type"), hf.pop("architectures")
  written = transformers.LlamaConfig(**hf).to_dict()  # with every default transformers adds
  check_read(ModelConfig.from_hf(written), kind, 1e4)
  legacy = legacy_form(kind, theta=1e4)
  legacy.pop("model_type"), legacy.pop("architectures")
  check_read(ModelConfig.from_hf(transformers.LlamaConfig(**legacy).to_dict()), kind, 1e4)


def test_to_hf_builds_the_same_transformers_model():
  """Our to_hf dict builds a transformers model of our architecture and parameter count."""
  import torch
  config = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=2,
                       num_heads=6, num_kv_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True).with_rope_scaling("linear:2")
  hf_config = transformers.LlamaConfig(**config.to_hf())
  assert hf_config.rope_parameters["factor"] == 2.0 and hf_config.head_dim == 8
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(hf_config)
  from pi_jax import count_params
  assert sum(p.numel() for p in model.parameters()) == count_params(config)


def test_hf_fields_pass_through():
  hf = {**current_form("none"), "head_dim": 64, "eos_token_id": [128001, 128008],
        "pad_token_id": None, "tie_word_embeddings": True}
  config = ModelConfig.from_hf(hf)
  assert config.head_dim == 64 and config.eos_token_id == 128001 and config.pad_token_id is None
  assert config.tie_word_embeddings
  assert ModelConfig.from_hf(hf, rms_norm_eps=1e-3).rms_norm_eps == 1e-3
  # No num_key_value_heads: plain multi-head attention.
  mha = {k: v for k, v in current_form("none").items() if k != "num_key_value_heads"}
  assert ModelConfig.from_hf(mha).num_kv_heads == 32


@pytest.mark.parametrize("kind", list(CASES) + ["ntk"])
def test_dict_and_json_round_trip(kind):
  if kind == "ntk":
    config = ModelConfig(max_position_embeddings=2048).with_rope_scaling("ntk:4")
  else:
    config = ModelConfig.from_hf(current_form(kind))
  assert ModelConfig.from_dict(config.to_dict()) == config
  assert ModelConfig.from_dict(json.loads(config.to_json())) == config


def test_ntk_has_no_transformers_export():
  config = ModelConfig().with_rope_scaling("ntk:4")
  with pytest.raises(ValueError, match="fixed NTK"):
    config.to_hf()


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_with_rope_scaling_linear(factor):
  base = ModelConfig(max_position_embeddings=2048)
  extended = base.with_rope_scaling(f"linear:{factor}")
  assert extended.max_position_embeddings == 2048 * factor
  assert extended.rope_scaling.kind == "linear" and extended.rope_scaling.factor == factor
  assert extended.rope_scaling.original_max_position_embeddings == 2048
  assert extended.original_window == 2048
  # Re-scaling an extended model keeps the trained window, not the extended one.
  again = extended.with_rope_scaling("linear:16")
  assert again.max_position_embeddings == 2048 * 16 and again.original_window == 2048
  assert extended.with_rope_scaling("none") == base
  assert extended.with_rope_scaling(None) == base


def test_with_rope_scaling_other_kinds():
  base = ModelConfig(max_position_embeddings=4096)
  yarn = base.with_rope_scaling('{"kind": "yarn", "factor": 4, "beta_fast": 16}')
  assert yarn.rope_scaling.original_max_position_embeddings == 4096
  assert yarn.max_position_embeddings == 16384 and yarn.rope_scaling.beta_fast == 16
  dynamic = base.with_rope_scaling("dynamic:2")  # grows at run time: the window stays L
  assert dynamic.max_position_embeddings == 4096 and dynamic.original_window == 4096
  # A transformers-style dict is accepted too.
  llama3 = base.with_rope_scaling({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0})
  assert llama3.rope_scaling.original_max_position_embeddings == 4096
  assert llama3.max_position_embeddings == 32768


# --- invalid input ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec,message", [
    ("", "expected KIND:FACTOR"),
    ("linear", "expected KIND:FACTOR"),
    ("linear:abc", "'abc' .* is not a number"),
    ("linear:4:5", "is not a number"),
    ("{not json", "invalid JSON"),
    ("warp:2", "unknown RoPE scaling kind 'warp'"),
    (":4", "unknown RoPE scaling kind ''"),
    ("linear:0.5", "must be >= 1"),
    ("ntk:-2", "must be >= 1"),
    ("dynamic:0", "must be >= 1"),
    ("linear:nan", "finite"),
    ("linear:inf", "finite"),
    ("none:2", "takes no factor"),
    ('{"kind": "linear", "factor": 2, "scale": 3}', r"unknown keys \['scale'\]"),
])
def test_garbage_rope_scaling_strings(spec, message):
  with pytest.raises(ValueError, match=message):
    RopeScaling.parse(spec)
  with pytest.raises(ValueError, match=message):
    ModelConfig().with_rope_scaling(spec)


@pytest.mark.parametrize("kind", ["yarn", "llama3", "longrope"])
def test_needs_original_window(kind):
  kwargs = {"short_factor": [1.0], "long_factor": [1.0]} if kind == "longrope" else {}
  with pytest.raises(ValueError, match="needs original_max_position_embeddings"):
    RopeScaling(kind, 4.0, **kwargs)
  hf = current_form(kind)
  del hf["rope_parameters"]["original_max_position_embeddings"]
  with pytest.raises(ValueError, match="needs original_max_position_embeddings"):
    ModelConfig.from_hf(hf)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_heads=32, num_kv_heads=5), "multiple of num_kv_heads 5"),
    (dict(hidden_size=4100, num_heads=32), "not divisible by num_heads"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size must be a positive integer"),
    (dict(head_dim=7, hidden_size=28, num_heads=4), "head_dim must be even"),
    (dict(rope_theta=0.0), "rope_theta must be a finite positive number"),
    (dict(rope_scaling=RopeScaling("longrope", 4.0, 2048, short_factor=[1.0] * 3,
                                   long_factor=[1.0] * 3)), "head_dim/2 = 64 entries"),
])
def test_invalid_model_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**kwargs)


def test_invalid_hf_configs():
  with pytest.raises(ValueError, match="unsupported transformers rope_type 'warp'"):
    ModelConfig.from_hf({**BASE_HF, "rope_parameters": {"rope_type": "warp", "factor": 2.0}})
  with pytest.raises(ValueError, match="must be >= 1"):
    ModelConfig.from_hf({**BASE_HF, "rope_parameters": {"rope_type": "linear", "factor": 0.5}})
  with pytest.raises(ValueError, match="not a LLaMA-family model"):
    ModelConfig.from_hf({**BASE_HF, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ValueError, match="attention_bias"):
    ModelConfig.from_hf({**BASE_HF, "attention_bias": True})
  with pytest.raises(ValueError, match="hidden_act 'gelu'"):
    ModelConfig.from_hf({**BASE_HF, "hidden_act": "gelu"})
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    ModelConfig.from_hf({**BASE_HF, "num_key_value_heads": 6})


def test_from_dict_rejects_unknown_keys():
  d = ModelConfig().to_dict()
  d["num_experts"] = 8
  with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['num_experts'\]"):
    ModelConfig.from_dict(d)


def test_config_is_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    ModelConfig().num_layers = 3
