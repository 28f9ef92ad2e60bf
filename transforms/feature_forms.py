"""The forms a use case's feature transform runs in, and the one they share on the local runner.

A feature transform (a use case's ``compute_features``) turns event and label
rows into feature rows, in event time, in three forms that give the same rows:

- ``KEYED_STATE``, for a stream on a distributed runner (Dataflow, Flink):
  the histories are keyed state.
- ``ORDERED_BUNDLES``, for a stream on the local runner, whose partitions
  are read in event-time step (``ReadFromKafka(align_partitions=True)``):
  every event of a bundle precedes every event of the next, so each
  bundle's events are applied in event-time order at its end, to histories
  kept in the process (:class:`OrderedBundleFeaturesFn`), which are saved in
  snapshots with the offsets they reflect.
- ``GROUPED``, for bounded input (a backfill, a replay): each key's events
  are grouped and applied in time order in one go.

Each gives a :class:`FeatureOutputs`: the rows, and the events whose id came
before (the first one wins; the pipelines send the repeats to the dead-letter
topic).
"""

import operator
import threading
import uuid
import weakref
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
import objsize
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils import windowed_value

from transforms.batches import Batch, items_of
from transforms.snapshots import StateSnapshots

# Beam's SDK harness weighs every value it puts in its state cache with objsize, which by default first collects
# the ids of every loaded module's globals, on every call: 1.5 ms per state write, 5 ms once TensorFlow is loaded
# (BENCHMARKS.md). The histories a feature transform keeps in state reach no module globals, so their weights do
# not change.
objsize.default_settings.exclude_modules_globals = False

KEYED_STATE = 'keyed_state'
ORDERED_BUNDLES = 'ordered_bundles'
GROUPED = 'grouped'
FORMS = (KEYED_STATE, ORDERED_BUNDLES, GROUPED)

METRICS_NAMESPACE = 'kbml.features'
# A feature transform's output of the events whose id came before: the first one wins.
REPEATED_TAG = 'repeated'
# Within one instant, labels are applied before events: a label that has arrived by time t is known when the
# event at t gets its features.
LABEL_KIND, EVENT_KIND = 0, 1


class FeatureOutputs(NamedTuple):
  """What a feature transform gives: the feature rows, and the repeated events (no row: the first one won)."""
  rows: beam.PCollection
  repeated: beam.PCollection


def check_form(form: str, rows_per_batch: Optional[int], snapshots: Optional[StateSnapshots]):
  """Raises ValueError for an unknown form, or batches or snapshots asked of a form other than ORDERED_BUNDLES."""
  if form not in FORMS:
    raise ValueError(f'Unknown feature form {form!r}: choose one of {", ".join(FORMS)}.')
  if (rows_per_batch is not None or snapshots is not None) and form != ORDERED_BUNDLES:
    raise ValueError(f'Only the {ORDERED_BUNDLES!r} form hands on rows in batches and takes snapshots.')


def repeated(event) -> beam.pvalue.TaggedOutput:
  """The ``REPEATED_TAG`` output of an event whose id came before (Beam counter ``repeated_events``)."""
  Metrics.counter(METRICS_NAMESPACE, 'repeated_events').inc()
  return beam.pvalue.TaggedOutput(REPEATED_TAG, event)


class PendingEvent(NamedTuple):
  """An event or label with its place in the order events are applied: time, label first, id."""
  micros: int
  kind: int
  event_id: int
  event: object


# The order events are applied in: time, label first, id. A duplicate record keeps its place (the sort is stable
# and never compares the events themselves).
APPLY_ORDER = operator.itemgetter(0, 1, 2)


def in_order(events: Iterable[PendingEvent]) -> List[PendingEvent]:
  """Sorted in the order they are applied (``APPLY_ORDER``)."""
  return sorted(events, key=APPLY_ORDER)


_IN_THE_GLOBAL_WINDOW = (GlobalWindow(),)
# The histories of each OrderedBundleFeaturesFn, by its id: one per process, whichever DoFn instance (thread,
# bundle processor) runs a bundle; gone with the last instance.
_PROCESS_HISTORIES: 'weakref.WeakValueDictionary[str, object]' = weakref.WeakValueDictionary()
_PROCESS_HISTORIES_LOCK = threading.Lock()


