"""Shared fixtures: one real local broker per test session, fresh topics per test."""

import re
import time
import uuid
from typing import Iterable, List, Optional, Sequence, Tuple

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from confluent_kafka import TopicPartition

from kbml.kafka_client import AcknowledgedProducer, create_topics, new_consumer
from kbml.local_stack import LocalStack
from pipelines.options import LOCAL_RUNNER


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


def produce(bootstrap: str, topic: str, messages: Iterable[Tuple[Optional[bytes], bytes, Sequence]]) -> int:
  """Produces ``(key, value, headers)`` messages and waits for every acknowledgement."""
  producer = AcknowledgedProducer({'bootstrap.servers': bootstrap})
  count = 0
  for key, value, headers in messages:
    producer.send(topic, value, key, list(headers) or None)
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
def bigquery_emulator(tmp_path_factory):
  """A running BigQuery emulator, with Beam and kbml's clients pointed at it; yields its project."""
  from tests.bigquery_emulator import PROJECT, local_bigquery, redirect_beam_bigquery
  folder = tmp_path_factory.mktemp('bigquery')
  with local_bigquery(str(folder)) as (rest_url, grpc_address):
    undo = redirect_beam_bigquery(rest_url, grpc_address, str(folder))
    yield PROJECT
    undo()
