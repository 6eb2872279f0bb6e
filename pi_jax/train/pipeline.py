"""Training data: documents tokenized, packed into fixed windows, served by a step-indexed sampler.

Packing: every document becomes `encode(text) + [EOS]` (the tokenizer adds BOS if the model's
tokenizer does), the documents are concatenated in the data spec's order, and the stream is cut
into rows of seq_len + 1 tokens that overlap by one (row i starts at i·seq_len), so every token
is a target exactly once. The last `eval_sequences` rows are held out for evaluation.

Sampling is a pure function of (seed, step): global position p = step·global_batch + j maps to
epoch p // n and row perm_epoch[p % n], perm_epoch a seeded permutation. The sampler's whole
state is therefore the step, which every checkpoint stores, so a resumed run sees exactly the
batches an uninterrupted run would have seen. Each process materializes only the rows of the
global batch that its devices hold.

Where the stream lives: in memory (`PackedSequences`, a data spec of documents tokenized at
start-up) or in a token store (`StoreSequences`, made once by `python -m pi_jax.data prepare`):
the same rows either way, but a store is read row by row, so start-up time and host memory do
not grow with the corpus and each process reads only its own rows.

packing=documents replaces the stream by documents packed whole into rows with segment ids and
target flags (pi_jax.data.packing.DocumentRows, rows int32 [3, seq_len + 1]); an SFT store
(`prepare --format sft`) is always read that way. Sampling is the same.
"""

from __future__ import annotations

import hashlib
import sys

import jax
import numpy as np

from pi_jax import data as data_lib
from pi_jax.data import packing as packing_lib
from pi_jax.tokenizer import ByteTokenizer


def tokenize_documents(spec: str, tokenizer, data_dir: str | None = None,
                       max_docs: int | None = None) -> list[np.ndarray]:
  """Each document of `spec` tokenized with the tokenizer's EOS after it: [int32 [n_d]] (what
  packing=documents packs; empty documents are skipped as for the stream)."""
  if tokenizer.eos_id is None:
    raise ValueError("the tokenizer has no EOS token; packing needs one after each document")
  eos = [tokenizer.eos_id]
  docs = data_lib.iter_documents(spec, data_dir=data_dir, max_docs=max_docs,
                                 on_empty=lambda doc_id: None)
  return [np.asarray(tokenizer.encode(text) + eos, np.int32) for _, text in docs]


def tokenize_and_join(spec: str, tokenizer, data_dir: str | None = None,
                      max_docs: int | None = None) -> np.ndarray:
  """All documents of `spec`, tokenized and joined into one stream with the tokenizer's EOS
  after each: int32 [T] (the packing input; evals.perplexity.tokenize_documents keeps documents
  apart instead)."""
  if tokenizer.eos_id is None:
    raise ValueError("the tokenizer has no EOS token; packing needs one between documents")
  eos = np.asarray([tokenizer.eos_id], np.int32)
  pieces = []
  # Empty documents are skipped, as `prepare` skips them: a store and its source pack alike.
  docs = data_lib.iter_documents(spec, data_dir=data_dir, max_docs=max_docs,
                                 on_empty=lambda doc_id: None)
  for _, text in docs:
    if isinstance(tokenizer, ByteTokenizer):  # fast path: bytes are the ids
      ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
      if tokenizer.add_bos:
        ids = np.concatenate([np.asarray([tokenizer.bos_id], np.int32), ids])
    else:
      ids = np.asarray(tokenizer.encode(text), np.int32)
    pieces.append(ids)
    pieces.append(eos)
  return np.concatenate(pieces)


def _split_rows(num_tokens: int, seq_len: int, eval_sequences: int) -> tuple[int, int]:
  """(train rows, held-out rows) of a stream of num_tokens tokens."""
  total = (num_tokens - 1) // seq_len
  if total - eval_sequences < 1:
    raise ValueError(f"the data has {num_tokens} tokens: {total} sequences of "
                     f"{seq_len}+1, not enough for {eval_sequences} held-out sequences and "
                     "training")
  return total - eval_sequences, eval_sequences


class PackedSequences:
  """Rows of seq_len + 1 tokens over a token stream, split into train and held-out rows."""

  def __init__(self, tokens_T: np.ndarray, seq_len: int, eval_sequences: int = 0):
    self.tokens_T = np.asarray(tokens_T, np.int32)
    self.seq_len = seq_len
    self.num_train, self.num_eval = _split_rows(len(self.tokens_T), seq_len, eval_sequences)

  def rows(self, indices) -> np.ndarray:
    """Rows [len(indices), seq_len + 1] for row indices (train rows first, then held-out)."""
    starts = np.asarray(indices, np.int64) * self.seq_len
    return self.tokens_T[starts[:, None] + np.arange(self.seq_len + 1)]

  def fingerprint(self) -> str:
    """Identifies the token stream, so a resume with different data is caught."""
    h = hashlib.sha256(self.tokens_T.tobytes()).hexdigest()[:16]
    return f"{h}:{len(self.tokens_T)}:{self.seq_len}:{self.num_train}"


