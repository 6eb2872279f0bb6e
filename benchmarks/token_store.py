"""Token store at scale: prepare throughput, trainer start-up, random row reads.

  python -m benchmarks.token_store [--tokens 200000000] [--workers N] [--out FILE]

1. Writes a synthetic corpus (Zipf-distributed pseudo-words, documents of log-normal length)
   as .jsonl.zst shards, and a 32K-vocabulary byte-level BPE tokenizer trained on a sample.
2. Tokenizes it twice in this run: the baseline (one process: read the documents and run the
   Rust `tokenizers` batch encoder, which has its own threads; nothing written) and
   `prepare` (worker processes, writing the store). Reports tokens/s of both.
3. Trainer start-up (open the data, build the Trainer, build the first batch) and peak RSS, each
   in a fresh process, for the full store and for a ~1M-token store of the same corpus.
4. Random-batch reads of 64 rows of 32K+1 tokens against the rows/s a 64 x 32K step of LLaMA 7B
   needs (FLOPs from pi_jax.train.metrics; devices, peak and MFU from the options).

Every timed part records the 1-minute load average before and after; a part that began with a
load average above --quiet-load per core, or ended with one above what this benchmark itself
adds (its process count) plus that, is marked noisy: its time is not a measurement of this code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import REPO as ROOT


class Part:
  """A timed part: seconds, load average before and after, noisy or not."""

  def __init__(self, name: str, quiet_load: float, own_processes: int):
    self.name, self.quiet, self.own = name, quiet_load, own_processes

  def __enter__(self):
    self.load_before = os.getloadavg()[0]
    self.t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.t0
    self.load_after = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    self.noisy = (self.load_before > self.quiet * cores
                  or self.load_after > self.own + self.quiet * cores)
    return False

  def record(self, **values) -> dict:
    return {"seconds": self.seconds, "load_before": round(self.load_before, 2),
            "load_after": round(self.load_after, 2), "noisy": self.noisy, **values}


# --- the corpus ---------------------------------------------------------------------------------

def _vocabulary(rng, n_words: int = 50_000) -> np.ndarray:
  letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
  weights = 1.0 / np.arange(1, 27)
  weights /= weights.sum()
  lengths = np.clip(rng.poisson(5, n_words), 1, 14)
  return np.array([bytes(rng.choice(letters, size=k, p=weights)).decode() for k in lengths])


def _text(rng, words: np.ndarray, cdf: np.ndarray, n_words: int) -> str:
  idx = np.searchsorted(cdf, rng.random(n_words))
  out = words[idx]
  # Sentences: a capital and a full stop every ~15 words, a paragraph every ~8 sentences.
  ends = rng.random(n_words) < 1 / 15
  out = np.where(ends, np.char.add(out, "."), out)
  paragraphs = ends & (rng.random(n_words) < 1 / 8)
  return " ".join(np.where(paragraphs, np.char.add(out, "\n\n"), out).tolist())


def _zipf_cdf(n: int) -> np.ndarray:
  p = 1.0 / np.arange(1, n + 1) ** 1.1
  return np.cumsum(p / p.sum())


def write_corpus(folder: str, total_chars: int, words: np.ndarray, rng,
                 shard_chars: int = 64 << 20):
  """jsonl.zst shards of synthetic documents over `words`, total_chars characters in all."""
  import zstandard
  cdf = _zipf_cdf(len(words))
  os.makedirs(folder, exist_ok=True)
  written, shard, docs = 0, 0, 0
  while written < total_chars:
    path = os.path.join(folder, f"part-{shard:05d}.jsonl.zst")
    with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as f:
      in_shard = 0
      while in_shard < shard_chars and written < total_chars:
        n_words = int(min(rng.lognormal(7.5, 1.0), 200_000)) + 1  # median ~1800 words
        text = _text(rng, words, cdf, n_words)
        f.write((json.dumps({"text": text}) + "\n").encode())
        in_shard += len(text)
        written += len(text)
        docs += 1
    shard += 1
  return docs, written


def train_tokenizer(folder: str, sample: str, vocab: int = 32000) -> str:
  """A byte-level BPE tokenizer.json (LLaMA-sized vocabulary) with BOS/EOS; returns folder."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator([sample[i:i + 100_000] for i in range(0, len(sample), 100_000)],
                          trainer)
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "add_bos_token": True}, f)
  return folder


def tiny_checkpoint(folder: str, tokenizer_folder: str, vocab: int) -> str:
  """A small random model whose tokenizer is the benchmark's (the trainer's init_checkpoint)."""
  import jax
  from pi_jax import init_params, save_checkpoint
  from pi_jax.config import ModelConfig
  config = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=1,
                       num_heads=2, max_position_embeddings=32768, bos_token_id=1,
                       eos_token_id=2)
  params = init_params(config, jax.random.key(0))
  files = {f"tokenizer/{n}": os.path.join(tokenizer_folder, n)
           for n in ("tokenizer.json", "tokenizer_config.json")}
  save_checkpoint(folder, config, params, force=True, extra_files=files)
  return folder


