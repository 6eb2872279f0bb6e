"""Token stores: `prepare` (formats, parallel, resume, bad input) and the trainer reading them."""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from pi_jax import data as data_lib
from pi_jax.data import prepare as prepare_lib
from pi_jax.data import store as store_lib
from pi_jax.tokenizer import ByteTokenizer, load_tokenizer
from pi_jax.train import pipeline
from tests import train_utils as tu
from tests.test_tokenizer import _write_bpe_tokenizer_json

# Small files, so that prepare commits many times and reads cross file boundaries.
SMALL = dict(shard_tokens=1 << 14, chunk_tokens=1 << 10, progress_bar=False,
             log=lambda *a, **k: None)


def _stream(path) -> np.ndarray:
  store = data_lib.TokenStore(str(path))
  return store.tokens(0, store.num_tokens)


def _docs(n=12, size=3000):
  """Real text: pieces of the bundled books, one empty document, some non-ASCII."""
  files = sorted(glob.glob(os.path.join(data_lib.BUNDLED["pg19_standin"], "*.txt")))[:n]
  docs = [open(f, encoding="utf-8").read()[:size] for f in files]
  docs[3] = ""  # skipped and counted
  docs[5] = "Ünïcödé — “quotes” and 漢字 " + docs[5]
  return docs


def _write_formats(folder, docs) -> dict[str, str]:
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard
  os.makedirs(folder, exist_ok=True)
  lines = "".join(json.dumps({"text": d, "meta": {"i": i}}) + "\n" for i, d in enumerate(docs))
  paths = {k: os.path.join(folder, "docs" + k) for k in (".jsonl", ".jsonl.gz", ".jsonl.zst",
                                                           ".parquet")}
  with open(paths[".jsonl"], "w") as f:
    f.write(lines)
  with gzip.open(paths[".jsonl.gz"], "wt", encoding="utf-8") as f:
    f.write(lines)
  raw = lines.encode()
  half = raw.index(b"\n", len(raw) // 2) + 1  # two zstd frames, as concatenated shards have
  with open(paths[".jsonl.zst"], "wb") as f:
    f.write(zstandard.ZstdCompressor().compress(raw[:half]))
    f.write(zstandard.ZstdCompressor(level=9).compress(raw[half:]))
  pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), paths[".parquet"],
                 row_group_size=4)
  return paths


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  folder = tmp_path_factory.mktemp("bpe")
  _write_bpe_tokenizer_json(str(folder), adds_bos=True)
  return str(folder)


def test_compressed_and_parquet_inputs_give_the_tokens_of_plain_jsonl(tmp_path, bpe):
  docs = _docs()
  paths = _write_formats(tmp_path / "src", docs)
  tok = load_tokenizer(bpe)
  want = pipeline.tokenize_and_join(paths[".jsonl"], tok)  # the trainer's own packing
  expected = []
  for d in docs:
    if d.strip():
      expected += tok.encode(d) + [tok.eos_id]
  assert want.tolist() == expected and tok.add_bos
  fingerprints = set()
  for suffix, path in paths.items():
    # Every format reads the same documents, named by file and line/row.
    got = list(data_lib.iter_documents(path))
    assert [t for _, t in got] == docs, suffix
    assert got[1][0] == f"docs{suffix}:2"
    summary = prepare_lib.prepare(path, str(tmp_path / ("store" + suffix)), bpe, workers=1,
                                  **SMALL)
    assert summary["empty_documents_skipped"] == 1 and summary["documents"] == len(docs) - 1
    assert np.array_equal(_stream(tmp_path / ("store" + suffix)), want), suffix
    fingerprints.add(summary["fingerprint"])
  # The fingerprint is of content (tokenizer, text, tokens), not of file names or formats.
  assert len(fingerprints) == 1
  # Worker processes give the same stream as one process.
  # (The fingerprint also covers how prepare cut the stream into commits: same settings here.)
  single = prepare_lib.prepare(paths[".jsonl.zst"], str(tmp_path / "single"), bpe, workers=1,
                               batch_docs=3, **SMALL)
  summary = prepare_lib.prepare(paths[".jsonl.zst"], str(tmp_path / "parallel"), bpe, workers=2,
                                batch_docs=3, **SMALL)
  assert summary["workers"] == 2 and summary["fingerprint"] == single["fingerprint"]
  assert np.array_equal(_stream(tmp_path / "parallel"), want)
  store = data_lib.TokenStore(str(tmp_path / "parallel"))
  offsets = store.document_offsets(0, store.num_documents + 1)
  assert offsets[0] == 0 and offsets[-1] == len(want)
  assert (want[offsets[1:] - 1] == tok.eos_id).all()  # every document ends with EOS
  assert store.tokenizer["fingerprint"] == tok.fingerprint() and store.meta["dtype"] == "uint16"
  # A directory of record files reads them in name order.
  both = tmp_path / "both"
  both.mkdir()
  shutil.copy(paths[".jsonl.gz"], both / "a.jsonl.gz")
  shutil.copy(paths[".parquet"], both / "b.parquet")
  assert [t for _, t in data_lib.iter_documents(str(both))] == docs + docs


