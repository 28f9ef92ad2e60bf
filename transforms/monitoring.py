"""Monitoring transforms: predictions joined with their late labels, windowed partial sums, and alerts.

:class:`JoinLabelsFn` is a stateful DoFn keyed by event id (the use case's
events: fraud's transactions, IoT's readings). It keeps the first prediction
of each event (the scorer delivers at least once:
a duplicate changes nothing) until its label arrives, days later, and emits
what each record adds to the metrics: a prediction's counts when it
arrives, its labelled counts when the pair is complete. On the local runner
:class:`JoinLabelsInProcessFn` applies the same rule in the process's memory
and forgets an event after a retention of event time.

Each record is read with whether it is new: at or after the consumer group's
committed offsets. The pipeline reads the topics from the beginning, so that
a label can meet a prediction read by an earlier run, but only new records
count, and a pair counts in the run that completes it. Several bounded runs
thus add up to the metrics of one run over the same records.

:class:`WindowMetricsFn` sums the counts of a bundle by event-time window,
model version and role (:mod:`transforms.metrics`), writes them to the
warehouse at the end of the bundle and then checks the windows that have
closed: drift of the features and of the score (PSI against the version's
training statistics) and the dead-letter rate when a window's events are
all in, precision and recall floors when its labels are, and the
scorer's consumer lag. Alerts go to the ``alerts`` topic, one per window,
model version and kind, each once: the alerts raised are recorded in the
warehouse too. A drift alert lists the statistics that drifted and stays
open while the next windows drift too (a week of windows at most): no other
is raised for that version meanwhile.
"""

import collections
import dataclasses
import datetime
import json
import logging
import math
import threading
import time
import uuid
from typing import Any, Deque, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils import shared
from apache_beam.utils.timestamp import Timestamp

from kbml.alerts import (
  DEAD_LETTER_RATE,
  DRIFT,
  PRECISION_BELOW_FLOOR,
  RECALL_BELOW_FLOOR,
  SCORER_LAG,
  AlertSink,
)
from kbml.kafka_client import group_lag
from kbml.warehouse import TableSchema, open_warehouse
from trainer.registry import ModelStore, ModelStoreError
from transforms.kafka_io import KafkaRecord
from transforms.metrics import (
  CHALLENGER,
  CHAMPION,
  LABELLED_PREDICTIONS_TABLE,
  METRICS_SCHEMA,
  METRICS_TABLE,
  Sums,
  WindowKey,
  add_sums,
  drift_by_statistic,
  labelled_predictions_schema,
  labelled_sums,
  metric_rows,
  prediction_sums,
  read_sums,
  statistic_bin,
  training_distributions,
  window_summary,
)
from transforms.records import SOURCE_HEADERS, InvalidRecord, parse_utc_timestamp, utc_iso
from transforms.use_case import UseCase

_LOG = logging.getLogger(__name__)

PREDICTION, LABEL, DEAD_LETTER = 'prediction', 'label', 'dead_letter'
# Counts that belong to no model: the dead letters of a window.
PIPELINE_ROLE = 'pipeline'
ALERTS_TABLE = 'monitoring_alerts'
# A drift alert names this many of the statistics that drifted, the most drifted first, and counts the others.
_LISTED_STATISTICS = 5
# A drift alert stays open while the windows after it drift too, for this many windows at most: a drift that
# lasts longer is alerted again (a reminder, and another chance for a retrain that was refused).
_OPEN_ALERT_WINDOWS = 7
ALERTS_SCHEMA = TableSchema(
    columns=(('kind', 'STRING'), ('window_start', 'TIMESTAMP'), ('model_version', 'STRING'), ('subject', 'STRING'),
             ('raised_at', 'TIMESTAMP'), ('message', 'STRING')),
    key=('kind', 'window_start', 'model_version', 'subject'))
_SCORE_FIELDS = ('score', 'flagged', 'model_version')


class Observation(NamedTuple):
  """A record the join sees: what it is, its fields, and whether this run counts it (new offsets)."""
  kind: str
  fields: Dict[str, Any]
  is_new: bool


class Contribution(NamedTuple):
  """What a record adds to the metrics: a new prediction, a completed pair, or a dead letter.

  ``read_from`` is the topic partition of the record that completed it: the
  time horizons that close windows are kept per partition (a watermark).
  """
  kind: str
  prediction: Dict[str, Any]
  positive: Optional[int] = None
  known_time: Optional[float] = None
  read_from: Optional[Tuple[str, int]] = None


