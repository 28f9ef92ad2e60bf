"""The IoT features equal an independent pandas computation, in every form, whatever the order across machines."""

import random

import apache_beam as beam
import pandas as pd
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.conftest import local_options
from tests.test_features import equal_features
from transforms.feature_forms import FORMS
from use_cases.iot.features import FEATURE_NAMES, ComputeMachineFeatures
from use_cases.iot.records import Reading, ReadingLabel
from use_cases.iot.simulator import SENSORS, SimulationConfig, simulate

HORIZON_S = 24 * 3600


@pytest.fixture(scope='module')
def simulation():
  return simulate(SimulationConfig(machines=8, days=4, seed=2))


def pandas_features(readings: pd.DataFrame) -> pd.DataFrame:
  """Every feature of every reading, from pandas' time-based rolling windows (t - w, t]."""
  frames = []
  for _, machine in readings.groupby('machine_id'):
    machine = machine.sort_values('reading_time_seconds').copy()
    machine.index = pd.to_datetime(machine['reading_time_seconds'], unit='s')
    for sensor in SENSORS:
      name = sensor.upper()
      machine[name] = machine[sensor]
      for hours in (1, 6, 24):
        machine[f'{name}_MEAN_{hours}H'] = machine[sensor].rolling(f'{hours}h').mean()
      machine[f'{name}_STD_6H'] = machine[sensor].rolling('6h').std(ddof=0)
    machine['NB_READINGS_24H'] = machine[SENSORS[0]].rolling('24h').count()
    for kind in ('L', 'M', 'H'):
      machine[f'MACHINE_TYPE_{kind}'] = (machine['machine_type'] == kind).astype(int)
    frames.append(machine)
  return pd.concat(frames).set_index('reading_id').sort_index()


def stream(simulation):
  """Readings and labels, shuffled across machines but in order within each (Kafka keeps a key's order)."""
  readings = simulation.readings
  events = []
  for offset, row in enumerate(readings.itertuples()):
    at = float(row.reading_time_seconds) + simulation.config.start.timestamp()
    events.append(beam.window.TimestampedValue(Reading(
        row.reading_id, at, row.machine_id, row.machine_type, *(float(getattr(row, s)) for s in SENSORS), 0, offset),
        at))
    events.append(beam.window.TimestampedValue(ReadingLabel(
        row.reading_id, at, row.machine_id, row.fails_within_horizon, row.failure_mode, at + HORIZON_S, 1, offset),
        at + HORIZON_S))
  by_machine = {}
  for event in events:
    by_machine.setdefault(event.value.machine_id, []).append(event)
  order = [event.value.machine_id for event in events]
  random.Random(3).shuffle(order)
  cursors = {machine: iter(machine_events) for machine, machine_events in by_machine.items()}
  return [next(cursors[machine]) for machine in order]


def test_the_fleet_exercises_the_windows(simulation):
  expected = pandas_features(simulation.readings)
  assert expected['NB_READINGS_24H'].max() == 96 and expected['NB_READINGS_24H'].min() == 1
  assert (expected['VIBRATION_MM_S_STD_6H'] > 0).mean() > 0.9


@pytest.mark.parametrize('form', FORMS)
def test_machine_features_equal_an_independent_pandas_computation(simulation, form):
  expected = pandas_features(simulation.readings)
  events = stream(simulation)
  with TestPipeline(options=local_options()) as p:
    rows = (p
            | beam.Create([events])
            | 'InThisOrder' >> beam.FlatMap(lambda listed: listed)
            | ComputeMachineFeatures(form=form)).rows
    assert_that(rows, equal_features(expected, 'reading_id', FEATURE_NAMES))


@pytest.mark.parametrize('form', FORMS)
def test_a_repeated_reading_gets_no_row_and_comes_out_repeated(simulation, form):
  events = stream(simulation)[:200]
  first = next(event.value for event in events if isinstance(event.value, Reading))
  again = beam.window.TimestampedValue(first._replace(kafka_offset=10_000), first.reading_time)
  with TestPipeline(options=local_options()) as p:
    outputs = (p
               | beam.Create([events + [again]])
               | 'InThisOrder' >> beam.FlatMap(lambda listed: listed)
               | ComputeMachineFeatures(form=form))
    assert_that(outputs.repeated | beam.Map(lambda r: (r.reading_id, r.kafka_offset)),
                equal_to([(first.reading_id, 10_000)]), label='Repeated')
    assert_that(outputs.rows | beam.combiners.Count.Globally(),
                equal_to([sum(isinstance(event.value, Reading) for event in events)]), label='OneRowEach')


def test_ingest_of_the_iot_use_case_writes_its_feature_rows_and_labels_and_dead_letters_a_broken_reading(
    bootstrap, new_topic, group_id, tmp_path, simulation):
  from kbml import simulator as engine_simulator
  from kbml.warehouse import open_warehouse
  from pipelines import ingest
  from tests.conftest import consume, produce
  from transforms.records import REASON_HEADER
  from use_cases.iot.simulator import events

  readings, labels, dead_letters = new_topic(), new_topic(), new_topic()
  engine_simulator.produce(events(simulation), {'bootstrap.servers': bootstrap}, readings, labels)
  broken = b'{"reading_id": 999999, "reading_time": "2025-01-04T00:00:00Z", "machine_id": 1, "machine_type": "M", ' \
           b'"rotation_speed_rpm": 1500.0, "torque_nm": 40.0, "temperature_c": 900.0, "vibration_mm_s": 2.0, ' \
           b'"pressure_bar": 6.0}'
  produce(bootstrap, readings, [(b'1', broken, (), int(simulation.config.start.timestamp() * 1000) + 3 * 86_400_000)])
  url = f'duckdb://{tmp_path}/warehouse.duckdb'
  ingest.run(['--use-case', 'iot', '--bootstrap-servers', bootstrap, '--events-topic', readings, '--labels-topic',
              labels, '--dead-letter-topic', dead_letters, '--warehouse', url, '--stop-at-end', '--consumer-group',
              group_id])

  warehouse = open_warehouse(url)
  rows = warehouse.query('SELECT * FROM "features" ORDER BY reading_id')
  equal_features(pandas_features(simulation.readings), 'reading_id', FEATURE_NAMES)(rows.to_dict('records'))
  written_labels = warehouse.query('SELECT reading_id, fails_within_horizon FROM "labels" ORDER BY reading_id')
  assert written_labels['fails_within_horizon'].tolist() == simulation.readings.sort_values('reading_id')[
      'fails_within_horizon'].tolist()
  (letter,) = consume(bootstrap, dead_letters, 1)
  assert letter.value() == broken
  assert dict(letter.headers())[REASON_HEADER] == b'field temperature_c must be from -50 to 300, got 900.0'
