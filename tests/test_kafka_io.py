"""The Beam Kafka source and sink against the real local broker."""

import subprocess
import sys
import threading
import time
from collections import defaultdict

import apache_beam as beam
import pytest
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.pipeline import PipelineVisitor
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp
from confluent_kafka import Producer

from kbml.kafka_client import StallWatch, committed_offsets, new_consumer
from kbml.local_stack import LocalStack, free_port
from tests.conftest import consume, local_options, produce
from transforms.kafka_io import ReadFromKafka, WriteToKafka

# Records as one bundle emits them, in emission order; the pinned local runner runs
# the pipeline in this process, so the order a DoFn sees is observable here.
_EMITTED = defaultdict(list)
_EMITTED_LOCK = threading.Lock()


def _record_emission(record):
  with _EMITTED_LOCK:
    _EMITTED[record.topic].append((record.partition, record.offset))
  return record


def _messages(count, start=0):
  return [(b'key-%d' % (i % 1000), b'value-%d' % i, [('seq', b'%d' % i)]) for i in range(start, start + count)]


def _group_offsets(bootstrap, group, topic, partitions):
  consumer = new_consumer({'bootstrap.servers': bootstrap, 'group.id': group})
  try:
    return committed_offsets(consumer, [(topic, p) for p in range(partitions)])
  finally:
    consumer.close()


def test_bounded_read_returns_every_record_in_partition_order(bootstrap, new_topic):
  topic = new_topic(partitions=4)
  sent = _messages(50_000)
  produce(bootstrap, topic, sent)

  with TestPipeline(options=local_options()) as p:
    records = (p
               | ReadFromKafka({'bootstrap.servers': bootstrap}, topic, stop_at_end=True)
               | 'RecordEmissionOrder' >> beam.Map(_record_emission))
    assert_that(records | beam.Map(lambda r: (r.key, r.value, r.headers)),
                equal_to([(k, v, tuple(h)) for k, v, h in sent]))

  emitted = _EMITTED.pop(topic)
  assert len(emitted) == 50_000
  by_partition = defaultdict(list)
  for partition, offset in emitted:
    by_partition[partition].append(offset)
  assert sorted(by_partition) == [0, 1, 2, 3]
  for offsets in by_partition.values():
    assert offsets == list(range(len(offsets))), 'each partition is emitted in offset order, without gaps'


def test_batched_read_hands_on_runs_of_one_partition_in_offset_order(bootstrap, new_topic):
  topic = new_topic(partitions=2)
  sent = _messages(3_000)
  produce(bootstrap, topic, sent)

  with TestPipeline(options=local_options()) as p:
    runs = p | ReadFromKafka({'bootstrap.servers': bootstrap}, topic, stop_at_end=True, read_budget_records=250,
                             batched=True)
    assert_that(runs | beam.FlatMap(lambda run: [(r.key, r.value, r.headers) for r in run]),
                equal_to([(k, v, tuple(h)) for k, v, h in sent]), label='EveryRecordOnce')
    assert_that(
        runs | beam.Map(lambda run: (len({r.partition for r in run}) == 1 and 0 < len(run) <= 250
                                     and [r.offset for r in run] == list(range(run[0].offset, run[-1].offset + 1))))
        | beam.Distinct(),
        equal_to([True]), label='RunsOfConsecutiveOffsets')


def _read_values(bootstrap, topic, group, **bounds):
  with TestPipeline(options=local_options()) as p:
    values = (p
              | ReadFromKafka({'bootstrap.servers': bootstrap, 'group.id': group}, topic, **bounds)
              | beam.Map(lambda r: r.value))
    yield values


def test_consumer_group_resumes_after_its_committed_offsets(bootstrap, new_topic, group_id):
  topic = new_topic(partitions=4)
  produce(bootstrap, topic, _messages(5_000))
  for values in _read_values(bootstrap, topic, group_id, stop_at_end=True):
    assert_that(values | beam.combiners.Count.Globally(), equal_to([5_000]))
  assert sum(_group_offsets(bootstrap, group_id, topic, 4).values()) == 5_000

  second = _messages(10_000, start=5_000)
  produce(bootstrap, topic, second)
  for values in _read_values(bootstrap, topic, group_id, stop_at_end=True):
    assert_that(values, equal_to([v for _, v, _ in second]))
  assert sum(_group_offsets(bootstrap, group_id, topic, 4).values()) == 15_000


