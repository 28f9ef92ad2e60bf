"""The features equal an independent pandas computation, whatever the arrival order."""

import random
from decimal import Decimal
from typing import Sequence

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger, window
from apache_beam.utils.windowed_value import PaneInfoTiming

from tests.conftest import local_options
from transforms.feature_forms import FORMS, KEYED_STATE
from transforms.records import parse_utc_timestamp
from use_cases.fraud.features import CUSTOMER_HISTORY_FEATURES, FEATURE_NAMES, ComputeFeatures, Histories
from use_cases.fraud.records import Label, Transaction
from use_cases.fraud.simulator import SimulationConfig, simulate

DELAY_DAYS = 7


def pandas_features(tx: pd.DataFrame) -> pd.DataFrame:
  """The handbook's feature code (chapter 3), on a frame of simulated transactions."""
  tx = tx.sort_values('tx_datetime', kind='stable').copy()
  tx['TX_AMOUNT'] = tx['amount']
  tx['TX_DURING_WEEKEND'] = (tx['tx_datetime'].dt.weekday >= 5).astype(int)
  tx['TX_DURING_NIGHT'] = (tx['tx_datetime'].dt.hour <= 6).astype(int)

  def customer_windows(customer):
    customer = customer.sort_values('transaction_id').set_index('tx_datetime')
    for w in (1, 7, 30):
      total = customer['amount'].rolling(f'{w}d').sum()
      count = customer['amount'].rolling(f'{w}d').count()
      customer[f'CUSTOMER_ID_NB_TX_{w}DAY_WINDOW'] = count.to_numpy()
      customer[f'CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW'] = (total / count).to_numpy()
    return customer.reset_index()

  def terminal_windows(terminal):
    terminal = terminal.sort_values('transaction_id').set_index('tx_datetime')
    frauds_delay = terminal['is_fraud'].rolling(f'{DELAY_DAYS}d').sum()
    count_delay = terminal['is_fraud'].rolling(f'{DELAY_DAYS}d').count()
    for w in (1, 7, 30):
      frauds = terminal['is_fraud'].rolling(f'{DELAY_DAYS + w}d').sum() - frauds_delay
      count = terminal['is_fraud'].rolling(f'{DELAY_DAYS + w}d').count() - count_delay
      terminal[f'TERMINAL_ID_NB_TX_{w}DAY_WINDOW'] = count.to_numpy()
      terminal[f'TERMINAL_ID_RISK_{w}DAY_WINDOW'] = (frauds / count).fillna(0).to_numpy()
    return terminal.reset_index()

  tx = pd.concat([customer_windows(group) for _, group in tx.groupby('customer_id')])
  tx = pd.concat([terminal_windows(group) for _, group in tx.groupby('terminal_id')])
  return tx.set_index('transaction_id').sort_index()


def history_features(tx: pd.DataFrame) -> pd.DataFrame:
  """The customer-history features, recomputed for each transaction from the customer's whole list."""
  rows = {}
  for _, customer in tx.sort_values(['tx_datetime', 'transaction_id']).groupby('customer_id'):
    times = customer['tx_datetime'].map(pd.Timestamp.timestamp).to_numpy()
    amounts, terminals = customer['amount'].to_numpy(), customer['terminal_id'].to_numpy()
    for i, transaction_id in enumerate(customer['transaction_id']):
      earlier = np.arange(i)[times[:i] > times[i] - 60 * 86_400]
      if not len(earlier):
        rows[transaction_id] = dict.fromkeys(CUSTOMER_HISTORY_FEATURES, 0.0)
        continue
      median = np.median(amounts[earlier])
      week = earlier[times[earlier] > times[i] - 7 * 86_400]
      rows[transaction_id] = {
          'CUSTOMER_ID_AMOUNT_LOG_RATIO_60DAY_MEDIAN': np.log((amounts[i] + 1) / (median + 1)),
          'CUSTOMER_ID_AMOUNT_ZSCORE_60DAY': (amounts[i] - amounts[earlier].mean()) / (amounts[earlier].std() + 1),
          'CUSTOMER_ID_AMOUNT_RATIO_60DAY_MAX': amounts[i] / (amounts[earlier].max() + 1),
          'CUSTOMER_ID_NB_HIGH_AMOUNT_7DAY_WINDOW': int((amounts[week] > 3 * median).sum()),
          'CUSTOMER_ID_NB_TX_AT_TERMINAL_60DAY': int((terminals[earlier] == terminals[i]).sum()),
          'CUSTOMER_ID_LOG_SECONDS_SINCE_PREVIOUS_TX': np.log1p(times[i] - times[i - 1]),
      }
  return pd.DataFrame.from_dict(rows, orient='index').sort_index()


