"""`kbml produce --use-case iot`: a fleet's readings from files, the records and warehouse rows the simulator gives."""

import subprocess
import sys
import uuid

import pandas as pd
import pytest

from kbml import produce
from kbml import simulator as engine_simulator
from kbml.warehouse import open_warehouse
from pipelines import ingest
from tests.pipeline_process import PROJECT_ROOT
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


def _ingested(bootstrap: str, topics, folder):
  url = f"duckdb://{folder / f'{uuid.uuid4().hex[:8]}.duckdb'}"
  ingest.run(['--use-case', 'iot', '--bootstrap-servers', bootstrap, '--events-topic', topics['readings'],
              '--labels-topic', topics['labels'], '--dead-letter-topic', topics['dead-letter'], '--warehouse', url,
              '--stop-at-end', '--consumer-group', f'produce-{uuid.uuid4().hex[:8]}'])
  warehouse = open_warehouse(url)
  return {table: warehouse.query(f'SELECT * FROM {table}').drop(columns=['kafka_partition', 'kafka_offset'],
                                                                 errors='ignore')
          .sort_values('reading_id').reset_index(drop=True) for table in ('features', 'labels')}


def test_kbml_produce_round_trips_a_fleets_files_through_ingest(fleet, bootstrap, new_topic, tmp_path):
  simulation, paths = fleet
  by_simulator = {name: new_topic(suffix=f'-{name}') for name in ('readings', 'labels', 'dead-letter')}
  by_file = {name: new_topic(suffix=f'-{name}') for name in ('readings', 'labels', 'dead-letter')}
  engine_simulator.produce(events(simulation), {'bootstrap.servers': bootstrap}, by_simulator['readings'],
                           by_simulator['labels'])
  produced = subprocess.run(
      [sys.executable, '-m', 'kbml.cli', 'produce', '--use-case', 'iot', '--events', paths[0], '--labels', paths[1],
       '--bootstrap-servers', bootstrap, '--events-topic', by_file['readings'], '--labels-topic', by_file['labels']],
      capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
  assert produced.returncode == 0, produced.stderr
  count = len(simulation.readings)
  assert f'produced {count:,} readings to {by_file["readings"]!r} and {count:,} labels' in produced.stdout

  expected, got = _ingested(bootstrap, by_simulator, tmp_path), _ingested(bootstrap, by_file, tmp_path)
  assert len(got['features']) == count and got['labels']['fails_within_horizon'].sum() > 0
  for table in ('features', 'labels'):
    pd.testing.assert_frame_equal(got[table], expected[table])
