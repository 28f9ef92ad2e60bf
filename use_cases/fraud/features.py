"""The fraud features, defined once for ingest (training rows) and scoring.

The 15 features of the Fraud Detection Handbook (chapter 3), computed in
event time from the streams of transactions and labels:

- ``TX_AMOUNT``, ``TX_DURING_WEEKEND`` (Saturday or Sunday),
  ``TX_DURING_NIGHT`` (hour 0 to 6);
- per customer, for w in 1, 7, 30 days: the count and mean amount of the
  customer's transactions in (t - w, t], the current one included;
- per terminal, for w in 1, 7, 30 days and the label delay d (7 days): the
  count of the terminal's transactions in (t - d - w, t - d] and the share of
  them known to be fraudulent (0 when there are none). A label counts only
  once it has arrived, which is what a scorer can know at time t.

And 8 more from the same histories (FRAUD.md found such features help every
model): the amount against the customer's earlier 60 days (log ratio to the
median, z-score, ratio to the maximum), high amounts in the last 7 days,
earlier visits to this terminal, the time since the previous transaction;
the terminal's latest known labels that are frauds in a row, and how long
ago that run began.

Order. A customer's transactions are applied as they arrive: Kafka keeps a
key's records in order, and the records are keyed by customer (a transaction
that still arrives late is inserted at its time, so later ones count it). A
terminal's events come from many customers and from the labels topic, so
they are applied in event-time order (a label before a transaction of the
same instant). The result does not depend on how the runner interleaves
partitions and topics, and a replay yields the same rows as the original
run.

Three forms compute the same rows (``ComputeFeatures(form=...)``;
``transforms/feature_forms.py``):

- ``KEYED_STATE``, for a stream on a distributed runner (Dataflow, Flink):
  the histories are keyed state, and a terminal's events wait in its state
  until the watermark passes them. (Only one stage waits for the watermark:
  the local runner does not fire the timers of a second such stage fused
  behind the first.)
- ``ORDERED_BUNDLES``, for a stream on the local runner, whose partitions
  are read in event-time step (``ReadFromKafka(align_partitions=True)``):
  every event of a bundle precedes every event of the next, so each
  bundle's events are applied in event-time order at its end, to histories
  kept in the process, and the rows leave in the bundle that read their
  transactions. The local runner keeps keyed state in the process too, and
  loses it with the process (this form's histories are saved in snapshots
  with the offsets they reflect, ``snapshots``); but it loads, pickles and
  weighs a key's state at every bundle that touches it, and fires a timer
  per terminal a bundle later: about 60% of the scorer's CPU
  (BENCHMARKS.md).
- ``GROUPED``, for bounded input (a backfill, a replay): each customer's
  and each terminal's events are grouped and applied in time order in one
  go.
"""

import bisect
import datetime
import functools
import math
import operator
import pickle
from array import array
from decimal import Decimal
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from kbml.warehouse import TableSchema
from transforms.feature_forms import (
  APPLY_ORDER,
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
  in_order,
  note_applied,
  repeated,
)
from transforms.records import DAY_SECONDS, parse_utc_timestamp, utc_iso
from transforms.snapshots import StateSnapshots
from use_cases.fraud.records import TRANSACTION_COLUMNS, Label, Transaction, at_event_time, event_time

WINDOW_DAYS = (1, 7, 30)
DEFAULT_LABEL_DELAY_DAYS = 7

