"""The fraud use case's figures for fixed seeds, recorded before the engine was made to serve other use cases.

The simulation of the ``warehouse`` fixture (seed 3), produced to the broker
and ingested, gives these feature rows, and a model trained on them with seed
0 these test metrics (to 3 decimals). A change to the engine that leaves the
fraud case as it was keeps them; one that changes a feature, the split or a
metric fails here, even when every other test still holds.
"""

import hashlib

from kbml.warehouse import open_warehouse
from trainer import task
from use_cases.fraud.features import FEATURE_NAMES, FEATURES_TABLE

FEATURE_ROWS = 'e862154b16666ad8fc7647cafd386a38317b7a5fe0bb1cb0f44d458c8387ec2c'
# The test week 2018-05-13..2018-05-19 of a 5-day training range (tests/test_trainer.py's).
# Recorded on 2026-12-03 (main at e298f45), the same in three runs.
TEST_METRICS = {'auc_roc': 0.749, 'average_precision': 0.564, 'card_precision_at_100': 0.081, 'threshold': 0.634,
                'precision_at_threshold': 0.94, 'recall_at_threshold': 0.429, 'transactions': 4570, 'frauds': 182}
BASELINE_TEST_METRICS = {'auc_roc': 0.763, 'average_precision': 0.49, 'card_precision_at_100': 0.079,
                         'threshold': 0.229, 'precision_at_threshold': 0.645, 'recall_at_threshold': 0.489,
                         'transactions': 4570, 'frauds': 182}
DECIMALS = 3


def feature_rows_digest(warehouse_url: str) -> str:
  """The SHA-256 of the features table's rows in transaction order: ids, time, amount and every feature (floats
  to 9 decimals; the Kafka partitions and offsets left out, they depend on the topic)."""
  columns = [name for name, _ in FEATURES_TABLE.columns if not name.startswith('kafka_')]
  warehouse = open_warehouse(warehouse_url)
  rows = warehouse.query(f'SELECT {", ".join(columns)} FROM {warehouse.table_ref("features")} '
                         'ORDER BY transaction_id')
  rows['tx_datetime'] = rows['tx_datetime'].dt.strftime('%Y-%m-%dT%H:%M:%S')
  rows['amount'] = rows['amount'].astype(str)
  for name in FEATURE_NAMES:
    rows[name] = rows[name].astype(float).round(9)
  return hashlib.sha256(rows.to_json(orient='values', double_precision=9).encode()).hexdigest()


def test_the_feature_rows_of_the_seeded_simulation_are_those_recorded(warehouse):
  assert feature_rows_digest(warehouse) == FEATURE_ROWS


def rounded(metrics):
  """The figures of a metrics dict to DECIMALS (the per-day lists left out)."""
  return {name: round(value, DECIMALS) for name, value in metrics.items() if isinstance(value, (int, float))}


def test_the_test_metrics_of_a_seeded_training_are_those_recorded(warehouse, tmp_path):
  args = task.build_parser().parse_args(['--warehouse', warehouse, '--model-dir', str(tmp_path),
                                         '--train-start', '2018-04-29', '--train-end', '2018-05-05', '--seed', '0'])
  metadata = task.train(args).metadata
  assert rounded(metadata['metrics']) == TEST_METRICS
  assert rounded(metadata['baseline']['metrics']) == BASELINE_TEST_METRICS