class StoreSequences:
  """PackedSequences' rows over a token store (pi_jax.data.store), read when asked.

  Holds no tokens: `rows` reads each row's seq_len + 1 tokens from the store (concurrently), so
  memory and start-up do not depend on the store's size. max_docs keeps the stream of the first
  max_docs documents, as it does for a spec of documents.
  """

  def __init__(self, store, seq_len: int, eval_sequences: int = 0, max_docs: int | None = None):
    self.store, self.seq_len = store, seq_len
    self.num_tokens = store.num_tokens
    if max_docs is not None and max_docs < store.num_documents:
      self.num_tokens = int(store.document_offsets(max_docs, max_docs + 1)[0])
    self.num_train, self.num_eval = _split_rows(self.num_tokens, seq_len, eval_sequences)

  def rows(self, indices) -> np.ndarray:
    """Rows [len(indices), seq_len + 1] for row indices (train rows first, then held-out)."""
    starts = np.asarray(indices, np.int64) * self.seq_len
    return self.store.slices(starts, self.seq_len + 1)

  def fingerprint(self) -> str:
    return f"store:{self.store.fingerprint}:{self.num_tokens}:{self.seq_len}:{self.num_train}"


class StepSampler:
  """Global batch at `step` = a deterministic function of (seed, step); no hidden state."""

  def __init__(self, data: PackedSequences, global_batch: int, seed: int):
    self.data, self.global_batch, self.seed = data, global_batch, seed
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 4:
        self._perms.clear()
      rng = np.random.default_rng([self.seed, epoch])
      self._perms[epoch] = rng.permutation(self.data.num_train)
    return self._perms[epoch]

  def row_indices(self, step: int, rows: slice = slice(None)) -> np.ndarray:
    """Row indices of the global batch at `step` (optionally only `rows` of it)."""
    positions = step * self.global_batch + np.arange(self.global_batch)[rows]
    n = self.data.num_train
    epochs, offsets = positions // n, positions % n
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._perm(int(epoch))[offsets[sel]]
    return out

  def batch(self, step: int, rows: slice = slice(None)) -> np.ndarray:
    return self.data.rows(self.row_indices(step, rows))


class TrainData:
  """What the trainer reads: training batches by step, held-out batches by index, a fingerprint.

  This one packs a token stream (`PackedSequences`) and samples it with `StepSampler`. Any
  object with the same four members can be handed to `Trainer(config, data=...)` (a token store,
  a mixture with synthetic rows): `train_batch` must stay a pure function of (step, rows).
  """

  def __init__(self, packed: PackedSequences, global_batch: int, seed: int):
    self.packed = packed
    self.sampler = StepSampler(packed, global_batch, seed)

  @property
  def num_eval(self) -> int:
    return self.packed.num_eval

  def train_batch(self, step: int, rows: slice) -> np.ndarray:
    """Rows `rows` of the global batch at `step`: int32 [rows, seq_len + 1]."""
    return self.sampler.batch(step, rows)

  def eval_batch(self, index: int, batch: int, rows: slice) -> np.ndarray:
    """Rows `rows` of held-out batch `index` of `batch` sequences."""
    return self.packed.rows(eval_row_indices(self.packed, index, batch)[rows])

  def fingerprint(self) -> str:
    return self.packed.fingerprint()

  def store_meta(self) -> dict | None:
    """What a checkpoint records about the token store it was trained on (None: no store)."""
    store = getattr(self.packed, "store", None)
    if store is None:
      return None
    return {"path": store.path, "fingerprint": store.fingerprint,
            "tokenizer": store.tokenizer.get("fingerprint"),
            "source": store.meta.get("source", {}).get("sha256"),
            "tokens": self.packed.num_tokens}


def load_train_data(config, tokenizer, vocab_size: int) -> TrainData:
  """The run config's data spec, checked against the tokenizer and vocabulary, packed and
  sampled: a token store is opened for reading by row, documents are tokenized now."""
  if config.packing == "documents":
    return _load_documents(config, tokenizer, vocab_size)
  if data_lib.is_token_store(config.data):
    store = data_lib.TokenStore(config.data)
    if store.meta.get("kind") == "sft":
      raise ValueError(f"token store {config.data} holds SFT examples (prompt/completion): "
                       "train on it with --set packing=documents")
    if config.init_checkpoint:
      store.check_tokenizer(tokenizer, f"init_checkpoint {config.init_checkpoint}",
                            config.init_checkpoint)
    else:
      store.check_tokenizer(tokenizer, "the byte tokenizer of a random init", "bytes")
    if store.meta["max_id"] >= vocab_size:
      raise ValueError(f"token store {config.data}: token id {store.meta['max_id']} >= "
                       f"vocab_size {vocab_size}")
    packed = StoreSequences(store, config.seq_len, config.eval_sequences, config.max_docs)
    return TrainData(packed, config.global_batch, config.seed)
  tokens = tokenize_and_join(config.data, tokenizer, config.data_dir, config.max_docs)
  if tokens.max() >= vocab_size:
    raise ValueError(f"data {config.data!r}: token id {tokens.max()} >= vocab_size {vocab_size}")
  packed = PackedSequences(tokens, config.seq_len, config.eval_sequences)
  return TrainData(packed, config.global_batch, config.seed)


