"""Machine sensor simulator for predictive maintenance.

A fleet of machines, each read every few minutes by five sensors: rotation
speed, torque, temperature, vibration and pressure. The machine types and the
sensors follow the AI4I 2020 predictive maintenance dataset (Matzka, 2020:
types L, M and H in proportions 50/30/20, speed and torque that move
together, wear that grows with load); the failures are simulated over time,
each with its own precursor:

- ``WEAR``: wear grows with the load, faster on L machines; past about 85%
  of a machine's wear limit the vibration rises sharply, and the machine
  fails at the limit.
- ``OVERHEAT``: now and then a machine's cooling starts to fail; over about
  three days its temperature under load climbs, and it fails when the
  cooling is gone.
- ``LEAK`` (the drift scenario, from ``leaks_from_day`` on): a seal starts
  to leak and the pressure falls over about a day and a half before the
  machine fails. A model trained before that day has never seen it.

Machines switch between idle, normal and heavy regimes (hours each), which
move every sensor. Sensors fail too, without harm to the machine: a reading
stuck at one value, or five times its noise, for some hours. A failed machine
is repaired (no readings for 4 to 24 hours) and comes back as new.

Each reading's label says whether its machine fails within the next
``horizon_hours``; it becomes known once they have passed. The draws are
vectorised over the machines with one seeded NumPy generator: a run is
deterministic for a seed.
"""

import dataclasses
import datetime
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from kbml.simulator import Event, LoopScenario, merged_in_event_time

SECONDS_PER_HOUR = 3_600
NO_FAILURE, WEAR, OVERHEAT, LEAK = range(4)
FAILURE_MODES = {NO_FAILURE: 'none', WEAR: 'wear', OVERHEAT: 'overheat', LEAK: 'leak'}
MACHINE_TYPES = ('L', 'M', 'H')
TYPE_SHARES = (0.5, 0.3, 0.2)
WEAR_RATE_PER_HOUR = {'L': 0.16, 'M': 0.12, 'H': 0.09}  # at full load: a wear limit of about 100 lasts weeks
IDLE, NORMAL, HEAVY = range(3)
REGIME_SHARES = (0.2, 0.55, 0.25)
REGIME_MEAN_HOURS = 4.0
REGIME_LOAD = np.array([0.1, 0.6, 1.0])
REGIME_SPEED_RPM = np.array([300.0, 1500.0, 2200.0])
REGIME_TORQUE_NM = np.array([5.0, 40.0, 60.0])
REGIME_VIBRATION_MM_S = np.array([0.5, 2.0, 3.0])
REGIME_PRESSURE_BAR = np.array([5.8, 6.0, 6.3])
WEAR_LIMIT_MEAN, WEAR_LIMIT_SD = 100.0, 10.0
COOLING_FAILURE_HOURS = 72.0
LEAK_HOURS = 36.0
LEAK_PRESSURE_DROP_BAR = 2.0
SENSORS = ('rotation_speed_rpm', 'torque_nm', 'temperature_c', 'vibration_mm_s', 'pressure_bar')
SENSOR_NOISE = np.array([30.0, 2.0, 1.0, 0.3, 0.1])
STUCK, NOISY = 1, 2


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
  """Parameters of a simulated fleet.

  Attributes:
    machines: number of machines.
    start_date: first day, ISO format, UTC.
    days: number of days.
    reading_minutes: minutes between two readings of a machine.
    horizon_hours: a reading's label: does its machine fail within this many hours (known once they have passed).
    seed: seed of every draw.
    cooling_failures_per_year: how often a machine's cooling starts to fail.
    leaks_from_day: first day of the drift scenario, seals that leak; None for none.
    leaks_per_year: how often a machine's seal starts to leak, from that day.
    sensor_faults_per_year: how often one of a machine's sensors sticks or turns noisy for some hours.
    first_reading_id: the first reading's id; a run that continues a stream already produced starts after its last.
  """
  machines: int = 100
  start_date: str = '2025-01-01'
  days: int = 60
  reading_minutes: float = 15.0
  horizon_hours: float = 24.0
  seed: int = 0
  cooling_failures_per_year: float = 6.0
  leaks_from_day: Optional[int] = None
  leaks_per_year: float = 12.0
  sensor_faults_per_year: float = 12.0
  first_reading_id: int = 0

  @property
  def start(self) -> datetime.datetime:
    return datetime.datetime.fromisoformat(self.start_date).replace(tzinfo=datetime.timezone.utc)


