"""Shared fixtures: one real local broker per test session, fresh topics per test; the suite's prerequisites."""

import os
import re
import time
import uuid
from typing import Iterable, List, Tuple

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from confluent_kafka import TopicPartition

from kbml.kafka_client import AcknowledgedProducer, create_topics, new_consumer
from kbml.local_stack import APACHE_KAFKA, DEFAULT_KAFKA_LIBS, LocalStack, default_broker
from pipelines.options import LOCAL_RUNNER
from tests.bigquery_emulator import EMULATOR_EXECUTABLE

CHROMIUM = '/usr/bin/chromium'
# The broker the tests run on: Apache Kafka unless KBML_BROKER says tansu (kbml/local_stack.py).
BROKER = default_broker()
# What some tests run that pip does not install: the file, whether a test needs it, the Makefile target that
# installs it (`make test` depends on each).
PREREQUISITES = (
    (CHROMIUM, lambda item: item.module.__name__ == 'tests.test_report', '/usr/bin/chromium'),
    (EMULATOR_EXECUTABLE, lambda item: 'bigquery_emulator' in item.fixturenames,
     '$(BIGQUERY_EMULATOR), tests/install_bigquery_emulator.sh'),
    (os.path.join(os.environ.get('KBML_KAFKA_LIBS') or DEFAULT_KAFKA_LIBS, '.complete'),
     lambda item: BROKER == APACHE_KAFKA or item.module.__name__ in ('tests.test_local_stack',
                                                                      'tests.test_broker_restart'), 'kafka'),
)


def pytest_collection_modifyitems(session, config, items):
  """Stops before the first test when a collected test needs a file that is not installed."""
  missing = [f'{path} (Makefile target {target})' for path, needed, target in PREREQUISITES
             if not os.path.exists(path) and any(needed(item) for item in items)]
  if missing:
    pytest.exit('Missing what the tests run: ' + '; '.join(missing) + '. `make test` installs them.', returncode=4)


@pytest.fixture(scope='session')
def local_stack(tmp_path_factory) -> LocalStack:
  stack = LocalStack(str(tmp_path_factory.mktemp('kbml')), topics=())
  stack.up(port=0)
  yield stack
  stack.down(grace_s=0)


@pytest.fixture(scope='session')
def bootstrap(local_stack) -> str:
  return local_stack.bootstrap_servers()


@pytest.fixture
def own_broker(tmp_path):
  """A broker of the test's own, with the project topics: for the loops, which use the standard names."""
  stack = LocalStack(str(tmp_path / 'stack'))
  stack.up(port=0)
  yield stack.bootstrap_servers()
  stack.down(grace_s=0)


@pytest.fixture
def new_topic(bootstrap, request):
  """Creates topics named after the test, unique across runs."""

  def create(partitions: int = 4, suffix: str = '') -> str:
    name = re.sub(r'[^a-zA-Z0-9-]', '-', request.node.name)[:60]
    topic = f'{name}{suffix}-{uuid.uuid4().hex[:8]}'
    create_topics({'bootstrap.servers': bootstrap}, [topic], partitions)
    return topic

  return create


@pytest.fixture
def group_id(request) -> str:
  # The first member fixes a group's session timeout on the local broker: fresh groups per test.
  return f'{request.node.name[:40]}-{uuid.uuid4().hex[:8]}'


def local_options(**options) -> PipelineOptions:
  """Options for the pinned local runner, ignoring pytest's own command line."""
  return PipelineOptions(flags=[], runner=LOCAL_RUNNER, **options)


def produce(bootstrap: str, topic: str, messages: Iterable[Tuple]) -> int:
  """Produces ``(key, value, headers[, timestamp_ms])`` messages and waits for every acknowledgement."""
  producer = AcknowledgedProducer({'bootstrap.servers': bootstrap})
  count = 0
  for key, value, headers, *timestamp_ms in messages:
    producer.send(topic, value, key, list(headers) or None, *timestamp_ms)
    count += 1
  undelivered, reasons = producer.flush(30)
  assert undelivered == 0, reasons
  return count


def consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> List:
  """Reads a topic from the start until ``expected`` records came, or ``timeout_s`` passed."""
  consumer = new_consumer({'bootstrap.servers': bootstrap, 'group.id': f'reader-{uuid.uuid4().hex}'})
  metadata = consumer.list_topics(topic, timeout=10)
  consumer.assign([TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions])
  messages = []
  deadline = time.monotonic() + timeout_s
  while len(messages) < expected and time.monotonic() < deadline:
    messages.extend(m for m in consumer.consume(1000, 0.2) if not m.error())
  consumer.close()
  return messages


@pytest.fixture(scope='session')
def warehouse(bootstrap, tmp_path_factory) -> str:
  """A warehouse filled by the ingest pipeline from a simulation produced to the real broker; returns its URL.

  600 customers over 50 days from 2018-04-01 (the last labelled day is 2018-05-20). One per session: the
  trainer's and the retrainer's tests only read it.
  """
  from kbml import simulator
  from pipelines import ingest
  from use_cases.fraud import simulator as fraud_simulator
  topics = {name: f'ingested-{name}-{uuid.uuid4().hex[:8]}' for name in ('transactions', 'labels', 'dead-letter')}
  config = fraud_simulator.SimulationConfig(customers=600, terminals=1200, days=50, seed=3)
  simulation = fraud_simulator.simulate(config)
  simulator.produce(fraud_simulator.events(simulation), {'bootstrap.servers': bootstrap}, topics['transactions'],
                    topics['labels'])
  url = f"duckdb://{tmp_path_factory.mktemp('ingested')}/warehouse.duckdb"
  ingest.run(['--bootstrap_servers', bootstrap, '--transactions_topic', topics['transactions'],
              '--labels_topic', topics['labels'], '--dead_letter_topic', topics['dead-letter'], '--warehouse', url,
              '--stop_at_end', '--consumer_group', f'ingested-{uuid.uuid4().hex[:8]}'])
  return url


@pytest.fixture(scope='session')
def bigquery_emulator(tmp_path_factory):
  """A running BigQuery emulator, with Beam and kbml's clients pointed at it; yields its project."""
  from tests.bigquery_emulator import PROJECT, local_bigquery, redirect_beam_bigquery
  folder = tmp_path_factory.mktemp('bigquery')
  with local_bigquery(str(folder)) as (rest_url, grpc_address):
    undo = redirect_beam_bigquery(rest_url, grpc_address, str(folder))
    yield PROJECT
    undo()
