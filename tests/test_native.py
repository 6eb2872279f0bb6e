"""The native CPU kernels (pi_jax.native): built here, equal to brute force in values and
gradients, chosen by `auto` where they apply, and a clear error where they cannot build."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pi_jax import attention as attn_lib
from pi_jax import dispatch, linear, native
from pi_jax.run import RunOptions
from pi_jax.config import ModelConfig
from pi_jax import model as model_lib
from tests.conftest import rel_err
from tests.train_utils import check_sharded_attention


# The native kernels are an optional extra (pi_jax[cpu]: scipy-openblas32, and g++ on PATH);
# without them these tests skip with the reason and the XLA paths serve.
needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernels unavailable: {native.unavailable_reason()}")


def test_the_kernels_build_here():
  """`make test` installs the CPU extra and sets PI_JAX_NATIVE_REQUIRED=1: a missing install step
  fails here instead of silently running the slower XLA paths."""
  if os.environ.get("PI_JAX_NATIVE_REQUIRED") != "1" and not native.available():
    pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
  assert native.available(), native.unavailable_reason()


def _qkv(b, l, n, kh, h, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, l, n, h), dtype)
  k, v = (jax.random.normal(x, (b, l, kh, h), dtype) for x in ks[1:3])
  w = jax.random.normal(ks[3], (b, l, n, h), jnp.float32)  # output cotangent
  return q, k, v, w


# (batch, length, query heads, kv heads, tile): GQA groups 1, 3 and 4; lengths a multiple of
# the tile, not a multiple (a short last block), shorter than one tile, and one position.
CASES = [(2, 96, 4, 4, 32), (1, 300, 6, 2, 64), (2, 40, 4, 1, 256), (1, 1, 3, 1, 16)]


@needs_native
@pytest.mark.parametrize("b,l,n,kh,tile", CASES, ids=["gqa1", "gqa3-ragged", "short", "one"])
def test_cpu_flash_equals_reference_with_gradients(b, l, n, kh, tile):
  q, k, v, w = _qkv(b, l, n, kh, 16)

  def run(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(w.astype(out.dtype))

  got, got_grads = jax.jit(lambda: run(lambda q, k, v: attn_lib.attention(
      q, k, v, impl="cpu_flash", block_size=tile)))()
  want, want_grads = run(attn_lib.reference_attention)
  assert rel_err(got, want) < 1e-5
  for g, gw in zip(got_grads, want_grads):  # at one position dq and dk are exactly 0
    np.testing.assert_allclose(g, gw, atol=1e-4 * max(1.0, float(jnp.max(jnp.abs(gw)))))


@needs_native
def test_log_sum_exp_is_the_scores_own():
  """The kernel's second output, which the backward reads, against the dense scores."""
  q, k, v, _ = _qkv(2, 200, 6, 2, 16, seed=1)
  _, lse_BNL = native.causal_attention(q, k, v, block_size=64)
  s = jnp.einsum("BLNH,BSNH->BNLS", q, jnp.repeat(k, 3, axis=2)) / 4.0
  s = jnp.where(jnp.tril(jnp.ones((200, 200), bool)), s, -jnp.inf)
  assert float(jnp.max(jnp.abs(lse_BNL - jax.nn.logsumexp(s, axis=-1)))) < 1e-5


@needs_native
def test_bfloat16_inputs_compute_in_float32_and_return_bfloat16():
  q, k, v, _ = _qkv(1, 64, 4, 2, 16, dtype=jnp.bfloat16)
  out = attn_lib.attention(q, k, v, impl="cpu_flash", block_size=32)
  assert out.dtype == jnp.bfloat16
  want = attn_lib.reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  assert rel_err(out, want) < 1e-2


@needs_native
def test_auto_takes_the_native_kernel_for_float32_on_the_cpu():
  assert dispatch.choose(RunOptions()).attention == "cpu_flash"
  assert dispatch.choose(RunOptions(compute_dtype="bfloat16")).attention == "xla_blockwise"
  q, k, v, _ = _qkv(1, 64, 4, 2, 16)
  text = jax.jit(dispatch.choose().attend).lower(q, k, v).as_text()
  assert "pi_causal_attention" in text


