"""The scoring pipeline against the real broker, real Keras models and a real model store.

The live tests run ``python -m pipelines.scoring`` in its own process, as a
user does, while simulated traffic is produced: a model swap, a SIGKILL and a
restart, a corrupt model and bad records must leave no transaction unscored.
"""

import datetime
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable, Dict, List

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from confluent_kafka import TopicPartition

from kbml import simulator
from kbml.kafka_client import Partition, committed_offsets, fetched_end_offset, list_partitions, new_consumer
from kbml.warehouse import open_warehouse
from pipelines import ingest, scoring
from pipelines.options import pipeline_options
from tests.conftest import local_options, produce
from tests.pipeline_process import PROJECT_ROOT, PipelineProcess
from tests.scoring_models import publish_keras, publish_model
from tests.test_dataflow_graph import DATAFLOW_DRY_RUN
from trainer import data, model, trees
from trainer.model import DEFAULT_ENSEMBLE, DEFAULT_HIDDEN_UNITS, average, build_model
from trainer.registry import ModelStore
from transforms.batches import Batch
from transforms.records import REASON_HEADER, parse_utc_timestamp
from transforms.use_case import load_use_case
from use_cases.fraud import simulator as fraud_simulator
from use_cases.fraud.features import FEATURE_NAMES
from use_cases.fraud.simulator import SimulationConfig, simulate

FRAUD = load_use_case('fraud')
TOPICS = ('transactions', 'labels', 'predictions', 'dead-letter', 'alerts')
LIVE_RATE = 800  # events/s


class Scorer(PipelineProcess):
  """``python -m pipelines.scoring`` on the given topics and model store, polling the store every 0.5 s."""

  def __init__(self, bootstrap: str, topics: Dict[str, str], model_dir: str, group: str, log_path: str):
    super().__init__('pipelines.scoring', [
        '--bootstrap_servers', bootstrap, '--model_dir', model_dir, '--consumer_group', group, '--model_poll_s',
        '0.5', *[f'--{name.replace("-", "_")}_topic={topic}' for name, topic in topics.items()]], log_path)


class TopicReader:
  """Reads a topic from its start; keeps each record's JSON value decoded, or the raw messages."""

  def __init__(self, bootstrap: str, topic: str, decode: bool = True):
    self._consumer = new_consumer({'bootstrap.servers': bootstrap})
    self._consumer.assign([TopicPartition(t, p, 0) for t, p in list_partitions(self._consumer, [topic])])
    self._decode = decode
    self.records: List = []

  def read_until(self, done, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done(self.records) and time.monotonic() < deadline:
      for message in self._consumer.consume(1000, 0.2):
        if not message.error():
          self.records.append(json.loads(message.value()) if self._decode else message)
    return done(self.records)


@pytest.fixture
def stream(bootstrap, new_topic, group_id, tmp_path):
  """Topics, a model store with a promoted model, a simulation split into history (produced) and live events."""
  topics = {name: new_topic(suffix=f'-{name}') for name in TOPICS}
  simulation = simulate(SimulationConfig(customers=300, terminals=600, days=20, seed=11))
  events = list(fraud_simulator.events(simulation))
  split_ms = int(simulation.config.start.timestamp() * 1000) + 12 * 86_400_000
  history = [e for e in events if e.timestamp_ms < split_ms]
  simulator.produce(history, {'bootstrap.servers': bootstrap}, topics['transactions'], topics['labels'])
  _commit_end_offsets(bootstrap, group_id, topics['transactions'])  # score what comes after the history
  model_dir = str(tmp_path / 'models')
  first_version = publish_model(model_dir, seed=1)
  scorer = Scorer(bootstrap, topics, model_dir, group_id, str(tmp_path / 'scorer.log'))
  live = [e for e in events if e.timestamp_ms >= split_ms]
  yield {'topics': topics, 'model_dir': model_dir, 'version': first_version, 'scorer': scorer, 'live': live,
         'bootstrap': bootstrap, 'group': group_id}
  if scorer.running():
    scorer.kill()


def _commit_end_offsets(bootstrap: str, group: str, topic: str):
  consumer = new_consumer({'bootstrap.servers': bootstrap, 'group.id': group})
  ends = [TopicPartition(t, p, fetched_end_offset(consumer, t, p, 0)) for t, p in list_partitions(consumer, [topic])]
  consumer.commit(offsets=ends, asynchronous=False)
  consumer.close()


def _committed_offsets(bootstrap: str, group: str, topic: str) -> Dict[Partition, int]:
  consumer = new_consumer({'bootstrap.servers': bootstrap, 'group.id': group})
  try:
    return committed_offsets(consumer, list_partitions(consumer, [topic]))
  finally:
    consumer.close()


def _end_offsets(bootstrap: str, topic: str) -> Dict[Partition, int]:
  consumer = new_consumer({'bootstrap.servers': bootstrap})
  try:
    return {(t, p): fetched_end_offset(consumer, t, p, 0) for t, p in list_partitions(consumer, [topic])}
  finally:
    consumer.close()


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
  deadline = time.monotonic() + timeout_s
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.2)
  return condition()


