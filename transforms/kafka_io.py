"""Python-native Kafka source and sink for Apache Beam.

Beam's own ``apache_beam.io.kafka`` transforms are Java cross-language
transforms: they need a Java expansion service (a jar from Maven). The
transforms here use confluent-kafka from Python, so they run on every runner,
the local one included. Beam's Java transforms stay selectable through
:func:`read_from_kafka` / :func:`write_to_kafka` with ``kafka_io='java'``.

Reading is a splittable DoFn over topic partitions: one restriction per
partition, an offset range read in order, split only by checkpoints (a
partition is Kafka's unit of order and of parallelism). Offsets are committed
to the consumer group in bundle finalization, that is only after the runner
has durably committed the bundle's output: at-least-once delivery.

With ``align_partitions`` the partitions are read in step in event time. The
local runner (FnApiRunner) needs it: it gives the stage fused with the read
no watermark of the read's (its input watermark is the end of time from the
start), so an event-time timer there fires one bundle after it is set while
the partitions drift days apart in event time. See :class:`_ReadPartitionsFn`.

Writing uses an idempotent producer, flushes at the end of each bundle and
fails the bundle if any record was not acknowledged, so that the runner
retries it and nothing is silently dropped.
"""

import collections
import logging
import math
import sys
import threading
import time
import uuid
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration, Timestamp
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from kbml.kafka_client import (
  AcknowledgedProducer,
  KafkaUnreachableError,
  committed_offsets,
  fetched_end_offset,
  list_partitions,
  listed_offsets,
  new_admin_client,
  new_consumer,
  new_probe_consumer,
  newest_record_time_ms,
  offset_for_time,
)
from transforms.batches import Batch

_LOG = logging.getLogger(__name__)

KAFKA_IO_PYTHON = 'python'
KAFKA_IO_JAVA = 'java'

_UNBOUNDED_STOP = sys.maxsize
_FIRST_IDLE_WAIT_S = 0.05
# How often an unbounded read that gets nothing from a partition checks that the partition still holds the
# offsets it read: a broker that lost its data (an in-memory one restarted, a topic deleted and created again)
# would otherwise leave it waiting for offsets that will never come.
_PARTITION_CHECK_S = 10.0


# An unbounded read's partition that is caught up with its end and has fetched nothing for this long stops
# holding the watermark back: its watermark moves up to the newest record time of the topics read, less the lag,
# looked up at most once a second. A record that reaches it later and is older than that is late. (Java KafkaIO's
# timestamp policies move an idle partition's watermark to the wall clock less 2 s; here event time is the
# records' own, which may be far from the wall clock, as in a replay or a simulation.)
_IDLE_WATERMARK_AFTER_S = 2.0
_IDLE_WATERMARK_LAG_MS = 2_000
_IDLE_WATERMARK_LOOKUP_S = 1.0


class PartitionLostError(RuntimeError):
  """A partition no longer holds the records a read has reached: the read cannot go on without losing some."""
# Each partition's watermark is set by hand from the newest record timestamp read.
_RECORD_TIME_WATERMARK = beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())


class KafkaRecord(NamedTuple):
  """One Kafka record, as read by :class:`ReadFromKafka`."""
  topic: str
  partition: int
  offset: int
  timestamp_ms: int
  key: Optional[bytes]
  value: Optional[bytes]
  headers: Tuple[Tuple[str, bytes], ...]


class _ReadSpec(NamedTuple):
  """What to read and when to stop; shared by the DoFn and its restriction provider."""
  consumer_config: Dict[str, str]
  commit_offsets: bool
  stop_at_end: bool
  max_records_per_partition: Optional[int]
  idle_timeout_s: Optional[float]
  read_budget_s: float
  read_budget_records: int
  timeout_s: float
  topics: Tuple[str, ...]
  align_group: Optional[str] = None  # set: partitions are read in step in event time (names the shared progress)
  from_beginning: bool = False
  commit_delay_bundles: int = 0
  batched: bool = False  # each run of a partition's records handed on as one list
  idle_poll_s: float = 1.0
  start_offsets: Optional[Dict[Tuple[str, int], int]] = None  # where given, a partition's read starts here
  start_read_time_ms: Optional[int] = None  # set: each other partition starts at its first record this new

  @property
  def bounded(self) -> bool:
    return self.stop_at_end or self.max_records_per_partition is not None or self.idle_timeout_s is not None