def test_bad_input_names_the_file(tmp_path):
  docs = _docs()
  paths = _write_formats(tmp_path, docs)
  for suffix in (".jsonl.gz", ".jsonl.zst"):
    cut = tmp_path / ("cut" + suffix)
    data = open(paths[suffix], "rb").read()
    cut.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(data_lib.DataError, match=rf"{cut}: truncated: the compressed stream "
                       r"ends early, after line \d+"):
      list(data_lib.iter_documents(str(cut)))
  not_gzip = tmp_path / "plain.jsonl.gz"
  not_gzip.write_text('{"text": "a"}\n')
  with pytest.raises(data_lib.DataError, match=rf"{not_gzip}: cannot read after line 0"):
    list(data_lib.iter_documents(str(not_gzip)))
  not_zstd = tmp_path / "plain.jsonl.zst"
  not_zstd.write_text('{"text": "a"}\n')
  with pytest.raises(data_lib.DataError, match=rf"{not_zstd}: not a valid zstd stream"):
    list(data_lib.iter_documents(str(not_zstd)))
  bad_parquet = tmp_path / "bad.parquet"
  bad_parquet.write_bytes(open(paths[".parquet"], "rb").read()[:200])
  with pytest.raises(data_lib.DataError, match=rf"{bad_parquet}: not a readable Parquet file"):
    list(data_lib.iter_documents(str(bad_parquet)))
  with pytest.raises(data_lib.DataError, match=r"docs.parquet: no column 'body' \(columns: id, "
                     "text\\)"):
    list(data_lib.iter_documents(paths[".parquet"], text_key="body"))
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"text": "a"}\n{"text": \n')
  with pytest.raises(data_lib.DataError, match=rf"{broken}:2: invalid JSON"):
    list(data_lib.iter_documents(str(broken)))
  (tmp_path / "empty.jsonl").write_text(json.dumps({"text": " \n"}) + "\n")
  with pytest.raises(ValueError, match="contains no documents that are not empty"):
    prepare_lib.prepare(str(tmp_path / "empty.jsonl"), str(tmp_path / "s0"), "bytes", workers=1,
                        **SMALL)


def test_truncated_shard_stops_prepare_and_a_rerun_resumes(tmp_path):
  """A compressed file that ends early: a clear error, the committed documents kept, and once
  the file is whole again the rerun resumes and gives what an uninterrupted prepare gives."""
  docs = [d for d in _docs(40, 1500) if d]
  paths = _write_formats(tmp_path / "src", docs)
  zst = paths[".jsonl.zst"]
  whole = open(zst, "rb").read()
  reference = prepare_lib.prepare(zst, str(tmp_path / "ref"), "bytes", workers=1, batch_docs=2,
                                  **SMALL)
  with open(zst, "wb") as f:
    f.write(whole[:-100])
  out = str(tmp_path / "store")
  with pytest.raises(data_lib.DataError, match=rf"{zst}: truncated"):
    prepare_lib.prepare(zst, out, "bytes", workers=1, batch_docs=2, **SMALL)
  progress = store_lib.read_json(out, store_lib.PROGRESS)
  assert 0 < progress["documents"] < len(docs)  # committed before the error
  assert data_lib.is_token_store(out)
  with pytest.raises(store_lib.StoreError, match=rf"token store {out} is incomplete: `prepare` "
                     rf"stopped after {progress['documents']} documents"):
    data_lib.TokenStore(out)
  with open(zst, "wb") as f:
    f.write(whole)
  resumed = prepare_lib.prepare(zst, out, "bytes", workers=1, batch_docs=2, **SMALL)
  assert resumed["resumed_from_documents"] == progress["documents"]
  assert resumed["fingerprint"] == reference["fingerprint"]
  assert np.array_equal(_stream(out), _stream(tmp_path / "ref"))
  assert not os.path.exists(os.path.join(out, store_lib.PROGRESS))
  # Rerunning a finished prepare does nothing; other settings need --restart.
  assert prepare_lib.prepare(zst, out, "bytes", workers=1, batch_docs=2, **SMALL)[
      "already_complete"]
  with pytest.raises(store_lib.StoreError, match="other settings .*max_docs: None then, 3 now"):
    prepare_lib.prepare(zst, out, "bytes", workers=1, batch_docs=2, max_docs=3, **SMALL)
  again = prepare_lib.prepare(zst, out, "bytes", workers=1, batch_docs=2, max_docs=3,
                              restart=True, **SMALL)
  assert again["documents"] == 3


def test_prepare_killed_between_data_and_progress_resumes_exactly(tmp_path, monkeypatch):
  docs = [d for d in _docs(40, 1500) if d]
  src = _write_formats(tmp_path / "src", docs)[".jsonl"]
  reference = prepare_lib.prepare(src, str(tmp_path / "ref"), "bytes", workers=1, batch_docs=2,
                                  **SMALL)
  writes = {"n": 0}
  real_write = store_lib.write_json

  def dying_write(path, key, obj):
    if key == store_lib.PROGRESS:
      writes["n"] += 1
      if writes["n"] == 4:  # the arrays of commit 3 are written, its progress is not
        raise KeyboardInterrupt
    real_write(path, key, obj)

  monkeypatch.setattr(store_lib, "write_json", dying_write)
  out = str(tmp_path / "store")
  with pytest.raises(KeyboardInterrupt):
    prepare_lib.prepare(src, out, "bytes", workers=1, batch_docs=2, **SMALL)
  monkeypatch.setattr(store_lib, "write_json", real_write)
  committed = store_lib.read_json(out, store_lib.PROGRESS)
  tokens, _ = store_lib.open_arrays(out)
  assert tokens.shape[0] > committed["tokens"] > 0  # the arrays ran ahead of progress.json
  resumed = prepare_lib.prepare(src, out, "bytes", workers=1, batch_docs=2, **SMALL)
  assert resumed["resumed_from_documents"] == committed["documents"]
  assert resumed["fingerprint"] == reference["fingerprint"]
  assert np.array_equal(_stream(out), _stream(tmp_path / "ref"))
  # A source that changed under an interrupted prepare is caught, not silently mixed in.
  monkeypatch.setattr(store_lib, "write_json", dying_write)
  writes["n"] = 0
  out2 = str(tmp_path / "store2")
  with pytest.raises(KeyboardInterrupt):
    prepare_lib.prepare(src, out2, "bytes", workers=1, batch_docs=2, **SMALL)
  monkeypatch.setattr(store_lib, "write_json", real_write)
  lines = open(src).read().splitlines(keepends=True)
  with open(src, "w") as f:
    f.writelines([json.dumps({"text": "changed"}) + "\n"] + lines[1:])
  with pytest.raises(store_lib.StoreError, match="the source is not what the interrupted "
                     "prepare read.*--restart"):
    prepare_lib.prepare(src, out2, "bytes", workers=1, batch_docs=2, **SMALL)


def test_command_line(tmp_path, capsys):
  from pi_jax.data.__main__ import main
  out = str(tmp_path / "store")
  assert main(["prepare", "pg19_standin", out, "--tokenizer", "bytes", "--max-docs", "2",
               "--workers", "1", "--no-progress", "--json"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith(f"token store {out}: 2 documents, ")
  summary = json.loads(lines[-1])
  assert summary["documents"] == 2 and summary["workers"] == 1
  assert main(["info", out]) == 0
  assert json.loads(capsys.readouterr().out)["fingerprint"] == summary["fingerprint"]
  assert main(["prepare", str(tmp_path / "nothing*.jsonl"), str(tmp_path / "s2"), "--tokenizer",
               "bytes", "--no-progress"]) == 2
  assert "no such directory, file or glob match" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "s2")
  assert main(["info", str(tmp_path)]) == 2
  assert "is not a token store" in capsys.readouterr().err


@pytest.fixture(scope="module")
def book_store(tmp_path_factory):
  """The first 5 bundled books (what the tiny training tests read), in a byte-token store."""
  out = str(tmp_path_factory.mktemp("stores") / "books")
  prepare_lib.prepare("pg19_standin", out, "bytes", max_docs=5, workers=1,
                      shard_tokens=1 << 17, chunk_tokens=1 << 12, progress_bar=False,
                      log=lambda *a, **k: None)
  return out


def test_store_rows_are_the_packed_rows_and_damage_is_named(tmp_path, book_store):
  tok = ByteTokenizer()
  tokens = pipeline.tokenize_and_join("pg19_standin", tok, max_docs=5)
  store = data_lib.TokenStore(book_store)
  assert np.array_equal(store.tokens(0, store.num_tokens), tokens)
  for max_docs, seq_len in ((5, 64), (2, 100)):
    packed = pipeline.PackedSequences(
        pipeline.tokenize_and_join("pg19_standin", tok, max_docs=max_docs), seq_len, 3)
    stored = pipeline.StoreSequences(store, seq_len, 3, max_docs=max_docs)
    assert (stored.num_train, stored.num_eval) == (packed.num_train, packed.num_eval)
    rows = np.r_[0, 7, packed.num_train - 1, packed.num_train, packed.num_train + 2]
    assert np.array_equal(stored.rows(rows), packed.rows(rows))
  # A document spec that is a store says so; so does a damaged store, naming the file.
  with pytest.raises(ValueError, match="is a token store"):
    list(data_lib.iter_documents(book_store))
  damaged = str(tmp_path / "damaged")
  shutil.copytree(book_store, damaged)
  shard = os.path.join(damaged, "tokens", "c", "1")
  with open(shard, "r+b") as f:
    f.seek(8)  # inside the first inner chunk (the index is at the end)
    f.write(b"\0" * 64)
  store = data_lib.TokenStore(damaged)
  with pytest.raises(store_lib.StoreError, match=rf"token store {damaged}: cannot read "
                     rf"tokens\[131072:131172\]: .*{shard}"):
    store.slices([1 << 17], 100)
  os.truncate(os.path.join(damaged, "tokens", "c", "0"), 10)
  with pytest.raises(store_lib.StoreError, match=rf"{damaged}.*tokens/c/0"):
    store.slices([0], 100)


# --- the trainer on a store ----------------------------------------------------------------------

def _config(workdir, data, **kw):
  from pi_jax.config import ModelConfig
  from pi_jax.train import TrainConfig
  model = ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, max_position_embeddings=32, bos_token_id=256, eos_token_id=257)
  base = dict(workdir=str(workdir), model=model, data=data, max_docs=2, seq_len=32,
              global_batch=4, steps=4, learning_rate=1e-2, warmup_steps=2, checkpoint_every=2,
              keep_checkpoints=3, loss_chunk=32, tensorboard=False, eval_sequences=4,
              eval_every=2)
  base.update(kw)
  return TrainConfig(**base)


def _records(workdir):
  keys = ("step", "loss", "grad_norm", "after_steps", "eval_loss")
  path = os.path.join(str(workdir), "metrics.jsonl")
  return [{k: r[k] for k in keys if k in r} for r in map(json.loads, open(path))]


def test_a_run_on_a_store_is_the_run_on_its_documents(tmp_path, book_store):
  """Same losses, eval losses and gradient norms step for step; the store's max_docs cut (5
  documents in the store, max_docs=2) is the documents' one. A resume on another store, or on
  a store of another tokenizer, is refused."""
  from pi_jax.train import Trainer
  Trainer(_config(tmp_path / "text", "pg19_standin")).run()
  Trainer(_config(tmp_path / "store", book_store)).run()
  text, store = _records(tmp_path / "text"), _records(tmp_path / "store")
  assert text == store and len(store) == 7  # 4 steps, eval after 0, 2 and 4 steps
  assert store[-2]["loss"] < store[1]["loss"] and store[-1]["eval_loss"] < store[0]["eval_loss"]
  meta = json.load(open(tmp_path / "store" / "checkpoints" / "4" / "data" / "metadata"))
  assert meta["data_store"]["fingerprint"] == data_lib.TokenStore(book_store).fingerprint

  other = str(tmp_path / "other")  # other documents, same tokenizer
  prepare_lib.prepare(data_lib.BUNDLED["proofpile_standin"], other, "bytes", max_docs=2,
                      workers=1, progress_bar=False, log=lambda *a, **k: None)
  with pytest.raises(ValueError, match=r"checkpoint 4 was trained on token store .*books .*"
                     "this run reads .*other .*it was made from other documents"):
    Trainer(_config(tmp_path / "store", other, steps=6))
  with pytest.raises(ValueError, match="checkpoint 4 was trained on token store .*books, this "
                     "run reads a spec of documents; resume on the store"):
    Trainer(_config(tmp_path / "store", "pg19_standin", steps=6))
  no_bos = tmp_path / "no_bos"  # a tokenizer that encodes differently (no BOS)
  ByteTokenizer(add_bos=False).save(str(no_bos / "tokenizer"))
  other_tok = str(tmp_path / "other_tok")
  prepare_lib.prepare("pg19_standin", other_tok, str(no_bos), max_docs=2, workers=1,
                      progress_bar=False, log=lambda *a, **k: None)
  with pytest.raises(store_lib.StoreError, match=rf"token store {other_tok} was made with another "
                     r"tokenizer than this run's \(the byte tokenizer of a random init\).*"
                     "prepare the store again with --tokenizer bytes"):
    Trainer(_config(tmp_path / "fresh", other_tok))


def test_sigkill_and_resume_on_a_store_match_the_documents_run(tmp_path, book_store):
  """train.py on the store, SIGKILLed after checkpoint 10 and rerun, gives the losses of an
  uninterrupted train.py run on the documents themselves, exactly."""
  from tests.test_train_distributed import SETS, _wrapper
  tu.run_train(tmp_path / "text", SETS, timeout=900)
  want = tu.losses(tmp_path / "text")
  workdir = tmp_path / "store"
  cmd = tu.train_cmd(workdir, SETS + [f"data={book_store}"])
  killed = subprocess.run([sys.executable, "-c", _wrapper(10), *cmd[1:]],
                          env=tu.subprocess_env(1), cwd=tu.REPO, capture_output=True, text=True,
                          timeout=900)
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]
  tu.run_train(workdir, SETS + [f"data={book_store}"], timeout=900)
  got = tu.losses(workdir)
  assert sorted(got) == sorted(want) == list(range(20))
  assert [got[k] for k in range(20)] == [want[k] for k in range(20)]
  assert want[19] < want[0] - 0.1


