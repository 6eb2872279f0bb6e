"""Document sources shared by evaluation and training.

A data spec is one of:
  - a directory (every *.txt / *.tex / *.md file in it, sorted) or a glob of text files;
  - a JSONL file (`*.jsonl`) whose records have a `text` field;
  - `tfds:NAME[:SPLIT]` (e.g. `tfds:pg19:test`) read with tensorflow-datasets from `data_dir`
    (on TPU VMs: `gs://...`), field `book_text` or `text`.
Documents come back as (doc_id, text) in a deterministic order.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".tex", ".md")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = {
    "pg19_standin": os.path.join(REPO_ROOT, "data", "pg19_standin"),
    "proofpile_standin": os.path.join(REPO_ROOT, "data", "proofpile_standin"),
}


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


def iter_documents(spec: str, data_dir: str | None = None,
                   max_docs: int | None = None) -> Iterator[tuple[str, str]]:
  spec = resolve_spec(spec)
  count = 0
  for doc_id, text in _iter(spec, data_dir):
    if max_docs is not None and count >= max_docs:
      return
    count += 1
    yield doc_id, text
  if count == 0:
    raise ValueError(f"data spec {spec!r}: contains no documents")


def _iter(spec: str, data_dir: str | None):
  if spec.startswith("tfds:"):
    yield from _iter_tfds(spec, data_dir)
    return
  if spec.endswith(".jsonl"):
    if not os.path.isfile(spec):
      raise FileNotFoundError(f"data spec {spec!r}: no such JSONL file")
    with open(spec) as f:
      for i, line in enumerate(f):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{spec}:{i + 1}: invalid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
          raise ValueError(f"{spec}:{i + 1}: record has no string field 'text'")
        yield f"{os.path.basename(spec)}:{i + 1}", record["text"]
    return
  if os.path.isdir(spec):
    files = sorted(f for f in glob.glob(os.path.join(spec, "*")) if f.endswith(TEXT_SUFFIXES))
    if not files:
      raise ValueError(f"data spec {spec!r}: directory has no {'/'.join(TEXT_SUFFIXES)} files")
  else:
    files = sorted(glob.glob(spec))
    if not files:
      raise FileNotFoundError(f"data spec {spec!r}: no such directory, file or glob match")
  for file in files:
    with open(file, encoding="utf-8", errors="replace") as f:
      yield os.path.basename(file), f.read()


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
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:  # TFRECORD files need tensorflow itself to be read
    raise ValueError(f"data spec {spec!r}: {builder.data_dir} holds a format pi_jax cannot read "
                     f"without tensorflow; rebuild it with --file_format=array_record ({e})") from None
  for i in range(len(source)):
    record = source[i]
    text = record.get("book_text", record.get("text"))
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    yield str(record.get("book_title", f"{name}:{split}:{i}")), text