def parse_prediction(payload: Optional[bytes], use_case: UseCase) -> Dict[str, Any]:
  """A prediction record's fields, with its event's time as ``event_time`` (epoch seconds); raises InvalidRecord
  if it is not one the scorer writes for ``use_case``."""
  try:
    fields = json.loads(payload)
  except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InvalidRecord(f'not valid JSON: {e}') from None
  except RecursionError:
    raise InvalidRecord('not valid JSON here: nested deeper than Python\'s parser goes') from None
  if not isinstance(fields, dict):
    raise InvalidRecord('a prediction record must be a JSON object')
  required = (use_case.id_column, use_case.time_column, use_case.key_columns[0], *_SCORE_FIELDS)
  missing = [name for name in required if name not in fields]
  if missing:
    raise InvalidRecord(f'prediction record without {", ".join(missing)}')
  if not isinstance(fields['model_version'], str):
    raise InvalidRecord(f'field model_version must be a string, got {fields["model_version"]!r}'[:200])
  score = fields['score']
  if not isinstance(score, (int, float)) or not 0 <= score <= 1:
    raise InvalidRecord(f'field score must be a number from 0 to 1, got {score!r}'[:200])
  fields['event_time'] = parse_utc_timestamp(fields[use_case.time_column])
  return fields


def dead_letter_source(record: KafkaRecord) -> Tuple[str, float]:
  """A dead letter's identity (source topic, partition, offset) and its source record's time."""
  headers = {name: value.decode('utf-8', 'replace') for name, value in record.headers if value is not None}
  topic, partition, offset, timestamp_ms = (headers.get(name, '') for name in SOURCE_HEADERS)
  try:
    source_time = int(timestamp_ms) / 1000
  except ValueError:
    source_time = record.timestamp_ms / 1000
  return f'{topic}/{partition}/{offset}', source_time


def _join(observation: Observation, prediction: Optional[Observation],
          label: Optional[Observation]) -> Tuple[Optional[Observation], Optional[Observation], List[Contribution]]:
  """The join's rule for one record: an event's prediction and label kept so far -> kept now, and what the
  record adds to the metrics. A dead letter is kept as a prediction, so that one written twice counts once."""
  if observation.kind == DEAD_LETTER:
    if prediction is not None:
      return prediction, label, []
    return observation, label, [Contribution(DEAD_LETTER, observation.fields)] if observation.is_new else []
  contributions = []
  if observation.kind == PREDICTION:
    if prediction is not None:
      return prediction, label, []
    # The features are counted now and not needed for the labelled counts: only the rest waits for the label.
    prediction = observation._replace(fields={k: v for k, v in observation.fields.items() if k != 'features'})
    if observation.is_new:
      contributions.append(Contribution(PREDICTION, observation.fields, read_from=observation.fields['read_from']))
  else:
    if label is not None:
      return prediction, label, []
    label = observation
  if prediction is not None and label is not None and (prediction.is_new or label.is_new):
    contributions.append(Contribution(LABEL, prediction.fields, label.fields['positive'], label.fields['known_time'],
                                      observation.fields['read_from']))
  return prediction, label, contributions


def _event_time(observation: Observation) -> float:
  """When a record happened: a prediction's event, a label's arrival, a dead letter's source record."""
  fields = observation.fields
  if observation.kind == PREDICTION:
    return fields['event_time']
  return fields['known_time'] if observation.kind == LABEL else fields['source_time']


FORGOTTEN_PREDICTIONS = beam.metrics.Metrics.counter('kbml.monitoring', 'predictions_forgotten_without_label')
FORGOTTEN_LABELS = beam.metrics.Metrics.counter('kbml.monitoring', 'labels_forgotten_without_prediction')


def _count_forgotten(prediction: Optional[Observation], label: Optional[Observation]) -> Tuple[int, int]:
  """A forgotten event's unpaired prediction and label, as (predictions, labels) counts."""
  return (int(label is None and prediction is not None and prediction.kind == PREDICTION),
          int(prediction is None and label is not None))