CUSTOMER_FEATURES = [f'CUSTOMER_ID_{kind}_{w}DAY_WINDOW' for w in WINDOW_DAYS for kind in ('NB_TX', 'AVG_AMOUNT')]
TERMINAL_FEATURES = [f'TERMINAL_ID_{kind}_{w}DAY_WINDOW' for w in WINDOW_DAYS for kind in ('NB_TX', 'RISK')]
HANDBOOK_FEATURES = ['TX_AMOUNT', 'TX_DURING_WEEKEND', 'TX_DURING_NIGHT', *CUSTOMER_FEATURES, *TERMINAL_FEATURES]
# Beyond the handbook (FRAUD.md): the amount against the customer's own earlier ones and the customer's habits
# (0 for a first transaction), and the terminal's latest known frauds.
HISTORY_DAYS = 60
HIGH_AMOUNT_RATIO = 3
CUSTOMER_HISTORY_FEATURES = ['CUSTOMER_ID_AMOUNT_LOG_RATIO_60DAY_MEDIAN', 'CUSTOMER_ID_AMOUNT_ZSCORE_60DAY',
                             'CUSTOMER_ID_AMOUNT_RATIO_60DAY_MAX', 'CUSTOMER_ID_NB_HIGH_AMOUNT_7DAY_WINDOW',
                             'CUSTOMER_ID_NB_TX_AT_TERMINAL_60DAY', 'CUSTOMER_ID_LOG_SECONDS_SINCE_PREVIOUS_TX']
TERMINAL_HISTORY_FEATURES = ['TERMINAL_ID_NB_KNOWN_FRAUDS_IN_A_ROW', 'TERMINAL_ID_DAYS_SINCE_FRAUDS_IN_A_ROW_BEGAN']
FEATURE_NAMES = [*HANDBOOK_FEATURES, *CUSTOMER_HISTORY_FEATURES, *TERMINAL_HISTORY_FEATURES]

FEATURES_TABLE = TableSchema(
    columns=(*TRANSACTION_COLUMNS, ('amount', 'NUMERIC'), ('kafka_partition', 'INT64'), ('kafka_offset', 'INT64'),
             *((name, 'INT64' if '_NB_' in name or name.startswith('TX_DURING') else 'FLOAT64')
               for name in FEATURE_NAMES)),
    key=('transaction_id',))


def terminal_history_days(label_delay_days: float) -> float:
  """How far back a terminal's features look: the label delay, then its longest window."""
  return label_delay_days + max(WINDOW_DAYS)


def history_span_days(label_delay_days: float) -> float:
  """How far before a transaction lie the events its features (and the test for a repeated id) use."""
  return max(HISTORY_DAYS, terminal_history_days(label_delay_days))



def calendar_features(transaction: Transaction) -> Dict[str, float]:
  moment = datetime.datetime.fromtimestamp(transaction.tx_time, datetime.timezone.utc)
  return {'TX_AMOUNT': float(transaction.amount), 'TX_DURING_WEEKEND': int(moment.weekday() >= 5),
          'TX_DURING_NIGHT': int(moment.hour <= 6)}


