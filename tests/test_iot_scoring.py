"""The scorer and the monitor on the IoT use case: every reading scored live, with the features ingest computes,
by its model; the predictions joined with their failure labels."""

import uuid

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import precision_score, recall_score

from kbml import simulator as engine_simulator
from kbml.kafka_client import create_topics
from kbml.warehouse import open_warehouse
from pipelines import ingest, monitoring
from pipelines.scoring import unscored_dead_letters
from tests.pipeline_process import PipelineProcess
from tests.scoring_models import publish_keras
from tests.test_scoring import TopicReader
from trainer import data, model
from trainer.model import build_model
from trainer.registry import ModelStore
from transforms.metrics import ranked_precision_at_k, read_sums, summaries
from transforms.records import dead_letter_message
from transforms.use_case import load_use_case
from use_cases.iot.features import FEATURE_NAMES, feature_row
from use_cases.iot.records import READING_SCHEMA, Reading
from use_cases.iot.simulator import SENSORS, SimulationConfig, events, simulate

IOT = load_use_case('iot')
TOPICS = ('events', 'labels', 'predictions', 'dead-letter', 'alerts')


@pytest.fixture(scope='module')
def scored(bootstrap, tmp_path_factory):
  """A fleet's readings and labels produced, ingested (the offline rows), and scored by the scorer run as a user
  runs it, with --use-case iot; returns its topics, folder, warehouse, model store and version, offline rows, and
  predictions by reading id."""
  folder = tmp_path_factory.mktemp('iot-scoring')
  topics = {name: f'iot-{name}-{uuid.uuid4().hex[:8]}' for name in TOPICS}
  create_topics({'bootstrap.servers': bootstrap}, list(topics.values()), 4)
  engine_simulator.produce(events(simulate(SimulationConfig(machines=6, days=4, seed=1))),
                           {'bootstrap.servers': bootstrap}, topics['events'], topics['labels'])
  warehouse = f"duckdb://{folder / 'warehouse.duckdb'}"
  ingest.run(['--use-case', 'iot', '--bootstrap-servers', bootstrap, '--events-topic', topics['events'],
              '--labels-topic', topics['labels'], '--dead-letter-topic', topics['dead-letter'], '--warehouse',
              warehouse, '--stop-at-end', '--consumer-group', f'ingest-{uuid.uuid4().hex[:8]}'])
  rows = open_warehouse(warehouse).query('SELECT * FROM features').set_index('reading_id').sort_index()
  model_dir = str(folder / 'models')
  version = publish_keras(model_dir, build_model(data.feature_matrix(rows, FEATURE_NAMES), (8,), seed=3),
                          threshold=0.3, feature_names=FEATURE_NAMES)

  scorer = PipelineProcess('pipelines.scoring', [
      '--use-case', 'iot', '--bootstrap-servers', bootstrap, '--model-dir', model_dir, '--consumer-group',
      f'scoring-{uuid.uuid4().hex[:8]}', '--score-from', 'earliest',
      *[f'--{name}-topic={topic}' for name, topic in topics.items()]], str(folder / 'scorer.log'))
  scorer.start()
  try:
    predictions = TopicReader(bootstrap, topics['predictions'])
    assert predictions.read_until(lambda records: set(rows.index) <= {r['reading_id'] for r in records}, 180), \
        scorer.log_tail()
  finally:
    scorer.kill()
  return {'topics': topics, 'folder': folder, 'warehouse': warehouse, 'model_dir': model_dir, 'version': version,
          'rows': rows, 'predictions': {r['reading_id']: r for r in predictions.records}}


def test_the_scorer_scores_every_reading_with_the_features_ingest_computes(scored):
  rows, served, version = scored['rows'], scored['predictions'], scored['version']
  features = data.feature_matrix(rows, FEATURE_NAMES)
  assert set(served) == set(rows.index) and {r['model_version'] for r in served.values()} == {version}
  assert [served[i]['machine_id'] for i in rows.index] == rows['machine_id'].tolist()
  np.testing.assert_allclose([[served[i]['features'][name] for name in FEATURE_NAMES] for i in rows.index],
                             features, rtol=1e-6)
  expected = model.predict(ModelStore(scored['model_dir']).load_model(version), features)
  np.testing.assert_allclose([served[i]['score'] for i in rows.index], expected, rtol=1e-5, atol=1e-6)
  assert len(np.unique(expected)) > 50, 'the model must rank the readings, not give a few values'


def test_the_monitor_joins_the_iot_predictions_with_their_failure_labels(bootstrap, scored):
  topics, served = scored['topics'], scored['predictions']
  warehouse = f"duckdb://{scored['folder'] / 'metrics.duckdb'}"
  monitoring.run(['--use-case', 'iot', '--bootstrap-servers', bootstrap, '--warehouse', warehouse, '--model-dir',
                  scored['model_dir'], '--stop-at-end', '--consumer-group', f'monitor-{uuid.uuid4().hex[:8]}',
                  *[f'--{name}-topic={topic}' for name, topic in topics.items()]])

  labels = open_warehouse(scored['warehouse']).query(
      'SELECT reading_id, fails_within_horizon FROM labels ORDER BY reading_id').set_index('reading_id')[
          'fails_within_horizon']
  flagged = [served[i]['flagged'] for i in labels.index]
  metrics_warehouse = open_warehouse(warehouse)
  overall = summaries(read_sums(metrics_warehouse), group_by=['model_version']).iloc[0]
  assert overall['predictions'] == overall['labelled'] == len(labels) and overall['positives'] == labels.sum() > 0
  assert overall['precision'] == pytest.approx(precision_score(labels, flagged), abs=1e-12)
  assert overall['recall'] == pytest.approx(recall_score(labels, flagged), abs=1e-12)
  labelled = metrics_warehouse.query('SELECT * FROM labelled_predictions ORDER BY reading_id')
  assert labelled['reading_id'].tolist() == labels.index.tolist()
  assert labelled['fails_within_horizon'].tolist() == labels.tolist()
  # Each day the 5 machines of highest score (each its highest of the day): the share of them about to fail.
  by_machine = pd.DataFrame({
      'day': [served[i]['reading_time'][:10] for i in labels.index],
      'machine_id': [served[i]['machine_id'] for i in labels.index],
      'score': [served[i]['score'] for i in labels.index], 'positive': labels.to_numpy()}).groupby(
          ['day', 'machine_id']).max()
  expected = [group.nlargest(IOT.ranking_k, 'score')['positive'].sum() / IOT.ranking_k
              for _, group in by_machine.groupby('day')]
  ranking = ranked_precision_at_k(metrics_warehouse, IOT)
  assert ranking['precision_at_k'].tolist() == pytest.approx(expected) and max(expected) > 0
  assert ranking['entities'].tolist() == by_machine.groupby('day').size().tolist()


def test_a_reading_that_could_not_be_scored_is_dead_lettered_as_the_record_it_was_read_from():
  reading = Reading(41, 1_735_700_400.0, 7, 'H', 1510.5, 41.25, 68.0, 2.5, 6.125, 3, 1234)
  row = feature_row(reading, {name: 0.0 for name in FEATURE_NAMES} | {s.upper(): getattr(reading, s) for s in SENSORS})
  (letter,) = unscored_dead_letters(([row], 'the batch failed'), IOT, 'readings')
  key, value, headers = dead_letter_message(letter)
  assert READING_SCHEMA.parse(value, (3, 1234, 0)) == reading and key == b'7'
  assert ('kbml.source.offset', b'1234') in headers and letter.reason == 'not scored: the batch failed'