TWO_PROCESSES = r"""
import json, os, sys
import jax
pid, port, store_path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
import numpy as np
from jax.experimental import multihost_utils
from pi_jax import data as data_lib
from pi_jax import sharding as sharding_lib
from pi_jax.train import pipeline
store = data_lib.TokenStore(store_path)
reads = []
real_slices = store.slices
def slices(starts, length):
  reads.extend(int(s) for s in starts)
  return real_slices(starts, length)
store.slices = slices
data = pipeline.TrainData(pipeline.StoreSequences(store, 64, 0), global_batch=8, seed=3)
mesh = sharding_lib.make_mesh("data:2,fsdp:2")
shape = (8, 65)
sharding = sharding_lib.named_sharding(mesh, ("batch", None), shape)
result = {"process": jax.process_index(), "steps": []}
for step in (0, 5, 1000):
  reads.clear()
  rows = pipeline.process_rows(sharding, shape)
  batch = pipeline.global_batch_array(lambda r: data.train_batch(step, r), shape, sharding)
  full = multihost_utils.process_allgather(batch, tiled=True)
  result["steps"].append({"step": step, "rows": [rows.start, rows.stop], "reads": list(reads),
                          "global": np.asarray(full).tolist()})
json.dump(result, open(out, "w"))
"""


