"""Small helpers over confluent-kafka clients shared by the CLI and the Beam IO.

They know two things every caller needs: how to fail fast and clearly when
the cluster cannot be reached, and how to learn a partition's true end offset
from fetched data rather than from the offset listing (some Kafka-compatible
brokers, the bundled local one among them, list it short).
"""

import logging
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from kbml.kafka_config import redact

_LOG = logging.getLogger('kbml.kafka')
_CLIENT_LOG = logging.getLogger('kbml.kafka.client')

# An offset the broker reports when it has none (no commit, no fetch yet).
NO_OFFSET = -1001


class KafkaUnreachableError(ConnectionError):
  """The Kafka cluster did not answer in time."""


def with_client_logger(config: Mapping[str, str]) -> Dict[str, object]:
  """Routes librdkafka's own log lines through Python logging."""
  return {'logger': _CLIENT_LOG, **config}


def unreachable_error(config: Mapping[str, str], timeout_s: float, cause: Exception) -> KafkaUnreachableError:
  return KafkaUnreachableError(
      f"Kafka at {config.get('bootstrap.servers')!r} did not answer within {timeout_s:.0f} s ({cause}). "
      'Check --bootstrap-servers (for the local broker: `kbml local status`) and the security '
      f'settings passed with --kafka-config; client settings in use: {redact(config)}')


def cluster_metadata(client, timeout_s: float = 15.0):
  """Fetches cluster metadata, failing with a clear error when nobody answers."""
  try:
    return client.list_topics(timeout=timeout_s)
  except KafkaException as e:
    raise unreachable_error(getattr(client, 'kbml_config', {}), timeout_s, e) from e


def list_partitions(client, topics: Iterable[str], timeout_s: float = 15.0) -> List[Tuple[str, int]]:
  """Lists ``(topic, partition)`` pairs, failing clearly on a missing topic.

  Args:
    client: a confluent-kafka Consumer, Producer or AdminClient.
    topics: topic names.
    timeout_s: how long to wait for the cluster's metadata.

  Raises:
    KafkaUnreachableError: no answer from the cluster within ``timeout_s``.
    ValueError: a topic does not exist.
  """
  metadata = cluster_metadata(client, timeout_s)
  pairs = []
  for topic in topics:
    if topic not in metadata.topics:
      raise ValueError(
          f'Kafka topic {topic!r} does not exist (the cluster has {len(metadata.topics)} topics). '
          'Create it first; `kbml local up` creates the project topics on the local broker.')
    pairs.extend((topic, partition) for partition in sorted(metadata.topics[topic].partitions))
  return pairs


class _ConfiguredConsumer(Consumer):
  """A consumer that remembers its settings, so that errors can name them."""

  def __init__(self, config: Mapping[str, str]):
    super().__init__(with_client_logger(config))
    self.kbml_config = dict(config)


class _ConfiguredAdminClient(AdminClient):
  def __init__(self, config: Mapping[str, str]):
    super().__init__(with_client_logger(config))
    self.kbml_config = dict(config)


def new_consumer(config: Mapping[str, str], **overrides) -> Consumer:
  """Creates a consumer that never commits on its own.

  Offsets are committed explicitly, only after the records were processed.
  """
  return _ConfiguredConsumer({'group.id': 'kbml-reader', **config, **overrides, 'enable.auto.commit': False})


def new_probe_consumer(config: Mapping[str, str]) -> Consumer:
  """A consumer for offset look-ups: its fetches return at once instead of long-polling."""
  return new_consumer(config, **{'fetch.wait.max.ms': 10})


def new_admin_client(config: Mapping[str, str]) -> AdminClient:
  """An admin client with the given settings, logging through Python's logging."""
  return _ConfiguredAdminClient(config)


def listed_offsets(consumer: Consumer, topic: str, partition: int, timeout_s: float = 10.0) -> Tuple[int, int]:
  """The partition's low and high offsets as the broker lists them."""
  try:
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
  except KafkaException as e:
    raise unreachable_error(getattr(consumer, 'kbml_config', {}), timeout_s, e) from e
  return max(low, 0), max(high, 0)


def fetched_end_offset(consumer: Consumer, topic: str, partition: int, start: Optional[int] = None,
                       timeout_s: float = 10.0) -> int:
  """Returns a partition's end offset, as reported with fetched data.

  The listed end offset is a lower bound (exact on Apache Kafka, short on
  some compatible brokers); an empty listing needs no fetch. Otherwise the
  consumer is assigned at ``start`` (default: the partition's first offset)
  and fetches once: the high watermark that comes back with the fetch
  response is the true end offset.

  Raises:
    KafkaUnreachableError: no fetch response within ``timeout_s``.
  """
  low, listed_high = listed_offsets(consumer, topic, partition, timeout_s)
  if listed_high <= low:
    return listed_high
  tp = TopicPartition(topic, partition)
  consumer.assign([TopicPartition(topic, partition, low if start is None else start)])
  try:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      consumer.consume(num_messages=1, timeout=0.05)
      _, high = consumer.get_watermark_offsets(tp, cached=True)
      if high >= 0:
        return high
  finally:
    consumer.unassign()
  raise unreachable_error(consumer.kbml_config, timeout_s, 'no fetch response')


