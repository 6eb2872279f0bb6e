"""How one run executes a model: dtypes, rematerialization, the attention kernel and its tile.

A checkpoint stores what a model IS (pi_jax.config.ModelConfig: architecture and RoPE scaling);
`RunOptions` says how this run computes with it, and is given again by every run: `--set
run.FIELD=VALUE` on train.py, eval.py and the benchmarks, `run=RunOptions(...)` in the library.
It is never written into a checkpoint's config.json (STYLE.md rule 15: a saved compute_dtype
silently turning an eval into bf16 is the bug this prevents). Which kernels the options stand for
on this backend is decided in one place, pi_jax.dispatch.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
# The remat policies (pi_jax.model._remat_policy says what each keeps).
REMAT_POLICIES = ("none", "full", "offload", "save_attention", "offload_save_attention",
                  "save_qkv_out", "dots_saveable", "dots_with_no_batch_dims_saveable")
# The attention implementations (pi_jax.attention runs them; pi_jax.dispatch resolves "auto").
ATTENTION_IMPLS = ("auto", "reference", "xla_blockwise", "cpu_flash", "cudnn", "splash", "ring")
# The native CPU kernels (pi_jax.native): auto = wherever they apply and build; off = never.
NATIVE_MODES = ("auto", "off")


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How a run computes (never stored with the weights).

  param_dtype: the parameters' dtype in memory; None keeps a checkpoint's stored dtype (float32
    for a random init).
  compute_dtype: activations and matmul inputs; softmax statistics and RoPE angles stay float32.
  remat: the rematerialization policy of each layer (REMAT_POLICIES).
  attention_impl: ATTENTION_IMPLS; auto lets pi_jax.dispatch choose for the backend.
  attention_block_size: the attention tile; None lets the implementation choose.
  native: whether the native CPU kernels may be used (auto) or not (off).
  """

  param_dtype: str | None = None
  compute_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str = "auto"
  attention_block_size: int | None = None
  native: str = "auto"

  def __post_init__(self):
    if self.param_dtype is not None and self.param_dtype not in DTYPES:
      raise ValueError(f"run.param_dtype must be one of {DTYPES} (or null), got "
                       f"{self.param_dtype!r}")
    if self.compute_dtype not in DTYPES:
      raise ValueError(f"run.compute_dtype must be one of {DTYPES}, got {self.compute_dtype!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"run.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"run.attention_impl must be one of {ATTENTION_IMPLS}, got "
                       f"{self.attention_impl!r}")
    block = self.attention_block_size
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block <= 0):
      raise ValueError(f"run.attention_block_size must be a positive integer (or null), got "
                       f"{block!r}")
    if self.native not in NATIVE_MODES:
      raise ValueError(f"run.native must be one of {NATIVE_MODES}, got {self.native!r}")

  def replace(self, **changes) -> RunOptions:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> RunOptions:
    unknown = set(d) - set(FIELDS)
    if unknown:
      raise ValueError(f"unknown run options {sorted(unknown)}; known: {', '.join(FIELDS)}")
    return cls(**d)

  def describe(self) -> str:
    block = self.attention_block_size or "default"
    return (f"{self.param_dtype or 'stored'} params, {self.compute_dtype} compute, remat "
            f"{self.remat}, attention {self.attention_impl} (tile {block}), native {self.native}")


FIELDS = tuple(f.name for f in dataclasses.fields(RunOptions))
_NONE_WORDS = ("null", "None", "none", "")


def parse_value(text: str, annotation, key: str):
  """`text` parsed as the type hint `annotation` (str, int, float, bool, or X | None)."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(annotation)
    if type(None) in args and text in _NONE_WORDS:
      return None
    errors = []
    for option in (a for a in args if a is not type(None)):
      try:
        return parse_value(text, option, key)
      except ValueError as e:
        errors.append(str(e))
    raise ValueError("; ".join(errors))
  if annotation is bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"--set {key}={text}: expected a boolean (true/false)")
  if annotation is int:
    try:
      return int(text)
    except ValueError:
      raise ValueError(f"--set {key}={text}: expected an integer") from None
  if annotation is float:
    try:
      return float(text)
    except ValueError:
      raise ValueError(f"--set {key}={text}: expected a number") from None
  if annotation is str:
    return text
  raise ValueError(f"--set {key}: cannot parse values of type {annotation}")


def unknown_key(key: str, known) -> ValueError:
  """The error for an unknown `--set` key, with the closest known ones."""
  close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
  hint = f"; did you mean {', '.join(close)}?" if close else ""
  return ValueError(f"--set: unknown config key {key!r}{hint} (known: {', '.join(sorted(known))})")


def with_settings(run: RunOptions, settings: dict[str, str]) -> RunOptions:
  """`run` with {FIELD: text} settings parsed by each field's type (the `run.` prefix dropped)."""
  hints = typing.get_type_hints(RunOptions)
  changes = {}
  for field, text in settings.items():
    if field not in hints:
      raise unknown_key(f"run.{field}", [f"run.{f}" for f in FIELDS])
    changes[field] = parse_value(text, hints[field], f"run.{field}")
  return run.replace(**changes)


# --- the shared command-line flag group: eval.py and the benchmarks (train.py takes run.FIELD in
# its own --set, beside the run config's other keys) ----------------------------------------

def add_arguments(parser) -> None:
  """`--set run.FIELD=VALUE` (repeatable) and the two shorthands `--dtype` and `--attention-impl`."""
  parser.add_argument(
      "--set", action="append", default=[], metavar="run.FIELD=VALUE", dest="run_settings",
      help=f"how this run computes (repeatable; never read from the checkpoint): FIELD is one of "
           f"{', '.join(FIELDS)}; e.g. --set run.attention_block_size=512")
  parser.add_argument("--dtype", default=None, choices=DTYPES,
                      help="compute dtype: shorthand for --set run.compute_dtype=... (default "
                           "float32)")
  parser.add_argument("--attention-impl", default=None, choices=ATTENTION_IMPLS,
                      help="shorthand for --set run.attention_impl=... (default auto: chosen for "
                           "the backend by pi_jax.dispatch)")


def from_arguments(args, base: RunOptions | None = None) -> RunOptions:
  """The RunOptions of parsed `add_arguments` flags (ValueError names a bad one)."""
  settings = {}
  for item in args.run_settings:
    for part in item.split(","):
      key, sep, text = part.partition("=")
      key = key.strip()
      if not sep or not key.startswith("run."):
        raise ValueError(f"--set {part!r}: expected run.FIELD=VALUE (FIELD one of "
                         f"{', '.join(FIELDS)})")
      settings[key[len("run."):]] = text.strip()
  if args.dtype:
    settings["compute_dtype"] = args.dtype
  if args.attention_impl:
    settings["attention_impl"] = args.attention_impl
  return with_settings(base or RunOptions(), settings)
