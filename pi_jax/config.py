"""Model configuration: a frozen dataclass, RoPE scaling, and transformers interop.

`ModelConfig.from_hf` / `to_hf` round-trip transformers' `config.json`, in both the current
`rope_parameters` form and the older `rope_scaling` + `rope_theta` form. The RoPE scaling is
part of the config, so every checkpoint, conversion and export carries it. How a run computes
with the model (dtypes, remat, kernels) is not: that is pi_jax.run.RunOptions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

ROPE_KINDS = ("none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
# transformers' rope_type names; "ntk" (fixed NTK-aware) has no transformers type of its own.
_TO_HF_TYPE = {"none": "default", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
               "llama3": "llama3", "longrope": "longrope"}
_FROM_HF_TYPE = {v: k for k, v in _TO_HF_TYPE.items()}
# Keys older checkpoints' config.json may carry that no longer mean anything (scan_layers: the
# layers are always scanned); from_dict drops them so those checkpoints still load.
_RETIRED_KEYS = ("scan_layers",)
# Run options that checkpoints written before pi_jax.run existed stored in config.json; a run
# gives them itself now, so from_dict drops them (and `run_keys_in` says which were there).
RUN_KEYS = ("param_dtype", "compute_dtype", "remat", "attention_impl", "attention_block_size")

MAX_ROPE_FACTOR = 4096.0  # far beyond any published extension (LongRoPE: 128x)
MAX_POSITIONS = 2**31 - 1  # positions are int32


def _positive_number(name: str, value) -> None:
  """A real, finite, positive number (not a string, not a bool)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a finite positive number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How RoPE positions or frequencies are rescaled to extend the context window.

  kind: none | linear (Position Interpolation) | ntk (fixed NTK-aware base change) |
    dynamic (NTK with the base grown at run time from the sequence length) | yarn | llama3 |
    longrope.
  factor: L'/L, the extension ratio (>= 1).
  original_max_position_embeddings: L, the window the model was trained on. Required for
    yarn, llama3 and longrope; for the others it defaults to the model's window.
  """

  kind: str = "none"
  factor: float = 1.0
  original_max_position_embeddings: int | None = None
  attention_factor: float | None = None  # yarn / longrope: overrides the derived factor
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  mscale: float | None = None  # yarn
  mscale_all_dim: float | None = None  # yarn
  truncate: bool = True  # yarn: floor/ceil the correction range
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  short_factor: tuple[float, ...] | None = None  # longrope
  long_factor: tuple[float, ...] | None = None  # longrope

  def __post_init__(self):
    if self.kind not in ROPE_KINDS:
      raise ValueError(f"unknown RoPE scaling kind {self.kind!r}; expected one of {ROPE_KINDS}")
    if isinstance(self.factor, bool) or not (isinstance(self.factor, (int, float))
                                             and math.isfinite(self.factor)):
      raise ValueError(f"RoPE scaling factor must be a finite number, got {self.factor!r}")
    if self.factor > MAX_ROPE_FACTOR:
      raise ValueError(f"RoPE scaling factor {self.factor:g} is absurd (at most "
                       f"{MAX_ROPE_FACTOR:g}); it is L'/L, e.g. 4 for 2K -> 8K")
    if self.kind == "none":
      if self.factor != 1.0:
        raise ValueError(f"RoPE scaling kind 'none' takes no factor, got factor={self.factor}")
    elif self.kind != "longrope" and self.factor < 1.0:
      raise ValueError(
          f"RoPE scaling factor must be >= 1 (it is L'/L, the extension ratio), got {self.factor}")
    needs_original = self.kind in ("yarn", "llama3", "longrope")
    if needs_original and not self.original_max_position_embeddings:
      raise ValueError(
          f"RoPE scaling {self.kind!r} needs original_max_position_embeddings (the trained window)")
    if self.kind == "longrope":
      if not self.short_factor or not self.long_factor:
        raise ValueError("RoPE scaling 'longrope' needs short_factor and long_factor lists")
      object.__setattr__(self, "short_factor", tuple(float(x) for x in self.short_factor))
      object.__setattr__(self, "long_factor", tuple(float(x) for x in self.long_factor))
    if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
      raise ValueError("llama3 scaling needs high_freq_factor > low_freq_factor")

  @classmethod
  def parse(cls, spec: str | dict | RopeScaling | None, original: int | None = None) -> RopeScaling:
    """Parses `KIND:FACTOR` (e.g. `linear:4`), a JSON object string, or a dict.

    `original` fills original_max_position_embeddings when the spec does not give it.
    """
    if spec is None:
      return cls()
    if isinstance(spec, RopeScaling):
      return spec
    if isinstance(spec, str):
      text = spec.strip()
      if text.startswith("{"):
        try:
          spec = json.loads(text)
        except json.JSONDecodeError as e:
          raise ValueError(f"--rope-scaling: invalid JSON {text!r}: {e}") from None
      elif text in ("none", "default"):
        return cls()
      else:
        kind, sep, factor = text.partition(":")
        if not sep:
          raise ValueError(
              f"--rope-scaling: expected KIND:FACTOR (e.g. linear:4) or a JSON object, got {text!r}")
        try:
          factor_value = float(factor)
        except ValueError:
          raise ValueError(f"--rope-scaling: factor {factor!r} in {text!r} is not a number") from None
        spec = {"kind": kind, "factor": factor_value}
    spec = dict(spec)
    if "kind" not in spec:  # a transformers-style dict
      return rope_scaling_from_hf(spec, original)
    if original and not spec.get("original_max_position_embeddings"):
      spec["original_max_position_embeddings"] = original
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(spec) - fields
    if unknown:
      raise ValueError(f"RoPE scaling: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    return cls(**spec)

  @property
  def depends_on_length(self) -> bool:
    """Whether the RoPE table changes with the sequence length (dynamic NTK grows its base,
    LongRoPE switches from its short to its long factors): then a prefix's logits depend on
    what follows, and a padded or shared prefix is not the same computation."""
    return self.kind in ("dynamic", "longrope")

  def describe(self) -> str:
    return "none" if self.kind == "none" else f"{self.kind}:{self.factor:g}"


def _rope_object(key: str, value) -> dict:
  """An HF config's rope_scaling / rope_parameters as a dict: some tools write it as a JSON
  string; anything else is one clear error."""
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      pass
  if not isinstance(value, dict):
    raise ValueError(f"config.json: {key} must be an object like {{\"rope_type\": \"linear\", "
                     f"\"factor\": 4}} (or null), got {value!r}; fix the model's config.json")
  return value


def rope_scaling_from_hf(params: dict | None, original: int | None = None) -> RopeScaling:
  """RopeScaling from a transformers `rope_parameters` / `rope_scaling` dict."""
  if not params:
    return RopeScaling()
  hf_type = params.get("rope_type", params.get("type", "default"))
  if hf_type not in _FROM_HF_TYPE:
    raise ValueError(f"unsupported transformers rope_type {hf_type!r}; supported: {sorted(_FROM_HF_TYPE)}")
  kind = _FROM_HF_TYPE[hf_type]
  if kind == "none":
    return RopeScaling()
  keys = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate",
          "low_freq_factor", "high_freq_factor", "short_factor", "long_factor")
  kwargs = {k: params[k] for k in keys if params.get(k) is not None}
  orig = params.get("original_max_position_embeddings") or original
  factor = params.get("factor")
  if factor is None:
    factor = 1.0
  return RopeScaling(kind=kind, factor=float(factor), original_max_position_embeddings=orig, **kwargs)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A LLaMA-family decoder (LLaMA 1/2/3, SmolLM2): its architecture and RoPE scaling.

  max_position_embeddings is the window the model is meant to be used at: after PI by a factor
  s it is s times the trained window, which rope_scaling.original_max_position_embeddings keeps.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int | None = None  # None: multi-head attention (= num_heads)
  head_dim: int | None = None  # None: hidden_size // num_heads
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; give head_dim")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if isinstance(self.rope_scaling, (dict, str)) or self.rope_scaling is None:
      object.__setattr__(self, "rope_scaling", RopeScaling.parse(self.rope_scaling))
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads} (GQA)")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.max_position_embeddings > MAX_POSITIONS:
      raise ValueError(f"max_position_embeddings {self.max_position_embeddings} exceeds "
                       f"{MAX_POSITIONS} (positions are int32)")
    _positive_number("rope_theta", self.rope_theta)
    _positive_number("rms_norm_eps", self.rms_norm_eps)
    if self.rope_scaling.kind == "longrope":
      n = self.head_dim // 2
      for name in ("short_factor", "long_factor"):
        if len(getattr(self.rope_scaling, name)) != n:
          raise ValueError(f"longrope {name} must have head_dim/2 = {n} entries")

  # --- derived -------------------------------------------------------------------------------

  @property
  def original_window(self) -> int:
    """The window the weights were trained on (L in the paper)."""
    scaling = self.rope_scaling
    if scaling.original_max_position_embeddings:
      return scaling.original_max_position_embeddings
    if scaling.kind in ("linear", "ntk"):
      return max(1, round(self.max_position_embeddings / scaling.factor))
    return self.max_position_embeddings

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def with_rope_scaling(self, spec: str | dict | RopeScaling | None) -> ModelConfig:
    """Sets or replaces the RoPE scaling; the window becomes original_window × factor."""
    original = self.original_window
    scaling = RopeScaling.parse(spec, original=original)
    if scaling.kind == "none":
      return self.replace(rope_scaling=scaling, max_position_embeddings=original)
    if not scaling.original_max_position_embeddings:
      scaling = dataclasses.replace(scaling, original_max_position_embeddings=original)
    window = original if scaling.kind == "dynamic" else int(round(original * scaling.factor))
    return self.replace(rope_scaling=scaling, max_position_embeddings=window)

  # --- serialization -------------------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in dataclasses.asdict(self.rope_scaling).items()}
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    """The inverse of to_dict; run options an older config.json holds (RUN_KEYS) are dropped."""
    d = {k: v for k, v in d.items() if k not in _RETIRED_KEYS + RUN_KEYS}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"unknown ModelConfig keys {sorted(unknown)}")
    d["rope_scaling"] = RopeScaling.parse(d.get("rope_scaling"))
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
    """From a transformers LLaMA-family `config.json` dict (either RoPE form)."""
    arch = hf.get("model_type", "llama")
    if arch not in ("llama", "mistral") and not any(
        "Llama" in a for a in hf.get("architectures") or []):
      raise ValueError(f"model_type {arch!r} is not a LLaMA-family model (expected 'llama')")
    for flag in ("attention_bias", "mlp_bias"):
      if hf.get(flag):
        raise ValueError(f"config sets {flag}=true; pi_jax's LLaMA has no biases")
    window_limit = hf.get("sliding_window")
    if window_limit is not None and hf.get("use_sliding_window", True) and (
        not isinstance(window_limit, int) or
        window_limit < hf.get("max_position_embeddings", 2048)):
      raise ValueError(f"sliding_window={window_limit!r} (Mistral-style local attention) is not "
                       "implemented: pi_jax attends to the whole window, so the model would "
                       "compute something else")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (LLaMA uses silu)")
    hf = {**hf, **{k: _rope_object(k, hf[k]) for k in ("rope_parameters", "rope_scaling")
                   if hf.get(k) is not None}}
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if hf.get("rope_parameters") and hf.get("rope_scaling"):  # both forms: they must agree
      a = rope_scaling_from_hf(hf["rope_parameters"], hf.get("original_max_position_embeddings"))
      b = rope_scaling_from_hf(hf["rope_scaling"], hf.get("original_max_position_embeddings"))
      if a != b:
        raise ValueError(f"rope_parameters {hf['rope_parameters']} and rope_scaling "
                         f"{hf['rope_scaling']} disagree; remove the wrong one")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    window = hf.get("max_position_embeddings", 2048)
    scaling = rope_scaling_from_hf(rope, original=hf.get("original_max_position_embeddings"))
    if scaling.kind in ("linear", "ntk", "dynamic") and not scaling.original_max_position_embeddings:
      # transformers' dynamic NTK treats max_position_embeddings as the trained window; linear
      # checkpoints in the wild write the extended window there.
      original = window if scaling.kind == "dynamic" else max(1, round(window / scaling.factor))
      scaling = dataclasses.replace(scaling, original_max_position_embeddings=original)
    if scaling.kind == "yarn" and window == scaling.original_max_position_embeddings:
      window = int(round(window * scaling.factor))
    num_heads = hf["num_attention_heads"]
    kwargs = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        max_position_embeddings=window,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
        pad_token_id=_first_id(hf.get("pad_token_id")),
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self, legacy: bool = False, dtype: str = "float32") -> dict[str, Any]:
    """A transformers `LlamaConfig` dict. legacy=True writes `rope_scaling` + `rope_theta`;
    dtype: the weights' dtype (torch_dtype)."""
    s = self.rope_scaling
    rope: dict[str, Any] = {"rope_type": _TO_HF_TYPE.get(s.kind, "dynamic"), "rope_theta": self.rope_theta}
    window = self.max_position_embeddings
    if s.kind != "none":
      rope["factor"] = float(s.factor)
    if s.kind == "ntk":
      raise ValueError("fixed NTK scaling has no transformers rope_type; export 'dynamic' or 'linear'")
    if s.kind == "dynamic":
      window = self.original_window  # transformers reads the trained window from here
    if s.kind in ("yarn", "llama3", "longrope"):
      rope["original_max_position_embeddings"] = s.original_max_position_embeddings
    if s.kind == "yarn":
      rope.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
      for k in ("attention_factor", "mscale", "mscale_all_dim"):
        if getattr(s, k) is not None:
          rope[k] = getattr(s, k)
    if s.kind == "llama3":
      rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.kind == "longrope":
      rope.update(short_factor=list(s.short_factor), long_factor=list(s.long_factor))
      if s.attention_factor is not None:
        rope["attention_factor"] = s.attention_factor
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": window,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "torch_dtype": dtype,
    }
    if legacy:
      hf["rope_theta"] = self.rope_theta
      hf["rope_scaling"] = None if s.kind == "none" else {
          k: v for k, v in rope.items() if k != "rope_theta"}
    else:
      hf["rope_parameters"] = rope
    return hf


def run_keys_in(d: dict[str, Any]) -> dict[str, Any]:
  """The run options an older config.json stored (see RUN_KEYS), to say that they are ignored."""
  return {k: d[k] for k in RUN_KEYS if k in d}


def _first_id(value):
  if isinstance(value, (list, tuple)):
    return value[0] if value else None
  return value
