"""Writing rows to the warehouse from a pipeline.

BigQuery goes through Beam's own ``WriteToBigQuery``; the embedded DuckDB
store through a DoFn that writes each bundle's rows at the end of the bundle
(an upsert by key, so a retried bundle leaves no duplicates).
"""

import logging
import time
from typing import Dict, List, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from kbml.warehouse import BigQueryWarehouse, TableSchema, open_warehouse

# Rows buffered before a write inside a bundle: bounds memory on large bundles.
_MAX_BUFFERED_ROWS = 20_000
# Beam counters of the rows written, one per table: 'rows_written:TABLE' (rows_written_counter).
WAREHOUSE_METRICS = 'kbml.warehouse'
PROGRESS_EVERY_S = 30.0


def rows_written_counter(table: str):
  return Metrics.counter(WAREHOUSE_METRICS, f'rows_written:{table}')


class _WriteRowsFn(beam.DoFn):
  def __init__(self, warehouse_url: str, table: str, schema: TableSchema):
    self._warehouse_url = warehouse_url
    self._table = table
    self._schema = schema
    self._rows: List[Dict[str, object]] = []

  def setup(self):
    self._warehouse = open_warehouse(self._warehouse_url)
    self._warehouse.ensure_table(self._table, self._schema)
    self._written = rows_written_counter(self._table)
    self._started = self._last_report = time.monotonic()
    self._total = 0

  def start_bundle(self):
    self._rows = []

  def process(self, row):
    self._rows.append(row)
    if len(self._rows) >= _MAX_BUFFERED_ROWS:
      self.finish_bundle()

  def finish_bundle(self):
    self._warehouse.write_rows(self._table, self._schema, self._rows)
    self._written.inc(len(self._rows))
    self._total += len(self._rows)
    self._rows = []
    now = time.monotonic()
    if now - self._last_report >= PROGRESS_EVERY_S:  # a long run shows its progress
      logging.info('%s rows written to %s so far by this worker (%s rows/s)', f'{self._total:,}', self._table,
                   f'{self._total / (now - self._started):,.0f}')
      self._last_report = now


class WriteToWarehouse(beam.PTransform):
  """Writes dict rows to a warehouse table, creating it if needed.

  Args:
    warehouse_url: see :func:`kbml.warehouse.open_warehouse`.
    table: the table name.
    schema: the table's columns and key.
    bigquery_method: ``FILE_LOADS`` (bounded runs) or ``STREAMING_INSERTS``
      (streaming runs); by default Beam picks by the pipeline's mode.
    temp_location: where BigQuery file loads stage their files.
  """

  def __init__(self, warehouse_url: str, table: str, schema: TableSchema, *, bigquery_method: Optional[str] = None,
               temp_location: Optional[str] = None):
    super().__init__()
    self._warehouse_url = warehouse_url
    self._table = table
    self._schema = schema
    self._bigquery_method = bigquery_method
    self._temp_location = temp_location

  def expand(self, rows):
    warehouse = open_warehouse(self._warehouse_url)
    if isinstance(warehouse, BigQueryWarehouse):
      written = rows_written_counter(self._table)
      counted = rows | 'CountRows' >> beam.Map(lambda row: written.inc() or row)
      return counted | 'WriteToBigQuery' >> beam.io.WriteToBigQuery(
          table=f'{warehouse.project}:{warehouse.dataset}.{self._table}', schema=self._schema.bigquery_schema(),
          method=self._bigquery_method, create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
          write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND, custom_gcs_temp_location=self._temp_location,
          validate=False)
    return rows | 'WriteToEmbeddedWarehouse' >> beam.ParDo(_WriteRowsFn(self._warehouse_url, self._table, self._schema))
