"""One's own events into the topics: ``kbml produce`` and :func:`produce_frames`.

Reads a use case's events (fraud's transactions by default, ``--use-case``),
and optionally their labels, from JSON Lines, CSV or Parquet files (or pandas
DataFrames, from Python), and produces them as the pipelines read them: one
JSON record each with the fields of the use case's records, keyed by its
first entity (fraud: the customer; IoT: the machine), with its event time as
the Kafka timestamp, all in event-time order. An event's time is its time
column (fraud: ``tx_datetime``); a label's is its ``known_datetime`` when the
labels have that column, else the event's time plus the label delay. At one
instant labels go first, as the simulators produce them, so the same events
give the same records and the same warehouse rows.

Examples::

    kbml produce --events history/transactions.csv --labels history/labels.csv
    kbml produce --events tx.parquet --label-delay-days 3 --rate 500
    kbml produce --use-case iot --events readings.parquet --labels failure-labels.parquet
"""

import datetime
import json
import math
import os
import sys
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from kbml.simulator import Event, produce
from transforms.records import DAY_SECONDS
from transforms.use_case import UseCase, load_use_case

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


def _records(frame: pd.DataFrame, fields: Tuple[str, ...], time_column: str, seconds: np.ndarray) -> List[bytes]:
  """Each row as the topic's JSON record: its fields in the topic's order, then any other columns."""
  names = [*fields, *(column for column in frame.columns if column not in fields and column != KNOWN_TIME_COLUMN)]
  columns = {name: frame[name].tolist() for name in names if name != time_column}
  return [json.dumps({name: _iso(second) if name == time_column else _json_value(columns[name][row])
                      for name in names}, default=str).encode()
          for row, second in enumerate(seconds)]


def _check_columns(frame: pd.DataFrame, fields: Tuple[str, ...], what: str):
  missing = [field for field in fields if field not in frame.columns]
  if missing:
    raise ProduceError(f'The {what} have no column {", ".join(missing)}; the topic\'s records need '
                       f'{", ".join(fields)}.')


def events_of(events: pd.DataFrame, labels: Optional[pd.DataFrame] = None,
              label_delay_days: Optional[float] = None, key_column: Optional[str] = None,
              use_case: Optional[UseCase] = None) -> Iterator[Event]:
  """The records of the events and labels, merged in event-time order (labels first at one instant).

  Checks and formats every record before it returns.

  Args:
    events: the use case's events, a column per field of its records (and any others, passed through).
    labels: their labels, likewise; None: none.
    label_delay_days: without a ``known_datetime`` column, a label is known this long after its event (default:
      the use case's label delay).
    key_column: the records' Kafka key (default: the use case's first key column).
    use_case: default: fraud.

  Raises:
    ProduceError: a required column is missing or a time is not one.
  """
  use_case = use_case or load_use_case()
  event_fields, label_fields = tuple(use_case.event_schema.fields), tuple(use_case.label_schema.fields)
  time_column, noun = use_case.time_column, use_case.event_noun
  label_delay_days = use_case.default_label_delay_days if label_delay_days is None else label_delay_days
  key_column = key_column or use_case.key_columns[0]
  _check_columns(events, event_fields, noun)
  event_seconds = _event_seconds(events, time_column, noun)
  # Per frame: its records' fields, their event times, their Kafka timestamps in seconds, whether they are labels.
  frames = [(events, event_fields, event_seconds, event_seconds, False)]
  if labels is not None:
    _check_columns(labels, label_fields, 'labels')
    labelled_seconds = _event_seconds(labels, time_column, 'labels')
    known = (_event_seconds(labels, KNOWN_TIME_COLUMN, 'labels') if KNOWN_TIME_COLUMN in labels.columns else
             labelled_seconds + label_delay_days * DAY_SECONDS)
    frames.insert(0, (labels, label_fields, labelled_seconds, known, True))
  values, keys, times, is_label = [], [], [], []
  for frame, fields, record_seconds, timestamp_seconds, labelled in frames:
    if key_column not in frame.columns:
      raise ProduceError(f'No key column {key_column!r} in the {"labels" if labelled else noun}: name '
                         'one with --key-column.')
    values.extend(_records(frame, fields, time_column, record_seconds))
    keys.extend(str(_json_value(key)).encode() for key in frame[key_column].tolist())
    times.append(np.round(timestamp_seconds * 1000).astype(np.int64))
    is_label.append(np.full(len(frame), labelled))
  times_ms, labelled_rows = np.concatenate(times), np.concatenate(is_label)
  order = np.lexsort((np.arange(len(times_ms)), ~labelled_rows, times_ms))
  return (Event(bool(labelled_rows[row]), int(times_ms[row]), keys[row], values[row]) for row in order)


def produce_frames(events: pd.DataFrame, labels: Optional[pd.DataFrame],
                   producer_config: Dict[str, str], events_topic: Optional[str] = None,
                   labels_topic: Optional[str] = None, label_delay_days: Optional[float] = None,
                   key_column: Optional[str] = None, rate: Optional[float] = None,
                   progress: Optional[Callable[[int, int], None]] = None,
                   use_case: Optional[UseCase] = None) -> Tuple[int, int]:
  """Produces DataFrames of a use case's events and labels to its topics (default: the use case's); returns how
  many of each were acknowledged. ``use_case`` (default: fraud) and the rest as in :func:`events_of`.

  Raises:
    ProduceError: a required column is missing or a time is not one.
    RuntimeError: some records were not delivered.
  """
  use_case = use_case or load_use_case()
  return produce(events_of(events, labels, label_delay_days, key_column, use_case), producer_config,
                 events_topic or use_case.events_topic, labels_topic or use_case.labels_topic, rate, progress)


def progress_line(events_total: int, labels_total: int, noun: str) -> Callable[[int, int], None]:
  """A progress line for producing events (``noun``: what they are called) and labels, rewritten in place on
  stderr."""
  def progress(events, labels):
    print(f'\rproduced {events:,}/{events_total:,} {noun} and {labels:,}/{labels_total:,} labels',
          end='', file=sys.stderr, flush=True)
  return progress


def print_produced(counts: Tuple[int, int], noun: str, events_topic: str, labels_topic: str,
                   config: Dict[str, str], seconds: float):
  """The summary line of the records produced."""
  events, labels = counts
  print(f'\nproduced {events:,} {noun} to {events_topic!r} and {labels:,} labels '
        f'to {labels_topic!r} at {config["bootstrap.servers"]} in {seconds:.1f} s '
        f'({(events + labels) / max(seconds, 1e-9):,.0f} records/s)')
