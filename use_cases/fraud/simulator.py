"""Credit-card transaction simulator, after the Fraud Detection Handbook.

It follows the generative process of Le Borgne et al., "Reproducible Machine
Learning for Credit Card Fraud Detection - Practical Handbook", chapter 3:
customers and terminals on a 100x100 grid, each customer using the terminals
within a radius, Poisson daily counts, times around midday, normal amounts,
and three fraud scenarios. Two ways to draw:

- ``vectorised`` (the default): one seeded NumPy generator draws each
  quantity for all customers at once, so a run is deterministic for a seed
  and takes seconds; its numbers differ from the handbook's run, its
  distributions do not.
- ``handbook``: the handbook's own seeds and order of draws (NumPy's legacy
  generator seeded with each customer's id, Python's ``random`` for the
  terminals and the scenario-3 picks, pandas' sampling seeded with the
  day), one customer at a time; the standard run is then the handbook's own
  dataset (1,754,155 transactions, 14,681 frauds), on which its published
  figures were measured. The standard run takes about 9 seconds.

An optional drift scenario (4) starts a new fraud pattern on a given day: a
cash-out wave, stolen cards drained in bursts at night, at terminals far
from home, for larger amounts, so that the features' distributions move.
"""

import dataclasses
import datetime
import os
import random
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from kbml.simulator import Event, LoopScenario, merged_in_event_time
from transforms.records import DAY_SECONDS

GRID_SIZE = 100.0

DRAWS = ('vectorised', 'handbook')

GENUINE, SCENARIO_AMOUNT, SCENARIO_TERMINAL, SCENARIO_CUSTOMER, SCENARIO_DRIFT = range(5)


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
  """Parameters of a simulated population; the defaults are the handbook's standard run.

  Attributes:
    customers: number of customers.
    terminals: number of terminals.
    radius: a customer uses the terminals within this distance.
    start_date: first day, ISO format, UTC.
    days: number of days.
    seed: seed of every draw (the handbook's draws have their own seeds: 0 only).
    draws: vectorised (fast, any seed) or handbook (its own seeds and order of
      draws: the standard run is then the handbook's dataset, transaction for
      transaction).
    label_delay_days: how long after a transaction its label (fraud or not) arrives.
    drift_from_day: first day of the drift scenario (4); None for none.
    drift_cards_per_day: cards drained by the drift scenario each day.
    drift_burst: transactions the drift scenario adds on each drained card.
    first_transaction_id: the first transaction's id; a run that continues
      a stream already produced starts after its last id.
  """
  customers: int = 5_000
  terminals: int = 10_000
  radius: float = 5.0
  start_date: str = '2018-04-01'
  days: int = 183
  seed: int = 0
  draws: str = 'vectorised'
  label_delay_days: float = 7.0
  drift_from_day: Optional[int] = None
  drift_cards_per_day: int = 10
  drift_burst: int = 8
  first_transaction_id: int = 0

  @property
  def start(self) -> datetime.datetime:
    return datetime.datetime.fromisoformat(self.start_date).replace(tzinfo=datetime.timezone.utc)


@dataclasses.dataclass
class Simulation:
  """A simulated population and its transactions.

  ``transactions`` is sorted by time and has the columns transaction_id,
  tx_datetime (UTC), tx_time_seconds and tx_time_days (since the start),
  customer_id, terminal_id, amount, is_fraud and fraud_scenario.
  ``compromised`` is the ground truth of scenarios 2 to 4: one row per draw,
  with its day, scenario and id (a terminal for scenario 2, a customer for
  scenarios 3 and 4).
  """
  config: SimulationConfig
  customers: pd.DataFrame
  terminals: pd.DataFrame
  transactions: pd.DataFrame
  compromised: pd.DataFrame = None


def _customer_profiles(x: np.ndarray, y: np.ndarray, mean_amount: np.ndarray,
                       mean_tx_per_day: np.ndarray) -> pd.DataFrame:
  return pd.DataFrame({
      'customer_id': np.arange(len(x)),
      'x': x,
      'y': y,
      'mean_amount': mean_amount,
      'std_amount': mean_amount / 2,
      'mean_tx_per_day': mean_tx_per_day,
  })


