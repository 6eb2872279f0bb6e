"""Every code block of README.md runs (Python) or parses (shell commands) here, at a small size.

The blocks are read from README.md itself, so a block added or edited there is tested as it is.
Python blocks are executed as written from the repository root. Shell blocks are split into
commands (comments and continuation lines joined); each is checked by the program it names:
`make T` is dry-run (`make -n T`), `train.py` loads its config and every `--set` (its
`--print-config` path: nothing is trained), and `eval.py` / `python -m convert.*` parse their
arguments with their own parsers. Full-scale runs are not what a test can afford.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks() -> list[tuple[str, str, int]]:
  """(language, code, line number) of every fenced block in README.md."""
  text = open(os.path.join(REPO, "README.md")).read()
  blocks = []
  for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
    blocks.append((m.group(1), m.group(2), text[:m.start()].count("\n") + 1))
  return blocks


def shell_commands(code: str) -> list[str]:
  joined = re.sub(r"\\\n\s*", " ", code)
  out = []
  for line in joined.splitlines():
    line = line.split(" #")[0].strip() if not line.strip().startswith("#") else ""
    if line:
      out.append(line)
  return out


BLOCKS = readme_blocks()


def test_readme_has_the_blocks_we_test():
  langs = [lang for lang, _, _ in BLOCKS]
  assert "python" in langs and "bash" in langs
  assert all(lang in ("python", "bash") for lang in langs), langs


@pytest.mark.parametrize("code,line", [(c, l) for lang, c, l in BLOCKS if lang == "python"])
def test_python_block_runs(code, line):
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                       "PYTHONPATH": REPO})
  assert r.returncode == 0, f"README.md line {line}:\n{r.stderr[-3000:]}"


def _check_command(command: str) -> None:
  args = shlex.split(os.path.expandvars(command))
  if args[0] == "make":
    r = subprocess.run(["make", "-n", *args[1:]], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return
  if args[0] in ("llama-cli", "llama-server"):  # llama.cpp's programs (not installed here)
    assert args[args.index("-m") + 1].endswith(".gguf") and int(args[args.index("-c") + 1]) > 0
    return
  assert args[0] == "python", f"unknown program in README: {command}"
  args = args[1:]
  if args[:2] in (["-m", "convert.to_pi_jax"], ["-m", "convert.to_hf"], ["-m", "convert.to_gguf"],
                  ["-m", "pi_jax.data"]):
    import importlib
    module = args[1] + (".__main__" if args[1] == "pi_jax.data" else "")
    importlib.import_module(module).build_parser().parse_args(args[2:])
  elif args[0] == "eval.py":
    sys.path.insert(0, REPO)
    import eval as eval_cli
    eval_cli.build_parser().parse_args(args[1:])
  elif args[0] == "train.py":
    import train
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      assert train.main(args[1:] + ["--print-config"]) == 0
    assert '"workdir"' in out.getvalue()
  else:
    raise AssertionError(f"unknown command in README: {command}")


@pytest.mark.parametrize("command", [c for lang, code, _ in BLOCKS if lang == "bash"
                                     for c in shell_commands(code)])
def test_shell_command_parses(command, monkeypatch):
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("I", "0")  # the process index the README leaves to the shell
  _check_command(command)
