"""Monitoring: Kafka predictions + labels + dead letters -> windowed model metrics in the warehouse -> alerts.

For each event-time window (a day by default) and model version, the
pipeline counts predictions, flags and the score histogram, and, once the
labels arrive, the labelled counts that give precision, recall, average
precision and the use case's ranking precision@k (fraud's cards); a shadow challenger's scores are counted
under its own version and role. The counts are partial sums
(``transforms/metrics.py``) written to the warehouse's ``monitoring_metrics``
table, so that repeated bounded runs locally, or the panes of a streaming job,
add up to the right totals; ``kbml status`` and ``kbml report`` read them.

When a window is complete it is checked: each feature's and the score's
population stability index against the model version's training data
(``drift``), the share of dead letters, and, once its labels are in,
precision and recall against floors. The scorer's consumer lag is checked
too. Alerts go to the ``alerts`` topic, which ``kbml retrain --on-drift``
listens to.

The read starts at the beginning of the topics (a label meets a prediction
read by an earlier run) and counts only the records at or after the consumer
group's committed offsets (``transforms/monitoring.py``). A crash between a
bundle's write and its offsets' commit counts that bundle twice when the
pipeline restarts: the metrics are at least once, like the predictions.

Example::

    python -m pipelines.monitoring                  # streaming, on the local runner
    python -m pipelines.monitoring --stop-at-end    # what the topics hold now, then stop
    python -m pipelines.monitoring --runner DataflowRunner --project P --region R --temp-location gs://B/tmp \\
        --streaming --setup-file ./setup.py --warehouse bigquery://P/fraud --model-dir gs://B/models \\
        --bootstrap-servers BROKER:9092
"""

import logging
from typing import Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from kbml.kafka_client import PartitionOffsets, group_start_offsets
from kbml.warehouse import open_warehouse
from pipelines.events import EventOptions, WriteDeadLetters
from pipelines.options import (
  KafkaOptions,
  ModelOptions,
  WarehouseOptions,
  kafka_config,
  pipeline_options,
  runs_in_process,
  will_run,
)
from pipelines.stopping import stop_on_signals
from transforms.kafka_io import KafkaRecord, read_from_kafka
from transforms.metrics import read_sums, summaries
from transforms.monitoring import (
  DEAD_LETTER,
  LABEL,
  PREDICTION,
  JoinLabelsFn,
  JoinLabelsInProcessFn,
  MonitoringSettings,
  Observation,
  WindowMetricsFn,
  dead_letter_source,
  parse_prediction,
)
from transforms.records import DAY_SECONDS, DEAD_LETTER_TAG, DeadLetter, InvalidRecord
from transforms.use_case import UseCase

DEFAULT_CONSUMER_GROUP = 'kbml-monitoring'
# The join emits as records arrive, but its stage may run a bundle behind the read on the local runner (a bounded
# run commits when it has finished).
LOCAL_COMMIT_DELAY_BUNDLES = 1


