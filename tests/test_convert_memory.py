"""Streaming conversion: peak host memory stays near the output size (one model copy)."""

import os
import sys

import pytest

from benchmarks import convert_memory


@pytest.mark.slow
@pytest.mark.parametrize("src_dtype,out_dtype", [("float32", "float32"), ("bfloat16", "float32")])
def test_conversion_peak_rss_is_at_most_1_3x_output(tmp_path, src_dtype, out_dtype):
  """A 254M-parameter random model (0.95 GiB in float32), so python+jax+torch (~0.4 GiB,
  subtracted) and orbax/tensorstore's fixed write buffers (~0.2 GiB) do not dominate."""
  n = convert_memory.write_random_hf(str(tmp_path / "hf"), layers=16, dtype=src_dtype)
  m = convert_memory.measure(str(tmp_path / "hf"), str(tmp_path / "ckpt"), out_dtype)
  assert m["output"] == n * 4
  print(f"peak-baseline {(m['peak'] - m['baseline']) / 2**20:.0f} MiB for "
        f"{m['output'] / 2**20:.0f} MiB output: {m['ratio']:.2f}x")
  assert m["ratio"] <= 1.3, m
