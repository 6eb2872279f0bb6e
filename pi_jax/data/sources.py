"""Document sources shared by evaluation, training and `prepare`.

A data spec is one of:
  - a directory: every *.txt / *.tex / *.md file in it (one document each) and every record file
    (below) in it, sorted by name;
  - a glob of such files (`pile/train/*.jsonl.zst`), or one such file;
  - a record file: JSONL (`*.jsonl`, `*.jsonl.gz`, `*.jsonl.zst`) whose records have a string
    field `text`, or Parquet (`*.parquet`) with a string column `text` (one document a record);
  - `tfds:NAME[:SPLIT]` (e.g. `tfds:pg19:test`) read with tensorflow-datasets from `data_dir`
    (on TPU VMs: `gs://...`), field `book_text` or `text`: ArrayRecord datasets directly,
    TFRecord datasets (the public TFDS buckets) when tensorflow is installed.
(A token store made by `python -m pi_jax.data prepare` is also a data spec for the trainer, but
it holds tokens, not documents: see pi_jax.data.store.)

Documents come back as (doc_id, text) in a deterministic order; doc_id names the file (and the
line or row), so every error below names the file it comes from.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sys
from typing import Callable, Iterator

TEXT_SUFFIXES = (".txt", ".tex", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
RECORD_SUFFIXES = JSONL_SUFFIXES + (".parquet",)
# Compressed or archive files other than the record formats above: never read as text.
PACKED_SUFFIXES = (".gz", ".zst", ".bz2", ".xz", ".lz4", ".lzma", ".zip", ".tar", ".tgz", ".7z",
                   ".rar", ".br", ".Z")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUNDLED = {
    "pg19_standin": os.path.join(REPO_ROOT, "data", "pg19_standin"),
    "proofpile_standin": os.path.join(REPO_ROOT, "data", "proofpile_standin"),
}


class DataError(ValueError):
  """A data file that cannot be read as what its name says; the message names the file."""


def resolve_spec(spec: str) -> str:
  """Bundled names (`pg19_standin`, `proofpile_standin`) map to the repository's data folder.

  The bundled text ships with the repository, not with the installed package: from a package
  installed elsewhere (a wheel) the name is an error that says so.
  """
  path = BUNDLED.get(spec)
  if path is None:
    return spec
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"data spec {spec!r} is a bundled data set, which lives in the repository's data/ folder "
        f"({path} does not exist: pi_jax is installed outside a clone of the repository). Run "
        "from a clone (pip install -e .), or pass a directory, glob, JSONL file or tfds: spec.")
  return path


def _warn_undecodable(doc_id: str, count: int) -> None:
  print(f"warning: {doc_id}: {count} bytes are not UTF-8; each reads as U+FFFD", file=sys.stderr)


def iter_documents(spec: str, data_dir: str | None = None, max_docs: int | None = None,
                   text_key: str = "text", on_empty: Callable[[str], None] | None = None,
                   on_undecodable: Callable[[str, int], None] | None = None
                   ) -> Iterator[tuple[str, str]]:
  """(doc_id, text) of every document of `spec`, in order.

  on_empty: when given, documents with no text but whitespace are skipped and their ids passed to
  it (they do not count towards max_docs); otherwise they come back like any other.
  on_undecodable(doc_id, count): a text file with `count` bytes that are not UTF-8 (read as
  U+FFFD); by default a warning line on stderr. (Invalid UTF-8 in JSONL is an error: JSON is
  UTF-8 by definition.)
  """
  spec = resolve_spec(spec)
  on_undecodable = on_undecodable or _warn_undecodable
  count = 0
  for doc_id, text in _iter(spec, data_dir, text_key, on_undecodable):
    if max_docs is not None and count >= max_docs:
      return
    if on_empty is not None and not text.strip():
      on_empty(doc_id)
      continue
    count += 1
    yield doc_id, text
  if count == 0:
    raise ValueError(f"data spec {spec!r}: contains no documents"
                     + (" that are not empty" if on_empty is not None else ""))


def spec_files(spec: str) -> list[str]:
  """The files a file-based spec reads, in order (empty for `tfds:` specs)."""
  spec = resolve_spec(spec)
  if spec.startswith("tfds:"):
    return []
  if os.path.isdir(spec):
    from pi_jax.data import store as store_lib  # a store is a directory too: say what it is
    if store_lib.looks_like_store(spec):
      raise ValueError(f"data spec {spec!r} is a token store (tokens, not documents): the "
                       "trainer reads it as its data spec; documents come from the spec it was "
                       "prepared from")
    files = sorted(f for f in glob.glob(os.path.join(spec, "*"))
                   if f.endswith(TEXT_SUFFIXES + RECORD_SUFFIXES))
    if not files:
      raise ValueError(f"data spec {spec!r}: directory has no "
                       f"{'/'.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} files")
    return files
  if spec.endswith(RECORD_SUFFIXES) and not glob.has_magic(spec):
    if not os.path.isfile(spec):
      raise FileNotFoundError(f"data spec {spec!r}: no such file")
    return [spec]
  files = sorted(f for f in glob.glob(spec) if not os.path.isdir(f))
  if not files:
    raise FileNotFoundError(f"data spec {spec!r}: no such directory, file or glob match")
  for f in files:
    if f.endswith(PACKED_SUFFIXES) and not f.endswith(RECORD_SUFFIXES):
      raise DataError(f"{f}: a compressed or archive file, not text (pi_jax reads compressed "
                      f"{', '.join(JSONL_SUFFIXES[1:])} only): decompress it, or narrow the data "
                      f"spec {spec!r} to the text files")
    if not f.endswith(TEXT_SUFFIXES + RECORD_SUFFIXES):  # a glob's other files: look at them
      _check_not_binary(f, _head(f), spec)
  return files


def _head(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read(1 << 16)
  except OSError as e:
    raise DataError(f"{path}: cannot read: {e}") from None


def _check_not_binary(path: str, head: bytes, spec: str) -> None:
  if b"\0" in head:  # text has no NUL bytes; binaries and UTF-16 do
    raise DataError(f"{path}: a binary file (NUL bytes), not UTF-8 text: narrow the data "
                    f"spec {spec!r} to the text files")


def _undecodable_bytes(data: bytes) -> int:
  count = 0
  while True:
    try:
      data.decode("utf-8")
      return count
    except UnicodeDecodeError as e:
      count += e.end - e.start
      data = data[e.end:]


def _iter(spec: str, data_dir: str | None, text_key: str, on_undecodable):
  if spec.startswith("tfds:"):
    yield from _iter_tfds(spec, data_dir)
    return
  for file in spec_files(spec):
    if file.endswith(JSONL_SUFFIXES):
      yield from _iter_jsonl(file, text_key)
    elif file.endswith(".parquet"):
      yield from _iter_parquet(file, text_key)
    else:
      try:
        with open(file, "rb") as f:
          data = f.read()
      except OSError as e:
        raise DataError(f"{file}: cannot read: {e}") from None
      _check_not_binary(file, data[:1 << 16], spec)
      text = data.decode("utf-8", errors="replace")
      if "\ufffd" in text and (bad := _undecodable_bytes(data)):
        on_undecodable(os.path.basename(file), bad)
      yield os.path.basename(file), text


# --- JSONL, plain or compressed ------------------------------------------------------------------

class _ZstdReader(io.RawIOBase):
  """A .zst file as a raw byte stream (every frame in turn) that raises EOFError when the file
  ends inside a frame; zstandard's own stream_reader returns a short read there instead."""

  def __init__(self, path: str):
    import zstandard
    self._zstd = zstandard
    self._path = path
    self._file = open(path, "rb")
    self._new = lambda: zstandard.ZstdDecompressor(max_window_size=2**31).decompressobj()
    self._dobj = self._new()
    self._pending = b""
    self._in_frame = False

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while not self._pending:
      chunk = self._file.read(1 << 20)
      if not chunk:
        if self._in_frame:
          raise EOFError("compressed file ended before the end of its last zstd frame")
        return 0
      while chunk:
        self._in_frame = True
        try:
          self._pending += self._dobj.decompress(chunk)
        except self._zstd.ZstdError as e:
          raise DataError(f"{self._path}: not a valid zstd stream: {e}") from None
        if self._dobj.eof:  # a frame ended; a next one may follow in the same chunk
          chunk = self._dobj.unused_data
          self._dobj, self._in_frame = self._new(), False
        else:
          chunk = b""
    n = min(len(buffer), len(self._pending))
    buffer[:n] = self._pending[:n]
    self._pending = self._pending[n:]
    return n

  def close(self):
    self._file.close()
    super().close()


