"""Scoring: Kafka events -> validation -> features -> RunInference -> Kafka predictions.

Every event of the use case (``--use-case``; fraud's are transactions) gets
the features ingest computes (the same transform, fed by the events and the
labels), is scored by the model in service and its prediction goes to the
``predictions`` topic, keyed by event id:
the score, the decision at the model's threshold, the model version, the
event time and the scoring time. Invalid records, rows that cannot be scored
and batches whose inference failed go to the ``dead-letter`` topic with the
reason.

The model changes without a restart. On Dataflow and Flink, RunInference
takes it from a side input: WatchFilePattern on the model store's promotion
records. On the local runner, whose unbounded runs never deliver a side
input, the model handler reads the store's ``current`` pointer every
``--model-poll-s`` seconds instead (``--model-reload`` chooses). A promoted
version whose file is truncated or corrupt is refused: the old one keeps
scoring and a ``model_refused`` alert goes to the ``alerts`` topic.

Delivery is at least once. On the local runner the feature histories
(fraud: the customers' and terminals') are saved now and then with the offsets they reflect, and a start
loads the newest snapshot and reads on from there (``--state-snapshot``;
without one they are rebuilt from the beginning of the topics); only
events at or after the consumer group's committed offsets are scored
(without committed offsets: those that arrive from now on, or all with
``--score-from earliest``). Offsets are committed only once the predictions
of the records before them are flushed to Kafka. After a crash some
events may be scored twice (same id); none is skipped.

``--backtest-from``/``--backtest-to`` score a bounded range of event time
instead, each event with the version that was in service at its time
(the promotion history as a windowed side input), and print what each
version flagged.

Example::

    python -m pipelines.scoring
    python -m pipelines.scoring --backtest-from 2026-11-01T00:00:00Z --backtest-to 2026-11-08T00:00:00Z \\
        --predictions-topic predictions-backtest
    python -m pipelines.scoring --runner DataflowRunner --project P --region R --temp-location gs://B/tmp \\
        --streaming --enable-streaming-engine --setup-file ./setup.py --model-dir gs://B/models \\
        --bootstrap-servers BROKER:9092
"""

import json
import logging
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.ml.inference.utils import WatchFilePattern
from apache_beam.options.pipeline_options import PipelineOptions

from kbml.alerts import AlertSink
from kbml.kafka_client import PartitionOffsets, group_start_offsets
from pipelines.events import (
  EventOptions,
  ReadEvents,
  WriteDeadLetters,
  WriteRepeatsToDeadLetters,
  feature_form,
  feature_snapshots,
  snapshot_start_offsets,
)
from pipelines.options import (
  KafkaOptions,
  ModelOptions,
  finished_counters,
  kafka_config,
  pipeline_options,
  updates_side_inputs,
  will_run,
)
from pipelines.stopping import stop_on_signals
from trainer.registry import ModelStore, ModelStoreError
from transforms.batches import Batch, in_kind_of, items_of
from transforms.feature_forms import ORDERED_BUNDLES
from transforms.inference import ModelStoreHandler, ServicePeriods, check_features, promotion_history
from transforms.kafka_io import write_to_kafka
from transforms.records import DeadLetter, parse_utc_timestamp, utc_iso
from transforms.use_case import UseCase

DEFAULT_CONSUMER_GROUP = 'kbml-scoring'
RELOAD_POLL = 'poll'
RELOAD_WATCH = 'watch'
BACKTEST_NAMESPACE = 'kbml.backtest'
NON_FINITE = 'non_finite'

