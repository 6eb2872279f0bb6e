"""`prepare`: tokenize a data spec once, in parallel, into a token store (pi_jax.data.store).

The main process reads documents in the spec's order and hands batches of them to a pool of
worker processes, each running the tokenizer's batch encoder; results come back in order, so the
stream is the one pipeline.tokenize_and_join would build (every document's ids, then EOS;
documents with no text are skipped and counted). Every `shard_tokens` tokens the buffered stream
and document offsets are written and progress.json records what is committed, with running
hashes of the source text and of the tokens. An interrupted prepare leaves progress.json but no
store.json, so nothing reads it as a store; rerunning the same command re-reads the committed
documents (checking that they hash the same), skips them, and goes on. store.json is written
last.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import multiprocessing
import os
import sys
import time

import numpy as np

from pi_jax.data import sources
from pi_jax.data import store as store_lib

DEFAULT_SHARD_TOKENS = 1 << 24  # 16M tokens: 32 MB (uint16) or 64 MB (uint32) per file
DEFAULT_CHUNK_TOKENS = 1 << 16  # a 32K-token row touches one or two of these
BATCH_DOCS = 256
BATCH_CHARS = 1 << 22


def load_prepare_tokenizer(spec: str):
  """`bytes` (the byte tokenizer of randomly initialized models) or a checkpoint/tokenizer path."""
  from pi_jax.tokenizer import ByteTokenizer, load_tokenizer
  if spec == "bytes":
    return ByteTokenizer()
  return load_tokenizer(spec)


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


# --- the workers ---------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_spec: str, dtype: str, threads: bool) -> None:
  if not threads:  # one process per core: the Rust encoder's own threads would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
  _WORKER["tok"] = load_prepare_tokenizer(tokenizer_spec)
  _WORKER["dtype"] = np.dtype(dtype)


def encode_documents(tok, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
  """(ids of every text followed by EOS, concatenated, as `dtype`; per-document lengths)."""
  from pi_jax.tokenizer import ByteTokenizer
  eos = tok.eos_id
  if isinstance(tok, ByteTokenizer):  # bytes are the ids
    pieces = []
    for text in texts:
      if tok.add_bos:
        pieces.append(np.asarray([tok.bos_id], np.int64))
      pieces.append(np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64))
      pieces.append(np.asarray([eos], np.int64))
    flat = np.concatenate(pieces)
    lengths = np.asarray([len(t.encode("utf-8")) + 1 + int(tok.add_bos) for t in texts], np.int64)
  else:
    ids = tok.encode_batch(texts)
    lengths = np.asarray([len(x) + 1 for x in ids], np.int64)
    flat = np.empty(int(lengths.sum()), np.int64)
    pos = 0
    for x in ids:
      flat[pos:pos + len(x)] = x
      flat[pos + len(x)] = eos
      pos += len(x) + 1
  info = np.iinfo(dtype)
  if len(flat) and (flat.max() > info.max or flat.min() < 0):
    raise ValueError(f"token id {int(flat.max())} does not fit the store's {np.dtype(dtype)}")
  return flat.astype(dtype), lengths


def _encode_in_worker(texts: list[str]):
  return encode_documents(_WORKER["tok"], texts, _WORKER["dtype"])


# --- batches of documents ------------------------------------------------------------------------

class _Empties:
  """The reader's count of skipped empty documents, with the first few ids."""

  def __init__(self):
    self.count, self.examples = 0, []

  def __call__(self, doc_id: str) -> None:
    self.count += 1
    if len(self.examples) < 5:
      self.examples.append(doc_id)

  def snapshot(self) -> tuple[int, list]:
    return self.count, list(self.examples)


def _batches(docs, batch_docs: int, batch_chars: int, empties: _Empties):
  """(list of (doc_id, text), empties.snapshot() after it), cut by count and by size;
  deterministic for a given source."""
  batch, chars = [], 0
  for doc in docs:
    batch.append(doc)
    chars += len(doc[1])
    if len(batch) >= batch_docs or chars >= batch_chars:
      yield batch, empties.snapshot()
      batch, chars = [], 0
  if batch:
    yield batch, empties.snapshot()