def _open_text(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  if path.endswith(".zst"):
    return io.TextIOWrapper(io.BufferedReader(_ZstdReader(path), 1 << 20), encoding="utf-8")
  return open(path, encoding="utf-8")


def _iter_jsonl(path: str, text_key: str):
  name = os.path.basename(path)
  line_no = 0
  try:
    with _open_text(path) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{line_no}: invalid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
          raise DataError(f"{path}:{line_no}: record has no string field {text_key!r}")
        yield f"{name}:{line_no}", record[text_key]
  except EOFError as e:  # gzip and _ZstdReader: the compressed stream stops mid-way
    raise DataError(f"{path}: truncated: the compressed stream ends early, after line {line_no} "
                    f"({e}); the documents before it are intact, the file is not") from None
  except (OSError, UnicodeDecodeError) as e:  # unreadable, not gzip, invalid UTF-8
    raise DataError(f"{path}: cannot read after line {line_no}: {e}") from None


# --- Parquet -------------------------------------------------------------------------------------

def _iter_parquet(path: str, text_key: str):
  import pyarrow as pa
  import pyarrow.parquet as pq
  name = os.path.basename(path)
  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable Parquet file: {e}") from None
  names = parquet.schema_arrow.names
  if text_key not in names:
    raise DataError(f"{path}: no column {text_key!r} (columns: {', '.join(names)})")
  row = 0
  try:
    for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
      for text in batch.column(0).to_pylist():
        row += 1
        if isinstance(text, bytes):
          text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str):
          if text is None:
            text = ""  # a null is an empty document
          else:
            raise DataError(f"{path}: row {row}: column {text_key!r} is not text")
        yield f"{name}:{row}", text
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: cannot read after row {row}: {e}") from None


