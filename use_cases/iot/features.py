"""The IoT features: each reading against its machine's own recent readings.

For each sensor: the reading, the machine's mean over the last 1, 6 and 24
hours and its standard deviation over the last 6 (the reading included); the
number of readings in the last 24 hours; the machine type, one-hot. A wearing
bearing shows as vibration above its 24-hour mean, failing cooling as a
temperature that climbs over hours, a leak as pressure that drifts down.

A machine's readings are applied as they arrive: Kafka keeps a key's records
in order, and the records are keyed by machine (a reading that still arrives
late is inserted at its time, and gets the features of the readings before
it). No feature uses the labels, so each machine's history is its own and the
three forms of ``transforms/feature_forms.py`` need no event-time order across
machines: the same rows whatever the runner's interleaving.
"""

import math
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import TimestampedValue

from kbml.warehouse import TableSchema
from transforms.batches import items_of
from transforms.feature_forms import (
  EVENT_KIND,
  GROUPED,
  KEYED_STATE,
  LABEL_KIND,
  METRICS_NAMESPACE,
  ORDERED_BUNDLES,
  REPEATED_TAG,
  FeatureOutputs,
  OrderedBundleFeatures,
  PendingEvent,
  check_form,
  note_applied,
  repeated,
)
from transforms.records import parse_utc_timestamp, utc_iso
from transforms.snapshots import StateSnapshots
from use_cases.iot.records import READING_COLUMNS, Reading, ReadingLabel
from use_cases.iot.simulator import MACHINE_TYPES, SENSORS

HOUR_SECONDS = 3_600
WINDOW_HOURS = (1, 6, 24)
SPREAD_HOURS = 6
HISTORY_HOURS = max(WINDOW_HOURS)

SENSOR_FEATURES = [feature for sensor in SENSORS for feature in (
    sensor.upper(), *(f'{sensor.upper()}_MEAN_{hours}H' for hours in WINDOW_HOURS),
    f'{sensor.upper()}_STD_{SPREAD_HOURS}H')]
MACHINE_TYPE_FEATURES = [f'MACHINE_TYPE_{kind}' for kind in MACHINE_TYPES]
FEATURE_NAMES = [*SENSOR_FEATURES, f'NB_READINGS_{HISTORY_HOURS}H', *MACHINE_TYPE_FEATURES]

FEATURES_TABLE = TableSchema(
    columns=(*READING_COLUMNS, ('machine_type', 'STRING'), ('kafka_partition', 'INT64'), ('kafka_offset', 'INT64'),
             *((name, 'INT64' if name.startswith(('NB_', 'MACHINE_TYPE_')) else 'FLOAT64') for name in FEATURE_NAMES)),
    key=('reading_id',))


class MachineHistory:
  """A machine's readings of the last 24 hours (time, id, sensor values), in time order."""

  def __init__(self):
    self._times = np.empty(0)
    self._ids = np.empty(0, np.int64)
    self._values = np.empty((0, len(SENSORS)))

  @property
  def newest_time(self) -> float:
    return float(self._times[-1]) if len(self._times) else -math.inf

  def add(self, reading: Reading) -> Optional[Dict[str, float]]:
    """Adds a reading at its place in time; returns its sensor features.

    Returns None, and keeps nothing of it, for a repeat: a reading whose id
    the history already holds (the first one wins).
    """
    at = reading.reading_time
    position = int(np.searchsorted(self._times, at, side='right'))
    newest = max(at, self.newest_time)
    # A reading far older than the newest (a far-future one came first) keeps its own place: every window taken
    # at its time holds it.
    expired = min(position, int(np.searchsorted(self._times, newest - HISTORY_HOURS * HOUR_SECONDS, side='right')))
    self._times, self._ids, self._values = self._times[expired:], self._ids[expired:], self._values[expired:]
    if reading.reading_id in self._ids:
      return None
    position -= expired
    values = np.array([getattr(reading, sensor) for sensor in SENSORS])
    self._times = np.insert(self._times, position, at)
    self._ids = np.insert(self._ids, position, reading.reading_id)
    self._values = np.insert(self._values, position, values, axis=0)
    end = position + 1
    features = {sensor.upper(): float(value) for sensor, value in zip(SENSORS, values, strict=True)}
    for hours in WINDOW_HOURS:
      window = self._values[self._window_start(at, hours, end):end]
      for sensor, mean in zip(SENSORS, window.mean(axis=0), strict=True):
        features[f'{sensor.upper()}_MEAN_{hours}H'] = float(mean)
      if hours == SPREAD_HOURS:
        for sensor, spread in zip(SENSORS, window.std(axis=0), strict=True):
          features[f'{sensor.upper()}_STD_{SPREAD_HOURS}H'] = float(spread)
      if hours == HISTORY_HOURS:
        features[f'NB_READINGS_{HISTORY_HOURS}H'] = len(window)
    return features

  def _window_start(self, at: float, hours: float, end: int) -> int:
    return int(np.searchsorted(self._times[:end], at - hours * HOUR_SECONDS, side='right'))


