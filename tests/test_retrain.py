"""``kbml retrain`` on a real warehouse, model store and broker: once, on drift alerts, waiting for labels."""

import argparse
import datetime
import threading
import time

import pytest

from kbml.alerts import DRIFT, MODEL_REFUSED, AlertSink
from kbml.kafka_client import committed_offsets, fetched_end_offset, list_partitions, new_consumer
from trainer import retrain
from trainer.registry import ModelStore

# The warehouse fixture's last labelled day is 2018-05-20: a retrain tests on 05-18..05-20 and trains on the 14
# days before. A drift window from 05-16 has its 3 days of labels; one from 05-20 does not.
LABELLED_WINDOW, UNLABELLED_WINDOW = '2018-05-16T00:00:00+00:00', '2018-05-20T00:00:00+00:00'


def _args(warehouse, model_dir, *extra):
  return ['--warehouse', warehouse, '--model-dir', str(model_dir), '--epochs', '2', '--ensemble', '1', *extra]


def _listen_args(bootstrap, topic, group, *extra):
  # The fixture's days are few: 3 drifted days labelled are enough here (the default: the 5 test and validation
  # days and 2 to train on).
  return ['--on-drift', '--drift-labelled-days', '3', '--bootstrap-servers', bootstrap, '--alerts-topic', topic,
          '--consumer-group', group, *extra]


def _wait_for_output(capsys, text: str, seen: str = '', timeout_s: float = 30.0) -> str:
  """Reads the captured output (the listener prints from another thread) until ``text`` appears."""
  deadline = time.monotonic() + timeout_s
  while text not in seen:
    assert time.monotonic() < deadline, f'no {text!r} in {seen!r}'
    time.sleep(0.1)
    seen += capsys.readouterr().out
  return seen


def _uncommitted(bootstrap, topic, group):
  """How many records of each partition the group has not committed."""
  consumer = new_consumer({'bootstrap.servers': bootstrap, 'group.id': group})
  try:
    pairs = list_partitions(consumer, [topic])
    committed = committed_offsets(consumer, pairs)
    return {pair: fetched_end_offset(consumer, *pair, 0) - max(committed[pair], 0) for pair in pairs}
  finally:
    consumer.close()


def test_a_one_off_retrain_trains_on_the_newest_days_and_goes_through_the_gate(warehouse, tmp_path, capsys):
  assert retrain.run(_args(warehouse, tmp_path)) == 0  # no champion yet: promoted
  assert retrain.run(_args(warehouse, tmp_path)) == 0  # gated against the first

  store = ModelStore(str(tmp_path))
  first, second = store.versions()
  for version in (first, second):
    meta = store.metadata(version)
    assert meta['retrain']['trigger'] == 'manual' and meta['retrain']['alert'] is None
    assert meta['retrain']['started_at'] < meta['retrain']['finished_at']
    assert (meta['training']['train'], meta['training']['validation'], meta['training']['test']) == (
        '2018-05-04..2018-05-15', '2018-05-16..2018-05-17', '2018-05-18..2018-05-20')
  assert store.metadata(first)['blessing']['reason'] == 'no champion yet'
  assert store.metadata(second)['blessing']['champion'] == first
  output = capsys.readouterr().out
  assert 'retrain 1 (manual)' in output and output.count('blessing gate: ') == 2

  # Once, a retrain without data fails with the status and message of a command-line error.
  assert retrain.run(_args(f'duckdb://{tmp_path}/empty.duckdb', tmp_path)) == 2
  assert capsys.readouterr().err.startswith('kbml retrain: error: ')
  assert len(store.versions()) == 2


def test_one_drift_episode_gives_one_retrain(warehouse, bootstrap, new_topic, group_id, tmp_path, capsys):
  topic = new_topic()
  alerts = AlertSink({'bootstrap.servers': bootstrap}, topic)
  listen = _listen_args(bootstrap, topic, group_id)
  alerts.send(DRIFT, 'raised before the listener first started: history', window_start=LABELLED_WINDOW)
  # The group's first start begins at the end of the topic and commits it: that history is never read.
  assert retrain.run(_args(warehouse, tmp_path, *listen, '--seconds', '1')) == 0
  assert ModelStore(str(tmp_path)).versions() == []

  # Raised while no listener runs: the group's committed offsets keep them for the next start.
  alerts.send(MODEL_REFUSED, 'version x was refused', version='x')
  alerts.send(DRIFT, 'tx_amount drifted', feature='tx_amount', window_start=LABELLED_WINDOW, psi=0.41)
  alerts.send(DRIFT, 'terminal risk drifted', feature='terminal_id_risk_7day_window',
              window_start='2018-05-16T01:00:00+00:00', psi=0.3)
  assert retrain.run(_args(warehouse, tmp_path, *listen, '--max-retrains', '1', '--seconds', '60')) == 0

  store = ModelStore(str(tmp_path))
  [version] = store.versions()
  record = store.metadata(version)['retrain']
  assert record['trigger'] == 'drift' and store.current() == version
  assert {key: record['alert'][key] for key in ('kind', 'message', 'feature', 'window_start')} == {
      'kind': DRIFT, 'message': 'tx_amount drifted', 'feature': 'tx_amount', 'window_start': LABELLED_WINDOW}
  output = capsys.readouterr().out
  assert 'ignored a model_refused alert: not a retrain trigger' in output
  assert 'ignored a drift alert (window from 2018-05-16T01:00:00+00:00): a drift retrain is already pending' in output
  assert 'retrain 1 (drift: drift alert, "tx_amount drifted")' in output and 'history' not in output
  assert set(_uncommitted(bootstrap, topic, group_id).values()) == {0}


