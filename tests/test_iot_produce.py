"""`kbml produce --use-case iot`: a fleet's readings from files, the records and warehouse rows the simulator gives."""

import pandas as pd
import pytest

from kbml import produce
from tests.test_produce import assert_produce_round_trips
from transforms.use_case import load_use_case
from use_cases.iot.simulator import SENSORS, SimulationConfig, events, simulate

IOT = load_use_case('iot')
SIMULATION = SimulationConfig(machines=6, days=4, seed=1)  # a failure among them


@pytest.fixture(scope='module')
def fleet(tmp_path_factory):
  """A small fleet and its readings and labels as Parquet files, as a user exports them: times as UTC timestamps."""
  simulation = simulate(SIMULATION)
  readings = simulation.readings.assign(
      reading_time=pd.Timestamp(SIMULATION.start) + pd.to_timedelta(simulation.readings['reading_time_seconds'],
                                                                    unit='s'))
  folder = tmp_path_factory.mktemp('fleet')
  paths = (str(folder / 'readings.parquet'), str(folder / 'labels.parquet'))
  readings[['reading_id', 'reading_time', 'machine_id', 'machine_type', *SENSORS]].to_parquet(paths[0])
  readings[['reading_id', 'reading_time', 'machine_id', 'fails_within_horizon', 'failure_mode']].to_parquet(paths[1])
  return simulation, paths


def test_files_of_a_fleet_give_the_simulators_own_records_in_its_order(fleet):
  simulation, paths = fleet
  readings, labels = (produce.read_table(path) for path in paths)
  assert list(produce.events_of(readings, labels, use_case=IOT)) == list(events(simulation))


def test_kbml_produce_round_trips_a_fleets_files_through_ingest(fleet, bootstrap, new_topic, tmp_path):
  simulation, paths = fleet
  rows = assert_produce_round_trips(bootstrap, new_topic, tmp_path, events(simulation),
                                    ['--events', paths[0], '--labels', paths[1]], len(simulation.readings), IOT)
  assert rows['labels']['fails_within_horizon'].sum() > 0