# --- the parts ----------------------------------------------------------------------------------

def baseline(spec: str, tokenizer_folder: str, batch_docs: int = 256) -> tuple[int, int]:
  """(documents, tokens): one process reads the documents and runs encode_batch on them."""
  from pi_jax.data import iter_documents
  from pi_jax.data.prepare import encode_documents
  from pi_jax.tokenizer import load_tokenizer
  tok = load_tokenizer(tokenizer_folder)
  docs = tokens = 0
  batch = []
  for _, text in iter_documents(spec):
    batch.append(text)
    if len(batch) == batch_docs:
      tokens += len(encode_documents(tok, batch, np.uint16)[0])
      docs += len(batch)
      batch = []
  if batch:
    tokens += len(encode_documents(tok, batch, np.uint16)[0])
    docs += len(batch)
  return docs, tokens


_STARTUP = r"""
import json, os, resource, sys, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
t0 = time.perf_counter()
from pi_jax.train import Trainer, TrainConfig, pipeline
from pi_jax.tokenizer import load_tokenizer
imported = time.perf_counter()
store, ckpt, workdir = sys.argv[1:4]
config = TrainConfig(workdir=workdir, init_checkpoint=ckpt, data=store, seq_len=32768,
                     global_batch=8, steps=1, loss_chunk=1024, tensorboard=False,
                     async_checkpoints=False)
t1 = time.perf_counter()
tok = load_tokenizer(ckpt)
data = pipeline.load_train_data(config, tok, tok.vocab_size)
data.train_batch(0, slice(None))
t2 = time.perf_counter()
rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
trainer = Trainer(config)
batch = trainer._batch(0)
t3 = time.perf_counter()
print(json.dumps({"import_seconds": imported - t0, "data_open_and_first_batch_seconds": t2 - t1,
                  "trainer_and_first_batch_seconds": t3 - t2,
                  "peak_rss_after_data": rss_data,
                  "peak_rss_after_trainer": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "train_rows": data.packed.num_train}))
"""