def _transaction_ids(events) -> set:
  return {json.loads(e.value)['transaction_id'] for e in events if not e.is_label}


def _start_scoring(stream) -> TopicReader:
  """Starts the scorer and produces the first live events; returns once their first prediction arrived."""
  stream['scorer'].start()
  simulator.produce(stream['live'][:200], {'bootstrap.servers': stream['bootstrap']},
                    stream['topics']['transactions'], stream['topics']['labels'])
  predictions = TopicReader(stream['bootstrap'], stream['topics']['predictions'])
  assert predictions.read_until(len, 120), f'no prediction within 120 s:\n{stream["scorer"].log_tail()}'
  return predictions


def _produce_in_background(stream, events) -> threading.Thread:
  thread = threading.Thread(target=simulator.produce, args=(
      events, {'bootstrap.servers': stream['bootstrap']}, stream['topics']['transactions'],
      stream['topics']['labels'], LIVE_RATE))
  thread.start()
  return thread


def _all_scored(ids):
  return lambda records: ids <= {r['transaction_id'] for r in records}


def test_a_promoted_model_scores_within_5_seconds_and_no_transaction_is_missed(stream):
  # From networks to the ensemble family (networks and gradient-boosted trees), as a retrain can promote.
  predictions = _start_scoring(stream)
  producing = _produce_in_background(stream, stream['live'][200:])
  time.sleep(3)
  second_version = publish_model(stream['model_dir'], seed=2, promote=False, with_trees=True)
  promotion = ModelStore(stream['model_dir']).promote(second_version)
  producing.join()
  live_ids = _transaction_ids(stream['live'])
  predictions.read_until(_all_scored(live_ids), 60)

  scored = {r['transaction_id'] for r in predictions.records}
  print(f'{len(live_ids - scored)} of {len(live_ids):,} live transactions missing')
  assert not live_ids - scored
  by_new_model = [r for r in predictions.records if r['model_version'] == second_version]
  assert by_new_model, 'the promoted version never scored'
  swap_s = min(parse_utc_timestamp(r['scored_at']) for r in by_new_model) - promotion.promoted_at
  print(f'first prediction by the promoted version {swap_s:.2f} s after the promotion')
  assert swap_s <= 5
  late_by_old_model = [r for r in predictions.records if r['model_version'] == stream['version']
                       and parse_utc_timestamp(r['scored_at']) > promotion.promoted_at + 5]
  assert not late_by_old_model
  assert all(0 <= r['score'] <= 1 and r['flagged'] == (r['score'] >= r['threshold']) for r in predictions.records)


