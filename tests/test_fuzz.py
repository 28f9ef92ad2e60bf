"""Hostile records among valid traffic, through the streaming ingest and the streaming scorer at once.

Over 10,000 generated hostile records of more than 30 kinds are produced
between the records of a simulation, each next to the valid event it is
made from. Neither pipeline may stop; every hostile record must reach the
dead-letter topic with its reason, or be accepted by a documented rule (an
orphan label changes nothing and is counted); every valid transaction must be
scored and written to the warehouse once, as it was first produced.
"""

import json
import random
import time
from collections import Counter, defaultdict
from typing import Callable, Dict, List, NamedTuple, Optional

from confluent_kafka import TopicPartition

from kbml import simulator
from kbml.kafka_client import AcknowledgedProducer, group_lag, list_partitions, new_consumer
from kbml.warehouse import open_warehouse
from tests.pipeline_process import PipelineProcess
from tests.scoring_models import publish_model
from tests.test_scoring import TopicReader
from transforms.records import REASON_HEADER, SOURCE_HEADERS
from use_cases.fraud import simulator as fraud_simulator
from use_cases.fraud.simulator import SimulationConfig, simulate

TOPICS = ('transactions', 'labels', 'predictions', 'dead-letter', 'alerts')
HOSTILE_RECORDS = 10_500
FUZZ_HEADER = 'fuzz'


def _json(document) -> bytes:
  return json.dumps(document).encode()


def _with(**fields) -> Callable[[dict], bytes]:
  return lambda valid: _json({**valid, **fields})


def _without(name: str) -> Callable[[dict], bytes]:
  return lambda valid: _json({key: value for key, value in valid.items() if key != name})


def _raw_amount(text: str) -> Callable[[dict], bytes]:
  return lambda valid: _json({**valid, 'amount': 0})[:-2] + text.encode() + b'}'


class Kind(NamedTuple):
  """A kind of hostile record: made from a valid record of its topic; the words its dead-letter reason holds."""
  name: str
  topic: str  # 'transactions' or 'labels'
  make: Callable[[dict], Optional[bytes]]
  reason: Optional[str]  # None: accepted by a documented rule, no dead letter
  weight: int = 10