class CustomerHistory:
  """A customer's transactions of the last 60 days (time, amount, terminal, id), in time order.

  The columns are arrays, not lists of Python numbers: a runner pickles and
  weighs (for its state cache) a history at every bundle that touches it, in
  time that grows with the number of objects in it.
  """

  def __init__(self):
    self._times = array('d')
    self._amounts = array('d')
    self._terminals = array('q')
    self._ids = array('q')

  def add(self, transaction: Transaction) -> Optional[Dict[str, float]]:
    """Adds a transaction at its place in time; returns the customer features at its time.

    Returns None, and keeps nothing of it, for a repeat: a transaction whose
    id the customer's history already holds (the first one wins).
    """
    tx_time, amount = transaction.tx_time, float(transaction.amount)
    position = bisect.bisect_right(self._times, tx_time)
    newest = max(tx_time, self._times[-1]) if self._times else tx_time
    # A transaction far older than the newest (a far-future one came first) keeps its own place: every window
    # taken at its time holds it, so no mean is over nothing.
    expired = min(position, bisect.bisect_right(self._times, newest - HISTORY_DAYS * DAY_SECONDS))
    del self._times[:expired], self._amounts[:expired], self._terminals[:expired], self._ids[:expired]
    if transaction.transaction_id in self._ids:
      return None
    position -= expired
    self._times.insert(position, tx_time)
    self._amounts.insert(position, amount)
    self._terminals.insert(position, transaction.terminal_id)
    self._ids.insert(position, transaction.transaction_id)
    end = position + 1
    features = {}
    for days in WINDOW_DAYS:
      start = bisect.bisect_right(self._times, tx_time - days * DAY_SECONDS, 0, end)
      amounts = self._amounts[start:end]
      features[f'CUSTOMER_ID_NB_TX_{days}DAY_WINDOW'] = len(amounts)
      features[f'CUSTOMER_ID_AVG_AMOUNT_{days}DAY_WINDOW'] = sum(amounts) / len(amounts)
    features.update(self._habits(position, tx_time, amount, transaction.terminal_id))
    return features

  @property
  def newest_time(self) -> float:
    return self._times[-1] if self._times else -math.inf

  def _habits(self, position: int, tx_time: float, amount: float, terminal_id: int) -> Dict[str, float]:
    """How the transaction at ``position`` compares with the customer's earlier ones (CUSTOMER_HISTORY_FEATURES)."""
    start = bisect.bisect_right(self._times, tx_time - HISTORY_DAYS * DAY_SECONDS, 0, position)
    earlier = self._amounts[start:position]
    if not earlier:
      return dict.fromkeys(CUSTOMER_HISTORY_FEATURES, 0)
    ordered = sorted(earlier)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    mean = sum(earlier) / len(earlier)
    spread = math.sqrt(sum((earlier_amount - mean) ** 2 for earlier_amount in earlier) / len(earlier))
    week = bisect.bisect_right(self._times, tx_time - 7 * DAY_SECONDS, 0, position)
    return {
        'CUSTOMER_ID_AMOUNT_LOG_RATIO_60DAY_MEDIAN': math.log((amount + 1) / (median + 1)),
        'CUSTOMER_ID_AMOUNT_ZSCORE_60DAY': (amount - mean) / (spread + 1),
        'CUSTOMER_ID_AMOUNT_RATIO_60DAY_MAX': amount / (max(earlier) + 1),
        'CUSTOMER_ID_NB_HIGH_AMOUNT_7DAY_WINDOW': sum(
            1 for earlier_amount in self._amounts[week:position] if earlier_amount > HIGH_AMOUNT_RATIO * median),
        'CUSTOMER_ID_NB_TX_AT_TERMINAL_60DAY': self._terminals[start:position].count(terminal_id),
        'CUSTOMER_ID_LOG_SECONDS_SINCE_PREVIOUS_TX': math.log1p(max(tx_time - self._times[position - 1], 0.0)),
    }


# What a label does to its terminal's history (TerminalHistory.add_label).
LABEL_APPLIED = 'applied'
LABEL_ORPHAN = 'orphan'  # no transaction of that id at that terminal within the windows: changes nothing
LABEL_REPEAT = 'repeat'  # the transaction was labelled before: the first label wins


