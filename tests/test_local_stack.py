"""The local stack and the `kbml` command line, with real broker processes."""

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from kbml.kafka_client import committed_offsets, new_consumer
from kbml.local_stack import APACHE_KAFKA, BROKERS, SHARED_TOPICS, LocalStack, LocalStackError
from tests.conftest import produce
from use_cases.fraud.simulator import SimulationConfig

SIMULATED_TIME_MS = int(SimulationConfig().start.timestamp() * 1000)  # the simulation's default start, 2018


def _kbml(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'kbml.cli', *args], capture_output=True, text=True, timeout=60,
                        env=env)


@pytest.mark.parametrize('broker', BROKERS)
def test_up_twice_is_harmless_and_status_shows_offsets(tmp_path, broker):
  topics = ('transactions', 'labels', *SHARED_TOPICS)
  stack = LocalStack(str(tmp_path), topics=topics, broker=broker)
  try:
    bootstrap = stack.up(port=0)
    pid = stack.status().pid
    assert stack.up(port=0) == bootstrap and stack.status().pid == pid
    produce(bootstrap, 'transactions', [(b'k', b'%d' % i, []) for i in range(1_000)])

    status = stack.status()
    assert status.broker == broker and status.reachable and set(topics) <= set(status.topics)
    assert sum(p.high - p.low for p in status.topics['transactions']) == 1_000
    assert [len(status.topics[t]) for t in topics] == [4] * 5
  finally:
    assert stack.down(grace_s=0)
  assert not stack.status().running and not stack.down()


def test_apache_kafka_formats_its_log_folder_with_a_cluster_id_that_begins_with_a_dash(tmp_path, monkeypatch):
  # One random id in 64 begins with '-' (URL-safe base64 of a byte from 0xf8); the storage tool once took it for an
  # option and the broker could not start.
  monkeypatch.setattr(uuid, 'uuid4', lambda: uuid.UUID(bytes=b'\xf8' + bytes(15)))
  stack = LocalStack(str(tmp_path), broker=APACHE_KAFKA)
  try:
    stack.up(port=0, timeout_s=30)
    assert stack.status().reachable
  finally:
    stack.down(grace_s=0)
  with open(tmp_path / 'kafka-logs' / 'meta.properties', encoding='utf-8') as f:
    assert 'cluster.id=-' in f.read()


def test_apache_kafka_starts_within_30_s_and_keeps_records_and_group_offsets_across_down_and_up(tmp_path):
  stack = LocalStack(str(tmp_path), broker=APACHE_KAFKA)
  started = time.monotonic()
  bootstrap = stack.up(port=0, timeout_s=30)
  print(f'Apache Kafka up, topics created, in {time.monotonic() - started:.1f} s')
  assert time.monotonic() - started < 30
  try:
    # Timestamped in 2018 like the simulated history: time retention would delete them (30 s after a start).
    produce(bootstrap, 'transactions', [(b'k%d' % i, b'%d' % i, [], SIMULATED_TIME_MS + i) for i in range(1_000)])
    consumer = new_consumer({'bootstrap.servers': bootstrap, 'group.id': 'kept'})
    consumer.commit(offsets=[TopicPartition('transactions', 0, 7)], asynchronous=False)
    consumer.close()
    assert stack.down()
    bootstrap = stack.up(port=0, timeout_s=30)
    status = stack.status()
    assert sum(p.high - p.low for p in status.topics['transactions']) == 1_000
    consumer = new_consumer({'bootstrap.servers': bootstrap, 'group.id': 'kept'})
    assert committed_offsets(consumer, [('transactions', 0)]) == {('transactions', 0): 7}
    consumer.close()
    topic = ConfigResource(ConfigResource.Type.TOPIC, 'transactions')
    admin = AdminClient({'bootstrap.servers': bootstrap})
    retention = admin.describe_configs([topic])[topic].result(30)
    assert retention['retention.ms'].value == '-1', 'the local broker keeps records of any age'
  finally:
    stack.down(grace_s=0)


def test_without_java_apache_kafka_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv('JAVA_HOME', str(tmp_path / 'no-java'))
  with pytest.raises(LocalStackError, match='Apache Kafka needs Java 17 or newer'):
    LocalStack(str(tmp_path), broker=APACHE_KAFKA).up(port=0)


def test_a_taken_port_is_a_clear_error(tmp_path):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    with pytest.raises(LocalStackError, match=f'Port {taken.getsockname()[1]} on 127.0.0.1 is already in use'):
      LocalStack(str(tmp_path)).up(port=taken.getsockname()[1])


def test_a_missing_broker_binary_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv('KBML_BROKER_BINARY', str(tmp_path / 'tansu'))
  with pytest.raises(LocalStackError, match='is not an executable file'):
    LocalStack(str(tmp_path), broker='tansu').up(port=0)


def test_cli_up_status_down(tmp_path):
  state = ['--state-dir', str(tmp_path)]
  without_a_choice = {name: value for name, value in os.environ.items() if name != 'KBML_BROKER'}
  up = _kbml('local', 'up', '--port', '0', *state, env=without_a_choice)
  try:
    assert up.returncode == 0 and 'local broker (kafka) started at 127.0.0.1:' in up.stdout, up.stderr
    assert up.stdout.rstrip().endswith('topics: transactions, labels, predictions, alerts, dead-letter')
    again = _kbml('local', 'up', '--port', '0', '--use-case', 'iot', *state).stdout
    assert 'already running' in again and again.rstrip().endswith('topics: readings, failure-labels, predictions, '
                                                                  'alerts, dead-letter')
    status = _kbml('local', 'status', *state)
    assert status.returncode == 0 and 'reachable' in status.stdout
    assert all(topic in status.stdout for topic in ('transactions', 'readings', 'failure-labels', 'dead-letter'))
  finally:
    assert _kbml('local', 'down', *state).stdout.strip() == 'local broker stopped'
  assert 'not running' in _kbml('local', 'status', *state).stdout


def test_cli_errors_are_one_clear_line(tmp_path):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    result = _kbml('local', 'up', '--port', str(taken.getsockname()[1]), '--state-dir', str(tmp_path))
  assert result.returncode == 2 and result.stderr.startswith('kbml: error: Port ')
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('command', [['--help'], ['local', '--help'], ['local', 'up', '--help'],
                                     ['local', 'status', '--help'], ['mirror', '--help'], ['ingest', '--help'],
                                     ['simulate', '--help'], ['warehouse', 'summary', '--help']])
def test_every_command_has_help(command):
  result = _kbml(*command)
  assert result.returncode == 0 and 'usage:' in result.stdout.lower(), result.stderr
