"""The monitoring pipeline on the real broker and warehouse: metrics, their sums across runs, and its alerts."""

import json
from typing import Sequence, Tuple

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from confluent_kafka import TopicPartition
from sklearn.metrics import average_precision_score, precision_score, recall_score

from kbml import cli
from kbml.alerts import DEAD_LETTER_RATE, DRIFT, PRECISION_BELOW_FLOOR, RECALL_BELOW_FLOOR, SCORER_LAG
from kbml.kafka_client import AcknowledgedProducer, fetched_end_offset, list_partitions, new_consumer
from kbml.warehouse import open_warehouse
from pipelines import monitoring
from tests.conftest import consume, local_options, produce
from tests.scoring_models import publish_model
from trainer.data import feature_statistics
from trainer.registry import ModelStore
from transforms.kafka_io import KafkaRecord
from transforms.metrics import SCORE_BINS, read_sums, score_bin, summaries
from transforms.monitoring import LABEL, PREDICTION, JoinLabelsFn, LabelJoin, Observation, parse_prediction
from transforms.records import DeadLetter, InvalidRecord, dead_letter_message
from transforms.use_case import load_use_case
from use_cases.fraud.features import FEATURE_NAMES

FRAUD = load_use_case('fraud')
DAY_MS = 86_400_000
START_MS = 1_700_006_400_000  # 2023-11-15T00:00:00Z, a day boundary
LABEL_DELAY_MS = 7 * DAY_MS


def _iso(ms: int) -> str:
  return pd.Timestamp(ms, unit='ms', tz='UTC').strftime('%Y-%m-%dT%H:%M:%SZ')


def _traffic(count: int, days: int, seed: int, drift_from_day=None, version='v1', challenger=None):
  """Predictions and labels of ``count`` transactions over ``days`` days: (time ms, topic kind, key, value).

  The champion's scores separate frauds with a lift of 0.4; a ``challenger`` (version, lift) with its own lift.
  """
  rng = np.random.default_rng(seed)
  times = np.sort(rng.integers(START_MS, START_MS + days * DAY_MS, count))
  is_fraud = rng.random(count) < 0.1
  base, lifts = rng.beta(1, 6, count), rng.random(count)
  scores = np.clip(base + 0.4 * is_fraud * lifts, 0, 1)
  records = []
  for i, (ms, fraud, score) in enumerate(zip(times.tolist(), is_fraud.tolist(), scores.tolist(), strict=True)):
    drifted = drift_from_day is not None and ms >= START_MS + drift_from_day * DAY_MS
    features = {name: float(rng.normal(3.0 if drifted else 0.0)) for name in FEATURE_NAMES}
    identity = {'transaction_id': i, 'tx_datetime': _iso(ms), 'customer_id': i % 50, 'terminal_id': i % 70}
    prediction = {**identity, 'score': score, 'flagged': score >= 0.5, 'threshold': 0.5, 'model_version': version,
                  'features': features, 'challenger_version': None, 'challenger_score': None,
                  'challenger_flagged': None}
    if challenger:
      shadow = float(np.clip(base[i] + challenger[1] * fraud * lifts[i], 0, 1))
      prediction.update(challenger_version=challenger[0], challenger_score=shadow, challenger_flagged=shadow >= 0.5)
    label = {**identity, 'is_fraud': int(fraud), 'fraud_scenario': int(fraud)}
    records.append((ms, 'predictions', i, json.dumps(prediction).encode()))
    records.append((ms + LABEL_DELAY_MS, 'labels', i, json.dumps(label).encode()))
  return sorted(records, key=lambda r: r[0])