class TerminalHistory:
  """A terminal's transactions and known labels of the windows, oldest first (arrays, as CustomerHistory's)."""

  def __init__(self, label_delay_days: float):
    self._delay = label_delay_days * DAY_SECONDS
    self._tx_times = array('d')
    self._tx_ids = array('q')  # beside _tx_times: a label counts only for a transaction seen here
    self._fraud_times = array('d')  # the frauds among the labels, by time: the risk windows bisect them
    # The known labels in (transaction time, transaction id) order: the latest ones make the run of frauds.
    self._label_times = array('d')
    self._label_ids = array('q')
    self._label_frauds = array('b')

  def add_label(self, label: Label) -> str:
    """Applies a label at its transaction's time, if it is the first for a transaction of this terminal.

    Returns:
      ``LABEL_APPLIED``, or ``LABEL_ORPHAN`` / ``LABEL_REPEAT`` for a label that changes nothing.
    """
    try:
      tx_time = self._tx_times[self._tx_ids.index(label.transaction_id)]
    except ValueError:
      return LABEL_ORPHAN
    if label.transaction_id in self._label_ids:
      return LABEL_REPEAT
    if label.is_fraud:
      bisect.insort(self._fraud_times, tx_time)
    position = bisect.bisect_right(self._label_times, tx_time)
    order = (label.transaction_id, label.is_fraud)
    while (position and self._label_times[position - 1] == tx_time
           and (self._label_ids[position - 1], self._label_frauds[position - 1]) > order):
      position -= 1
    self._label_times.insert(position, tx_time)
    self._label_ids.insert(position, label.transaction_id)
    self._label_frauds.insert(position, label.is_fraud)
    return LABEL_APPLIED

  def add_transaction(self, tx_time: float, transaction_id: int) -> Dict[str, float]:
    """Adds a transaction; returns the terminal features at its time."""
    horizon = tx_time - self._delay
    oldest = horizon - max(WINDOW_DAYS) * DAY_SECONDS
    expired = bisect.bisect_right(self._tx_times, oldest)
    del self._tx_times[:expired], self._tx_ids[:expired]
    del self._fraud_times[:bisect.bisect_right(self._fraud_times, oldest)]
    expired = bisect.bisect_right(self._label_times, oldest)
    del self._label_times[:expired], self._label_ids[:expired], self._label_frauds[:expired]
    features = {}
    for days in WINDOW_DAYS:
      start = horizon - days * DAY_SECONDS
      count = bisect.bisect_right(self._tx_times, horizon) - bisect.bisect_right(self._tx_times, start)
      frauds = bisect.bisect_right(self._fraud_times, horizon) - bisect.bisect_right(self._fraud_times, start)
      features[f'TERMINAL_ID_NB_TX_{days}DAY_WINDOW'] = count
      features[f'TERMINAL_ID_RISK_{days}DAY_WINDOW'] = frauds / count if count else 0.0
    features.update(self._fraud_run(tx_time))
    position = bisect.bisect_right(self._tx_times, tx_time)
    self._tx_times.insert(position, tx_time)
    self._tx_ids.insert(position, transaction_id)
    return features

  @property
  def newest_time(self) -> float:
    return self._tx_times[-1] if self._tx_times else -math.inf

  def _fraud_run(self, tx_time: float) -> Dict[str, float]:
    """The run of frauds among the terminal's latest known labels, and how long ago it began.

    A compromised terminal stays compromised for weeks: while its newest
    labels are all frauds it most likely still is, unless the run is old.
    """
    run = 0
    while run < len(self._label_frauds) and self._label_frauds[-1 - run]:
      run += 1
    began = (tx_time - self._label_times[-run]) / DAY_SECONDS if run else 0.0
    return {'TERMINAL_ID_NB_KNOWN_FRAUDS_IN_A_ROW': run, 'TERMINAL_ID_DAYS_SINCE_FRAUDS_IN_A_ROW_BEGAN': began}


_MICROS = operator.itemgetter(0)


def _at_its_place(event, carried) -> PendingEvent:
  """``carried`` at the place of a Transaction or Label in the order events are applied: at its event time."""
  kind = LABEL_KIND if isinstance(event, Label) else EVENT_KIND
  # int(time * 1e6) is Timestamp.of(time).micros, 20x faster.
  return PendingEvent(int(event_time(event) * 1_000_000), kind, event.transaction_id, carried)


def pending_event(event) -> PendingEvent:
  """A Transaction or Label with its place in the order events are applied."""
  return _at_its_place(event, event)


def _pending_terminal_event(event) -> PendingEvent:
  """A Label, or a (Transaction, customer features), with its place in the order events are applied."""
  return _at_its_place(event if isinstance(event, Label) else event[0], event)


