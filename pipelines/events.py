"""The events every fraud pipeline reads: transactions and labels from Kafka, validated, in event time."""

import json
import logging
import os
import time
from typing import Dict, Optional, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from confluent_kafka import TopicPartition

from kbml.kafka_client import PartitionOffsets, fetched_end_offset, listed_offsets, new_probe_consumer
from kbml.local_state import local_state_dir
from pipelines.options import KafkaOptions, runs_in_process
from transforms.features import (
  DAY_SECONDS,
  DEFAULT_LABEL_DELAY_DAYS,
  GROUPED,
  HISTORY_DAYS,
  KEYED_STATE,
  ORDERED_BUNDLES,
  snapshot_identity,
)
from transforms.kafka_io import read_from_kafka, write_to_kafka
from transforms.records import (
  DEAD_LETTER_TAG,
  LABEL_SCHEMA,
  TRANSACTION_SCHEMA,
  DeadLetter,
  EventTimeLimits,
  ParseRecords,
  Transaction,
  dead_letter_message,
  transaction_record,
)
from transforms.snapshots import StateSnapshots


class EventOptions(PipelineOptions):
  """The topics of the events every fraud pipeline reads, and the features' label delay."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--transactions_topic', default='transactions')
    parser.add_argument('--labels_topic', default='labels', help='Labels feed the terminal features.')
    parser.add_argument('--dead_letter_topic', default='dead-letter', help='Where invalid records go, with the reason.')
    parser.add_argument('--label_delay_days', type=float, default=DEFAULT_LABEL_DELAY_DAYS,
                        help='The delay d of the terminal features (a model is scored with the one it was trained '
                        'with).')
    parser.add_argument(
        '--max_event_time_ahead_s', type=float, default=3600.0,
        help='A transaction or label whose tx_datetime is more than this many seconds after its record\'s Kafka '
        'timestamp is a dead letter (clock skew allowance).')
    parser.add_argument(
        '--max_transaction_lateness_days', type=float, default=HISTORY_DAYS,
        help='A transaction produced more than this many days after its tx_datetime is a dead letter: every '
        'record\'s Kafka timestamp must be its event time. Default: the longest history, beyond which a '
        'transaction changes no feature.')
    parser.add_argument(
        '--state_snapshot',
        help='Streaming on the local runner: the file the feature histories are saved to now and then, with the '
        'offsets they reflect, and loaded from at a restart, which then reads on from those offsets instead of '
        'the beginning of the topics (default: .kbml/snapshots/CONSUMER_GROUP.features).')
    parser.add_argument('--state_snapshot_interval_s', type=float, default=60.0,
                        help='Seconds between two snapshots; 0: none (every start reads the topics from the '
                        'beginning).')

  def time_limits(self) -> Dict[str, EventTimeLimits]:
    """Per topic, how far a record's event time may be from its Kafka timestamp."""
    lateness_s = self.max_transaction_lateness_days * DAY_SECONDS
    return {self.transactions_topic: EventTimeLimits(self.max_event_time_ahead_s, lateness_s),
            self.labels_topic: EventTimeLimits(self.max_event_time_ahead_s, None)}


def feature_form(options: PipelineOptions, bounded: bool) -> str:
  """How ComputeFeatures runs (transforms/features.py): grouped for bounded input; for a stream, in bundles read
  in event-time step on the local runner (``align_partitions``), in keyed state elsewhere."""
  if bounded:
    return GROUPED
  return ORDERED_BUNDLES if runs_in_process(options) else KEYED_STATE