def feature_row(reading: Reading, sensor_features: Mapping[str, float]) -> Dict[str, object]:
  """A reading's identity and its features, as a warehouse row."""
  features = {**sensor_features, **{name: int(reading.machine_type == kind)
                                    for name, kind in zip(MACHINE_TYPE_FEATURES, MACHINE_TYPES, strict=True)}}
  return {'reading_id': reading.reading_id, 'reading_time': utc_iso(reading.reading_time),
          'machine_id': reading.machine_id, 'machine_type': reading.machine_type,
          'kafka_partition': reading.kafka_partition, 'kafka_offset': reading.kafka_offset,
          **{name: features[name] for name in FEATURE_NAMES}}


def reading_of_feature_row(row: Mapping[str, object]) -> Reading:
  """The reading a :func:`feature_row` was computed from (its sensors' values are features)."""
  return Reading(row['reading_id'], parse_utc_timestamp(row['reading_time']), row['machine_id'], row['machine_type'],
                 *(row[sensor.upper()] for sensor in SENSORS), row['kafka_partition'], row['kafka_offset'])


class MachineHistories:
  """Every machine's history, for the ``ORDERED_BUNDLES`` form; it forgets a machine a day after its last reading."""

  def __init__(self):
    self._machines: Dict[int, MachineHistory] = {}
    self._next_sweep = -math.inf
    self.next_offsets: Dict[Tuple[str, int], int] = {}
    self.last_event_ids: Dict[Tuple[str, int], int] = {}

  def __len__(self) -> int:
    return len(self._machines)

  def apply(self, event) -> Optional[Dict[str, object]]:
    """Applies a Reading (returns its row; None for a repeat) or a label (changes nothing, returns None)."""
    note_applied(self.next_offsets, self.last_event_ids, event, event.reading_id)
    if isinstance(event, ReadingLabel):
      return None
    history = self._machines.setdefault(event.machine_id, MachineHistory())
    features = history.add(event)
    self._forget_the_idle(event.reading_time)
    return None if features is None else feature_row(event, features)

  def _forget_the_idle(self, now: float):
    if now < self._next_sweep:
      return
    self._next_sweep = now + HISTORY_HOURS * HOUR_SECONDS
    idle = [machine for machine, history in self._machines.items()
            if history.newest_time < now - HISTORY_HOURS * HOUR_SECONDS]
    for machine in idle:
      del self._machines[machine]
    Metrics.counter(METRICS_NAMESPACE, 'forgotten_machines').inc(len(idle))


def pending_event(event) -> PendingEvent:
  """A Reading at its time, or a label when it became known, with its place in the order events are applied."""
  if isinstance(event, ReadingLabel):
    return PendingEvent(int(event.known_time * 1_000_000), LABEL_KIND, event.reading_id, event)
  return PendingEvent(int(event.reading_time * 1_000_000), EVENT_KIND, event.reading_id, event)