@dataclasses.dataclass
class Simulation:
  """A simulated fleet, its readings and its failures.

  Attributes:
    config: the parameters.
    machines: one row per machine: ``machine_id``, ``machine_type``.
    readings: one row per reading, in time order: ``reading_id``, ``machine_id``, ``machine_type``,
      ``reading_time_seconds`` (since the start), the sensors (:data:`SENSORS`), ``regime`` and ``sensor_fault``
      (what the simulation knows and a reading does not tell; the fault is 0, or ``STUCK`` or ``NOISY`` times 10
      plus the faulty sensor's index), ``fails_within_horizon`` and ``failure_mode`` (the label).
    failures: one row per failure: ``machine_id``, ``failure_time_seconds``, ``failure_mode``.
  """
  config: SimulationConfig
  machines: pd.DataFrame
  readings: pd.DataFrame
  failures: pd.DataFrame


def _onsets(rng: np.random.Generator, per_year: float, step_hours: float, count: int) -> np.ndarray:
  """Which of ``count`` machines start an episode in this step, at ``per_year`` episodes a year."""
  return rng.random(count) < per_year * step_hours / (365 * 24)


def _regimes(rng: np.random.Generator, regime: np.ndarray, step_hours: float) -> np.ndarray:
  switch = rng.random(len(regime)) < step_hours / REGIME_MEAN_HOURS
  return np.where(switch, rng.choice(3, size=len(regime), p=REGIME_SHARES), regime)