def test_delayed_commits_catch_up_once_the_partition_is_idle(bootstrap, new_topic, group_id):
  topic = new_topic(partitions=1)
  produce(bootstrap, topic, _messages(1_000))
  for values in _read_values(bootstrap, topic, group_id, idle_timeout_s=3, read_budget_records=100,
                             commit_delay_bundles=2):
    assert_that(values | beam.combiners.Count.Globally(), equal_to([1_000]))
  assert _group_offsets(bootstrap, group_id, topic, 1)[(topic, 0)] == 1_000, \
      'the bundles that read nothing while idle let the last two bundles commit'


class _FailOnValue(beam.DoFn):
  def __init__(self, value):
    self._value = value

  def process(self, record):
    if record.value == self._value:
      raise RuntimeError('injected failure')
    yield record


def test_failed_bundle_does_not_commit_its_offsets(bootstrap, new_topic, group_id):
  topic = new_topic(partitions=1)
  produce(bootstrap, topic, _messages(2_000))
  config = {'bootstrap.servers': bootstrap, 'group.id': group_id}

  with pytest.raises(Exception, match='injected failure'):
    with TestPipeline(options=local_options()) as p:
      _ = (p
           | ReadFromKafka(config, topic, stop_at_end=True, read_budget_records=250)
           | beam.ParDo(_FailOnValue(b'value-700')))
  committed = _group_offsets(bootstrap, group_id, topic, 1)[(topic, 0)]
  assert 0 < committed <= 700, 'bundles before the failure commit, the failed one does not'

  with TestPipeline(options=local_options()) as p:
    offsets = p | ReadFromKafka(config, topic, stop_at_end=True) | beam.Map(lambda r: r.offset)
    assert_that(offsets, equal_to(list(range(committed, 2_000))))


def test_a_read_from_the_beginning_never_moves_the_committed_offsets_back(bootstrap, new_topic, group_id):
  topic = new_topic(partitions=1)
  produce(bootstrap, topic, _messages(2_000))
  for values in _read_values(bootstrap, topic, group_id, stop_at_end=True):
    assert_that(values | beam.combiners.Count.Globally(), equal_to([2_000]))

  config = {'bootstrap.servers': bootstrap, 'group.id': group_id}
  with pytest.raises(Exception, match='injected failure'):
    with TestPipeline(options=local_options()) as p:
      _ = (p
           | ReadFromKafka(config, topic, stop_at_end=True, from_beginning=True, read_budget_records=250)
           | beam.ParDo(_FailOnValue(b'value-700')))
  assert _group_offsets(bootstrap, group_id, topic, 1)[(topic, 0)] == 2_000, \
      'a rebuild that fails half way leaves the group where it was, not at the offsets it re-read'


def test_unbounded_pipeline_delivers_a_new_record_within_5_seconds(bootstrap, new_topic, group_id):
  source, sink = new_topic(partitions=4, suffix='-in'), new_topic(partitions=4, suffix='-out')
  mirror = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.mirror', '--bootstrap_servers', bootstrap, '--input_topic', source,
       '--output_topic', sink, '--consumer_group', group_id],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    produce(bootstrap, source, [(b'warm-up', b'warm-up', [])])
    assert len(consume(bootstrap, sink, 1, timeout_s=120)) == 1, 'the mirror pipeline did not start'

    produce(bootstrap, source, [(b'probe', b'probe', [('h', b'1')])])
    sent_at = time.monotonic()
    delivered = consume(bootstrap, sink, 2, timeout_s=5)
    latency = time.monotonic() - sent_at
    # The two keys may land on different partitions, so the sink can hand them back in either order.
    by_value = {m.value(): m for m in delivered}
    assert sorted(by_value) == [b'probe', b'warm-up'] and latency < 5, latency
    assert by_value[b'probe'].headers() == [('h', b'1')]
  finally:
    mirror.kill()
    mirror.wait()


def test_unreachable_bootstrap_server_fails_clearly_within_30_seconds():
  address = f'127.0.0.1:{free_port()}'
  started = time.monotonic()
  with pytest.raises(Exception, match=f'Kafka at {address!r} did not answer'):
    with TestPipeline(options=local_options()) as p:
      _ = p | ReadFromKafka({'bootstrap.servers': address}, 'transactions', stop_at_end=True, timeout_s=10)
  assert time.monotonic() - started < 30


class _StopBrokerOnFirstElement(beam.DoFn):
  """Stops the broker after the sink has connected, before its records are sent."""

  def __init__(self, state_dir):
    self._state_dir = state_dir

  def process(self, element):
    LocalStack(self._state_dir).down(grace_s=0)
    yield element


