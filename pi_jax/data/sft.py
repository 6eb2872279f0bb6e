"""Prompt/completion fine-tuning data (SFT): chat-rendered examples with a completion-only loss.

Input: a JSONL file (.jsonl, .jsonl.gz) or a Parquet file whose rows are all
`{"prompt": str, "completion": str}` or all `{"messages": [{"role", "content"}, ...]}` (roles
system, user, assistant). A prompt/completion row is the conversation [user: prompt, assistant:
completion]. Each conversation is rendered with the checkpoint's chat template (its tokenizer
folder's chat_template.jinja, or tokenizer_config.json's chat_template) and tokenized piece by
piece: the text that the template adds for message i is what renders messages[:i+1] minus what
renders messages[:i] (with the generation prompt when message i is the assistant's). Pieces of
assistant messages are the completion: their tokens are flagged as targets (the turn's end
token included, so the model learns to stop); everything else is prompt, never scored.

`prepare_sft` writes a token store (pi_jax.data.store) whose documents are the examples, plus a
`loss_mask/` array (uint8 per token: 1 = completion token) and `"kind": "sft"` in store.json. The
trainer packs it like any store with packing=documents (pi_jax.data.packing): segment ids are
the examples' boundaries, which the store's documents/ array holds.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import shutil
import sys

import numpy as np

from pi_jax.data import store as store_lib

ROLES = ("system", "user", "assistant")
MASK = "loss_mask"
KIND = "sft"


class SFTError(ValueError):
  """SFT input that cannot be trained on as it is: the message names the file and row."""


# --- reading rows ------------------------------------------------------------------------------

def _rows(path: str):
  """(where, row dict) of a JSONL or Parquet file, in order; `where` names file and line/row."""
  if not os.path.isfile(path):
    raise SFTError(f"{path}: no such file (SFT data is one .jsonl, .jsonl.gz or .parquet file)")
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    for i, row in enumerate(pq.read_table(path).to_pylist()):
      yield f"{path}: row {i + 1}", row
    return
  if not (path.endswith(".jsonl") or path.endswith(".jsonl.gz")):
    raise SFTError(f"{path}: SFT data must be a .jsonl, .jsonl.gz or .parquet file")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      where = f"{path}: line {i + 1}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise SFTError(f"{where}: not JSON ({e})") from None
      if not isinstance(row, dict):
        raise SFTError(f"{where}: expected an object with prompt/completion or messages")
      yield where, row


def _messages(where: str, row: dict) -> tuple[str, list[dict]]:
  """(format, messages) of one row; an error naming `where` for anything else."""
  if "messages" in row:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
      raise SFTError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for j, m in enumerate(messages):
      if not isinstance(m, dict) or not isinstance(m.get("content"), str):
        raise SFTError(f"{where}: message {j + 1} must be an object with a string 'content'")
      if m.get("role") not in ROLES:
        raise SFTError(f"{where}: message {j + 1} has role {m.get('role')!r}; the roles are "
                       f"{', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
      raise SFTError(f"{where}: no assistant message: nothing to train on")
    return "messages", [{"role": m["role"], "content": m["content"]} for m in messages]
  if "prompt" in row or "completion" in row:
    for key in ("prompt", "completion"):
      if not isinstance(row.get(key), str):
        raise SFTError(f"{where}: '{key}' must be a string")
    return "prompt/completion", [{"role": "user", "content": row["prompt"]},
                                 {"role": "assistant", "content": row["completion"]}]
  raise SFTError(f"{where}: a row needs 'prompt' and 'completion', or 'messages' (it has "
                 f"{sorted(row)})")


def read_conversations(path: str):
  """(where, messages) of every row of `path`; all rows must have one format."""
  first = None
  for where, row in _rows(path):
    kind, messages = _messages(where, row)
    if first is None:
      first = (kind, where)
    elif kind != first[0]:
      raise SFTError(f"{where}: a {kind} row, but {first[1]} is a {first[0]} row; one file "
                     "holds one format")
    yield where, messages


# --- the chat template -------------------------------------------------------------------------

def load_chat_template(checkpoint: str) -> tuple[str, dict]:
  """(chat template, {bos_token, eos_token} strings it may use) of a checkpoint (or tokenizer
  folder); an error naming the checkpoint when it has no template."""
  folder = os.path.join(checkpoint, "tokenizer")
  folder = folder if os.path.isdir(folder) else checkpoint
  file = os.path.join(folder, "chat_template.jinja")
  config_file = os.path.join(folder, "tokenizer_config.json")
  tok_config = {}
  if os.path.isfile(config_file):
    with open(config_file, encoding="utf-8") as f:
      tok_config = json.load(f)
  special = {}
  for key in ("bos_token", "eos_token"):
    value = tok_config.get(key)
    value = value.get("content") if isinstance(value, dict) else value
    special[key] = value if isinstance(value, str) else ""
  if os.path.isfile(file):
    with open(file, encoding="utf-8") as f:
      return f.read(), special
  template = tok_config.get("chat_template")
  if isinstance(template, list):  # [{"name", "template"}]: the default one
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default")
  if not isinstance(template, str):
    raise SFTError(f"checkpoint {checkpoint} has no chat template (no {file}, no chat_template "
                   "in tokenizer_config.json): SFT renders conversations with it; use the "
                   "instruct model's checkpoint, or add its template file there")
  return template, special


class ChatEncoder:
  """Conversations -> (token ids, completion flags) by a chat template and a tokenizer."""

  def __init__(self, template: str, tokenizer, special: dict | None = None):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise SFTError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    self._template = env.from_string(template)
    self.tokenizer = tokenizer
    self._special = {"bos_token": "", "eos_token": "", **(special or {})}

  def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
    return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                 **self._special)

  def encode(self, where: str, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids [n], uint8 flags [n] (1 = a completion token) of one conversation. The
    template's text is all there is: no BOS is added (templates write their own)."""
    ids, flags = [], []
    done = ""
    for i, m in enumerate(messages):
      assistant = m["role"] == "assistant"
      before = self.render(messages[:i], add_generation_prompt=assistant) if i or assistant else ""
      after = self.render(messages[:i + 1], add_generation_prompt=False)
      if not (before.startswith(done) and after.startswith(before)):
        raise SFTError(f"{where}: the chat template does not render this conversation as "
                       f"growing prefixes (message {i + 1}); its completion tokens cannot be "
                       "told apart")
      for text, flag in ((before[len(done):], 0), (after[len(before):], int(assistant))):
        if text:
          piece = self.tokenizer.encode(text, add_bos=False)
          ids += piece
          flags += [flag] * len(piece)
      done = after
    return np.asarray(ids, np.int32), np.asarray(flags, np.uint8)


