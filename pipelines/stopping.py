"""Makes SIGINT and SIGTERM stop a pipeline process within seconds, every time.

Python's own Ctrl-C raises KeyboardInterrupt wherever the main thread
happens to be. Beam's local runner (the FnApiRunner) starts a state sampler
thread for each bundle, and an unbounded read starts bundles back to back.
An interrupt that lands inside the sampler's ``threading.Thread.start``
(while the caller waits for the new thread to run, longer on a busy machine)
leaves the thread started but the sampler not marked as started, so the
bundle's clean-up never stops it; it is no daemon, and the interpreter waits
for it at exit: the process stayed up until SIGKILL in 3 stops of 10.
SIGTERM, by default, kills the process at once, without a word in its log.

:func:`stop_on_signals` keeps Python's graceful try (one KeyboardInterrupt in
the main thread, for SIGTERM too) and bounds it: a watchdog thread hears the
signal through ``signal.set_wakeup_fd``, which Python's C-level handler
writes even while the main thread is stuck, logs it, and ends the process
with ``os._exit(128 + signum)`` if it is still there ``grace_s`` later, or at
once on a second signal. Nothing is lost by the hard exit: the Kafka reader
commits its offsets only after the outputs of what it read are flushed, so
what was read but not written is read again at the next start (delivery is
at least once).
"""

import atexit
import logging
import os
import select
import signal
import sys
import threading
import time

_LOG = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_GRACE_S = 5.0

_installed = False
_interrupted = None  # the stop signal that raised the KeyboardInterrupt
_announce_lock = threading.Lock()
_announced = False


def stop_on_signals(grace_s: float = DEFAULT_GRACE_S):
  """Stops this process on SIGINT or SIGTERM: gracefully if it can, within ``grace_s`` seconds in any case.

  Call it first in a pipeline's ``run()``. The handlers stay for the life of
  the process; later calls change nothing. Called outside the main thread,
  where Python cannot install signal handlers, it does nothing. It takes
  Python's one wakeup fd: an asyncio loop that later handles signals in this
  process would take it back, leaving only the graceful try.

  Args:
    grace_s: how long the graceful stop may take before the process is ended.
  """
  global _installed
  if _installed or threading.current_thread() is not threading.main_thread():
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)  # set_wakeup_fd needs it: a C signal handler must never block
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  for signum in STOP_SIGNALS:
    signal.signal(signum, _interrupt_once)
  threading.Thread(target=_end_after_grace, args=(read_fd, grace_s), name='stop-on-signals', daemon=True).start()
  # A main thread that ends at once on the KeyboardInterrupt can beat the watchdog to its log line.
  atexit.register(_announce_at_exit, grace_s)
  _installed = True


def _interrupt_once(signum, frame):
  """The graceful try: KeyboardInterrupt in the main thread, once (a second one would only break the clean-up)."""
  global _interrupted
  if _interrupted is None:
    _interrupted = signum
    raise KeyboardInterrupt


def _announce(signum: int, grace_s: float):
  """Logs the stop signal, once: from the watchdog, or at exit if the main thread got there first."""
  global _announced
  with _announce_lock:
    if _announced:
      return
    _announced = True
  _LOG.warning('%s: stopping (a second one stops at once; in %g s the process is ended)',
               signal.Signals(signum).name, grace_s)


def _announce_at_exit(grace_s: float):
  if _interrupted is not None:
    _announce(_interrupted, grace_s)


def _end_after_grace(read_fd: int, grace_s: float):
  """The watchdog: waits for a stop signal, then for the process to end by itself, ``grace_s`` at most."""
  signum = _next_stop_signal(read_fd, None)
  _announce(signum, grace_s)
  again = _next_stop_signal(read_fd, grace_s)
  if again is not None:
    _LOG.warning('%s again: ending the process now', signal.Signals(again).name)
  else:
    _LOG.warning('still running %g s after %s: ending the process', grace_s, signal.Signals(signum).name)
  _flush_logs()
  os._exit(128 + signum)


def _next_stop_signal(read_fd: int, timeout_s):
  """The number of the next SIGINT or SIGTERM on the wakeup pipe; None after ``timeout_s`` (None: no limit)."""
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  while True:
    remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    readable, _, _ = select.select([read_fd], [], [], remaining)
    if not readable:
      return None
    # The pipe carries every signal Python handles (SIGCHLD, SIGALRM, ...): only the stop signals count.
    for signum in os.read(read_fd, 64):
      if signum in STOP_SIGNALS:
        return signum


def _flush_logs():
  """Flushes what os._exit would drop: the log handlers' and Python's standard streams' buffers."""
  for handler in logging.getLogger().handlers:
    try:
      handler.flush()
    except Exception:  # noqa: BLE001 - a broken stream must not keep the process up
      pass
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # noqa: BLE001 - as above
      pass
