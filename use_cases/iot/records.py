"""The IoT records: sensor readings of machines, and whether each machine failed within the hours after a reading."""

import json
from typing import Dict, NamedTuple

from kbml.warehouse import TableSchema
from transforms.kafka_io import KafkaRecord
from transforms.records import (
  RecordSchema,
  flag,
  integer_id,
  number_between,
  one_of,
  parse_utc_timestamp,
  small_int,
  utc_iso,
)
from use_cases.iot.simulator import MACHINE_TYPES, SENSORS

# What a sensor can read; a value outside is a broken record, not a reading.
SENSOR_RANGES = {'rotation_speed_rpm': (0.0, 20_000.0), 'torque_nm': (0.0, 1_000.0), 'temperature_c': (-50.0, 300.0),
                 'vibration_mm_s': (0.0, 200.0), 'pressure_bar': (0.0, 100.0)}


class Reading(NamedTuple):
  reading_id: int
  reading_time: float  # seconds since the epoch, UTC
  machine_id: int
  machine_type: str
  rotation_speed_rpm: float
  torque_nm: float
  temperature_c: float
  vibration_mm_s: float
  pressure_bar: float
  kafka_partition: int = -1
  kafka_offset: int = -1


class ReadingLabel(NamedTuple):
  reading_id: int
  reading_time: float
  machine_id: int
  fails_within_horizon: int
  failure_mode: int
  known_time: float = 0.0  # when the label arrived: its Kafka timestamp
  kafka_partition: int = -1
  kafka_offset: int = -1


READING_SCHEMA = RecordSchema('reading', {
    'reading_id': integer_id,
    'reading_time': parse_utc_timestamp,
    'machine_id': integer_id,
    'machine_type': one_of(*MACHINE_TYPES),
    **{name: number_between(*SENSOR_RANGES[name]) for name in SENSORS},
}, Reading, 'reading_time', lambda partition, offset, timestamp_ms: (partition, offset))

LABEL_SCHEMA = RecordSchema('label', {
    'reading_id': integer_id,
    'reading_time': parse_utc_timestamp,
    'machine_id': integer_id,
    'fails_within_horizon': flag,
    'failure_mode': small_int,
}, ReadingLabel, 'reading_time', lambda partition, offset, timestamp_ms: (timestamp_ms / 1000, partition, offset))

READING_COLUMNS = (('reading_id', 'INT64'), ('reading_time', 'TIMESTAMP'), ('machine_id', 'INT64'))

LABELS_TABLE = TableSchema(
    columns=(*READING_COLUMNS, ('fails_within_horizon', 'INT64'), ('failure_mode', 'INT64'),
             ('known_datetime', 'TIMESTAMP')),
    key=('reading_id',), keep_first=True)


def label_row(label: ReadingLabel) -> Dict[str, object]:
  """A label as a warehouse row."""
  return {'reading_id': label.reading_id, 'reading_time': utc_iso(label.reading_time), 'machine_id': label.machine_id,
          'fails_within_horizon': label.fails_within_horizon, 'failure_mode': label.failure_mode,
          'known_datetime': utc_iso(label.known_time)}


def reading_record(reading: Reading, topic: str) -> KafkaRecord:
  """The Kafka record of a reading as read: its fields as JSON, its partition and offset, at its time."""
  value = json.dumps({'reading_id': reading.reading_id, 'reading_time': utc_iso(reading.reading_time),
                      'machine_id': reading.machine_id, 'machine_type': reading.machine_type,
                      **{name: getattr(reading, name) for name in SENSORS}})
  return KafkaRecord(topic, reading.kafka_partition, reading.kafka_offset, int(reading.reading_time * 1000),
                     str(reading.machine_id).encode(), value.encode(), ())
