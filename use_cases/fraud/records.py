"""The fraud records: card transactions, and whether each was a fraud."""

import json
from decimal import Decimal
from typing import Dict, NamedTuple

import apache_beam as beam

from kbml.warehouse import TableSchema
from transforms.kafka_io import KafkaRecord
from transforms.records import RecordSchema, amount_in_cents, flag, integer_id, parse_utc_timestamp, small_int, utc_iso


class Transaction(NamedTuple):
  transaction_id: int
  tx_time: float  # seconds since the epoch, UTC
  customer_id: int
  terminal_id: int
  amount: Decimal
  kafka_partition: int = -1  # where the record was read: lineage, and replays by offset
  kafka_offset: int = -1


class Label(NamedTuple):
  transaction_id: int
  tx_time: float
  customer_id: int
  terminal_id: int
  is_fraud: int
  fraud_scenario: int
  known_time: float = 0.0  # when the label arrived: its Kafka timestamp
  kafka_partition: int = -1
  kafka_offset: int = -1


# The columns that identify a transaction, first in every table about transactions.
TRANSACTION_COLUMNS = (('transaction_id', 'INT64'), ('tx_datetime', 'TIMESTAMP'), ('customer_id', 'INT64'),
                       ('terminal_id', 'INT64'))

# A transaction's first label wins, as in the features and the monitor's join: a later one changes nothing.
LABELS_TABLE = TableSchema(
    columns=(*TRANSACTION_COLUMNS, ('is_fraud', 'INT64'), ('fraud_scenario', 'INT64'),
             ('known_datetime', 'TIMESTAMP')),
    key=('transaction_id',), keep_first=True)


def label_row(label: Label) -> Dict[str, object]:
  """A label as a warehouse row."""
  return {'transaction_id': label.transaction_id, 'tx_datetime': utc_iso(label.tx_time),
          'customer_id': label.customer_id, 'terminal_id': label.terminal_id, 'is_fraud': label.is_fraud,
          'fraud_scenario': label.fraud_scenario, 'known_datetime': utc_iso(label.known_time)}


TRANSACTION_SCHEMA = RecordSchema('transaction', {
    'transaction_id': integer_id,
    'tx_datetime': parse_utc_timestamp,
    'customer_id': integer_id,
    'terminal_id': integer_id,
    'amount': amount_in_cents,
}, Transaction, 'tx_time', lambda partition, offset, timestamp_ms: (partition, offset))

LABEL_SCHEMA = RecordSchema('label', {
    'transaction_id': integer_id,
    'tx_datetime': parse_utc_timestamp,
    'customer_id': integer_id,
    'terminal_id': integer_id,
    'is_fraud': flag,
    'fraud_scenario': small_int,
}, Label, 'tx_time', lambda partition, offset, timestamp_ms: (timestamp_ms / 1000, partition, offset))


def event_time(event) -> float:
  """When an event happened, in seconds since the epoch: a transaction at its own time, a label when it became
  known."""
  return event.tx_time if isinstance(event, Transaction) else event.known_time


def at_event_time(event):
  """Timestamps a Transaction or Label with its :func:`event_time`."""
  return beam.window.TimestampedValue(event, event_time(event))


def transaction_record(transaction: Transaction, topic: str) -> KafkaRecord:
  """The Kafka record of a transaction as read: its fields as JSON, its partition and offset, at its time.

  What a dead letter about a transaction holds when the step that refused
  it had only the parsed transaction: producing the value again re-submits
  it.
  """
  fields = json.dumps({'transaction_id': transaction.transaction_id, 'tx_datetime': utc_iso(transaction.tx_time),
                       'customer_id': transaction.customer_id, 'terminal_id': transaction.terminal_id})
  value = f'{fields[:-1]}, "amount": {transaction.amount}}}'  # the amount as the exact decimal it was read as
  return KafkaRecord(topic, transaction.kafka_partition, transaction.kafka_offset, int(transaction.tx_time * 1000),
                     str(transaction.transaction_id).encode(), value.encode(), ())