def test_a_drift_retrain_waits_for_the_labels_of_the_new_pattern(warehouse, bootstrap, new_topic, group_id, tmp_path,
                                                                   capsys):
  topic = new_topic()
  argv = _args(warehouse, tmp_path, *_listen_args(bootstrap, topic, group_id), '--seconds', '6',
               '--check-interval-s', '1')
  statuses = []
  listener = threading.Thread(target=lambda: statuses.append(retrain.run(argv)))
  listener.start()
  seen = _wait_for_output(capsys, 'listening for')
  AlertSink({'bootstrap.servers': bootstrap}, topic).send(DRIFT, 'tx_amount drifted',
                                                          window_start=UNLABELLED_WINDOW)
  listener.join(30)

  assert not listener.is_alive() and statuses == [0]
  output = seen + capsys.readouterr().out
  assert 'a retrain is due once the warehouse has labels through 2018-05-22' in output
  assert output.count('waiting for labels before the drift retrain: labelled through 2018-05-20, the retrain needs '
                      '2018-05-22 (3 days from the drift window of 2018-05-20)') >= 2  # --check-interval-s 1
  assert 'stopping: --seconds 6 passed' in output
  assert ModelStore(str(tmp_path)).versions() == []
  # The pending alert stays uncommitted: a listener started again picks the wait up.
  assert sum(_uncommitted(bootstrap, topic, group_id).values()) == 1


def test_a_schedule_survives_a_failed_retrain(tmp_path, capsys):
  empty = f'duckdb://{tmp_path}/empty.duckdb'
  started = time.monotonic()
  assert retrain.run(_args(empty, tmp_path / 'models', '--every', '1s', '--max-retrains', '2', '--seconds', '30')) == 0

  assert time.monotonic() - started >= 1
  output = capsys.readouterr().out
  assert 'retraining every 1s, the first now' in output
  assert 'retrain 1 (schedule) failed: ' in output and 'retrain 2 (schedule) failed: ' in output
  assert output.rstrip().endswith('stopping: --max-retrains 2 reached')


def test_durations_are_a_number_and_a_unit(capsys):
  assert [retrain.parse_duration(text).total_seconds() for text in ('30s', '15m', '6h', '1d', '1.5h')] == [
      30, 900, 21600, 86400, 5400]
  for garbage in ('6', 'h', 'soon', '0s', '-1h', '6 hours'):
    with pytest.raises(argparse.ArgumentTypeError, match='a number and a unit, s, m, h or d'):
      retrain.parse_duration(garbage)
  with pytest.raises(SystemExit):
    retrain.build_parser().parse_args(['--every', 'daily'])
  assert "kbml retrain: error: argument --every: expected a duration above zero: a number and a unit, s, m, h or d " \
         "(30s, 15m, 6h, 1d), got 'daily'" in capsys.readouterr().err
  assert retrain.build_parser().parse_args([]).cooldown == datetime.timedelta(hours=6)


def test_the_cooldown_makes_one_retrain_of_an_episode():
  trigger = retrain.DriftTrigger(datetime.timedelta(hours=6), labelled_days=3)
  drift = {'kind': DRIFT, 'message': 'tx_amount drifted', 'window_start': '2018-05-16T12:00:00Z'}

  assert 'not a retrain trigger' in trigger.consider({'kind': MODEL_REFUSED}, now=0)
  assert trigger.pending is None
  assert 'labels through 2018-05-18' in trigger.consider(drift, now=1)
  assert trigger.pending.alert is drift and trigger.pending.labelled_through == datetime.date(2018, 5, 18)
  assert 'already pending' in trigger.consider({**drift, 'kind': 'recall_below_floor'}, now=2)
  trigger.retrained(now=100)
  assert trigger.pending is None
  assert 'in the cool-down after the last drift retrain (5:59:00 left)' in trigger.consider(drift, now=160)
  assert trigger.pending is None
  assert 'labels through' in trigger.consider(drift, now=100 + 6 * 3600)
  assert trigger.pending is not None