def simulate(config: SimulationConfig = SimulationConfig()) -> Simulation:
  """Runs the fleet for ``config.days``; deterministic for ``config.seed``."""
  rng = np.random.default_rng(config.seed)
  count = config.machines
  types = rng.choice(len(MACHINE_TYPES), size=count, p=TYPE_SHARES)
  wear_rate = np.array([WEAR_RATE_PER_HOUR[MACHINE_TYPES[t]] for t in types]) * rng.lognormal(0, 0.15, count)
  step_hours = config.reading_minutes / 60
  steps = int(config.days * 24 / step_hours)

  regime = rng.choice(3, size=count, p=REGIME_SHARES)
  wear = rng.uniform(0, 0.8, count) * WEAR_LIMIT_MEAN  # a fleet in service: machines of every age
  wear_limit = rng.normal(WEAR_LIMIT_MEAN, WEAR_LIMIT_SD, count)
  cooling_loss_hours = np.full(count, np.nan)  # hours since the cooling started to fail; NaN: it works
  leak_hours = np.full(count, np.nan)
  down_until = np.zeros(count)  # hours: a machine under repair gives no readings
  fault = np.zeros(count, int)
  fault_sensor = np.zeros(count, int)
  fault_until = np.zeros(count)
  stuck_values = np.zeros((count, len(SENSORS)))
  previous = np.zeros((count, len(SENSORS)))

  columns: List[Tuple[np.ndarray, ...]] = []
  failures: List[Tuple[int, float, int]] = []
  for step in range(steps):
    hours = step * step_hours
    up = hours >= down_until
    regime = _regimes(rng, regime, step_hours)
    load = REGIME_LOAD[regime]
    wear = wear + np.where(up, wear_rate * (0.2 + load) * step_hours * rng.lognormal(0, 0.1, count), 0)
    cooling_loss_hours = np.where(np.isnan(cooling_loss_hours) & up
                                  & _onsets(rng, config.cooling_failures_per_year, step_hours, count),
                                  0.0, cooling_loss_hours + step_hours)
    if config.leaks_from_day is not None and hours >= config.leaks_from_day * 24:
      leak_hours = np.where(np.isnan(leak_hours) & up & _onsets(rng, config.leaks_per_year, step_hours, count),
                            0.0, leak_hours + step_hours)

    mode = np.select([wear >= wear_limit, cooling_loss_hours >= COOLING_FAILURE_HOURS, leak_hours >= LEAK_HOURS],
                     [WEAR, OVERHEAT, LEAK], NO_FAILURE)
    failing = up & (mode != NO_FAILURE)
    for machine in np.flatnonzero(failing):
      failures.append((machine, hours * SECONDS_PER_HOUR, int(mode[machine])))
    down_until = np.where(failing, hours + rng.uniform(4, 24, count), down_until)
    wear = np.where(failing, 0.0, wear)
    wear_limit = np.where(failing, rng.normal(WEAR_LIMIT_MEAN, WEAR_LIMIT_SD, count), wear_limit)
    cooling_loss_hours = np.where(failing, np.nan, cooling_loss_hours)
    leak_hours = np.where(failing, np.nan, leak_hours)
    reading = up & ~failing

    cooling_loss = np.nan_to_num(cooling_loss_hours / COOLING_FAILURE_HOURS)
    leak = np.nan_to_num(leak_hours / LEAK_HOURS)
    hour_of_day = (hours + config.start.hour) % 24
    ambient = 20 + 5 * np.sin(2 * np.pi * (hour_of_day - 9) / 24)
    speed = REGIME_SPEED_RPM[regime] * rng.normal(1, 0.03, count)
    truth = np.stack([
        speed,
        REGIME_TORQUE_NM[regime] * (2 - speed / REGIME_SPEED_RPM[regime]),  # torque falls as speed rises
        ambient + 30 * load + 35 * cooling_loss ** 2 * (0.3 + load),
        REGIME_VIBRATION_MM_S[regime] * (1 + 4 * np.clip(wear / wear_limit - 0.85, 0, None) / 0.15),
        REGIME_PRESSURE_BAR[regime] - LEAK_PRESSURE_DROP_BAR * leak,
    ], axis=1)

    starts = reading & (fault == 0) & _onsets(rng, config.sensor_faults_per_year, step_hours, count)
    fault = np.where(starts, rng.choice([STUCK, NOISY], size=count), np.where(hours < fault_until, fault, 0))
    fault_sensor = np.where(starts, rng.integers(len(SENSORS), size=count), fault_sensor)
    fault_until = np.where(starts, hours + rng.uniform(2, 12, count), fault_until)
    stuck_values = np.where(starts[:, None], previous, stuck_values)
    noise = rng.normal(0, 1, (count, len(SENSORS))) * SENSOR_NOISE
    faulty = np.arange(len(SENSORS))[None, :] == fault_sensor[:, None]
    noise = np.where(faulty & (fault == NOISY)[:, None], 5 * noise, noise)
    values = np.where(faulty & (fault == STUCK)[:, None], stuck_values, truth + noise)
    values[:, 1:] = np.clip(values[:, 1:], 0, None)
    previous = np.where(reading[:, None], values, previous)

    machines = np.flatnonzero(reading)
    columns.append((machines, np.full(len(machines), hours * SECONDS_PER_HOUR), values[machines],
                    regime[machines], np.where(fault[machines] > 0, fault[machines] * 10 + fault_sensor[machines], 0)))

  machine_ids = np.concatenate([c[0] for c in columns])
  times = np.concatenate([c[1] for c in columns])
  readings = pd.DataFrame({
      'reading_id': np.arange(len(times)) + config.first_reading_id,
      'machine_id': machine_ids,
      'machine_type': np.array(MACHINE_TYPES)[types[machine_ids]],
      'reading_time_seconds': times,
      **dict(zip(SENSORS, np.concatenate([c[2] for c in columns]).round(3).T, strict=True)),
      'regime': np.concatenate([c[3] for c in columns]),
      'sensor_fault': np.concatenate([c[4] for c in columns]),
  })
  failure_frame = pd.DataFrame(failures, columns=['machine_id', 'failure_time_seconds', 'failure_mode'])
  _label(readings, failure_frame, config.horizon_hours * SECONDS_PER_HOUR)
  machine_frame = pd.DataFrame({'machine_id': np.arange(count), 'machine_type': np.array(MACHINE_TYPES)[types]})
  return Simulation(config, machine_frame, readings, failure_frame)


def describe(simulation: Simulation) -> str:
  """What a simulation holds, in one line (``kbml simulate --use-case iot``)."""
  readings, config = simulation.readings, simulation.config
  failures = {FAILURE_MODES[mode]: count
              for mode, count in simulation.failures['failure_mode'].value_counts().sort_index().items()}
  return (f'simulated {len(readings):,} readings of {config.machines:,} machines over {config.days} days from '
          f'{config.start_date}: {readings["fails_within_horizon"].mean():.2%} within {config.horizon_hours:g} hours '
          f'of a failure, failures by mode {failures}')


def size(simulation: Simulation) -> int:
  """How many readings a simulation holds (each with its label)."""
  return len(simulation.readings)