def terminal_history_features(tx: pd.DataFrame) -> pd.DataFrame:
  """The run of known frauds at the terminal, recomputed for each transaction from the terminal's whole list."""
  rows = {}
  delay, window = DELAY_DAYS * 86_400, 30 * 86_400
  for _, terminal in tx.sort_values(['tx_datetime', 'transaction_id']).groupby('terminal_id'):
    times = terminal['tx_datetime'].map(pd.Timestamp.timestamp).to_numpy()
    frauds = terminal['is_fraud'].to_numpy()
    for i, transaction_id in enumerate(terminal['transaction_id']):
      # Labels arrive `delay` after their transaction; the history keeps the last 30 days before t - delay.
      known = np.flatnonzero((times + delay <= times[i]) & (times > times[i] - delay - window))
      run = 0
      while run < len(known) and frauds[known[-1 - run]]:
        run += 1
      rows[transaction_id] = {'TERMINAL_ID_NB_KNOWN_FRAUDS_IN_A_ROW': run,
                              'TERMINAL_ID_DAYS_SINCE_FRAUDS_IN_A_ROW_BEGAN':
                              (times[i] - times[known[-run]]) / 86_400 if run else 0.0}
  return pd.DataFrame.from_dict(rows, orient='index').sort_index()


def streams(simulation):
  """Transactions and labels as timestamped elements, shuffled but for each customer's order.

  Kafka keeps each customer's records in order (they are keyed by customer);
  everything else may come in any order.
  """
  delay = DELAY_DAYS * 86_400
  elements = []
  for row in simulation.transactions.itertuples():
    tx_time = row.tx_datetime.timestamp()
    elements.append(beam.window.TimestampedValue(
        Transaction(row.transaction_id, tx_time, row.customer_id, row.terminal_id, Decimal(repr(row.amount))), tx_time))
    elements.append(beam.window.TimestampedValue(
        Label(row.transaction_id, tx_time, row.customer_id, row.terminal_id, row.is_fraud, row.fraud_scenario,
              tx_time + delay), tx_time + delay))
  random.Random(1).shuffle(elements)
  by_customer = {}
  for element in elements:
    by_customer.setdefault(element.value.customer_id, []).append(element)
  for customer_elements in by_customer.values():
    transactions = sorted((e for e in customer_elements if isinstance(e.value, Transaction)),
                          key=lambda e: e.value.transaction_id)
    slots = [i for i, e in enumerate(customer_elements) if isinstance(e.value, Transaction)]
    for slot, transaction in zip(slots, transactions, strict=True):
      customer_elements[slot] = transaction
  cursor = {customer: iter(customer_elements) for customer, customer_elements in by_customer.items()}
  return [next(cursor[element.value.customer_id]) for element in elements]


def equal_features(expected: pd.DataFrame, id_column: str = 'transaction_id',
                   feature_names: Sequence[str] = tuple(FEATURE_NAMES)):
  """An assert_that check: the rows' features equal ``expected`` (indexed by ``id_column``), one row per event."""
  def check(rows):
    actual = pd.DataFrame(rows).set_index(id_column).sort_index()
    assert list(actual.index) == list(expected.index), 'one row per event'
    for name in feature_names:
      np.testing.assert_allclose(actual[name].astype(float), expected[name].astype(float), rtol=1e-9, atol=1e-9,
                                 err_msg=name)
  return check


