"""A token store: a corpus tokenized once, read by row slices (TensorStore zarr3 arrays).

Layout of a store directory (local or `gs://bucket/path`):
  tokens/     zarr3 array [T] of token ids (uint16 when the vocabulary fits, else uint32): every
              document's ids (BOS first when the tokenizer adds one) followed by EOS, concatenated
              in the source's order: the packing stream of pi_jax.train.pipeline. Sharded: one
              file per `shard_tokens` tokens, zstd-compressed inner chunks of `chunk_tokens`
              tokens with crc32c checksums, so a row read fetches only the chunks it covers.
  documents/  zarr3 array [D + 1] uint64: document d is tokens[documents[d]:documents[d + 1]].
  store.json  what the store is: tokenizer and source fingerprints, counts, the store's
              fingerprint. Written last: a directory without it is not a store (yet).
  progress.json  only while `prepare` runs or after it was interrupted: what is committed, so a
              rerun resumes after the last commit.

TensorStore, not a format of our own: it is already installed (orbax checkpoints are written
with it), reads and writes local disk and GCS with the same code, and its zarr3 sharding reads a
32K-token row as one or two small chunk reads out of a large file.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

FORMAT = "pi_jax.token_store"
VERSION = 1
META = "store.json"
PROGRESS = "progress.json"
TOKENS, DOCUMENTS = "tokens", "documents"


class StoreError(ValueError):
  """A token store that is missing, incomplete, damaged, or made for something else."""


def _ts():
  import tensorstore
  return tensorstore


def is_remote(path: str) -> bool:
  return path.startswith("gs://")


def kvstore_spec(path: str) -> dict:
  """TensorStore kvstore spec of a directory: `gs://bucket/dir` or a local path."""
  if is_remote(path):
    bucket, _, rest = path[len("gs://"):].partition("/")
    rest = rest.strip("/")
    return {"driver": "gcs", "bucket": bucket, "path": rest + "/" if rest else ""}
  return {"driver": "file", "path": os.path.abspath(path) + "/"}


def _kvstore(path: str):
  return _ts().KvStore.open(kvstore_spec(path)).result()


def read_json(path: str, key: str) -> dict | None:
  """The JSON object at `path/key`, or None when there is none."""
  if not is_remote(path):
    file = os.path.join(path, key)
    if not os.path.isfile(file):
      return None
    with open(file) as f:
      text = f.read()
  else:
    result = _kvstore(path).read(key).result()
    if result.state != "value":
      return None
    text = result.value.decode()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise StoreError(f"{path}/{key}: invalid JSON ({e}); the store is damaged") from None


def write_json(path: str, key: str, obj: dict) -> None:
  """Writes `path/key` atomically (a local temp file renamed; one object write on GCS)."""
  text = json.dumps(obj, indent=1, sort_keys=True)
  if is_remote(path):
    _kvstore(path).write(key, text.encode()).result()
    return
  file = os.path.join(path, key)
  tmp = file + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, file)


def delete_key(path: str, key: str) -> None:
  if is_remote(path):
    _kvstore(path).delete(key).result()
  elif os.path.exists(os.path.join(path, key)):
    os.remove(os.path.join(path, key))


def looks_like_store(path: str) -> bool:
  """Whether `path` is a token store, complete or not (it has store.json or progress.json)."""
  if is_remote(path):
    kv = _kvstore(path)
    return any(kv.read(k).result().state == "value" for k in (META, PROGRESS))
  return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, k))
                                     for k in (META, PROGRESS))


def _array_spec(path: str, name: str, strict: bool = False) -> dict:
  spec = kvstore_spec(path)
  spec["path"] = spec["path"] + name + "/"
  out = {"driver": "zarr3", "kvstore": spec}
  if strict:  # a missing shard or inner chunk is an error, never zarr's fill value (zeros)
    out["fill_missing_data_reads"] = False
  return out


def _codecs(chunk: int) -> list[dict]:
  """zarr3 sharding: inner chunks of `chunk` elements, zstd-compressed, with checksums."""
  return [{"name": "sharding_indexed", "configuration": {
      "chunk_shape": [chunk],
      "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                 {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
                 {"name": "crc32c"}],
      "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "crc32c"}]}}]


def _context(read_only: bool):
  # No cache: rows are read once per step, and host memory must not grow with the corpus.
  return _ts().Context({"cache_pool": {"total_bytes_limit": 0},
                        "data_copy_concurrency": {"limit": 4 if read_only else 8}})


def create_arrays(path: str, dtype: str, shard_tokens: int, chunk_tokens: int):
  """Fresh, empty tokens/ and documents/ arrays (anything there before is deleted)."""
  ts = _ts()
  context = _context(read_only=False)
  tokens = ts.open({**_array_spec(path, TOKENS), "metadata": {
      "shape": [0], "data_type": dtype,
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_tokens]}},
      "codecs": _codecs(chunk_tokens)}}, create=True, delete_existing=True,
      context=context).result()
  doc_shard = 1 << 20
  documents = ts.open({**_array_spec(path, DOCUMENTS), "metadata": {
      "shape": [1], "data_type": "uint64",
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [doc_shard]}},
      "codecs": _codecs(1 << 14)}}, create=True, delete_existing=True,
      context=context).result()
  documents[0:1].write(np.zeros(1, np.uint64)).result()
  return tokens, documents


def open_arrays(path: str, read_only: bool = True):
  ts = _ts()
  context = _context(read_only)
  try:
    return tuple(ts.open(_array_spec(path, name, strict=read_only), open=True, read=True,
                         write=not read_only, context=context).result()
                 for name in (TOKENS, DOCUMENTS))
  except ValueError as e:  # tensorstore's NOT_FOUND / DATA_LOSS / FAILED_PRECONDITION
    raise StoreError(f"token store {path}: cannot open its arrays: {e}") from None


def _shard_files(path: str, name: str) -> dict[str, int]:
  """{file name: size} of the shard files of array `name` (`c/0`, `c/1`, ...)."""
  if not is_remote(path):
    folder = os.path.join(path, name, "c")
    if not os.path.isdir(folder):
      return {}
    return {f"c/{f}": os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}
  prefix = f"{name}/c/"
  kv = _kvstore(path)
  keys = kv.list(_ts().KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()
  return {k.decode()[len(name) + 1:]: 1 for k in keys}  # sizes: the reads' checksums see them


def check_shards(path: str, array, name: str) -> None:
  """Every shard file the array's shape needs is there and not empty: a missing one would
  read as zeros (zarr's fill value) with lenient reads, and as an error in the middle of a run
  with strict ones. One directory listing, whatever the corpus size."""
  shard = int(array.chunk_layout.write_chunk.shape[0])
  needed = -(-int(array.shape[0]) // shard)
  files = _shard_files(path, name)
  for i in range(needed):
    size = files.get(f"c/{i}")
    if not size:
      what = "is missing" if size is None else "is empty"
      raise StoreError(f"token store {path}: shard file {name}/c/{i} {what} (the store needs "
                       f"{needed}); the store is damaged: prepare it again (--restart)")

def create_side_array(path: str, name: str, dtype: str, length: int, shard: int, chunk: int):
  """A fresh array `name/` [length] beside tokens/ (one value per token, e.g. an SFT store's
  loss mask), sharded and checksummed like tokens/."""
  return _ts().open({**_array_spec(path, name), "metadata": {
      "shape": [length], "data_type": dtype,
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard]}},
      "codecs": _codecs(chunk)}}, create=True, delete_existing=True,
      context=_context(read_only=False)).result()


def open_side_array(path: str, name: str):
  """The array `name/` of a store, for reading."""
  try:
    return _ts().open(_array_spec(path, name, strict=True), open=True, read=True,
                      context=_context(read_only=True)).result()
  except ValueError as e:
    raise StoreError(f"token store {path}: cannot open {name}/: {e}") from None


class TokenStore:
  """A complete token store, opened for reading: metadata plus on-demand slices of the stream.

  Opening reads two small JSON files and lists the shard files (a missing one is an error here,
  not zeros later), whatever the corpus size; every read checks the crc32c of each chunk it
  touches and refuses a missing chunk; `verify()` recomputes the stored token checksum.
  Nothing is cached, so host memory holds only what a read returns.
  """

  def __init__(self, path: str):
    self.path = path.rstrip("/") if is_remote(path) else path
    meta = read_json(self.path, META)
    if meta is None:
      progress = read_json(self.path, PROGRESS)
      if progress is not None:
        raise StoreError(
            f"token store {path} is incomplete: `prepare` stopped after "
            f"{progress.get('documents', 0)} documents ({progress.get('tokens', 0)} tokens); "
            "rerun the same prepare command to resume it")
      raise StoreError(f"{path} is not a token store (no {META}); make one with "
                       "`python -m pi_jax.data prepare SPEC OUT --tokenizer CKPT`")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
      raise StoreError(f"{path}/{META}: format {meta.get('format')!r} version "
                       f"{meta.get('version')!r}; this pi_jax reads {FORMAT} version {VERSION}")
    self.meta = meta
    self._tokens, self._documents = open_arrays(self.path)
    if self._tokens.shape[0] != meta["tokens"] or self._documents.shape[0] != meta["documents"] + 1:
      raise StoreError(f"token store {path}: arrays hold {self._tokens.shape[0]} tokens and "
                       f"{self._documents.shape[0] - 1} documents, {META} says {meta['tokens']} "
                       f"and {meta['documents']}; the store is damaged, prepare it again")
    check_shards(self.path, self._tokens, TOKENS)
    check_shards(self.path, self._documents, DOCUMENTS)

  @property
  def num_tokens(self) -> int:
    return int(self.meta["tokens"])

  @property
  def num_documents(self) -> int:
    return int(self.meta["documents"])

  @property
  def fingerprint(self) -> str:
    return self.meta["fingerprint"]

  @property
  def tokenizer(self) -> dict:
    return self.meta["tokenizer"]

  def _read(self, array, name: str, futures_ranges):
    out = []
    for future, (a, b) in futures_ranges:
      try:
        out.append(future.result())
      except ValueError as e:  # DATA_LOSS (checksum), NOT_FOUND (a missing shard file), ...
        raise StoreError(f"token store {self.path}: cannot read {name}[{a}:{b}]: {e}") from None
    return out

  def document_offsets(self, start: int, stop: int) -> np.ndarray:
    """documents[start:stop]: token offsets of document boundaries, int64."""
    future = self._documents[start:stop].read()
    return self._read(self._documents, DOCUMENTS, [(future, (start, stop))])[0].astype(np.int64)

  def tokens(self, start: int, stop: int) -> np.ndarray:
    """tokens[start:stop] as int32."""
    return self.slices([start], stop - start)[0]

  def slices(self, starts, length: int) -> np.ndarray:
    """int32 [len(starts), length]: tokens[s:s + length] for each s, read concurrently."""
    starts = [int(s) for s in starts]
    for s in starts:
      if s < 0 or s + length > self.num_tokens:
        raise IndexError(f"token store {self.path}: slice [{s}:{s + length}] is outside its "
                         f"{self.num_tokens} tokens")
    futures = [(self._tokens[s:s + length].read(), (s, s + length)) for s in starts]
    parts = self._read(self._tokens, TOKENS, futures)
    if not parts:
      return np.zeros((0, length), np.int32)
    return np.stack(parts).astype(np.int32)

  def verify(self, progress=None) -> None:
    """Reads the whole store and recomputes its token checksum (store.json's token_sha256, a
    chain of one sha256 per `prepare` commit); raises StoreError naming what differs.
    progress(done_tokens) is called after each commit's tokens. Stores written before commits
    were recorded are read in full (every chunk's crc32c) but their checksum is not recomputed.
    """
    offsets = self.document_offsets(0, self.num_documents + 1)
    if offsets[0] != 0 or offsets[-1] != self.num_tokens or np.any(np.diff(offsets) <= 0):
      raise StoreError(f"token store {self.path}: documents/ does not cut tokens/ into "
                       "documents (offsets not increasing from 0 to the token count); the store "
                       "is damaged: prepare it again (--restart)")
    commits = self.meta.get("commits")
    bounds = [0] + [int(offsets[d]) for d in commits] if commits else None
    if bounds is None:
      bounds = list(range(0, self.num_tokens, 1 << 24)) + [self.num_tokens]
    chain, max_id = "0" * 64, 0
    dtype = np.dtype(self.meta["dtype"])
    for a, b in zip(bounds[:-1], bounds[1:]):
      digest = hashlib.sha256()
      for c in range(a, b, 1 << 24):  # at most 16M tokens in memory
        part = self.tokens(c, min(b, c + (1 << 24)))
        max_id = max(max_id, int(part.max()))
        digest.update(part.astype(dtype).tobytes())
      chain = hashlib.sha256(bytes.fromhex(chain) + digest.digest()).hexdigest()
      if progress is not None:
        progress(b)
    if commits and chain != self.meta.get("token_sha256"):
      raise StoreError(f"token store {self.path}: the tokens' checksum is {chain[:16]}..., "
                       f"{META} says {str(self.meta.get('token_sha256'))[:16]}...: the tokens "
                       "were altered; the store is damaged: prepare it again (--restart)")
    if max_id != self.meta.get("max_id", max_id):
      raise StoreError(f"token store {self.path}: largest token id {max_id}, {META} says "
                       f"{self.meta.get('max_id')}; the store is damaged: prepare it again")

  def ranges(self, starts, lengths) -> list[np.ndarray]:
    """[tokens[s:s + n] as int32 for each (s, n)], read concurrently (packed documents)."""
    pairs = [(int(s), int(n)) for s, n in zip(starts, lengths)]
    for s, n in pairs:
      if s < 0 or s + n > self.num_tokens:
        raise IndexError(f"token store {self.path}: slice [{s}:{s + n}] is outside its "
                         f"{self.num_tokens} tokens")
    futures = [(self._tokens[s:s + n].read(), (s, s + n)) for s, n in pairs]
    return [p.astype(np.int32) for p in self._read(self._tokens, TOKENS, futures)]

  def check_tokenizer(self, tokenizer, used_by: str, tokenizer_arg: str) -> None:
    """Raises unless the store was made with a tokenizer that encodes like `tokenizer` (the
    run's: `used_by` says whose, `tokenizer_arg` is the --tokenizer that would make it)."""
    mine = self.tokenizer
    fingerprint = tokenizer.fingerprint()
    if mine.get("fingerprint") != fingerprint:
      raise StoreError(
          f"token store {self.path} was made with another tokenizer than this run's ({used_by}):"
          f" the store's is {mine.get('kind')} {mine.get('fingerprint')} (--tokenizer "
          f"{mine.get('source')}), the run's {tokenizer.kind} {fingerprint}; prepare the store "
          f"again with --tokenizer {tokenizer_arg}")


def describe(meta: dict) -> str:
  tok = meta.get("tokenizer", {})
  return (f"{meta.get('documents')} documents, {meta.get('tokens')} tokens, tokenizer "
          f"{tok.get('kind')} {tok.get('fingerprint')}, source {meta.get('source', {}).get('spec')}"
          f", fingerprint {meta.get('fingerprint')}")