class ReadEvents(beam.PTransform):
  """Reads the transactions and labels topics; invalid records go to the dead-letter topic with the reason.

  Applied to a pipeline's beginning, it returns the valid
  :class:`~transforms.records.Transaction` and :class:`~transforms.records.Label` events, with their records'
  Kafka timestamps (in :class:`~transforms.batches.Batch` elements for ``ORDERED_BUNDLES``).

  Args:
    options: the pipeline's options (EventOptions, KafkaOptions).
    config: the Kafka client settings (:func:`pipelines.options.kafka_config`).
    group: the consumer group whose offsets the read starts from and commits; None: no group.
    form: the form of ComputeFeatures the events feed (:func:`feature_form`). ``ORDERED_BUNDLES`` reads the
      partitions in event-time step, and in Batches (:class:`~transforms.kafka_io.ReadFromKafka`'s ``batched``),
      which that form takes.
    first_new: per topic and partition, the first offset not read before, when the read starts from the
      beginning of the topics to rebuild state: the invalid records before it were sent to the dead-letter
      topic when they were first read, and are not sent again.
    **read_bounds: :class:`~transforms.kafka_io.ReadFromKafka` stop and alignment settings.
  """

  def __init__(self, options: PipelineOptions, config: Dict[str, str], group: Optional[str], form: str,
               first_new: Optional[Dict[str, PartitionOffsets]] = None, **read_bounds):
    super().__init__()
    self._options = options
    self._config = config
    self._group = group
    self._form = form
    self._first_new = first_new or {}
    self._read_bounds = read_bounds

  def expand(self, pbegin):
    kafka = self._options.view_as(KafkaOptions)
    events = self._options.view_as(EventOptions)
    read_bounds = dict(self._read_bounds)
    if self._form == ORDERED_BUNDLES:
      read_bounds.update(align_partitions=True, batched=True)
    records = pbegin | 'ReadTransactionsAndLabels' >> read_from_kafka(
        kafka.kafka_io, {**self._config, 'group.id': self._group} if self._group else self._config,
        [events.transactions_topic, events.labels_topic], expansion_service=kafka.kafka_expansion_service,
        idle_timeout_s=kafka.idle_timeout_s, **read_bounds)
    parsed = records | 'ParseRecords' >> ParseRecords(
        {events.transactions_topic: TRANSACTION_SCHEMA, events.labels_topic: LABEL_SCHEMA}, events.time_limits())
    first_new = self._first_new
    _ = (parsed[DEAD_LETTER_TAG]
         | 'NewDeadLetters' >> beam.Filter(
             lambda dead: dead.record.offset >= first_new.get(dead.record.topic, {}).get(dead.record.partition, 0))
         | 'WriteDeadLetters' >> WriteDeadLetters(self._options, self._config))
    return parsed['records']


class WriteDeadLetters(beam.PTransform):
  """Writes :class:`~transforms.records.DeadLetter` elements to the dead-letter topic.

  Args:
    options: the pipeline's options (EventOptions, KafkaOptions).
    config: the Kafka client settings.
  """

  def __init__(self, options: PipelineOptions, config: Dict[str, str]):
    super().__init__()
    self._options = options
    self._config = config

  def expand(self, letters):
    kafka = self._options.view_as(KafkaOptions)
    return (letters
            | 'ToDeadLetterMessages' >> beam.Map(dead_letter_message)
            | 'WriteToKafka' >> write_to_kafka(kafka.kafka_io, self._config,
                                               self._options.view_as(EventOptions).dead_letter_topic,
                                               expansion_service=kafka.kafka_expansion_service))


def repeat_dead_letter(transaction: Transaction, transactions_topic: str) -> DeadLetter:
  return DeadLetter(transaction_record(transaction, transactions_topic),
                    f'repeated transaction_id {transaction.transaction_id}: customer {transaction.customer_id} '
                    f'already has a transaction with this id within its {HISTORY_DAYS} days of history, and the '
                    'first one wins (this one got no features, no prediction and no warehouse row)')


class WriteRepeatsToDeadLetters(beam.PTransform):
  """Sends ComputeFeatures' repeated transactions to the dead-letter topic, those at or after ``first_new``.

  Applied to :class:`~transforms.features.FeatureOutputs` ``repeated``.

  Args:
    options: the pipeline's options (EventOptions, KafkaOptions).
    config: the Kafka client settings.
    first_new: per transactions partition, the first offset not read before (see :class:`ReadEvents`).
  """

  def __init__(self, options: PipelineOptions, config: Dict[str, str], first_new: Optional[PartitionOffsets] = None):
    super().__init__()
    self._options = options
    self._config = config
    self._first_new = first_new or {}

  def expand(self, repeated):
    first_new = self._first_new
    return (repeated
            | 'NewRepeats' >> beam.Filter(
                lambda transaction: transaction.kafka_offset >= first_new.get(transaction.kafka_partition, 0))
            | 'ToDeadLetters' >> beam.Map(repeat_dead_letter, self._options.view_as(EventOptions).transactions_topic)
            | 'WriteDeadLetters' >> WriteDeadLetters(self._options, self._config))


