"""benchmarks/quiet.py: which timed runs count as noisy."""

from __future__ import annotations

import os
import sys

import pytest

from benchmarks import quiet


def _watch(load_before: float, others_cores: float) -> quiet.Watch:
  w = quiet.Watch()
  w.load_before, w.others_cores = load_before, others_cores
  return w


@pytest.mark.parametrize("start,before,others,noisy", [
    (0.4, 1.8, 0.0, False),  # the benchmark's own earlier runs raised the load: not noise
    (1.6, 1.8, 0.0, True),  # the machine was busy when the benchmark started
    (0.4, 0.4, 0.6, True),  # another process took 0.6 cores during the run
    (1.6, 0.5, 0.0, False),  # busy at the start, quiet again by this run
])
def test_noisy(monkeypatch, start, before, others, noisy):
  monkeypatch.setattr(quiet, "START_LOAD", start)
  assert _watch(before, others).noisy is noisy


def test_a_real_watch_records_the_run():
  with quiet.Watch() as w:
    sum(range(100000))
  r = w.record()
  assert set(r) >= {"load_at_start", "load_before", "load_after", "others_cores", "noisy"}
  assert w.seconds > 0 and r["others_cores"] >= 0