def _label(readings: pd.DataFrame, failures: pd.DataFrame, horizon_s: float):
  """Adds each reading's label: its machine's next failure, if within ``horizon_s``, and that failure's mode."""
  readings['fails_within_horizon'] = 0
  readings['failure_mode'] = NO_FAILURE
  for machine, machine_failures in failures.groupby('machine_id'):
    rows = np.flatnonzero(readings['machine_id'].to_numpy() == machine)
    times = readings['reading_time_seconds'].to_numpy()[rows]
    failure_times = machine_failures['failure_time_seconds'].to_numpy()
    following = np.searchsorted(failure_times, times, side='right')
    has_next = following < len(failure_times)
    within = has_next & (failure_times[np.minimum(following, len(failure_times) - 1)] - times <= horizon_s)
    readings.loc[rows[within], 'fails_within_horizon'] = 1
    readings.loc[rows[within], 'failure_mode'] = machine_failures['failure_mode'].to_numpy()[following[within]]


def _iso_times(seconds: np.ndarray, start: datetime.datetime) -> np.ndarray:
  moments = pd.Timestamp(start) + pd.to_timedelta(seconds, unit='s')
  return moments.strftime('%Y-%m-%dT%H:%M:%SZ').to_numpy()


def records(simulation: Simulation) -> Tuple[List[bytes], List[bytes]]:
  """The readings and their labels as JSON records (the formats of the two topics); both start with the reading's
  identity (id, time, machine)."""
  readings = simulation.readings
  times = _iso_times(readings['reading_time_seconds'].to_numpy(), simulation.config.start)
  identities = [b'{"reading_id": %d, "reading_time": "%s", "machine_id": %d' % (i, t.encode(), m)
                for i, t, m in zip(readings['reading_id'], times, readings['machine_id'], strict=True)]
  sensors = zip(readings['machine_type'], *(readings[name] for name in SENSORS), strict=True)
  values = [b'%s, "machine_type": "%s", %s}' % (identity, kind.encode(), b', '.join(
      b'"%s": %s' % (name.encode(), repr(float(value)).encode()) for name, value in zip(SENSORS, sensor_values,
                                                                                       strict=True)))
            for identity, (kind, *sensor_values) in zip(identities, sensors, strict=True)]
  labels = [b'%s, "fails_within_horizon": %d, "failure_mode": %d}' % (identity, label, mode)
            for identity, label, mode in zip(identities, readings['fails_within_horizon'], readings['failure_mode'],
                                             strict=True)]
  return values, labels


def events(simulation: Simulation, from_day: Optional[float] = None,
           until_day: Optional[float] = None) -> Iterator[Event]:
  """Readings and their labels, merged in event-time order, keyed by machine.

  A reading's label comes ``horizon_hours`` after it. ``from_day`` and
  ``until_day`` (days since the start, the end excluded) select a time
  range: history first, then live.
  """
  readings = simulation.readings
  start_ms = int(simulation.config.start.timestamp() * 1000)
  reading_ms = start_ms + (readings['reading_time_seconds'].to_numpy() * 1000).astype(np.int64)
  label_ms = reading_ms + int(simulation.config.horizon_hours * SECONDS_PER_HOUR * 1000)
  keys = [b'%d' % m for m in readings['machine_id']]
  yield from merged_in_event_time(reading_ms, label_ms, keys, *records(simulation), start_ms, from_day, until_day)


# `kbml loop --use-case iot`: 60 machines; from day 33 seals start to leak, at 180 leaks a year per machine (one
# every two days), so that many machines leak within days (at 12 a year, no feature's daily PSI passes 0.2; at 180 the
# pressure features pass it on the first whole day). The first model trains on the history's last 20 labelled
# days before 3 of validation and 3 of test (failures are few without leaks); the drift retrain waits for 6 days of
# labels from the alert's window, so that it trains on leaks and is tested on the 2 newest days.
LOOP_SCENARIO = LoopScenario(
    simulation=('--machines', '60', '--days', '60', '--seed', '7', '--leaks-per-year', '180'),
    drift_field='leaks_from_day', live_from_day=30, drift_from_day=33, rate=800,
    first_model=('--last-days', '20', '--delay-days', '0', '--validation-days', '3', '--test-days', '3'),
    retrain=('--last-days', '10', '--delay-days', '0', '--validation-days', '2', '--test-days', '2',
             '--drift-labelled-days', '6'))
