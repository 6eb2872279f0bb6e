"""Presets: hyper-parameters as in the released config.json files, and parameter counts that
equal both transformers' count of the same architecture (built on the meta device, nothing
allocated) and the published figure. Our side is counted with jax.eval_shape only."""

import jax
import pytest

import pi_jax
from pi_jax.config import ModelConfig

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

_LLAMA = dict(model_type="llama", vocab_size=32000, rope_theta=10000.0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
_LLAMA1 = dict(_LLAMA, max_position_embeddings=2048, rms_norm_eps=1e-6)
_LLAMA2 = dict(_LLAMA, max_position_embeddings=4096, rms_norm_eps=1e-5)
_LLAMA31 = dict(model_type="llama", vocab_size=128256, rope_theta=500000.0, num_key_value_heads=8,
                max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
                eos_token_id=128001, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
_SMOLLM2 = dict(model_type="llama", vocab_size=49152, max_position_embeddings=8192,
                rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)


def _arch(hidden, mlp, layers, heads, kv_heads=None):
  return dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads or heads)


# name -> (the model's released config.json fields (legacy RoPE form), published parameter count)
RELEASED = {
    "llama-7b": ({**_LLAMA1, **_arch(4096, 11008, 32, 32)}, 6_738_415_616),
    "llama-13b": ({**_LLAMA1, **_arch(5120, 13824, 40, 40)}, 13_015_864_320),
    "llama-33b": ({**_LLAMA1, **_arch(6656, 17920, 60, 52)}, 32_528_943_616),
    "llama-65b": ({**_LLAMA1, **_arch(8192, 22016, 80, 64)}, 65_285_660_672),
    "llama2-7b": ({**_LLAMA2, **_arch(4096, 11008, 32, 32)}, 6_738_415_616),
    "llama2-13b": ({**_LLAMA2, **_arch(5120, 13824, 40, 40)}, 13_015_864_320),
    "llama2-70b": ({**_LLAMA2, **_arch(8192, 28672, 80, 64, 8)}, 68_976_648_192),
    "llama3.1-8b": ({**_LLAMA31, **_arch(4096, 14336, 32, 32, 8)}, 8_030_261_248),
    "llama3.1-70b": ({**_LLAMA31, **_arch(8192, 28672, 80, 64, 8)}, 70_553_706_496),
    "smollm2-135m": ({**_SMOLLM2, **_arch(576, 1536, 30, 9, 3), "rope_theta": 100000.0},
                     134_515_008),
    "smollm2-360m": ({**_SMOLLM2, **_arch(960, 2560, 32, 15, 5), "rope_theta": 100000.0},
                     361_821_120),
    "smollm2-1.7b": ({**_SMOLLM2, **_arch(2048, 8192, 24, 32, 32), "rope_theta": 130000.0},
                     1_711_376_384),
}


def test_every_preset_is_covered():
  assert set(pi_jax.PRESETS) == set(RELEASED)


@pytest.mark.parametrize("name", list(RELEASED))
def test_preset_matches_released_config(name):
  hf, _ = RELEASED[name]
  assert pi_jax.preset(name) == ModelConfig.from_hf(hf)


@pytest.mark.parametrize("name", list(RELEASED))
def test_param_count_equals_transformers_and_published(name):
  hf, published = RELEASED[name]
  config = pi_jax.preset(name)
  ours = pi_jax.count_params(config)  # jax.eval_shape: nothing is allocated
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
  theirs = sum(p.numel() for p in model.parameters())
  assert ours == theirs == published


def test_eval_shape_allocates_nothing():
  shapes = pi_jax.abstract_params(pi_jax.preset("llama2-70b"))
  assert shapes["layers"]["wq"].shape == (80, 8192, 64, 128)
  assert shapes["layers"]["wk"].shape == (80, 8192, 8, 128)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))


def test_preset_pi_extension_and_overrides():
  config = pi_jax.preset("llama-7b").with_rope_scaling("linear:16")
  assert config.max_position_embeddings == 32768 and config.original_window == 2048
  assert pi_jax.preset("smollm2-135m", rope_theta=5e5).rope_theta == 5e5
  with pytest.raises(TypeError):  # how a run computes is not part of a preset
    pi_jax.preset("smollm2-135m", compute_dtype="bfloat16")


def test_unknown_preset_lists_names():
  with pytest.raises(KeyError, match="unknown preset 'llama-8b'.*llama-7b.*smollm2-1.7b"):
    pi_jax.preset("llama-8b")
