"""Ingest: Kafka events and labels -> validation -> features -> warehouse.

Every record of the use case's events and labels topics (``--use-case``;
fraud: ``transactions`` and ``labels``) is parsed against its schema; a bad
one goes to the ``dead-letter`` topic with its original bytes, its source and
the reason. Valid events get their features (computed in event time with the
labels that have arrived) and are written to the warehouse's ``features``
table; labels go to its ``labels`` table. The trainer joins the two.

It runs unbounded (a streaming job), or bounded (``--stop-at-end``: what the
topics hold now). Either way it reads from the beginning of the topics, so
that every history the features use (fraud: every customer's and
terminal's) is warm (a streaming run on the local runner reads on from its
newest snapshot of the histories instead, ``--state-snapshot``), and writes
only the records its consumer group has not committed yet: a restart, or a
bounded run after another, writes the rows one run would have written. A
repeated event id is a dead letter.
``--replay-from``/``--replay-to`` rebuild the feature rows of an event-time
range into a new table, warmed up the same way: only the rows of the range
are written, and the read starts at the records new enough to count in the
range's histories (Kafka's offsets by timestamp). ``--replay-offsets``
names the range by offsets of the events topic.

Example::

    python -m pipelines.ingest --stop-at-end
    python -m pipelines.ingest --replay-from 2018-05-01T00:00:00Z --replay-to 2018-05-08T00:00:00Z \\
        --features-table features_replay
    python -m pipelines.ingest --replay-offsets 0:1000-2000,1:1000-2000 --features-table features_replay
"""

import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from kbml.kafka_client import PartitionOffsets, group_start_offsets
from kbml.warehouse import open_warehouse
from pipelines.events import (
  EventOptions,
  ReadEvents,
  WriteRepeatsToDeadLetters,
  feature_form,
  feature_snapshots,
  snapshot_start_offsets,
)
from pipelines.options import (
  KafkaOptions,
  WarehouseOptions,
  finished_counters,
  kafka_config,
  pipeline_options,
  will_run,
)
from pipelines.stopping import stop_on_signals
from transforms.batches import items_of
from transforms.records import DAY_SECONDS, RECORDS_METRICS, parse_utc_timestamp
from transforms.warehouse_io import WAREHOUSE_METRICS, WriteToWarehouse

DEFAULT_CONSUMER_GROUP = 'kbml-ingest'


