"""The capacity table's command: its floor never exceeds what the TPU compiler measured, and the
table it writes is the committed one (benchmarks/tpu_capacity.py, docs/tpu_capacity.md)."""

import json
import os
import sys

from tests.train_utils import REPO

from benchmarks import tpu_capacity

RESULTS = os.path.join(REPO, "results", "tpu_capacity.json")


def _rows():
  with open(RESULTS) as f:
    return json.load(f)["rows"]


def test_the_floor_is_below_every_compiled_figure():
  """The planner's floor skips slices without compiling them: it must never exceed a measured
  step."""
  from pi_jax import tpu
  from pi_jax.train import plan
  checked = 0
  for row in _rows():
    config = tpu_capacity._row_config(row["config"])
    for tried in row["tried"]:
      if tried["per_chip_bytes"] is None:
        continue
      chips = tpu.parse_slice(tried["topology"]).chips
      assert plan.floor_bytes(config, chips) <= tried["per_chip_bytes"], (row, tried)
      checked += 1
  assert checked >= len(_rows())


def test_the_committed_table_is_what_the_command_writes():
  rows = _rows()
  with open(os.path.join(REPO, "docs", "tpu_capacity.md")) as f:
    committed = f.read()
  assert tpu_capacity.table(rows) in committed
  for row in rows:
    assert row["row"] in committed
    if row["fits"]:
      assert row["per_chip_bytes"] <= row["hbm_bytes_per_chip"]