class JoinLabelsFn(beam.DoFn):
  """Keyed by event id: the first prediction meets the first label (see the module docstring).

  An event's state is cleared ``retention_s`` of event time after its
  first record (a watermark timer), as :class:`LabelJoin` forgets it; what
  it held unpaired is counted (``predictions_forgotten_without_label``,
  ``labels_forgotten_without_prediction``), and a label that comes later
  starts a new wait, which is counted in turn.
  """

  PREDICTION_STATE = ReadModifyWriteStateSpec('prediction', PickleCoder())
  LABEL_STATE = ReadModifyWriteStateSpec('label', PickleCoder())
  FORGET = TimerSpec('forget', TimeDomain.WATERMARK)

  def __init__(self, retention_s: float):
    self._retention_s = retention_s

  def process(self, element: Tuple[str, Observation], prediction_state=beam.DoFn.StateParam(PREDICTION_STATE),
              label_state=beam.DoFn.StateParam(LABEL_STATE),
              forget=beam.DoFn.TimerParam(FORGET)) -> Iterable[Contribution]:
    _, observation = element
    kept = prediction_state.read(), label_state.read()
    if kept == (None, None):
      forget.set(Timestamp.of(_event_time(observation) + self._retention_s))
    prediction, label, contributions = _join(observation, *kept)
    if prediction is not kept[0]:
      prediction_state.write(prediction)
    if label is not kept[1]:
      label_state.write(label)
    return contributions

  @on_timer(FORGET)
  def forget(self, prediction_state=beam.DoFn.StateParam(PREDICTION_STATE),
             label_state=beam.DoFn.StateParam(LABEL_STATE)):
    predictions, labels = _count_forgotten(prediction_state.read(), label_state.read())
    FORGOTTEN_PREDICTIONS.inc(predictions)
    FORGOTTEN_LABELS.inc(labels)
    prediction_state.clear()
    label_state.clear()


class LabelJoin:
  """The join of :class:`JoinLabelsFn` in one process's memory, forgetting what waits too long.

  An event is forgotten once the newest event time seen is
  ``retention_s`` past its first record: a label that comes later starts a
  new wait and never meets its prediction. What is forgotten unpaired is
  counted in :attr:`forgotten_predictions` and :attr:`forgotten_labels`.
  Safe to share between threads.
  """

  def __init__(self, retention_s: float):
    self._retention_s = retention_s
    self._lock = threading.Lock()
    self._kept: Dict[str, List[Optional[Observation]]] = {}  # event id -> [prediction, label]
    self._first_seen: Deque[Tuple[float, str]] = collections.deque()  # (event time, key), as the keys came
    self._newest = -math.inf
    self.forgotten_predictions = 0
    self.forgotten_labels = 0

  def __len__(self) -> int:
    return len(self._kept)

  def observe(self, key: str, observation: Observation) -> List[Contribution]:
    event_time = _event_time(observation)
    with self._lock:
      self._newest = max(self._newest, event_time)
      kept = self._kept.get(key)
      if kept is None:
        kept = self._kept[key] = [None, None]
        self._first_seen.append((event_time, key))
      kept[0], kept[1], contributions = _join(observation, *kept)
    return contributions

  def forget_old(self) -> Tuple[int, int]:
    """Forgets the events first seen more than the retention before the newest event time; returns how
    many predictions without a label and labels without a prediction it forgot."""
    horizon = self._newest - self._retention_s
    predictions = labels = 0
    with self._lock:
      while self._first_seen and self._first_seen[0][0] < horizon:
        forgotten = _count_forgotten(*self._kept.pop(self._first_seen.popleft()[1]))
        predictions += forgotten[0]
        labels += forgotten[1]
      self.forgotten_predictions += predictions
      self.forgotten_labels += labels
    return predictions, labels


class JoinLabelsInProcessFn(beam.DoFn):
  """:class:`JoinLabelsFn` for the local runner: one :class:`LabelJoin` in the process, bounded by its retention.

  The local runner keeps keyed state in the process too, and its event-time
  timers fire at once (see ``transforms/kafka_io.py``), so keyed state could
  never forget. Every run rebuilds the join from the topics (the pipeline
  reads them from the beginning), so nothing is lost with the process.
  """

  def __init__(self, retention_s: float):
    self._retention_s = retention_s
    self._shared = shared.Shared()
    self._join: Optional[LabelJoin] = None

  def setup(self):
    self._join = self._shared.acquire(lambda: LabelJoin(self._retention_s))

  def process(self, element: Tuple[str, Observation]) -> Iterable[Contribution]:
    return self._join.observe(*element)

  def finish_bundle(self):
    predictions, labels = self._join.forget_old()
    FORGOTTEN_PREDICTIONS.inc(predictions)
    FORGOTTEN_LABELS.inc(labels)


