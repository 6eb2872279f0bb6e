"""Logits of tiny random transformers LLaMA models equal pi_jax's, for every scaling kind."""

import jax.numpy as jnp
import numpy as np
import pytest

import pi_jax
from convert.to_pi_jax import convert
from conftest import hf_logits, make_hf_model, rel_err

SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32, "factor": 4.0,
                 "short_factor": [1.0 + 0.1 * i for i in range(6)],
                 "long_factor": [1.0 + 0.7 * i for i in range(6)]},
}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kind", list(SCALINGS))
def test_logits_match_transformers_past_window(tmp_path, kind, tie):
  extra = {"max_position_embeddings": 128} if kind in ("yarn", "llama3", "longrope") else {}
  model = make_hf_model(tmp_path / "hf", SCALINGS[kind], tie_word_embeddings=tie, **extra)
  convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  config, params = pi_jax.load_checkpoint(str(tmp_path / "ckpt"))
  assert config.rope_scaling.kind == kind, "the converter dropped or changed the RoPE scaling"
  tokens = np.random.RandomState(0).randint(0, 128, (2, 100))  # 100 > trained window of 32
  got = pi_jax.forward(config, params, jnp.asarray(tokens, jnp.int32))
  assert rel_err(got, hf_logits(model, tokens)) < 1e-4