@pytest.fixture(scope='module')
def simulation():
  # A small, dense population: terminals shared by many customers, frauds of every scenario.
  return simulate(SimulationConfig(customers=60, terminals=60, radius=30, days=75, seed=6))


def independent_features(tx: pd.DataFrame) -> pd.DataFrame:
  """Every feature of every transaction, computed without use_cases.fraud.features."""
  return pandas_features(tx).join(history_features(tx)).join(terminal_history_features(tx))


@pytest.fixture(scope='module')
def expected(simulation):
  return independent_features(simulation.transactions)


def test_population_exercises_every_feature(simulation, expected):
  assert len(expected) > 5_000 and set(simulation.transactions['fraud_scenario']) == {0, 1, 2, 3}
  assert (expected['TERMINAL_ID_RISK_30DAY_WINDOW'] > 0).mean() > 0.1
  assert expected['TX_DURING_WEEKEND'].any() and expected['TX_DURING_NIGHT'].any()
  assert (expected['CUSTOMER_ID_NB_HIGH_AMOUNT_7DAY_WINDOW'] > 0).any()
  assert (expected['CUSTOMER_ID_NB_TX_AT_TERMINAL_60DAY'] > 0).mean() > 0.5
  assert (expected['TERMINAL_ID_NB_KNOWN_FRAUDS_IN_A_ROW'] > 1).any()


@pytest.mark.parametrize('form', FORMS)
def test_features_equal_an_independent_pandas_computation(simulation, expected, form):
  elements = streams(simulation)
  with TestPipeline(options=local_options()) as p:
    # One Create element holding the list: Create alone would reshuffle the elements.
    rows = (p
            | beam.Create([elements])
            | 'InThisOrder' >> beam.FlatMap(lambda listed: listed)
            | ComputeFeatures(label_delay_days=DELAY_DAYS, form=form)).rows
    assert_that(rows, equal_features(expected))


class _OnTimeIds(beam.DoFn):
  """A window's transaction ids, if its pane came when the watermark passed the window's end."""

  def process(self, keyed_ids, pane=beam.DoFn.PaneInfoParam):
    if pane.timing == PaneInfoTiming.ON_TIME:
      yield from keyed_ids[1]


def test_keyed_state_rows_leave_as_the_watermark_passes_them_while_newer_events_keep_arriving():
  # One terminal gets a transaction a minute, each ahead of the watermark when it arrives: the state form must
  # release each row once the watermark passes it, not wait for a moment when nothing newer waits (a busy
  # terminal has none; before the fix, no row left until the stream ended).
  start = parse_utc_timestamp('2018-08-01T00:00:00Z')
  arrivals = 8
  stream = TestStream()
  for minute in range(arrivals):
    transaction = Transaction(minute + 1, start + 60 * minute, 100 + minute, 7, Decimal('10.00'), 0, minute)
    stream = (stream
              .add_elements([beam.window.TimestampedValue(transaction, transaction.tx_time)])
              .advance_watermark_to(transaction.tx_time - 1))
  # Beam's DirectRunner plays a TestStream with its watermark steps (the FnApiRunner does not run one).
  options = PipelineOptions(flags=[], runner='BundleBasedDirectRunner', streaming=True)
  with TestPipeline(options=options) as p:
    rows = (p | stream.advance_watermark_to_infinity() | ComputeFeatures(form=KEYED_STATE)).rows
    on_time = (rows
               | beam.WindowInto(window.FixedWindows(60), trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                                 allowed_lateness=86_400, accumulation_mode=trigger.AccumulationMode.DISCARDING)
               | beam.Map(lambda row: (row['terminal_id'], row['transaction_id']))
               | beam.GroupByKey()
               | beam.ParDo(_OnTimeIds()))
    # The last one is released by the end of the stream, after its window closed.
    assert_that(on_time, equal_to(list(range(1, arrivals))))


