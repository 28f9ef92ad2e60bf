"""The events every pipeline reads: a use case's events and labels from Kafka, validated, in event time."""

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
from transforms.feature_forms import GROUPED, KEYED_STATE, ORDERED_BUNDLES
from transforms.kafka_io import read_from_kafka, write_to_kafka
from transforms.records import (
  DAY_SECONDS,
  DEAD_LETTER_TAG,
  DeadLetter,
  EventTimeLimits,
  ParseRecords,
  dead_letter_message,
)
from transforms.snapshots import StateSnapshots
from transforms.use_case import DEFAULT_USE_CASE, UseCase, load_use_case


class EventOptions(PipelineOptions):
  """The use case whose events the pipelines read, its topics, and the features' label delay."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--use_case', default=DEFAULT_USE_CASE,
                        help='fraud (the default), iot, or the dotted name of a module of yours that declares a '
                        'USE_CASE (transforms/use_case.py).')
    parser.add_argument('--events_topic', '--transactions_topic', dest='events_topic',
                        help='The use case\'s events (default: its own name for them, e.g. transactions).')
    parser.add_argument('--labels_topic', help='The use case\'s labels (default: labels).')
    parser.add_argument('--dead_letter_topic', default='dead-letter', help='Where invalid records go, with the reason.')
    parser.add_argument('--label_delay_days', type=float,
                        help='How long after an event its label arrives, which the features take into account (a '
                        'model is scored with the one it was trained with; default: the use case\'s, 7 for fraud).')
    parser.add_argument(
        '--max_event_time_ahead_s', type=float, default=3600.0,
        help='An event or label whose own time is more than this many seconds after its record\'s Kafka '
        'timestamp is a dead letter (clock skew allowance).')
    parser.add_argument(
        '--max_event_lateness_days', '--max_transaction_lateness_days', dest='max_event_lateness_days', type=float,
        help='An event produced more than this many days after its own time is a dead letter: every record\'s '
        'Kafka timestamp must be its event time. Default: the use case\'s, its longest history, beyond which an '
        'event changes no feature.')
    parser.add_argument(
        '--state_snapshot',
        help='Streaming on the local runner: the file the feature histories are saved to now and then, with the '
        'offsets they reflect, and loaded from at a restart, which then reads on from those offsets instead of '
        'the beginning of the topics (default: .kbml/snapshots/CONSUMER_GROUP.features).')
    parser.add_argument('--state_snapshot_interval_s', type=float, default=60.0,
                        help='Seconds between two snapshots; 0: none (every start reads the topics from the '
                        'beginning).')

  def declared_use_case(self) -> UseCase:
    """The use case ``--use-case`` names."""
    return load_use_case(self.use_case)

  def events_topic_or_default(self) -> str:
    return self.events_topic or self.declared_use_case().events_topic

  def labels_topic_or_default(self) -> str:
    return self.labels_topic or self.declared_use_case().labels_topic

  def label_delay(self) -> float:
    """The label delay in days: as given, else the use case's."""
    given = self.label_delay_days
    return self.declared_use_case().default_label_delay_days if given is None else given

  def time_limits(self) -> Dict[str, EventTimeLimits]:
    """Per topic, how far a record's event time may be from its Kafka timestamp."""
    lateness_days = self.max_event_lateness_days
    if lateness_days is None:
      lateness_days = self.declared_use_case().max_event_lateness_days
    return {self.events_topic_or_default(): EventTimeLimits(self.max_event_time_ahead_s, lateness_days * DAY_SECONDS),
            self.labels_topic_or_default(): EventTimeLimits(self.max_event_time_ahead_s, None)}


def feature_form(options: PipelineOptions, bounded: bool) -> str:
  """How the use case's feature transform runs (transforms/feature_forms.py): grouped for bounded input; for a
  stream, in bundles read in event-time step on the local runner (``align_partitions``), in keyed state elsewhere."""
  if bounded:
    return GROUPED
  return ORDERED_BUNDLES if runs_in_process(options) else KEYED_STATE