@needs_native
@pytest.mark.parametrize("m,k,n,transpose_w", [
    (8192 // 64, 576, 1536, False),   # rows split over the workers
    (64, 48, 4096, True),            # columns split (a loss chunk against the vocabulary)
    (64, 48, 4096, False),
    (5, 7, 3, False),                # fewer rows and columns than one worker's 16
    (33, 20, 17, True),              # 33 rows over two workers: 32 + 1
    (3, 8, 33, False),               # 33 columns over two workers
])
def test_matmul_equals_numpy(m, k, n, transpose_w):
  rng = np.random.default_rng(m + n)
  x = rng.standard_normal((m, k), np.float32)
  w = rng.standard_normal((n, k) if transpose_w else (k, n), np.float32)
  got = jax.jit(lambda x, w: native.matmul(x, w, transpose_w=transpose_w))(x, w)
  want = x.astype(np.float64) @ (w.T if transpose_w else w).astype(np.float64)
  assert rel_err(got, want) < 1e-5


@needs_native
@pytest.mark.parametrize("spec,x_shape,w_shape,kw", [
    ("BLD,DNH->BLNH", (2, 9, 12), (12, 3, 4), {}),
    ("BLNH,NHD->BLD", (2, 9, 3, 4), (3, 4, 12), {"contract": 2}),
    ("BLD,VD->BLV", (2, 9, 12), (50, 12), {"transpose_w": True}),
])
def test_project_equals_einsum_with_gradients(spec, x_shape, w_shape, kw):
  kx, kw_ = jax.random.split(jax.random.key(2))
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw_, w_shape)
  assert dispatch.choose().native_matmul
  kw = dict(kw, native=True)
  loss = lambda f: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1)))
  got, got_grads = loss(lambda x, w: linear.project(x, w, **kw))(x, w)
  want, want_grads = loss(lambda x, w: jnp.einsum(spec, x, w))(x, w)
  assert abs(float(got - want)) < 1e-4 * abs(float(want)) + 1e-4
  for g, gw in zip(got_grads, want_grads):
    assert rel_err(g, gw) < 1e-5
  text = jax.jit(lambda x, w: linear.project(x, w, **kw)).lower(x, w).as_text()
  assert "pi_matmul" in text
  assert "pi_matmul" not in jax.jit(lambda x, w: linear.project(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), **kw)).lower(x, w).as_text()


def test_project_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"do not contract over 1 dims"):
    linear.project(jnp.ones((2, 5)), jnp.ones((4, 3)))


@needs_native
def test_model_logits_with_native_kernels_equal_the_xla_paths(monkeypatch):
  """The whole forward (native projections and cpu_flash) against XLA's dot and the dense
  reference attention (bfloat16 weights would take XLA's path; float32 here)."""
  config = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2,
                       num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
  params = model_lib.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 100), 0, 97)
  got = jax.jit(lambda p, t: model_lib.forward(config, p, t))(params, tokens)
  text = jax.jit(lambda p, t: model_lib.forward(config, p, t)).lower(params, tokens).as_text()
  assert "pi_matmul" in text and "pi_causal_attention" in text
  ref = RunOptions(attention_impl="reference", native="off")  # XLA's dot_general
  want = jax.jit(lambda p, t: model_lib.forward(config, p, t, run=ref))(params, tokens)
  assert "pi_" not in jax.jit(lambda p, t: model_lib.forward(config, p, t, run=ref)).lower(
      params, tokens).as_text()
  assert rel_err(got, want) < 1e-5


def test_unavailable_kernels_fall_back_and_explicit_use_says_why(monkeypatch):
  monkeypatch.setattr(native, "_load", lambda: (False, "no C++ compiler (g++, or $CXX) on PATH"))
  assert dispatch.choose().attention == "xla_blockwise"
  assert not dispatch.choose().native_matmul
  q, k, v, _ = _qkv(1, 16, 2, 1, 8)
  with pytest.raises(ValueError, match=r"'cpu_flash' is unavailable: no C\+\+ compiler"):
    attn_lib.attention(q, k, v, impl="cpu_flash")
  with pytest.raises(ValueError, match=r"'cpu_flash' is unavailable: no C\+\+ compiler"):
    dispatch.choose(RunOptions(attention_impl="cpu_flash"))


def test_a_failed_build_names_the_compiler_problem(monkeypatch, tmp_path):
  pytest.importorskip("scipy_openblas32", exc_type=ImportError)  # else the build stops there
  monkeypatch.setenv("PI_JAX_NATIVE_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler-for-pi-jax")
  with pytest.raises(RuntimeError, match=r"no C\+\+ compiler"):
    native._build()
  assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


@needs_native
def test_cpu_flash_sharded_on_eight_devices():
  check_sharded_attention("lambda q, k, v: attn_lib.attention(q, k, v, impl='cpu_flash', "
                          "block_size=64)", length=200, head_dim=16, grad_tol=1e-4,
                          # XLA cannot partition the FFI matmul: projections take XLA's dot
                          inside_mesh="assert not dispatch.choose().native_matmul")


@needs_native
def test_nll_terms_equal_xla_with_gradients(monkeypatch):
  from pi_jax import loss as loss_lib
  logits = jax.random.normal(jax.random.key(3), (2, 7, 300)) * 4
  targets = jax.random.randint(jax.random.key(4), (2, 7), 0, 300)
  def terms(l, native_kernel):
    logz, picked = loss_lib.logsumexp_and_target(l, targets, native_kernel)
    return jnp.sum(jnp.sin(logz) + jnp.cos(picked))

  got, got_grad = jax.jit(jax.value_and_grad(lambda l: terms(l, True)))(logits)
  assert "pi_logsumexp_pick" in jax.jit(lambda l: terms(l, True)).lower(logits).as_text()
  want, want_grad = jax.jit(jax.value_and_grad(lambda l: terms(l, False)))(logits)
  assert "pi_logsumexp_pick" not in jax.jit(lambda l: terms(l, False)).lower(logits).as_text()
  assert abs(float(got - want)) < 1e-4
  assert rel_err(got_grad, want_grad) < 1e-5