KINDS = [
    Kind('invalid UTF-8', 'transactions', lambda valid: b'\xff\xfe' + _json(valid)[2:], 'not valid JSON'),
    Kind('truncated JSON', 'transactions', lambda valid: _json(valid)[:-7], 'not valid JSON'),
    Kind('no value', 'transactions', lambda valid: None, 'empty transaction record'),
    Kind('empty value', 'transactions', lambda valid: b'', 'empty transaction record'),
    Kind('whitespace', 'transactions', lambda valid: b' \n\t ', 'not valid JSON'),
    # Python's JSON parser takes a UTF-8 byte order mark (RFC 8259 allows it): a valid record, here a repeat.
    Kind('UTF-8 BOM', 'transactions', lambda valid: b'\xef\xbb\xbf' + _json(valid), 'repeated transaction_id'),
    Kind('JSON array', 'transactions', lambda valid: _json(list(valid.values())), 'must be a JSON object'),
    Kind('JSON string', 'transactions', lambda valid: _json(json.dumps(valid)), 'must be a JSON object'),
    Kind('JSON null', 'transactions', lambda valid: b'null', 'must be a JSON object'),
    Kind('missing amount', 'transactions', _without('amount'), 'missing field amount'),
    Kind('missing id', 'transactions', _without('transaction_id'), 'missing field transaction_id'),
    Kind('amount as text', 'transactions', lambda valid: _json({**valid, 'amount': str(valid['amount'])}),
         'field amount must be a number'),
    Kind('negative amount', 'transactions', _with(amount=-12.5), 'must not be negative'),
    Kind('NaN amount', 'transactions', _raw_amount('NaN'), 'NaN is not a JSON number'),
    Kind('infinite amount', 'transactions', _raw_amount('-Infinity'), '-Infinity is not a JSON number'),
    Kind('overflowing amount', 'transactions', _raw_amount('1e400'), 'must be at most'),
    Kind('huge amount', 'transactions', _with(amount=10 ** 20), 'must be at most'),
    Kind('third decimal', 'transactions', _raw_amount('12.345'), 'at most 2 decimals'),
    Kind('fractional id', 'transactions',
         lambda valid: _json({**valid, 'transaction_id': valid['transaction_id'] + .5}),
         'field transaction_id must be an integer id'),
    Kind('boolean id', 'transactions', _with(customer_id=True), 'field customer_id must be an integer id'),
    Kind('negative id', 'transactions', _with(terminal_id=-3), 'field terminal_id is not a valid id'),
    Kind('id past 2**53', 'transactions', _with(transaction_id=2 ** 53), 'field transaction_id is not a valid id'),
    Kind('id of 400 digits', 'transactions', lambda valid: _json({**valid, 'transaction_id': 0}).replace(
        b'"transaction_id": 0', b'"transaction_id": ' + b'9' * 400), 'field transaction_id is not a valid id'),
    Kind('time not ISO', 'transactions', _with(tx_datetime='yesterday'), 'is not an ISO-8601 timestamp'),
    Kind('time not UTC', 'transactions', lambda valid: _json({**valid, 'tx_datetime': valid['tx_datetime'][:-1]
                                                              + '+05:00'}), 'must be in UTC'),
    Kind('time as a number', 'transactions', _with(tx_datetime=1_500_000_000),
         'must be an ISO-8601 UTC timestamp string'),
    Kind('far future', 'transactions', _with(tx_datetime='2100-01-01T00:00:00Z'), 'after the record\'s Kafka'),
    Kind('far past', 'transactions', _with(tx_datetime='1970-01-01T00:00:00Z'), 'before the record\'s Kafka'),
    Kind('NUL in time', 'transactions', lambda valid: _json({**valid, 'tx_datetime': valid['tx_datetime'] + '\x00'}),
         'is not an ISO-8601 timestamp'),
    Kind('duplicate keys', 'transactions', lambda valid: _json(valid)[:-1] + b', "amount": -1}',
         'must not be negative'),
    Kind('deep nesting', 'transactions', lambda valid: b'[' * 30_000 + b']' * 30_000, 'nested deeper', weight=2),
    Kind('oversized', 'transactions', lambda valid: _json({**valid, 'pad': 'x' * 70_000}), 'oversized', weight=2),
    Kind('near the broker limit', 'transactions', lambda valid: _json({**valid, 'pad': 'x' * 900_000}), 'oversized',
         weight=1),
    Kind('repeated transaction', 'transactions', lambda valid: _json(valid), 'repeated transaction_id', weight=5),
    Kind('repeat of another amount', 'transactions', lambda valid: _json({**valid, 'amount': 1.25}),
         'repeated transaction_id', weight=5),
    Kind('boolean label', 'labels', _with(is_fraud=True), 'field is_fraud must be 0 or 1'),
    Kind('label of 2', 'labels', _with(is_fraud=2), 'field is_fraud must be 0 or 1'),
    Kind('scenario out of range', 'labels', _with(fraud_scenario=1000), 'must be an integer from 0 to 999'),
    Kind('label from the future', 'labels', _with(tx_datetime='2100-01-01T00:00:00Z'), 'after the record\'s Kafka'),
    Kind('label not JSON', 'labels', lambda valid: _json(valid)[:-1], 'not valid JSON'),
    Kind('orphan label', 'labels', lambda valid: _json({**valid, 'transaction_id': 10 ** 12 + valid['transaction_id']}),
         None),
]


def _hostile_stream(valid_events: List[simulator.Event], count: int, seed: int):
  """The valid events with ``count`` hostile records among them, each right after the valid record it is made from.

  Yields (topic role, key, value, timestamp ms, kind or None).
  """
  rng = random.Random(seed)
  by_topic = {role: [i for i, event in enumerate(valid_events) if event.is_label == (role == 'labels')]
              for role in ('transactions', 'labels')}
  kinds = [kind for kind in KINDS for _ in range(kind.weight)]
  after: Dict[int, List[Kind]] = defaultdict(list)
  for _ in range(count):
    kind = rng.choice(kinds)
    after[rng.choice(by_topic[kind.topic])].append(kind)
  for i, event in enumerate(valid_events):
    role = 'labels' if event.is_label else 'transactions'
    yield role, event.key, event.value, event.timestamp_ms, None
    for kind in after[i]:
      yield kind.topic, event.key, kind.make(json.loads(event.value)), event.timestamp_ms, kind


def _read_all(bootstrap: str, topic: str) -> List:
  consumer = new_consumer({'bootstrap.servers': bootstrap})
  consumer.assign([TopicPartition(t, p, 0) for t, p in list_partitions(consumer, [topic])])
  messages, quiet_since = [], time.monotonic()
  while time.monotonic() - quiet_since < 3:
    batch = [m for m in consumer.consume(1000, 0.5) if not m.error()]
    messages += batch
    if batch:
      quiet_since = time.monotonic()
  consumer.close()
  return messages


