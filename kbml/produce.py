"""One's own events into the topics: ``kbml produce`` and :func:`produce_frames`.

Reads transactions, and optionally their labels, from JSON Lines, CSV or
Parquet files (or pandas DataFrames, from Python), and produces them as the
pipelines read them: one JSON record each, keyed by customer, with its event
time as the Kafka timestamp, all in event-time order. A transaction's time is
its ``tx_datetime``; a label's is its ``known_datetime`` when the labels have
that column, else the transaction's time plus the label delay. At one instant
labels go first, as the simulator produces them, so the same events give the
same records and the same warehouse rows.

Examples::

    kbml produce --transactions history/transactions.csv --labels history/labels.csv
    kbml produce --transactions tx.parquet --label-delay-days 3 --rate 500
"""

import datetime
import json
import math
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from kbml.simulator import Event, produce

TRANSACTION_FIELDS = ('transaction_id', 'tx_datetime', 'customer_id', 'terminal_id', 'amount')
LABEL_FIELDS = ('transaction_id', 'tx_datetime', 'customer_id', 'terminal_id', 'is_fraud', 'fraud_scenario')
KNOWN_TIME_COLUMN = 'known_datetime'
READERS = {'.jsonl': 'json', '.json': 'json', '.ndjson': 'json', '.csv': 'csv', '.parquet': 'parquet'}


class ProduceError(ValueError):
  """A file or frame cannot be produced as it is; the message says what to change."""


def read_table(path: str) -> pd.DataFrame:
  """A file of records as a DataFrame, its format from its extension (READERS)."""
  extension = os.path.splitext(path)[1].lower()
  if extension not in READERS:
    raise ProduceError(f'{path}: unknown format {extension or "(no extension)"}: name a file ending in '
                       f'{", ".join(READERS)}.')
  try:
    if READERS[extension] == 'json':
      return pd.read_json(path, lines=True, dtype=False, convert_dates=False, precise_float=True)
    if READERS[extension] == 'csv':
      return pd.read_csv(path)
    return pd.read_parquet(path)
  except (OSError, ValueError) as e:
    raise ProduceError(f'Cannot read {path}: {e}') from e


def _event_seconds(frame: pd.DataFrame, column: str, what: str) -> np.ndarray:
  """A time column as seconds since the epoch; a time without a zone is taken as UTC, as the topics are."""
  try:
    times = pd.to_datetime(frame[column], utc=True, format='ISO8601')
  except (ValueError, TypeError) as e:
    raise ProduceError(f'The {what} column {column} holds a value that is not a time: {e}') from e
  if times.isna().any():
    raise ProduceError(f'The {what} column {column} has {int(times.isna().sum())} empty value(s): every record '
                       'needs its time.')
  return (times - pd.Timestamp(0, tz='UTC')).dt.total_seconds().to_numpy()


def _iso(seconds: float) -> str:
  moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
  return moment.strftime('%Y-%m-%dT%H:%M:%SZ' if float(seconds).is_integer() else '%Y-%m-%dT%H:%M:%S.%fZ')


def _json_value(value):
  """A cell as JSON: NumPy numbers as Python ones, NaN as null."""
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def _records(frame: pd.DataFrame, fields: Tuple[str, ...], seconds: np.ndarray) -> List[bytes]:
  """Each row as the topic's JSON record: its fields in the topic's order, then any other columns."""
  names = [*fields, *(column for column in frame.columns if column not in fields and column != KNOWN_TIME_COLUMN)]
  columns = {name: frame[name].tolist() for name in names if name != 'tx_datetime'}
  return [json.dumps({name: _iso(second) if name == 'tx_datetime' else _json_value(columns[name][row])
                      for name in names}, default=str).encode()
          for row, second in enumerate(seconds)]


def _check_columns(frame: pd.DataFrame, fields: Tuple[str, ...], what: str):
  missing = [field for field in fields if field not in frame.columns]
  if missing:
    raise ProduceError(f'The {what} have no column {", ".join(missing)}; the topic\'s records need '
                       f'{", ".join(fields)}.')


def events_of(transactions: pd.DataFrame, labels: Optional[pd.DataFrame] = None,
              label_delay_days: float = 7.0, key_column: str = 'customer_id') -> Iterator[Event]:
  """The records of the transactions and labels, merged in event-time order (labels first at one instant).

  Checks and formats every record before it returns.

  Raises:
    ProduceError: a required column is missing or a time is not one.
  """
  _check_columns(transactions, TRANSACTION_FIELDS, 'transactions')
  transaction_seconds = _event_seconds(transactions, 'tx_datetime', 'transactions')
  # Per frame: its records' fields, their tx_datetime, their Kafka timestamps in seconds, whether they are labels.
  frames = [(transactions, TRANSACTION_FIELDS, transaction_seconds, transaction_seconds, False)]
  if labels is not None:
    _check_columns(labels, LABEL_FIELDS, 'labels')
    labelled_seconds = _event_seconds(labels, 'tx_datetime', 'labels')
    known = (_event_seconds(labels, KNOWN_TIME_COLUMN, 'labels') if KNOWN_TIME_COLUMN in labels.columns else
             labelled_seconds + label_delay_days * 86_400)
    frames.insert(0, (labels, LABEL_FIELDS, labelled_seconds, known, True))
  values, keys, times, is_label = [], [], [], []
  for frame, fields, event_seconds, timestamp_seconds, labelled in frames:
    if key_column not in frame.columns:
      raise ProduceError(f'No key column {key_column!r} in the {"labels" if labelled else "transactions"}: name '
                         'one with --key-column.')
    values.extend(_records(frame, fields, event_seconds))
    keys.extend(str(_json_value(key)).encode() for key in frame[key_column].tolist())
    times.append(np.round(timestamp_seconds * 1000).astype(np.int64))
    is_label.append(np.full(len(frame), labelled))
  times_ms, labelled_rows = np.concatenate(times), np.concatenate(is_label)
  order = np.lexsort((np.arange(len(times_ms)), ~labelled_rows, times_ms))
  return (Event(bool(labelled_rows[row]), int(times_ms[row]), keys[row], values[row]) for row in order)


def produce_frames(transactions: pd.DataFrame, labels: Optional[pd.DataFrame],
                   producer_config: Dict[str, str], transactions_topic: str = 'transactions',
                   labels_topic: str = 'labels', label_delay_days: float = 7.0, key_column: str = 'customer_id',
                   rate: Optional[float] = None,
                   progress: Optional[Callable[[int, int], None]] = None) -> Tuple[int, int]:
  """Produces DataFrames of transactions and labels to the topics; returns how many of each were acknowledged.

  Raises:
    ProduceError: a required column is missing or a time is not one.
    RuntimeError: some records were not delivered.
  """
  return produce(events_of(transactions, labels, label_delay_days, key_column), producer_config,
                 transactions_topic, labels_topic, rate, progress)
