"""pi_jax as an lm-evaluation-harness model (lm-eval 0.4.x): `PiJaxLM`, registered as "pi_jax".

  lm_eval.simple_evaluate(model=PiJaxLM(ckpt, rope_scaling="linear:4"), tasks=["boolq"])
  python eval.py harness --ckpt CKPT --tasks boolq,piqa --rope-scaling linear:4

All three request types, numerically the requests lm-eval's own `hf` backend
(lm_eval/models/huggingface.py) would run:
  - loglikelihood: context + continuation left-truncated to max_length + 1 tokens, the last
    token dropped, scored in batches. Requests are sorted and padded to buckets (16, 24, 32,
    48, ...) of input and continuation length (right padding: causal attention never sees it),
    so a task compiles a handful of programs. Only the continuation's hidden states are projected
    to the vocabulary.
  - loglikelihood_rolling: lm-eval's disjoint windows of max_length by default; with
    `rolling_stride=S` the paper's sliding window (PI §3.2) through
    pi_jax.evals.perplexity.evaluate_perplexity, every token scored once with >= W - S context.
  - generate_until: pi_jax.generate's KV-cache generator (greedy, or sampled per gen_kwargs),
    the context left-truncated to max_length - max_gen_toks, cut at the first stop string.
    Prompts of equal token length and equal gen_kwargs share a batch (the generator takes no
    padding).
Requests lm-eval would truncate are truncated the same way and counted (`truncated_requests`).
This module imports lm_eval at the top: `import pi_jax.evals` does not import it.
"""

from __future__ import annotations

import functools
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm import tqdm

from pi_jax import checkpoint as checkpoint_lib
from pi_jax import dispatch
from pi_jax import loss as loss_lib
from pi_jax import model as model_lib
from pi_jax import sharding as sharding_lib
from pi_jax import tokenizer as tokenizer_lib
from pi_jax.evals import perplexity as ppl
from pi_jax.evals import runtime
from pi_jax.generate import PROMPT_BUCKET, generate
from pi_jax.run import RunOptions

MIN_BUCKET = 16  # the shortest input / continuation length compiled
LOGITS_CHUNK = 256  # continuation positions projected to the vocabulary at once
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf backend default
GEN_KWARGS_USED = ("do_sample", "temperature", "top_p", "top_k", "until", "max_gen_toks")