def count_label(outcome: str):
  """Counts a label that changed nothing (Beam counters ``orphan_labels``, ``repeated_labels``)."""
  if outcome != LABEL_APPLIED:
    Metrics.counter(METRICS_NAMESPACE, f'{outcome}_labels' if outcome == LABEL_ORPHAN else 'repeated_labels').inc()


def _apply_in_order(history: TerminalHistory, ready: Iterable[PendingEvent]) -> Iterator[TimestampedValue]:
  """Applies a terminal's events, sorted, to its history; yields each transaction's row at its time."""
  for pending in ready:
    if pending.kind == LABEL_KIND:
      count_label(history.add_label(pending.event))
    else:
      transaction, customer_features = pending.event
      terminal_features = history.add_transaction(transaction.tx_time, transaction.transaction_id)
      yield TimestampedValue(feature_row(transaction, {**customer_features, **terminal_features}),
                             Timestamp(micros=pending.micros))


class _CustomerFeaturesFn(beam.DoFn):
  """(customer_id, Transaction or Label) -> (Transaction, customer features), or the Label unchanged.

  Transactions are applied as they arrive (see the module docstring). Labels
  only pass through: the terminal stage needs them in the same stream as the
  transactions.

  An idle customer's state is not cleared yet: a timer for it fired early on
  the local runner, the only one this form can be tested on here (left for
  the Flink runner).
  """
  HISTORY = ReadModifyWriteStateSpec('history', PickleCoder())

  def process(self, element, history_state=beam.DoFn.StateParam(HISTORY)):
    _, event = element
    if isinstance(event, Label):
      yield event
      return
    history = history_state.read() or CustomerHistory()
    features = history.add(event)
    if features is None:
      yield repeated(event)
      return
    yield event, features
    history_state.write(history)


class _TerminalState:
  """A terminal's history and its events waiting for the watermark, in the order they will be applied.

  One state value, not a bag of waiting events beside the history: a
  runner then loads and writes one value per terminal and bundle, and a
  firing takes the events due off the front instead of reading, sorting
  and writing back every event that waits. A waiting event is kept
  pickled: the runner pickles the state and weighs it (for its state cache,
  object by object) at every bundle, and bytes are one object.
  """

  def __init__(self, label_delay_days: float):
    self.history = TerminalHistory(label_delay_days)
    self.pending: List[PendingEvent] = []

  def wait(self, event: PendingEvent):
    bisect.insort_right(self.pending, event._replace(event=pickle.dumps(event.event, pickle.HIGHEST_PROTOCOL)),
                        key=APPLY_ORDER)

  def release(self, up_to_micros: int) -> Iterator[TimestampedValue]:
    """Applies the events at or before ``up_to_micros``; yields their transactions' rows."""
    due = bisect.bisect_right(self.pending, up_to_micros, key=_MICROS)
    ready, self.pending = self.pending[:due], self.pending[due:]
    yield from _apply_in_order(self.history, (event._replace(event=pickle.loads(event.event)) for event in ready))

  def set_timers(self, first_due, last_due):
    """Sets the timers due at the earliest and at the latest waiting event, if any waits."""
    if self.pending:
      first_due.set(Timestamp(micros=self.pending[0].micros))
      last_due.set(Timestamp(micros=self.pending[-1].micros))


