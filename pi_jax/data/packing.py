"""Documents packed into training rows with a segment id and a loss mask per token.

`packing=documents` (and SFT data) trains on rows that hold whole documents side by side, each
attending only to itself (segment ids, pi_jax.model.forward). A row is `seq_len + 1` slots, as
in the concat packing: tokens [:-1] are the inputs, [1:] the targets. Rules:
- Documents never cross a row: they are laid in order into the current row while they fit,
  else the row is closed (its tail is padding) and a new one starts ("next fit": streamable, a
  pure function of the document lengths, so every process computes the same plan).
- A text document longer than a row is cut into pieces of seq_len + 1 tokens that overlap by
  one token (as the concat rows do), each filling a row of its own and restarting its
  positions; so every token but a document's first is a target exactly once. The last piece
  is packed like a short document.
- An SFT example longer than a row is cut to the row (its completion loses its tail, counted);
  one whose prompt alone fills the row (no completion token left as a target) is skipped and
  counted. Never is a prompt token scored.

A row is int32 [3, seq_len + 1]: tokens, segment ids (1, 2, ... per piece; 0 = padding) and a
per-token flag "may be a target" (1 for every token of a text document, for the completion tokens
of an SFT example, 0 for padding). `target_mask` turns it into the loss mask of the targets.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

TOKENS, SEGMENTS, MASK = 0, 1, 2


def target_mask(rows_B3L1: np.ndarray) -> np.ndarray:
  """bool [B, L]: which targets rows[:, 0, 1:] are scored: flagged, and in the same segment as
  the token that predicts them (a document's first token is never predicted from the last)."""
  seg = rows_B3L1[:, SEGMENTS]
  return (rows_B3L1[:, MASK, 1:] > 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where every row's pieces come from: piece p is document doc[p], tokens [start, start +
  length), in row row[p] at slot slot[p]. skipped / truncated: SFT examples (module docstring)."""
  row: np.ndarray
  slot: np.ndarray
  doc: np.ndarray
  start: np.ndarray
  length: np.ndarray
  num_rows: int
  skipped: int = 0
  truncated: int = 0


def plan_rows(lengths, seq_len: int, prompt_length=None) -> Plan:
  """The packing plan of documents of `lengths` tokens into rows of seq_len + 1 slots.

  prompt_length (SFT): d -> tokens before example d's first completion token (asked only of
  examples longer than a row, which are then truncated, or skipped when the prompt leaves no
  target, never cut in pieces).
  """
  width = seq_len + 1
  rows, slots, docs, starts, lens = [], [], [], [], []
  row, used, skipped, truncated = 0, 0, 0, 0

  def put(doc, start, n):
    nonlocal row, used
    if used + n > width:
      row, used = row + 1, 0
    rows.append(row), slots.append(used), docs.append(doc), starts.append(start), lens.append(n)
    used += n

  for d, n in enumerate(np.asarray(lengths, np.int64).tolist()):
    if n < 2:
      continue  # no target in a document of one token
    if prompt_length is not None:
      if n > width:
        if prompt_length(d) >= seq_len:  # not one completion token is a target in the row
          skipped += 1
          continue
        truncated += 1
        n = width
      put(d, 0, n)
      continue
    start = 0
    while n - start > width:  # whole-row pieces overlapping by one token
      put(d, start, width)
      start += seq_len
    put(d, start, n - start)
  as_array = lambda x: np.asarray(x, np.int64)
  return Plan(as_array(rows), as_array(slots), as_array(docs), as_array(starts), as_array(lens),
              row + 1 if rows else 0, skipped, truncated)


class DocumentRows:
  """Packed rows over a document source, split into train and held-out rows (the last
  eval_sequences). The source has `lengths` (tokens per document), `prompt_length` (d -> int,
  SFT; None for text), `read(docs, starts, lengths) -> [(tokens, flags)]` and `fingerprint()`."""

  def __init__(self, source, seq_len: int, eval_sequences: int = 0):
    self.source, self.seq_len = source, seq_len
    self.store = getattr(source, "store", None)  # what a checkpoint records (TrainData)
    self.num_tokens = int(np.sum(source.lengths))
    self.plan = plan_rows(source.lengths, seq_len, source.prompt_length)
    total = self.plan.num_rows
    if total - eval_sequences < 1:
      raise ValueError(f"the data packs into {total} rows of {seq_len}+1 tokens, not enough for "
                       f"{eval_sequences} held-out rows and training")
    self.num_train, self.num_eval = total - eval_sequences, eval_sequences
    self._first = np.searchsorted(self.plan.row, np.arange(total + 1))  # pieces of each row

  def rows(self, indices) -> np.ndarray:
    """int32 [len(indices), 3, seq_len + 1] (module docstring)."""
    indices = np.asarray(indices, np.int64)
    out = np.zeros((len(indices), 3, self.seq_len + 1), np.int32)
    where, pieces = [], []
    for i, r in enumerate(indices.tolist()):
      for p in range(self._first[r], self._first[r + 1]):
        where.append((i, p - self._first[r] + 1, self.plan.slot[p], self.plan.length[p]))
        pieces.append(p)
    pieces = np.asarray(pieces, np.int64)
    read = self.source.read(self.plan.doc[pieces], self.plan.start[pieces],
                            self.plan.length[pieces])
    for (i, segment, slot, n), (tokens, flags) in zip(where, read):
      out[i, TOKENS, slot:slot + n] = tokens
      out[i, SEGMENTS, slot:slot + n] = segment
      out[i, MASK, slot:slot + n] = flags
    return out

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for a in (self.plan.doc, self.plan.start, self.plan.length, self.plan.row):
      h.update(a.tobytes())
    return (f"documents:{self.source.fingerprint()}:{h.hexdigest()[:16]}:{self.seq_len}:"
            f"{self.num_train}")


class StoreDocuments:
  """A token store's documents as a document source; an SFT store's loss_mask/ gives the flags.
  Only the document offsets are read at start-up; tokens are read per row."""

  def __init__(self, store, max_docs: int | None = None):
    self.store = store
    n = store.num_documents if max_docs is None else min(max_docs, store.num_documents)
    self.offsets = store.document_offsets(0, n + 1)
    self.lengths = np.diff(self.offsets)
    self.mask = None
    self.prompt_length = None
    if store.meta.get("kind") == "sft":
      from pi_jax.data import sft
      self.mask = sft.open_mask(store)
      self.prompt_length = lambda d: first_flagged(self._flags([self.offsets[d]],
                                                               [self.lengths[d]])[0])

  def _flags(self, starts, lengths):
    futures = [self.mask[int(s):int(s) + int(n)].read() for s, n in zip(starts, lengths)]
    return [f.result().astype(np.int32) for f in futures]

  def read(self, docs, starts, lengths):
    starts = self.offsets[docs] + starts
    tokens = self.store.ranges(starts, lengths)
    if self.mask is None:
      return [(t, np.ones(len(t), np.int32)) for t in tokens]
    return list(zip(tokens, self._flags(starts, lengths)))

  def fingerprint(self) -> str:
    return f"store:{self.store.fingerprint}:{len(self.lengths)}"


def first_flagged(flags) -> int:
  """Index of the first flagged token (the prompt's length); len(flags) when none is."""
  flags = np.asarray(flags)
  return int(np.argmax(flags > 0)) if flags.any() else len(flags)


class InMemoryDocuments:
  """A document source held in memory: token arrays, optional per-token target flags."""

  def __init__(self, docs: list[np.ndarray], flags: list[np.ndarray] | None = None):
    self.docs = [np.asarray(d, np.int32) for d in docs]
    self.flags = None if flags is None else [np.asarray(f, np.int32) for f in flags]
    self.lengths = np.asarray([len(d) for d in self.docs], np.int64)
    self.prompt_length = None
    if self.flags is not None:
      self.prompt_length = lambda d: first_flagged(self.flags[d])

  def read(self, docs, starts, lengths):
    out = []
    for d, s, n in zip(docs.tolist(), starts.tolist(), lengths.tolist()):
      flags = np.ones(n, np.int32) if self.flags is None else self.flags[d][s:s + n]
      out.append((self.docs[d][s:s + n], flags))
    return out

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for i, d in enumerate(self.docs):
      h.update(d.tobytes())
      if self.flags is not None:
        h.update(self.flags[i].tobytes())
    return h.hexdigest()[:16]
