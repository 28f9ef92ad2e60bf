"""Record schemas, validation and the dead-letter queue.

A schema says which JSON fields a record has and what each must hold. Every
Kafka record is parsed against one: a valid record becomes a typed row; an
invalid one goes, with its original bytes, its source topic, partition and
offset and a readable reason, to the dead-letter output, which the pipelines
write to the ``dead-letter`` topic. Nothing is dropped and bad data never
fails a pipeline.

A use case defines its schemas in its own module, with the checks of the
fields defined here (``integer_id``, ``parse_utc_timestamp``, ...).
"""

import dataclasses
import datetime
import hashlib
import json
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import apache_beam as beam

from transforms.batches import Batch, in_kind_of, items_of
from transforms.kafka_io import KafkaRecord

DEAD_LETTER_TAG = 'dead_letter'
MAX_RECORD_BYTES = 64 * 1024
DAY_SECONDS = 86_400
MAX_ID = 2 ** 53  # ids stay exact as JSON numbers
MAX_AMOUNT = Decimal(2 ** 53) / 100
# An amount with more decimals than cents, this close to a cent, is that cent: what a binary float of a cent
# amount prints as (pandas writes 85.65 * 1 as 85.64999999999999). A ten-thousandth of a cent: no amount of a
# third decimal is that close.
CENT_TOLERANCE = Decimal('0.000001')
CENT = Decimal('0.01')

# Headers of a dead-letter record: what went wrong and where the record came from
# (the value is the original bytes, unchanged).
REASON_HEADER = 'kbml.error.reason'
SOURCE_HEADERS = ('kbml.source.topic', 'kbml.source.partition', 'kbml.source.offset', 'kbml.source.timestamp')
# A dead letter larger than this is cut (see dead_letter_message): producers and brokers refuse records over about
# 1 MB by default (message.max.bytes), and a dead letter that cannot be produced would fail its bundle for good.
MAX_DEAD_LETTER_BYTES = 512 * 1024
ORIGINAL_BYTES_HEADER = 'kbml.original.bytes'
# A Beam counter of the records sent to the dead-letter topic (each passes dead_letter_message once).
RECORDS_METRICS = 'kbml.records'
DEAD_LETTERS = beam.metrics.Metrics.counter(RECORDS_METRICS, 'dead_letters')
ORIGINAL_SHA256_HEADER = 'kbml.original.sha256'


class InvalidRecord(ValueError):
  """A record does not match its schema; the message says how."""


def _not_json(constant: str):
  raise InvalidRecord(f'not valid JSON: {constant} is not a JSON number')