def test_the_scorer_gives_trees_and_an_ensemble_the_scores_of_offline_evaluation(stream, tmp_path):
  # Boosted trees in service and the default ensemble (networks, boosted trees, a forest) in its shadow, fitted on
  # the warehouse's rows of the same events: every live transaction's two scores must be the ones the trainer's
  # evaluation computes from its feature row.
  bootstrap, topics = stream['bootstrap'], stream['topics']
  simulator.produce(stream['live'], {'bootstrap.servers': bootstrap}, topics['transactions'], topics['labels'])
  warehouse = f"duckdb://{tmp_path / 'warehouse.duckdb'}"
  ingest.run(['--bootstrap_servers', bootstrap, '--transactions_topic', topics['transactions'], '--labels_topic',
              topics['labels'], '--dead_letter_topic', topics['dead-letter'], '--warehouse', warehouse,
              '--stop_at_end', '--consumer_group', f'offline-{uuid.uuid4().hex[:8]}'])
  rows = data.read_labelled_rows(open_warehouse(warehouse), datetime.date(2018, 4, 1), datetime.date(2018, 4, 20),
                                 FEATURE_NAMES, FRAUD)
  features, labels = data.feature_matrix(rows, FEATURE_NAMES), data.labels(rows, FRAUD)
  boosted = trees.boosted_to_keras(trees.fit(features, labels, features, labels,
                                             {**trees.DEFAULT_TREE_PARAMS, 'n_estimators': 40}), features)
  forest = trees.forest_to_keras(trees.fit_forest(features, labels, trees=20, depth=8), features)
  champion = publish_keras(stream['model_dir'], boosted)
  challenger = publish_keras(stream['model_dir'], average([build_model(features, (8,)), boosted, forest]),
                             promote=False)
  store = ModelStore(stream['model_dir'])
  store.set_challenger(challenger)

  stream['scorer'].start()
  live_ids = _transaction_ids(stream['live'])
  predictions = TopicReader(bootstrap, topics['predictions'])
  assert predictions.read_until(_all_scored(live_ids), 180), stream['scorer'].log_tail()
  scored = {r['transaction_id']: r for r in predictions.records if r['transaction_id'] in live_ids}
  assert {r['model_version'] for r in scored.values()} == {champion}
  assert {r['challenger_version'] for r in scored.values()} == {challenger}
  every_row = open_warehouse(warehouse).query('SELECT * FROM features')
  offline = every_row.drop_duplicates('transaction_id').set_index('transaction_id').loc[sorted(scored)]
  offline_features = data.feature_matrix(offline, FEATURE_NAMES)
  for version, field in ((champion, 'score'), (challenger, 'challenger_score')):
    expected = model.predict(store.load_model(version), offline_features)
    served = np.array([scored[transaction_id][field] for transaction_id in offline.index])
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    assert len(np.unique(expected)) > 50, 'the models must rank the transactions, not give a few values'


def test_a_killed_scorer_restarts_without_losing_a_transaction(stream):
  bootstrap, group, transactions = stream['bootstrap'], stream['group'], stream['topics']['transactions']
  history_ends = _committed_offsets(bootstrap, group, transactions)  # committed by the fixture
  predictions = _start_scoring(stream)
  producing = _produce_in_background(stream, stream['live'][200:])
  # Kill only once the scorer has committed progress on every partition: the restart must then resume from its own
  # commits. A scorer that never commits would rescore from the history's end and lose nothing: it fails here.
  # And only while transactions wait to be scored: the kill lands mid-stream.
  committed = {}

  def committed_past_history_and_behind() -> bool:
    committed.update(_committed_offsets(bootstrap, group, transactions))
    scored = sum(_end_offsets(bootstrap, stream['topics']['predictions']).values())
    produced = sum(_end_offsets(bootstrap, transactions).values()) - sum(history_ends.values())
    return all(committed[partition] > end for partition, end in history_ends.items()) and produced > scored

  assert _wait_until(committed_past_history_and_behind, 60), \
      f'offsets committed {committed}, at the start {history_ends}'
  assert producing.is_alive(), 'the live traffic was all produced before the kill: it did not land mid-stream'
  stream['scorer'].kill()
  live_at_kill = sum(_end_offsets(bootstrap, transactions).values()) - sum(history_ends.values())
  # The scorer is dead: the predictions topic holds all it wrote.
  written = sum(_end_offsets(bootstrap, stream['topics']['predictions']).values())
  assert predictions.read_until(lambda records: len(records) >= written, 30)
  scored_before_kill = len({r['transaction_id'] for r in predictions.records})
  assert scored_before_kill < live_at_kill, 'the scorer had caught up at the kill: no transaction was in flight'
  stream['scorer'].start()
  producing.join()
  live_ids = _transaction_ids(stream['live'])
  predictions.read_until(_all_scored(live_ids), 180)

  scored = [r['transaction_id'] for r in predictions.records]
  missing = live_ids - set(scored)
  duplicates = len(scored) - len(set(scored))
  print(f'killed with {sum(committed.values()) - sum(history_ends.values()):,} live transactions committed, '
        f'{scored_before_kill:,} scored and {live_at_kill:,} produced; {len(live_ids):,} live transactions: '
        f'{len(missing)} missing, {duplicates} duplicate predictions')
  assert not missing, stream['scorer'].log_tail()
  assert set(scored) <= live_ids, 'only transactions that arrived after the scorer first started are scored'


