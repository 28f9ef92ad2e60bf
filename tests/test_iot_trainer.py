"""The trainer on the IoT use case: its rows, its split (failed machines stay in the test days), its metrics."""

import datetime
import uuid

import numpy as np
import pandas as pd
import pytest

from kbml import cli, status
from kbml import simulator as engine_simulator
from kbml.warehouse import open_warehouse
from pipelines import ingest
from trainer import data, evaluate, retrain, task
from trainer.registry import ModelStore
from transforms.use_case import load_use_case
from use_cases.iot.simulator import SimulationConfig, events, simulate

IOT = load_use_case('iot')
SIMULATION = SimulationConfig(machines=30, days=30, seed=4)


@pytest.fixture(scope='module')
def iot_warehouse(bootstrap, tmp_path_factory) -> str:
  """A warehouse that ingest filled with a fleet's readings produced to the broker; returns its URL."""
  topics = {name: f'iot-{name}-{uuid.uuid4().hex[:8]}' for name in ('readings', 'labels', 'dead-letter')}
  engine_simulator.produce(events(simulate(SIMULATION)), {'bootstrap.servers': bootstrap}, topics['readings'],
                           topics['labels'])
  url = f"duckdb://{tmp_path_factory.mktemp('iot')}/warehouse.duckdb"
  ingest.run(['--use-case', 'iot', '--bootstrap-servers', bootstrap, '--events-topic', topics['readings'],
              '--labels-topic', topics['labels'], '--dead-letter-topic', topics['dead-letter'], '--warehouse', url,
              '--stop-at-end', '--consumer-group', f'iot-{uuid.uuid4().hex[:8]}'])
  return url


def test_the_split_keeps_machines_that_failed_before_in_the_test_days(iot_warehouse):
  first, last = datetime.date(2025, 1, 2), datetime.date(2025, 1, 16)
  rows = data.read_labelled_rows(open_warehouse(iot_warehouse), first, last, IOT.feature_names, IOT)
  split = evaluate.split(rows, evaluate.Protocol(first, delay_days=1), IOT)
  test_days = rows['reading_time'].dt.floor('D').dt.date.between(datetime.date(2025, 1, 10), last)
  assert len(split.test) == test_days.sum() > 0
  failed_before = set(rows.loc[(rows['fails_within_horizon'] == 1) & ~test_days, 'machine_id'])
  assert failed_before & set(split.test['machine_id'])


def test_a_machine_found_failing_is_ranked_again_the_next_day():
  test = pd.DataFrame({'machine_id': [1, 2, 3, 1, 2, 3], evaluate.TEST_DAY_COLUMN: [0, 0, 0, 1, 1, 1],
                       'fails_within_horizon': [1, 0, 0, 1, 0, 0]})
  scores = np.array([0.9, 0.5, 0.1, 0.9, 0.5, 0.1])
  # Machine 1 fails on both days (repaired in between): top 1 holds it each day; a card would have left.
  assert evaluate.precision_at_k(test, scores, IOT, k=1) == (1.0, [1.0, 1.0])


def test_a_model_of_the_iot_use_case_is_trained_evaluated_and_published_with_its_metrics(iot_warehouse, tmp_path):
  args = task.build_parser().parse_args(['--use-case', 'iot', '--warehouse', iot_warehouse, '--model-dir',
                                         str(tmp_path), '--train-start', '2025-01-02', '--train-end', '2025-01-21',
                                         '--model-family', 'trees'])
  result = task.train(args)

  metadata = ModelStore(str(tmp_path)).metadata(result.version)
  assert metadata['use_case'] == 'iot' and metadata['features'] == list(IOT.feature_names)
  assert metadata['training']['delay_days'] == '1' and metadata['training']['test'] == '2025-01-23..2025-01-29'
  metrics = metadata['metrics']
  assert metrics['readings'] > 10_000 and metrics['failures'] > 100
  assert len(metrics['machine_precision_at_5_per_day']) == 7
  # The precursors make failures foreseeable, for the trees and the linear baseline alike.
  for figures in (metrics, metadata['baseline']['metrics']):
    assert figures['auc_roc'] > 0.95 and figures['average_precision'] > 0.8
  # Near the best any ranking reaches on these days: the one by the labels themselves.
  rows = data.read_labelled_rows(open_warehouse(iot_warehouse), datetime.date(2025, 1, 2), datetime.date(2025, 1, 29),
                                 IOT.feature_names, IOT)
  test = evaluate.split(rows, evaluate.Protocol(datetime.date(2025, 1, 2), train_days=20, delay_days=1), IOT).test
  best, _ = evaluate.precision_at_k(test, data.labels(test, IOT).astype(float), IOT)
  assert 0.75 * best <= metrics['machine_precision_at_5'] <= best
  summary = task.summary(result, str(tmp_path))
  assert 'readings' in summary and 'failures' in summary and 'MP@5' in summary and 'known positive' not in summary


def test_a_retrain_of_the_iot_use_case_trains_on_its_newest_labelled_days_and_promotes(iot_warehouse, tmp_path,
                                                                                      capsys):
  # Days long enough to hold failures of a fleet of 30 machines: a few a week.
  assert retrain.run(['--use-case', 'iot', '--warehouse', iot_warehouse, '--model-dir', str(tmp_path),
                      '--model-family', 'trees', '--validation-days', '6', '--test-days', '6']) == 0

  store = ModelStore(str(tmp_path))
  (version,) = store.versions()
  metadata = store.metadata(version)
  assert store.current() == version and store.use_case_in_service() == 'iot'
  assert metadata['retrain']['trigger'] == 'manual' and metadata['blessing']['reason'] == 'no champion yet'
  newest_labelled = data.last_labelled_day(open_warehouse(iot_warehouse), IOT)
  assert metadata['training']['test'].endswith(newest_labelled.isoformat())
  assert 'MP@5' in capsys.readouterr().out
  in_service = status.model_status(str(tmp_path))['current']
  assert in_service['use_case'] == 'iot' and in_service['ranking']['abbreviation'] == 'MP@5'
  assert in_service['machine_precision_at_5'] == metadata['metrics']['machine_precision_at_5'] is not None


def test_the_warehouse_summary_counts_the_readings_and_the_failures(iot_warehouse, capsys):
  assert cli.main(['warehouse', 'summary', '--use-case', 'iot', '--warehouse', iot_warehouse]) == 0
  counts = open_warehouse(iot_warehouse).query('SELECT (SELECT COUNT(*) FROM features) AS events, '
                                               '(SELECT SUM(fails_within_horizon) FROM labels) AS positives').iloc[0]
  out = capsys.readouterr().out
  assert f"{counts['events']:,} readings with features" in out and f"{int(counts['positives']):,} failures (" in out
