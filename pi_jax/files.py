"""Writing files so that nothing is lost: atomic writes, overlap and writability checks.

Every file or directory the project writes (checkpoints, exports, reports, JSON outputs, plots,
downloads) goes through `atomic_directory` or `atomic_file`: the new content is written under a
hidden sibling name `.NAME.tmp-PID-HEX8` (8 random hex digits) and renamed into place only when
complete, so a crash, a full disk or Ctrl-C never leaves a half-written NAME and never damages
an old one. Temporaries left by a process that was killed (SIGKILL, power loss) are removed by
the next write of the same NAME; the PID in the name tells a dead writer's leftovers from a
live one's.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import uuid

_TMP_RE = re.compile(r"\.tmp-(?:(\d+)-)?[0-9a-f]{8}$")


def _tmp_name(path: str) -> str:
  parent, base = os.path.split(os.path.abspath(path))
  return os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def temporary_name(path: str) -> str:
  """The hidden sibling name a writer of `path` uses (`.NAME.tmp-PID-HEX8`)."""
  return _tmp_name(path)


def writer_is_dead(tmp: str) -> bool:
  """Whether the temporary `tmp` (a `temporary_name`) belongs to a process that is gone."""
  m = _TMP_RE.search(tmp)
  return bool(m and m.group(1) and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))))


def stale_temporaries(path: str) -> list[str]:
  """Hidden `.NAME.tmp-*` siblings of `path` whose writer is gone (this host's PIDs)."""
  parent, base = os.path.split(os.path.abspath(path))
  out = []
  for tmp in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.tmp-*")):
    m = _TMP_RE.search(tmp)
    if not m:
      continue
    pid = m.group(1)
    # Names without a PID come from versions before this one: nobody is writing them now.
    if pid is None or (int(pid) != os.getpid() and not _alive(int(pid))):
      out.append(tmp)
  return out


def clean_stale_temporaries(path: str) -> list[str]:
  """Removes what `stale_temporaries` finds; returns the removed paths."""
  removed = []
  for tmp in stale_temporaries(path):
    if os.path.isdir(tmp) and not os.path.islink(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    removed.append(tmp)
  return removed


@contextlib.contextmanager
def atomic_directory(path: str):
  """Yields a temporary sibling directory that replaces `path` only if the block succeeds.

  On any error (Ctrl-C included) the temporary directory is removed and `path`, new or old, is
  untouched: a failed write never leaves a half-written checkpoint or export.
  """
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  clean_stale_temporaries(path)
  tmp = _tmp_name(path)
  try:
    os.makedirs(tmp)
    yield tmp
    if os.path.isdir(path) and not os.path.islink(path):
      # Move the old one aside first: a crash between the two renames leaves it recoverable
      # under a stale name instead of half-deleted.
      old = _tmp_name(path)
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      if os.path.lexists(path):
        os.remove(path)
      os.replace(tmp, path)
  finally:
    _remove_tree(tmp)


def _remove_tree(tmp: str, seconds: float = 5.0) -> None:
  """Removes `tmp`, again while something still writes into it: after a failed orbax save
  (a full disk) its abandoned background writes may create files for a moment longer."""
  import time
  deadline = time.monotonic() + seconds
  while os.path.lexists(tmp) and time.monotonic() < deadline:
    shutil.rmtree(tmp, ignore_errors=True)
    time.sleep(0.1)  # gone for good, or recreated by a late write: the loop sees which


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
  """Yields an open file whose content replaces `path` only when the block succeeds."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  clean_stale_temporaries(path)
  tmp = _tmp_name(path)
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def normal_mode(path: str) -> None:
  """Gives a file the mode a plain open() would (0666 less the umask): some writers (the
  safetensors library) create theirs 0600, unreadable to the group that serves the model."""
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(path, 0o666 & ~mask)


def disk_error(e: BaseException) -> str | None:
  """'no space left on device' (or the OS's words) when `e` is a write failing for lack of
  room or permission, whatever library raised it; None otherwise."""
  text = str(e)
  code = getattr(e, "errno", None)
  if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "os error 28" in text:
    return "no space left on device"
  if code == errno.EROFS or "Read-only file system" in text or "os error 30" in text:
    return "the file system is read-only"
  return None


def write_text(path: str, text: str) -> None:
  with atomic_file(path) as f:
    f.write(text)


def write_json(path: str, payload, **kwargs) -> None:
  kwargs.setdefault("indent", 2)
  with atomic_file(path) as f:
    json.dump(payload, f, **kwargs)
    f.write("\n")


def copy_file(src: str, dst: str) -> None:
  with atomic_file(dst, "wb") as f, open(src, "rb") as s:
    shutil.copyfileobj(s, f, 1 << 20)


def portable(arg: str) -> str:
  """`arg` as results may record it: an absolute path under the working directory becomes
  relative, one under the home directory starts with `~`; anything else is returned as is.
  Committed results must not carry one machine's paths (e.g. a user's model cache)."""
  if not os.path.isabs(arg):
    return arg
  cwd, home = os.getcwd(), os.path.expanduser("~")
  if _inside(arg, cwd):
    return os.path.relpath(arg, cwd)
  if home not in ("", os.sep) and _inside(arg, home):
    return os.path.join("~", os.path.relpath(arg, home))
  return arg


# --- checks before a long job ----------------------------------------------------------------

def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(child: str, parent: str) -> bool:
  return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_separate(output: str, inputs, what: str = "output") -> None:
  """Refuses an output that is, contains, or lies inside one of the inputs.

  Writing there would replace or delete the input (e.g. exporting RUN/final into RUN).
  """
  out = _real(output)
  for src in inputs:
    if src is None:
      continue
    real = _real(src)
    if out == real:
      raise ValueError(f"{what} {output} is the input {src} itself; writing it would destroy the "
                       "input: choose another path")
    if _inside(real, out):
      raise ValueError(f"{what} {output} contains the input {src}; replacing it would delete the "
                       "input: choose a path outside it")
    if _inside(out, real):
      raise ValueError(f"{what} {output} lies inside the input {src}; writing it would change "
                       "the input: choose a path outside it")


def check_writable(path: str, what: str = "output") -> None:
  """Fails now, not after a long job, when `path` (a file or directory to create) cannot be
  written: its nearest existing ancestor must be a writable directory."""
  path = os.path.abspath(path)
  if os.path.isdir(path) and not os.path.islink(path) and what.endswith("file"):
    raise ValueError(f"{what} {path} is a directory")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    up = os.path.dirname(parent)
    if up == parent:
      break
    parent = up
  if not os.path.isdir(parent):
    raise ValueError(f"{what} {path} cannot be written: {parent} is not a directory")
  probe = os.path.join(parent, f".pi_jax-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    with open(probe, "w"):
      pass
  except OSError as e:
    raise ValueError(f"{what} {path} cannot be written: {parent}: {e.strerror}") from None
  finally:
    with contextlib.suppress(OSError):
      os.remove(probe)