def _terminal_profiles(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
  return pd.DataFrame({'terminal_id': np.arange(len(x)), 'x': x, 'y': y})


def _vectorised_profiles(rng: np.random.Generator, config: SimulationConfig) -> Tuple[pd.DataFrame, pd.DataFrame]:
  mean_amount = rng.uniform(5, 100, config.customers)
  customer_x, customer_y = rng.uniform(0, GRID_SIZE, (2, config.customers))
  customers = _customer_profiles(customer_x, customer_y, mean_amount, rng.uniform(0, 4, config.customers))
  return customers, _terminal_profiles(*rng.uniform(0, GRID_SIZE, (2, config.terminals)))


def _handbook_profiles(config: SimulationConfig) -> Tuple[pd.DataFrame, pd.DataFrame]:
  """The handbook's profiles: one legacy generator seeded 0 for the customers (x, y, mean amount and
  daily count drawn customer after customer), one seeded 1 for the terminals (x, y)."""
  customers = np.random.RandomState(0).uniform([0, 0, 5, 0], [GRID_SIZE, GRID_SIZE, 100, 4], (config.customers, 4))
  terminals = np.random.RandomState(1).uniform(0, GRID_SIZE, (config.terminals, 2))
  return _customer_profiles(*customers.T), _terminal_profiles(*terminals.T)


def _terminals_within_radius(customers: pd.DataFrame, terminals: pd.DataFrame, radius: float):
  """Each customer's usable terminals, as CSR arrays (indptr, terminal indices)."""
  terminal_xy = terminals[['x', 'y']].to_numpy()
  customer_xy = customers[['x', 'y']].to_numpy()
  indices, counts = [], []
  for start in range(0, len(customer_xy), 512):  # chunks keep the distance matrix small
    chunk = customer_xy[start:start + 512]
    distance = np.sqrt(((chunk[:, None, :] - terminal_xy[None, :, :]) ** 2).sum(axis=2))
    rows, columns = np.nonzero(distance < radius)
    indices.append(columns)
    counts.append(np.bincount(rows, minlength=len(chunk)))
  counts = np.concatenate(counts)
  return np.concatenate([[0], np.cumsum(counts)]), np.concatenate(indices), counts


def _vectorised_transactions(rng: np.random.Generator, customers: pd.DataFrame, terminals: pd.DataFrame,
                             config: SimulationConfig) -> pd.DataFrame:
  indptr, usable, usable_counts = _terminals_within_radius(customers, terminals, config.radius)
  daily_counts = rng.poisson(customers['mean_tx_per_day'].to_numpy()[:, None], (len(customers), config.days))
  daily_counts[usable_counts == 0] = 0  # customers without usable terminals make no transactions
  customer = np.repeat(np.repeat(np.arange(len(customers)), config.days), daily_counts.ravel())
  day = np.repeat(np.tile(np.arange(config.days), len(customers)), daily_counts.ravel())

  time_of_day = rng.normal(DAY_SECONDS / 2, 20_000, len(customer)).astype(np.int64)
  kept = (time_of_day >= 0) & (time_of_day < DAY_SECONDS)
  customer, day, time_of_day = customer[kept], day[kept], time_of_day[kept]

  mean = customers['mean_amount'].to_numpy()[customer]
  amount = rng.normal(mean, customers['std_amount'].to_numpy()[customer])
  negative = amount < 0
  amount[negative] = rng.uniform(0, 2 * mean[negative])
  terminal = usable[indptr[customer] + (rng.random(len(customer)) * usable_counts[customer]).astype(np.int64)]
  return _transaction_table(customer, day, time_of_day, terminal, amount, config)


def _handbook_transactions(customers: pd.DataFrame, terminals: pd.DataFrame,
                           config: SimulationConfig) -> pd.DataFrame:
  """The handbook's loop: each customer's draws come from generators seeded with its id, in its order.

  Per day a Poisson count; per transaction a time (kept when strictly
  inside the day), then an amount (a negative one redrawn uniformly), then
  the terminal, picked by Python's ``random`` among the usable ones.
  """
  indptr, usable, _ = _terminals_within_radius(customers, terminals, config.radius)
  customer, day, time_of_day, terminal, amount = [], [], [], [], []
  for profile in customers.itertuples():
    usable_here = usable[indptr[profile.customer_id]:indptr[profile.customer_id + 1]].tolist()
    if not usable_here:  # its draws would feed nothing: the handbook keeps no transaction of such a customer
      continue
    numbers, picks = np.random.RandomState(profile.customer_id), random.Random(profile.customer_id)
    for today in range(config.days):
      for _ in range(numbers.poisson(profile.mean_tx_per_day)):
        seconds = int(numbers.normal(DAY_SECONDS / 2, 20_000))
        if 0 < seconds < DAY_SECONDS:
          drawn = numbers.normal(profile.mean_amount, profile.std_amount)
          amount.append(drawn if drawn >= 0 else numbers.uniform(0, profile.mean_amount * 2))
          terminal.append(picks.choice(usable_here))
          customer.append(profile.customer_id)
          day.append(today)
          time_of_day.append(seconds)
  return _transaction_table(*(np.asarray(values) for values in (customer, day, time_of_day, terminal, amount)),
                            config)


def _transaction_table(customer: np.ndarray, day: np.ndarray, time_of_day: np.ndarray, terminal: np.ndarray,
                       amount: np.ndarray, config: SimulationConfig) -> pd.DataFrame:
  return _sorted_by_time(pd.DataFrame({
      'tx_time_seconds': day.astype(np.int64) * DAY_SECONDS + time_of_day,
      'customer_id': customer.astype(np.int64),
      'terminal_id': terminal.astype(np.int64),
      'amount': np.round(amount, 2),
      'is_fraud': np.zeros(len(customer), dtype=np.int64),
      'fraud_scenario': np.zeros(len(customer), dtype=np.int64),
  }), config)


def _sorted_by_time(transactions: pd.DataFrame, config: SimulationConfig) -> pd.DataFrame:
  transactions = transactions.sort_values('tx_time_seconds', kind='stable').reset_index(drop=True)
  transactions.insert(0, 'transaction_id', config.first_transaction_id + np.arange(len(transactions)))
  transactions['tx_time_days'] = transactions['tx_time_seconds'] // DAY_SECONDS
  start = pd.Timestamp(config.start)
  transactions['tx_datetime'] = start + pd.to_timedelta(transactions['tx_time_seconds'], unit='s')
  return transactions


class _RowsBy:
  """Row positions of each value of a column, for fast selection by a few values."""

  def __init__(self, values: np.ndarray, population: int):
    self._order = np.argsort(values, kind='stable')
    self._bounds = np.searchsorted(values[self._order], np.arange(population + 1))

  def rows(self, chosen) -> np.ndarray:
    return np.concatenate([self._order[self._bounds[v]:self._bounds[v + 1]] for v in chosen])


def _mark(transactions: pd.DataFrame, rows: np.ndarray, scenario: int):
  transactions.loc[rows, 'is_fraud'] = 1
  transactions.loc[rows, 'fraud_scenario'] = scenario


class _GeneratorPicks:
  """The fraud scenarios' picks, from the run's one seeded generator."""

  def __init__(self, rng: np.random.Generator, simulation: Simulation):
    self._rng, self._customers, self._terminals = rng, len(simulation.customers), len(simulation.terminals)

  def terminals(self, day: int) -> np.ndarray:
    return self._rng.choice(self._terminals, 2, replace=False)

  def customers(self, day: int) -> np.ndarray:
    return self._rng.choice(self._customers, 3, replace=False)

  def third_of(self, day: int, rows: np.ndarray) -> np.ndarray:
    return self._rng.choice(rows, len(rows) // 3, replace=False)


class _HandbookPicks:
  """The handbook's picks: pandas' ``sample(random_state=day)`` (a legacy generator seeded with the day) for the
  terminals and the customers; Python's ``random`` seeded with the day for a third of the rows, in time order."""

  def __init__(self, simulation: Simulation):
    self._customers, self._terminals = len(simulation.customers), len(simulation.terminals)

  def terminals(self, day: int) -> np.ndarray:
    return np.random.RandomState(day).choice(self._terminals, 2, replace=False)

  def customers(self, day: int) -> np.ndarray:
    return np.random.RandomState(day).choice(self._customers, 3, replace=False)

  def third_of(self, day: int, rows: np.ndarray) -> np.ndarray:
    return np.array(random.Random(day).sample(sorted(rows.tolist()), len(rows) // 3), dtype=np.int64)


def _add_frauds(picks, simulation: Simulation) -> List[Tuple[int, int, int]]:
  """Applies the handbook's three scenarios, in its order (a later one overrides an earlier one).

  Returns the draws: (day, scenario, terminal or customer id).
  """
  tx = simulation.transactions
  draws = []
  _mark(tx, np.flatnonzero(tx['amount'].to_numpy() > 220), SCENARIO_AMOUNT)
  days = tx['tx_time_days'].to_numpy()
  by_terminal = _RowsBy(tx['terminal_id'].to_numpy(), len(simulation.terminals))
  by_customer = _RowsBy(tx['customer_id'].to_numpy(), len(simulation.customers))
  for day in range(days.max()):
    terminals = picks.terminals(day)
    draws += [(day, SCENARIO_TERMINAL, t) for t in terminals]
    rows = by_terminal.rows(terminals)
    _mark(tx, rows[(days[rows] >= day) & (days[rows] < day + 28)], SCENARIO_TERMINAL)
  for day in range(days.max()):
    customers = picks.customers(day)
    draws += [(day, SCENARIO_CUSTOMER, c) for c in customers]
    rows = by_customer.rows(customers)
    rows = picks.third_of(day, rows[(days[rows] >= day) & (days[rows] < day + 14)])
    tx.loc[rows, 'amount'] = np.round(tx.loc[rows, 'amount'].to_numpy() * 5, 2)
    _mark(tx, rows, SCENARIO_CUSTOMER)
  return draws


def _add_drift(rng: np.random.Generator, simulation: Simulation, draws: List[Tuple[int, int, int]]) -> pd.DataFrame:
  """Scenario 4, a cash-out wave: from ``drift_from_day``, stolen cards drained at night, far from home.

  Each day ``drift_cards_per_day`` cards are drawn, and the fraudster adds
  ``drift_burst`` transactions on each between midnight and 6 am, at
  terminals anywhere, for twice the card's usual amount. The wave is at full
  strength from its first day, unlike the handbook's scenarios, which grow
  over a week or two.
  """
  config = simulation.config
  customers = simulation.customers
  first_day = config.drift_from_day
  drained = [rng.choice(len(customers), config.drift_cards_per_day, replace=False)
             for _ in range(first_day, config.days)]
  draws += [(first_day + offset, SCENARIO_DRIFT, c) for offset, day_cards in enumerate(drained) for c in day_cards]
  customer = np.repeat(np.concatenate(drained), config.drift_burst)
  day = np.repeat(np.arange(first_day, config.days), config.drift_cards_per_day * config.drift_burst)
  mean = customers['mean_amount'].to_numpy()[customer]
  wave = pd.DataFrame({
      'tx_time_seconds': day * DAY_SECONDS + rng.integers(0, 6 * 3600, len(customer)),
      'customer_id': customer,
      'terminal_id': rng.integers(0, len(simulation.terminals), len(customer)),
      'amount': np.round(np.abs(rng.normal(2 * mean, customers['std_amount'].to_numpy()[customer])), 2),
      'is_fraud': np.ones(len(customer), dtype=np.int64),
      'fraud_scenario': np.full(len(customer), SCENARIO_DRIFT, dtype=np.int64),
  })
  columns = list(wave.columns)
  return _sorted_by_time(pd.concat([simulation.transactions[columns], wave], ignore_index=True), config)


def simulate(config: SimulationConfig = SimulationConfig()) -> Simulation:
  """Generates a population and its transactions; deterministic for ``config.seed`` and ``config.draws``."""
  if config.draws not in DRAWS:
    raise ValueError(f'Unknown draws {config.draws!r}: choose one of {", ".join(DRAWS)}.')
  if config.draws == 'handbook' and config.seed:
    raise ValueError('The handbook\'s draws have their own seeds: leave the seed at 0, or draw vectorised.')
  rng = np.random.default_rng(config.seed)
  if config.draws == 'handbook':
    customers, terminals = _handbook_profiles(config)
    simulation = Simulation(config, customers, terminals, _handbook_transactions(customers, terminals, config))
    picks = _HandbookPicks(simulation)
  else:
    customers, terminals = _vectorised_profiles(rng, config)
    simulation = Simulation(config, customers, terminals,
                            _vectorised_transactions(rng, customers, terminals, config))
    picks = _GeneratorPicks(rng, simulation)
  draws = _add_frauds(picks, simulation)
  if config.drift_from_day is not None:
    simulation.transactions = _add_drift(rng, simulation, draws)
  simulation.compromised = pd.DataFrame(draws, columns=['day', 'scenario', 'id'])
  return simulation


def describe(simulation: Simulation) -> str:
  """What a simulation holds, in one line (``kbml simulate``)."""
  tx, config = simulation.transactions, simulation.config
  scenarios = tx['fraud_scenario'].value_counts().sort_index().to_dict()
  return (f'simulated {len(tx):,} transactions over {config.days} days from {config.start_date}: '
          f'{tx["is_fraud"].mean():.3%} fraudulent, by scenario {scenarios}')


def size(simulation: Simulation) -> int:
  """How many transactions a simulation holds (each with its label)."""
  return len(simulation.transactions)


# The demo: 500 cards; a cash-out wave from day 85, the size at which the features' PSI crosses 0.2 in its first
# day. The first model trains on the 10 days before the 3 last labelled days of the history, and is tested on
# those: the split of `kbml retrain` (no delay), on fewer days so that the history needed before them is shorter.
LOOP_SCENARIO = LoopScenario(
    simulation=('--customers', '500', '--terminals', '1000', '--days', '140', '--seed', '7',
                '--drift-cards-per-day', '40', '--drift-burst', '8'),
    drift_field='drift_from_day', live_from_day=82, drift_from_day=85, rate=400,
    first_model=('--last-days', '10', '--delay-days', '0', '--test-days', '3'))


def _iso_times(seconds: np.ndarray, start: datetime.datetime) -> np.ndarray:
  moments = pd.Timestamp(start) + pd.to_timedelta(seconds, unit='s')
  return moments.strftime('%Y-%m-%dT%H:%M:%SZ').to_numpy()


def records(simulation: Simulation) -> Tuple[List[bytes], List[bytes]]:
  """The transactions and their labels as JSON records (the formats of the two topics).

  Both start with the transaction's identity (id, time, customer, terminal),
  formatted once for both.
  """
  tx = simulation.transactions
  times = _iso_times(tx['tx_time_seconds'].to_numpy(), simulation.config.start)
  identities = [b'{"transaction_id": %d, "tx_datetime": "%s", "customer_id": %d, "terminal_id": %d' % (
      i, t.encode(), c, term) for i, t, c, term in zip(tx['transaction_id'], times, tx['customer_id'],
                                                       tx['terminal_id'], strict=True)]
  transactions = [b'%s, "amount": %s}' % (identity, repr(float(a)).encode())
                  for identity, a in zip(identities, tx['amount'], strict=True)]
  labels = [b'%s, "is_fraud": %d, "fraud_scenario": %d}' % (identity, f, scenario)
            for identity, f, scenario in zip(identities, tx['is_fraud'], tx['fraud_scenario'], strict=True)]
  return transactions, labels


def events(simulation: Simulation, from_day: Optional[float] = None,
           until_day: Optional[float] = None) -> Iterator[Event]:
  """Transactions and their labels, merged in event-time order.

  A transaction's time is its own; its label's is the transaction's time
  plus the label delay. Records are keyed by customer, so a customer's
  records keep their order within a partition. ``from_day`` and
  ``until_day`` (days since the start, the end excluded) select the events
  of a time range: a simulation produced in parts, history first, then live.
  """
  tx = simulation.transactions
  start_ms = int(simulation.config.start.timestamp() * 1000)
  tx_ms = start_ms + tx['tx_time_seconds'].to_numpy() * 1000
  label_ms = tx_ms + int(simulation.config.label_delay_days * DAY_SECONDS * 1000)
  keys = [b'%d' % c for c in tx['customer_id']]
  yield from merged_in_event_time(tx_ms, label_ms, keys, *records(simulation), start_ms, from_day, until_day)


def write_files(simulation: Simulation, folder: str) -> Tuple[str, str]:
  """Writes transactions.jsonl and labels.jsonl (one JSON record a line) for offline use."""
  os.makedirs(folder, exist_ok=True)
  paths = os.path.join(folder, 'transactions.jsonl'), os.path.join(folder, 'labels.jsonl')
  for path, lines in zip(paths, records(simulation), strict=True):
    with open(path, 'wb') as f:
      f.write(b'\n'.join(lines) + b'\n')
  return paths
