"""The warehouse that holds training data: BigQuery, or an embedded DuckDB file.

Both sit behind one small interface (create a table, upsert rows, query), so
the pipelines, the trainer and the demo do not care which one they use. A
warehouse is named by a URL:

- ``duckdb:///path/to/warehouse.duckdb`` (the default, ``.kbml/warehouse.duckdb``);
- ``bigquery://PROJECT/DATASET``; set ``KBML_BIGQUERY_ENDPOINT`` to talk to a
  BigQuery emulator instead of Google's service.

(pandas and the database clients are imported when first used: the command
line imports this module for its error type and must start fast.)

Rows are keyed (the key columns of the table's schema): the embedded store
replaces a row written twice, so at-least-once delivery leaves no duplicates;
BigQuery does not enforce keys, so reads of it keep one row per key.
"""

import dataclasses
import datetime
import json
import os
import time
import urllib.parse
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

from kbml.local_state import local_state_dir

if TYPE_CHECKING:
  import pandas

# Column types, by their BigQuery names, and their DuckDB equivalents.
_DUCKDB_TYPES = {'INT64': 'BIGINT', 'FLOAT64': 'DOUBLE', 'STRING': 'VARCHAR', 'TIMESTAMP': 'TIMESTAMPTZ',
                 'NUMERIC': 'DECIMAL(38, 9)'}


@dataclasses.dataclass(frozen=True)
class TableSchema:
  """A table's columns (name, BigQuery type), the columns that identify a row, and which of two rows of one key
  stays: the last written (``keep_first`` False), or the first (the embedded warehouse's upsert; BigQuery
  appends, and readers keep one row per key)."""
  columns: Tuple[Tuple[str, str], ...]
  key: Tuple[str, ...]
  keep_first: bool = False

  @property
  def names(self) -> List[str]:
    return [name for name, _ in self.columns]

  def bigquery_schema(self) -> Dict[str, List[Dict[str, str]]]:
    """The schema as Beam's and BigQuery's JSON form."""
    return {'fields': [{'name': name, 'type': kind, 'mode': 'REQUIRED' if name in self.key else 'NULLABLE'}
                       for name, kind in self.columns]}

  def duckdb_ddl(self, table: str) -> str:
    columns = ', '.join(f'"{name}" {_DUCKDB_TYPES[kind]}' for name, kind in self.columns)
    return f'CREATE TABLE IF NOT EXISTS "{table}" ({columns}, PRIMARY KEY ({", ".join(self.key)}))'


class WarehouseError(RuntimeError):
  """The warehouse could not be opened or written."""


class Warehouse:
  """What the project needs of a warehouse."""

  url: str

  def prepare(self):
    """Creates what must exist before tables can be written (a BigQuery dataset)."""

  def ensure_table(self, table: str, schema: TableSchema):
    raise NotImplementedError

  def write_rows(self, table: str, schema: TableSchema, rows: Sequence[Mapping[str, object]]):
    """Writes rows; a row whose key is already there replaces it (embedded store)."""
    raise NotImplementedError

  def query(self, sql: str) -> 'pandas.DataFrame':
    """Runs a query; table names are written as {table} placeholders, see :meth:`table_ref`."""
    raise NotImplementedError

  def table_ref(self, table: str) -> str:
    """How a query names ``table`` in this warehouse."""
    raise NotImplementedError

  def tables(self) -> List[str]:
    raise NotImplementedError

  def timestamp(self, moment: datetime.datetime) -> str:
    """A UTC instant as a literal of this warehouse's SQL."""
    raise NotImplementedError

  def string(self, value: str) -> str:
    """Any text as a string literal of this warehouse's SQL, quotes and backslashes escaped."""
    raise NotImplementedError


class DuckDBWarehouse(Warehouse):
  """The embedded warehouse: one DuckDB file.

  DuckDB lets one process write a file at a time, so every operation opens
  the file, does its work and closes it, waiting up to ``lock_timeout_s``
  while another process holds it.
  """

  def __init__(self, path: str, lock_timeout_s: float = 60.0):
    self.path = os.path.abspath(path)
    self.url = f'duckdb://{self.path}'
    self._lock_timeout_s = lock_timeout_s

  def _connect(self, read_only: bool = False):
    import duckdb
    if read_only and not os.path.exists(self.path):
      raise WarehouseError(f'The warehouse {self.path} does not exist yet: run `kbml ingest` first.')
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    deadline = time.monotonic() + self._lock_timeout_s
    while True:
      try:
        return duckdb.connect(self.path, read_only=read_only)
      except duckdb.IOException as e:
        if 'lock' not in str(e).lower() or time.monotonic() > deadline:
          raise WarehouseError(f'Cannot open the warehouse {self.path}: {e}') from e
        time.sleep(0.1)

  def ensure_table(self, table, schema):
    with self._connect() as connection:
      self._ensure_table(connection, table, schema)

  @staticmethod
  def _ensure_table(connection, table: str, schema: TableSchema):
    """Creates the table, or adds the columns a newer schema has (new features): existing rows get NULL there."""
    connection.execute(schema.duckdb_ddl(table))
    existing = {row[0] for row in connection.execute(
        'SELECT column_name FROM information_schema.columns WHERE table_name = ?', [table]).fetchall()}
    for name, kind in schema.columns:
      if name not in existing:
        connection.execute(f'ALTER TABLE "{table}" ADD COLUMN "{name}" {_DUCKDB_TYPES[kind]}')

  def write_rows(self, table, schema, rows):
    if not rows:
      return
    import pandas
    batch = pandas.DataFrame.from_records(rows, columns=schema.names)
    with self._connect() as connection:
      self._ensure_table(connection, table, schema)
      connection.register('batch', batch)
      columns = ', '.join(f'"{name}"' for name in schema.names)
      casts = ', '.join(f'CAST("{name}" AS {_DUCKDB_TYPES[kind]})' for name, kind in schema.columns)
      conflict = 'IGNORE' if schema.keep_first else 'REPLACE'
      connection.execute(f'INSERT OR {conflict} INTO "{table}" ({columns}) SELECT {casts} FROM batch')

  def query(self, sql):
    with self._connect(read_only=True) as connection:
      # Through Arrow, DECIMAL columns stay exact (a plain .df() turns them into floats).
      return connection.sql(sql).to_arrow_table().to_pandas()

  def table_ref(self, table):
    return f'"{table}"'

  def timestamp(self, moment):
    return f"TIMESTAMPTZ '{moment.astimezone(datetime.timezone.utc).isoformat()}'"

  def string(self, value):
    return "'" + value.replace("'", "''") + "'"  # DuckDB reads backslashes as themselves

  def tables(self):
    if not os.path.exists(self.path):
      return []
    return sorted(self.query('SELECT table_name FROM information_schema.tables')['table_name'])