def feature_snapshots(options: PipelineOptions, group: Optional[str], form: str) -> Optional[StateSnapshots]:
  """The snapshots of a streaming pipeline's feature histories (:class:`~transforms.snapshots.StateSnapshots`).

  None where the runner keeps the state itself (keyed state, checkpointed by
  Flink and Dataflow), for bounded runs, without a consumer group, or with
  ``--state-snapshot-interval-s 0``.
  """
  events = options.view_as(EventOptions)
  if form != ORDERED_BUNDLES or group is None or not events.state_snapshot_interval_s:
    return None
  path = events.state_snapshot or os.path.join(local_state_dir(), 'snapshots', f'{group}.features')
  return StateSnapshots(path, snapshot_identity(events.label_delay_days, events.transactions_topic,
                                                events.labels_topic), events.state_snapshot_interval_s)


def _holds_the_last_applied(consumer, topic: str, partition: int, offset: int, transaction_id: Optional[int]) -> bool:
  """Whether the record before ``offset`` is the one of ``transaction_id`` (True when there is nothing to
  compare: no marker, or retention deleted the record)."""
  if transaction_id is None or offset <= 0:
    return True
  consumer.assign([TopicPartition(topic, partition, offset - 1)])
  try:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
      for message in consumer.consume(1, 0.5):
        if message.error() or message.offset() != offset - 1:
          return True
        try:
          return json.loads(message.value()).get('transaction_id') == transaction_id
        except (ValueError, TypeError, AttributeError, RecursionError):
          return False
    return True
  finally:
    consumer.unassign()


def snapshot_start_offsets(snapshots: Optional[StateSnapshots], config: Dict[str, str]) -> Dict[Tuple[str, int], int]:
  """Per (topic, partition), the offset a pipeline resuming from the newest snapshot reads on from.

  A snapshot of other topics than those there now (its offsets lie beyond
  the ends of the partitions, or the record before an offset is not the
  transaction it applied last: the topics were deleted and created again) is
  set aside (renamed ``*.stale``) and the state is rebuilt from the beginning
  of the topics. Records that retention deleted after the snapshot was taken
  are missing from the state: that is logged.
  """
  header = snapshots.header() if snapshots is not None else None
  if header is None:
    return {}
  topics = header.identity['streams']
  offsets = {}
  consumer = new_probe_consumer(config)
  try:
    for (kind, partition), offset in header.offsets.items():
      topic = topics[kind]
      offsets[(topic, partition)] = offset
      low, high = listed_offsets(consumer, topic, partition)
      # A listed end is short on some brokers (Tansu): only the fetched end tells a recreated topic.
      beyond_the_end = offset > high and offset > fetched_end_offset(consumer, topic, partition, low)
      if beyond_the_end or not _holds_the_last_applied(consumer, topic, partition, offset,
                                                       header.markers.get((kind, partition))):
        os.replace(snapshots.path, f'{snapshots.path}.stale')
        logging.warning('the state snapshot %s reflects %s[%d] up to offset %d, which the partition does not hold '
                        'as it did: the topic was created again; set the snapshot aside and rebuilding the state '
                        'from the beginning of the topics', snapshots.path, topic, partition, offset)
        return {}
      if offset < low:
        logging.warning('%s[%d]: retention deleted offsets %d to %d after the state snapshot was taken; the '
                        'histories miss those records (keep the topics longer than --state-snapshot-interval-s)',
                        topic, partition, offset, low - 1)
  finally:
    consumer.close()
  logging.info('resuming the feature histories from the snapshot %s, at offsets %s', snapshots.path, offsets)
  return offsets