def test_a_far_future_or_far_past_transaction_leaves_every_window_defined():
  histories = Histories(label_delay_days=7)
  times = ['2018-04-01T10:00:00Z', '2100-01-01T00:00:00Z', '2018-04-01T11:00:00Z', '1970-01-01T00:00:00Z',
           '2018-04-02T09:00:00Z']
  rows = [histories.apply(Transaction(i, parse_utc_timestamp(t), 7, 9, Decimal('12.50'))) for i, t in enumerate(times)]
  assert all(np.isfinite(row[name]) for row in rows for name in FEATURE_NAMES)
  assert rows[2]['CUSTOMER_ID_NB_TX_1DAY_WINDOW'] == 1  # the 2100 one made the 10:00 one expire; itself stays


@pytest.mark.parametrize('form', FORMS)
def test_repeats_and_orphan_labels_change_no_feature(simulation, expected, form):
  elements = streams(simulation)
  genuine = next(e.value for e in elements if isinstance(e.value, Label) and not e.value.is_fraud)
  original = next(e.value for e in elements if isinstance(e.value, Transaction))
  repeat, relabel = original._replace(amount=original.amount + 1000), genuine._replace(is_fraud=1)
  orphan = Label(10 ** 9, genuine.tx_time, genuine.customer_id, genuine.terminal_id, 1, 1, genuine.known_time)
  later = repeat._replace(tx_time=repeat.tx_time + 30 * 86_400)
  # Each repeat right after its original, which Kafka keeps first (the same key).
  at = elements.index(next(e for e in elements if e.value is original))
  elements[at + 1:at + 1] = [beam.window.TimestampedValue(tx, tx.tx_time) for tx in (repeat, later)]
  at = elements.index(next(e for e in elements if e.value is genuine))
  elements[at + 1:at + 1] = [beam.window.TimestampedValue(label, label.known_time) for label in (relabel, orphan)]
  with TestPipeline(options=local_options()) as p:
    outputs = (p
               | beam.Create([elements])
               | 'InThisOrder' >> beam.FlatMap(lambda listed: listed)
               | ComputeFeatures(label_delay_days=DELAY_DAYS, form=form))
    assert_that(outputs.rows, equal_features(expected))
    assert_that(outputs.repeated | beam.Map(lambda t: (t.transaction_id, t.amount)),
                equal_to([(original.transaction_id, original.amount + 1000)] * 2), label='Repeats')


def test_the_histories_forget_the_idle_but_not_for_one_record_from_the_far_future():
  histories = Histories(label_delay_days=7)
  day = 86_400.0
  start = parse_utc_timestamp('2018-04-01T00:00:00Z')

  def transaction(tx_id, customer, terminal, at, partition=0):
    return Transaction(tx_id, start + at, customer, terminal, Decimal('10.00'), partition, tx_id)

  histories.apply(transaction(0, customer=1, terminal=1, at=0))
  histories.apply(transaction(1, customer=2, terminal=2, at=0, partition=1))
  histories.apply(transaction(2, customer=3, terminal=3, at=10 * 365 * day, partition=1))  # far future
  assert len(histories) == 6, 'partition 1 jumped ten years ahead, partition 0 did not: nobody is idle'
  for i in range(100):  # customer 4 at terminal 4, every day, on partition 0
    histories.apply(transaction(10 + i, customer=4, terminal=4, at=i * day))
  assert len(histories) == 4, 'customers 1 and 2 and their terminals were idle for over 60 days'
  row = histories.apply(transaction(400, customer=1, terminal=1, at=104 * day))
  assert row['CUSTOMER_ID_NB_TX_30DAY_WINDOW'] == 1 and row['TERMINAL_ID_NB_TX_30DAY_WINDOW'] == 0
