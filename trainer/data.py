"""Training data: labelled feature rows of a time range, from the warehouse to arrays and ``tf.data``.

The ingest pipeline writes one row of features per transaction and one row
per label; a training row is their join. BigQuery results come through the
Storage Read API (:meth:`kbml.warehouse.BigQueryWarehouse.query`), the
embedded store's through Arrow.
"""

import datetime
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import numpy as np

from kbml.warehouse import Warehouse, WarehouseError

if TYPE_CHECKING:
  import pandas
  import tensorflow as tf

LABEL_COLUMN = 'is_fraud'
ID_COLUMNS = ('transaction_id', 'tx_datetime', 'customer_id', 'terminal_id')


def utc_day(day: datetime.date) -> datetime.datetime:
  """Midnight UTC at the start of ``day``."""
  return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc)


def read_labelled_rows(warehouse: Warehouse, first_day: datetime.date, last_day: datetime.date,
                       feature_names: Sequence[str], features_table: str = 'features',
                       labels_table: str = 'labels') -> 'pandas.DataFrame':
  """The labelled transactions of ``first_day`` to ``last_day`` (UTC, both included), in time order.

  Columns: the ids and time, the features, ``is_fraud``. Transactions whose
  label has not arrived are left out.

  Raises:
    WarehouseError: a table or a feature column is missing.
  """
  columns = ', '.join([*(f'f.{name}' for name in ID_COLUMNS), *(f'f.{name}' for name in feature_names),
                       f'l.{LABEL_COLUMN}'])
  sql = (f'SELECT {columns} FROM {warehouse.table_ref(features_table)} AS f '
         f'JOIN {warehouse.table_ref(labels_table)} AS l ON f.transaction_id = l.transaction_id '
         f'WHERE f.tx_datetime >= {warehouse.timestamp(utc_day(first_day))} '
         f'AND f.tx_datetime < {warehouse.timestamp(utc_day(last_day + datetime.timedelta(days=1)))} '
         'ORDER BY f.tx_datetime, f.transaction_id')
  try:
    rows = warehouse.query(sql)
  except WarehouseError:
    raise
  except Exception as e:  # noqa: BLE001 - the client's own error: a table or column is missing
    raise WarehouseError(f'Cannot read training rows from {warehouse.url}: {e}. The trainer needs the features and '
                         'labels tables with the current feature columns: run `kbml ingest` first.') from e
  rows['tx_datetime'] = rows['tx_datetime'].dt.tz_convert('UTC')
  return rows.reset_index(drop=True)


def last_labelled_day(warehouse: Warehouse, features_table: str = 'features',
                      labels_table: str = 'labels') -> Optional[datetime.date]:
  """The day of the most recent labelled transaction, or None when there is none."""
  latest = warehouse.query(
      f'SELECT MAX(f.tx_datetime) AS latest FROM {warehouse.table_ref(features_table)} AS f '
      f'JOIN {warehouse.table_ref(labels_table)} AS l ON f.transaction_id = l.transaction_id')['latest'].iloc[0]
  return None if latest is None or latest != latest else latest.tz_convert('UTC').date()


def feature_matrix(rows: 'pandas.DataFrame', feature_names: Sequence[str]) -> np.ndarray:
  """The features as one float32 matrix, columns in ``feature_names`` order (the model's input)."""
  return rows[list(feature_names)].to_numpy(dtype=np.float32)


def labels(rows: 'pandas.DataFrame') -> np.ndarray:
  return rows[LABEL_COLUMN].to_numpy(dtype=np.int32)


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