def test_write_fails_the_bundle_when_the_broker_goes_away(tmp_path):
  stack = LocalStack(str(tmp_path), topics=('lost',), partitions=1)
  config = {'bootstrap.servers': stack.up(port=0), 'message.timeout.ms': '3000'}
  try:
    with pytest.raises(Exception, match="10 records of this bundle were not delivered to Kafka topic 'lost'"):
      with TestPipeline(options=local_options()) as p:
        _ = (p
             | beam.Create([(b'k', b'v')] * 10)
             | beam.ParDo(_StopBrokerOnFirstElement(str(tmp_path)))
             | WriteToKafka(config, 'lost'))
  finally:
    stack.down(grace_s=0)


def test_write_delivers_keys_values_and_headers(bootstrap, new_topic):
  topic = new_topic(partitions=1)
  elements = [(b'k%d' % i, 'text-%d' % i, [('n', b'%d' % i)]) for i in range(100)] + [(None, b'no-key')]
  with TestPipeline(options=local_options()) as p:
    _ = p | beam.Create(elements) | WriteToKafka({'bootstrap.servers': bootstrap}, topic)
  received = [(m.key(), m.value(), m.headers()) for m in consume(bootstrap, topic, 101)]
  assert received == [(b'k%d' % i, b'text-%d' % i, [('n', b'%d' % i)]) for i in range(100)] + [(None, b'no-key', None)]


def test_a_consumer_that_fetches_nothing_while_records_wait_counts_as_stalled(bootstrap, new_topic):
  topic = new_topic(partitions=1)
  watch = StallWatch({'bootstrap.servers': bootstrap}, check_s=0, stall_s=1)
  assert not watch.stalled({(topic, 0): 0}), 'nothing waits in an empty partition'
  produce(bootstrap, topic, [(b'k', b'v', [])])
  assert not watch.stalled({(topic, 0): 1}), 'nothing waits at the end'
  assert not watch.stalled({(topic, 0): 0}), 'a record waits, not yet for stall_s'
  deadline = time.monotonic() + 10
  while not watch.stalled({(topic, 0): 0}):
    assert time.monotonic() < deadline, 'a record waited past stall_s and the consumer did not count as stalled'
    time.sleep(0.2)
  watch.close()
  # A broker that does not answer is waited for: no client to create again.
  unreachable = StallWatch({'bootstrap.servers': f'127.0.0.1:{free_port()}'}, check_s=0, stall_s=0)
  assert not unreachable.stalled({(topic, 0): 0})
  unreachable.close()


def _partition_reader(read: ReadFromKafka) -> beam.DoFn:
  """The splittable DoFn that ``read`` applies, found in the graph it builds."""
  readers = []

  class FindReader(PipelineVisitor):
    def visit_transform(self, node):
      if node.full_label.endswith('/ReadPartitions'):
        readers.append(node.transform.fn)

  pipeline = beam.Pipeline()
  _ = pipeline | read
  pipeline.visit(FindReader())
  return readers[0]


def test_a_caught_up_quiet_partition_stops_holding_the_watermark_back(bootstrap, new_topic):
  # Partition 0 goes on to a minute after partition 1's only record. No local runner holds a stage's watermark
  # at its slowest partition (Flink and Dataflow do), so the reader runs here bundle after bundle as a runner
  # calls it, with its watermark estimator: before the fix, partition 1 stayed at its record's time for good.
  topic = new_topic(partitions=2)
  start_ms = 1_533_081_600_000
  producer = Producer({'bootstrap.servers': bootstrap})
  producer.produce(topic, b'only', partition=1, timestamp=start_ms)
  for second in range(61):
    producer.produce(topic, b'%d' % second, partition=0, timestamp=start_ms + 1000 * second)
  assert producer.flush(30) == 0
  reader = _partition_reader(ReadFromKafka({'bootstrap.servers': bootstrap}, topic))
  reader.setup()
  restriction = reader.initial_restriction((topic, 1))
  watermark = ManualWatermarkEstimator(None)
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline and watermark.current_watermark() != Timestamp(micros=(start_ms + 58_000) * 1000):
    tracker = ThreadsafeRestrictionTracker(reader.create_tracker(restriction))
    emitted = list(reader.process((topic, 1), None, RestrictionTrackerView(tracker), watermark))
    restriction = tracker.deferred_status()[0]
    assert [timestamped.value.value for timestamped in emitted] in ([], [b'only'])
  reader.teardown()
  # The newest record time of the topic, less the 2 s lag for records still on their way.
  assert watermark.current_watermark() == Timestamp(micros=(start_ms + 58_000) * 1000)
