"""The transaction simulator: the handbook's standard run, its fraud rules, determinism."""

import numpy as np
import pytest

from use_cases.fraud.records import LABEL_SCHEMA, TRANSACTION_SCHEMA
from use_cases.fraud.simulator import (
  GENUINE,
  SCENARIO_AMOUNT,
  SCENARIO_CUSTOMER,
  SCENARIO_DRIFT,
  SCENARIO_TERMINAL,
  SimulationConfig,
  events,
  simulate,
  write_files,
)


@pytest.fixture(scope='module')
def standard_run():
  return simulate()


def test_standard_run_matches_the_handbooks_fraud_rate(standard_run):
  tx = standard_run.transactions
  assert 1.70e6 < len(tx) < 1.85e6, len(tx)  # the handbook's run: 1,754,155
  assert abs(tx['is_fraud'].mean() - 0.008) <= 0.001, tx['is_fraud'].mean()
  assert set(tx['fraud_scenario']) == {GENUINE, SCENARIO_AMOUNT, SCENARIO_TERMINAL, SCENARIO_CUSTOMER}
  assert tx['tx_datetime'].is_monotonic_increasing and (tx['transaction_id'] == np.arange(len(tx))).all()


def test_handbook_draws_give_the_handbooks_own_run():
  """Chapter 3 of the handbook prints its run's size, fraud count, first customer, first and last transactions."""
  simulation = simulate(SimulationConfig(draws='handbook'))
  tx = simulation.transactions
  assert (len(tx), tx['is_fraud'].sum()) == (1_754_155, 14_681)
  assert simulation.customers.loc[0, ['x', 'y', 'mean_amount', 'mean_tx_per_day']].round(6).tolist() == [
      54.88135, 71.518937, 62.262521, 2.179533]
  columns = ['tx_time_seconds', 'customer_id', 'terminal_id', 'amount']
  assert [tuple(row) for row in tx[columns].iloc[[0, 1, 2, 3, 4, -5, -4, -3, -2, -1]].itertuples(False)] == [
      (31, 596, 3156, 57.16), (130, 4961, 3412, 81.51), (476, 2, 1365, 146.0), (569, 4128, 8737, 64.49),
      (634, 927, 9906, 50.99), (15810996, 161, 655, 54.24), (15811058, 4342, 6181, 1.23),
      (15811101, 618, 1502, 6.62), (15811192, 4056, 3067, 55.4), (15811197, 3542, 9849, 23.59)]


def test_handbook_draws_have_their_own_seeds():
  with pytest.raises(ValueError, match='own seeds'):
    simulate(SimulationConfig(customers=10, terminals=10, days=2, seed=1, draws='handbook'))
  with pytest.raises(ValueError, match='vectorised, handbook'):
    simulate(SimulationConfig(customers=10, terminals=10, days=2, draws='numpy'))


def test_fraud_scenarios_follow_their_rules(standard_run):
  tx = standard_run.transactions
  assert tx.loc[tx['amount'] > 220, 'is_fraud'].all(), 'scenario 1: every amount over 220 is fraudulent'
  assert ((tx['is_fraud'] == 1) == (tx['fraud_scenario'] != GENUINE)).all()

  draws = standard_run.compromised
  for day, terminal in draws.loc[draws['scenario'] == SCENARIO_TERMINAL, ['day', 'id']].head(50).itertuples(False):
    window = tx[(tx['terminal_id'] == terminal) & tx['tx_time_days'].between(day, day + 27)]
    assert window['is_fraud'].all(), f'scenario 2: terminal {terminal} compromised on day {day}'

  third = []
  for day, customer in draws.loc[draws['scenario'] == SCENARIO_CUSTOMER, ['day', 'id']].itertuples(False):
    window = tx[(tx['customer_id'] == customer) & tx['tx_time_days'].between(day, day + 13)]
    if len(window) >= 30:
      third.append((window['fraud_scenario'] == SCENARIO_CUSTOMER).mean())
  assert 0.3 < np.mean(third) < 0.45, 'scenario 3: about a third of a compromised card\'s transactions'
  assert tx.loc[tx['fraud_scenario'] == SCENARIO_CUSTOMER, 'amount'].median() > 4 * tx['amount'].median()


def test_same_seed_gives_byte_identical_output(tmp_path):
  config = SimulationConfig(customers=300, terminals=600, days=20, seed=11)
  first = write_files(simulate(config), str(tmp_path / 'first'))
  second = write_files(simulate(config), str(tmp_path / 'second'))
  other = write_files(simulate(SimulationConfig(customers=300, terminals=600, days=20, seed=12)), str(tmp_path / 'o'))
  for a, b, c in zip(first, second, other, strict=True):
    assert open(a, 'rb').read() == open(b, 'rb').read() != open(c, 'rb').read()


def test_records_are_valid_and_labels_arrive_after_the_delay():
  simulation = simulate(SimulationConfig(customers=200, terminals=400, days=15, label_delay_days=7))
  produced = list(events(simulation))
  assert len(produced) == 2 * len(simulation.transactions)
  assert [e.timestamp_ms for e in produced] == sorted(e.timestamp_ms for e in produced)
  for event in produced[:2000]:
    schema = LABEL_SCHEMA if event.is_label else TRANSACTION_SCHEMA
    record = schema.parse(event.value)
    delay_ms = 7 * 86_400_000 if event.is_label else 0
    assert event.timestamp_ms == record.tx_time * 1000 + delay_ms


def test_drift_scenario_adds_a_cash_out_wave_at_night_from_its_day():
  config = SimulationConfig(customers=500, terminals=1000, days=40, drift_from_day=25, drift_cards_per_day=12,
                            drift_burst=5)
  simulation = simulate(config)
  tx = simulation.transactions
  drift = tx[tx['fraud_scenario'] == SCENARIO_DRIFT]
  assert len(drift) == 15 * 12 * 5 and drift['tx_time_days'].min() == 25 and drift['is_fraud'].all()
  assert (drift['tx_datetime'].dt.hour < 6).all()
  assert (drift.groupby(['tx_time_days', 'customer_id']).size() == 5).all()
  drained = simulation.compromised[simulation.compromised['scenario'] == SCENARIO_DRIFT]
  assert len(drained) == 15 * 12 and set(drained['id']) >= set(drift['customer_id'])
  without = simulate(SimulationConfig(customers=500, terminals=1000, days=40))
  assert len(tx) - len(drift) == len(without.transactions), 'the wave adds transactions, the others stay'
  assert (tx['transaction_id'] == np.arange(len(tx))).all()