def test_a_corrupt_promoted_model_is_refused_and_bad_records_go_to_the_dead_letters(stream):
  predictions = _start_scoring(stream)
  store = ModelStore(stream['model_dir'])
  corrupt_version = publish_model(stream['model_dir'], seed=3, promote=False)
  with open(store.model_path(corrupt_version), 'r+b') as f:
    f.truncate(os.path.getsize(store.model_path(corrupt_version)) // 2)
  store.promote(corrupt_version)
  bad_records = [b'not json', b'{"transaction_id": 1}',
                 b'{"transaction_id": 2, "tx_datetime": "2018-04-20T00:00:00Z", "customer_id": 1, '
                 b'"terminal_id": 1, "amount": 1e400}']
  produce(stream['bootstrap'], stream['topics']['transactions'], [(None, value, ()) for value in bad_records])
  producing = _produce_in_background(stream, stream['live'][200:1200])
  producing.join()
  live_ids = _transaction_ids(stream['live'][:1200])
  predictions.read_until(_all_scored(live_ids), 60)

  assert live_ids <= {r['transaction_id'] for r in predictions.records}
  assert {r['model_version'] for r in predictions.records} == {stream['version']}
  alerts = TopicReader(stream['bootstrap'], stream['topics']['alerts'])
  assert alerts.read_until(len, 30), 'no alert'
  (alert,) = alerts.records
  assert alert['kind'] == 'model_refused' and alert['version'] == corrupt_version
  assert alert['version_in_service'] == stream['version'] and 'truncated or corrupt' in alert['reason']
  dead = TopicReader(stream['bootstrap'], stream['topics']['dead-letter'], decode=False)
  dead.read_until(lambda letters: len(letters) >= len(bad_records), 30)
  assert sorted(m.value() for m in dead.records) == sorted(bad_records)
  reasons = [dict(m.headers())[REASON_HEADER].decode() for m in dead.records]
  assert any('must be at most' in reason for reason in reasons), reasons


def test_a_backtest_scores_each_transaction_with_the_version_in_service_at_its_time(bootstrap, new_topic, tmp_path):
  topics = {name: new_topic(suffix=f'-{name}') for name in ('transactions', 'labels', 'predictions')}
  model_dir = str(tmp_path / 'models')

  def transactions_now(first_id: int, count: int):
    time.sleep(1.1)  # event times have whole seconds: keep them clear of the promotions
    now = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
    produce(bootstrap, topics['transactions'], [
        (b'%d' % i, b'{"transaction_id": %d, "tx_datetime": "%s", "customer_id": %d, "terminal_id": %d, '
         b'"amount": 12.5}' % (i, now.encode(), i % 7, i % 5), ()) for i in range(first_id, first_id + count)])
    time.sleep(1.1)
    return time.time()

  before_any = transactions_now(0, 10)  # no model in service yet: not scored
  first_version = publish_model(model_dir, seed=1)
  transactions_now(100, 20)
  second_version = publish_model(model_dir, seed=2)
  end = transactions_now(200, 30)
  start = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(before_any - 30))
  argv = ['--bootstrap_servers', bootstrap, '--model_dir', model_dir, '--backtest_from', start,
          '--backtest_to', time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(end + 1)),
          *[f'--{name}_topic={topic}' for name, topic in topics.items()]]
  scoring.run(argv)

  predictions = TopicReader(bootstrap, topics['predictions'])
  predictions.read_until(lambda records: len(records) >= 50, 30)
  versions = {r['transaction_id']: r['model_version'] for r in predictions.records}
  assert len(predictions.records) == 50
  assert versions == {**dict.fromkeys(range(100, 120), first_version),
                      **dict.fromkeys(range(200, 230), second_version)}


def test_dataflow_job_feeds_run_inference_from_a_watch_file_pattern_side_input():
  options = pipeline_options(DATAFLOW_DRY_RUN + [
      '--streaming', '--bootstrap_servers=broker-1:9092', '--model_dir=gs://bkt/models', '--setup_file=./setup.py'])
  pipeline = beam.Pipeline(options=options)
  scoring.build_pipeline(pipeline, options, first_unscored={0: 0})
  components = pipeline.run().job.proto_pipeline.components
  transforms = {t.unique_name: t for t in components.transforms.values()}
  producers = {output: name for name, t in transforms.items() if not t.subtransforms for output in t.outputs.values()}

  inference = transforms['ScoreEvents/Score/BeamML_RunInference/ParDo(_RunInferenceDoFn)/ParDo(_RunInferenceDoFn)']
  payload = beam_runner_api_pb2.ParDoPayload.FromString(inference.spec.payload)
  (side_input,) = payload.side_inputs
  side_pcollection = inference.inputs[side_input]
  assert producers[side_pcollection].startswith('ScoreEvents/WatchPromotions/'), producers[side_pcollection]
  assert 'ScoreEvents/WatchPromotions/MatchContinuously/Watch/ParDo(_WatchGrowthDoFn)' in transforms
  source = transforms['ScoreEvents/ReadEvents/ReadEventsAndLabels/ReadPartitions']
  assert beam_runner_api_pb2.ParDoPayload.FromString(source.spec.payload).requests_finalization


