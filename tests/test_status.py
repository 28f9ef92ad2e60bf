"""``kbml status`` against real parts: the local broker, a model store with Keras models, a DuckDB warehouse."""

import datetime
import json
import threading
import time

import pytest
from confluent_kafka import Consumer, TopicPartition

from kbml import status
from kbml.alerts import AlertSink
from kbml.kafka_client import AcknowledgedProducer
from kbml.local_stack import free_port
from kbml.warehouse import open_warehouse
from tests.conftest import produce
from tests.scoring_models import publish_model
from trainer.registry import ModelStore
from transforms.metrics import (
  CHALLENGER,
  CHAMPION,
  METRICS_SCHEMA,
  METRICS_TABLE,
  add_sums,
  labelled_sums,
  metric_rows,
  prediction_sums,
)

WINDOW = 300.0
EARLY_WINDOW = 1_795_000_000.0  # two windows in 2026: the early one labelled, the late one not yet
LATE_WINDOW = EARLY_WINDOW + WINDOW
REFUSAL = 'average precision 0.5000 < champion 0.6100 - tolerance 0.0 on the same test rows'


def _records(count: int):
  return [(str(i).encode(), json.dumps({'n': i}).encode(), ()) for i in range(count)]


def _commit(bootstrap: str, group: str, offsets):
  """Commits ``{(topic, partition): offset}`` for a consumer group, as a pipeline does after its work."""
  consumer = Consumer({'bootstrap.servers': bootstrap, 'group.id': group, 'enable.auto.commit': False})
  consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
  consumer.close()


@pytest.fixture
def topics(new_topic, bootstrap):
  """The five topics with known contents: end offsets 10, 4, 6, 3 (alerts), 1."""
  names = {'events': new_topic(1, '-tx'), 'labels': new_topic(1, '-labels'),
           'predictions': new_topic(2, '-predictions'), 'alerts': new_topic(1, '-alerts'),
           'dead-letter': new_topic(1, '-dead')}
  for role, count in (('events', 10), ('labels', 4), ('predictions', 6), ('dead-letter', 1)):
    produce(bootstrap, names[role], _records(count))
  sink = AlertSink({'bootstrap.servers': bootstrap}, names['alerts'])
  sink.send('drift', 'old drift, three days ago', raised_at=time.time() - 3 * 86400)
  sink.send('drift', 'PSI of amount 0.31 > 0.2\nsecond line')
  sink.send('model_refused', 'version x is corrupt: the old one keeps scoring')
  return names


@pytest.fixture
def groups(bootstrap, topics, group_id):
  """Ingest has read everything, scoring 4 of the 10 transactions, monitoring nothing."""
  names = {'ingest': f'{group_id}-ingest', 'scoring': f'{group_id}-scoring', 'monitoring': f'{group_id}-monitoring'}
  _commit(bootstrap, names['ingest'], {(topics['events'], 0): 10, (topics['labels'], 0): 4})
  _commit(bootstrap, names['scoring'], {(topics['events'], 0): 4})
  return names


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  """v1 made by `kbml train` and in service; v2 made by a drift retrain, refused by the gate, the challenger."""
  folder = str(tmp_path_factory.mktemp('models'))
  store = ModelStore(folder)
  champion = publish_model(folder, threshold=0.42)
  store.update_metadata(champion, created='2026-11-20T08:00:00+00:00',
                        metrics={'average_precision': 0.61, 'auc_roc': 0.87, 'card_precision_at_100': 0.25},
                        blessing={'blessed': True, 'reason': 'no champion yet', 'promoted': True})
  refused = publish_model(folder, seed=1, promote=False)
  drift_alert = {'kind': 'drift', 'raised_at': time.time(), 'message': 'PSI of amount 0.31 > 0.2'}
  store.update_metadata(refused, metrics={'average_precision': 0.5},
                        retrain={'trigger': 'drift', 'alert': drift_alert, 'started_at': '2026-11-21T09:00:00+00:00',
                                 'finished_at': '2026-11-21T09:05:00+00:00'},
                        blessing={'blessed': False, 'reason': REFUSAL, 'promoted': False})
  store.set_challenger(refused)
  return folder, champion, refused


