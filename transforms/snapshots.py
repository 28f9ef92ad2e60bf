"""Snapshots of a pipeline's in-process state, with the Kafka offsets it reflects.

A streaming pipeline on the local runner keeps its state (the histories its
use case's features read: fraud's customers and terminals, IoT's machines) in
its process. Without a snapshot, a restart rebuilds
it by reading the topics from their beginning: a restart that takes longer
the longer the pipeline has run, and topics that must keep all their
records. With one, a restart loads the newest snapshot and reads on from the
offsets it was taken at.

Why a file rather than Kafka Streams' compacted changelog topics: the state
is applied in bundles of events, and a changelog would write every changed
history after every bundle, most of it again and again, where one snapshot a
minute writes each once. The file sits beside the model store and the
warehouse in the local state directory. On Flink and Dataflow the same
state is keyed state, and the runner's checkpoints are its snapshots.

The file holds two pickles: a header (what the state is of, the offsets it
reflects, when it was taken), which a pipeline reads before it builds its
graph, then the state. It is replaced atomically (written aside, then renamed
over the old one): a crash while saving leaves the previous snapshot whole.
"""

import logging
import os
import pickle
import tempfile
import time
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

_LOG = logging.getLogger(__name__)
_FORMAT = 2  # 2: histories note the last event ids (last_event_ids)


class SnapshotHeader(NamedTuple):
  """What a snapshot is of (``identity``), the offsets its state reflects, and when it was taken."""
  identity: Dict[str, Any]
  offsets: Dict[Tuple[str, int], int]  # (stream, partition) -> the offset after the newest record applied
  saved_at: float
  # (stream, partition) -> what identifies the record just before the offset: a topic created again, with other
  # records at the same offsets, is told by it.
  markers: Dict[Tuple[str, int], Any] = {}


class StateSnapshots:
  """Saves a state with its offsets at most every ``interval_s`` seconds; loads the newest.

  Args:
    path: the snapshot file.
    identity: what the state depends on (settings, schema, topics): a
      snapshot taken with another identity is not loaded.
    interval_s: the shortest time between two snapshots.
  """

  def __init__(self, path: str, identity: Mapping[str, Any], interval_s: float = 60.0):
    self.path = path
    self._identity = {'format': _FORMAT, **identity}
    self._interval_s = interval_s
    self._saved_at = time.monotonic()

  def __getstate__(self):
    return {**self.__dict__, '_saved_at': None}

  def __setstate__(self, state):
    self.__dict__.update(state, _saved_at=time.monotonic())

  def header(self) -> Optional[SnapshotHeader]:
    """The newest snapshot's header; None when there is none, or it is of another identity or unreadable."""
    try:
      with open(self.path, 'rb') as f:
        header = pickle.load(f)
    except FileNotFoundError:
      return None
    except Exception as e:  # a snapshot that cannot be read is no snapshot: the state is rebuilt from the topics
      _LOG.warning('ignoring the state snapshot %s, which cannot be read (%s): rebuilding the state', self.path, e)
      return None
    if not isinstance(header, SnapshotHeader) or header.identity != self._identity:
      _LOG.warning('ignoring the state snapshot %s, taken with other settings (%s, now %s): rebuilding the state',
                   self.path, getattr(header, 'identity', None), self._identity)
      return None
    return header

  def load(self) -> Optional[Tuple[SnapshotHeader, Any]]:
    """The newest snapshot's header and state; None as for :meth:`header`."""
    if self.header() is None:
      return None
    with open(self.path, 'rb') as f:
      header = pickle.load(f)
      state = pickle.load(f)
    _LOG.info('loaded the state snapshot %s of %s', self.path,
              time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(header.saved_at)))
    return header, state

  def due(self) -> bool:
    return time.monotonic() - self._saved_at >= self._interval_s

  def save(self, offsets: Mapping[Tuple[str, int], int], state: Any,
           markers: Optional[Mapping[Tuple[str, int], Any]] = None):
    """Writes a snapshot of ``state``, which reflects the records before ``offsets`` (the last of which
    ``markers`` identify)."""
    started = time.monotonic()
    folder = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile('wb', dir=folder, prefix='.snapshot-', delete=False) as f:
      try:
        pickle.dump(SnapshotHeader(self._identity, dict(offsets), time.time(), dict(markers or {})), f,
                    pickle.HIGHEST_PROTOCOL)
        pickle.dump(state, f, pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
      except BaseException:
        os.unlink(f.name)
        raise
    os.replace(f.name, self.path)
    self._saved_at = time.monotonic()
    _LOG.info('saved the state snapshot %s (%.1f MB) in %.2f s', self.path, os.path.getsize(self.path) / 1e6,
              self._saved_at - started)