def _text_digest(batch) -> bytes:
  h = hashlib.sha256()
  for _, text in batch:
    data = text.encode("utf-8", errors="surrogatepass")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.digest()


def _chain(previous: str, digest: bytes) -> str:
  return hashlib.sha256(bytes.fromhex(previous) + digest).hexdigest()


# --- prepare -------------------------------------------------------------------------------------

class _Writer:
  """Buffers the stream; commit() writes it and then progress.json, in that order."""

  def __init__(self, out: str, progress: dict, tokens, documents):
    self.out, self.progress = out, progress
    self.tokens_array, self.documents_array = tokens, documents
    self.pending_tokens: list[np.ndarray] = []
    self.pending_lengths: list[np.ndarray] = []
    self.pending_docs = self.pending_n = 0
    self.pending_source = hashlib.sha256()
    self.empties: tuple[int, list] = (0, [])

  def add(self, flat: np.ndarray, lengths: np.ndarray, source_digest: bytes,
          empties: tuple[int, list]) -> None:
    self.empties = empties
    self.pending_tokens.append(flat)
    self.pending_lengths.append(lengths)
    self.pending_n += len(flat)
    self.pending_docs += len(lengths)
    self.pending_source.update(source_digest)

  def commit(self) -> None:
    if not self.pending_docs:
      return
    p = self.progress
    flat = np.concatenate(self.pending_tokens)
    lengths = np.concatenate(self.pending_lengths)
    t0, d0 = p["tokens"], p["documents"]
    t1, d1 = t0 + len(flat), d0 + len(lengths)
    self.tokens_array = self.tokens_array.resize(exclusive_max=[t1]).result()
    self.documents_array = self.documents_array.resize(exclusive_max=[d1 + 1]).result()
    writes = [self.tokens_array[t0:t1].write(flat),
              self.documents_array[d0 + 1:d1 + 1].write(
                  (t0 + np.cumsum(lengths)).astype(np.uint64))]
    for w in writes:
      w.result()
    p["source_sha"] = _chain(p["source_sha"], self.pending_source.digest())
    p["token_sha"] = _chain(p["token_sha"], hashlib.sha256(flat.tobytes()).digest())
    p["max_id"] = max(p["max_id"], int(flat.max()))
    p["tokens"], p["documents"] = t1, d1
    p["empty"], p["empty_examples"] = self.empties
    p["commits"].append(d1)
    store_lib.write_json(self.out, store_lib.PROGRESS, p)
    self.pending_tokens, self.pending_lengths = [], []
    self.pending_docs = self.pending_n = 0
    self.pending_source = hashlib.sha256()


def _settings(spec, data_dir, max_docs, text_key, tok, tokenizer_spec, shard_tokens,
              chunk_tokens, batch_docs, batch_chars) -> dict:
  return {"spec": spec, "data_dir": data_dir,
          "max_docs": max_docs, "text_key": text_key, "tokenizer": tok.fingerprint(),
          "tokenizer_source": tokenizer_spec, "dtype": token_dtype(tok.vocab_size),
          "shard_tokens": shard_tokens, "chunk_tokens": chunk_tokens,
          "batch_docs": batch_docs, "batch_chars": batch_chars}


def _same(a: dict | None, b: dict) -> bool:
  """Same settings; the tokenizer counts by fingerprint, not by the path it was loaded from."""
  strip = lambda d: {k: v for k, v in (d or {}).items() if k != "tokenizer_source"}
  return strip(a) == strip(b)


def _differences(a: dict, b: dict) -> str:
  keys = sorted(k for k in set(a) | set(b) if k != "tokenizer_source" and a.get(k) != b.get(k))
  return ", ".join(f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys)


