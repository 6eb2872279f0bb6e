"""What a run trains: the model config (from the init checkpoint or the run config, with its RoPE
scaling and window), the parameters' dtype, the tokenizer and the training data."""

from __future__ import annotations

import os

from pi_jax import checkpoint as ckpt_lib
from pi_jax import model as model_lib
from pi_jax.config import ModelConfig
from pi_jax.tokenizer import ByteTokenizer, load_tokenizer
from pi_jax.train import episodes, pipeline
from pi_jax.train import state as state_lib
from pi_jax.train.config import TrainConfig


def _model_from_config(config: TrainConfig) -> ModelConfig:
  model = config.model
  if model is None:
    raise ValueError("the run config gives neither init_checkpoint nor model: set one "
                     "(--set init_checkpoint=PATH, or model=PRESET_NAME)")
  if isinstance(model, str):
    try:
      from pi_jax import presets
    except ImportError:
      raise ValueError(f"model preset {model!r}: pi_jax.presets is not available") from None
    model = presets.preset(model)
  return model


def final_model_config(config: TrainConfig, model: ModelConfig) -> ModelConfig:
  """Applies rope_scaling / max_position_embeddings and checks seq_len fits the window."""
  if config.rope_scaling is not None:
    model = model.with_rope_scaling(config.rope_scaling)
  if config.max_position_embeddings is not None:
    model = model.replace(max_position_embeddings=config.max_position_embeddings)
  if config.seq_len > model.max_position_embeddings:
    raise ValueError(
        f"seq_len {config.seq_len} exceeds the model's window {model.max_position_embeddings}: "
        f"extend it with PI (--set rope_scaling=linear:{config.seq_len / model.original_window:g}) "
        f"or directly (--set max_position_embeddings={config.seq_len})")
  return model


def param_dtype(config: TrainConfig) -> str:
  """The dtype the run keeps its parameters in: run.param_dtype, else the init checkpoint's
  stored dtype, else float32 (a random init)."""
  if config.run.param_dtype:
    return config.run.param_dtype
  if config.init_checkpoint and ckpt_lib.is_checkpoint(config.init_checkpoint):
    return ckpt_lib.stored_param_dtype(config.init_checkpoint)
  return "float32"


def load_model(config: TrainConfig, mesh, fresh: bool) -> tuple[ModelConfig, dict | None]:
  """(model config, init parameters or None): from the init checkpoint (its parameters only for
  a fresh run, in `param_dtype(config)`), else the run config's model (random init later)."""
  if not config.init_checkpoint:
    return _model_from_config(config), None
  if fresh:
    model, params = state_lib.load_init_params(config.init_checkpoint, mesh, param_dtype(config))
  else:
    model, params = state_lib.load_init_config(config.init_checkpoint), None
  if config.model is not None:  # the run config names the architecture it expects
    expected = _model_from_config(config)
    if model_lib.param_shapes(expected) != model_lib.param_shapes(model):
      name = repr(config.model) if isinstance(config.model, str) else "the run config's model"
      raise ValueError(
          f"init_checkpoint {config.init_checkpoint} does not have the architecture of "
          f"{name} (parameter shapes differ); fix init_checkpoint, or --set model=null to "
          "take the architecture from the checkpoint")
  return model, params


def tokenizer_and_files(config: TrainConfig, model: ModelConfig):
  """(tokenizer, {file name: source path} to copy into the final checkpoint's tokenizer/)."""
  source = config.tokenizer or config.init_checkpoint
  if source:
    tok = load_tokenizer(source)
    folder = os.path.join(source, "tokenizer")
    if not os.path.isdir(folder):
      folder = source
    files = {}
    for root, _, names in os.walk(folder):
      for name in names:
        src = os.path.join(root, name)
        files[os.path.relpath(src, folder)] = src
  else:
    tok = ByteTokenizer()
    files = {"bytes.json": tok.save(os.path.join(config.workdir, "tokenizer"))}
  if model.vocab_size < tok.vocab_size:
    raise ValueError(f"the tokenizer ({source or 'bytes'}) has {tok.vocab_size} ids, more than "
                     f"the model's vocab_size {model.vocab_size}")
  return tok, files


def train_data(config: TrainConfig, tokenizer, vocab_size: int):
  """The run config's data, with passkey episodes mixed in when passkey_fraction > 0."""
  data = pipeline.load_train_data(config, tokenizer, vocab_size)
  if config.passkey_fraction > 0:
    data = episodes.PasskeyMixture(data, tokenizer, config.seq_len, config.global_batch,
                                   config.passkey_fraction, config.seed, config.passkey_template)
  return data


def abstract_model_config(config: TrainConfig) -> tuple[ModelConfig, str]:
  """(final model config, where its architecture came from) without reading any parameter.

  The init checkpoint's config.json when it exists, else the run config's `model` (the
  architecture the checkpoint must have): what a compile-only run needs before the weights are
  downloaded or converted.
  """
  if config.init_checkpoint and ckpt_lib.is_checkpoint(config.init_checkpoint):
    model, source = load_model(config, None, fresh=False)[0], config.init_checkpoint
  elif config.model is not None:
    model, source = _model_from_config(config), (
        f"preset {config.model}" if isinstance(config.model, str) else "the run config's model")
  else:
    raise ValueError(f"init_checkpoint {config.init_checkpoint!r} is not a pi_jax checkpoint and "
                     "the run config names no model: set model=PRESET for a compile-only run")
  return final_model_config(config, model), source


def validate_config(config: TrainConfig, need_checkpoint: bool = True) -> ModelConfig | None:
  """The run's final model config, or the error the run would stop with (unknown RoPE kind,
  window too short, missing init_checkpoint); reads no parameter and creates nothing. Without
  need_checkpoint (--print-config before a download), a missing init_checkpoint is checked
  against the run config's model, or not at all when it names none (then None)."""
  from pi_jax.config import RopeScaling
  if config.init_checkpoint and not ckpt_lib.is_checkpoint(config.init_checkpoint):
    if need_checkpoint:
      state_lib.load_init_config(config.init_checkpoint)  # FileNotFoundError naming it
    RopeScaling.parse(config.rope_scaling)
    if config.model is None:
      return None
    return final_model_config(config, _model_from_config(config))
  return final_model_config(config, load_model(config, None, fresh=False)[0])