def encode_file(path: str, checkpoint: str, tokenizer=None):
  """[(where, ids, flags)] of every example of `path`, rendered with `checkpoint`'s template."""
  from pi_jax.tokenizer import load_tokenizer
  tokenizer = tokenizer or load_tokenizer(checkpoint)
  template, special = load_chat_template(checkpoint)
  encoder = ChatEncoder(template, tokenizer, special)
  return [(where, *encoder.encode(where, messages))
          for where, messages in read_conversations(path)]


# --- the store ---------------------------------------------------------------------------------

def open_mask(store):
  """The loss_mask/ array of an SFT TokenStore, for reading."""
  return store_lib.open_side_array(store.path, MASK)


def prepare_sft(path: str, out: str, checkpoint: str, *, max_examples: int | None = None,
                restart: bool = False, progress_bar: bool = True, log=print) -> dict:
  """Renders and tokenizes the SFT file `path` with `checkpoint`'s chat template and tokenizer
  into the token store `out` (write_store says how it is written)."""
  from pi_jax.tokenizer import load_tokenizer
  tok = load_tokenizer(checkpoint)
  template, special = load_chat_template(checkpoint)
  encoder = ChatEncoder(template, tok, special)

  def examples():
    for where, messages in read_conversations(path):
      ids, flags = encoder.encode(where, messages)
      yield ids, flags, json.dumps(messages, sort_keys=True)

  return write_store(out, examples(), tok, checkpoint, source={"spec": path, "format": "sft"},
                     max_examples=max_examples, restart=restart, progress_bar=progress_bar,
                     log=log)