def _skip_committed(batches, progress: dict, out: str) -> None:
  """Consumes the committed documents of a resumed prepare, checking they hash as they did."""
  boundaries = progress["commits"]
  chain, done, i = "0" * 64, 0, 0
  current = hashlib.sha256()
  if boundaries:
    for batch, _ in batches:
      current.update(_text_digest(batch))
      done += len(batch)
      if done >= boundaries[i]:
        if done != boundaries[i]:
          break
        chain, current, i = _chain(chain, current.digest()), hashlib.sha256(), i + 1
        if i == len(boundaries):
          break
  if i != len(boundaries) or chain != progress["source_sha"]:
    raise store_lib.StoreError(
        f"{out}: the source is not what the interrupted prepare read (its first "
        f"{progress['documents']} documents differ); rerun with --restart to start over")


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def check_out(out: str, spec: str, inputs: list[str]) -> None:
  """Refuses an OUT that `prepare` would write among files it did not create: OUT holding (or
  inside) the documents, or a folder of other files (the user's own `tokens/` or `documents/`
  would be deleted by the store's arrays). Only a store, a store being prepared, or an empty or
  new folder is written."""
  from pi_jax import files
  resolved = sources.resolve_spec(spec)
  folders = [resolved] if os.path.isdir(resolved) else []
  try:
    files.check_separate(out, folders + inputs, what="OUT")
  except ValueError as e:
    raise ValueError(f"prepare: {e}") from None
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"prepare: OUT {out} is a file, not a folder: choose a new folder")
  if os.path.isdir(out) and not store_lib.looks_like_store(out):
    own = sorted(os.listdir(out))
    if own:
      raise ValueError(f"prepare: OUT {out} already holds files that are not a token store "
                       f"({', '.join(own[:3])}{', ...' if len(own) > 3 else ''}); prepare writes "
                       "(and may replace) tokens/ and documents/ there: choose a new or empty "
                       "folder")
  files.check_writable(os.path.join(out, store_lib.META), what="OUT")