class MonitoringOptions(PipelineOptions):
  """Windows and alert thresholds (topics: ModelOptions, EventOptions; the warehouse: WarehouseOptions)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--window_hours', type=float, default=24.0, help='Length of the event-time windows.')
    parser.add_argument('--grace_hours', type=float, default=1.0,
                        help='A window is checked once a prediction this much later than its end has arrived.')
    parser.add_argument('--psi_threshold', type=float, default=0.2,
                        help='Drift alert above this population stability index (0.1: moderate, 0.25: major).')
    parser.add_argument(
        '--drift_exclude',
        help='Comma-separated statistics not checked for drift (default: the use case\'s, those a window\'s '
        'calendar decides: for fraud TX_DURING_WEEKEND, as a day is all weekend or none of it); \'\': none.')
    parser.add_argument('--min_window_predictions', type=int, default=200,
                        help='No drift check on windows with fewer predictions.')
    parser.add_argument('--precision_floor', type=float, default=0.0, help='Alert below this labelled precision.')
    parser.add_argument('--recall_floor', type=float, default=0.0, help='Alert below this labelled recall.')
    parser.add_argument('--min_labelled_positives', '--min_labelled_frauds', dest='min_labelled_positives', type=int,
                        default=10, help='No precision or recall check on windows with fewer labelled positives '
                        '(frauds, failures).')
    parser.add_argument('--max_dead_letter_rate', type=float, default=0.01,
                        help='Alert when a larger share of a window\'s records are dead letters.')
    parser.add_argument('--scorer_group', default='kbml-scoring', help='The scorer\'s consumer group (its lag).')
    parser.add_argument('--max_scorer_lag', type=int, default=10_000,
                        help='Alert when the scorer is more events behind.')
    parser.add_argument(
        '--label_join_days', type=float, default=14.0,
        help='On the local runner, how long (in event time, from its first record) an event waits for its '
        'label or its prediction before the join forgets it; longer than the label delay (default: %(default)s).')
    parser.add_argument('--monitor_from', choices=('earliest', 'latest'), default='earliest',
                        help='Without committed offsets for the consumer group: count every record in the topics '
                        '(earliest) or those that arrive from now on (latest).')


def settings_of(options: PipelineOptions,
                read_partitions: Tuple[Tuple[str, int], ...] = ()) -> MonitoringSettings:
  monitoring = options.view_as(MonitoringOptions)
  models = options.view_as(ModelOptions)
  events = options.view_as(EventOptions)
  config = kafka_config(options)
  if monitoring.drift_exclude is None:
    drift_exclude = tuple(events.declared_use_case().drift_exclude)
  else:
    drift_exclude = tuple(name for name in monitoring.drift_exclude.split(',') if name)
  return MonitoringSettings(
      use_case=events.declared_use_case(), warehouse_url=options.view_as(WarehouseOptions).warehouse_url(),
      model_dir=models.model_dir_or_default(),
      alerts_config=config, alerts_topic=models.alerts_topic,
      window_s=monitoring.window_hours * 3600, grace_s=monitoring.grace_hours * 3600,
      label_delay_s=events.label_delay() * DAY_SECONDS, psi_threshold=monitoring.psi_threshold,
      min_window_predictions=monitoring.min_window_predictions, precision_floor=monitoring.precision_floor,
      recall_floor=monitoring.recall_floor, min_labelled_positives=monitoring.min_labelled_positives,
      max_dead_letter_rate=monitoring.max_dead_letter_rate, scorer_group=monitoring.scorer_group,
      events_topic=events.events_topic_or_default(), max_scorer_lag=monitoring.max_scorer_lag,
      kafka_config=config, drift_exclude=drift_exclude, read_partitions=read_partitions)


class _ObserveFn(beam.DoFn):
  """Kafka records -> (key, Observation): predictions and labels by event id, dead letters by source."""

  def __init__(self, use_case: UseCase, predictions_topic: str, labels_topic: str,
               first_new: Dict[str, PartitionOffsets]):
    self._use_case = use_case
    self._predictions_topic = predictions_topic
    self._labels_topic = labels_topic
    self._first_new = first_new

  def process(self, record: KafkaRecord) -> Iterable:
    is_new = record.offset >= self._first_new.get(record.topic, {}).get(record.partition, 0)
    try:
      if record.topic == self._predictions_topic:
        fields = {**parse_prediction(record.value, self._use_case), 'read_from': (PREDICTION, record.partition)}
        yield str(fields[self._use_case.id_column]), Observation(PREDICTION, fields, is_new)
      elif record.topic == self._labels_topic:
        label = self._use_case.label_schema.parse(record.value)
        fields = {'positive': getattr(label, self._use_case.label_column), 'known_time': record.timestamp_ms / 1000,
                  'read_from': (LABEL, record.partition)}
        yield str(getattr(label, self._use_case.id_column)), Observation(LABEL, fields, is_new)
      else:
        source, source_time = dead_letter_source(record)
        yield f'{DEAD_LETTER}:{source}', Observation(DEAD_LETTER, {'source_time': source_time}, is_new)
    except InvalidRecord as e:
      if is_new:
        yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, DeadLetter(record, str(e)))


class MonitorPredictions(beam.PTransform):
  """Kafka predictions, labels and dead letters -> windowed model metrics in the warehouse -> alerts.

  Applied to a pipeline's beginning. Records that are not predictions,
  labels or dead letters go to the dead-letter topic with the reason.

  Args:
    options: the pipeline's options (MonitoringOptions, ModelOptions, WarehouseOptions, EventOptions,
      KafkaOptions).
    first_new: per topic and partition, the first offset to count
      (:func:`~kbml.kafka_client.group_start_offsets`); the earlier records
      only let late labels meet their predictions. None: count everything.

  Raises:
    ValueError: ``--label-join-days`` is not longer than the label delay.
  """

  def __init__(self, options: PipelineOptions, first_new: Optional[Dict[str, PartitionOffsets]] = None):
    super().__init__()
    self._options = options
    self._first_new = first_new or {}
    monitoring, events = options.view_as(MonitoringOptions), options.view_as(EventOptions)
    if monitoring.label_join_days <= events.label_delay():
      raise ValueError(f'--label-join-days ({monitoring.label_join_days:g}) must be longer than the label delay '
                       f'({events.label_delay():g} days), or no label would meet its prediction.')

  def expand(self, pbegin):
    options = self._options
    kafka = options.view_as(KafkaOptions)
    predictions_topic = options.view_as(ModelOptions).predictions_topic
    events = options.view_as(EventOptions)
    local = runs_in_process(options)
    config = kafka_config(options)
    group = kafka.consumer_group or DEFAULT_CONSUMER_GROUP
    topics = [predictions_topic, events.labels_topic_or_default(), events.dead_letter_topic]
    read_partitions = tuple((kind, partition) for kind, topic in ((PREDICTION, predictions_topic),
                                                                (LABEL, events.labels_topic_or_default()))
                            for partition in sorted(self._first_new.get(topic, {})))
    observed = (pbegin
                | 'ReadPredictionsAndLabels' >> read_from_kafka(
                    kafka.kafka_io, {**config, 'group.id': group}, topics,
                    expansion_service=kafka.kafka_expansion_service, stop_at_end=kafka.stop_at_end,
                    idle_timeout_s=kafka.idle_timeout_s, from_beginning=True,
                    commit_delay_bundles=LOCAL_COMMIT_DELAY_BUNDLES if local and not kafka.stop_at_end else 0)
                | 'Observe' >> beam.ParDo(_ObserveFn(events.declared_use_case(), predictions_topic,
                                                     events.labels_topic_or_default(), self._first_new)).with_outputs(
                                                         DEAD_LETTER_TAG, main='observed'))
    _ = observed[DEAD_LETTER_TAG] | 'WriteDeadLetters' >> WriteDeadLetters(options, config)
    retention_s = options.view_as(MonitoringOptions).label_join_days * DAY_SECONDS
    join = JoinLabelsInProcessFn(retention_s) if local else JoinLabelsFn(retention_s)
    return (observed['observed']
            | 'JoinLabels' >> beam.ParDo(join).with_input_types(Tuple[str, Observation])
            | 'WindowMetrics' >> beam.ParDo(WindowMetricsFn(settings_of(options, read_partitions))))


def build_pipeline(pipeline: beam.Pipeline, options: PipelineOptions,
                   first_new: Optional[Dict[str, PartitionOffsets]] = None) -> beam.PCollection:
  """Applies :class:`MonitorPredictions` to ``pipeline`` (its arguments)."""
  return pipeline | 'MonitorPredictions' >> MonitorPredictions(options, first_new)


def run(argv: Optional[List[str]] = None):
  stop_on_signals()
  options = pipeline_options(argv, [MonitoringOptions, ModelOptions, WarehouseOptions, EventOptions],
                             prog='python -m pipelines.monitoring')
  kafka = options.view_as(KafkaOptions)
  monitoring = options.view_as(MonitoringOptions)
  events = options.view_as(EventOptions)
  config = kafka_config(options)
  group = kafka.consumer_group or DEFAULT_CONSUMER_GROUP
  first_new = None
  if will_run(options):
    first_new = {topic: group_start_offsets(config, group, topic, monitoring.monitor_from)
                 for topic in (options.view_as(ModelOptions).predictions_topic, events.labels_topic_or_default(),
                               events.dead_letter_topic)}
    logging.info('monitoring from offsets %s; the earlier records only join late labels', first_new)
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, options, first_new)
  pipeline.run().wait_until_finish()
  if kafka.stop_at_end and will_run(options):
    settings = settings_of(options)
    windows = summaries(read_sums(open_warehouse(settings.warehouse_url)))
    print(windows.tail(10).to_string(index=False, float_format=lambda x: f'{x:.3f}'))


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.INFO)
  run()