@dataclasses.dataclass(frozen=True)
class MonitoringSettings:
  """Where metrics and alerts go, the windows, and the alert thresholds.

  Attributes:
    use_case: the use case whose predictions and labels are monitored.
    warehouse_url: the warehouse of the metrics tables.
    model_dir: the model store (the versions' training statistics).
    alerts_config: Kafka producer settings for the alerts.
    alerts_topic: the alerts topic.
    window_s: length of the event-time windows.
    grace_s: a window is complete once a prediction this much later than
      its end has arrived (predictions come roughly in event-time order).
    label_delay_s: how long after an event its label arrives.
    psi_threshold: PSI above which a statistic has drifted.
    min_window_predictions: fewer predictions in a window: no drift check.
    precision_floor: alert when a window's labelled precision is lower.
    recall_floor: alert when its labelled recall is lower.
    min_labelled_positives: fewer positives (frauds, failures) in a window: no precision or recall check.
    max_dead_letter_rate: alert when a window's share of dead letters is higher.
    scorer_group: the scorer's consumer group, for its lag.
    events_topic: the topic the scorer reads.
    max_scorer_lag: alert when the scorer is more records behind.
    lag_check_s: how often the lag is checked.
    kafka_config: Kafka client settings, for the lag.
    drift_exclude: statistics not checked for drift.
    metrics_table: the partial sums' table.
    labelled_table: the labelled predictions' table.
    read_partitions: the partitions read, as ``(PREDICTION or LABEL,
      partition)``: a window closes only once each of them has passed it,
      so that a partition read ahead of the others does not close windows
      the others still add to. Empty: the partitions seen so far.
  """
  use_case: UseCase
  warehouse_url: str
  model_dir: str
  alerts_config: Dict[str, str]
  alerts_topic: str
  window_s: float = 86_400.0
  grace_s: float = 3_600.0
  label_delay_s: float = 7 * 86_400.0
  psi_threshold: float = 0.2
  min_window_predictions: int = 200
  precision_floor: float = 0.0
  recall_floor: float = 0.0
  min_labelled_positives: int = 10
  max_dead_letter_rate: float = 0.01
  scorer_group: str = 'kbml-scoring'
  events_topic: str = ''
  max_scorer_lag: int = 10_000
  lag_check_s: float = 30.0
  kafka_config: Dict[str, str] = dataclasses.field(default_factory=dict)
  drift_exclude: Tuple[str, ...] = ()
  metrics_table: str = METRICS_TABLE
  labelled_table: str = LABELLED_PREDICTIONS_TABLE
  read_partitions: Tuple[Tuple[str, int], ...] = ()