def test_two_processes_read_disjoint_rows_that_form_the_global_batch(tmp_path, book_store):
  from tests.test_train_distributed import _free_port
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(pid), str(port), book_store,
                             str(tmp_path / f"p{pid}.json")], env=tu.subprocess_env(2),
                            cwd=tu.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for pid in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  results = [json.load(open(tmp_path / f"p{pid}.json")) for pid in range(2)]
  data = pipeline.TrainData(pipeline.StoreSequences(data_lib.TokenStore(book_store), 64, 0), 8, 3)
  for i, step in enumerate((0, 5, 1000)):
    a, b = (r["steps"][i] for r in results)
    assert sorted([a["rows"], b["rows"]]) == [[0, 4], [4, 8]]  # disjoint halves
    for r in (a, b):
      rows = slice(*r["rows"])
      # Each process read exactly the rows it holds, nothing else.
      assert r["reads"] == (data.sampler.row_indices(step, rows) * 64).tolist()
      assert np.array_equal(r["global"], data.train_batch(step, slice(None)))


# --- a store verifies what it reads; prepare writes only among its own files (issue 29) ---------

def test_a_missing_or_altered_shard_is_an_error_never_zeros(tmp_path, book_store, capsys):
  from pi_jax.data.__main__ import main
  damaged = str(tmp_path / "missing")
  shutil.copytree(book_store, damaged)
  os.remove(os.path.join(damaged, "tokens", "c", "1"))
  with pytest.raises(store_lib.StoreError, match=rf"token store {damaged}: shard file tokens/c/1 "
                     r"is missing \(the store needs 2\)"):
    data_lib.TokenStore(damaged)
  assert main(["info", damaged]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "tokens/c/1 is missing" in err[0]
  # A shard that goes missing after the store was opened: the read fails, it does not give zeros.
  shutil.rmtree(damaged)
  shutil.copytree(book_store, damaged)
  store = data_lib.TokenStore(damaged)
  os.remove(os.path.join(damaged, "tokens", "c", "1"))
  with pytest.raises(store_lib.StoreError, match=r"cannot read tokens\[131072:131172\].*missing"):
    store.slices([1 << 17], 100)
  # Tokens rewritten with valid chunk checksums (another store's shard, a bad tool): only the
  # stored token checksum sees it; `info --verify` recomputes it.
  altered = str(tmp_path / "altered")
  shutil.copytree(book_store, altered)
  assert data_lib.TokenStore(altered).verify() is None
  assert main(["info", "--verify", altered]) == 0
  assert "checksum matches" in capsys.readouterr().err
  tokens, _ = store_lib.open_arrays(altered, read_only=False)
  value = int(tokens[1000:1001].read().result()[0])
  tokens[1000:1001].write(np.asarray([(value + 1) % 256], tokens.dtype.numpy_dtype)).result()
  with pytest.raises(store_lib.StoreError, match=rf"token store {altered}: the tokens' checksum "
                     r"is .* the tokens were altered"):
    data_lib.TokenStore(altered).verify()
  assert main(["info", "--verify", altered]) == 2
  assert "the tokens were altered" in capsys.readouterr().err


def test_prepare_writes_only_among_files_it_created(tmp_path):
  from tests.test_bad_input import md5_tree
  docs = tmp_path / "docs"
  docs.mkdir()
  (docs / "a.txt").write_text("one document " * 50)
  user = tmp_path / "mine"
  (user / "documents").mkdir(parents=True)
  (user / "documents" / "letter.txt").write_text("my letter")
  (user / "tokens").mkdir()
  (user / "tokens" / "keep.bin").write_bytes(b"\1\2\3")
  a_file = tmp_path / "notes.txt"
  a_file.write_text("notes")
  before = md5_tree(tmp_path)
  cases = [(str(user), rf"OUT {user} already holds files that are not a token store "
                       r"\(documents, tokens\)"),
           (str(docs), rf"OUT {docs} is the input {docs} itself"),
           (str(docs / "store"), rf"OUT {docs / 'store'} lies inside the input {docs}"),
           (str(a_file), rf"OUT {a_file} is a file, not a folder")]
  for out, message in cases:
    for restart in (False, True):
      with pytest.raises(ValueError, match=message):
        prepare_lib.prepare(str(docs), out, "bytes", workers=1, restart=restart, **SMALL)
  assert md5_tree(tmp_path) == before
  assert sorted(os.listdir(docs)) == ["a.txt"]
  # Its own store, complete or interrupted, it may resume or replace.
  store = str(tmp_path / "store")
  prepare_lib.prepare(str(docs), store, "bytes", workers=1, **SMALL)
  prepare_lib.prepare(str(docs), store, "bytes", workers=1, restart=True, **SMALL)
  assert data_lib.TokenStore(store).num_documents == 1


def test_files_that_are_not_text_are_refused_and_undecodable_bytes_counted(tmp_path, capsys):
  from pi_jax.data.__main__ import main
  folder = tmp_path / "in"
  folder.mkdir()
  (folder / "a.txt").write_text("plain text " * 20)
  (folder / "b.txt.bz2").write_bytes(b"BZh91AY&SY" + bytes(range(200)))
  with pytest.raises(data_lib.DataError, match=rf"{folder / 'b.txt.bz2'}: a compressed or "
                     r"archive file, not text"):
    prepare_lib.prepare(str(folder / "*"), str(tmp_path / "s1"), "bytes", workers=1, **SMALL)
  os.remove(folder / "b.txt.bz2")
  (folder / "c.bin").write_bytes(b"\x7fELF\x02\x01\x01\0\0\0" + bytes(range(256)))
  with pytest.raises(data_lib.DataError, match=rf"{folder / 'c.bin'}: a binary file \(NUL bytes\)"):
    prepare_lib.prepare(str(folder / "*"), str(tmp_path / "s1"), "bytes", workers=1, **SMALL)
  assert not os.path.exists(tmp_path / "s1")
  os.remove(folder / "c.bin")
  (folder / "d.txt").write_bytes("caf\u00e9 na\u00efve ".encode("latin-1") * 10)
  lines = []
  summary = prepare_lib.prepare(str(folder / "*"), str(tmp_path / "s2"), "bytes", workers=1,
                                **{**SMALL, "log": lines.append})
  assert summary["undecodable"] == {"documents": 1, "bytes": 20, "examples": ["d.txt"]}
  assert "warning: 20 bytes in 1 documents are not UTF-8" in lines[-1]
  assert data_lib.TokenStore(str(tmp_path / "s2")).meta["undecodable"]["bytes"] == 20
  # Elsewhere (evaluation reads documents too) the same file is a warning line.
  list(data_lib.iter_documents(str(folder / "d.txt")))
  assert "warning: d.txt: 20 bytes are not UTF-8" in capsys.readouterr().err
  assert main(["prepare", str(folder), str(tmp_path / "s3"), "--tokenizer", "bytes",
               "--max-docs", "0", "--no-progress"]) == 2
  assert "--max-docs 0: a store needs at least one document" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "s3")


def test_a_shard_damaged_under_a_run_stops_it_in_one_line(tmp_path, book_store):
  damaged = str(tmp_path / "damaged")
  shutil.copytree(book_store, damaged)
  for shard in glob.glob(os.path.join(damaged, "tokens", "c", "*")):
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:  # every chunk's bytes, not the index at the end
      f.write(b"\1" * (size // 2))
  r = tu.run_train(tmp_path / "run", ["steps=2", f"data={damaged}", "eval_every=0",
                                      "eval_sequences=0", "tensorboard=false"], check=False)
  assert r.returncode in (1, 2), r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
  assert f"token store {damaged}: cannot read tokens[" in lines[0], r.stderr