class IngestOptions(PipelineOptions):
  """Topics, warehouse and replay range (the consumer group and bounds: KafkaOptions)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--features_table', default='features')
    parser.add_argument('--labels_table', default='labels')
    parser.add_argument('--replay_from', help='Replay: first event time of the rebuilt range (ISO-8601 UTC).')
    parser.add_argument('--replay_to', help='Replay: end of the rebuilt range, excluded (ISO-8601 UTC).')
    parser.add_argument(
        '--replay_offsets', metavar='PARTITION:FROM-TO[,...]',
        help='Replay: the events topic\'s offset ranges to rebuild, FROM included, TO excluded; '
        'e.g. 0:1000-2000,1:950-1900.')
    parser.add_argument('--bigquery_temp_location', help='Staging folder of BigQuery file loads.')


def parse_offset_ranges(text: str) -> Dict[int, Tuple[int, int]]:
  """Parses ``PARTITION:FROM-TO[,...]`` into {partition: (from, to)}."""
  ranges = {}
  for part in text.split(','):
    try:
      partition, offsets = part.split(':')
      start, end = offsets.split('-')
      ranges[int(partition)] = (int(start), int(end))
    except ValueError:
      raise ValueError(f'--replay-offsets: expected PARTITION:FROM-TO[,...], got {part!r}') from None
  return ranges


def replay_range(ingest: IngestOptions, time_column: str) -> Optional[Callable[[Dict[str, object]], bool]]:
  """The test that keeps a feature row (whose time is its ``time_column``) in the replayed range, or None when this
  is no replay."""
  if ingest.replay_offsets:
    ranges = parse_offset_ranges(ingest.replay_offsets)
    return lambda row: row['kafka_partition'] in ranges and (
        ranges[row['kafka_partition']][0] <= row['kafka_offset'] < ranges[row['kafka_partition']][1])
  if ingest.replay_from is None and ingest.replay_to is None:
    return None
  if not (ingest.replay_from and ingest.replay_to):
    raise ValueError('A replay by time needs both --replay-from and --replay-to.')
  start, end = parse_utc_timestamp(ingest.replay_from), parse_utc_timestamp(ingest.replay_to)
  return lambda row: start <= parse_utc_timestamp(row[time_column]) < end


def replay_read_start_ms(ingest: IngestOptions, events: EventOptions) -> Optional[int]:
  """The Kafka timestamp a replay by time starts reading at; None: from the beginning of the topics.

  No older record counts: a valid event's time runs at most ``--max-event-time-ahead-s`` ahead of its Kafka
  timestamp, so the records before this one hold events older than every history a row of the range uses (its
  windows, the label delay, repeated event ids: the use case's ``history_span_days``).
  """
  if ingest.replay_offsets or not ingest.replay_from:
    return None
  span_s = events.declared_use_case().history_span_days(events.label_delay()) * DAY_SECONDS
  start_s = parse_utc_timestamp(ingest.replay_from) - span_s - events.max_event_time_ahead_s
  return int(start_s * 1000)


class IngestEvents(beam.PTransform):
  """Kafka events and labels -> validation -> features -> the warehouse's features and labels tables.

  Applied to a pipeline's beginning; returns the feature rows written (those
  of the replayed range in a replay).

  Args:
    options: the pipeline's options (IngestOptions, WarehouseOptions, EventOptions, KafkaOptions).
    first_unwritten: per topic (events, labels) and partition, the first
      offset to write (:func:`~kbml.kafka_client.group_start_offsets`): the
      read starts at the beginning of the topics, and the earlier records
      only warm up the histories the features use, so that a restarted
      ingest computes the features one run would. None: write
      everything. Ignored in a replay.
    snapshot_offsets: streaming on the local runner: where the newest
      snapshot of the histories was taken
      (:func:`~pipelines.events.snapshot_start_offsets`; empty: none was);
      the histories start from it, the read from its offsets, and new
      snapshots are saved. None: no snapshots.
  """

  def __init__(self, options: PipelineOptions, first_unwritten: Optional[Dict[str, PartitionOffsets]] = None,
               snapshot_offsets: Optional[Dict[Tuple[str, int], int]] = None):
    super().__init__()
    self._options = options
    self._first_unwritten = first_unwritten or {}
    self._snapshot_offsets = snapshot_offsets

  def expand(self, pbegin):
    options = self._options
    kafka = options.view_as(KafkaOptions)
    ingest = options.view_as(IngestOptions)
    events_options = options.view_as(EventOptions)
    use_case = events_options.declared_use_case()
    in_replay_range = replay_range(ingest, use_case.time_column)
    replay = in_replay_range is not None
    warehouse = options.view_as(WarehouseOptions).warehouse_url()

    bounded = kafka.stop_at_end or replay
    form = feature_form(options, bounded)
    config = kafka_config(options)
    group = None if replay else kafka.consumer_group or DEFAULT_CONSUMER_GROUP
    snapshots = feature_snapshots(options, group, form) if self._snapshot_offsets is not None else None
    events = pbegin | 'ReadEvents' >> ReadEvents(
        options, config, group, form, first_new=None if replay else self._first_unwritten, stop_at_end=bounded,
        from_beginning=True, start_offsets=self._snapshot_offsets,
        start_read_time_ms=replay_read_start_ms(ingest, events_options))
    rows, repeated = events | 'ComputeFeatures' >> use_case.compute_features(events_options.label_delay(), form,
                                                                             snapshots=snapshots)
    if replay:
      rows = rows | 'InReplayRange' >> beam.Filter(in_replay_range)
    else:
      first_event = self._first_unwritten.get(events_options.events_topic_or_default(), {})
      first_label = self._first_unwritten.get(events_options.labels_topic_or_default(), {})
      rows = rows | 'NotYetWritten' >> beam.Filter(
          lambda row: row['kafka_offset'] >= first_event.get(row['kafka_partition'], 0))
      _ = (events
           | 'NewLabels' >> beam.FlatMap(  # events come in Batches on the local runner
               lambda events: [event for event in items_of(events) if use_case.is_label(event)
                               and event.kafka_offset >= first_label.get(event.kafka_partition, 0)])
           | 'ToLabelRows' >> beam.Map(use_case.label_row)
           | 'WriteLabels' >> WriteToWarehouse(warehouse, ingest.labels_table, use_case.labels_table,
                                               temp_location=ingest.bigquery_temp_location))
      _ = repeated | 'RepeatsToDeadLetters' >> WriteRepeatsToDeadLetters(options, config, first_event)
    _ = rows | 'WriteFeatures' >> WriteToWarehouse(warehouse, ingest.features_table, use_case.features_table,
                                                   temp_location=ingest.bigquery_temp_location)
    return rows


def build_pipeline(pipeline: beam.Pipeline, options: PipelineOptions,
                   first_unwritten: Optional[Dict[str, PartitionOffsets]] = None,
                   snapshot_offsets: Optional[Dict[Tuple[str, int], int]] = None) -> beam.PCollection:
  """Applies :class:`IngestEvents` to ``pipeline`` (its arguments); returns the feature rows written."""
  return pipeline | 'IngestEvents' >> IngestEvents(options, first_unwritten, snapshot_offsets)


def run(argv: Optional[List[str]] = None):
  stop_on_signals()
  options = pipeline_options(argv, [IngestOptions, WarehouseOptions, EventOptions], prog='python -m pipelines.ingest')
  first_unwritten = snapshot_offsets = None
  if will_run(options):
    open_warehouse(options.view_as(WarehouseOptions).warehouse_url()).prepare()
  events = options.view_as(EventOptions)
  use_case = events.declared_use_case()
  if will_run(options) and replay_range(options.view_as(IngestOptions), use_case.time_column) is None:
    kafka = options.view_as(KafkaOptions)
    group, config = kafka.consumer_group or DEFAULT_CONSUMER_GROUP, kafka_config(options)
    first_unwritten = {topic: group_start_offsets(config, group, topic, 'earliest')
                       for topic in (events.events_topic_or_default(), events.labels_topic_or_default())}
    logging.info('writing the records from offsets %s; the earlier ones only build the histories', first_unwritten)
    form = feature_form(options, bool(kafka.stop_at_end))
    snapshot_offsets = snapshot_start_offsets(feature_snapshots(options, group, form), config, use_case.id_column)
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, options, first_unwritten, snapshot_offsets)
  started = time.monotonic()
  result = pipeline.run()
  result.wait_until_finish()
  if will_run(options):
    print(run_summary(result, time.monotonic() - started))


def run_summary(result, seconds: float) -> str:
  """What a finished run wrote, from its Beam counters: rows per table, dead letters, the rate."""
  tables = {name.split(':', 1)[1]: count for name, count in finished_counters(result, WAREHOUSE_METRICS).items()
            if name.startswith('rows_written:')}
  written = ', '.join(f'{count:,} rows to {table}' for table, count in sorted(tables.items())) or 'no rows'
  dead_letters = finished_counters(result, RECORDS_METRICS).get('dead_letters', 0)
  return (f'ingest finished in {seconds:.1f} s: wrote {written} ({sum(tables.values()) / max(seconds, 1e-9):,.0f} '
          f'rows/s); {dead_letters:,} dead letter(s)')


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.INFO)
  run()
