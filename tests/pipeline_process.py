"""A pipeline module run as users run it, ``python -m pipelines.NAME ...``, in a process of its own."""

import os
import signal
import subprocess
import sys
from typing import Optional, Sequence

from bench.common import cpu_seconds, resident_mb

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PipelineProcess:
  """``python -m MODULE ARGS``; its output goes to a log file, its local state (snapshots) beside it."""

  def __init__(self, module: str, args: Sequence[str], log_path: str):
    self._command = [sys.executable, '-m', module, *args]
    self._log_path = log_path
    self.process: Optional[subprocess.Popen] = None

  def start(self):
    log = open(self._log_path, 'ab')  # noqa: SIM115 - the child keeps writing to it
    state_dir = os.path.join(os.path.dirname(os.path.abspath(self._log_path)), 'kbml-state')
    self.process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                    env={**os.environ, 'KBML_STATE_DIR': state_dir})

  def running(self) -> bool:
    return self.process is not None and self.process.poll() is None

  def kill(self):
    self.process.send_signal(signal.SIGKILL)
    self.process.wait()

  def resident_mb(self) -> float:
    assert self.running(), f'{self._command[2]} exited:\n{self.log_tail()}'
    return resident_mb(self.process.pid)

  def cpu_seconds(self) -> float:
    return cpu_seconds(self.process.pid)

  def log_tail(self) -> str:
    with open(self._log_path, 'rb') as f:
      return f.read()[-3000:].decode(errors='replace')
