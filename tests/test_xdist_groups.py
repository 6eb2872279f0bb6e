"""The suite's `xdist_group` marks work: `make test` runs with `--dist loadgroup`, and the tests
that share an expensive fixture (the SmolLM2 conversion and lm-eval runs, the real-model smoke
run) rely on one worker running their whole group. With pytest 9.2 and pytest-xdist 3.8 the
marks were silently ignored and those fixtures ran on both workers."""

import os
import subprocess
import sys
import textwrap

_TESTS = textwrap.dedent("""
    import os
    import pytest

    pytestmark = pytest.mark.xdist_group("together")

    @pytest.mark.parametrize("i", range(6))
    def test_worker(i):
      with open(os.path.join(os.environ["GROUP_OUT"], f"{i}"), "w") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"])
""")


def test_a_group_runs_on_one_worker(tmp_path):
  (tmp_path / "test_grouped.py").write_text(_TESTS)
  out = tmp_path / "out"
  out.mkdir()
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
       "no:cacheprovider", str(tmp_path / "test_grouped.py")],
      cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env={**os.environ, "GROUP_OUT": str(out)})
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  workers = {p.read_text() for p in out.iterdir()}
  assert len(list(out.iterdir())) == 6
  assert len(workers) == 1, f"one group ran on workers {sorted(workers)}"