def check_out(out: str, restart: bool) -> None:
  """Refuses an OUT that already holds a token store unless `restart` (before any work)."""
  if not restart and store_lib.read_json(out, store_lib.META) is not None:
    raise store_lib.StoreError(f"{out} already holds a token store; pass --restart to replace "
                               "it, or choose another OUT")


def write_store(out: str, examples, tok, checkpoint: str, *, source: dict,
                max_examples: int | None = None, restart: bool = False,
                progress_bar: bool = True, log=print, meta_extra: dict | None = None) -> dict:
  """Writes the SFT token store `out` from `examples`: (int32 ids, uint8 completion flags,
  the text it came from) per example, in order; `examples` is not read before OUT is checked.
  Local stores are written under a temporary name, then renamed (restart replaces a store
  already there once the new one is complete), so a failure leaves nothing at `out`."""
  from tqdm import tqdm

  from pi_jax.data.prepare import token_dtype
  check_out(out, restart)
  remote = store_lib.is_remote(out)
  work = out if remote else out.rstrip("/") + ".partial"
  if not remote and os.path.exists(work):
    shutil.rmtree(work)
  ids_all, flags_all, lengths = [], [], []
  source_sha = hashlib.sha256()
  bar = tqdm(unit=" examples", disable=not progress_bar, file=sys.stderr, dynamic_ncols=True)
  for ids, flags, text in examples:
    if max_examples is not None and len(lengths) >= max_examples:
      break
    source_sha.update(text.encode())
    ids_all.append(ids), flags_all.append(flags), lengths.append(len(ids))
    bar.update(1)
  bar.close()
  if not lengths:
    raise SFTError(f"{source['spec']}: no examples")
  ids_T, flags_T = np.concatenate(ids_all), np.concatenate(flags_all)
  dtype = token_dtype(tok.vocab_size)
  n = len(ids_T)
  shard = 1 << 24
  tokens, documents = store_lib.create_arrays(work, dtype, shard, min(1 << 16, shard))
  mask = store_lib.create_side_array(work, MASK, "uint8", n, shard, min(1 << 16, shard))
  tokens = tokens.resize(exclusive_max=[n]).result()
  documents = documents.resize(exclusive_max=[len(lengths) + 1]).result()
  for w in (tokens[0:n].write(ids_T.astype(dtype)), mask[0:n].write(flags_T),
            documents[1:].write(np.cumsum(lengths).astype(np.uint64))):
    w.result()
  token_sha = hashlib.sha256(ids_T.tobytes() + flags_T.tobytes()).hexdigest()
  meta = {"format": store_lib.FORMAT, "version": store_lib.VERSION, "kind": KIND,
          "fingerprint": hashlib.sha256(f"{token_sha}:{n}:{len(lengths)}".encode()
                                        ).hexdigest()[:16],
          "tokens": n, "documents": len(lengths), "dtype": dtype, "max_id": int(ids_T.max()),
          "completion_tokens": int(flags_T.sum()),
          "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint(), "source": checkpoint,
                        "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                        "add_bos": tok.add_bos},
          "source": {**source, "sha256": source_sha.hexdigest()},
          "token_sha256": token_sha,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          **(meta_extra or {})}
  store_lib.write_json(work, store_lib.META, meta)
  if not remote:
    if os.path.isdir(out) and (restart or not os.listdir(out)):
      shutil.rmtree(out)
    os.replace(work, out)
  summary = {"store": out, "examples": len(lengths), "tokens": n,
             "completion_tokens": meta["completion_tokens"], "fingerprint": meta["fingerprint"]}
  log(f"token store {out}: {len(lengths):,} SFT examples, {n:,} tokens "
      f"({meta['completion_tokens']:,} completion tokens), fingerprint {meta['fingerprint']}")
  return summary