class _CheckpointOnlyOffsetTracker(OffsetRestrictionTracker):
  """An offset tracker that only splits at checkpoints.

  A partition is read in order by one reader: a fractional split would cut it
  into ranges read out of order, and an open-ended range ``[start, maxsize)``
  would be cut at nonsensical offsets.
  """

  def try_split(self, fraction_of_remainder):
    if fraction_of_remainder != 0:
      return None
    return super().try_split(0)

  def is_bounded(self):
    return self.current_restriction().stop != _UNBOUNDED_STOP


class _ListPartitionsFn(beam.DoFn):
  """Turns the topic names into ``(topic, partition)`` pairs at run time."""

  def __init__(self, spec: _ReadSpec):
    self._spec = spec

  def process(self, unused_impulse) -> Iterable[Tuple[str, int]]:
    consumer = new_consumer(self._spec.consumer_config)
    try:
      yield from list_partitions(consumer, self._spec.topics, self._spec.timeout_s)
    finally:
      consumer.close()


# Aligned reads' progress: {align_group: {(topic, partition): newest Kafka timestamp fetched, in ms}}; -inf before
# a partition's first fetch, +inf once it has nothing more to give. Process-wide: an aligned read needs all its
# partitions read in one process, as the local runner does.
_FETCHED_THROUGH: Dict[str, Dict[Tuple[str, int], float]] = {}
_FETCHED_THROUGH_LOCK = threading.Lock()


