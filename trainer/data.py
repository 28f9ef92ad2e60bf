"""Training data: labelled feature rows of a time range, from the warehouse to arrays and ``tf.data``.

The ingest pipeline writes one row of features per event (a transaction, a
reading) and one row per label; a training row is their join, on the use
case's id column. BigQuery results come through the
Storage Read API (:meth:`kbml.warehouse.BigQueryWarehouse.query`), the
embedded store's through Arrow.

The embedded store keeps one row per key (an upsert), but BigQuery appends:
a redelivered record, a retried bundle or a replayed range leave copies of a
row there, and a join of copies multiplies them. The reads here keep one row
per event on both, chosen in an order that does not depend on how the copies
were stored: of the feature rows, the first Kafka record of the event (the
one the feature transform keeps of a repeated id; the copies of one record
are equal); of the labels, the last known.
"""

import datetime
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import numpy as np

from kbml.warehouse import Warehouse, WarehouseError
from transforms.use_case import UseCase

if TYPE_CHECKING:
  import pandas
  import tensorflow as tf


def utc_day(day: datetime.date) -> datetime.datetime:
  """Midnight UTC at the start of ``day``."""
  return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc)


def read_labelled_rows(warehouse: Warehouse, first_day: datetime.date, last_day: datetime.date,
                       feature_names: Sequence[str], use_case: UseCase, features_table: str = 'features',
                       labels_table: str = 'labels') -> 'pandas.DataFrame':
  """The labelled events of ``first_day`` to ``last_day`` (UTC, both included), in time order.

  Columns: the use case's id, time and key columns, the features, its label
  column. Events whose label has not arrived are left out.

  Raises:
    WarehouseError: a table or a feature column is missing.
  """
  event_id, event_time, label = use_case.id_column, use_case.time_column, use_case.label_column
  feature_columns = [event_id, event_time, *use_case.key_columns, *feature_names]
  in_range = (f'{event_time} >= {warehouse.timestamp(utc_day(first_day))} '
              f'AND {event_time} < {warehouse.timestamp(utc_day(last_day + datetime.timedelta(days=1)))}')
  # A subquery rather than QUALIFY: BigQuery takes QUALIFY only beside a WHERE, GROUP BY or HAVING.
  features = _one_row_per_event(warehouse.table_ref(features_table), event_id, feature_columns,
                                'kafka_partition, kafka_offset', in_range)
  labels = _one_row_per_event(warehouse.table_ref(labels_table), event_id, [event_id, label],
                              f'known_datetime, {label} DESC', in_range)
  columns = ', '.join([*(f'f.{name}' for name in feature_columns), f'l.{label}'])
  sql = (f'SELECT {columns} FROM ({features}) AS f JOIN ({labels}) AS l ON f.{event_id} = l.{event_id} '
         f'ORDER BY f.{event_time}, f.{event_id}')
  try:
    rows = warehouse.query(sql)
  except WarehouseError:
    raise
  except Exception as e:  # noqa: BLE001 - the client's own error: a table or column is missing
    raise WarehouseError(f'Cannot read training rows from {warehouse.url}: {e}. The trainer needs the features and '
                         'labels tables with the current feature columns: run `kbml ingest` first.') from e
  rows[event_time] = rows[event_time].dt.tz_convert('UTC')
  return rows.reset_index(drop=True)


def _one_row_per_event(table: str, event_id: str, columns: Sequence[str], first_by: str, condition: str) -> str:
  """A query of ``table``'s rows that meet ``condition``, one per ``event_id``: the first in ``first_by`` order."""
  return (f'SELECT {", ".join(columns)} FROM (SELECT {", ".join(columns)}, ROW_NUMBER() OVER '
          f'(PARTITION BY {event_id} ORDER BY {first_by}) AS copy_number FROM {table} WHERE {condition}) '
          'WHERE copy_number = 1')


def last_labelled_day(warehouse: Warehouse, use_case: UseCase, features_table: str = 'features',
                      labels_table: str = 'labels') -> Optional[datetime.date]:
  """The day of the most recent labelled event, or None when there is none."""
  event_id = use_case.id_column
  latest = warehouse.query(
      f'SELECT MAX(f.{use_case.time_column}) AS latest FROM {warehouse.table_ref(features_table)} AS f '
      f'JOIN {warehouse.table_ref(labels_table)} AS l ON f.{event_id} = l.{event_id}')['latest'].iloc[0]
  return None if latest is None or latest != latest else latest.tz_convert('UTC').date()


def feature_matrix(rows: 'pandas.DataFrame', feature_names: Sequence[str]) -> np.ndarray:
  """The features as one float32 matrix, columns in ``feature_names`` order (the model's input)."""
  return rows[list(feature_names)].to_numpy(dtype=np.float32)


def labels(rows: 'pandas.DataFrame', use_case: UseCase) -> np.ndarray:
  """The rows' labels (the use case's label column), 0 or 1."""
  return rows[use_case.label_column].to_numpy(dtype=np.int32)


def to_dataset(features: np.ndarray, targets: np.ndarray, batch_size: int,
               shuffle_seed: Optional[int] = None) -> 'tf.data.Dataset':
  """Batches (features, label) for Keras, shuffled once per epoch when a seed is given."""
  import tensorflow as tf
  dataset = tf.data.Dataset.from_tensor_slices((features, targets.astype(np.float32)))
  if shuffle_seed is not None:
    dataset = dataset.shuffle(len(features), seed=shuffle_seed, reshuffle_each_iteration=True)
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def feature_statistics(matrix: np.ndarray, names: Sequence[str], bins: int = 10) -> Dict[str, Dict[str, object]]:
  """Per column: mean, standard deviation, range, and the training distribution over quantile bins.

  The bins (inner edges at the deciles, merged where they coincide, as for
  flags and counts) and the share of training rows in each are what drift
  detection compares live data with (population stability index).
  """
  statistics = {}
  for column, name in enumerate(names):
    values = matrix[:, column].astype(np.float64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, values, side='right'), minlength=len(edges) + 1)
    statistics[name] = {'mean': float(values.mean()), 'std': float(values.std()), 'min': float(values.min()),
                        'max': float(values.max()), 'bin_edges': edges.tolist(),
                        'bin_fractions': (counts / len(values)).tolist()}
  return statistics
