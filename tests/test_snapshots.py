"""Snapshots of the feature histories: a restarted scorer reads on from its snapshot, with the same features."""

import json
import os
import re
import time

import numpy as np
import pandas as pd

from kbml import simulator
from pipelines.events import snapshot_start_offsets
from tests.conftest import produce
from tests.pipeline_process import PipelineProcess
from tests.scoring_models import publish_model
from tests.test_features import independent_features
from tests.test_scoring import TopicReader
from transforms.snapshots import StateSnapshots
from use_cases.fraud import simulator as fraud_simulator
from use_cases.fraud.features import FEATURE_NAMES, Histories, snapshot_identity
from use_cases.fraud.simulator import SimulationConfig, simulate

TOPICS = ('transactions', 'labels', 'predictions', 'dead-letter', 'alerts')


def _scorer(bootstrap, topics, model_dir, group, tmp_path) -> PipelineProcess:
  return PipelineProcess('pipelines.scoring', [
      '--bootstrap_servers', bootstrap, '--model_dir', model_dir, '--consumer_group', group, '--score_from',
      'earliest', '--state_snapshot_interval_s', '1', '--state_snapshot', str(tmp_path / 'scorer.features'),
      *[f'--{name.replace("-", "_")}_topic={topic}' for name, topic in topics.items()]], str(tmp_path / 'scorer.log'))


def _id(event) -> int:
  return json.loads(event.value)['transaction_id']


def test_a_killed_scorer_resumes_from_its_snapshot_and_computes_the_same_features(bootstrap, new_topic, group_id,
                                                                                   tmp_path):
  topics = {name: new_topic(suffix=f'-{name}') for name in TOPICS}
  simulation = simulate(SimulationConfig(customers=200, terminals=400, days=20, seed=12))
  events = list(fraud_simulator.events(simulation))
  split_ms = int(simulation.config.start.timestamp() * 1000) + 12 * 86_400_000
  before, after = [e for e in events if e.timestamp_ms < split_ms], [e for e in events if e.timestamp_ms >= split_ms]
  config = {'bootstrap.servers': bootstrap}
  model_dir = str(tmp_path / 'models')
  publish_model(model_dir, seed=1)
  snapshots = StateSnapshots(str(tmp_path / 'scorer.features'), snapshot_identity(7, topics['transactions'],
                                                                                 topics['labels']))
  scorer = _scorer(bootstrap, topics, model_dir, group_id, tmp_path)
  predictions = TopicReader(bootstrap, topics['predictions'])

  simulator.produce(before, config, topics['transactions'], topics['labels'])
  scorer.start()
  try:
    ids_before = {_id(e) for e in before if not e.is_label}
    assert predictions.read_until(lambda records: ids_before <= {r['transaction_id'] for r in records}, 180), \
        scorer.log_tail()
    produced = sum(1 for e in before if not e.is_label)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a snapshot of every transaction read so far
      header = snapshots.header()
      if header and sum(offset for (kind, _), offset in header.offsets.items() if kind == 'Transaction') == produced:
        break
      time.sleep(0.5)
    else:
      raise AssertionError(f'no snapshot of the first {produced:,} transactions:\n{scorer.log_tail()}')
    scorer.kill()
    simulator.produce(after, config, topics['transactions'], topics['labels'])
    scorer.start()
    every_id = ids_before | {_id(e) for e in after if not e.is_label}
    assert predictions.read_until(lambda records: every_id <= {r['transaction_id'] for r in records}, 180), \
        scorer.log_tail()
  finally:
    if scorer.running():
      scorer.kill()

  log = open(tmp_path / 'scorer.log').read()
  assert 'resuming the feature histories from the snapshot' in log
  restart_reads = log[log.rindex('resuming the feature histories'):]
  assert not re.search(rf'reading {re.escape(topics["transactions"])}\[\d\] from offset 0 ', restart_reads), \
      'the restart reads on from the snapshot, not from the beginning of the topic'
  expected = independent_features(simulation.transactions)
  actual = pd.DataFrame([{'transaction_id': r['transaction_id'], **r['features']} for r in predictions.records])
  actual = actual.drop_duplicates('transaction_id').set_index('transaction_id').sort_index()
  assert list(actual.index) == list(expected.index)
  for name in FEATURE_NAMES:
    np.testing.assert_allclose(actual[name].astype(float), expected[name].astype(float), rtol=1e-9, atol=1e-9,
                               err_msg=name)


def test_a_snapshot_of_other_settings_or_recreated_topics_is_not_resumed(bootstrap, new_topic, tmp_path):
  transactions, labels = new_topic(), new_topic()
  path = str(tmp_path / 'features')
  StateSnapshots(path, snapshot_identity(7, transactions, labels)).save({('Transaction', 0): 5}, Histories())

  assert StateSnapshots(path, snapshot_identity(3, transactions, labels)).load() is None  # another label delay
  assert os.path.exists(path)
  # The topics are empty: a snapshot at offset 5 is of topics that were deleted since.
  assert snapshot_start_offsets(StateSnapshots(path, snapshot_identity(7, transactions, labels)),
                                {'bootstrap.servers': bootstrap}, 'transaction_id') == {}
  assert not os.path.exists(path) and os.path.exists(f'{path}.stale')


def test_a_snapshot_of_topics_created_again_with_as_many_records_is_not_resumed(bootstrap, new_topic, tmp_path):
  transactions, labels = new_topic(partitions=1), new_topic(partitions=1)
  record = b'{"transaction_id": %d, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 1, "terminal_id": 1, ' \
           b'"amount": 1.5}'
  produce(bootstrap, transactions, [(b'1', record % i, []) for i in range(10)])
  path = str(tmp_path / 'features')
  snapshots = StateSnapshots(path, snapshot_identity(7, transactions, labels))
  config = {'bootstrap.servers': bootstrap}

  snapshots.save({('Transaction', 0): 5}, Histories(), {('Transaction', 0): 4})  # applied up to transaction 4
  assert snapshot_start_offsets(snapshots, config, 'transaction_id') == {(transactions, 0): 5}
  snapshots.save({('Transaction', 0): 5}, Histories(), {('Transaction', 0): 104})  # of records not there now
  assert snapshot_start_offsets(snapshots, config, 'transaction_id') == {} and os.path.exists(f'{path}.stale')