def _readings_by_machine(events) -> List[Tuple[int, Reading]]:
  """The Readings among events (one, or a Batch), keyed by machine."""
  return [(event.machine_id, event) for event in items_of(events) if isinstance(event, Reading)]


def _arrival_order(reading: Reading) -> Tuple:
  return reading.reading_time, reading.reading_id, reading.kafka_partition, reading.kafka_offset


def _features_of_group(element) -> Iterator:
  """(machine_id, its readings) -> their rows in time order, or the repeats."""
  _, readings = element
  history = MachineHistory()
  for reading in sorted(readings, key=_arrival_order):
    features = history.add(reading)
    yield TimestampedValue(feature_row(reading, features), reading.reading_time) if features is not None \
        else repeated(reading)


class _MachineFeaturesFn(beam.DoFn):
  """(machine_id, Reading) -> its row (or the repeat), the machine's history in keyed state."""
  HISTORY = ReadModifyWriteStateSpec('history', PickleCoder())

  def process(self, element, history_state=beam.DoFn.StateParam(HISTORY)):
    _, reading = element
    history = history_state.read() or MachineHistory()
    features = history.add(reading)
    if features is None:
      yield repeated(reading)
      return
    history_state.write(history)
    yield TimestampedValue(feature_row(reading, features), reading.reading_time)


class ComputeMachineFeatures(beam.PTransform):
  """Computes the feature row of every reading (the use case's ``compute_features``).

  Input: Readings and labels in the global window (``ORDERED_BUNDLES`` also
  takes them in Batches); the labels change nothing. Output: a
  :class:`~transforms.feature_forms.FeatureOutputs`: one row per reading
  (:func:`feature_row`) at its time, and the readings whose id their machine's
  last day already had.

  Args:
    label_delay_days: unused (no feature uses the labels); taken as every use case's feature transform takes it.
    form: ``KEYED_STATE``, ``ORDERED_BUNDLES`` or ``GROUPED``; the same rows.
    rows_per_batch: ``ORDERED_BUNDLES`` only: rows in Batches of at most this many.
    snapshots: ``ORDERED_BUNDLES`` only: the histories' snapshots.
  """

  def __init__(self, label_delay_days: float = 1.0, form: str = KEYED_STATE, rows_per_batch: Optional[int] = None,
               snapshots: Optional[StateSnapshots] = None):
    super().__init__()
    del label_delay_days
    check_form(form, rows_per_batch, snapshots)
    self._form = form
    self._rows_per_batch = rows_per_batch
    self._snapshots = snapshots

  def expand(self, events) -> FeatureOutputs:
    if self._form == ORDERED_BUNDLES:
      return events | 'OrderedBundles' >> OrderedBundleFeatures(MachineHistories, pending_event, self._rows_per_batch,
                                                                self._snapshots)
    keyed = events | 'KeyByMachine' >> beam.FlatMap(_readings_by_machine)
    if self._form == GROUPED:
      outputs = (keyed
                 | 'GroupByMachine' >> beam.GroupByKey()
                 | 'MachineFeatures' >> beam.FlatMap(_features_of_group).with_outputs(REPEATED_TAG, main='rows'))
    else:
      outputs = keyed | 'MachineFeatures' >> beam.ParDo(_MachineFeaturesFn()).with_outputs(REPEATED_TAG, main='rows')
    return FeatureOutputs(outputs.rows, outputs[REPEATED_TAG])


def snapshot_identity(label_delay_days: float, readings_topic: str, labels_topic: str) -> Dict[str, object]:
  """What a snapshot of the machine histories depends on."""
  del label_delay_days  # no feature uses it
  return {'state': 'machine histories', 'features': FEATURE_NAMES,
          'streams': {'Reading': readings_topic, 'ReadingLabel': labels_topic}}


def history_span_days(label_delay_days: float) -> float:
  """How far before a reading lie the readings its features use: a day."""
  del label_delay_days
  return HISTORY_HOURS / 24

