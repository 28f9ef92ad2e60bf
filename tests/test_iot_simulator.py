"""The IoT machine simulator: deterministic, labels true to the failures, a precursor before each failure mode."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.conftest import consume
from tests.pipeline_process import PROJECT_ROOT
from use_cases.iot.simulator import (
  LEAK,
  OVERHEAT,
  REGIME_PRESSURE_BAR,
  REGIME_VIBRATION_MM_S,
  SECONDS_PER_HOUR,
  SENSORS,
  STUCK,
  WEAR,
  SimulationConfig,
  describe,
  events,
  simulate,
)

CONFIG = SimulationConfig(machines=30, days=40, leaks_from_day=20, seed=5)


@pytest.fixture(scope='module')
def simulation():
  return simulate(CONFIG)


def test_a_seed_gives_the_same_fleet_and_another_seed_another(simulation):
  again = simulate(CONFIG)
  pd.testing.assert_frame_equal(again.readings, simulation.readings)
  pd.testing.assert_frame_equal(again.failures, simulation.failures)
  other = simulate(SimulationConfig(machines=30, days=40, leaks_from_day=20, seed=6))
  assert not other.failures.equals(simulation.failures)


def test_a_reading_is_positive_exactly_when_its_machine_fails_within_the_horizon(simulation):
  horizon_s = CONFIG.horizon_hours * SECONDS_PER_HOUR
  failures = simulation.failures.groupby('machine_id')['failure_time_seconds'].apply(np.array).to_dict()
  readings = simulation.readings
  for row in readings.sample(3000, random_state=0).itertuples():
    times = failures.get(row.machine_id, np.array([]))
    ahead = times[times > row.reading_time_seconds]
    fails = bool(len(ahead)) and ahead[0] - row.reading_time_seconds <= horizon_s
    assert row.fails_within_horizon == int(fails), row
  assert 0.01 < readings['fails_within_horizon'].mean() < 0.1


def test_a_failed_machine_gives_no_reading_until_repaired(simulation):
  readings = simulation.readings
  for failure in simulation.failures.itertuples():
    later = readings.loc[(readings['machine_id'] == failure.machine_id)
                         & (readings['reading_time_seconds'] >= failure.failure_time_seconds), 'reading_time_seconds']
    assert later.empty or later.min() - failure.failure_time_seconds >= 4 * SECONDS_PER_HOUR


def test_each_failure_mode_has_its_precursor_and_leaks_begin_on_their_day(simulation):
  readings = simulation.readings
  healthy = readings[readings['fails_within_horizon'] == 0]

  def relative(frame, sensor, baseline):
    return (frame[sensor] / baseline[frame['regime']]).median()

  before = {mode: readings[readings['failure_mode'] == mode] for mode in (WEAR, OVERHEAT, LEAK)}
  assert relative(before[WEAR], 'vibration_mm_s', REGIME_VIBRATION_MM_S) > 2 * relative(
      healthy, 'vibration_mm_s', REGIME_VIBRATION_MM_S)
  assert before[OVERHEAT]['temperature_c'].median() > healthy['temperature_c'].median() + 10
  assert relative(before[LEAK], 'pressure_bar', REGIME_PRESSURE_BAR) < 0.9 * relative(
      healthy, 'pressure_bar', REGIME_PRESSURE_BAR)
  leaks = simulation.failures[simulation.failures['failure_mode'] == LEAK]
  assert len(leaks) >= 3 and leaks['failure_time_seconds'].min() >= CONFIG.leaks_from_day * 86_400


def test_a_stuck_sensor_repeats_one_value_for_its_episode(simulation):
  readings = simulation.readings.sort_values(['machine_id', 'reading_time_seconds'], kind='stable')
  fault = readings['sensor_fault']
  episode = ((fault != fault.shift()) | (readings['machine_id'] != readings['machine_id'].shift())).cumsum()
  stuck = readings[fault // 10 == STUCK].groupby(episode[fault // 10 == STUCK])
  assert len(stuck) >= 3
  for _, group in stuck:
    assert group[SENSORS[group['sensor_fault'].iloc[0] % 10]].nunique() == 1, group


def test_the_events_are_in_time_order_keyed_by_machine_and_a_label_comes_a_horizon_after_its_reading(simulation):
  stream = list(events(simulation))
  assert len(stream) == 2 * len(simulation.readings)
  assert [e.timestamp_ms for e in stream] == sorted(e.timestamp_ms for e in stream)
  readings = {}
  for event in stream:
    record = json.loads(event.value)
    assert event.key == b'%d' % record['machine_id']
    if event.is_label:
      assert event.timestamp_ms - readings.pop(record['reading_id']) == CONFIG.horizon_hours * SECONDS_PER_HOUR * 1000
      assert set(record) == {'reading_id', 'reading_time', 'machine_id', 'fails_within_horizon', 'failure_mode'}
    else:
      readings[record['reading_id']] = event.timestamp_ms
      assert set(record) == {'reading_id', 'reading_time', 'machine_id', 'machine_type', *SENSORS}
  assert not readings
  history, live = list(events(simulation, until_day=25)), list(events(simulation, from_day=25))
  assert history + live == stream


def test_kbml_simulate_produces_a_fleet_with_the_simulators_flags(bootstrap, new_topic):
  readings, labels = new_topic(suffix='-readings'), new_topic(suffix='-labels')
  produced = subprocess.run(
      [sys.executable, '-m', 'kbml.cli', 'simulate', '--use-case', 'iot', '--machines', '3', '--days', '4', '--seed',
       '1', '--leaks-from-day', '1', '--leaks-per-year', '365', '--bootstrap-servers', bootstrap, '--events-topic',
       readings, '--labels-topic', labels], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
  assert produced.returncode == 0, produced.stderr

  config = SimulationConfig(machines=3, days=4, seed=1, leaks_from_day=1, leaks_per_year=365)
  simulation = simulate(config)
  expected = list(events(simulation))
  without_leaks = list(events(simulate(dataclasses.replace(config, leaks_from_day=None))))
  assert [e.value for e in expected] != [e.value for e in without_leaks], 'the leak flags must change the fleet'
  count = sum(not event.is_label for event in expected)
  assert describe(simulation) in produced.stdout
  assert f'produced {count:,} readings to {readings!r} and {count:,} labels' in produced.stdout
  by_topic = {topic: sorted(m.value() for m in consume(bootstrap, topic, count)) for topic in (readings, labels)}
  assert by_topic == {readings: sorted(e.value for e in expected if not e.is_label),
                      labels: sorted(e.value for e in expected if e.is_label)}
