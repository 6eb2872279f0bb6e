"""pi_jax.dispatch, the one seam that picks kernels, and pi_jax.run's options: what `auto`
means on each backend, the tile, the native kernels, and the options' own validation."""

import jax
import pytest

from pi_jax import dispatch, native
from pi_jax.attention import kernels as vendor
from pi_jax.run import RunOptions


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
def test_auto_on_the_cpu_is_the_native_kernel_for_float32_else_blockwise(monkeypatch):
  assert jax.default_backend() == "cpu"
  got = dispatch.choose(RunOptions())
  assert (got.attention, got.block_size, got.native_matmul) == ("cpu_flash", 256, True)
  got = dispatch.choose(RunOptions(compute_dtype="bfloat16"))
  assert (got.attention, got.block_size, got.native_matmul) == ("xla_blockwise", 256, False)
  got = dispatch.choose(RunOptions(native="off"))
  assert (got.attention, got.native_matmul) == ("xla_blockwise", False)
  monkeypatch.setattr(native, "available", lambda: False)  # no g++ or OpenBLAS
  assert dispatch.choose(RunOptions()).attention == "xla_blockwise"


def test_auto_picks_the_vendor_kernels(monkeypatch):
  monkeypatch.setattr(vendor, "backend", lambda: "tpu")
  got = dispatch.choose(RunOptions())
  assert (got.attention, got.block_size, got.native_matmul) == ("splash", 512, False)
  monkeypatch.setattr(vendor, "backend", lambda: "gpu")
  assert dispatch.choose(RunOptions(compute_dtype="bfloat16")).attention == "cudnn"
  assert dispatch.choose(RunOptions(compute_dtype="float16")).attention == "cudnn"
  got = dispatch.choose(RunOptions())
  assert (got.attention, got.block_size) == ("xla_blockwise", 512)


def test_without_the_native_kernels_auto_is_xla(monkeypatch):
  monkeypatch.setattr(native, "available", lambda: False)
  got = dispatch.choose(RunOptions())
  assert (got.attention, got.block_size, got.native_matmul) == ("xla_blockwise", 256, False)


def test_an_explicit_tile_and_implementation_win():
  got = dispatch.choose(RunOptions(attention_impl="ring", attention_block_size=64))
  assert (got.attention, got.block_size) == ("ring", 64)
  assert dispatch.choose(RunOptions(attention_impl="ring")).block_size == 256  # CPU default


def test_cpu_flash_refused_when_the_native_kernels_are_off():
  with pytest.raises(ValueError, match="'cpu_flash' is unavailable: run.native is off"):
    dispatch.choose(RunOptions(attention_impl="cpu_flash", native="off"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(param_dtype="float64"), "run.param_dtype must be one of"),
    (dict(compute_dtype="fp16"), "run.compute_dtype must be one of"),
    (dict(remat="sometimes"), "run.remat must be one of"),
    (dict(attention_impl="magic"), "run.attention_impl must be one of"),
    (dict(attention_block_size=0), "run.attention_block_size must be a positive integer"),
    (dict(native="maybe"), "run.native must be one of"),
])
def test_run_options_are_validated(kwargs, message):
  with pytest.raises(ValueError, match=message):
    RunOptions(**kwargs)
