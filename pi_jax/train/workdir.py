"""The workdir lock: one run per workdir, even across hosts' restarts."""

from __future__ import annotations

import fcntl
import os


class WorkdirInUseError(ValueError):
  """Another process holds the workdir's lock."""


class WorkdirLock:
  """An exclusive lock on WORKDIR/.lock (released when the process ends, even by SIGKILL); the
  file holds the holder's PID so a second run can name it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or "unknown"
      self._file.close()
      raise WorkdirInUseError(f"workdir {workdir} is in use by another run (process {holder}, lock "
                         f"{self.path}); wait for it to finish or stop it, or use another "
                         "workdir") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"{os.getpid()}\n")
    self._file.flush()

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