class _ReadPartitionsFn(beam.DoFn, RestrictionProvider):
  """Reads partitions as a splittable DoFn; see the module docstring.

  It is its own restriction provider. Each ``(topic, partition)`` gets an
  offset range starting at the consumer group's committed offset, else where
  ``auto.offset.reset`` says (``earliest`` by default). The range ends at the
  end offset seen when the read starts (``stop_at_end``), ``max_records``
  later, or never (the reader may still stop on idleness).

  The offsets a bundle reached are committed in its finalization, or
  ``commit_delay_bundles`` bundles of the same partition later (bundles that
  read nothing count too: a partition that goes idle commits all it read).

  Records are fetched into a buffer per partition and emitted when due. An
  ordinary read has every record due at once. An aligned read
  (``align_group``) has only records older than the bundle's alignment
  watermark W due: the least, over the partitions, of the newest timestamp
  fetched, taken when the bundle starts. Records older than W were all
  fetched by then (a partition is in time order), so they are all emitted in
  this bundle, and later bundles emit only records at W or after: downstream,
  events arrive in event-time order from one bundle to the next. A partition
  with nothing more to give (its stop reached, idle past ``idle_timeout_s``,
  or caught up with its end in an unbounded read) holds nobody back; a record
  that reaches it later can come after newer ones of other partitions, as
  with any idleness rule.
  """

  def __init__(self, spec: _ReadSpec):
    self._spec = spec
    self.setup()

  def setup(self):
    self._consumers = {}
    self._positions = {}
    self._committed = {}
    self._uncommitted = collections.defaultdict(collections.deque)  # per partition: offsets reached, oldest first
    self._metadata_consumer = None
    self._buffers = {}  # (topic, partition) -> fetched messages not yet emitted, in offset order
    self._last_record_at = {}
    self._due_before_ms = math.inf
    self._quiet_reads = 0  # consecutive calls of process that emitted nothing
    self._checked_at = {}  # (topic, partition) -> when the partition was last found to hold what was read
    self._failed_commits = {}  # (topic, partition) -> the newest offset whose commit failed, to try again
    self._admin = None
    self._stream_time = (-math.inf, None)  # (when looked up, the newest record time of the topics read, in ms)
    self._broker_tells_stream_time = True  # False once the broker refused the look-up (no MAX_TIMESTAMP)

  def start_bundle(self):
    group = self._spec.align_group
    if group is None:
      return
    with _FETCHED_THROUGH_LOCK:
      if group not in _FETCHED_THROUGH:
        _FETCHED_THROUGH[group] = dict.fromkeys(
            list_partitions(self._metadata_client(), self._spec.topics, self._spec.timeout_s), -math.inf)
      self._due_before_ms = min(_FETCHED_THROUGH[group].values(), default=math.inf)

  def _fetched_through(self, key: Tuple[str, int], timestamp_ms: float):
    if self._spec.align_group is not None:
      with _FETCHED_THROUGH_LOCK:
        progress = _FETCHED_THROUGH[self._spec.align_group]
        progress[key] = max(progress.get(key, -math.inf), timestamp_ms)

  def _caught_up(self, consumer, key: Tuple[str, int]) -> bool:
    """Whether the partition's last fetch reached its end (the high watermark that came with the fetch)."""
    high = consumer.get_watermark_offsets(TopicPartition(*key), cached=True)[1]
    return 0 <= high <= self._positions[key]

  def __getstate__(self):
    return {'_spec': self._spec}

  def __setstate__(self, state):
    self.__init__(state['_spec'])

  def _check_partition_holds_what_was_read(self, key: Tuple[str, int]):
    """Raises :class:`PartitionLostError` when the broker answers that the partition ends before the offset
    reached (or is gone); a broker that does not answer is waited for, as the consumers wait for it."""
    now = time.monotonic()
    if now - self._checked_at.setdefault(key, now) < _PARTITION_CHECK_S:
      return
    self._checked_at[key] = now
    position = self._positions[key]
    consumer = self._metadata_client()
    try:
      high = consumer.get_watermark_offsets(TopicPartition(*key), timeout=5)[1]
      if high < position:  # a listed end is short on some brokers (Tansu): the fetched one is the true end
        high = fetched_end_offset(consumer, *key, max(high, 0), 5)
    except KafkaException as e:
      if e.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
        _LOG.warning('cannot check %s[%d] on the broker (%s): waiting for it', *key, e.args[0])
        return
      high = -1
    except KafkaUnreachableError as e:
      _LOG.warning('cannot check %s[%d] on the broker (%s): waiting for it', *key, e)
      return
    if high < position:
      raise PartitionLostError(
          f'Kafka partition {key[0]}[{key[1]}] ' + ('no longer exists' if high < 0 else f'ends at offset {high}')
          + f', before offset {position} that this pipeline has read: the topic was deleted and created again, or '
          'the broker lost its data (an in-memory broker restarted). Stopping rather than wait for offsets that '
          'will not come: check the broker, then start the pipeline again (its group\'s committed offsets, or '
          '--score-from / the read options, say where it goes on).')

  def _advance_idle_watermark(self, key: Tuple[str, int], watermark_estimator):
    """Moves a caught-up, quiet partition's watermark up to the stream's time (see _IDLE_WATERMARK_AFTER_S)."""
    now = time.monotonic()
    if now - self._last_record_at.get(key, now) < _IDLE_WATERMARK_AFTER_S or not self._broker_tells_stream_time:
      return
    looked_up_at, newest_ms = self._stream_time
    if now - looked_up_at >= _IDLE_WATERMARK_LOOKUP_S:
      try:
        self._admin = self._admin or new_admin_client(self._spec.consumer_config)
        partitions = list_partitions(self._metadata_client(), self._spec.topics, self._spec.timeout_s)
        newest_ms = newest_record_time_ms(self._admin, partitions, self._spec.timeout_s)
      except KafkaException as e:
        if e.args[0].code() in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
          return  # the broker is away: looked up again at the next quiet read
        _LOG.warning('the broker cannot tell the newest record time (%s): an idle partition of %s holds the '
                     'watermark back', e.args[0], ', '.join(self._spec.topics))
        self._broker_tells_stream_time = False
        return
      except KafkaUnreachableError:
        return
      self._stream_time = (now, newest_ms)
    if newest_ms is None:
      return
    idle_watermark = Timestamp(micros=int(min(newest_ms, time.time() * 1000) - _IDLE_WATERMARK_LAG_MS) * 1000)
    current = watermark_estimator.current_watermark()
    if current is None or idle_watermark > current:
      watermark_estimator.set_watermark(idle_watermark)

  def _metadata_client(self):
    if self._metadata_consumer is None:
      self._metadata_consumer = new_probe_consumer(self._spec.consumer_config)
    return self._metadata_consumer

  def _start_offset(self, topic: str, partition: int) -> int:
    if (topic, partition) in (self._spec.start_offsets or {}):
      return self._spec.start_offsets[(topic, partition)]
    consumer = self._metadata_client()
    config = self._spec.consumer_config
    if self._spec.start_read_time_ms is not None:
      return offset_for_time(consumer, topic, partition, self._spec.start_read_time_ms, self._spec.timeout_s)
    if 'group.id' in config and not self._spec.from_beginning:
      committed = committed_offsets(consumer, [(topic, partition)], self._spec.timeout_s)[(topic, partition)]
      if committed >= 0:
        return committed
    low, _ = listed_offsets(consumer, topic, partition, self._spec.timeout_s)
    if config.get('auto.offset.reset', 'earliest') in ('latest', 'largest', 'end'):
      return fetched_end_offset(consumer, topic, partition, low, self._spec.timeout_s)
    return low

  def initial_restriction(self, element):
    topic, partition = element
    start = self._start_offset(topic, partition)
    stop = _UNBOUNDED_STOP
    if self._spec.stop_at_end:
      stop = max(start, fetched_end_offset(self._metadata_client(), topic, partition, start, self._spec.timeout_s))
    if self._spec.max_records_per_partition is not None:
      stop = min(stop, start + self._spec.max_records_per_partition)
    _LOG.info('reading %s[%d] from offset %d to %s', topic, partition, start,
              'the end of the stream' if stop == _UNBOUNDED_STOP else stop)
    return OffsetRange(start, stop)

  def create_tracker(self, restriction):
    return _CheckpointOnlyOffsetTracker(restriction)

  def split(self, element, restriction):
    yield restriction

  def restriction_size(self, element, restriction):
    return 1 if restriction.stop == _UNBOUNDED_STOP else restriction.size()

  def _consumer_at(self, topic: str, partition: int, offset: int):
    """A consumer positioned at ``offset``; kept across bundles to avoid reconnecting."""
    key = (topic, partition)
    if key not in self._consumers:
      self._consumers[key] = new_consumer(self._spec.consumer_config)
    if self._positions.get(key) != offset:
      self._consumers[key].assign([TopicPartition(topic, partition, offset)])
      self._positions[key] = offset
    return self._consumers[key]

  def _commit(self, topic: str, partition: int, next_offset: int):
    """Commits ``next_offset``; one that fails (the broker is away) is tried again at the partition's next read,
    even one that reads nothing: an idle partition would otherwise keep a stale offset."""
    key = (topic, partition)
    try:
      if key not in self._committed:
        # A read from the beginning passes the offsets the group committed before: it must not take them back.
        self._committed[key] = committed_offsets(self._metadata_client(), [key], self._spec.timeout_s)[key]
      # Finalizations of successive bundles may come out of order: never move back.
      if next_offset <= self._committed[key]:
        return
      consumer = self._consumers.get(key) or new_consumer(self._spec.consumer_config)
      consumer.commit(offsets=[TopicPartition(topic, partition, next_offset)], asynchronous=False)
    except (KafkaException, KafkaUnreachableError) as e:
      _LOG.warning('could not commit offset %d of %s[%d] (%s): trying again at its next read', next_offset, topic,
                   partition, e)
      self._failed_commits[key] = max(next_offset, self._failed_commits.get(key, next_offset))
      return
    self._committed[key] = next_offset

  def process(
      self,
      element: Tuple[str, int],
      bundle_finalizer=beam.DoFn.BundleFinalizerParam,
      tracker=beam.DoFn.RestrictionParam(),
      watermark_estimator=_RECORD_TIME_WATERMARK):
    topic, partition = element
    key = (topic, partition)
    spec = self._spec
    if key in self._failed_commits:
      self._commit(topic, partition, self._failed_commits.pop(key))
    restriction = tracker.current_restriction()
    next_offset = restriction.start
    buffer = self._buffers.get(key)
    if not buffer or buffer[0].offset() != next_offset:
      buffer = self._buffers[key] = []  # a new restriction, or another instance read the last part
    consumer = self._consumer_at(topic, partition, buffer[-1].offset() + 1 if buffer else next_offset)
    deadline = time.monotonic() + spec.read_budget_s
    # Once per round over this reader's partitions that all came back empty, one fetch waits for a record: the
    # local runner starts the deferred read again at once, whatever delay it asked for, and would spin. The wait
    # doubles with each quiet round, so that a sparse stream is not held up for long.
    quiet_rounds, rest = divmod(self._quiet_reads, max(1, len(self._consumers)))
    idle_wait_s = 0.0
    if quiet_rounds and not rest:
      idle_wait_s = min(spec.idle_poll_s, _FIRST_IDLE_WAIT_S * 2 ** min(quiet_rounds - 1, 16))
    emitted = 0
    finished = False
    newest_ms = -math.inf
    while not finished and time.monotonic() < deadline and emitted < spec.read_budget_records:
      position = self._positions[key]
      fetched = []
      if len(buffer) < spec.read_budget_records and position < restriction.stop:
        fetched = _fetch(consumer, min(1000, spec.read_budget_records - len(buffer)), restriction.stop,
                         0.1 if spec.bounded else idle_wait_s)
        idle_wait_s = 0.0
      if fetched:
        buffer.extend(fetched)
        self._positions[key] = position = fetched[-1].offset() + 1
        self._last_record_at[key] = time.monotonic()
        self._fetched_through(key, max(m.timestamp()[1] for m in fetched))
      caught_up = not spec.bounded and self._caught_up(consumer, key)
      if position >= restriction.stop:
        self._fetched_through(key, math.inf)
      elif not fetched:
        idle_s = time.monotonic() - self._last_record_at.setdefault(key, time.monotonic())
        if spec.idle_timeout_s is not None and idle_s >= spec.idle_timeout_s:
          self._fetched_through(key, math.inf)
          if not buffer:
            tracker.try_claim(restriction.stop)
            finished = True
        elif caught_up:
          self._fetched_through(key, math.inf)  # an idle partition holds nobody back
          self._advance_idle_watermark(key, watermark_estimator)
        if not spec.bounded:
          self._check_partition_holds_what_was_read(key)
      due = 0
      while (due < len(buffer) and emitted + due < spec.read_budget_records
             and buffer[due].timestamp()[1] < self._due_before_ms):
        due += 1
      if due and tracker.try_claim(buffer[due - 1].offset()):  # claims the due run's offsets up to its last
        records = [KafkaRecord(topic, partition, message.offset(), message.timestamp()[1], message.key(),
                               message.value(), tuple(message.headers() or ())) for message in buffer[:due]]
        if spec.batched:
          yield beam.window.TimestampedValue(Batch(records), records[0].timestamp_ms / 1000.0)
        else:
          for record in records:
            yield beam.window.TimestampedValue(record, record.timestamp_ms / 1000.0)
        newest_ms = max(newest_ms, *(record.timestamp_ms for record in records))
        next_offset = records[-1].offset + 1
        emitted += due
      elif due:
        finished = True  # checkpointed: the residual restriction reads the run again
      del buffer[:due]
      if not buffer and next_offset >= restriction.stop:
        finished = True
      elif not (fetched or due) and spec.align_group is not None:
        break  # nothing more is due before the next bundle's alignment watermark
      elif caught_up:
        break  # live: hand what came to the stages downstream now, rather than wait out the read budget
    if newest_ms > -math.inf:
      newest = Timestamp(micros=newest_ms * 1000)
      current = watermark_estimator.current_watermark()
      if current is None or newest > current:
        watermark_estimator.set_watermark(newest)
    reached = self._uncommitted[key]
    if spec.commit_offsets and next_offset > restriction.start:
      reached.append(next_offset)
    elif any(offset is not None for offset in reached):
      reached.append(None)  # a bundle that read nothing still counts, so an idle partition commits all it read
    if len(reached) > spec.commit_delay_bundles:
      commit_offset = reached.popleft()
      if commit_offset is not None:
        bundle_finalizer.register(lambda: self._commit(topic, partition, commit_offset))
    self._quiet_reads = 0 if emitted else self._quiet_reads + 1
    if not finished:
      tracker.defer_remainder(Duration.of(0) if emitted else Duration.of(0.05))

  def teardown(self):
    for consumer in [*self._consumers.values(), self._metadata_consumer]:
      if consumer is not None:
        consumer.close()
    self.setup()


