"""The ingest pipeline, from a real broker to the embedded warehouse and to BigQuery (its emulator)."""

import contextlib
import hashlib
import logging
import re
import subprocess
import sys
import time
import uuid
from decimal import Decimal

import apache_beam as beam
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from kbml import simulator
from kbml.warehouse import WarehouseError, open_warehouse
from pipelines import ingest
from tests import test_features
from tests.conftest import consume, local_options, produce
from transforms import warehouse_io
from transforms.batches import Batch
from transforms.feature_forms import KEYED_STATE, ORDERED_BUNDLES
from transforms.kafka_io import KafkaRecord, ReadFromKafka
from transforms.records import (
  DEAD_LETTER_TAG,
  MAX_DEAD_LETTER_BYTES,
  ORIGINAL_BYTES_HEADER,
  ORIGINAL_SHA256_HEADER,
  REASON_HEADER,
  SOURCE_HEADERS,
  DeadLetter,
  InvalidRecord,
  ParseRecords,
  dead_letter_message,
  parse_utc_timestamp,
)
from use_cases.fraud.features import ComputeFeatures
from use_cases.fraud.records import LABEL_SCHEMA, TRANSACTION_SCHEMA
from use_cases.fraud.simulator import SimulationConfig, events, simulate

VALID = (b'{"transaction_id": %d, "tx_datetime": "2018-04-01T10:%02d:%02dZ", "customer_id": %d, '
         b'"terminal_id": %d, "amount": %d.%02d}')

# One bad record of each kind, and the words its dead-letter reason must contain.
BAD_RECORDS = [
    (b'{"transaction_id": 1, "tx_datetime": ', 'not valid JSON'),
    (b'\xff\xfe\x00garbage', 'not valid JSON'),
    (b'[1, 2, 3]', 'must be a JSON object'),
    (None, 'empty transaction record'),
    (b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 2, "terminal_id": 3}',
     'missing field amount'),
    (b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 2, "terminal_id": 3, '
     b'"amount": "12.50"}', 'field amount must be a number'),
    (b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 2, "terminal_id": 3, '
     b'"amount": -4.10}', 'field amount must not be negative'),
    (b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 2, "terminal_id": 3, '
     b'"amount": NaN}', 'not valid JSON: NaN is not a JSON number'),
    (b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 2, "terminal_id": 3, '
     b'"amount": 1.234}', 'field amount must have at most 2 decimals'),
    (b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": "C-17", "terminal_id": 3, '
     b'"amount": 1.5}', 'field customer_id must be an integer id'),
    (b'{"transaction_id": -8, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 2, "terminal_id": 3, '
     b'"amount": 1.5}', 'field transaction_id is not a valid id'),
    (b'{"transaction_id": 1, "tx_datetime": "2018-13-45T99:00:00Z", "customer_id": 2, "terminal_id": 3, '
     b'"amount": 1.5}', 'field tx_datetime is not an ISO-8601 timestamp'),
    (b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00+02:00", "customer_id": 2, "terminal_id": 3, '
     b'"amount": 1.5}', 'field tx_datetime must be in UTC'),
    (b'{"transaction_id": 1, "tx_datetime": "2100-01-01T00:00:00Z", "customer_id": 2, "terminal_id": 3, '
     b'"amount": 1.5}', 'after the record\'s Kafka timestamp'),
    # Produced now: a valid transaction of 2018 without its event time as the Kafka timestamp.
    (b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 2, "terminal_id": 3, '
     b'"amount": 1.5}', 'before the record\'s Kafka timestamp'),
    (b'{"transaction_id": 1, "pad": "' + b'x' * 70_000 + b'"}',
     'oversized transaction record: 70032 bytes, the limit is 65536'),
]


def _ingest_args(bootstrap, topics, warehouse, *extra):
  return ['--bootstrap_servers', bootstrap, '--transactions_topic', topics['transactions'],
          '--labels_topic', topics['labels'], '--dead_letter_topic', topics['dead-letter'],
          '--warehouse', warehouse, *extra]