class OrderedBundleFeaturesFn(beam.DoFn):
  """Events and labels -> feature rows, each bundle's events applied in event-time order at its end.

  The ``ORDERED_BUNDLES`` form of every use case: for bundles in event-time
  order, in the global window. Events come one per element or in Batches (as
  ``ParseRecords`` gives a batched read's); rows leave at the end of the
  bundle that brought their events, at their times, one per element or with
  ``rows_per_batch`` in Batches of at most that many, each at its last row's
  time. An event the histories refuse (None from ``apply``) leaves on the
  ``REPEATED_TAG`` output.

  Args:
    new_histories: () -> the histories of every key, whose ``apply(event)``
      applies an event or label and returns the event's feature row (None
      for a label or a repeat), and whose ``next_offsets`` and
      ``last_event_ids`` (per (kind of event, partition): the offset after
      the newest record applied, and its event's id) a snapshot keeps.
    pending_event: an event or label -> its :class:`PendingEvent`.
    rows_per_batch: see above; None: one row per element.
    snapshots: start from the newest snapshot of the histories, if any, and
      save one now and then (``transforms/snapshots.py``).
  """

  def __init__(self, new_histories: Callable[[], object], pending_event: Callable[[object], PendingEvent],
               rows_per_batch: Optional[int], snapshots: Optional[StateSnapshots]):
    self._new_histories = new_histories
    self._pending_event = pending_event
    self._rows_per_batch = rows_per_batch
    self._snapshots = snapshots
    self._histories_id = uuid.uuid4().hex
    self._histories = None
    self._bundle: List[PendingEvent] = []

  def setup(self):
    with _PROCESS_HISTORIES_LOCK:
      self._histories = _PROCESS_HISTORIES.get(self._histories_id)
      if self._histories is None:
        loaded = self._snapshots.load() if self._snapshots is not None else None
        self._histories = loaded[1] if loaded else self._new_histories()
        _PROCESS_HISTORIES[self._histories_id] = self._histories

  def start_bundle(self):
    self._bundle = []
    # Between bundles, the histories hold the events of bundles whose outputs are all written: a restart from
    # the snapshot's offsets neither misses nor repeats a row. (Their offsets may not be committed yet; the
    # restart reads from the snapshot's.)
    if self._snapshots is not None and self._snapshots.due():
      with _PROCESS_HISTORIES_LOCK:
        self._snapshots.save(self._histories.next_offsets, self._histories, self._histories.last_event_ids)

  def process(self, events: Union[object, Batch]):
    self._bundle.extend(self._pending_event(event) for event in items_of(events))

  def finish_bundle(self):
    with _PROCESS_HISTORIES_LOCK:
      applied = [(pending, self._histories.apply(pending.event)) for pending in in_order(self._bundle)]
    rows = [(pending.micros, row) for pending, row in applied if row is not None]
    for pending, row in applied:
      if row is None and pending.kind == EVENT_KIND:
        yield repeated(windowed_value.create(pending.event, pending.micros, _IN_THE_GLOBAL_WINDOW))
    if self._rows_per_batch is None:
      for micros, row in rows:
        yield windowed_value.create(row, micros, _IN_THE_GLOBAL_WINDOW)
    else:
      for start in range(0, len(rows), self._rows_per_batch):
        batch = rows[start:start + self._rows_per_batch]
        yield windowed_value.create(Batch(row for _, row in batch), batch[-1][0], _IN_THE_GLOBAL_WINDOW)
    self._bundle = []


class OrderedBundleFeatures(beam.PTransform):
  """The ``ORDERED_BUNDLES`` form of a feature transform: :class:`OrderedBundleFeaturesFn` (its arguments) applied
  to events and labels in the global window; gives a :class:`FeatureOutputs`."""

  def __init__(self, new_histories: Callable[[], object], pending_event: Callable[[object], PendingEvent],
               rows_per_batch: Optional[int], snapshots: Optional[StateSnapshots]):
    super().__init__()
    self._fn = OrderedBundleFeaturesFn(new_histories, pending_event, rows_per_batch, snapshots)
    self._batched = rows_per_batch is not None

  def expand(self, events) -> FeatureOutputs:
    if not isinstance(events.windowing.windowfn, GlobalWindows):
      raise ValueError(f'The {ORDERED_BUNDLES!r} form needs its input in the global window.')
    ordered = beam.ParDo(self._fn)
    outputs = events | 'InOrderOfEachBundle' >> (ordered.with_output_types(Batch) if self._batched
                                                 else ordered).with_outputs(REPEATED_TAG, main='rows')
    return FeatureOutputs(outputs.rows, outputs[REPEATED_TAG])


def note_applied(next_offsets: Dict[Tuple[str, int], int], last_event_ids: Dict[Tuple[str, int], int], event,
                 event_id: int):
  """Notes in a histories' ``next_offsets`` and ``last_event_ids`` that ``event`` (a row with ``kafka_partition``
  and ``kafka_offset``) was applied, if it is the newest of its kind and partition."""
  key = (type(event).__name__, event.kafka_partition)
  if event.kafka_offset >= next_offsets.get(key, 0):
    next_offsets[key] = event.kafka_offset + 1
    last_event_ids[key] = event_id