class _TerminalFeaturesFn(beam.DoFn):
  """(terminal_id, Label or (Transaction, customer features)) -> feature row, in event-time order.

  Events wait in the terminal's state until the watermark passes their
  timestamp; then the ones due are applied to the terminal's history in
  (time, label first, transaction id) order, and each transaction's row is
  emitted with its own timestamp.

  Two timers per terminal: one due at the earliest waiting event, so that
  rows leave as soon as the watermark passes them while newer events keep
  arriving, and one due at the latest, so that a watermark that passes
  everything at once (a catch-up, the end of bounded input) releases it all
  in one firing. (A runner fires a newly set timer in a later round: with
  the first timer alone, such a jump would take a round per waiting instant.)

  An idle terminal's state is not cleared yet (see _CustomerFeaturesFn).
  """
  STATE = ReadModifyWriteStateSpec('terminal', PickleCoder())
  FIRST_DUE = TimerSpec('first_due', TimeDomain.WATERMARK)
  LAST_DUE = TimerSpec('last_due', TimeDomain.WATERMARK)

  def __init__(self, label_delay_days: float):
    self._label_delay_days = label_delay_days

  def process(self, element, state=beam.DoFn.StateParam(STATE), first_due=beam.DoFn.TimerParam(FIRST_DUE),
              last_due=beam.DoFn.TimerParam(LAST_DUE)):
    _, event = element
    terminal = state.read() or _TerminalState(self._label_delay_days)
    terminal.wait(_pending_terminal_event(event))
    state.write(terminal)
    terminal.set_timers(first_due, last_due)

  @on_timer(FIRST_DUE)
  def release_first_due(self, fired_at=beam.DoFn.TimestampParam, state=beam.DoFn.StateParam(STATE),
                        first_due=beam.DoFn.TimerParam(FIRST_DUE), last_due=beam.DoFn.TimerParam(LAST_DUE)):
    yield from self._release(fired_at, state, first_due, last_due)

  @on_timer(LAST_DUE)
  def release_last_due(self, fired_at=beam.DoFn.TimestampParam, state=beam.DoFn.StateParam(STATE),
                       first_due=beam.DoFn.TimerParam(FIRST_DUE), last_due=beam.DoFn.TimerParam(LAST_DUE)):
    yield from self._release(fired_at, state, first_due, last_due)

  @staticmethod
  def _release(fired_at, state, first_due, last_due) -> Iterator[TimestampedValue]:
    terminal = state.read()
    if terminal is None or not terminal.pending:
      return  # the other timer released it all in the same round
    yield from terminal.release(fired_at.micros)
    state.write(terminal)
    terminal.set_timers(first_due, last_due)


def _customer_features_of_group(element) -> Iterator:
  """(customer_id, all its events) -> what _CustomerFeaturesFn yields, transactions in time order."""
  _, events = element
  history = CustomerHistory()
  for event in sorted(events, key=lambda e: (isinstance(e, Transaction), e.tx_time, e.transaction_id, e.kafka_partition,
                                                 e.kafka_offset)):
    if isinstance(event, Label):
      yield event
      continue
    features = history.add(event)
    yield (event, features) if features is not None else repeated(event)


def _terminal_features_of_group(element, label_delay_days: float) -> Iterator[TimestampedValue]:
  """(terminal_id, all its events) -> the feature rows, as _TerminalFeaturesFn yields them."""
  _, events = element
  yield from _apply_in_order(TerminalHistory(label_delay_days), in_order(_pending_terminal_event(e) for e in events))