class ScoringOptions(PipelineOptions):
  """Model reload, batching and backtest range (topics and model store: ModelOptions; the group: KafkaOptions)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--model_reload', choices=(RELOAD_POLL, RELOAD_WATCH),
        help='How a newly promoted model is taken without a restart. watch: RunInference\'s side input from '
        'WatchFilePattern on the promotion records (Dataflow, Flink; the default there). poll: the model '
        'handler reads the store\'s current pointer (the local runner, where side inputs do not update '
        'while a job runs; the default there).')
    parser.add_argument('--model_poll_s', type=float, default=1.0,
                        help='How often the store is checked for a new model, in seconds.')
    parser.add_argument(
        '--score_from', choices=('latest', 'earliest'), default='latest',
        help='Without committed offsets for the consumer group: score the events that arrive from now on '
        '(latest) or every one in the topic (earliest). Either way, the histories are built from the start of the '
        'topics, or from the newest snapshot (--state-snapshot).')
    parser.add_argument(
        '--min_batch_size', type=int,
        help='Dataflow, Flink and backtests: RunInference batches at least this many rows (a bundle\'s last batch '
        'may have fewer); default: --max-batch-size. Below it, Beam adapts the size to the timings of earlier '
        'batches, at a cost per batch.')
    parser.add_argument('--max_batch_size', type=int, default=1024,
                        help='... and at most this many. The local runner scores each bundle\'s rows in batches of '
                        'this many.')
    parser.add_argument('--backtest_from', help='Backtest: first event time scored (ISO-8601 UTC).')
    parser.add_argument('--backtest_to', help='Backtest: end of the range, excluded (ISO-8601 UTC).')

  def backtest_range(self) -> Optional[Tuple[float, float]]:
    if self.backtest_from is None and self.backtest_to is None:
      return None
    if not (self.backtest_from and self.backtest_to):
      raise ValueError('A backtest needs both --backtest-from and --backtest-to.')
    return parse_utc_timestamp(self.backtest_from), parse_utc_timestamp(self.backtest_to)


def model_reload(options: PipelineOptions) -> str:
  """The reload mechanism: as chosen, else the side input where the runner updates it, polling elsewhere."""
  chosen = options.view_as(ScoringOptions).model_reload
  if chosen:
    return chosen
  return RELOAD_WATCH if updates_side_inputs(options) else RELOAD_POLL


def prediction_message(result: PredictionResult, use_case: UseCase) -> Tuple[bytes, bytes]:
  """The ``(key, value)`` of a prediction record: key the event's id, value JSON.

  The value holds the event's id, keys and time (the use case's columns:
  ``transaction_id``, ``customer_id``, ``terminal_id``, ``tx_datetime`` for
  fraud), the champion's score and decision, a shadow challenger's score
  (null without one), and the features the scores were computed from
  (monitoring compares their distribution with the training data's).
  """
  row, score = result.example, result.inference
  challenger = score.challenger
  prediction = {
      use_case.id_column: row[use_case.id_column],
      **{key: row[key] for key in use_case.key_columns},
      use_case.time_column: row[use_case.time_column],
      'score': score.score,
      'flagged': score.flagged,
      'threshold': score.threshold,
      'model_version': result.model_id,
      'scored_at': utc_iso(score.scored_at, milliseconds=True),
      'kafka_partition': row['kafka_partition'],
      'kafka_offset': row['kafka_offset'],
      'challenger_version': challenger.version if challenger else None,
      'challenger_score': challenger.score if challenger else None,
      'challenger_flagged': challenger.flagged if challenger else None,
      'features': {name: row[name] for name in use_case.feature_names},
  }
  return str(row[use_case.id_column]).encode(), json.dumps(prediction).encode()


def unscored_dead_letters(failure: Tuple[Iterable[Dict[str, Any]], str], use_case: UseCase,
                          events_topic: str) -> List[DeadLetter]:
  """Dead letters for ``(rows, error)``: rows that could not be scored, with the error.

  The record written is the event as it was read (its fields, its source
  partition and offset), so that producing it again scores it.
  """
  rows, error = failure
  return [DeadLetter(use_case.event_record(use_case.event_of_feature_row(row), events_topic), f'not scored: {error}')
          for row in rows]


class _RowsToScoreFn(beam.DoFn):
  """Passes on the rows to score, one by one or in Batches as they come.

  Those are the rows at or after the first unscored offsets, whose features
  are all finite numbers. A row with another feature goes to the
  ``NON_FINITE`` output alone, as ``([row], error)``: a failed inference
  would take its whole batch along.
  """

  def __init__(self, first_unscored: PartitionOffsets, use_case: UseCase):
    self._first_unscored = first_unscored
    self._use_case = use_case

  def process(self, rows: Union[Dict[str, Any], Batch]):
    to_score = Batch()
    for row in items_of(rows):
      if row['kafka_offset'] < self._first_unscored.get(row['kafka_partition'], 0):
        continue
      try:
        to_score.append(check_features(row, self._use_case.feature_names, self._use_case.id_column))
      except ValueError as e:
        yield beam.pvalue.TaggedOutput(NON_FINITE, ([row], str(e)))
    yield from in_kind_of(rows, to_score)


class _CountByVersionFn(beam.DoFn):
  """Counts a backtest's predictions and flags per model version (Beam metrics), passing them on."""

  def process(self, result: PredictionResult):
    Metrics.counter(BACKTEST_NAMESPACE, f'scored:{result.model_id}').inc()
    if result.inference.flagged:
      Metrics.counter(BACKTEST_NAMESPACE, f'flagged:{result.model_id}').inc()
    yield result


class ScoreEvents(beam.PTransform):
  """Kafka events and labels -> validation -> features -> RunInference -> the predictions topic.

  Applied to a pipeline's beginning; returns the PredictionResults. Rows
  that cannot be scored go to the dead-letter topic with the reason.

  Args:
    options: the pipeline's options (ScoringOptions, ModelOptions, EventOptions, KafkaOptions).
    first_unscored: streaming: per events partition, the first offset
      to score (:func:`~kbml.kafka_client.group_start_offsets`); the earlier records only
      warm up the histories. Ignored in a backtest.
    snapshot_offsets: streaming on the local runner: where the newest
      snapshot of the histories was taken
      (:func:`~pipelines.events.snapshot_start_offsets`; empty: none was);
      the histories start from it, the read from its offsets, and new
      snapshots are saved. None: no snapshots, the histories are built from
      the beginning of the topics.
  """

  def __init__(self, options: PipelineOptions, first_unscored: Optional[PartitionOffsets] = None,
               snapshot_offsets: Optional[Dict[Tuple[str, int], int]] = None):
    super().__init__()
    self._options = options
    self._first_unscored = first_unscored or {}
    self._snapshot_offsets = snapshot_offsets

  def expand(self, pbegin):
    options = self._options
    kafka = options.view_as(KafkaOptions)
    scoring = options.view_as(ScoringOptions)
    events_options = options.view_as(EventOptions)
    backtest = scoring.backtest_range()
    use_case = events_options.declared_use_case()
    form = feature_form(options, bounded=bool(backtest))
    config = kafka_config(options)
    store = ModelStore(options.view_as(ModelOptions).model_dir_or_default())

    # The local runner's rows come in batches that RunInference takes as they are (transforms/batches.py).
    batched = form == ORDERED_BUNDLES
    group = None if backtest else kafka.consumer_group or DEFAULT_CONSUMER_GROUP
    snapshots = feature_snapshots(options, group, form) if self._snapshot_offsets is not None else None
    events = pbegin | 'ReadEvents' >> ReadEvents(
        options, config, group, form,
        first_new=None if backtest else {events_options.events_topic_or_default(): self._first_unscored},
        stop_at_end=bool(backtest), from_beginning=True, start_offsets=self._snapshot_offsets)
    rows, repeated = events | 'ComputeFeatures' >> use_case.compute_features(
        events_options.label_delay(), form, rows_per_batch=scoring.max_batch_size if batched else None,
        snapshots=snapshots)

    reload = None if backtest else model_reload(options)
    handler = ModelStoreHandler(
        store.root, alerts=AlertSink(config, options.view_as(ModelOptions).alerts_topic),
        poll_s=scoring.model_poll_s if reload == RELOAD_POLL else None,
        shadow_poll_s=None if backtest else scoring.model_poll_s,
        min_batch_size=scoring.min_batch_size, max_batch_size=scoring.max_batch_size)
    if backtest:
      start, end = backtest
      side_input, promoted_at = promotion_history(pbegin, store)
      first_promotion = min(promoted_at, default=float('inf'))
      rows = (rows
              | 'InBacktestRange' >> beam.Filter(
                  lambda row: max(start, first_promotion) <= parse_utc_timestamp(row[use_case.time_column]) < end)
              | 'IntoServicePeriods' >> beam.WindowInto(ServicePeriods(promoted_at)))
    else:
      side_input = None
      if reload == RELOAD_WATCH:
        side_input = pbegin | 'WatchPromotions' >> WatchFilePattern(
            file_pattern=store.promotion_pattern(), interval=max(1, round(scoring.model_poll_s)))
    rows, non_finite = rows | 'RowsToScore' >> beam.ParDo(
        _RowsToScoreFn({} if backtest else self._first_unscored, use_case)).with_outputs(NON_FINITE, main='rows')
    predictions, failed = rows | 'Score' >> RunInference(
        handler.with_no_batching() if batched else handler, model_metadata_pcoll=side_input).with_exception_handling()
    if backtest:
      predictions = predictions | 'CountByVersion' >> beam.ParDo(_CountByVersionFn())
    _ = (predictions
         | 'ToPredictionMessages' >> beam.Map(prediction_message, use_case)
         | 'WritePredictions' >> write_to_kafka(kafka.kafka_io, config,
                                                options.view_as(ModelOptions).predictions_topic,
                                                expansion_service=kafka.kafka_expansion_service))
    unscored = {
        'FailedInference': failed.failed_inferences | 'BatchAndError' >> beam.MapTuple(lambda batch, e: (batch, e[1])),
        'NonFinite': non_finite,
    }
    for name, pcoll in unscored.items():
      _ = (pcoll
           | f'{name}ToDeadLetters' >> beam.FlatMap(
               unscored_dead_letters, use_case, events_options.events_topic_or_default())
           | f'Write{name}DeadLetters' >> WriteDeadLetters(options, config))
    if not backtest:
      _ = repeated | 'RepeatsToDeadLetters' >> WriteRepeatsToDeadLetters(options, config, self._first_unscored)
    return predictions


def build_pipeline(pipeline: beam.Pipeline, options: PipelineOptions,
                   first_unscored: Optional[PartitionOffsets] = None,
                   snapshot_offsets: Optional[Dict[Tuple[str, int], int]] = None) -> beam.PCollection:
  """Applies :class:`ScoreEvents` to ``pipeline`` (its arguments); returns the PredictionResults."""
  return pipeline | 'ScoreEvents' >> ScoreEvents(options, first_unscored, snapshot_offsets)


def backtest_summary(result) -> Dict[str, Dict[str, int]]:
  """{version: {'scored': n, 'flagged': m}} from a finished backtest's metrics."""
  summary: Dict[str, Dict[str, int]] = {}
  for name, count in finished_counters(result, BACKTEST_NAMESPACE).items():
    kind, version = name.split(':', 1)
    summary.setdefault(version, {'scored': 0, 'flagged': 0})[kind] += count
  return summary


def run(argv: Optional[List[str]] = None):
  stop_on_signals()
  logging.getLogger('apache_beam.transforms.util').setLevel(logging.WARNING)  # BatchElements logs every bundle
  options = pipeline_options(argv, [ScoringOptions, ModelOptions, EventOptions], prog='python -m pipelines.scoring')
  kafka = options.view_as(KafkaOptions)
  scoring = options.view_as(ScoringOptions)
  events_options = options.view_as(EventOptions)
  store = ModelStore(options.view_as(ModelOptions).model_dir_or_default())
  if will_run(options) and store.current() is None:
    raise ModelStoreError(f'No model is in service in {store.root}: train one first (`kbml train`).')
  first_unscored = snapshot_offsets = None
  if will_run(options) and not scoring.backtest_range():
    group, config = kafka.consumer_group or DEFAULT_CONSUMER_GROUP, kafka_config(options)
    first_unscored = group_start_offsets(config, group, events_options.events_topic_or_default(), scoring.score_from)
    logging.info('scoring %s from offsets %s; the earlier records only build the histories',
                 events_options.events_topic_or_default(), first_unscored)
    snapshot_offsets = snapshot_start_offsets(feature_snapshots(options, group, feature_form(options, False)), config,
                                              events_options.declared_use_case().id_column)
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, options, first_unscored, snapshot_offsets)
  result = pipeline.run()
  result.wait_until_finish()
  if scoring.backtest_range():
    for version, counts in sorted(backtest_summary(result).items()):
      print(f'model version {version}: {counts["scored"]:,} {events_options.declared_use_case().event_noun} scored, '
            f'{counts["flagged"]:,} flagged')


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.INFO)
  run()
