"""The warehouse interface: the embedded store and BigQuery (its emulator)."""

import uuid
from decimal import Decimal

import pytest

from kbml.warehouse import TableSchema, WarehouseError, open_warehouse
from transforms.metrics import METRICS_SCHEMA, METRICS_TABLE, metric_rows, read_sums, summaries
from use_cases.fraud.records import LABELS_TABLE

SCHEMA = TableSchema(columns=(('id', 'INT64'), ('at', 'TIMESTAMP'), ('amount', 'NUMERIC'), ('score', 'FLOAT64')),
                     key=('id',))
ROWS = [{'id': i, 'at': f'2018-04-01T00:00:{i:02d}Z', 'amount': f'{i}.{i:02d}', 'score': i / 7} for i in range(50)]


def test_embedded_store_upserts_by_key_and_keeps_decimals_exact(tmp_path):
  warehouse = open_warehouse(f'duckdb://{tmp_path}/w.duckdb')
  warehouse.write_rows('t', SCHEMA, ROWS)
  warehouse.write_rows('t', SCHEMA, ROWS[:10])  # a retried bundle
  rows = warehouse.query('SELECT * FROM t ORDER BY id')
  assert len(rows) == 50 and rows['amount'][7] == Decimal('7.07') and rows['score'][7] == 1.0
  assert warehouse.tables() == ['t']


def test_bigquery_warehouse_writes_and_reads_through_the_storage_api(bigquery_emulator):
  warehouse = open_warehouse(f'bigquery://{bigquery_emulator}/w_{uuid.uuid4().hex[:8]}')
  warehouse.prepare()
  warehouse.write_rows('t', SCHEMA, ROWS)
  rows = warehouse.query(f'SELECT * FROM {warehouse.table_ref("t")} ORDER BY id')
  assert len(rows) == 50 and rows['amount'][7] == Decimal('7.07') and rows['score'][7] == 1.0
  assert warehouse.tables() == ['t']


@pytest.mark.parametrize('url', ['postgres://db/x', 'bigquery://project-only', 'duck:///x'])
def test_an_unknown_warehouse_url_is_a_clear_error(url):
  with pytest.raises(WarehouseError, match='use duckdb:///path/file.duckdb or bigquery://PROJECT/DATASET'):
    open_warehouse(url)


@pytest.fixture(params=['duckdb', 'bigquery'])
def any_warehouse(request, tmp_path):
  if request.param == 'duckdb':
    return open_warehouse(f'duckdb://{tmp_path}/w.duckdb')
  warehouse = open_warehouse(f"bigquery://{request.getfixturevalue('bigquery_emulator')}/w_{uuid.uuid4().hex[:8]}")
  warehouse.prepare()
  return warehouse


def test_a_newer_schema_adds_its_columns_to_an_existing_table(any_warehouse):
  any_warehouse.write_rows('t', SCHEMA, ROWS[:5])
  newer = TableSchema(columns=(*SCHEMA.columns, ('new_feature', 'FLOAT64')), key=SCHEMA.key)
  any_warehouse.write_rows('t', newer, [{**row, 'new_feature': 0.5} for row in ROWS[5:10]])
  rows = any_warehouse.query(f'SELECT id, new_feature FROM {any_warehouse.table_ref("t")} ORDER BY id')
  assert list(rows['id']) == list(range(10))
  assert rows['new_feature'][:5].isna().all() and (rows['new_feature'][5:] == 0.5).all()


HOSTILE_TEXT = ["it's", "x' OR '1'='1", 'a\\b', "\\'; DROP TABLE t; --", 'line\nbreak\ttab', '"double"', 'é ünï 😀']


def test_any_text_as_a_string_literal_reads_back_as_itself(any_warehouse):
  # The monitor looks up its alerts by model version, a field of records read from Kafka.
  any_warehouse.write_rows('t', SCHEMA, ROWS[:1])  # the embedded store is a file once written
  values = any_warehouse.query(' UNION ALL '.join(
      f'SELECT {i} AS i, {any_warehouse.string(text)} AS text' for i, text in enumerate(HOSTILE_TEXT)))
  assert list(values.sort_values('i')['text']) == HOSTILE_TEXT


def test_a_transaction_keeps_its_first_label(tmp_path):
  warehouse = open_warehouse(f'duckdb://{tmp_path}/labels.duckdb')
  label = {'transaction_id': 1, 'tx_datetime': '2018-04-01T10:00:00Z', 'customer_id': 2, 'terminal_id': 3,
           'is_fraud': 0, 'fraud_scenario': 0, 'known_datetime': '2018-04-08T10:00:00Z'}
  flipped = {**label, 'is_fraud': 1, 'fraud_scenario': 1, 'known_datetime': '2018-04-09T10:00:00Z'}
  warehouse.write_rows('labels', LABELS_TABLE, [label, flipped])  # in one write
  warehouse.write_rows('labels', LABELS_TABLE, [flipped])  # and in another
  assert warehouse.query('SELECT is_fraud FROM labels')['is_fraud'].tolist() == [0]


def test_metrics_written_under_the_former_fraud_names_add_up_with_the_positives(any_warehouse):
  start = 1_700_006_400.0
  sums = {(start, start + 86_400, 'v1', 'champion'): {
      ('labelled', 0): 4.0, ('positives', 0): 1.0, ('true_positives', 0): 1.0, ('positive_score', 900): 1.0,
      ('negative_score', 100): 3.0}}
  rows = metric_rows(sums, 'now', '2023-11-16T00:00:00Z')
  former_names = {'positives': 'frauds', 'positive_score': 'fraud_score', 'negative_score': 'genuine_score'}
  written_before = [{**row, 'metric': former_names.get(row['metric'], row['metric']), 'part': 'before'} for row in rows]
  any_warehouse.write_rows(METRICS_TABLE, METRICS_SCHEMA, written_before + rows)

  summary = summaries(read_sums(any_warehouse)).iloc[0]
  assert (summary['labelled'], summary['positives'], summary['recall'], summary['average_precision']) == (8, 2, 1, 1)
