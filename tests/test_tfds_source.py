"""`tfds:NAME:SPLIT` specs on small TFDS datasets built here, as ArrayRecord and as TFRecord.

Building and reading happen in subprocesses: tensorflow-datasets registers the builder class
once per process, and tensorflow (for TFRecord) stays out of the test process.

TFRecord needs tensorflow, which the project does not install (tensorflow-cpu 2.21.0 is a
274 MB wheel, 1.3 GB installed): that test runs where `import tensorflow` works and is skipped,
saying so, elsewhere. The ArrayRecord test needs only tensorflow-datasets.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests import train_utils as tu

BOOKS = {"train": [f"Book {i}: " + "It was a dark and stormy night. " * (i + 1) + "Ünïcödé."
                   for i in range(6)],
         "test": ["Only one test book, " * 3]}

BUILD = r"""
import json, sys
import tensorflow_datasets as tfds
data_dir, file_format, books = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

class TinyBooks(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"book_text": tfds.features.Text(), "book_title": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in books}

  def _generate_examples(self, split):
    for i, text in enumerate(books[split]):
      yield i, {"book_text": text, "book_title": f"{split}-{i}"}

TinyBooks(data_dir=data_dir, file_format=file_format).download_and_prepare()
"""

# Reads through pi_jax only: the dataset's code is not importable here, as for public buckets.
READ = r"""
import json, sys
from pi_jax import data
from pi_jax.data import prepare
docs = list(data.iter_documents("tfds:tiny_books:train", data_dir=sys.argv[1]))
summary = prepare.prepare("tfds:tiny_books:train", sys.argv[2], "bytes", data_dir=sys.argv[1],
                          workers=1, progress_bar=False, log=lambda *a, **k: None)
store = data.TokenStore(sys.argv[2])
print(json.dumps({"docs": docs, "fingerprint": summary["fingerprint"],
                  "tokens": store.tokens(0, store.num_tokens).tolist()}))
"""


def _run(program: str, *args, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", program, *args], env=tu.subprocess_env(1),
                        cwd=tu.REPO, capture_output=True, text=True, timeout=timeout)


def _build(data_dir, file_format: str) -> None:
  proc = _run(BUILD, str(data_dir), file_format, json.dumps(BOOKS))
  assert proc.returncode == 0, proc.stderr[-3000:]


def _read(data_dir, out):
  return _run(READ, str(data_dir), str(out))


def _check(result: dict) -> None:
  docs = result["docs"]
  # Records come back in file order (ArrayRecord's index order); the shuffled write order of
  # tfds is the same for both formats, so both give this list.
  assert sorted(docs) == sorted([f"train-{i}", t] for i, t in enumerate(BOOKS["train"]))
  want = []
  for _, text in docs:
    want += [256, *text.encode("utf-8"), 257]
  assert result["tokens"] == want


def test_tfds_array_record_dataset(tmp_path):
  _build(tmp_path / "ar", "array_record")
  proc = _read(tmp_path / "ar", tmp_path / "store")
  assert proc.returncode == 0, proc.stderr[-3000:]
  _check(json.loads(proc.stdout.splitlines()[-1]))


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="TFRecord datasets are read through tensorflow, which is not installed "
                    "(pip install tensorflow-cpu==2.21.0: 274 MB wheel, 1.3 GB installed)")
def test_tfds_tfrecord_dataset_reads_like_array_record(tmp_path):
  _build(tmp_path / "ar", "array_record")
  _build(tmp_path / "tfr", "tfrecord")
  ar = _read(tmp_path / "ar", tmp_path / "ar_store")
  tfr = _read(tmp_path / "tfr", tmp_path / "tfr_store")
  assert ar.returncode == 0, ar.stderr[-3000:]
  assert tfr.returncode == 0, tfr.stderr[-3000:]
  ar, tfr = (json.loads(p.stdout.splitlines()[-1]) for p in (ar, tfr))
  _check(tfr)
  assert tfr == ar  # same documents in the same order, same tokens, same store fingerprint