def integer_id(value: Any) -> int:
  """A JSON integer from 0 to 2**53 (exact as a JSON number)."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise InvalidRecord(f'must be an integer id, got {type(value).__name__} {value!r}'[:200])
  if not 0 <= value < MAX_ID:
    raise InvalidRecord(f'is not a valid id (0 <= id < 2**53), got {value}')
  return value


def amount_in_cents(value: Any) -> Decimal:
  """A JSON number of money: not negative, exact to the cent (a float's rounding of a cent is that cent)."""
  if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
    raise InvalidRecord(f'must be a number, got {type(value).__name__} {value!r}'[:200])
  amount = Decimal(value)
  if not amount.is_finite():
    raise InvalidRecord(f'must be finite, got {value}')
  if amount < 0:
    raise InvalidRecord(f'must not be negative, got {value}')
  if amount > MAX_AMOUNT:
    raise InvalidRecord(f'must be at most {MAX_AMOUNT} (features are floats, exact to the cent up to there), '
                        f'got {value}'[:200])
  if amount.as_tuple().exponent < -2:
    cents = amount.quantize(CENT)
    if abs(amount - cents) > CENT_TOLERANCE:
      raise InvalidRecord(f'must have at most 2 decimals (or be within {CENT_TOLERANCE} of a cent), got {value}'[:200])
    return cents
  return amount


def parse_utc_timestamp(value: Any) -> float:
  if not isinstance(value, str):
    raise InvalidRecord(f'must be an ISO-8601 UTC timestamp string, got {type(value).__name__}')
  try:
    if not (value.isascii() and value.isprintable()):  # fromisoformat lets a trailing NUL through
      raise ValueError(value)
    parsed = datetime.datetime.fromisoformat(value.replace('Z', '+00:00'))
  except ValueError:
    raise InvalidRecord(f'is not an ISO-8601 timestamp: {value!r}'[:200]) from None
  if parsed.utcoffset() != datetime.timedelta(0):
    raise InvalidRecord(f'must be in UTC (suffix Z or +00:00), got {value!r}')
  return parsed.timestamp()


def flag(value: Any) -> int:
  """0 or 1."""
  if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
    raise InvalidRecord(f'must be 0 or 1, got {value!r}'[:200])
  return int(value)


def small_int(value: Any) -> int:
  """A JSON integer from 0 to 999."""
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1000:
    raise InvalidRecord(f'must be an integer from 0 to 999, got {value!r}'[:200])
  return value


def number_between(low: float, high: float) -> Callable[[Any], float]:
  """A check of a JSON number from ``low`` to ``high``, both included, which it gives as a float."""
  def check(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
      raise InvalidRecord(f'must be a number, got {type(value).__name__} {value!r}'[:200])
    if (isinstance(value, Decimal) and not value.is_finite()) or not low <= value <= high:
      raise InvalidRecord(f'must be from {low:g} to {high:g}, got {value}'[:200])
    return float(value)
  return check


def one_of(*choices: str) -> Callable[[Any], str]:
  """A check of a JSON string that must be one of ``choices``."""
  def check(value: Any) -> str:
    if not isinstance(value, str) or value not in choices:
      raise InvalidRecord(f'must be one of {", ".join(choices)}, got {value!r}'[:200])
    return value
  return check


@dataclasses.dataclass(frozen=True)
class RecordSchema:
  """The fields of a JSON record and how each is checked.

  Attributes:
    name: what the record is (used in reasons).
    fields: field name -> function that checks a JSON value and returns the
      typed value, raising :class:`InvalidRecord` with the problem.
    row_type: the NamedTuple a valid record becomes (fields in order).
    time_field: the row's field that holds its event's time, in seconds
      since the epoch (checked against the record's Kafka timestamp:
      :class:`EventTimeLimits`).
    source_fields: (partition, offset, timestamp in ms) of the Kafka record
      -> the values of the row's last fields, what it keeps of its record.
  """
  name: str
  fields: Dict[str, Callable[[Any], Any]]
  row_type: type
  time_field: str
  source_fields: Callable[[int, int, int], Tuple] = lambda partition, offset, timestamp_ms: ()

  def parse(self, payload: Optional[bytes], source: Optional[Tuple[int, int, int]] = None) -> NamedTuple:
    """Parses one record; raises :class:`InvalidRecord` naming the problem.

    Args:
      payload: the record's value.
      source: its (partition, offset, timestamp in ms), kept in the row's
        source fields; None: they keep their defaults.
    """
    if payload is None or not payload:
      raise InvalidRecord(f'empty {self.name} record')
    if len(payload) > MAX_RECORD_BYTES:
      raise InvalidRecord(f'oversized {self.name} record: {len(payload)} bytes, the limit is {MAX_RECORD_BYTES}')
    try:
      document = json.loads(payload, parse_float=Decimal, parse_constant=_not_json)
    except (UnicodeDecodeError, json.JSONDecodeError, InvalidOperation) as e:
      raise InvalidRecord(f'not valid JSON: {e}') from None
    except RecursionError:
      raise InvalidRecord(f'not valid JSON here: nested deeper than Python\'s parser goes ({len(payload)} bytes)') \
          from None
    if not isinstance(document, dict):
      raise InvalidRecord(f'a {self.name} record must be a JSON object, got {type(document).__name__}')
    missing = [name for name in self.fields if name not in document]
    if missing:
      raise InvalidRecord(f'missing field{"s" if len(missing) > 1 else ""} {", ".join(missing)}')
    values = []
    for name, check in self.fields.items():
      try:
        values.append(check(document[name]))
      except InvalidRecord as e:
        raise InvalidRecord(f'field {name} {e}') from None
    return self.row_type(*values, *self.source_fields(*source)) if source else self.row_type(*values)


def utc_iso(seconds: float, milliseconds: bool = False) -> str:
  """Formats epoch seconds as the records' timestamp text (UTC, Z suffix), to the second or millisecond."""
  moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
  return moment.isoformat(timespec='milliseconds' if milliseconds else 'seconds').replace('+00:00', 'Z')


class DeadLetter(NamedTuple):
  """A record that could not be processed, and why."""
  record: KafkaRecord
  reason: str


def _message_bytes(key: Optional[bytes], value: Optional[bytes], headers: Sequence[Tuple[str, bytes]]) -> int:
  return len(key or b'') + len(value or b'') + sum(len(name) + len(data or b'') for name, data in headers)


def dead_letter_message(dead: DeadLetter) -> Tuple[Optional[bytes], Optional[bytes], Sequence[Tuple[str, bytes]]]:
  """The ``(key, value, headers)`` written to the dead-letter topic: the original bytes, reason and source.

  A record too large to be produced again whole (over ``MAX_DEAD_LETTER_BYTES``
  with the headers added) is cut: its value to what fits, its key to 1 KiB,
  and its own headers are left out if they take more than half; the headers
  ``kbml.original.bytes`` and ``kbml.original.sha256`` describe the whole
  value.
  """
  DEAD_LETTERS.inc()
  record = dead.record
  source = (record.topic, record.partition, record.offset, record.timestamp_ms)
  headers = [(REASON_HEADER, dead.reason.encode('utf-8'))]
  headers += [(name, str(value).encode('utf-8')) for name, value in zip(SOURCE_HEADERS, source, strict=True)]
  key, value, own_headers = record.key, record.value, list(record.headers)
  if _message_bytes(key, value, headers + own_headers) <= MAX_DEAD_LETTER_BYTES:
    return key, value, headers + own_headers
  value = value or b''
  headers += [(ORIGINAL_BYTES_HEADER, str(len(value)).encode()),
              (ORIGINAL_SHA256_HEADER, hashlib.sha256(value).hexdigest().encode())]
  key = key[:1024] if key else key
  if _message_bytes(key, None, headers + own_headers) > MAX_DEAD_LETTER_BYTES // 2:
    own_headers = []
  return key, value[:MAX_DEAD_LETTER_BYTES - _message_bytes(key, None, headers + own_headers)], headers + own_headers


class EventTimeLimits(NamedTuple):
  """How far a record's event time (its schema's ``time_field``) may be from its Kafka timestamp.

  The pipelines take a record's Kafka timestamp for its event time when
  they read the partitions in step, and apply the events to the histories
  in event time: a record whose own time is far from it would be applied
  out of its place, or move the histories' clock. An event cannot happen
  after it was produced (beyond clock skew), and one produced long after it
  happened is a replay that lost its timestamps, or a fabrication.

  Attributes:
    ahead_s: most seconds the event time may be after the Kafka timestamp.
    behind_s: most seconds it may be before; None: no limit (labels, which
      may come months after their transaction).
  """
  ahead_s: float
  behind_s: Optional[float]

  def check(self, event_time_s: float, timestamp_ms: int):
    """Raises :class:`InvalidRecord` when ``event_time_s`` is outside the limits around ``timestamp_ms``."""
    gap_s = event_time_s - timestamp_ms / 1000
    if gap_s > self.ahead_s or (self.behind_s is not None and -gap_s > self.behind_s):
      limit = f'{self.ahead_s:,.0f} s after' if gap_s > 0 else f'{self.behind_s:,.0f} s before'
      raise InvalidRecord(
          f'event time {utc_iso(event_time_s)} is {abs(gap_s):,.0f} s {"after" if gap_s > 0 else "before"} the '
          f'record\'s Kafka timestamp {utc_iso(timestamp_ms / 1000, milliseconds=True)} (at most {limit}): produce '
          'records with their event time as the Kafka timestamp')


class _ParseFn(beam.DoFn):
  def __init__(self, schemas: Mapping[str, RecordSchema], time_limits: Mapping[str, EventTimeLimits]):
    self._schemas = dict(schemas)
    self._time_limits = dict(time_limits)

  def process(self, records: Union[KafkaRecord, Batch]) -> Iterable:
    events = Batch()
    for record in items_of(records):
      try:
        schema = self._schemas[record.topic]
        event = schema.parse(record.value, (record.partition, record.offset, record.timestamp_ms))
        if record.topic in self._time_limits:
          self._time_limits[record.topic].check(getattr(event, schema.time_field), record.timestamp_ms)
        events.append(event)
      except InvalidRecord as e:
        yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, DeadLetter(record, str(e)))
    yield from in_kind_of(records, events)


class ParseRecords(beam.PTransform):
  """Parses Kafka records, each against the schema of its topic.

  One step for all topics, with one dead-letter output: a local runner runs
  a Flatten as a stage boundary, which an unbounded run never crosses.

  Returns a ``DoOutputsTuple``: the main output (``records``) holds the typed
  rows, ``dead_letter`` a :class:`DeadLetter` for each invalid record. A
  :class:`~transforms.batches.Batch` of records (``ReadFromKafka(batched=True)``)
  gives one Batch of the valid ones' rows (none if there are none).

  Args:
    schemas: topic name -> the schema of its records.
    time_limits: topic name -> how far its records' event times may be from
      their Kafka timestamps (:class:`EventTimeLimits`); a topic not named
      is not checked.
  """

  def __init__(self, schemas: Mapping[str, RecordSchema], time_limits: Optional[Mapping[str, EventTimeLimits]] = None):
    super().__init__()
    self._schemas = dict(schemas)
    self._time_limits = dict(time_limits or {})

  def expand(self, records):
    parse = beam.ParDo(_ParseFn(self._schemas, self._time_limits))
    if records.element_type is Batch:
      parse = parse.with_output_types(Batch)
    return records | 'Parse' >> parse.with_outputs(DEAD_LETTER_TAG, main='records')