class ReadEvents(beam.PTransform):
  """Reads the use case's events and labels topics; invalid records go to the dead-letter topic with the reason.

  Applied to a pipeline's beginning, it returns the valid events and labels as
  the rows of the use case's schemas (:class:`~use_cases.fraud.records.Transaction`
  and :class:`~use_cases.fraud.records.Label` for fraud), with their records' Kafka
  timestamps (in :class:`~transforms.batches.Batch` elements for ``ORDERED_BUNDLES``).

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
    use_case = events.declared_use_case()
    events_topic, labels_topic = events.events_topic_or_default(), events.labels_topic_or_default()
    records = pbegin | 'ReadEventsAndLabels' >> read_from_kafka(
        kafka.kafka_io, {**self._config, 'group.id': self._group} if self._group else self._config,
        [events_topic, labels_topic], expansion_service=kafka.kafka_expansion_service,
        idle_timeout_s=kafka.idle_timeout_s, **read_bounds)
    parsed = records | 'ParseRecords' >> ParseRecords(
        {events_topic: use_case.event_schema, labels_topic: use_case.label_schema}, events.time_limits())
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


def repeat_dead_letter(event, use_case: UseCase, events_topic: str) -> DeadLetter:
  """The dead letter of an event whose id came before, in the history its features use."""
  return DeadLetter(use_case.event_record(event, events_topic),
                    f'repeated {use_case.id_column} {getattr(event, use_case.id_column)}: an earlier event within '
                    'the history its features use has this id, and the first one wins (this one got no features, '
                    'no prediction and no warehouse row)')


class WriteRepeatsToDeadLetters(beam.PTransform):
  """Sends the feature transform's repeated events to the dead-letter topic, those at or after ``first_new``.

  Applied to :class:`~transforms.feature_forms.FeatureOutputs` ``repeated``.

  Args:
    options: the pipeline's options (EventOptions, KafkaOptions).
    config: the Kafka client settings.
    first_new: per events partition, the first offset not read before (see :class:`ReadEvents`).
  """

  def __init__(self, options: PipelineOptions, config: Dict[str, str], first_new: Optional[PartitionOffsets] = None):
    super().__init__()
    self._options = options
    self._config = config
    self._first_new = first_new or {}

  def expand(self, repeated):
    first_new = self._first_new
    events = self._options.view_as(EventOptions)
    return (repeated
            | 'NewRepeats' >> beam.Filter(lambda event: event.kafka_offset >= first_new.get(event.kafka_partition, 0))
            | 'ToDeadLetters' >> beam.Map(repeat_dead_letter, events.declared_use_case(),
                                          events.events_topic_or_default())
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
  identity = events.declared_use_case().snapshot_identity(events.label_delay(), events.events_topic_or_default(),
                                                          events.labels_topic_or_default())
  return StateSnapshots(path, identity, events.state_snapshot_interval_s)


def _holds_the_last_applied(consumer, topic: str, partition: int, offset: int, event_id: Optional[int],
                            id_column: str) -> bool:
  """Whether the record before ``offset`` is the one whose ``id_column`` is ``event_id`` (True when there is nothing
  to compare: no marker, or retention deleted the record)."""
  if event_id is None or offset <= 0:
    return True
  consumer.assign([TopicPartition(topic, partition, offset - 1)])
  try:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
      for message in consumer.consume(1, 0.5):
        if message.error() or message.offset() != offset - 1:
          return True
        try:
          return json.loads(message.value()).get(id_column) == event_id
        except (ValueError, TypeError, AttributeError, RecursionError):
          return False
    return True
  finally:
    consumer.unassign()


def snapshot_start_offsets(snapshots: Optional[StateSnapshots], config: Dict[str, str],
                           id_column: str) -> Dict[Tuple[str, int], int]:
  """Per (topic, partition), the offset a pipeline resuming from the newest snapshot reads on from.

  A snapshot of other topics than those there now (its offsets lie beyond
  the ends of the partitions, or the record before an offset is not the
  event it applied last, whose ``id_column`` it noted: the topics were deleted and created again) is
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
                                                       header.markers.get((kind, partition)), id_column):
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