class Histories:
  """Every customer's and terminal's history, for events applied one by one in event-time order.

  It forgets a customer, or a terminal, once the stream is past every window
  that its newest transaction could count in: 60 days for a customer, the
  label delay and 30 days for a terminal. The stream's time is the oldest of
  the newest transaction times of each partition, so that one record from the
  far future on one partition does not make everyone idle.

  Args:
    label_delay_days: the delay d of the terminal features.
  """

  def __init__(self, label_delay_days: float = DEFAULT_LABEL_DELAY_DAYS):
    self._label_delay_days = label_delay_days
    self._customers: Dict[int, CustomerHistory] = {}
    self._terminals: Dict[int, TerminalHistory] = {}
    self._newest_by_partition: Dict[int, float] = {}
    self._next_sweep = -math.inf
    # Per (kind of event, partition): the offset after the newest record applied (a snapshot's restart point).
    self.next_offsets: Dict[Tuple[str, int], int] = {}
    # ... and the transaction id of that newest record: it tells the same topic from one created again.
    self.last_event_ids: Dict[Tuple[str, int], int] = {}

  def __len__(self) -> int:
    """How many customers and terminals it holds."""
    return len(self._customers) + len(self._terminals)

  def apply(self, event) -> Optional[Dict[str, object]]:
    """Applies a Transaction or Label.

    Returns:
      The transaction's feature row; None for a label, or for a repeated
      transaction (an id its customer already has), which changes nothing.
    """
    note_applied(self.next_offsets, self.last_event_ids, event, event.transaction_id)
    terminal = self._terminals.get(event.terminal_id)
    if isinstance(event, Label):
      count_label(terminal.add_label(event) if terminal is not None else LABEL_ORPHAN)
      return None
    customer = self._customers.get(event.customer_id)
    if customer is None:
      customer = self._customers[event.customer_id] = CustomerHistory()
    customer_features = customer.add(event)
    if customer_features is None:
      return None
    if terminal is None:
      terminal = self._terminals[event.terminal_id] = TerminalHistory(self._label_delay_days)
    row = feature_row(event, {**customer_features, **terminal.add_transaction(event.tx_time, event.transaction_id)})
    self._forget_the_idle(event)
    return row

  def _forget_the_idle(self, transaction: Transaction):
    partition = transaction.kafka_partition
    self._newest_by_partition[partition] = max(transaction.tx_time, self._newest_by_partition.get(partition, -math.inf))
    now = min(self._newest_by_partition.values())
    if now < self._next_sweep:
      return
    self._next_sweep = now + DAY_SECONDS
    for kind, histories, idle_s in (
        ('customers', self._customers, HISTORY_DAYS * DAY_SECONDS),
        ('terminals', self._terminals, terminal_history_days(self._label_delay_days) * DAY_SECONDS)):
      idle = [key for key, history in histories.items() if history.newest_time < now - idle_s]
      for key in idle:
        del histories[key]
      Metrics.counter(METRICS_NAMESPACE, f'forgotten_{kind}').inc(len(idle))


def feature_row(transaction: Transaction, window_features: Dict[str, float]) -> Dict[str, object]:
  """A transaction's identity and its features, as a warehouse row."""
  features = {**calendar_features(transaction), **window_features}
  return {
      'transaction_id': transaction.transaction_id,
      'tx_datetime': utc_iso(transaction.tx_time),
      'customer_id': transaction.customer_id,
      'terminal_id': transaction.terminal_id,
      'amount': str(transaction.amount),
      'kafka_partition': transaction.kafka_partition,
      'kafka_offset': transaction.kafka_offset,
      **{name: features[name] for name in FEATURE_NAMES},
  }


def transaction_of_feature_row(row: Dict[str, object]) -> Transaction:
  """The transaction a :func:`feature_row` was computed from."""
  return Transaction(row['transaction_id'], parse_utc_timestamp(row['tx_datetime']), row['customer_id'],
                     row['terminal_id'], Decimal(row['amount']), row['kafka_partition'], row['kafka_offset'])


def _by_customer(event) -> Tuple[int, object]:
  """A Transaction or Label, keyed by its customer."""
  return event.customer_id, event


def _by_terminal(event) -> Tuple[int, object]:
  """A Label or a (Transaction, customer features), keyed by its terminal."""
  return event.terminal_id if isinstance(event, Label) else event[0].terminal_id, event


def snapshot_identity(label_delay_days: float, transactions_topic: str, labels_topic: str) -> Dict[str, object]:
  """What a snapshot of the histories depends on: a snapshot of other settings or features is not loaded."""
  return {'state': 'feature histories', 'label_delay_days': label_delay_days, 'features': FEATURE_NAMES,
          'streams': {'Transaction': transactions_topic, 'Label': labels_topic}}