def _load_documents(config, tokenizer, vocab_size: int) -> TrainData:
  """packing=documents: the data spec's documents (or a store's) packed whole into rows."""
  if data_lib.is_token_store(config.data):
    store = data_lib.TokenStore(config.data)
    what = f"init_checkpoint {config.init_checkpoint}" if config.init_checkpoint else (
        "the byte tokenizer of a random init")
    store.check_tokenizer(tokenizer, what, config.init_checkpoint or "bytes")
    if store.meta["max_id"] >= vocab_size:
      raise ValueError(f"token store {config.data}: token id {store.meta['max_id']} >= "
                       f"vocab_size {vocab_size}")
    source = packing_lib.StoreDocuments(store, config.max_docs)
  else:
    docs = tokenize_documents(config.data, tokenizer, config.data_dir, config.max_docs)
    top = max((int(d.max()) for d in docs), default=0)
    if top >= vocab_size:
      raise ValueError(f"data {config.data!r}: token id {top} >= vocab_size {vocab_size}")
    source = packing_lib.InMemoryDocuments(docs)
  rows = packing_lib.DocumentRows(source, config.seq_len, config.eval_sequences)
  if rows.plan.skipped or rows.plan.truncated:
    print(f"pi_jax.train: {config.data}: {rows.plan.skipped} SFT example(s) skipped (the prompt "
          f"alone fills a row of {config.seq_len}+1 tokens), {rows.plan.truncated} cut to the "
          "row (their completions' tails are not trained)", file=sys.stderr, flush=True)
  return TrainData(rows, config.global_batch, config.seed)


def resume_mismatch(where: str, meta: dict, data) -> str:
  """Why checkpoint metadata `meta` does not match `data` (a TrainData): the error to raise."""
  then = meta.get("data_store")
  now = data.store_meta() if hasattr(data, "store_meta") else None
  if then is None and now is None:
    return (f"{where} was trained on different data or seq_len ({meta.get('data_fingerprint')} "
            f"vs {data.fingerprint()}); use a new workdir")
  if now is None:
    return (f"{where} was trained on token store {then['path']}, this run reads a spec of "
            "documents; resume on the store it was trained on, or use a new workdir")
  if then is None:
    return (f"{where} was trained on a spec of documents ({meta.get('data')!r}), this run "
            f"reads token store {now['path']}; resume on those documents, or use a new workdir")
  reasons = []
  if then.get("tokenizer") != now.get("tokenizer"):
    reasons.append(f"it was tokenized with tokenizer {then.get('tokenizer')}, this store with "
                   f"{now.get('tokenizer')}")
  if then.get("source") != now.get("source"):
    reasons.append("it was made from other documents")
  if then.get("fingerprint") == now.get("fingerprint"):
    reasons.append(f"same store, but seq_len, max_docs or eval_sequences differ "
                   f"({meta.get('data_fingerprint')} vs {data.fingerprint()})")
  return (f"{where} was trained on token store {then.get('path')} (fingerprint "
          f"{then.get('fingerprint')}), this run reads {now.get('path')} (fingerprint "
          f"{now.get('fingerprint')}): {'; '.join(reasons) or 'the stores differ'}; resume on "
          "the store it was trained on, or use a new workdir")


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> slice:
  """The contiguous rows of a batch-sharded global array that this process's devices hold."""
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows = index[0]
    starts.append(rows.start or 0)
    stops.append(global_shape[0] if rows.stop is None else rows.stop)
  lo, hi = min(starts), max(stops)
  covered = np.zeros(hi - lo, bool)
  for a, b in zip(starts, stops):
    covered[a - lo:b - lo] = True
  if not covered.all():
    raise ValueError(f"this process's devices hold non-contiguous batch rows {sorted(zip(starts, stops))}; "
                     "order the mesh so each process owns one block of the batch axis")
  return slice(lo, hi)


def global_batch_array(rows_fn, global_shape: tuple[int, ...], sharding) -> jax.Array:
  """A global int32 batch built from this process's rows only: rows_fn(slice) -> [rows, *row]
  (row: [L+1], or [3, L+1] with packing=documents)."""
  local = rows_fn(process_rows(sharding, global_shape))
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def eval_row_indices(data: PackedSequences, index: int, batch: int) -> np.ndarray:
  """Row indices of held-out batch `index` (held-out rows in order; a ragged tail is dropped)."""
  return data.num_train + index * batch + np.arange(batch)