class WindowMetricsFn(beam.DoFn):
  """Sums contributions by window, version and role; writes them each bundle; raises alerts for closed windows."""

  def __init__(self, settings: MonitoringSettings):
    self._settings = settings

  def setup(self):
    settings = self._settings
    self._warehouse = open_warehouse(settings.warehouse_url)
    self._warehouse.prepare()
    self._labelled_schema = labelled_predictions_schema(settings.use_case)
    for table, schema in ((settings.metrics_table, METRICS_SCHEMA), (settings.labelled_table, self._labelled_schema),
                          (ALERTS_TABLE, ALERTS_SCHEMA)):
      self._warehouse.ensure_table(table, schema)
    self._store = ModelStore(settings.model_dir)
    self._alerts = AlertSink(settings.alerts_config, settings.alerts_topic)
    self._distributions: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    # Per topic partition read: the newest event time of a new prediction, the newest label time.
    self._newest_event_time = {read: -math.inf for read in settings.read_partitions if read[0] == PREDICTION}
    self._newest_label_time = {read: -math.inf for read in settings.read_partitions if read[0] == LABEL}
    self._checked_event_horizon = self._checked_label_horizon = -math.inf
    self._next_lag_check = 0.0
    self._lagging = False

  def start_bundle(self):
    self._sums: Dict[WindowKey, Sums] = {}
    self._labelled_rows: List[Dict[str, object]] = []
    # The windows (start, end) this bundle added predictions or dead letters to, and labels: a closed one is
    # checked again.
    self._predicted_windows: Set[Tuple[float, float]] = set()
    self._labelled_windows: Set[Tuple[float, float]] = set()

  def _window(self, event_time: float) -> Tuple[float, float]:
    start = math.floor(event_time / self._settings.window_s) * self._settings.window_s
    return start, start + self._settings.window_s

  def _add(self, event_time: float, version: str, role: str, sums: Sums):
    add_sums(self._sums.setdefault((*self._window(event_time), version, role), {}), sums)

  def _drift_bins(self, version: str, features: Dict[str, float], score: float) -> Dict[str, int]:
    if version not in self._distributions:
      try:
        self._distributions[version] = training_distributions(self._store.metadata(version))
      except ModelStoreError as e:
        _LOG.warning('no training statistics for model version %s, no drift measured for it: %s', version, e)
        self._distributions[version] = {}
    values = {**(features or {}), 'score': score}
    return {name: statistic_bin(values[name], distribution['bin_edges'])
            for name, distribution in self._distributions[version].items() if name in values}

  def process(self, contribution: Contribution):
    fields = contribution.prediction
    if contribution.kind == DEAD_LETTER:
      self._add(fields['source_time'], '', PIPELINE_ROLE, {('dead_letters', 0): 1.0})
      self._predicted_windows.add(self._window(fields['source_time']))
      return
    event_time, version = fields['event_time'], fields['model_version']
    challenger = fields.get('challenger_version')
    if contribution.kind == PREDICTION:
      _advance(self._newest_event_time, contribution.read_from, event_time)
      self._predicted_windows.add(self._window(event_time))
      self._add(event_time, version, CHAMPION, prediction_sums(
          fields['score'], fields['flagged'], self._drift_bins(version, fields.get('features'), fields['score'])))
      if challenger:
        self._add(event_time, challenger, CHALLENGER,
                  prediction_sums(fields['challenger_score'], fields['challenger_flagged']))
      return
    if contribution.read_from[0] != PREDICTION:  # completed by its label: the label's partition moved on
      _advance(self._newest_label_time, contribution.read_from, contribution.known_time)
    self._labelled_windows.add(self._window(event_time))
    scored = [(version, CHAMPION, fields['score'], fields['flagged'])]
    if challenger:
      scored.append((challenger, CHALLENGER, fields['challenger_score'], fields['challenger_flagged']))
    use_case = self._settings.use_case
    for model_version, role, score, flagged in scored:
      self._add(event_time, model_version, role, labelled_sums(score, flagged, bool(contribution.positive)))
      self._labelled_rows.append({
          use_case.id_column: fields[use_case.id_column], use_case.time_column: fields[use_case.time_column],
          use_case.key_columns[0]: fields[use_case.key_columns[0]], 'model_version': model_version, 'role': role,
          'score': score, 'flagged': int(flagged), use_case.label_column: int(contribution.positive)})

  def finish_bundle(self):
    settings = self._settings
    if self._sums:
      self._warehouse.write_rows(settings.metrics_table, METRICS_SCHEMA, metric_rows(
          self._sums, uuid.uuid4().hex, utc_iso(time.time())))
    if self._labelled_rows:
      self._warehouse.write_rows(settings.labelled_table, self._labelled_schema, self._labelled_rows)
    self._check_closed_windows()
    self._check_scorer_lag()

  def _check_closed_windows(self):
    """Checks the windows that closed since the last bundle, and the closed ones this bundle added to.

    A window closes when every partition read has moved ``grace_s`` past
    its end; a prediction or label that comes later than that (a scorer
    catching up emits days at once, not quite in order) adds to a closed
    window, which is then checked again. An alert is raised once anyway.
    """
    settings = self._settings
    event_horizon = min(self._newest_event_time.values(), default=-math.inf) - settings.grace_s
    for window, by_version, dead_letters in self._closed_windows(self._checked_event_horizon, event_horizon,
                                                                 self._predicted_windows):
      self._check_dead_letters(window, by_version, dead_letters)
      for version, rows in by_version.items():
        self._check_drift(window, version, rows)
    self._checked_event_horizon = max(self._checked_event_horizon, event_horizon)
    label_horizon = (min(self._newest_label_time.values(), default=-math.inf) - settings.label_delay_s
                     - settings.grace_s)
    for window, by_version, _ in self._closed_windows(self._checked_label_horizon, label_horizon,
                                                      self._labelled_windows):
      for version, rows in by_version.items():
        self._check_accuracy(window, version, rows)
    self._checked_label_horizon = max(self._checked_label_horizon, label_horizon)

  def _closed_windows(self, checked: float, horizon: float, updated: Set[Tuple[float, float]]):
    """(window, {model version: its summed champion rows}, dead letters) of the windows that ended in
    (checked, horizon], or by ``checked`` and are in ``updated``; a window of dead letters alone too."""
    ends = {end for _, end in updated if end <= checked}
    conditions = [f'window_end = {self._warehouse.timestamp(_utc(end))}' for end in sorted(ends)]
    if horizon > checked:
      since = f'window_end > {self._warehouse.timestamp(_utc(checked))} AND ' if checked > -math.inf else ''
      conditions.append(f'{since}window_end <= {self._warehouse.timestamp(_utc(horizon))}')
    if not conditions:
      return
    sums = read_sums(self._warehouse, f"({' OR '.join(conditions)}) AND role IN ('{CHAMPION}', '{PIPELINE_ROLE}')",
                     self._settings.metrics_table)
    for (start, end), rows in sums.groupby(['window_start', 'window_end'], sort=True):
      champion = rows[rows['role'] == CHAMPION]
      by_version = {version: versioned for version, versioned in champion.groupby('model_version', sort=True)}
      dead_letters = float(rows.loc[rows['role'] == PIPELINE_ROLE, 'value'].sum())
      yield (_seconds(start), _seconds(end)), by_version, dead_letters

  def _check_dead_letters(self, window, by_version, dead_letters: float):
    """Dead letters against all the window's records, whichever model scored them: a version promoted late in the
    window, with few predictions of its own, must not make the window's dead letters look many."""
    settings = self._settings
    predictions = sum(rows.loc[rows['metric'] == 'predictions', 'value'].sum() for rows in by_version.values())
    rate = dead_letters / (predictions + dead_letters) if dead_letters else 0.0
    if rate > settings.max_dead_letter_rate:
      # The dead letters belong to no model version, like their rows in the metrics table.
      self._raise(DEAD_LETTER_RATE, window, '', 'records',
                  f'{rate:.1%} of the records of the window {_describe(window)} went to the dead-letter topic (more '
                  f'than {settings.max_dead_letter_rate:.1%}): look at their reasons (header kbml.error.reason) and '
                  f'fix the producer.', rate=rate, threshold=settings.max_dead_letter_rate)

  def _drifted(self, rows, metadata) -> Dict[str, float]:
    """The statistics of one window and version past the PSI threshold (none for a window with too few
    predictions to tell)."""
    settings = self._settings
    if window_summary(rows)['predictions'] < settings.min_window_predictions:
      return {}
    return {statistic: psi for statistic, psi in drift_by_statistic(rows, metadata).items()
            if psi > settings.psi_threshold and statistic not in settings.drift_exclude}

  def _drift_alert_open(self, window, version: str, metadata) -> bool:
    """Whether the version has a drift alert still open at ``window``: one raised within the
    _OPEN_ALERT_WINDOWS windows before it, with every window since drifting too."""
    warehouse, length = self._warehouse, window[1] - window[0]
    raised = warehouse.query(
        f'SELECT MAX(window_start) AS since FROM {warehouse.table_ref(ALERTS_TABLE)} WHERE kind = '
        f'{warehouse.string(DRIFT)} AND model_version = {warehouse.string(version)} AND window_start < '
        f'{warehouse.timestamp(_utc(window[0]))} AND window_start >= '
        f'{warehouse.timestamp(_utc(window[0] - _OPEN_ALERT_WINDOWS * length))}')['since'].iloc[0]
    if raised is None or raised != raised:  # no alert (NULL, or NaT)
      return False
    since = _seconds(raised)
    between = read_sums(warehouse, f"window_start > {warehouse.timestamp(_utc(since))} AND window_start < "
                        f"{warehouse.timestamp(_utc(window[0]))} AND role = '{CHAMPION}' AND model_version = "
                        f'{warehouse.string(version)}', self._settings.metrics_table)
    by_start = {_seconds(start): rows for start, rows in between.groupby('window_start')}
    return all(start in by_start and self._drifted(by_start[start], metadata)
               for start in (since + k * length for k in range(1, round((window[0] - since) / length))))

  def _check_drift(self, window, version: str, rows):
    """One drift alert for the window and version, listing every statistic past the threshold, most drifted first;
    none while the version's alert of an earlier window is still open (every window since drifted too)."""
    try:
      metadata = self._store.metadata(version)
    except ModelStoreError:
      return
    drifted = self._drifted(rows, metadata)
    if not drifted or self._drift_alert_open(window, version, metadata):
      return
    settings = self._settings
    ranked = sorted(drifted.items(), key=lambda item: (-item[1], item[0]))
    listed = ', '.join(f'{statistic} {psi:.2f}' for statistic, psi in ranked[:_LISTED_STATISTICS])
    more = f' and {len(ranked) - _LISTED_STATISTICS} more' if len(ranked) > _LISTED_STATISTICS else ''
    predictions = window_summary(rows)['predictions']
    self._raise(DRIFT, window, version, ','.join(sorted(drifted)),
                f'{len(ranked)} statistic(s) drifted in the window {_describe(window)} against the training data of '
                f'model {version} (PSI > {settings.psi_threshold}, {int(predictions):,} predictions): {listed}{more}. '
                'The model may no longer fit: retrain on recent data (`kbml retrain`).',
                statistic=ranked[0][0], psi=ranked[0][1], drifted=dict(ranked), threshold=settings.psi_threshold,
                predictions=predictions)

  def _check_accuracy(self, window, version: str, rows):
    summary = window_summary(rows)
    settings = self._settings
    if summary['positives'] < settings.min_labelled_positives:
      return
    positives = settings.use_case.positive_noun
    for kind, name, value, floor in ((PRECISION_BELOW_FLOOR, 'precision', summary['precision'],
                                      settings.precision_floor),
                                     (RECALL_BELOW_FLOOR, 'recall', summary['recall'], settings.recall_floor)):
      if not math.isnan(value) and value < floor:
        self._raise(kind, window, version, name,
                    f'the {name} of model {version} in the window {_describe(window)} is {value:.3f}, below the '
                    f'floor {floor} ({int(summary["labelled"]):,} labelled, {int(summary["positives"]):,} '
                    f'{positives}): '
                    'retrain (`kbml retrain`) or roll back (`kbml promote VERSION`).',
                    **{name: value, 'floor': floor, 'labelled': summary['labelled'], 'positives': summary['positives'],
                       'average_precision': summary['average_precision']})

  def _raised(self, kind: str, version: str, window_start: float) -> bool:
    """Whether an alert of ``kind`` was raised for the version's window starting then."""
    warehouse = self._warehouse
    return bool(len(warehouse.query(
        f'SELECT kind FROM {warehouse.table_ref(ALERTS_TABLE)} WHERE kind = {warehouse.string(kind)} AND '
        f'model_version = {warehouse.string(version)} AND window_start = {warehouse.timestamp(_utc(window_start))}')))

  def _raise(self, kind: str, window: Tuple[float, float], version: str, subject: str, message: str, **details):
    """Sends an alert unless one of its kind was raised for the window and version before (one per window,
    version and kind)."""
    if self._raised(kind, version, window[0]):
      return
    start = utc_iso(window[0])
    self._alerts.send(kind, message, window_start=start, window_end=utc_iso(window[1]), model_version=version,
                      **details)
    self._warehouse.write_rows(ALERTS_TABLE, ALERTS_SCHEMA, [{
        'kind': kind, 'window_start': start, 'model_version': version, 'subject': subject,
        'raised_at': utc_iso(time.time()), 'message': message}])

  def _check_scorer_lag(self):
    settings = self._settings
    if time.monotonic() < self._next_lag_check or not settings.kafka_config:
      return
    self._next_lag_check = time.monotonic() + settings.lag_check_s
    lag = group_lag(settings.kafka_config, settings.scorer_group, [settings.events_topic])
    if lag is None:  # the scorer has committed nothing yet
      return
    if lag > settings.max_scorer_lag and not self._lagging:
      message = (f'the scorer (group {settings.scorer_group}) is {lag:,} {settings.use_case.event_noun} behind '
                 f'(more than {settings.max_scorer_lag:,}): predictions are late; is it running, and keeping up?')
      self._alerts.send(SCORER_LAG, message, lag=lag, threshold=settings.max_scorer_lag, group=settings.scorer_group)
    self._lagging = lag > settings.max_scorer_lag


def _advance(newest: Dict[Tuple[str, int], float], partition: Tuple[str, int], moment: float):
  newest[partition] = max(newest.get(partition, -math.inf), moment)


def _utc(seconds: float) -> datetime.datetime:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def _seconds(moment) -> float:
  return moment.timestamp()


def _describe(window: Tuple[float, float]) -> str:
  return f'{utc_iso(window[0])} to {utc_iso(window[1])}'