def _fetch(consumer, count: int, stop: int, timeout_s: float) -> List:
  """Up to ``count`` messages of the consumer's partition before offset ``stop``, waiting at most ``timeout_s``
  for them; raises on a fetch error."""
  messages = consumer.consume(num_messages=count, timeout=timeout_s)
  for message in messages:
    if message.error():
      raise KafkaException(message.error())
  return [message for message in messages if message.offset() < stop]


class _UnboundedReadPartitionsFn(_ReadPartitionsFn):
  """The same reader, declared unbounded: for reads without a stop condition.

  Beam reads a splittable DoFn's parameters from the signature of the
  decorated method itself, so the override restates them.
  """

  @beam.DoFn.unbounded_per_element()
  def process(
      self,
      element: Tuple[str, int],
      bundle_finalizer=beam.DoFn.BundleFinalizerParam,
      tracker=beam.DoFn.RestrictionParam(),
      watermark_estimator=_RECORD_TIME_WATERMARK):
    return super().process(element, bundle_finalizer, tracker, watermark_estimator)


class ReadFromKafka(beam.PTransform):
  """Reads Kafka topics into a PCollection of :class:`KafkaRecord`.

  Element timestamps are the records' Kafka timestamps; the watermark of each
  partition follows the newest record timestamp read from it, and that of a
  caught-up partition that has been quiet for 2 s moves up to the newest
  record time of the topics, less 2 s (see ``_IDLE_WATERMARK_AFTER_S``).

  The read is unbounded unless a stop condition is given: ``stop_at_end``,
  ``max_records_per_partition`` or ``idle_timeout_s`` (any that is met first
  ends a partition).

  Args:
    consumer_config: confluent-kafka (librdkafka) consumer settings, passed
      through unchanged; needs ``bootstrap.servers``. With ``group.id`` the
      read starts at the group's committed offsets and, with
      ``commit_offsets``, commits after each bundle is committed.
    topics: topic names.
    stop_at_end: stop each partition at the end offset seen at the start.
    max_records_per_partition: stop each partition this many offsets after
      its start offset (records, on topics without compaction or
      transactions).
    idle_timeout_s: stop each partition after this long without a record.
    commit_offsets: commit offsets to ``group.id`` in bundle finalization.
    read_budget_s: longest time one bundle reads before it checkpoints; it
      bounds the latency from a record to the output of the fused stage.
    read_budget_records: most records one bundle reads before it checkpoints.
    timeout_s: how long to wait for the cluster before failing clearly.
    from_beginning: start every partition at its earliest offset even when
      the group has committed offsets (to rebuild keyed state from the
      topic); offsets are still committed to the group.
    commit_delay_bundles: commit the offsets a bundle reached only this many
      bundles (of the same partition) later. For stages that hold elements
      in keyed state until a timer fires and keep that state only in memory
      (the local runner): there a timer set in one bundle fires in the next,
      so with a delay of N the outputs of N rounds of timers are written
      before the offsets that fed them are committed.
    align_partitions: read the partitions in step in event time, so that the
      stages fused behind the read get their events in event-time order from
      one bundle to the next (what the local runner's form of the features
      relies on, ``ORDERED_BUNDLES`` in ``transforms/feature_forms.py``). For the local runner, which
      gives those stages no usable watermark (see the module docstring); it
      needs every partition read in one process.
    idle_poll_s: in an unbounded read, the longest that one fetch waits for
      a record once a whole round of the reader's partitions found nothing
      new (the wait starts at 50 ms and doubles with each quiet round). It
      bounds the latency of the first record after a quiet spell, and the
      rate at which an idle read starts bundles: the local runner starts a
      deferred read again at once, whatever delay the read asks for.
    start_offsets: (topic, partition) -> the offset to start that partition
      at, whatever the group committed (where a state snapshot was taken,
      ``transforms/snapshots.py``); the others start as said above.
    start_read_time_ms: start each partition (not in ``start_offsets``) at
      its first record with this Kafka timestamp or a later one, whatever
      the group committed (Beam KafkaIO's ``start_read_time``).
    batched: hand on each run of a partition's records that a bundle emits
      as one element, a :class:`~transforms.batches.Batch` of
      :class:`KafkaRecord` at the time of its first record, rather than one
      element per record (for :class:`~transforms.records.ParseRecords`; see
      ``transforms/batches.py``).
  """

  def __init__(self, consumer_config: Mapping[str, str], topics: Union[str, Sequence[str]], *,
               stop_at_end: bool = False, max_records_per_partition: Optional[int] = None,
               idle_timeout_s: Optional[float] = None, commit_offsets: bool = True,
               read_budget_s: float = 0.5, read_budget_records: int = 20000, timeout_s: float = 15.0,
               align_partitions: bool = False, from_beginning: bool = False, commit_delay_bundles: int = 0,
               batched: bool = False, idle_poll_s: float = 1.0,
               start_offsets: Optional[Mapping[Tuple[str, int], int]] = None,
               start_read_time_ms: Optional[int] = None):
    super().__init__()
    topics = [topics] if isinstance(topics, str) else list(topics)
    if not topics:
      raise ValueError('ReadFromKafka needs at least one topic.')
    self._spec = _ReadSpec(
        consumer_config=dict(consumer_config), commit_offsets=commit_offsets and 'group.id' in consumer_config,
        stop_at_end=stop_at_end, max_records_per_partition=max_records_per_partition,
        idle_timeout_s=idle_timeout_s, read_budget_s=read_budget_s, read_budget_records=read_budget_records,
        timeout_s=timeout_s, topics=tuple(topics), align_group=uuid.uuid4().hex if align_partitions else None,
        from_beginning=from_beginning, commit_delay_bundles=commit_delay_bundles, batched=batched,
        idle_poll_s=idle_poll_s, start_offsets=dict(start_offsets or {}), start_read_time_ms=start_read_time_ms)

  def expand(self, pbegin):
    read = beam.ParDo((_ReadPartitionsFn if self._spec.bounded else _UnboundedReadPartitionsFn)(self._spec))
    return (
        pbegin
        | 'Impulse' >> beam.Impulse()
        | 'ListPartitions' >> beam.ParDo(_ListPartitionsFn(self._spec))
        | 'ReadPartitions' >> (read.with_output_types(Batch) if self._spec.batched else read))