def test_hostile_records_stop_nothing_and_each_is_a_dead_letter_with_its_reason(bootstrap, new_topic, group_id,
                                                                                tmp_path):
  topics = {name: new_topic(suffix=f'-{name}') for name in TOPICS}
  simulation = simulate(SimulationConfig(customers=150, terminals=300, days=12, seed=21))
  valid_events = list(fraud_simulator.events(simulation))
  hostile_count = HOSTILE_RECORDS
  assert hostile_count >= 10_000 and len(KINDS) >= 30
  model_dir, warehouse = str(tmp_path / 'models'), f'duckdb://{tmp_path}/warehouse.duckdb'
  publish_model(model_dir, seed=1)
  topic_args = [f'--{name.replace("-", "_")}_topic={topic}' for name, topic in topics.items()
                if name in ('transactions', 'labels', 'dead-letter')]
  scorer = PipelineProcess('pipelines.scoring', [
      '--bootstrap_servers', bootstrap, '--model_dir', model_dir, '--consumer_group', f'{group_id}-scorer',
      '--score_from', 'earliest', f'--predictions_topic={topics["predictions"]}', f'--alerts_topic={topics["alerts"]}',
      *topic_args], str(tmp_path / 'scorer.log'))
  ingest = PipelineProcess('pipelines.ingest', [
      '--bootstrap_servers', bootstrap, '--warehouse', warehouse, '--consumer_group', f'{group_id}-ingest',
      *topic_args], str(tmp_path / 'ingest.log'))
  pipelines = {'scorer': scorer, 'ingest': ingest}

  producer = AcknowledgedProducer({'bootstrap.servers': bootstrap, 'message.max.bytes': 2_000_000})
  produced = Counter()
  for role, key, value, timestamp_ms, kind in _hostile_stream(valid_events, hostile_count, seed=3):
    headers = [(FUZZ_HEADER, kind.name.encode())] if kind else None
    producer.send(topics[role], value, key, headers, timestamp_ms)
    produced[kind.name if kind else role] += 1
  assert producer.flush(120)[0] == 0
  try:
    for pipeline in pipelines.values():
      pipeline.start()
    deadline = time.monotonic() + 420
    for name, group in (('scorer', f'{group_id}-scorer'), ('ingest', f'{group_id}-ingest')):
      while group_lag({'bootstrap.servers': bootstrap}, group, [topics['transactions'], topics['labels']]) != 0:
        assert pipelines[name].running(), f'the {name} stopped:\n{pipelines[name].log_tail()}'
        assert time.monotonic() < deadline, f'the {name} did not catch up:\n{pipelines[name].log_tail()}'
        time.sleep(2)
    assert all(pipeline.running() for pipeline in pipelines.values()), 'no pipeline stopped'
  finally:
    for pipeline in pipelines.values():
      if pipeline.running():
        pipeline.kill()

  valid = simulation.transactions.set_index('transaction_id')
  # Every valid transaction scored once; no hostile one scored.
  predictions = TopicReader(bootstrap, topics['predictions'])
  predictions.read_until(lambda records: len(records) >= len(valid), 60)
  scored = Counter(r['transaction_id'] for r in predictions.records)
  assert set(scored) == set(valid.index) and max(scored.values()) == 1
  # Every valid transaction in the warehouse once, as first produced (a repeat of another amount did not win).
  rows = open_warehouse(warehouse).query('SELECT transaction_id, amount FROM features')
  assert sorted(rows['transaction_id']) == sorted(valid.index)
  amounts = rows.set_index('transaction_id')['amount'].astype(float)
  assert (abs(amounts - valid.loc[amounts.index, 'amount'].round(2)) < 1e-9).all()

  # Every hostile record a dead letter with its reason, from each pipeline; none of a valid record.
  letters = _read_all(bootstrap, topics['dead-letter'])
  by_source = defaultdict(list)
  for letter in letters:
    headers = dict(letter.headers())
    by_source[tuple(headers[name].decode() for name in SOURCE_HEADERS[:3])].append(headers[REASON_HEADER].decode())
  records = _read_all(bootstrap, topics['transactions']) + _read_all(bootstrap, topics['labels'])
  kind_of = {kind.name: kind for kind in KINDS}
  missing, wrong = Counter(), Counter()
  for record in records:
    name = dict(record.headers() or {}).get(FUZZ_HEADER, b'').decode()
    reasons = by_source.pop((record.topic(), str(record.partition()), str(record.offset())), [])
    expected = kind_of[name].reason if name else None
    if expected is None:
      assert not reasons, f'{name or "a valid record"} was sent to the dead letters: {reasons}'
    elif len(reasons) != 2:
      missing[name] += 1
    elif not all(expected in reason for reason in reasons):
      wrong[name] += 1
  assert not missing and not wrong, f'dead letters missing: {missing}; with another reason: {wrong}'
  assert not by_source, f'dead letters of no record: {list(by_source)[:5]}'
  print(f'{sum(produced[k.name] for k in KINDS):,} hostile records of {len(KINDS)} kinds among '
        f'{len(valid_events):,} valid events: {len(letters):,} dead letters, {len(scored):,} transactions scored')