@pytest.fixture(scope='module')
def warehouse_url(tmp_path_factory, model_dir):
  """Monitoring metrics: the early window with 10 predictions, 4 labelled (1 true, 1 false positive of 2 frauds);
  the late window with 5 predictions, none labelled; a challenger that must not be mixed in."""
  _, champion, challenger = model_dir
  early, late, shadow = {}, {}, {}
  for score, flagged, is_fraud in [(0.9, True, True), (0.8, True, False), (0.3, False, True), (0.1, False, False)]:
    add_sums(early, prediction_sums(score, flagged))
    add_sums(early, labelled_sums(score, flagged, is_fraud))
    add_sums(shadow, labelled_sums(score, True, is_fraud))
  for score in (0.2, 0.1, 0.05, 0.3, 0.15, 0.6):
    add_sums(early, prediction_sums(score, False))
  for score in (0.7, 0.2, 0.1, 0.05, 0.3):
    add_sums(late, prediction_sums(score, score > 0.42))
  url = f"duckdb://{tmp_path_factory.mktemp('warehouse')}/warehouse.duckdb"
  rows = metric_rows({(EARLY_WINDOW, LATE_WINDOW, champion, CHAMPION): early,
                      (LATE_WINDOW, LATE_WINDOW + WINDOW, champion, CHAMPION): late,
                      (EARLY_WINDOW, LATE_WINDOW, challenger, CHALLENGER): shadow},
                     part='test', written_at='2026-11-21T10:00:00Z')
  open_warehouse(url).write_rows(METRICS_TABLE, METRICS_SCHEMA, rows)
  return url


def _arguments(bootstrap, topics, groups, model_dir, warehouse_url, *more):
  arguments = ['--bootstrap-servers', bootstrap, '--model-dir', model_dir[0], '--warehouse', warehouse_url, *more]
  for role, topic in topics.items():
    arguments += [f'--{role}-topic', topic]
  for pipeline, group in groups.items():
    arguments += [f'--{pipeline}-group', group]
  return arguments


def test_screen_shows_lag_model_retrain_metrics_and_alerts(bootstrap, topics, groups, model_dir, warehouse_url,
                                                           capsys):
  _, champion, refused = model_dir
  assert status.run(_arguments(bootstrap, topics, groups, model_dir, warehouse_url, '--sample-s', '0')) == 0
  screen = capsys.readouterr().out
  print(screen)  # shown when an assertion fails
  lines = screen.splitlines()

  def line(start: str) -> str:
    return next(text for text in lines if text.lstrip().startswith(start))

  assert line('broker').endswith(f'{bootstrap}: reachable')
  assert line('events').split()[1] == '10'
  assert line('predictions').split()[1] == '6'
  assert line('dead-letter').split()[1] == '1'
  assert line('alerts').split()[1] == '3'
  assert line('ingest').split()[:3] == ['ingest', '0', groups['ingest']]
  assert line('scoring').split()[:3] == ['scoring', '6', groups['scoring']]
  assert line('monitoring').split()[1] == '-' and line('monitoring').endswith('predictions, labels: nothing committed')
  assert line('in service').split()[2] == champion
  assert 'threshold 0.420  test AP 0.610  AUC 0.870  CP@100 0.250' in screen
  assert line('challenger').split()[1] == refused
  assert line('model').startswith(f'model         2 versions in {model_dir[0]}')
  assert f'last retrain  {refused}  trigger drift (drift alert), finished 2026-11-21 09:05 UTC' in screen
  assert f'not promoted: {REFUSAL}' in screen
  assert '5 predictions, 20.00% flagged' in line('predictions 5')
  assert '4 labelled: precision 0.500  recall 0.500' in line('labelled')
  alerts = next(text for text in lines if text.startswith('alerts'))  # the section, not the topic's row
  assert alerts == 'alerts        2 open (raised in the last 24 h), 3 in all: drift 2, model_refused 1'
  newest = lines[lines.index(alerts) + 1:]
  assert [text.split()[2] for text in newest] == ['model_refused', 'drift', 'drift']
  assert 'PSI of amount 0.31 > 0.2 second line' in newest[1]
  assert len(lines) <= 35