KafkaData = Optional[Union[bytes, str]]
KafkaMessage = Union[Tuple[KafkaData, KafkaData], Tuple[KafkaData, KafkaData, Sequence[Tuple[str, bytes]]]]


def _as_bytes(data):
  return data.encode('utf-8') if isinstance(data, str) else data


class _ProduceFn(beam.DoFn):
  """Produces each element; the bundle fails unless every record was acknowledged."""

  def __init__(self, producer_config: Mapping[str, str], topic: str, flush_timeout_s: float, timeout_s: float):
    self._config = dict(producer_config)
    self._topic = topic
    self._flush_timeout_s = flush_timeout_s
    self._timeout_s = timeout_s
    self._producer = None

  def setup(self):
    self._producer = AcknowledgedProducer(self._config)
    self._producer.check_reachable(self._timeout_s)

  def process(self, element: KafkaMessage):
    key, value, *rest = element
    headers = list(rest[0]) if rest and rest[0] else None
    self._producer.send(self._topic, _as_bytes(value), _as_bytes(key), headers)

  def finish_bundle(self):
    undelivered, reasons = self._producer.flush(self._flush_timeout_s)
    if undelivered:
      raise RuntimeError(
          f'{undelivered} records of this bundle were not delivered to Kafka topic {self._topic!r} '
          f'({"; ".join(reasons)}). The bundle fails so that the runner retries it and no record is lost.')

  def teardown(self):
    if self._producer is not None:
      self._producer.flush(self._flush_timeout_s)