def offset_for_time(consumer: Consumer, topic: str, partition: int, time_ms: int, timeout_s: float = 10.0) -> int:
  """The first offset of the partition whose record timestamp is ``time_ms`` or later (Kafka's ListOffsets by
  timestamp); the end offset when every record is older.

  Every record before it is older than ``time_ms``. A broker that matches the time it wrote the records instead
  (Tansu) gives an earlier offset: a read from there holds more than it needs, never less.
  """
  try:
    [found] = consumer.offsets_for_times([TopicPartition(topic, partition, time_ms)], timeout=timeout_s)
  except KafkaException as e:
    raise unreachable_error(getattr(consumer, 'kbml_config', {}), timeout_s, e) from e
  if found.offset >= 0:
    return found.offset
  return fetched_end_offset(consumer, topic, partition, timeout_s=timeout_s)


Partition = Tuple[str, int]

# How long a consumer may fetch nothing while the broker holds records past its positions before it counts as
# stuck: librdkafka clients that read assigned partitions sometimes stop fetching after a broker restart until they
# are created again (confluentinc/librdkafka#5153; seen here under load on 2 cores).
STALL_S = 20.0


def newest_record_time_ms(admin: AdminClient, pairs: Iterable[Partition], timeout_s: float = 10.0) -> Optional[int]:
  """The newest record timestamp of the partitions (Kafka's ListOffsets with MAX_TIMESTAMP); None if they hold
  no record."""
  futures = admin.list_offsets({TopicPartition(*pair): OffsetSpec.max_timestamp() for pair in pairs},
                               request_timeout=timeout_s)
  times = [future.result().timestamp for future in futures.values()]
  return max((time_ms for time_ms in times if time_ms >= 0), default=None)


class StallWatch:
  """Tells a consumer that fetches nothing although the broker holds records past its positions.

  Call :meth:`stalled` when a poll came back empty; it looks at the broker's
  end offsets at most every ``check_s`` and answers True once records have
  waited past the positions for ``stall_s``. A broker that does not answer
  is a broker being waited for, not a stuck client.

  Args:
    config: the consumer's Kafka settings (a probe consumer reads the end offsets).
    check_s: the least time between two looks at the end offsets.
    stall_s: how long records may wait past the positions.
  """

  def __init__(self, config: Mapping[str, str], check_s: float = 5.0, stall_s: float = STALL_S):
    self._config = dict(config)
    self._check_s = check_s
    self._stall_s = stall_s
    self._checked_at = time.monotonic()
    self._behind_since: Optional[float] = None
    self._probe: Optional[Consumer] = None

  def stalled(self, positions: Mapping[Partition, int]) -> bool:
    now = time.monotonic()
    if now - self._checked_at < self._check_s:
      return False
    self._checked_at = now
    if self._probe is None:
      self._probe = new_probe_consumer(self._config)
    try:
      behind = any(fetched_end_offset(self._probe, topic, partition, offset, 5.0) > offset
                   for (topic, partition), offset in positions.items())
    except KafkaUnreachableError:
      behind = False
    if not behind:
      self._behind_since = None
      return False
    if self._behind_since is None:
      self._behind_since = now
    if now - self._behind_since < self._stall_s:
      return False
    self._behind_since = None
    return True

  def close(self):
    if self._probe is not None:
      self._probe.close()
      self._probe = None


def records_only(messages: Iterable, report: Callable[[str], None]) -> List:
  """The messages that carry records; reports the others (errors the consumer delivers as messages: a partition
  that lost its records, a broker that is down) instead of dropping them unseen."""
  records = []
  for message in messages:
    if message.error():
      report(f'Kafka consumer error on {message.topic()}[{message.partition()}]: {message.error()}')
    else:
      records.append(message)
  return records


# Errors of a group coordinator that is moving or still loading (a broker just started): asked again, it answers.
_COORDINATOR_NOT_READY = (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                          KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._WAIT_COORD)


def committed_offsets(consumer: Consumer, pairs: Iterable[Partition], timeout_s: float = 15.0) -> Dict[Partition, int]:
  """Returns the consumer group's committed offset per partition (NO_OFFSET if none).

  A coordinator that is not ready yet (Apache Kafka loading its offsets after a start) is asked again until
  ``timeout_s``.
  """
  partitions = [TopicPartition(t, p) for t, p in pairs]
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      committed = consumer.committed(partitions, timeout=max(deadline - time.monotonic(), 1.0))
      break
    except KafkaException as e:
      if e.args[0].code() not in _COORDINATOR_NOT_READY or time.monotonic() > deadline:
        raise unreachable_error(consumer.kbml_config, timeout_s, e) from e
      time.sleep(0.2)
  return {(tp.topic, tp.partition): tp.offset for tp in committed}