def _disk_bytes(path: str) -> int | None:
  if store_lib.is_remote(path):
    return None
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def prepare(spec: str, out: str, tokenizer: str, *, data_dir: str | None = None,
            max_docs: int | None = None, text_key: str = "text", workers: int | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
            batch_docs: int = BATCH_DOCS, batch_chars: int = BATCH_CHARS, restart: bool = False,
            progress_bar: bool = True, log=print) -> dict:
  """Tokenizes `spec` with `tokenizer` (checkpoint, tokenizer folder, or `bytes`) into store
  `out`; resumes an interrupted prepare of the same settings. Returns a summary dict."""
  tok = load_prepare_tokenizer(tokenizer)
  if tok.eos_id is None:
    raise ValueError(f"tokenizer {tokenizer}: has no EOS token; the stream needs one between "
                     "documents")
  if chunk_tokens > shard_tokens or shard_tokens % chunk_tokens:
    raise ValueError(f"chunk_tokens {chunk_tokens} must divide shard_tokens {shard_tokens}")
  if max_docs is not None and max_docs < 1:
    raise ValueError(f"--max-docs {max_docs}: a store needs at least one document; leave it "
                     "out to take them all")
  workers = workers or _cpu_count()
  settings = _settings(spec, data_dir, max_docs, text_key, tok, tokenizer, shard_tokens,
                       chunk_tokens, batch_docs, batch_chars)
  inputs = sources.spec_files(spec)  # a spec that names nothing fails here, before OUT is touched
  if not store_lib.is_remote(out):
    check_out(out, spec, inputs)
    os.makedirs(out, exist_ok=True)

  meta = store_lib.read_json(out, store_lib.META)
  if meta is not None and not restart:
    if _same(meta.get("settings"), settings):
      log(f"{out}: already a complete token store of this source and tokenizer "
          f"({store_lib.describe(meta)})")
      return {**_summary_of(meta), "already_complete": True}
    raise store_lib.StoreError(
        f"{out} already holds a token store made with other settings "
        f"({_differences(meta.get('settings', {}), settings)}); pass --restart to replace it, or "
        "choose another OUT")
  progress = None if restart else store_lib.read_json(out, store_lib.PROGRESS)
  if progress is not None and not _same(progress.get("settings"), settings):
    raise store_lib.StoreError(
        f"{out} holds an interrupted prepare with other settings "
        f"({_differences(progress.get('settings', {}), settings)}); pass --restart to start over")
  resumed_from = None
  if progress is None:
    if meta is not None:
      store_lib.delete_key(out, store_lib.META)  # from here on `out` is not a store
    tokens_array, documents_array = store_lib.create_arrays(out, settings["dtype"], shard_tokens,
                                                            chunk_tokens)
    progress = {"format": store_lib.FORMAT, "version": store_lib.VERSION, "settings": settings,
                "documents": 0, "tokens": 0, "empty": 0, "empty_examples": [], "max_id": 0,
                "source_sha": "0" * 64, "token_sha": "0" * 64, "commits": []}
    store_lib.write_json(out, store_lib.PROGRESS, progress)
  else:
    resumed_from = progress["documents"]
    tokens_array, documents_array = store_lib.open_arrays(out, read_only=False)
    # A commit that died half-way may have grown the arrays: cut them back to what is committed.
    tokens_array = tokens_array.resize(exclusive_max=[progress["tokens"]]).result()
    documents_array = documents_array.resize(exclusive_max=[progress["documents"] + 1]).result()

  empties = _Empties()  # counted from the start again on a resume, like everything else
  undecodable = {"documents": 0, "bytes": 0, "examples": []}

  def count_undecodable(doc_id: str, count: int) -> None:
    undecodable["documents"] += 1
    undecodable["bytes"] += count
    if len(undecodable["examples"]) < 5:
      undecodable["examples"].append(doc_id)

  docs = sources.iter_documents(spec, data_dir=data_dir, max_docs=max_docs, text_key=text_key,
                                on_empty=empties, on_undecodable=count_undecodable)
  batches = _batches(docs, batch_docs, batch_chars, empties)
  if resumed_from:
    log(f"{out}: resuming after {resumed_from} documents ({progress['tokens']} tokens); "
        "re-reading them to check the source is unchanged")
    _skip_committed(batches, progress, out)
  writer = _Writer(out, progress, tokens_array, documents_array)

  from tqdm import tqdm
  bar = tqdm(unit=" docs", initial=progress["documents"], disable=not progress_bar,
             dynamic_ncols=True, file=sys.stderr)
  start = time.perf_counter()
  new_tokens = 0

  def take(batch, seen_empty, flat, lengths):
    nonlocal new_tokens
    writer.add(flat, lengths, _text_digest(batch), seen_empty)
    new_tokens += len(flat)
    bar.update(len(batch))
    seconds = time.perf_counter() - start
    bar.set_postfix_str(f"{progress['tokens'] + writer.pending_n:,} tokens, "
                        f"{new_tokens / max(seconds, 1e-9):,.0f} tokens/s", refresh=False)
    if writer.pending_n >= shard_tokens:
      writer.commit()

  def failed(batch, e):
    return sources.DataError(f"tokenizing documents {batch[0][0]} .. {batch[-1][0]}: "
                             f"{type(e).__name__}: {e}")

  try:
    if workers <= 1:
      for batch, seen_empty in batches:
        try:
          flat, lengths = encode_documents(tok, [t for _, t in batch], np.dtype(settings["dtype"]))
        except Exception as e:
          raise failed(batch, e) from None
        take(batch, seen_empty, flat, lengths)
    else:
      # forkserver: workers fork from a fresh process that imported this module once (spawn
      # would import jax once per worker; fork would copy this process's threads).
      ctx = multiprocessing.get_context("forkserver")
      ctx.set_forkserver_preload([__name__])
      with ctx.Pool(workers, initializer=_init_worker,
                    initargs=(tokenizer, settings["dtype"], False)) as pool:
        pending: collections.deque = collections.deque()

        def drain(limit: int):
          while len(pending) > limit:
            batch, seen_empty, result = pending.popleft()
            try:
              flat, lengths = result.get()
            except Exception as e:
              raise failed(batch, e) from None
            take(batch, seen_empty, flat, lengths)

        for batch, seen_empty in batches:
          pending.append((batch, seen_empty,
                          pool.apply_async(_encode_in_worker, ([t for _, t in batch],))))
          drain(2 * workers)  # bounded: the reader never runs far ahead of the encoders
        drain(0)
    writer.commit()
    progress["empty"], progress["empty_examples"] = empties.snapshot()  # trailing ones too
    progress["undecodable"] = undecodable
  except BaseException:
    bar.close()
    log(f"prepare stopped: {progress['documents']} documents ({progress['tokens']} tokens) are "
        f"committed in {out}; rerun the same command to resume", file=sys.stderr)
    raise
  bar.close()
  seconds = time.perf_counter() - start

  fingerprint = hashlib.sha256(
      f"{settings['tokenizer']}:{progress['source_sha']}:{progress['token_sha']}:"
      f"{progress['tokens']}:{progress['documents']}".encode()).hexdigest()[:16]
  meta = {"format": store_lib.FORMAT, "version": store_lib.VERSION, "fingerprint": fingerprint,
          "tokens": progress["tokens"], "documents": progress["documents"],
          "empty_documents_skipped": progress["empty"],
          "empty_examples": progress["empty_examples"], "dtype": settings["dtype"],
          "max_id": progress["max_id"],
          "tokenizer": {"kind": tok.kind, "fingerprint": settings["tokenizer"],
                        "source": tokenizer, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                        "eos_id": tok.eos_id, "add_bos": tok.add_bos},
          "source": {"spec": spec, "data_dir": data_dir, "max_docs": max_docs,
                     "text_key": text_key, "sha256": progress["source_sha"]},
          "token_sha256": progress["token_sha"], "commits": progress["commits"],
          "undecodable": progress.get("undecodable", {}), "settings": settings,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  store_lib.write_json(out, store_lib.META, meta)
  store_lib.delete_key(out, store_lib.PROGRESS)
  summary = {**_summary_of(meta), "seconds": seconds, "new_tokens": new_tokens,
             "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
             "workers": workers, "resumed_from_documents": resumed_from,
             "disk_bytes": _disk_bytes(out), "already_complete": False}
  log(_summary_text(out, summary))
  return summary


def _summary_of(meta: dict) -> dict:
  return {"store": None, "documents": meta["documents"], "tokens": meta["tokens"],
          "empty_documents_skipped": meta.get("empty_documents_skipped", 0),
          "fingerprint": meta["fingerprint"], "dtype": meta["dtype"],
          "undecodable": meta.get("undecodable", {})}


def _summary_text(out: str, s: dict) -> str:
  lines = [f"token store {out}: {s['documents']:,} documents, {s['tokens']:,} tokens "
           f"({s['dtype']}), fingerprint {s['fingerprint']}"]
  rate = f"{s['tokens_per_second']:,.0f} tokens/s" if s["tokens_per_second"] else "-"
  lines.append(f"  this run: {s['new_tokens']:,} tokens in {s['seconds']:.1f} s ({rate}) on "
               f"{s['workers']} worker process(es)"
               + (f", resumed after {s['resumed_from_documents']:,} documents"
                  if s["resumed_from_documents"] else ""))
  if s["empty_documents_skipped"]:
    lines.append(f"  skipped {s['empty_documents_skipped']:,} empty documents")
  if s.get("undecodable", {}).get("bytes"):
    u = s["undecodable"]
    lines.append(f"  warning: {u['bytes']:,} bytes in {u['documents']:,} documents are not "
                 f"UTF-8 and were stored as U+FFFD (first: {', '.join(u['examples'])}); "
                 "convert those files to UTF-8 and prepare again (--restart) if that matters")
  if s["disk_bytes"] is not None:
    lines.append(f"  on disk: {s['disk_bytes'] / 2**20:,.1f} MiB "
                 f"({s['disk_bytes'] / max(s['tokens'], 1):.2f} bytes/token)")
  return "\n".join(lines)