@pytest.fixture
def topics(new_topic):
  return {name: new_topic(partitions=4, suffix=f'-{name}') for name in ('transactions', 'labels', 'dead-letter')}


def test_valid_records_reach_the_warehouse_and_bad_ones_the_dead_letter_topic(bootstrap, topics, tmp_path, group_id,
                                                                             capsys, caplog, monkeypatch):
  messages, valid_ids, expected_reasons = [], set(), {}
  for i in range(11_000):
    if i % 11 == 10:
      value, reason = BAD_RECORDS[(i // 11) % len(BAD_RECORDS)]
      expected_reasons[value] = reason
    else:
      value = VALID % (i, (i // 60) % 60, i % 60, i % 500, i % 300, i % 200, i % 100)
      valid_ids.add(i)
    tx_time = parse_utc_timestamp(f'2018-04-01T10:{(i // 60) % 60:02d}:{i % 60:02d}Z')
    messages.append((b'%d' % (i % 500), value, [('trace', b'%d' % i)], int(tx_time * 1000) if i in valid_ids else 0))
  produce(bootstrap, topics['transactions'], messages)
  warehouse = f'duckdb://{tmp_path}/warehouse.duckdb'

  monkeypatch.setattr(warehouse_io, 'PROGRESS_EVERY_S', 0.0)  # a progress line after every write
  with caplog.at_level(logging.INFO):
    ingest.run(_ingest_args(bootstrap, topics, warehouse, '--stop_at_end', '--consumer_group', group_id))

  assert any('rows written to features so far by this worker' in message for message in caplog.messages)
  summary = capsys.readouterr().out
  assert 'ingest finished in' in summary and 'wrote 10,000 rows to features' in summary
  assert '; 1,000 dead letter(s)' in summary
  features = open_warehouse(warehouse).query('SELECT transaction_id, amount FROM features')
  assert len(features) == 10_000 and set(features['transaction_id']) == valid_ids
  dead = consume(bootstrap, topics['dead-letter'], 1_000)
  assert len(dead) == 1_000
  sources = set()
  for message in dead:
    headers = dict(message.headers())
    assert expected_reasons[message.value()] in headers[REASON_HEADER].decode()
    assert headers[SOURCE_HEADERS[0]].decode() == topics['transactions']
    offset, trace = int(headers[SOURCE_HEADERS[2]]), int(headers['trace'])
    assert trace % 11 == 10 and messages[trace][1] == message.value()
    sources.add((int(headers[SOURCE_HEADERS[1]]), offset))
  assert len(sources) == 1_000, 'each dead letter names a distinct source record'


def test_replay_of_a_time_or_offset_range_rebuilds_the_same_rows(bootstrap, topics, tmp_path, caplog):
  simulation = simulate(SimulationConfig(customers=100, terminals=200, days=75, seed=5))
  simulator.produce(events(simulation), {'bootstrap.servers': bootstrap}, topics['transactions'], topics['labels'])
  warehouse = f'duckdb://{tmp_path}/warehouse.duckdb'
  ingest.run(_ingest_args(bootstrap, topics, warehouse, '--stop_at_end', '--consumer_group', 'replay-original'))
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='transforms.kafka_io'):
    ingest.run(_ingest_args(bootstrap, topics, warehouse, '--replay_from', '2018-06-05T00:00:00Z',
                            '--replay_to', '2018-06-12T00:00:00Z', '--features_table', 'features_replay'))
  # The histories reach 60 days back, to 2018-04-06: the transactions of the first 5 days are not read (the
  # first labels, 7 days after their transactions, are all read).
  starts = [int(m) for m in re.findall(rf'reading {topics["transactions"]}\[\d\] from offset (\d+)', caplog.text)]
  assert len(starts) == 4 and all(start > 0 for start in starts)

  ingest.run(_ingest_args(bootstrap, topics, warehouse, '--replay_offsets', '0:500-900,2:100-300',
                          '--features_table', 'features_replay_offsets'))

  store = open_warehouse(warehouse)
  in_range = "WHERE tx_datetime >= TIMESTAMPTZ '2018-06-05 00:00:00+00' AND tx_datetime < TIMESTAMPTZ '2018-06-12'"
  original = store.query(f'SELECT * FROM features {in_range} ORDER BY transaction_id')
  replayed = store.query('SELECT * FROM features_replay ORDER BY transaction_id')
  assert len(original) > 1_000 and (original['TERMINAL_ID_RISK_30DAY_WINDOW'] > 0).any()
  assert replayed.equals(original)
  in_offsets = ('WHERE (kafka_partition = 0 AND kafka_offset >= 500 AND kafka_offset < 900) '
                'OR (kafka_partition = 2 AND kafka_offset >= 100 AND kafka_offset < 300)')
  original = store.query(f'SELECT * FROM features {in_offsets} ORDER BY transaction_id')
  replayed = store.query('SELECT * FROM features_replay_offsets ORDER BY transaction_id')
  assert len(original) == 600 and replayed.equals(original)
  assert len(store.query('SELECT * FROM labels')) == len(simulation.transactions)


def test_a_run_after_another_writes_the_rows_one_run_writes_and_no_dead_letter_twice(bootstrap, topics, tmp_path,
                                                                                      group_id):
  simulation = simulate(SimulationConfig(customers=150, terminals=200, days=40, seed=6))
  config = {'bootstrap.servers': bootstrap}
  restarted, once = f'duckdb://{tmp_path}/restarted.duckdb', f'duckdb://{tmp_path}/once.duckdb'
  for part, (from_day, until_day) in enumerate([(None, 30), (30, None)]):
    simulator.produce(events(simulation, from_day, until_day), config, topics['transactions'], topics['labels'])
    produce(bootstrap, topics['transactions'], [(b'bad', BAD_RECORDS[part][0], [])])
    ingest.run(_ingest_args(bootstrap, topics, restarted, '--stop_at_end', '--consumer_group', group_id))
  ingest.run(_ingest_args(bootstrap, topics, once, '--stop_at_end', '--consumer_group', f'{group_id}-once'))

  for table in ('features', 'labels'):
    rows = [open_warehouse(url).query(f'SELECT * FROM {table} ORDER BY transaction_id') for url in (restarted, once)]
    assert len(rows[0]) == len(simulation.transactions)
    pd.testing.assert_frame_equal(rows[0], rows[1])
  # Each bad record is sent once by the runs under one group, and once more by the run of the other group.
  assert len(consume(bootstrap, topics['dead-letter'], 10, timeout_s=5)) == 2 + 2


def test_bigquery_and_the_embedded_warehouse_get_the_same_rows(bootstrap, topics, tmp_path, bigquery_emulator,
                                                               capsys):
  simulation = simulate(SimulationConfig(customers=100, terminals=150, days=20, seed=8))
  simulator.produce(events(simulation), {'bootstrap.servers': bootstrap}, topics['transactions'], topics['labels'])
  embedded = f'duckdb://{tmp_path}/warehouse.duckdb'
  bigquery = f'bigquery://{bigquery_emulator}/ingest_{uuid.uuid4().hex[:8]}'
  ingest.run(_ingest_args(bootstrap, topics, embedded, '--stop_at_end', '--consumer_group', 'to-duckdb'))
  ingest.run(_ingest_args(bootstrap, topics, bigquery, '--stop_at_end', '--consumer_group', 'to-bigquery',
                          '--bigquery_temp_location', str(tmp_path / 'bigquery-loads')))
  count = len(simulation.transactions)
  assert capsys.readouterr().out.count(f'wrote {count:,} rows to features, {count:,} rows to labels') == 2

  for table in ('features', 'labels'):
    rows = [open_warehouse(url).query(f'SELECT * FROM {open_warehouse(url).table_ref(table)}')
            .sort_values('transaction_id').reset_index(drop=True) for url in (embedded, bigquery)]
    assert len(rows[0]) == len(simulation.transactions)
    if 'amount' in rows[0]:  # exact decimals both; the stores keep different scales (13.460000000, 13.46)
      for frame in rows:
        frame['amount'] = frame['amount'].map(lambda amount: amount.normalize())
    pd.testing.assert_frame_equal(rows[0], rows[1], check_dtype=False)


def test_streaming_ingest_writes_the_same_rows_while_it_runs(bootstrap, topics, tmp_path, group_id):
  streaming, bounded = f'duckdb://{tmp_path}/streaming.duckdb', f'duckdb://{tmp_path}/bounded.duckdb'
  job = subprocess.Popen([sys.executable, '-m', 'pipelines.ingest', *_ingest_args(bootstrap, topics, streaming),
                          '--consumer_group', group_id], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    simulation = simulate(SimulationConfig(customers=100, terminals=150, days=10, seed=9))
    simulator.produce(events(simulation), {'bootstrap.servers': bootstrap}, topics['transactions'], topics['labels'])
    produce(bootstrap, topics['transactions'], [(b'bad', value, []) for value, _ in BAD_RECORDS])
    # Rows are released as the watermark passes them: all but the last moments' transactions.
    deadline, written = time.monotonic() + 120, pd.DataFrame()
    while len(written) < 0.9 * len(simulation.transactions) and time.monotonic() < deadline:
      time.sleep(2)
      store = open_warehouse(streaming)
      with contextlib.suppress(WarehouseError):  # the job holds the file while it writes a bundle
        if 'features' in store.tables():
          written = store.query('SELECT * FROM features ORDER BY transaction_id')
    assert len(written) >= 0.9 * len(simulation.transactions), 'the streaming job writes as the stream flows'
    assert len(consume(bootstrap, topics['dead-letter'], len(BAD_RECORDS))) == len(BAD_RECORDS)
    assert job.poll() is None
  finally:
    job.kill()
    job.wait()

  ingest.run(_ingest_args(bootstrap, topics, bounded, '--stop_at_end', '--consumer_group', f'{group_id}-bounded'))
  ids = ','.join(str(i) for i in written['transaction_id'])
  expected = open_warehouse(bounded).query(f'SELECT * FROM features WHERE transaction_id IN ({ids}) '
                                           'ORDER BY transaction_id')
  assert written.equals(expected)


TRANSACTION = b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 2, "terminal_id": 3, '
LABEL = b'{"transaction_id": 1, "tx_datetime": "2018-04-01T10:00:00Z", "customer_id": 2, "terminal_id": 3, ' \
        b'"fraud_scenario": 0, '


@pytest.mark.parametrize('record, reason', [
    (b'[' * 5000 + b']' * 5000, 'nested deeper'),  # RecursionError in json.loads, which stopped the pipelines
    (b'{"a": ' * 3000 + b'1' + b'}' * 3000, 'nested deeper'),
    (TRANSACTION + b'"amount": Infinity}', 'Infinity is not a JSON number'),
    (TRANSACTION + b'"amount": 85.655}', 'field amount must have at most 2 decimals'),
    (TRANSACTION + b'"amount": 85.6500011}', 'field amount must have at most 2 decimals'),
    (LABEL + b'"is_fraud": true}', 'field is_fraud must be 0 or 1'),
    (LABEL + b'"is_fraud": 1.0}', 'field is_fraud must be 0 or 1'),
    (LABEL + b'"is_fraud": 2}', 'field is_fraud must be 0 or 1'),
])
def test_a_hostile_record_is_invalid_with_its_reason(record, reason):
  schema = LABEL_SCHEMA if record.startswith(LABEL) else TRANSACTION_SCHEMA
  with pytest.raises(InvalidRecord, match=reason):
    schema.parse(record)


@pytest.mark.parametrize('written, amount', [
    (b'85.64999999999999', '85.65'),  # 85.65 * 1 as pandas writes it
    (b'428.25000000000006', '428.25'),  # 85.65 * 5
    (b'12.3000000', '12.30'),
    (b'7', '7'),
])
def test_an_amount_within_a_millionth_of_a_cent_is_that_cent(written, amount):
  assert TRANSACTION_SCHEMA.parse(TRANSACTION + b'"amount": ' + written + b'}').amount == Decimal(amount)


@pytest.mark.parametrize('value_bytes, header_bytes', [(1_000_000, 0), (5_000_000, 0), (900_000, 700_000)])
def test_a_dead_letter_too_large_to_produce_whole_is_cut_and_produced(bootstrap, new_topic, value_bytes,
                                                                      header_bytes):
  value = bytes(range(256)) * (value_bytes // 256)
  record = KafkaRecord('transactions', 2, 41, 0, b'k' * 5000, value, (('trace', b'h' * header_bytes),))
  with pytest.raises(InvalidRecord) as invalid:
    TRANSACTION_SCHEMA.parse(value)
  key, cut, headers = dead_letter_message(DeadLetter(record, str(invalid.value)))
  named = dict(headers)
  assert len(key) + len(cut) + sum(len(name) + len(data) for name, data in headers) <= MAX_DEAD_LETTER_BYTES
  assert value.startswith(cut) and len(cut) > MAX_DEAD_LETTER_BYTES // 2
  assert named[ORIGINAL_BYTES_HEADER] == str(len(value)).encode()
  assert named[ORIGINAL_SHA256_HEADER] == hashlib.sha256(value).hexdigest().encode()
  assert named[SOURCE_HEADERS[2]] == b'41' and b'oversized' in named[REASON_HEADER]
  assert produce(bootstrap, new_topic(), [(key, cut, headers)]) == 1  # the whole record was refused: MSG_SIZE_TOO_LARGE


def test_a_batch_of_records_parses_to_a_list_of_events_and_a_dead_letter_per_bad_one():
  records = [KafkaRecord('transactions', 0, offset, 0, None, value, ())
             for offset, value in enumerate([VALID % (1, 0, 0, 2, 3, 10, 0), BAD_RECORDS[0][0],
                                             VALID % (4, 0, 1, 5, 6, 20, 50)])]
  with TestPipeline(options=local_options()) as p:
    parsed = p | beam.Create([Batch(records)]) | ParseRecords({'transactions': TRANSACTION_SCHEMA})
    assert_that(parsed['records'] | beam.Map(lambda events: [(e.transaction_id, e.kafka_offset) for e in events]),
                equal_to([[(1, 0), (4, 2)]]), label='OneListOfTheValid')
    assert_that(parsed[DEAD_LETTER_TAG] | beam.Map(lambda dead: (dead.record.offset, BAD_RECORDS[0][1] in dead.reason)),
                equal_to([(1, True)]), label='DeadLetters')


@pytest.mark.parametrize('form', [ORDERED_BUNDLES, KEYED_STATE])
def test_streaming_features_from_kafka_are_exact(bootstrap, topics, form):
  # Small read budgets make the local runner read each partition over many bundles, as a long stream does; the
  # partitions are read in event-time step (without it, 1.5 % of these rows had wrong terminal features).
  simulation = simulate(SimulationConfig(customers=150, terminals=200, days=40, seed=5))
  simulator.produce(events(simulation), {'bootstrap.servers': bootstrap}, topics['transactions'], topics['labels'])
  with TestPipeline(options=local_options()) as p:
    records = p | ReadFromKafka({'bootstrap.servers': bootstrap}, [topics['transactions'], topics['labels']],
                                stop_at_end=True, read_budget_records=300, align_partitions=True,
                                batched=form == ORDERED_BUNDLES)
    parsed = records | ParseRecords({topics['transactions']: TRANSACTION_SCHEMA, topics['labels']: LABEL_SCHEMA})
    rows = (parsed['records'] | ComputeFeatures(form=form)).rows
    assert_that(rows, test_features.equal_features(test_features.independent_features(simulation.transactions)))