def _scored_days(outcomes: Sequence[Tuple[int, int, int, int]], version: str):
  """Predictions and labels with a chosen confusion matrix per day: (time ms, topic kind, key, value).

  Args:
    outcomes: per day from START_MS, the numbers of frauds flagged, frauds missed, genuine transactions flagged
      and genuine ones passed, spread evenly over the day in that order.
    version: the model version of the predictions.
  """
  records, transaction_id = [], 0
  for day, counts in enumerate(outcomes):
    kinds = [kind for kind, count in zip(((1, True), (1, False), (0, True), (0, False)), counts, strict=True)
             for _ in range(count)]
    for position, (fraud, flagged) in enumerate(kinds):
      ms = START_MS + day * DAY_MS + position * (DAY_MS // len(kinds))
      identity = {'transaction_id': transaction_id, 'tx_datetime': _iso(ms), 'customer_id': transaction_id % 50,
                  'terminal_id': transaction_id % 70}
      score = 0.9 if flagged else 0.1
      prediction = {**identity, 'score': score, 'flagged': flagged, 'threshold': 0.5, 'model_version': version,
                    'challenger_version': None, 'challenger_score': None, 'challenger_flagged': None}
      label = {**identity, 'is_fraud': fraud, 'fraud_scenario': fraud}
      records.append((ms, 'predictions', transaction_id, json.dumps(prediction).encode()))
      records.append((ms + LABEL_DELAY_MS, 'labels', transaction_id, json.dumps(label).encode()))
      transaction_id += 1
  return sorted(records, key=lambda r: r[0])


def _alerts_now(bootstrap, topic):
  """Every alert on the topic, read up to the end offsets it has now (the monitor returns once Kafka has
  acknowledged its alerts)."""
  consumer = new_consumer({'bootstrap.servers': bootstrap})
  total = sum(fetched_end_offset(consumer, t, p, 0) for t, p in list_partitions(consumer, [topic]))
  consumer.close()
  alerts = [json.loads(m.value()) for m in consume(bootstrap, topic, total)]
  assert len(alerts) == total
  return alerts


def _produce(bootstrap, topics, records):
  producer = AcknowledgedProducer({'bootstrap.servers': bootstrap})
  for ms, kind, key, value in records:
    producer.send(topics[kind], value, str(key).encode(), timestamp_ms=ms)
  undelivered, reasons = producer.flush(30)
  assert undelivered == 0, reasons


@pytest.fixture
def setup(bootstrap, new_topic, tmp_path):
  topics = {kind: new_topic(suffix=f'-{kind}') for kind in ('predictions', 'labels', 'dead-letter', 'alerts',
                                                            'transactions')}
  model_dir = str(tmp_path / 'models')
  version = publish_model(model_dir)
  rng = np.random.default_rng(0)
  ModelStore(model_dir).update_metadata(
      version, feature_statistics=feature_statistics(rng.normal(size=(2000, len(FEATURE_NAMES))), FEATURE_NAMES),
      score_statistics=feature_statistics(rng.beta(1, 6, (2000, 1)), ['score'])['score'])
  return topics, model_dir, version


def _monitor(bootstrap, topics, model_dir, warehouse, group, *extra):
  monitoring.run(['--bootstrap_servers', bootstrap, '--predictions_topic', topics['predictions'],
                  '--labels_topic', topics['labels'], '--dead_letter_topic', topics['dead-letter'],
                  '--alerts_topic', topics['alerts'], '--transactions_topic', topics['transactions'],
                  '--warehouse', warehouse, '--model_dir', model_dir, '--consumer_group', group, '--stop_at_end',
                  *extra])


def test_precision_recall_and_average_precision_equal_scikit_learns(bootstrap, setup, tmp_path, group_id):
  topics, model_dir, version = setup
  records = _traffic(1500, days=10, seed=1, version=version)
  duplicates = [r for r in records if r[1] == 'predictions'][:40]  # the scorer delivers at least once
  _produce(bootstrap, topics, records + duplicates + [(START_MS, 'predictions', 'bad', b'not json')])
  warehouse = f'duckdb://{tmp_path}/metrics.duckdb'
  _monitor(bootstrap, topics, model_dir, warehouse, group_id)

  sums = read_sums(open_warehouse(warehouse))
  overall = summaries(sums[sums['role'] == 'champion'], group_by=['model_version']).iloc[0]
  predictions = pd.DataFrame([json.loads(v) for _, kind, _, v in records if kind == 'predictions'])
  labels = pd.DataFrame([json.loads(v) for _, kind, _, v in records if kind == 'labels'])
  joined = predictions.merge(labels[['transaction_id', 'is_fraud']], on='transaction_id')
  assert overall['predictions'] == len(predictions)  # each transaction once, duplicates left out
  assert overall['labelled'] == len(joined)
  assert overall['precision'] == pytest.approx(precision_score(joined['is_fraud'], joined['flagged']), abs=1e-12)
  assert overall['recall'] == pytest.approx(recall_score(joined['is_fraud'], joined['flagged']), abs=1e-12)
  binned = joined['score'].map(score_bin) / SCORE_BINS
  assert overall['average_precision'] == pytest.approx(average_precision_score(joined['is_fraud'], binned), abs=1e-12)
  assert overall['average_precision'] == pytest.approx(average_precision_score(joined['is_fraud'], joined['score']),
                                                       abs=0.01)
  dead = consume(bootstrap, topics['dead-letter'], 1)
  assert [m.value() for m in dead] == [b'not json']


def test_metrics_of_several_bounded_runs_equal_those_of_one_run(bootstrap, setup, tmp_path, group_id):
  topics, model_dir, version = setup
  records = _traffic(1200, days=12, seed=2, version=version)
  one_run = f'duckdb://{tmp_path}/one.duckdb'
  split_runs = f'duckdb://{tmp_path}/split.duckdb'
  cuts = [0, len(records) // 3, 2 * len(records) // 3, len(records)]
  for first, last in zip(cuts, cuts[1:], strict=False):
    _produce(bootstrap, topics, records[first:last])
    _monitor(bootstrap, topics, model_dir, split_runs, group_id)  # a pair split across runs counts once
  _monitor(bootstrap, topics, model_dir, one_run, f'{group_id}-one')

  def metrics(url):
    return read_sums(open_warehouse(url)).sort_values(['window_start', 'model_version', 'role', 'metric', 'bin'],
                                                     ignore_index=True)

  split, whole = metrics(split_runs), metrics(one_run)
  assert len(whole) > 100 and whole['value'].sum() > 0
  pd.testing.assert_frame_equal(split, whole)


def test_drifted_features_raise_one_drift_alert_listing_them_and_no_repeat_while_it_stays_open(bootstrap, setup,
                                                                                              tmp_path, group_id):
  topics, model_dir, version = setup
  _produce(bootstrap, topics, _traffic(3000, days=7, seed=3, drift_from_day=3, version=version))
  warehouse = f'duckdb://{tmp_path}/drift.duckdb'
  unchecked = ('--drift_exclude', 'TX_AMOUNT')
  _monitor(bootstrap, topics, model_dir, warehouse, group_id, *unchecked)
  _monitor(bootstrap, topics, model_dir, warehouse, group_id, *unchecked)  # nothing new: no alert raised twice
  alerts = [json.loads(m.value()) for m in consume(bootstrap, topics['alerts'], 10_000, timeout_s=5)]
  drift = [a for a in alerts if a['kind'] == DRIFT]
  # Days 0-2 are like the training data; from day 3 every feature moved by 3 standard deviations. Day 3's window
  # raises one alert that lists them all; days 4 and 5 drift the same way, so that alert is still open and none
  # is raised (the last day's window has not closed: no later prediction).
  assert [a['window_start'] for a in drift] == [_iso(START_MS + 3 * DAY_MS)]
  alert, = drift
  assert set(alert['drifted']) == set(FEATURE_NAMES) - {'TX_AMOUNT'}
  assert alert['model_version'] == version and all(psi > 0.2 for psi in alert['drifted'].values())
  assert (alert['statistic'], alert['psi']) == max(alert['drifted'].items(), key=lambda item: item[1])
  assert f'{len(FEATURE_NAMES) - 1} statistic(s) drifted' in alert['message']
  assert f'{alert["statistic"]} {alert["psi"]:.2f}' in alert['message'] and 'more.' in alert['message']


# Per day: frauds flagged, frauds missed, genuine flagged, genuine passed (a hundred transactions, 20 frauds).
HEALTHY_DAY = (16, 4, 4, 76)  # precision 0.8, recall 0.8
IMPRECISE_DAY = (16, 4, 24, 56)  # precision 0.4
FORGETFUL_DAY = (6, 14, 0, 80)  # recall 0.3
NO_PREDICTIONS = (0, 0, 0, 0)


def test_windows_below_the_precision_or_the_recall_floor_raise_one_alert_of_that_kind(bootstrap, setup, tmp_path,
                                                                                      group_id):
  topics, model_dir, version = setup
  # The healthy days between and after the others are checked too; the last day only closes the windows before it.
  days = [HEALTHY_DAY, IMPRECISE_DAY, HEALTHY_DAY, FORGETFUL_DAY, HEALTHY_DAY]
  _produce(bootstrap, topics, _scored_days(days, version))
  _monitor(bootstrap, topics, model_dir, f'duckdb://{tmp_path}/accuracy.duckdb', group_id,
           '--precision_floor', '0.6', '--recall_floor', '0.6')

  alerts = _alerts_now(bootstrap, topics['alerts'])
  assert sorted((a['kind'], a['window_start'], a['window_end']) for a in alerts) == [
      (PRECISION_BELOW_FLOOR, _iso(START_MS + DAY_MS), _iso(START_MS + 2 * DAY_MS)),
      (RECALL_BELOW_FLOOR, _iso(START_MS + 3 * DAY_MS), _iso(START_MS + 4 * DAY_MS))]
  by_kind = {a['kind']: a for a in alerts}
  imprecise, forgetful = by_kind[PRECISION_BELOW_FLOOR], by_kind[RECALL_BELOW_FLOOR]
  assert imprecise['precision'] == pytest.approx(16 / 40) and 'recall' not in imprecise
  assert forgetful['recall'] == pytest.approx(6 / 20) and 'precision' not in forgetful
  for alert in alerts:
    assert alert['model_version'] == version and alert['floor'] == 0.6
    assert alert['labelled'] == 100 and alert['positives'] == 20
    assert 0 < alert['average_precision'] <= 1
    assert version in alert['message'] and 'below the floor 0.6' in alert['message']


def _dead_letters(day: int, count: int, first_offset: int):
  """Dead letters as the scorer writes them, about ``count`` unreadable transactions spread over a day."""
  for i in range(count):
    source = KafkaRecord('transactions', 0, first_offset + i, START_MS + day * DAY_MS + i * (DAY_MS // count),
                         None, b'not json', ())
    yield dead_letter_message(DeadLetter(source, 'not valid JSON'))


def _promoted(records, from_ms: int, version: str):
  """The records with the predictions from ``from_ms`` on made by ``version``."""
  promoted = []
  for ms, kind, key, value in records:
    if kind == 'predictions' and ms >= from_ms:
      value = json.dumps({**json.loads(value), 'model_version': version}).encode()
    promoted.append((ms, kind, key, value))
  return promoted


def test_a_window_with_too_many_dead_letters_raises_one_dead_letter_rate_alert(bootstrap, setup, tmp_path,
                                                                              group_id):
  topics, model_dir, version = setup
  # Day 2 has nothing but dead letters: a producer that sent only garbage that day. Late on day 3 a new version
  # was promoted: its 10 predictions are not the window's only records. Day 4 is not complete.
  records = _scored_days([HEALTHY_DAY, HEALTHY_DAY, NO_PREDICTIONS, HEALTHY_DAY, HEALTHY_DAY], version)
  _produce(bootstrap, topics, _promoted(records, START_MS + 3 * DAY_MS + 90 * (DAY_MS // 100), f'{version}-next'))
  dead_letters_by_day = {1: 5, 2: 20, 3: 1, 4: 50}
  offsets = np.cumsum([0, *dead_letters_by_day.values()]).tolist()
  produce(bootstrap, topics['dead-letter'], [
      message for (day, count), first_offset in zip(dead_letters_by_day.items(), offsets, strict=False)
      for message in _dead_letters(day, count, first_offset)])
  _monitor(bootstrap, topics, model_dir, f'duckdb://{tmp_path}/dead-letters.duckdb', group_id)

  alerts = _alerts_now(bootstrap, topics['alerts'])
  # 5 of 105 records on day 1, and all of day 2's, are over the 1% allowed; 1 of 101 on day 3 is not; day 4's
  # window has not closed.
  assert sorted((a['window_start'], a['rate']) for a in alerts) == [
      (_iso(START_MS + DAY_MS), pytest.approx(5 / 105)), (_iso(START_MS + 2 * DAY_MS), pytest.approx(1.0))]
  assert all(a['kind'] == DEAD_LETTER_RATE and a['threshold'] == 0.01 for a in alerts)
  assert all(a['model_version'] == '' for a in alerts)  # dead letters belong to no model
  assert all('dead-letter topic' in a['message'] for a in alerts)


def _commit_offsets(bootstrap: str, group: str, topic: str, at_end: bool):
  """Commits, for ``group``, the start (offset 0) or the end of each partition of ``topic``."""
  consumer = new_consumer({'bootstrap.servers': bootstrap, 'group.id': group})
  offsets = [TopicPartition(t, p, fetched_end_offset(consumer, t, p, 0) if at_end else 0)
             for t, p in list_partitions(consumer, [topic])]
  consumer.commit(offsets=offsets, asynchronous=False)
  consumer.close()


def test_a_scorer_too_far_behind_raises_one_scorer_lag_alert(bootstrap, setup, tmp_path, group_id):
  topics, model_dir, version = setup
  warehouse = f'duckdb://{tmp_path}/lag.duckdb'
  scorer_group = f'{group_id}-scorer'
  lag_settings = ('--scorer_group', scorer_group, '--max_scorer_lag', '40')
  # What the scorer has to read: only their number matters to its lag.
  produce(bootstrap, topics['transactions'], [(b'%d' % i, b'{}', ()) for i in range(50)])
  monitored_days = iter(range(3))

  def monitor_a_new_day():
    day = next(monitored_days)
    _produce(bootstrap, topics, [(ms + day * DAY_MS, kind, f'{day}-{key}', value)
                                 for ms, kind, key, value in _scored_days([HEALTHY_DAY], version)])
    _monitor(bootstrap, topics, model_dir, warehouse, group_id, *lag_settings)
    return _alerts_now(bootstrap, topics['alerts'])

  assert monitor_a_new_day() == []  # the scorer has committed nothing: its lag is not known
  _commit_offsets(bootstrap, scorer_group, topics['transactions'], at_end=False)
  (alert,) = monitor_a_new_day()  # 50 transactions behind
  assert alert['kind'] == SCORER_LAG and alert['lag'] == 50 and alert['threshold'] == 40
  assert alert['group'] == scorer_group and scorer_group in alert['message']
  _commit_offsets(bootstrap, scorer_group, topics['transactions'], at_end=True)
  assert monitor_a_new_day() == [alert]  # caught up: no new alert


@pytest.mark.parametrize('lift, promoted', [(0.8, True), (0.1, False)])
def test_a_shadow_challenger_is_promoted_only_if_better_on_live_labels(bootstrap, setup, tmp_path, group_id, lift,
                                                                       promoted, capsys):
  topics, model_dir, champion = setup
  challenger = publish_model(model_dir, seed=1, promote=False)
  store = ModelStore(model_dir)
  assert cli.main(['promote', challenger, '--challenger', '--model-dir', model_dir]) == 0
  assert store.challenger() == challenger and store.current() == champion
  _produce(bootstrap, topics, _traffic(1500, days=10, seed=4, version=champion, challenger=(challenger, lift)))
  warehouse = f'duckdb://{tmp_path}/shadow.duckdb'
  _monitor(bootstrap, topics, model_dir, warehouse, group_id)

  promote = ['promote', '--if-better', '--model-dir', model_dir, '--warehouse', warehouse]
  assert cli.main([*promote, '--min-labelled', '5000']) == 0
  assert store.current() == champion and 'too few labelled events' in capsys.readouterr().out
  assert cli.main([*promote, '--min-labelled', '1000']) == 0
  output = capsys.readouterr().out
  assert store.current() == (challenger if promoted else champion), output
  assert ('promoted ' if promoted else 'not promoted: the challenger is not better') in output
  assert store.challenger() == (None if promoted else challenger)


def _join_records(hour: float):
  """(event time, key, Observation) of 90 days, a transaction an hour, in event-time order: one in ten never
  labelled, the others 7 days later and one in a hundred 20 days later; every 50th hour a label of no
  transaction."""
  records = []
  for i in range(90 * 24):
    tx_time = i * hour
    records.append((tx_time, str(i), Observation(PREDICTION, {'event_time': tx_time, 'read_from': (PREDICTION, 0)},
                                                 True)))
    if i % 10:
      delay = (20 if i % 100 == 1 else 7) * 86_400
      records.append((tx_time + delay, str(i), Observation(
          LABEL, {'positive': i % 2, 'known_time': tx_time + delay, 'read_from': (LABEL, 0)}, True)))
    if i % 50 == 0:
      records.append((tx_time, f'unknown-{i}', Observation(
          LABEL, {'positive': 1, 'known_time': tx_time, 'read_from': (LABEL, 0)}, True)))
  return sorted(records, key=lambda record: record[0])


def test_the_local_label_join_pairs_within_its_retention_and_forgets_the_rest():
  hour, retention = 3600.0, 14 * 86_400.0
  join = LabelJoin(retention)
  records = _join_records(hour)
  paired, most_kept = [], 0
  for _, key, observation in records:
    paired += [c.prediction['event_time'] for c in join.observe(key, observation) if c.kind == LABEL]
    join.forget_old()
    most_kept = max(most_kept, len(join))

  newest = records[-1][0]
  labelled_on_time = [i * hour for i in range(90 * 24) if i % 10 and i % 100 != 1]
  assert sorted(paired) == [t for t in labelled_on_time if t + 7 * 86_400 <= newest]  # the late ones never pair
  assert most_kept <= 14 * 24 * 1.1  # transactions of the last 14 days, and the orphan labels among them
  horizon = newest - retention
  assert join.forgotten_predictions == sum(1 for i in range(90 * 24) if i * hour < horizon and (
      i % 10 == 0 or i % 100 == 1))
  assert join.forgotten_labels == sum(1 for i in range(0, 90 * 24, 50) if i * hour < horizon) + sum(
      1 for i in range(90 * 24) if i % 100 == 1 and horizon > i * hour + 20 * 86_400)


def test_the_keyed_label_join_pairs_and_clears_each_transaction_with_a_timer():
  hour = 3600.0
  records = _join_records(hour)
  pipeline = TestPipeline(options=local_options())
  paired = (pipeline
            | beam.Create([records])
            | 'InThisOrder' >> beam.FlatMap(lambda listed: [TimestampedValue((key, observation), at)
                                                            for at, key, observation in listed])
            | beam.ParDo(JoinLabelsFn(14 * 86_400.0))
            | beam.Filter(lambda contribution: contribution.kind == LABEL)
            | beam.Map(lambda contribution: contribution.prediction['event_time']))
  assert_that(paired, equal_to([i * hour for i in range(90 * 24) if i % 10]))
  result = pipeline.run()
  result.wait_until_finish()
  forgotten = {counter.key.metric.name: counter.committed for counter in result.metrics().query(
      MetricsFilter().with_namespace('kbml.monitoring'))['counters']}
  # A bounded input ends with the watermark at the end of time: every transaction's timer fires.
  assert forgotten == {'predictions_forgotten_without_label': 90 * 24 // 10,
                       'labels_forgotten_without_prediction': len(range(0, 90 * 24, 50))}


@pytest.mark.parametrize('payload, reason', [
    (b'[' * 5000 + b']' * 5000, 'nested deeper'),
    (b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 2, "score": 0.5, "flagged": 0, '
     b'"model_version": ["v1"]}', 'model_version must be a string'),
])
def test_a_hostile_prediction_record_is_invalid_with_its_reason(payload, reason):
  with pytest.raises(InvalidRecord, match=reason):
    parse_prediction(payload, FRAUD)