class BigQueryWarehouse(Warehouse):
  """A BigQuery dataset."""

  def __init__(self, project: str, dataset: str):
    self.project = project
    self.dataset = dataset
    self.url = f'bigquery://{project}/{dataset}'

  def _client(self):
    from kbml.bigquery import bigquery_client
    return bigquery_client(self.project)

  def prepare(self):
    self._client().create_dataset(self.dataset, exists_ok=True)

  def ensure_table(self, table, schema):
    from google.cloud import bigquery
    self.prepare()
    client = self._client()
    fields = [bigquery.SchemaField(f['name'], f['type'], mode=f['mode']) for f in schema.bigquery_schema()['fields']]
    existing = client.create_table(bigquery.Table(f'{self.project}.{self.dataset}.{table}', schema=fields),
                                   exists_ok=True)
    known = {field.name for field in existing.schema}
    added = [bigquery.SchemaField(f.name, f.field_type, mode='NULLABLE') for f in fields if f.name not in known]
    if added:  # a newer schema (new features): BigQuery adds NULLABLE columns in place
      existing.schema = [*existing.schema, *added]
      client.update_table(existing, ['schema'])

  def write_rows(self, table, schema, rows):
    if not rows:
      return
    self.ensure_table(table, schema)
    errors = self._client().insert_rows_json(f'{self.project}.{self.dataset}.{table}', list(rows))
    if errors:
      raise WarehouseError(f'BigQuery refused {len(errors)} rows of {table}: {errors[:2]}')

  def query(self, sql):
    from kbml.bigquery import bigquery_storage_client
    return self._client().query(sql).result().to_dataframe(bqstorage_client=bigquery_storage_client())

  def table_ref(self, table):
    return f'`{self.project}.{self.dataset}.{table}`'

  def timestamp(self, moment):
    return f"TIMESTAMP '{moment.astimezone(datetime.timezone.utc).isoformat()}'"

  def string(self, value):
    return json.dumps(value)  # a double-quoted GoogleSQL literal: JSON's escapes are all GoogleSQL escapes

  def tables(self):
    return sorted(t.table_id for t in self._client().list_tables(self.dataset))


def default_warehouse_url() -> str:
  return f"duckdb://{os.path.abspath(os.path.join(local_state_dir(), 'warehouse.duckdb'))}"


def open_warehouse(url: Optional[str] = None) -> Warehouse:
  """Opens the warehouse a URL names (see the module docstring)."""
  url = url or default_warehouse_url()
  parsed = urllib.parse.urlparse(url)
  if parsed.scheme == 'duckdb':
    return DuckDBWarehouse(parsed.netloc + parsed.path)
  if parsed.scheme == 'bigquery' and parsed.netloc and parsed.path.strip('/'):
    return BigQueryWarehouse(parsed.netloc, parsed.path.strip('/'))
  raise WarehouseError(f'Unknown warehouse {url!r}: use duckdb:///path/file.duckdb or bigquery://PROJECT/DATASET.')



def training_data_summary(warehouse: Warehouse, id_column: str, time_column: str, label_column: str,
                          features_table: str = 'features', labels_table: str = 'labels') -> Dict[str, object]:
  """Counts of the training data: events with features (the first and last time), how many labelled, how many
  positive and their share of the labelled. The columns are the use case's (fraud: ``transaction_id``,
  ``tx_datetime``, ``is_fraud``)."""
  summary = warehouse.query(
      f'SELECT COUNT(*) AS events, MIN(f.{time_column}) AS first_event, MAX(f.{time_column}) AS last_event, '
      f'COUNT(l.{id_column}) AS labelled, SUM(l.{label_column}) AS positives, '
      f'AVG(l.{label_column}) AS positive_rate '
      f'FROM {warehouse.table_ref(features_table)} AS f '
      f'LEFT JOIN {warehouse.table_ref(labels_table)} AS l USING ({id_column})')
  return summary.iloc[0].to_dict()