def startup(store: str, ckpt: str, workdir: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  shutil.rmtree(workdir, ignore_errors=True)
  r = subprocess.run([sys.executable, "-c", _STARTUP, store, ckpt, workdir], capture_output=True,
                     text=True, env=env, cwd=ROOT)
  if r.returncode:
    raise RuntimeError(f"trainer start-up on {store} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def random_reads(store_path: str, seq_len: int, batch: int, steps: int) -> dict:
  from pi_jax.data import TokenStore
  from pi_jax.train import pipeline
  data = pipeline.TrainData(pipeline.StoreSequences(TokenStore(store_path), seq_len), batch, 0)
  data.train_batch(0, slice(None))  # opened and warm (metadata), as in a running trainer
  t0 = time.perf_counter()
  for step in range(1, steps + 1):
    rows = data.train_batch(step, slice(None))
  seconds = time.perf_counter() - t0
  assert rows.shape == (batch, seq_len + 1)
  return {"rows": batch * steps, "seconds": seconds, "rows_per_second": batch * steps / seconds,
          "tokens_per_second": batch * steps * (seq_len + 1) / seconds}


def step_need(seq_len: int, batch: int, devices: int, tflops: float, mfu: float) -> dict:
  from pi_jax.presets import preset
  from pi_jax.train.metrics import flops_per_token
  flops = flops_per_token(preset("llama-7b"), seq_len) * seq_len * batch
  step_seconds = flops / (devices * tflops * 1e12 * mfu)
  return {"model": "llama-7b", "seq_len": seq_len, "global_batch": batch, "devices": devices,
          "device_tflops": tflops, "mfu": mfu, "step_seconds": step_seconds,
          "rows_per_second": batch / step_seconds}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=200_000_000,
                      help="corpus size in tokens (approximately; default 200M)")
  parser.add_argument("--small-tokens", type=int, default=1_000_000,
                      help="the small store the start-up is compared with")
  parser.add_argument("--workers", type=int, default=None, help="prepare's processes (default: cores)")
  parser.add_argument("--workdir", default=None, help="where the corpus and stores go (default: a "
                      "temporary folder, removed after)")
  parser.add_argument("--read-steps", type=int, default=20,
                      help="random batches read per store to time the reads")
  parser.add_argument("--devices", type=int, default=128, help="devices of the 64 x 32K step")
  parser.add_argument("--device-tflops", type=float, default=312.0,
                      help="peak bf16 TFLOP/s per device (A100: 312)")
  parser.add_argument("--mfu", type=float, default=0.5,
                      help="model FLOPs utilization assumed for the step the reads must keep "
                      "up with")
  parser.add_argument("--quiet-load", type=float, default=0.25,
                      help="load average per core above which a part is marked noisy")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)

  from pi_jax.data import TokenStore
  from pi_jax.data import prepare as prepare_lib
  cores = len(os.sched_getaffinity(0))
  workers = args.workers or cores
  workdir = args.workdir or tempfile.mkdtemp(prefix="token_store_bench_")
  os.makedirs(workdir, exist_ok=True)
  result = {"cores": cores, "workers": workers, "target_tokens": args.tokens,
            "load_at_start": os.getloadavg()}
  try:
    rng = np.random.default_rng(0)
    vocab = _vocabulary(rng)  # the tokenizer's sample and the corpus share their words
    sample = _text(rng, vocab, _zipf_cdf(len(vocab)), 600_000)
    tok_dir = train_tokenizer(os.path.join(workdir, "tokenizer"), sample)
    from pi_jax.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    chars_per_token = len(sample) / len(tok.encode(sample, add_bos=False))
    corpus = os.path.join(workdir, "corpus")
    shutil.rmtree(corpus, ignore_errors=True)
    t0 = time.perf_counter()
    docs, chars = write_corpus(corpus, int(args.tokens * chars_per_token), vocab, rng)
    result["corpus"] = {"documents": docs, "chars": chars, "chars_per_token": chars_per_token,
                        "write_seconds": time.perf_counter() - t0,
                        "compressed_bytes": sum(os.path.getsize(os.path.join(corpus, f))
                                                for f in os.listdir(corpus))}
    print(f"corpus: {docs:,} documents, {chars:,} chars ({chars_per_token:.2f} chars/token)",
          flush=True)
    spec = os.path.join(corpus, "*.jsonl.zst")

    with Part("baseline", args.quiet_load, 1) as part:
      base_docs, base_tokens = baseline(spec, tok_dir)
    result["baseline_single_process"] = part.record(
        documents=base_docs, tokens=base_tokens, tokens_per_second=base_tokens / part.seconds)
    print(f"baseline (1 process, encode_batch): {base_tokens / part.seconds:,.0f} tokens/s",
          flush=True)

    big = os.path.join(workdir, "store")
    with Part("prepare", args.quiet_load, workers + 1) as part:
      summary = prepare_lib.prepare(spec, big, tok_dir, workers=workers, restart=True,
                                    progress_bar=False)
    assert summary["tokens"] == base_tokens, (summary["tokens"], base_tokens)
    result["prepare"] = part.record(
        documents=summary["documents"], tokens=summary["tokens"], workers=workers,
        tokens_per_second=summary["tokens"] / part.seconds, disk_bytes=summary["disk_bytes"],
        speedup_over_baseline=(summary["tokens"] / part.seconds)
        / result["baseline_single_process"]["tokens_per_second"])

    store = TokenStore(big)
    offsets = store.document_offsets(0, store.num_documents + 1)
    small_docs = int(np.searchsorted(offsets, args.small_tokens)) or 1
    small = os.path.join(workdir, "store_small")
    prepare_lib.prepare(spec, small, tok_dir, workers=workers, max_docs=small_docs, restart=True,
                        progress_bar=False, log=lambda *a, **k: None)

    ckpt = tiny_checkpoint(os.path.join(workdir, "ckpt"), tok_dir, tok.vocab_size)
    result["startup"] = {}
    for name, path in (("full", big), ("small", small)):
      with Part("startup-" + name, args.quiet_load, 1) as part:
        measured = startup(path, ckpt, os.path.join(workdir, "run_" + name))
      result["startup"][name] = part.record(tokens=TokenStore(path).num_tokens, **measured)
    full, little = result["startup"]["full"], result["startup"]["small"]
    result["startup"]["rss_ratio_full_over_small"] = (full["peak_rss_after_trainer"]
                                                      / little["peak_rss_after_trainer"])
    result["startup"]["data_seconds_ratio_full_over_small"] = (
        full["data_open_and_first_batch_seconds"] / little["data_open_and_first_batch_seconds"])

    seq_len, batch = 32768, 64
    if store.num_tokens > 2 * seq_len + 1:  # the sampler wraps: a small store repeats rows
      with Part("reads", args.quiet_load, 1) as part:
        reads = random_reads(big, seq_len, batch, args.read_steps)
      result["random_reads"] = part.record(**reads)
      need = step_need(seq_len, batch, args.devices, args.device_tflops, args.mfu)
      result["step_need"] = need
      result["random_reads"]["margin_over_need"] = reads["rows_per_second"] / need["rows_per_second"]
    else:
      result["random_reads"] = {"skipped": f"the store has fewer than 2 rows of {seq_len}"}
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  result["peak_rss_benchmark_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  result["noisy"] = any(v.get("noisy") for v in _parts(result))
  text = json.dumps(result, indent=1, default=float)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0


def _parts(result: dict):
  for key in ("baseline_single_process", "prepare", "random_reads"):
    if isinstance(result.get(key), dict):
      yield result[key]
  for key in ("full", "small"):
    if key in result.get("startup", {}):
      yield result["startup"][key]


if __name__ == "__main__":
  sys.exit(main())