def group_lag(config: Mapping[str, str], group: str, topics: Iterable[str], timeout_s: float = 15.0) -> Optional[int]:
  """Records of ``topics`` the group has not consumed (end offset minus committed, over the partitions it
  committed to); None if it has committed nothing there."""
  consumer = new_probe_consumer({**config, 'group.id': group})
  try:
    partitions = list_partitions(consumer, topics, timeout_s)
    committed = {pair: offset for pair, offset in committed_offsets(consumer, partitions, timeout_s).items()
                 if offset >= 0}
    if not committed:
      return None
    return sum(max(0, fetched_end_offset(consumer, topic, partition, offset, timeout_s) - offset)
               for (topic, partition), offset in committed.items())
  finally:
    consumer.close()


def create_topics(config: Mapping[str, str], topics: Iterable[str], partitions: int,
                  timeout_s: float = 15.0) -> List[str]:
  """Creates the topics that do not exist yet; returns the ones it created."""
  admin = new_admin_client(config)
  existing = cluster_metadata(admin, timeout_s).topics
  wanted = [t for t in topics if t not in existing]
  if not wanted:
    return []
  futures = admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in wanted],
                                operation_timeout=timeout_s, request_timeout=timeout_s)
  created = []
  for topic, future in futures.items():
    try:
      future.result()
      created.append(topic)
    except KafkaException as e:
      if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
        raise
  _LOG.info('created topics %s with %d partitions', created, partitions)
  return created


class AcknowledgedProducer:
  """An idempotent producer that waits for room when its queue is full and counts what was not acknowledged.

  Every caller that must not lose records (the Beam sink, the simulator)
  sends through it, then asks :meth:`flush` how many records since the last
  flush were not delivered, and why.

  Args:
    config: producer settings, passed through (idempotence and a 5 ms linger
      unless they say otherwise).
  """

  def __init__(self, config: Mapping[str, str]):
    self.config = {'enable.idempotence': True, 'linger.ms': 5, **config}
    self._producer = Producer(with_client_logger(self.config))
    self._failures: List[str] = []
    self._unpolled = 0

  def check_reachable(self, timeout_s: float = 15.0):
    """Fails clearly, naming the settings, when the cluster does not answer."""
    try:
      self._producer.list_topics(timeout=timeout_s)
    except KafkaException as e:
      raise unreachable_error(self.config, timeout_s, e) from e

  def _on_delivery(self, error, message):
    if error is not None:
      self._failures.append(f'{message.topic()}: {error.str()}')

  def send(self, topic: str, value: Optional[bytes], key: Optional[bytes] = None,
           headers: Optional[Sequence[Tuple[str, bytes]]] = None, timestamp_ms: int = 0):
    """Queues one record (timestamp 0: now), waiting while the local queue is full."""
    while True:
      try:
        self._producer.produce(topic, value, key=key, headers=headers, timestamp=timestamp_ms,
                               on_delivery=self._on_delivery)
        break
      except BufferError:
        self._producer.poll(0.05)  # let deliveries drain the queue
    self._unpolled += 1
    if self._unpolled >= 500:  # serve delivery callbacks now and then, not on every record
      self._producer.poll(0)
      self._unpolled = 0

  def flush(self, timeout_s: float) -> Tuple[int, List[str]]:
    """Waits for acknowledgements; returns how many records since the last flush were not delivered, and why."""
    undelivered = self._producer.flush(timeout_s)
    failures, self._failures = self._failures, []
    reasons = failures[:3] or ([f'not acknowledged within {timeout_s:.0f} s'] if undelivered else [])
    return undelivered + len(failures), reasons


# Per partition of one topic: an offset.
PartitionOffsets = Dict[int, int]


def group_start_offsets(config: Dict[str, str], group: str, topic: str, when_uncommitted: str,
                        timeout_s: float = 15.0) -> PartitionOffsets:
  """Per partition of ``topic``: the group's committed offset, else its start or end.

  The pipelines that rebuild their state from the beginning of a topic
  act only on the records from these offsets on: the ones the group has not
  processed yet; a listener starts reading there.

  Args:
    config: Kafka client settings.
    group: the consumer group.
    topic: the topic.
    when_uncommitted: ``earliest`` or ``latest``: where a partition without
      a committed offset starts.
    timeout_s: how long to wait for the cluster.
  """
  consumer = new_probe_consumer({**config, 'group.id': group})
  try:
    partitions = list_partitions(consumer, [topic], timeout_s)
    committed = committed_offsets(consumer, partitions, timeout_s)
    offsets = {}
    for _, partition in partitions:
      offset = committed[(topic, partition)]
      if offset < 0:
        low, _ = listed_offsets(consumer, topic, partition, timeout_s)
        offset = low if when_uncommitted == 'earliest' else fetched_end_offset(consumer, topic, partition, low,
                                                                              timeout_s)
      offsets[partition] = offset
    return offsets
  finally:
    consumer.close()