# --- tensorflow-datasets -------------------------------------------------------------------------

def _iter_tfds(spec: str, data_dir: str | None):
  parts = spec.split(":")
  name, split = parts[1], (parts[2] if len(parts) > 2 else "test")
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError(f"data spec {spec!r} needs tensorflow-datasets (pip install "
                      "'pi_jax[tfds]' tensorflow)") from None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises its own DatasetNotFoundError and friends
    raise ValueError(f"data spec {spec!r}: tensorflow-datasets cannot open {name!r}: {e}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"data spec {spec!r}: {name} is not prepared under {builder.data_dir} (data_dir="
        f"{data_dir!r}); prepare it once with `tfds build {name} --file_format=array_record "
        "--data_dir DIR` (needs tensorflow) and pass --data-dir DIR")
  if split not in builder.info.splits:
    raise ValueError(f"data spec {spec!r}: {name} has no split {split!r} (splits: "
                     f"{', '.join(sorted(builder.info.splits))})")
  file_format = builder.info.file_format
  if file_format is not None and file_format.value == "array_record":
    source = builder.as_data_source(split=split)
    records = (source[i] for i in range(len(source)))
  else:
    records = _tfds_records_with_tensorflow(tfds, builder, spec, split)
  for i, record in enumerate(records):
    text = record.get("book_text", record.get("text"))
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
      raise DataError(f"data spec {spec!r}: record {i} of {builder.data_dir} has no "
                      "'book_text' or 'text' string field")
    title = record.get("book_title")
    if isinstance(title, bytes):
      title = title.decode("utf-8", errors="replace")
    yield str(title if title else f"{name}:{split}:{i}"), text


def _tfds_records_with_tensorflow(tfds, builder, spec: str, split: str):
  """Records of a TFRecord (or other non-random-access) dataset, in file order, via tf.data."""
  try:
    import tensorflow as tf  # noqa: F401  (tfds reads TFRecord files through tf.data)
  except ImportError:
    raise DataError(
        f"data spec {spec!r}: {builder.data_dir} is stored as {builder.info.file_format.value}, "
        "which tensorflow-datasets reads only through tensorflow: pip install tensorflow-cpu, "
        f"or rebuild it with `tfds build {builder.name} --file_format=array_record`") from None
  # One file at a time, in order: the same document order as the ArrayRecord data source.
  read_config = tfds.ReadConfig(interleave_cycle_length=1, shuffle_seed=None)
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
  try:
    yield from tfds.as_numpy(ds)
  except tf.errors.OpError as e:  # a truncated or corrupt TFRecord shard
    raise DataError(f"data spec {spec!r}: cannot read {builder.data_dir}: {e.message}") from None