class ComputeFeatures(beam.PTransform):
  """Computes the feature row of every transaction.

  Input: one PCollection of :class:`~transforms.records.Transaction` and
  :class:`~transforms.records.Label` events, in the global window (each
  form takes an event's time from the event: a transaction's own, a
  label's when it became known). One stream, not two: the local runner
  runs a Flatten as a stage boundary, which an unbounded run never
  crosses. ``ORDERED_BUNDLES`` also takes the events in
  :class:`~transforms.batches.Batch` elements. Output: a
  :class:`FeatureOutputs`, whose ``rows`` hold one dict per transaction (see
  :func:`feature_row`), timestamped with the transaction's time, and whose
  ``repeated`` hold the transactions whose id their customer's history
  already had: the first one wins, the repeat gets no row. (In a stream,
  the first one read wins; in bounded input, the earlier in time, then in
  offset: the same for an exact repeat, a producer's retry.)

  A label counts only for a transaction of its terminal within the windows,
  and only the first label of a transaction: the others change nothing and
  are counted (Beam counters ``orphan_labels``, ``repeated_labels``).

  Args:
    label_delay_days: the delay d of the terminal features.
    form: how (see the module docstring): ``KEYED_STATE`` (a stream on a
      distributed runner), ``ORDERED_BUNDLES`` (a stream read in event-time
      step on the local runner) or ``GROUPED`` (bounded input). Same rows.
    rows_per_batch: ``ORDERED_BUNDLES`` only: hand on each bundle's rows in
      Batches of at most this many, each at its last row's time, rather than
      one by one (``transforms/batches.py``).
    snapshots: ``ORDERED_BUNDLES`` only: start from the newest snapshot of
      the histories, if any, and save one now and then, with the offsets of
      each kind of event (``Transaction``, ``Label``) and partition it
      reflects (``transforms/snapshots.py``); the pipeline reads on from
      those offsets (see :func:`snapshot_identity`).
  """

  def __init__(self, label_delay_days: float = DEFAULT_LABEL_DELAY_DAYS, form: str = KEYED_STATE,
               rows_per_batch: Optional[int] = None, snapshots: Optional[StateSnapshots] = None):
    super().__init__()
    check_form(form, rows_per_batch, snapshots)
    self._label_delay_days = label_delay_days
    self._form = form
    self._rows_per_batch = rows_per_batch
    self._snapshots = snapshots

  def expand(self, events) -> FeatureOutputs:
    if self._form == ORDERED_BUNDLES:
      return events | 'OrderedBundles' >> OrderedBundleFeatures(
          functools.partial(Histories, self._label_delay_days), pending_event, self._rows_per_batch, self._snapshots)
    if self._form == GROUPED:
      customers = (events
                   | 'KeyByCustomer' >> beam.Map(_by_customer)
                   | 'GroupByCustomer' >> beam.GroupByKey()
                   | 'CustomerFeatures' >> beam.FlatMap(_customer_features_of_group).with_outputs(
                       REPEATED_TAG, main='features'))
      rows = (customers.features
              | 'KeyByTerminal' >> beam.Map(_by_terminal)
              | 'GroupByTerminal' >> beam.GroupByKey()
              | 'TerminalFeatures' >> beam.FlatMap(_terminal_features_of_group, self._label_delay_days))
      return FeatureOutputs(rows, customers[REPEATED_TAG])
    customers = (events
                 | 'AtEventTime' >> beam.Map(at_event_time)
                 | 'KeyByCustomer' >> beam.Map(_by_customer)
                 | 'CustomerFeatures' >> beam.ParDo(_CustomerFeaturesFn()).with_outputs(REPEATED_TAG, main='features'))
    rows = (customers.features
            | 'KeyByTerminal' >> beam.Map(_by_terminal)
            | 'TerminalFeatures' >> beam.ParDo(_TerminalFeaturesFn(self._label_delay_days)))
    return FeatureOutputs(rows, customers[REPEATED_TAG])
