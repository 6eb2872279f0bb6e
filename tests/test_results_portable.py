"""Committed results carry no machine paths, and the tools that write them record portable ones."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from pi_jax import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE_PATH = re.compile(r"(?<![\w.~])/(root|home|tmp|work|Users|private/var)/[\w.-]")


def _tracked_text_files(*tops: str) -> list[str]:
  out = subprocess.run(["git", "ls-files", *tops], cwd=REPO, capture_output=True, text=True)
  if out.returncode != 0:
    pytest.skip("not a git checkout")
  return [p for p in out.stdout.split() if p.endswith((".json", ".md", ".jsonl", ".sh", ".txt"))]


def test_committed_results_name_no_machine_paths():
  bad = []
  for path in _tracked_text_files("results", "assets", "docs", "README.md"):
    with open(os.path.join(REPO, path), errors="replace") as f:
      for n, line in enumerate(f, 1):
        if MACHINE_PATH.search(line):
          bad.append(f"{path}:{n}: {line.strip()[:160]}")
  assert not bad, "\n".join(bad)


def test_the_pattern_finds_what_it_is_for():
  assert MACHINE_PATH.search('"ckpt": "/root/.cache/pi_jax/smollm2"')
  assert MACHINE_PATH.search("--json /tmp/pytest-of-x/out.json")
  assert not MACHINE_PATH.search('"ckpt": "~/.cache/pi_jax/smollm2"')
  assert not MACHINE_PATH.search("runs/demo/checkpoints/pi  data/pg19_standin/Psa_14?.txt")


def test_portable_makes_paths_relative_or_home_based(tmp_path, monkeypatch):
  home, work = tmp_path / "home", tmp_path / "work"
  (home / ".cache").mkdir(parents=True)
  work.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(work)
  assert files.portable(str(work / "runs" / "x")) == os.path.join("runs", "x")
  assert files.portable(str(home / ".cache" / "m")) == os.path.join("~", ".cache", "m")
  assert files.portable("/opt/models/m") == "/opt/models/m"  # neither: kept, it may be shared
  assert files.portable("runs/x") == "runs/x" and files.portable("--json") == "--json"