@needs_native
def test_logsumexp_over_a_whole_vocabulary_is_float32_exact():
  """A [64, 49152] row (SmolLM2's vocabulary) against float64: a float32 sum ~6K terms deep per
  AVX2 lane was 6e-6 off (harness log-likelihoods 3e-5 off lm-eval's hf); summed in slices, the
  error is float32's own."""
  logits = np.random.default_rng(0).standard_normal((64, 49152)).astype(np.float32) * 3
  targets = np.arange(64, dtype=np.int32) * 700
  logz, picked = native.logsumexp_pick(jnp.asarray(logits), jnp.asarray(targets))
  x = logits.astype(np.float64)
  want = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
  assert np.max(np.abs(np.asarray(logz, np.float64) - want) / np.abs(want)) < 3e-7
  np.testing.assert_array_equal(picked, logits[np.arange(64), targets])


# --- the kernel cache heals itself (issue 29) ----------------------------------------------------

@needs_native
def test_a_damaged_cached_library_is_rebuilt_never_loaded(monkeypatch, tmp_path):
  """A truncated library would kill the process with SIGBUS once loaded, a foreign one lacks the
  symbols: neither matches the size and sha256 its build recorded, so both are rebuilt."""
  import os
  monkeypatch.setenv("PI_JAX_NATIVE_CACHE", str(tmp_path))
  path = native._build()
  good = open(path, "rb").read()
  record = open(path + ".sha256").read()
  assert native.verified(path) and record.split()[0] == str(len(good))
  for damage in ("truncated", "empty", "foreign", "no_record"):
    if damage == "truncated":
      os.truncate(path, len(good) // 2)
    elif damage == "empty":
      open(path, "wb").close()
    elif damage == "foreign":
      open(path, "wb").write(b"\x7fELF" + bytes(len(good) - 4))
    else:
      os.remove(path + ".sha256")
    assert not native.verified(path), damage
    if damage in ("truncated", "foreign"):  # each rebuild costs a compile: two are enough
      assert native._build() == path and native.verified(path)
      assert os.path.getsize(path) == len(good)
    else:
      open(path, "wb").write(good)
      open(path + ".sha256", "w").write(record)
  assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path),
                                                 os.path.basename(path) + ".sha256"])


@needs_native
def test_a_foreign_library_with_a_matching_record_is_removed_not_used(monkeypatch, tmp_path):
  import os
  import scipy_openblas32
  monkeypatch.setenv("PI_JAX_NATIVE_CACHE", str(tmp_path))
  monkeypatch.setattr(native, "_build", lambda: str(tmp_path / "lib.so"))
  foreign = [f for f in os.listdir(scipy_openblas32.get_lib_dir()) if ".so" in f][0]
  shutil.copyfile(os.path.join(scipy_openblas32.get_lib_dir(), foreign), tmp_path / "lib.so")
  open(tmp_path / "lib.so.sha256", "w").write(native._digest(str(tmp_path / "lib.so")))
  ok, why = native._load.__wrapped__()
  assert not ok and f"{tmp_path / 'lib.so'} is not pi_jax's kernel library" in why
  assert "the next run rebuilds it" in why and os.listdir(tmp_path) == []


def test_a_killed_build_leaves_no_temporary_for_long(tmp_path):
  import os
  import time
  dead = tmp_path / ".pi_jax_cpu_kernels_0123456789abcdef.so.tmp-999999-0123abcd"
  old = tmp_path / "tmpk2j3h4.so"  # an earlier version's unnamed temporary
  live = tmp_path / f".pi_jax_cpu_kernels_0123456789abcdef.so.tmp-{os.getpid()}-0123abcd"
  mine = tmp_path / "notes.txt"
  for f in (dead, old, live, mine):
    f.write_bytes(b"x")
  an_hour_ago = time.time() - 3600
  os.utime(old, (an_hour_ago, an_hour_ago))
  os.utime(mine, (an_hour_ago, an_hour_ago))
  native._clean_stale(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == sorted([live.name, mine.name])


@pytest.mark.parametrize("value,on", [("0", False), ("false", False), ("No", False),
                                      ("OFF", False), ("1", True), ("true", True), ("yes", True),
                                      ("on", True), ("maybe", False)])
def test_pi_jax_native_takes_every_boolean_spelling(monkeypatch, value, on):
  monkeypatch.setenv("PI_JAX_NATIVE", value)
  got, why = native.enabled()
  assert got == on
  if value == "maybe":
    assert "PI_JAX_NATIVE='maybe' is not a boolean" in why
  elif not on:
    assert why == f"disabled by PI_JAX_NATIVE={value}"


def test_threads_without_sched_getaffinity(monkeypatch):
  import os
  monkeypatch.delattr(os, "sched_getaffinity")
  assert native.threads() == max(1, os.cpu_count() or 1)