class WriteToKafka(beam.PTransform):
  """Writes ``(key, value)`` or ``(key, value, headers)`` elements to a topic.

  Keys and values are bytes, str (written as UTF-8) or None; headers a
  sequence of ``(name, bytes)``. The producer is idempotent, so retries
  within a bundle do not duplicate records; a retried bundle may (at-least-once).

  Args:
    producer_config: confluent-kafka producer settings, passed through.
    topic: the topic to write to.
    flush_timeout_s: how long the end of a bundle waits for acknowledgements.
    timeout_s: how long to wait for the cluster before failing clearly.
  """

  def __init__(self, producer_config: Mapping[str, str], topic: str, *, flush_timeout_s: float = 60.0,
               timeout_s: float = 15.0):
    super().__init__()
    self._fn = _ProduceFn(producer_config, topic, flush_timeout_s, timeout_s)

  def expand(self, pcoll):
    return pcoll | 'Produce' >> beam.ParDo(self._fn)


def _record_from_java_row(row) -> KafkaRecord:
  return KafkaRecord(row.topic, row.partition, row.offset, row.timestamp, row.key, row.value,
                     tuple((h.key, h.value) for h in (row.headers or ())))


class _JavaReadFromKafka(beam.PTransform):
  """Beam's Java KafkaIO read, emitting :class:`KafkaRecord` like the Python one."""

  def __init__(self, consumer_config, topics, expansion_service, max_num_records, max_read_time_s,
               start_read_time_ms):
    super().__init__()
    from apache_beam.io import kafka
    self._read = kafka.ReadFromKafka(
        consumer_config=dict(consumer_config), topics=list(topics), with_metadata=True,
        commit_offset_in_finalize='group.id' in consumer_config, max_num_records=max_num_records,
        max_read_time=max_read_time_s, start_read_time=start_read_time_ms, expansion_service=expansion_service)

  def expand(self, pbegin):
    return pbegin | 'JavaKafkaIO' >> self._read | 'ToKafkaRecord' >> beam.Map(_record_from_java_row)