def bucket(n: int, cap: int | None = None) -> int:
  """The padded length for n: the next of 16, 24, 32, 48, 64, 96, ... (powers of two and
  their halfway points: at most 1.5x padding, two programs per octave), at most cap."""
  p = 1 << max(0, n - 1).bit_length()
  b = max(MIN_BUCKET, 3 * p // 4 if n <= 3 * p // 4 else p)
  return max(n, min(b, cap)) if cap else b


def run_options(dtype: str | None) -> RunOptions:
  """The run options of the `dtype` model argument (None: float32)."""
  if dtype not in (None, "float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: expected float32 or bfloat16")
  return RunOptions(compute_dtype=dtype or "float32")


@functools.partial(jax.jit, static_argnames=("config", "run", "chunk"))
def _score_continuations(config, run, params, tokens_BL, spans_B2, conts_BC, *, chunk):
  """Scores row b's continuation conts_BC[b, :n], predicted by positions e - n .. e - 1 of its
  input, where (e, n) = spans_B2[b] (input length, continuation length). Returns
  (log-prob of all but its last token [B], those are all greedy [B],
   log-softmax at the last position [B, V], argmax there [B]):
  requests that differ only in the last token (one-token answers to one question) share a row.
  """
  h_BLD = model_lib.hidden_states(config, params, tokens_BL, run=run)
  native_kernel = dispatch.choose(run).native_matmul
  b, length, _ = h_BLD.shape
  c = conts_BC.shape[1]
  ends_B1, lens_B1 = spans_B2[:, :1], spans_B2[:, 1:]
  idx_BC = jnp.clip(ends_B1 - lens_B1 + jnp.arange(c)[None], 0, length - 1)
  h_BCD = jnp.take_along_axis(h_BLD, idx_BC[..., None], axis=1)
  pad = (-c) % chunk
  h_BCD = jnp.pad(h_BCD, ((0, 0), (0, pad), (0, 0)))
  t_BC = jnp.pad(conts_BC, ((0, 0), (0, pad)))
  n = (c + pad) // chunk
  h_NBTD = h_BCD.reshape(b, n, chunk, -1).swapaxes(0, 1)
  t_NBT = t_BC.reshape(b, n, chunk).swapaxes(0, 1)

  def one_chunk(xs):
    h_BTD, t_BT = xs
    logits_BTV = model_lib.logits_from_hidden(config, params, h_BTD, run=run)
    logz_BT, picked_BT = loss_lib.logsumexp_and_target(logits_BTV, t_BT, native_kernel)
    return picked_BT - logz_BT, jnp.argmax(logits_BTV, axis=-1) == t_BT

  logp_NBT, greedy_NBT = jax.lax.map(one_chunk, (h_NBTD, t_NBT))
  logp_BC = logp_NBT.swapaxes(0, 1).reshape(b, -1)[:, :c]
  greedy_BC = greedy_NBT.swapaxes(0, 1).reshape(b, -1)[:, :c]
  head_BC = jnp.arange(c)[None] < lens_B1 - 1
  h_B1D = jnp.take_along_axis(h_BLD, jnp.clip(ends_B1 - 1, 0, length - 1)[..., None], axis=1)
  last_BV = model_lib.logits_from_hidden(config, params, h_B1D, run=run)[:, 0]
  return (jnp.sum(jnp.where(head_BC, logp_BC, 0.0), axis=1),
          jnp.all(greedy_BC | ~head_BC, axis=1),
          jax.nn.log_softmax(last_BV, axis=-1), jnp.argmax(last_BV, axis=-1))


def _special_text(tok, token_id: int | None) -> str | None:
  """A special token's text (for stop strings and BOS-prefixed prompts), where known."""
  if token_id is None:
    return None
  inner = getattr(tok, "_tok", None)  # tokenizers.Tokenizer of HFTokenizer
  if inner is not None:
    return inner.id_to_token(int(token_id))
  sp = getattr(tok, "_sp", None)
  if sp is not None:
    return sp.IdToPiece(int(token_id))
  return None


def _mesh(mesh):
  """A Mesh, or a spec "data:8" / "data:2;fsdp:4" (';' since --model_args splits on ',')."""
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  from pi_jax import sharding
  return sharding.make_mesh(str(mesh).replace(";", ","))


@register_model("pi_jax")
class PiJaxLM(TemplateLM):
  """A pi_jax checkpoint behind lm-eval's LM interface; model_args use the same names."""

  def __init__(self, checkpoint: str, rope_scaling: str | None = None,
               max_length: int | None = None, batch_size: int | str = 1,
               dtype: str | None = None, mesh=None, rolling_stride: int | None = None,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0, progress: bool = True,
               run: RunOptions | None = None, **lm_eval_extras):
    """run (the library's pi_jax.run.RunOptions) wins over dtype, the model_args shorthand."""
    super().__init__()
    unknown = set(lm_eval_extras) - {"device", "max_batch_size"}
    if unknown:
      raise ValueError(f"pi_jax model_args: unknown argument(s) {sorted(unknown)}; known: "
                       "checkpoint, rope_scaling, max_length, batch_size, dtype, mesh, "
                       "rolling_stride, max_gen_toks, seed, progress")
    checkpoint = str(checkpoint)
    if not checkpoint_lib.is_checkpoint(checkpoint):
      raise ValueError(f"checkpoint={checkpoint}: not a pi_jax checkpoint directory")
    try:
      self.tok = tokenizer_lib.load_tokenizer(checkpoint)
    except FileNotFoundError:
      raise ValueError(f"checkpoint {checkpoint} has no tokenizer (its tokenizer/ folder); "
                       "lm-eval passes text, so the harness needs one: convert the model with "
                       "its tokenizer") from None
    try:
      batch_size = int(batch_size)
    except ValueError:
      raise ValueError(f"batch_size={batch_size!r}: pi_jax needs an integer") from None
    self.mesh = _mesh(mesh)
    self.shards = sharding_lib.batch_shards(self.mesh)
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}: must be >= 1")
    self._batch_size = -(-batch_size // self.shards) * self.shards  # whole rows per data shard
    self.run = run or run_options(dtype)
    config, self.params = checkpoint_lib.load_checkpoint(checkpoint, mesh=self.mesh,
                                                         param_dtype=self.run.param_dtype)
    if rope_scaling not in (None, ""):
      try:
        config = config.with_rope_scaling(rope_scaling)
      except ValueError as e:
        raise ValueError(f"rope_scaling={rope_scaling!r} does not fit {checkpoint}: {e}") from None
    self.config = config
    self.checkpoint = checkpoint
    self._max_length = int(max_length) if max_length else None
    if self.max_length < 2:
      raise ValueError(f"max_length={self.max_length}: must be at least 2")
    if rolling_stride is not None and not 1 <= int(rolling_stride) <= self.max_length:
      raise ValueError(f"rolling_stride={rolling_stride}: must be between 1 and max_length "
                       f"({self.max_length})")
    self.rolling_stride = None if rolling_stride is None else int(rolling_stride)
    self._max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)
    self.progress = bool(progress)
    self.truncated_requests = {"loglikelihood": 0, "generate_until": 0}
    self.compiled_shapes: set[tuple] = set()
    self._scorers: dict[tuple, tuple] = {}
    self._generated_batches = 0

  # --- what lm-eval asks of a model ----------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length or self.config.max_position_embeddings

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return os.path.basename(os.path.normpath(self.checkpoint))

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The checkpoint tokenizer's own BOS policy, as lm-eval's hf backend: none when asked for
    none, or when the text already starts with the BOS token's text."""
    add_bos = None if add_special_tokens is None or add_special_tokens else False
    if add_special_tokens is None and has_bos_prefix(
        string, _special_text(self.tok, self.prefix_token_id)):
      add_bos = False
    return self.tok.encode(string, add_bos=add_bos)

  def tok_decode(self, tokens) -> str:
    return self.tok.decode(tokens)

  def record(self) -> dict:
    """What a run's JSON carries about this model."""
    return {"checkpoint": self.checkpoint, "rope_scaling": self.config.rope_scaling.describe(),
            "max_length": self.max_length, "batch_size": self.batch_size,
            "compute_dtype": self.run.compute_dtype, "rolling_stride": self.rolling_stride,
            "mesh": dict(self.mesh.shape) if self.mesh is not None else None,
            "truncated_requests": dict(self.truncated_requests),
            "compiled_programs": len(self.compiled_shapes)}

  # --- loglikelihood -------------------------------------------------------------------------

  def _bar(self, total, desc):
    return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, count=True):
    """[(log-prob, is_greedy)] of (key, context ids, continuation ids) requests, in order."""
    jobs = []  # (index, input ids, continuation ids)
    for i, (_, ctx, cont) in enumerate(requests):
      if not ctx or not cont:
        raise ValueError("loglikelihood request with an empty context or continuation")
      if len(cont) > self.max_length:
        raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_length "
                         f"{self.max_length}")
      whole = ctx + cont
      if count and len(whole) > self.max_length + 1:
        self.truncated_requests["loglikelihood"] += 1
      jobs.append((i, whole[-(self.max_length + 1):][:-1], cont))
    # One row per distinct (input, continuation length): such requests differ at most in the
    # last continuation token, read from the row's last log-softmax (lm-eval's hf backend
    # shares one-token continuations of one context the same way).
    rows_by_key: dict[tuple, tuple] = {}
    for i, inp, cont in jobs:
      key = (tuple(inp), len(cont))
      if key not in rows_by_key:
        rows_by_key[key] = (inp, cont, [])
      rows_by_key[key][2].append((i, cont[-1]))
    length_dependent = self.config.rope_scaling.depends_on_length
    groups: dict[tuple, list] = {}
    for row in rows_by_key.values():
      # A RoPE table chosen from the sequence length (dynamic NTK, LongRoPE) must see the real
      # length: such requests run unpadded, one shape per length.
      shape = ((len(row[0]), len(row[1])) if length_dependent else
               (bucket(len(row[0]), self.max_length), bucket(len(row[1]), self.max_length)))
      groups.setdefault(shape, []).append(row)
    out = [None] * len(requests)
    bar = self._bar(len(requests), "pi_jax loglikelihood")
    b = self.batch_size
    with runtime.mesh_context(self.mesh):
      for (length, c), group in sorted(groups.items(), reverse=True):
        pending = None
        for s in range(0, len(group), b):
          rows = group[s:s + b]
          tokens = np.zeros((b, length), np.int32)
          spans = np.ones((b, 2), np.int32)  # (input length, continuation length)
          conts = np.zeros((b, c), np.int32)
          for r, (inp, cont, _) in enumerate(rows):
            tokens[r, :len(inp)] = inp
            spans[r] = (len(inp), len(cont))
            conts[r, :len(cont)] = cont
          self.compiled_shapes.add(("loglikelihood", b, length, c))
          result = _score_continuations(
              self.config, self.run, self.params, runtime.put_batch(tokens, self.mesh),
              runtime.put_batch(spans, self.mesh), runtime.put_batch(conts, self.mesh),
              chunk=min(LOGITS_CHUNK, c))
          if pending is not None:  # read batch n back after dispatching n + 1
            self._collect(out, *pending, bar)
          pending = (result, rows)
        if pending is not None:
          self._collect(out, *pending, bar)
    bar.close()
    return out

  @staticmethod
  def _collect(out, result, rows, bar):
    head, head_greedy, last_lsm, last_argmax = (np.asarray(x) for x in jax.device_get(result))
    for r, (_, _, requests) in enumerate(rows):
      for i, last in requests:
        out[i] = (float(head[r] + last_lsm[r, last]),
                  bool(head_greedy[r] and last_argmax[r] == last))
      bar.update(len(requests))

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    results = super().loglikelihood(requests, disable_tqdm=True)
    for req, res in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", req.args, res)
    return results

  # --- loglikelihood_rolling -----------------------------------------------------------------

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    texts = [req.args[0] for req in requests]
    if self.rolling_stride is not None:
      results = [self._sliding_loglikelihood(t) for t in texts]
    else:
      windows, owners = [], []
      for i, text in enumerate(texts):
        for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length, context_len=1)):
          windows.append((None, *w))
          owners.append(i)
      scores = self._loglikelihood_tokens(windows, count=False)
      results = [0.0] * len(texts)
      for i, (logp, _) in zip(owners, scores):
        results[i] += logp
    for text, res in zip(texts, results):
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
    return results

  def _sliding_loglikelihood(self, text: str) -> float:
    """The paper's stride-S sliding window at W = max_length (pi_jax.evals.perplexity); the
    prefix token is prepended as context, so every token of the text is scored, as in lm-eval."""
    ids = np.asarray([self.prefix_token_id] + self.tok_encode(text), np.int32)
    if len(ids) < 2:
      return 0.0
    [result] = ppl.evaluate_perplexity(
        self.config, self.params, [("request", ids)], [self.max_length], self.rolling_stride,
        batch_size=self.batch_size, mesh=self.mesh, scorer_factory=self._window_scorer,
        run=self.run)
    return -result.nll_sum

  def _window_scorer(self, config, params, width, batch, *, mesh=None, chunk=None, run=None):
    """perplexity's scorer, compiled once per bucketed width and padded up to it."""
    if not config.rope_scaling.depends_on_length:
      width_compiled = bucket(width, self.max_length)
    else:
      width_compiled = width
    key = (width_compiled, batch)
    if key not in self._scorers:
      self.compiled_shapes.add(("rolling", batch, width_compiled))
      self._scorers[key] = ppl.make_window_scorer(config, params, width_compiled, batch,
                                                  mesh=mesh, chunk=chunk or loss_lib.DEFAULT_CHUNK,
                                                  run=run)
    run, need, seconds = self._scorers[key]

    def padded(tokens_BL, targets_BL):
      extra = ((0, 0), (0, width_compiled - tokens_BL.shape[1]))
      return run(np.pad(tokens_BL, extra), np.pad(targets_BL, extra))

    return padded, need, seconds

  # --- generate_until ------------------------------------------------------------------------

  def _sampling(self, gen_kwargs: dict):
    """(until, max_gen_toks, temperature, top_k, top_p) from a request's gen_kwargs."""
    kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
    until = handle_stop_sequences(kwargs.pop("until", None),
                                  eos=_special_text(self.tok, self.eot_token_id))
    max_gen_toks = int(kwargs.pop("max_gen_toks"))
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
    if kwargs:
      warnings.warn(f"pi_jax generate_until ignores gen_kwargs {sorted(kwargs)}; it uses "
                    f"{', '.join(GEN_KWARGS_USED)}", stacklevel=2)
    if not do_sample:
      temperature, top_k, top_p = 0.0, None, None
    elif temperature == 0.0:
      temperature = 1.0  # do_sample without a temperature: transformers' default
    if max_gen_toks >= self.max_length:
      raise ValueError(f"max_gen_toks {max_gen_toks} must be below max_length {self.max_length}")
    return (until, max_gen_toks, temperature, None if top_k is None else int(top_k),
            None if top_p is None else float(top_p))

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups: dict[tuple, list] = {}
    for i, req in enumerate(requests):
      context, gen_kwargs = req.args
      sampling = self._sampling(gen_kwargs)
      ids = self.tok_encode(context)
      max_ctx = self.max_length - sampling[1]
      if len(ids) > max_ctx:
        self.truncated_requests["generate_until"] += 1
        ids = ids[-max_ctx:]
      key = (json.dumps(gen_kwargs, sort_keys=True, default=str), len(ids))
      groups.setdefault(key, []).append((i, ids, sampling))
    out = [None] * len(requests)
    bar = self._bar(len(requests), "pi_jax generate_until")
    base_key = jax.random.key(self.seed)
    with runtime.mesh_context(self.mesh):
      for (_, length), group in sorted(groups.items(), key=lambda kv: -kv[0][1]):
        until, max_gen_toks, temperature, top_k, top_p = group[0][2]
        for s in range(0, len(group), self.batch_size):
          rows = group[s:s + self.batch_size]
          n = -(-len(rows) // self.shards) * self.shards
          prompt = np.asarray([r[1] for r in rows] + [rows[-1][1]] * (n - len(rows)), np.int32)
          key = jax.random.fold_in(base_key, self._generated_batches)
          self._generated_batches += 1
          bucketed = PROMPT_BUCKET * -(-length // PROMPT_BUCKET)
          self.compiled_shapes.add(("generate", n, bucketed, max_gen_toks))
          tokens = np.asarray(generate(
              self.config, self.params, runtime.put_batch(prompt, self.mesh), max_gen_toks,
              temperature=temperature, top_k=top_k, top_p=top_p, key=key,
              eos_id=self.eot_token_id, run=self.run))
          for r, (i, _, _) in enumerate(rows):
            toks = tokens[r].tolist()
            if self.eot_token_id is not None and self.eot_token_id in toks:
              toks = toks[:toks.index(self.eot_token_id)]
            text = postprocess_generated_text(self.tok_decode(toks), until, None)
            out[i] = text
            self.cache_hook.add_partial("generate_until", requests[i].args, text)
          bar.update(len(rows))
    bar.close()
    return out


# --- tasks ---------------------------------------------------------------------------------

def _check_data_file(path: str, task: str) -> None:
  """A local JSON / JSON Lines dataset: present, parseable, at least one record (one line)."""
  if not os.path.isfile(path):
    raise ValueError(f"task {task}: data file {path} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if path.endswith(".jsonl"):
      records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
      records = json.loads(text) if text.strip() else []
      if isinstance(records, dict):  # {"data": [...]}-style files: datasets' `field`
        records = next((v for v in records.values() if isinstance(v, list)), [records])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"task {task}: data file {path} is not valid JSON: {e}") from None
  if not records:
    raise ValueError(f"task {task}: data file {path} holds no records")
  if not all(isinstance(r, dict) for r in records):
    raise ValueError(f"task {task}: data file {path}: every record must be a JSON object")


def load_local_task(yaml_path: str) -> dict:
  """A task YAML whose `dataset_path: json` files are named relative to the YAML's folder, as a
  config dict for lm-eval with those paths made absolute and each file checked."""
  from lm_eval.tasks._yaml_loader import load_yaml
  cfg = load_yaml(yaml_path)
  folder = os.path.dirname(os.path.abspath(yaml_path))
  if cfg.get("dataset_path") in ("json", "csv", "text"):
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if isinstance(files, str):
      files = {"train": files}
    if not isinstance(files, dict):
      raise ValueError(f"{yaml_path}: dataset_kwargs.data_files must name the data file(s)")
    resolved = {}
    for split, names in files.items():
      names = [names] if isinstance(names, str) else list(names)
      resolved[split] = [n if os.path.isabs(n) else os.path.join(folder, n) for n in names]
      if cfg["dataset_path"] == "json":
        for n in resolved[split]:
          _check_data_file(n, cfg.get("task", yaml_path))
    kwargs["data_files"] = resolved
    cfg["dataset_kwargs"] = kwargs
  return cfg


def resolve_tasks(names: list[str], include_path: str | None = None):
  """(tasks for simple_evaluate, TaskManager): names found in YAML files under include_path
  become checked config dicts (local data resolved next to the YAML); others stay names."""
  from lm_eval.tasks import TaskManager
  local = {}
  if include_path:
    if not os.path.isdir(include_path):
      raise ValueError(f"--include-path {include_path} is not a directory")
    for root, _, files in sorted(os.walk(include_path)):
      for name in sorted(files):
        if name.endswith((".yaml", ".yml")):
          path = os.path.join(root, name)
          from lm_eval.tasks._yaml_loader import load_yaml
          try:
            task = load_yaml(path, resolve_func=False).get("task")
          except Exception as e:
            raise ValueError(f"{path}: not a readable task YAML: {e}") from None
          if isinstance(task, str):
            local.setdefault(task, path)
  # lm-eval's own task index takes tens of seconds to build: only when a task needs it.
  manager = TaskManager(include_path=include_path,
                        include_defaults=not all(n in local for n in names))
  unknown = [n for n in names if n not in local and n not in manager.all_tasks]
  if unknown:
    # lm-eval's own words (its `validate` command), and where else was searched.
    raise ValueError(f"Tasks not found: {', '.join(unknown)} (`lm-eval ls tasks` lists lm-eval's "
                     f"{len(manager.all_tasks)} tasks"
                     f"{'; ' + include_path + ' was searched too' if include_path else ''})")
  return [load_local_task(local[n]) if n in local else n for n in names], manager


def evaluate(lm: PiJaxLM, tasks: list[str], *, include_path: str | None = None,
             num_fewshot: int | None = None, limit: int | None = None, log_samples=False,
             random_seed: int = 0) -> dict:
  """lm_eval.simple_evaluate on pi_jax with the tasks resolved by `resolve_tasks`."""
  import lm_eval
  specs, manager = resolve_tasks(tasks, include_path)
  return lm_eval.simple_evaluate(
      model=lm, tasks=specs, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
      log_samples=log_samples, random_seed=random_seed, numpy_random_seed=random_seed,
      torch_random_seed=random_seed, fewshot_random_seed=random_seed, bootstrap_iters=0)


if __name__ == "__main__":
  # lm-eval's own command line with the "pi_jax" model registered:
  #   python -m pi_jax.evals.harness run --model pi_jax --model_args checkpoint=CKPT --tasks ...
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()
