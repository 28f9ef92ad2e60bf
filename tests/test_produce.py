"""`kbml produce`: one's own files into the topics, the records the simulator gives for the same events."""

import subprocess
import sys
import uuid
from typing import Dict, List

import pandas as pd
import pytest

from kbml import produce, simulator
from kbml.warehouse import open_warehouse
from pipelines import ingest
from tests.pipeline_process import PROJECT_ROOT
from transforms.use_case import UseCase, load_use_case
from use_cases.fraud import simulator as fraud_simulator

SIMULATION = fraud_simulator.SimulationConfig(customers=100, terminals=200, days=15, seed=4)


@pytest.fixture(scope='module')
def simulated(tmp_path_factory):
  """A small simulation and its files: JSON Lines as `kbml simulate --output-dir` writes them, CSV and Parquet."""
  simulation = fraud_simulator.simulate(SIMULATION)
  folder = tmp_path_factory.mktemp('files')
  transactions_file, labels_file = fraud_simulator.write_files(simulation, str(folder))
  files = {'jsonl': (transactions_file, labels_file)}
  for extension in ('csv', 'parquet'):
    paths = (str(folder / f'transactions.{extension}'), str(folder / f'labels.{extension}'))
    for source, path in zip(files['jsonl'], paths, strict=True):
      frame = produce.read_table(source)
      frame.to_csv(path, index=False) if extension == 'csv' else frame.to_parquet(path)
    files[extension] = paths
  return simulation, files


@pytest.mark.parametrize('extension', ['jsonl', 'csv', 'parquet'])
def test_a_file_in_each_format_gives_the_simulators_own_records_in_its_order(simulated, extension):
  simulation, files = simulated
  transactions, labels = (produce.read_table(path) for path in files[extension])
  assert list(produce.events_of(transactions, labels, SIMULATION.label_delay_days)) == list(
      fraud_simulator.events(simulation))


def _ingested(bootstrap: str, topics, folder, use_case: UseCase):
  url = f"duckdb://{folder / f'{uuid.uuid4().hex[:8]}.duckdb'}"
  ingest.run(['--use-case', use_case.name, '--bootstrap-servers', bootstrap, '--events-topic', topics['events'],
              '--labels-topic', topics['labels'], '--dead-letter-topic', topics['dead-letter'], '--warehouse', url,
              '--stop-at-end', '--consumer-group', f'produce-{uuid.uuid4().hex[:8]}'])
  warehouse = open_warehouse(url)
  return {table: warehouse.query(f'SELECT * FROM {table}').drop(columns=['kafka_partition', 'kafka_offset'],
                                                                 errors='ignore')
          .sort_values(use_case.id_column).reset_index(drop=True) for table in ('features', 'labels')}


def assert_produce_round_trips(bootstrap: str, new_topic, folder, simulated_events, produce_args: List[str],
                               count: int, use_case: UseCase) -> Dict[str, pd.DataFrame]:
  """Produces the same events by a simulator and by ``kbml produce --use-case NAME PRODUCE_ARGS``, ingests each
  into a warehouse of its own, and checks that they give the same rows; returns the tables of the file's."""
  by_simulator, by_file = ({name: new_topic(suffix=f'-{name}') for name in ('events', 'labels', 'dead-letter')}
                           for _ in range(2))
  simulator.produce(simulated_events, {'bootstrap.servers': bootstrap}, by_simulator['events'],
                    by_simulator['labels'])
  produced = subprocess.run(
      [sys.executable, '-m', 'kbml.cli', 'produce', '--use-case', use_case.name, *produce_args, '--bootstrap-servers',
       bootstrap, '--events-topic', by_file['events'], '--labels-topic', by_file['labels']],
      capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
  assert produced.returncode == 0, produced.stderr
  assert (f'produced {count:,} {use_case.event_noun} to {by_file["events"]!r} and {count:,} labels'
          in produced.stdout)
  expected, got = (_ingested(bootstrap, topics, folder, use_case) for topics in (by_simulator, by_file))
  assert len(got['features']) == count
  for table in ('features', 'labels'):
    pd.testing.assert_frame_equal(got[table], expected[table])
  return got


def test_kbml_produce_round_trips_a_csv_file_through_ingest(simulated, bootstrap, new_topic, tmp_path):
  simulation, files = simulated
  # The flag of before the use-case API, --transactions, is kept as an alias of --events.
  assert_produce_round_trips(bootstrap, new_topic, tmp_path, fraud_simulator.events(simulation),
                             ['--transactions', files['csv'][0], '--labels', files['csv'][1]],
                             len(simulation.transactions), load_use_case('fraud'))


def test_a_file_without_a_column_the_topic_needs_is_refused_with_what_to_add(tmp_path):
  path = tmp_path / 'transactions.csv'
  pd.DataFrame({'transaction_id': [1], 'tx_datetime': ['2018-04-01T00:00:00Z'], 'customer_id': [1],
                'terminal_id': [2]}).to_csv(path, index=False)
  produced = subprocess.run([sys.executable, '-m', 'kbml.cli', 'produce', '--transactions', str(path),
                             '--bootstrap-servers', '127.0.0.1:9'], capture_output=True, text=True, timeout=60,
                            cwd=PROJECT_ROOT)
  assert produced.returncode == 2
  assert 'The transactions have no column amount' in produced.stderr