class _JavaWriteToKafka(beam.PTransform):
  """Beam's Java KafkaIO write for ``(key, value)`` elements (headers are not written)."""

  def __init__(self, producer_config, topic, expansion_service):
    super().__init__()
    from apache_beam.io import kafka
    self._write = kafka.WriteToKafka(producer_config=dict(producer_config), topic=topic,
                                     expansion_service=expansion_service)

  def expand(self, pcoll):
    return (pcoll
            | 'ToKeyValueBytes' >> beam.Map(lambda e: (_as_bytes(e[0]) or b'', _as_bytes(e[1]) or b''))
            .with_output_types(Tuple[bytes, bytes])
            | 'JavaKafkaIO' >> self._write)


def read_from_kafka(kafka_io: str, consumer_config: Mapping[str, str], topics: Sequence[str], *,
                    expansion_service: Optional[str] = None, **bounds) -> beam.PTransform:
  """Returns the Kafka read transform for ``kafka_io`` (``python`` or ``java``).

  Args:
    kafka_io: ``python`` for :class:`ReadFromKafka`; ``java`` for Beam's
      cross-language KafkaIO, which needs a Java expansion service (started
      from Maven by Beam, or given as ``expansion_service`` host:port).
    consumer_config: consumer settings.
    topics: topic names.
    expansion_service: address of a running Kafka expansion service (java).
    **bounds: :class:`ReadFromKafka` start and stop conditions; with
      ``java`` only ``max_records_per_partition`` (as a total),
      ``idle_timeout_s`` (as a read time) and ``start_read_time_ms`` have an
      equivalent.
  """
  if kafka_io == KAFKA_IO_PYTHON:
    return ReadFromKafka(consumer_config, topics, **bounds)
  if kafka_io == KAFKA_IO_JAVA:
    bounds.pop('align_partitions', None)  # Beam's KafkaIO runs where the runner tracks the watermark
    bounds.pop('batched', None)  # and reads record by record
    if bounds.get('from_beginning') or bounds.get('commit_delay_bundles') or bounds.get('start_offsets'):
      raise ValueError('Beam\'s Java KafkaIO cannot rebuild state from the beginning of the topics or delay its '
                       'commits: use --kafka-io=python.')
    if bounds.get('stop_at_end'):
      raise ValueError('Beam\'s Java KafkaIO cannot stop at the end offsets: use --kafka-io=python.')
    return _JavaReadFromKafka(consumer_config, topics, expansion_service,
                              bounds.get('max_records_per_partition'), bounds.get('idle_timeout_s'),
                              bounds.get('start_read_time_ms'))
  raise ValueError(f'Unknown Kafka IO {kafka_io!r}: choose {KAFKA_IO_PYTHON!r} or {KAFKA_IO_JAVA!r}.')


def write_to_kafka(kafka_io: str, producer_config: Mapping[str, str], topic: str, *,
                   expansion_service: Optional[str] = None) -> beam.PTransform:
  """Returns the Kafka write transform for ``kafka_io`` (``python`` or ``java``)."""
  if kafka_io == KAFKA_IO_PYTHON:
    return WriteToKafka(producer_config, topic)
  if kafka_io == KAFKA_IO_JAVA:
    return _JavaWriteToKafka(producer_config, topic, expansion_service)
  raise ValueError(f'Unknown Kafka IO {kafka_io!r}: choose {KAFKA_IO_PYTHON!r} or {KAFKA_IO_JAVA!r}.')