@pytest.mark.parametrize('batched', [True, False])
def test_rows_to_score_are_the_unscored_ones_and_a_non_finite_row_leaves_alone(batched):
  def row(transaction_id, partition, offset, amount):
    return {'transaction_id': transaction_id, 'kafka_partition': partition, 'kafka_offset': offset,
            **dict.fromkeys(FEATURE_NAMES, 1.0), 'TX_AMOUNT': amount}
  rows = [row(1, 0, 9, 5.0), row(2, 0, 10, 5.0), row(3, 1, 0, float('nan')), row(4, 1, 1, 7.0)]
  with TestPipeline(options=local_options()) as p:
    to_score, non_finite = (p
                            | beam.Create([Batch(rows)] if batched else rows)
                            | beam.ParDo(scoring._RowsToScoreFn({0: 10}, FRAUD)).with_outputs(scoring.NON_FINITE,
                                                                                             main='rows'))
    ids = to_score | beam.Map(lambda r: [x['transaction_id'] for x in r] if batched else r['transaction_id'])
    assert_that(ids, equal_to([[2, 4]] if batched else [2, 4]), label='UnscoredFiniteRows')
    assert_that(non_finite | beam.MapTuple(lambda rows, error: ([r['transaction_id'] for r in rows],
                                                                'TX_AMOUNT=nan' in error)),
                equal_to([([3], True)]), label='NonFiniteAlone')


def test_scoring_refuses_to_start_without_a_model(bootstrap, tmp_path):
  with pytest.raises(ValueError, match='No model is in service'):
    scoring.run(['--bootstrap_servers', bootstrap, '--model_dir', str(tmp_path), '--transactions_topic',
                 f'none-{uuid.uuid4().hex[:6]}'])


def test_a_challenger_scores_every_row_in_the_shadow_of_the_champion(tmp_path):
  from transforms.inference import ModelStoreHandler
  model_dir = str(tmp_path / 'models')
  champion = publish_model(model_dir, seed=0)
  challenger = publish_model(model_dir, seed=5, promote=False)
  store = ModelStore(model_dir)
  store.set_challenger(challenger)
  rows = [{name: float(i + j) / 10 for j, name in enumerate(FEATURE_NAMES)} for i in range(5)]
  handler = ModelStoreHandler(model_dir, shadow_poll_s=0.0)
  model = handler.load_model()

  results = list(handler.run_inference(rows, model))
  assert {r.model_id for r in results} == {champion}
  assert {r.inference.challenger.version for r in results} == {challenger}
  features = np.array([[row[name] for name in FEATURE_NAMES] for row in rows], dtype=np.float32)
  expected = np.asarray(store.load_model(challenger).predict_on_batch(features)).reshape(-1)
  assert [r.inference.challenger.score for r in results] == pytest.approx(expected.tolist(), rel=1e-6)
  assert [r.inference.score for r in results] != [r.inference.challenger.score for r in results]

  store.set_challenger(None)
  assert all(r.inference.challenger is None for r in handler.run_inference(rows, model))


SCORE_BATCHES_OF_EVERY_SIZE = '''
import os
import sys
import numpy as np
from bench.common import resident_mb
from use_cases.fraud.features import FEATURE_NAMES
from transforms.inference import ModelStoreHandler
handler = ModelStoreHandler(sys.argv[1])
model = handler.load_model()
rows = [{name: float(i % 7 + j) / 10 for j, name in enumerate(FEATURE_NAMES)} for i in range(1000)]
for size in (1, 1000):
  list(handler.run_inference(rows[:size], model))
before = resident_mb(os.getpid())
for size in np.random.default_rng(0).permutation(np.arange(1, 1001)):
  list(handler.run_inference(rows[:size], model))
print(resident_mb(os.getpid()) - before)
'''


@pytest.mark.timeout(400)
def test_scoring_batches_of_every_size_keeps_the_memory_flat(tmp_path):
  # TensorFlow keeps what it prepares for each input shape: batches of 1 to 1,000 rows grew a scorer by ~160 MB.
  model_dir = str(tmp_path / 'models')
  publish_model(model_dir, hidden_units=DEFAULT_HIDDEN_UNITS, ensemble=DEFAULT_ENSEMBLE)
  growth = subprocess.run([sys.executable, '-c', SCORE_BATCHES_OF_EVERY_SIZE, model_dir], capture_output=True,
                          text=True, check=True, cwd=PROJECT_ROOT).stdout.split()[-1]
  assert float(growth) < 30, f'{growth} MB'