def test_json_has_the_same_and_the_event_rates(bootstrap, topics, groups, model_dir, warehouse_url, capsys):
  # Predictions keep arriving while status samples the end offsets twice, a second apart.
  producer = AcknowledgedProducer({'bootstrap.servers': bootstrap})
  stop = threading.Event()
  sent = []

  def keep_producing():
    while not stop.is_set():
      producer.send(topics['predictions'], b'{}')
      producer.flush(5)
      sent.append(time.monotonic())
      time.sleep(0.02)

  thread = threading.Thread(target=keep_producing)
  thread.start()
  try:
    while len(sent) < 5:  # the producer is connected and producing steadily
      time.sleep(0.01)
    started = time.monotonic()
    code = status.run(_arguments(bootstrap, topics, groups, model_dir, warehouse_url, '--json', '--sample-s', '1'))
    finished = time.monotonic()
  finally:
    stop.set()
    thread.join()
  assert code == 0
  report = json.loads(capsys.readouterr().out)
  produced_per_s = sum(started <= moment <= finished for moment in sent) / (finished - started)
  assert 0.3 * produced_per_s < report['topics']['predictions']['events_per_s'] < 3 * produced_per_s
  assert report['broker'] == {'bootstrap_servers': bootstrap, 'reachable': True, 'local': False}
  assert report['topics']['events']['end_offset'] == 10
  assert report['topics']['events']['events_per_s'] == 0
  assert report['topics']['alerts']['end_offset'] == 3
  assert {name: lag['lag'] for name, lag in report['lag'].items()} == {'ingest': 0, 'scoring': 6, 'monitoring': None}
  assert report['model']['current']['version'] == model_dir[1]
  assert report['model']['current']['promoted_at'] is not None
  assert report['last_retrain']['trigger'] == 'drift'
  assert report['last_retrain']['promoted'] is False
  live = report['live_metrics']
  assert live['latest_predictions']['window_start'] == datetime.datetime.fromtimestamp(
      LATE_WINDOW, datetime.timezone.utc).isoformat()
  assert live['latest_labelled']['precision'] == 0.5
  assert live['latest_labelled']['recall'] == 0.5
  assert live['latest_labelled']['predictions'] == 10
  assert report['alerts']['by_kind'] == {'drift': 2, 'model_refused': 1}
  assert report['alerts']['open'] == 2


def test_the_events_and_labels_topics_are_those_of_the_use_case_in_service_or_named(bootstrap, tmp_path, capsys):
  folder = str(tmp_path / 'models')
  ModelStore(folder).update_metadata(publish_model(folder), use_case='iot')
  common = ['--bootstrap-servers', bootstrap, '--model-dir', folder, '--warehouse', f'duckdb://{tmp_path}/w.duckdb',
            '--sample-s', '0', '--json']
  shown = {}
  for named in ([], ['--use-case', 'fraud'], ['--use-case', 'fraud', '--transactions-topic', 'mine']):
    assert status.run(common + named) == 0
    report = json.loads(capsys.readouterr().out)
    shown[' '.join(named)] = (report['use_case'], report['topics']['events']['topic'],
                              report['topics']['labels']['topic'])
  assert shown == {'': ('iot', 'readings', 'failure-labels'),
                   '--use-case fraud': ('fraud', 'transactions', 'labels'),
                   '--use-case fraud --transactions-topic mine': ('fraud', 'mine', 'labels')}


def test_no_broker_says_so_quickly_and_still_shows_the_model(model_dir, tmp_path, capsys):
  started = time.monotonic()
  code = status.run(['--bootstrap-servers', f'127.0.0.1:{free_port()}', '--model-dir', model_dir[0],
                     '--warehouse', f'duckdb://{tmp_path}/none.duckdb'])
  assert time.monotonic() - started < 10
  assert code == 1
  screen = capsys.readouterr().out
  assert 'NOT reachable' in screen and 'Connection refused' in screen and '`kbml local up`' in screen
  assert f'in service  {model_dir[1]}' in screen
  assert 'no monitoring metrics yet: run `kbml monitor`' in screen
  assert 'alerts        unknown: the broker is not reachable' in screen
  assert not (tmp_path / 'none.duckdb').exists()


def test_fresh_machine_without_broker_model_or_warehouse(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('KBML_STATE_DIR', str(tmp_path / 'state'))
  assert status.run([]) == 1
  screen = capsys.readouterr().out
  assert 'local broker: not running (start it with `kbml local up`)' in screen
  assert 'no model in' in screen and 'yet: run `kbml train`' in screen
  assert 'no monitoring metrics yet: run `kbml monitor`' in screen
  assert not (tmp_path / 'state').exists()
