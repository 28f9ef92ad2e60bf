"""The trainer on real ingested data: honest splits, the model store, the blessing gate, reloads."""

import datetime
import os
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pandas as pd
import pytest
import xgboost
from sklearn.metrics import average_precision_score

from kbml import cli
from kbml.warehouse import WarehouseError, open_warehouse
from tests.scoring_models import publish_model
from trainer import data, evaluate, model, retrain, task, trees
from trainer.registry import ModelStore, ModelStoreError
from transforms.use_case import load_use_case
from use_cases.fraud.features import FEATURE_NAMES, FEATURES_TABLE
from use_cases.fraud.records import LABELS_TABLE

FRAUD = load_use_case('fraud')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# The simulation starts on 2018-04-01: 28 days of history, then the split.
TRAIN_START, TRAIN_END = '2018-04-29', '2018-05-05'


def _train(warehouse, model_dir, *extra, refit: bool = False):
  args = task.build_parser().parse_args(['--warehouse', warehouse, '--model-dir', str(model_dir),
                                         '--train-start', TRAIN_START, '--train-end', TRAIN_END, '--epochs', '8',
                                         *(['--refit'] if refit else []), *extra])
  return task.train(args)


def test_a_published_model_scores_identically_after_reload(warehouse, tmp_path):
  result = _train(warehouse, tmp_path)  # the default model: an ensemble of networks

  store = ModelStore(str(tmp_path))
  meta = store.metadata(result.version)
  assert store.versions() == [result.version] and store.current() == result.version and result.promoted
  assert meta['features'] == FEATURE_NAMES and set(meta['feature_statistics']) == set(FEATURE_NAMES)
  assert meta['training']['train'] == '2018-04-29..2018-05-03' and meta['training']['test'] == '2018-05-13..2018-05-19'
  assert meta['parent_version'] is None and meta['blessing']['reason'] == 'no champion yet'
  assert 0 < meta['threshold'] < 1 and meta['metrics']['frauds'] > 10
  assert meta['model']['ensemble'] == model.DEFAULT_ENSEMBLE > 1
  for name in ('pr_curve.png', 'score_histogram.png'):
    with open(os.path.join(store.version_dir(result.version), name), 'rb') as f:
      assert f.read(8) == PNG_MAGIC
  # The reloaded model reproduces the published test figures from raw features (its own normalisation).
  rows = data.read_labelled_rows(open_warehouse(warehouse), datetime.date(2018, 4, 29), datetime.date(2018, 5, 19),
                                 FEATURE_NAMES, FRAUD)
  test = evaluate.split(rows, evaluate.Protocol(datetime.date(2018, 4, 29)), FRAUD).test
  scores = model.predict(store.load_model(result.version), data.feature_matrix(test, FEATURE_NAMES))
  assert average_precision_score(data.labels(test, FRAUD), scores) == pytest.approx(
      meta['metrics']['average_precision'], abs=1e-9)


def test_a_stored_ensemble_gives_the_very_same_scores_after_reload(warehouse, tmp_path):
  rows = data.read_labelled_rows(open_warehouse(warehouse), datetime.date(2018, 4, 29), datetime.date(2018, 5, 1),
                                 FEATURE_NAMES, FRAUD)
  features, targets = data.feature_matrix(rows, FEATURE_NAMES), data.labels(rows, FRAUD)
  members = [model.build_model(features, seed=seed) for seed in (0, 1)]
  for member in members:
    member.fit(features, targets, epochs=1, verbose=0)
  network = model.average(members)
  network.save(str(tmp_path / 'model.keras'))
  store = ModelStore(str(tmp_path / 'store'))
  store.publish('v1', str(tmp_path / 'model.keras'), {'features': FEATURE_NAMES}, {})

  np.testing.assert_array_equal(model.predict(store.load_model('v1'), features), model.predict(network, features))


def test_the_keras_trees_give_xgboosts_own_probabilities(warehouse):
  rows = data.read_labelled_rows(open_warehouse(warehouse), datetime.date(2018, 4, 20), datetime.date(2018, 5, 10),
                                 FEATURE_NAMES, FRAUD)
  features, targets = data.feature_matrix(rows, FEATURE_NAMES), data.labels(rows, FRAUD)
  fit_rows = len(rows) * 3 // 4
  booster = trees.fit(features[:fit_rows], targets[:fit_rows], features[fit_rows:], targets[fit_rows:],
                      {**trees.DEFAULT_TREE_PARAMS, 'n_estimators': 80}, seed=0)
  served = trees.boosted_to_keras(booster, features[fit_rows:])
  expected = booster.predict(xgboost.DMatrix(features.astype(np.float32)))
  np.testing.assert_allclose(model.predict(served, features), expected, rtol=0, atol=2e-6)
  assert len(np.unique(expected)) > 100, 'the trees must rank the rows, not give a few values'


def test_the_keras_forest_gives_scikit_learns_own_probabilities(warehouse):
  rows = data.read_labelled_rows(open_warehouse(warehouse), datetime.date(2018, 4, 20), datetime.date(2018, 5, 10),
                                 FEATURE_NAMES, FRAUD)
  features, targets = data.feature_matrix(rows, FEATURE_NAMES), data.labels(rows, FRAUD)
  fit_rows = len(rows) * 3 // 4
  forest = trees.fit_forest(features[:fit_rows], targets[:fit_rows], trees=30, depth=8, seed=0)
  served = trees.forest_to_keras(forest, features[fit_rows:])
  expected = forest.predict_proba(features)[:, 1]
  # Exact splits: a row whose feature equals a threshold goes where scikit-learn sends it.
  np.testing.assert_allclose(model.predict(served, features), expected, rtol=0, atol=2e-6)
  assert len(np.unique(expected)) > 100, 'the forest must rank the rows, not give a few values'


def test_model_families_join_with_a_plus_and_the_old_ensemble_name_is_kept():
  parse = task.build_parser().parse_args
  assert parse([]).model_family == task.DEFAULT_MODEL_FAMILY == 'keras+trees+forest'
  assert parse(['--model-family', 'ensemble']).model_family == 'keras+trees'
  assert parse(['--model-family', 'forest+keras']).model_family == 'forest+keras'
  for wrong in ('forest+forest', 'bagging', 'keras+'):
    with pytest.raises(SystemExit):
      parse(['--model-family', wrong])


@pytest.mark.parametrize('family', ['trees', 'forest', 'keras+trees+forest'])
def test_a_tree_forest_or_ensemble_version_scores_after_reload_as_it_was_evaluated(warehouse, tmp_path, family):
  result = _train(warehouse, tmp_path, '--model-family', family, '--ensemble', '1', '--epochs', '3',
                  '--max-trees', '60', '--forest-trees', '20')
  meta = result.metadata['model']
  assert meta['family'] == family
  assert ('epochs_run' in meta) == ('keras' in family)
  if 'trees' in family:
    assert 1 <= meta['trees'] <= 60
    assert f'{meta["trees"]} boosted trees of depth at most 6' in task.summary(result, str(tmp_path))
  if 'forest' in family:
    assert meta['forest_trees'] == 20 and 'a forest of 20 trees of depth at most 10' in task.summary(
        result, str(tmp_path))
  rows = data.read_labelled_rows(open_warehouse(warehouse), datetime.date(2018, 4, 29), datetime.date(2018, 5, 19),
                                 FEATURE_NAMES, FRAUD)
  test = evaluate.split(rows, evaluate.Protocol(datetime.date(2018, 4, 29)), FRAUD).test
  scores = model.predict(ModelStore(str(tmp_path)).load_model(result.version), data.feature_matrix(test, FEATURE_NAMES))
  assert average_precision_score(data.labels(test, FRAUD), scores) == pytest.approx(
      result.metadata['metrics']['average_precision'], abs=1e-9)


@pytest.mark.parametrize('refit', [True, False])
def test_with_refit_the_served_model_learns_from_the_whole_training_range(warehouse, tmp_path, refit):
  result = _train(warehouse, tmp_path, '--model-family', 'keras+trees', '--ensemble', '1', '--epochs', '3',
                  '--max-trees', '30', refit=refit)
  meta = result.metadata
  assert meta['model']['refit'] is refit and meta['training']['validation'] == '2018-05-04..2018-05-05'
  assert 1 <= meta['model']['best_epochs'][0] <= meta['model']['epochs_run'][0] <= 3
  # The network normalises with the means of the rows it learnt from: the whole range, or its training days.
  last_day = datetime.date(2018, 5, 5) if refit else datetime.date(2018, 5, 3)
  rows = data.read_labelled_rows(open_warehouse(warehouse), datetime.date(2018, 4, 29), last_day, FEATURE_NAMES,
                                 FRAUD)
  network = ModelStore(str(tmp_path)).load_model(result.version).get_layer('mlp_0')
  np.testing.assert_allclose(np.asarray(network.get_layer('normalization').mean).ravel(),
                             data.feature_matrix(rows, FEATURE_NAMES).mean(axis=0), rtol=1e-5, atol=1e-6)
  assert ('(then both)' in task.summary(result, str(tmp_path))) is refit


def test_the_gate_accepts_a_better_model_and_refuses_a_worse_one(warehouse, tmp_path):
  # Across families: the default (networks, boosted trees and a forest) against an untrained network.
  untrained = ('--model-family', 'keras', '--learning-rate', '0', '--epochs', '1')  # the random initial network
  first = _train(warehouse, tmp_path, '--ensemble', '1', *untrained)
  better = _train(warehouse, tmp_path, '--ensemble', '1')
  worse = _train(warehouse, tmp_path, '--ensemble', '1', *untrained, '--seed', '1')
  assert (first.metadata['model']['family'], better.metadata['model']['family']) == ('keras', 'keras+trees+forest')

  store = ModelStore(str(tmp_path))
  assert first.promoted
  assert better.promoted and better.metadata['blessing']['champion'] == first.version
  assert better.metadata['blessing']['candidate_average_precision'] > (
      better.metadata['blessing']['champion_average_precision'])
  assert not worse.promoted and not worse.metadata['blessing']['blessed']
  assert worse.metadata['blessing']['champion'] == better.version
  assert worse.metadata['blessing']['champion_average_precision'] == pytest.approx(
      better.metadata['metrics']['average_precision'], abs=1e-9)
  assert store.current() == better.version and store.versions() == sorted([first.version, better.version,
                                                                           worse.version])


def test_a_damaged_model_version_is_rejected_with_a_clear_error(warehouse, tmp_path):
  version = _train(warehouse, tmp_path, '--ensemble', '1', '--epochs', '1').version
  store = ModelStore(str(tmp_path))
  model_file = store.model_path(version)
  with open(model_file, 'rb') as f:
    complete = f.read()
  with open(model_file, 'wb') as f:
    f.write(complete[:len(complete) // 2])
  with pytest.raises(ModelStoreError, match='truncated or corrupt'):
    store.load_model(version)

  os.remove(os.path.join(store.version_dir(version), 'metadata.json'))
  with pytest.raises(ModelStoreError, match='has no metadata.json: it is not a published model version'):
    store.load_model(version)
  with pytest.raises(ModelStoreError, match='not a published model version'):
    store.promote(version)
  assert store.versions() == []


def test_training_needs_labelled_rows_in_every_part_of_the_split(warehouse, tmp_path):
  with pytest.raises(ValueError, match='The test range has 0 labelled transactions'):
    _train(warehouse, tmp_path, '--train-start', '2018-05-10', '--train-end', '2018-05-16')
  with pytest.raises(ValueError, match='either --last-days or --train-start'):
    task.train(task.build_parser().parse_args(['--warehouse', warehouse, '--last-days', '7',
                                               '--train-start', '2018-05-01']))
  with pytest.raises(WarehouseError, match='run `kbml ingest` first'):
    data.read_labelled_rows(open_warehouse(warehouse), datetime.date(2018, 5, 1), datetime.date(2018, 5, 2),
                            FEATURE_NAMES, FRAUD, features_table='no_such_table')


def test_prequential_folds_fit_and_test_the_same_recipe_a_test_range_earlier_each(warehouse, tmp_path):
  result = _train(warehouse, tmp_path, '--ensemble', '1', '--epochs', '2', '--prequential-folds', '3')
  prequential = result.metadata['prequential']
  assert [fold['test'] for fold in prequential['folds']] == [
      '2018-05-13..2018-05-19', '2018-05-06..2018-05-12', '2018-04-29..2018-05-05']
  published = prequential['folds'][0]['model']
  assert published == {name: result.metadata['metrics'][name] for name in evaluate.summarized_metrics(FRAUD)}
  for kind in ('model', 'baseline'):
    for name, summary in prequential[kind].items():
      values = [fold[kind][name] for fold in prequential['folds']]
      assert summary == pytest.approx({'mean': np.mean(values), 'std': np.std(values)})
      assert summary['std'] > 0, f'three test weeks gave the same {name}: the folds are one week'
  assert 'prequential, 3 test ranges from 2018-04-29..2018-05-05' in task.summary(result, str(tmp_path))


def test_last_days_places_the_test_range_at_the_newest_labels(warehouse):
  args = task.build_parser().parse_args(['--warehouse', warehouse, '--last-days', '7'])
  protocol = task.protocol_of(args, open_warehouse(warehouse))
  assert protocol.test_end == datetime.date(2018, 5, 20) and protocol.train_start == datetime.date(2018, 4, 30)


def test_the_protocol_leaves_out_cards_known_to_be_compromised():
  day = pd.Timestamp('2018-07-25', tz='UTC')
  rows = pd.DataFrame([
      # customer, day offset, fraud
      (1, 2, 1),   # fraud in the training week: card 1 is known before the test
      (1, 14, 0),
      (2, 8, 1),   # fraud on the delay period's day 8: known from test day 2 on (day 16)
      (2, 15, 1),  # test day 1: card 2 not known yet, kept
      (2, 16, 0),  # test day 2: known, left out
      (3, 14, 0),
  ], columns=['customer_id', 'offset', 'is_fraud'])
  rows['tx_datetime'] = day + pd.to_timedelta(rows.pop('offset'), unit='D') + pd.Timedelta(hours=12)
  test = evaluate.split(rows, evaluate.Protocol(datetime.date(2018, 7, 25)), FRAUD).test
  assert sorted(zip(test['customer_id'], test[evaluate.TEST_DAY_COLUMN], strict=True)) == [(2, 1), (3, 0)]


def test_card_precision_at_k_ranks_cards_per_day_and_drops_cards_already_detected():
  test = pd.DataFrame({'customer_id': [1, 1, 2, 3, 1, 2, 4],
                       evaluate.TEST_DAY_COLUMN: [0, 0, 0, 0, 1, 1, 1],
                       'is_fraud': [0, 1, 0, 0, 1, 1, 0]})
  scores = np.array([0.9, 0.1, 0.8, 0.2, 0.9, 0.7, 0.8])
  # Day 0: cards by best score 1 (0.9, compromised), 2 (0.8), 3: top 2 holds 1 fraud card.
  # Day 1: card 1 was detected on day 0 and leaves; top 2 are 4 (0.8, genuine) and 2 (0.7, compromised).
  mean, per_day = evaluate.precision_at_k(test, scores, FRAUD, k=2)
  assert per_day == [0.5, 0.5] and mean == 0.5


def test_bigquery_training_rows_equal_the_embedded_stores(warehouse, bigquery_emulator):
  embedded = open_warehouse(warehouse)
  first, last = datetime.date(2018, 5, 1), datetime.date(2018, 5, 1)
  expected = data.read_labelled_rows(embedded, first, last, FEATURE_NAMES, FRAUD)
  ids = ','.join(map(str, expected['transaction_id']))
  features = embedded.query(f'SELECT * FROM features WHERE transaction_id IN ({ids})')
  labels = embedded.query(f'SELECT * FROM labels WHERE transaction_id IN ({ids})')
  bigquery = open_warehouse(f'bigquery://{bigquery_emulator}/trainer_{uuid.uuid4().hex[:8]}')
  for table, schema, frame in (('features', FEATURES_TABLE, features), ('labels', LABELS_TABLE, labels)):
    bigquery.write_rows(table, schema, _json_rows(frame))

  actual = data.read_labelled_rows(bigquery, first, last, FEATURE_NAMES, FRAUD)
  assert len(expected) > 500
  pd.testing.assert_frame_equal(actual, expected, check_dtype=False)


def _json_rows(frame: pd.DataFrame):
  rows = frame.astype(object).where(frame.notna(), None).to_dict('records')
  for row in rows:
    for name, value in row.items():
      if isinstance(value, pd.Timestamp):
        row[name] = value.isoformat()
      elif not isinstance(value, (int, float, str, type(None))):
        row[name] = str(value)
  return rows


WATCH_CURRENT = '''
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
checks = missing = 0
while not os.path.exists(stop):
  checks += 1
  missing += not os.path.exists(path)
print(checks, missing)
'''


def test_a_promotion_never_leaves_the_store_without_a_model_in_service(tmp_path):
  model_dir = str(tmp_path / 'models')
  versions = [publish_model(model_dir, seed=seed, promote=seed == 0) for seed in range(2)]
  store, stop = ModelStore(model_dir), tmp_path / 'stop'
  watcher = subprocess.Popen([sys.executable, '-c', WATCH_CURRENT, os.path.join(model_dir, 'current'), str(stop)],
                             stdout=subprocess.PIPE, text=True)
  for i in range(1000):
    store.promote(versions[i % 2])
  stop.touch()
  checks, missing = map(int, watcher.communicate(timeout=30)[0].split())
  assert checks > 1000 and missing == 0


def _copied_rows(transactions: int, copies: int):
  """Feature and label rows of ``transactions`` transactions on 2018-05-01, each written ``copies`` times.

  Each copy of a feature row is the same Kafka record (a redelivery), each copy of a label the same label: what
  BigQuery's appends keep, where the embedded store keeps one row per key.
  """
  day = datetime.datetime(2018, 5, 1, tzinfo=datetime.timezone.utc)
  features, labels = [], []
  for i in range(transactions):
    at = (day + datetime.timedelta(minutes=i)).isoformat()
    ids = {'transaction_id': i, 'tx_datetime': at, 'customer_id': i % 3, 'terminal_id': i % 5}
    features.append({**ids, 'amount': f'{i}.50', 'kafka_partition': 0, 'kafka_offset': i,
                     **{name: float(i + j) for j, name in enumerate(FEATURE_NAMES)}})
    labels.append({**ids, 'is_fraud': i % 2, 'fraud_scenario': i % 2, 'known_datetime': at})
  return features * copies, labels * copies


def _check_one_row_per_transaction(warehouse, transactions: int):
  day = datetime.date(2018, 5, 1)
  rows = data.read_labelled_rows(warehouse, day, day, FEATURE_NAMES, FRAUD)
  assert list(rows['transaction_id']) == list(range(transactions))
  assert list(rows['is_fraud']) == [i % 2 for i in range(transactions)]
  assert list(rows[FEATURE_NAMES[0]]) == [float(i) for i in range(transactions)]


def test_training_rows_keep_one_row_per_transaction_of_a_bigquery_warehouse(bigquery_emulator):
  # BigQuery appends: a redelivered record, a retried bundle or a replay leave copies of a row.
  bigquery = open_warehouse(f'bigquery://{bigquery_emulator}/copies_{uuid.uuid4().hex[:8]}')
  features, labels = _copied_rows(transactions=6, copies=3)
  bigquery.write_rows('features', FEATURES_TABLE, features)
  bigquery.write_rows('labels', LABELS_TABLE, labels)
  assert len(bigquery.query(f'SELECT * FROM {bigquery.table_ref("features")}')) == 18

  _check_one_row_per_transaction(bigquery, transactions=6)


def test_training_rows_keep_one_row_per_transaction_of_tables_without_a_key(tmp_path):
  # Tables appended to without a key (as BigQuery keeps them) hold copies; the embedded store's own have a key.
  import duckdb
  features, labels = _copied_rows(transactions=6, copies=3)
  path = str(tmp_path / 'appended.duckdb')
  with duckdb.connect(path) as connection:
    for table, rows in (('features', features), ('labels', labels)):
      frame = pd.DataFrame.from_records(rows)
      for column in ('tx_datetime', 'known_datetime'):
        if column in frame:
          frame[column] = pd.to_datetime(frame[column], utc=True)
      connection.register('appended', frame)
      connection.execute(f'CREATE TABLE {table} AS SELECT * FROM appended')
  warehouse = open_warehouse(f'duckdb://{path}')
  assert len(warehouse.query('SELECT * FROM features')) == 18

  _check_one_row_per_transaction(warehouse, transactions=6)


def test_a_retrain_does_not_replace_a_version_promoted_while_it_trained(warehouse, tmp_path):
  model_dir = str(tmp_path / 'models')
  champion = publish_model(model_dir, seed=0)  # an untrained network: any retrain beats it
  by_hand = publish_model(model_dir, seed=1, promote=False)
  store = ModelStore(model_dir)
  versions_dir = os.path.join(model_dir, 'versions')

  def promote_by_hand_once_the_retrain_publishes():
    # The retrain publishes its version after comparing it with the champion, and promotes it after that.
    while set(os.listdir(versions_dir)) <= {champion, by_hand}:
      time.sleep(0.001)
    store.promote(by_hand)

  person = threading.Thread(target=promote_by_hand_once_the_retrain_publishes, daemon=True)
  person.start()
  assert retrain.run(['--warehouse', warehouse, '--model-dir', model_dir, '--epochs', '2', '--ensemble', '1']) == 0
  person.join(10)

  (retrained,) = set(store.versions()) - {champion, by_hand}
  blessing = store.metadata(retrained)['blessing']
  assert blessing['champion'] == champion and not blessing['promoted']
  assert f'version {by_hand} was put in service' in blessing['reason']
  assert store.current() == by_hand and [p.version for p in store.promotions()] == [champion, by_hand]


def test_a_prequential_gate_compares_the_folds_whose_test_range_the_champion_did_not_train_on(warehouse, tmp_path):
  champion = _train(warehouse, tmp_path, '--model-family', 'trees')  # trained 04-29..05-05
  candidate = _train(warehouse, tmp_path, '--model-family', 'trees', '--tree-depth', '3', '--prequential-folds', '3',
                     '--gate', 'prequential')

  blessing = candidate.metadata['blessing']
  assert blessing['champion'] == champion.version
  # The third fold tests on 04-29..05-05, the champion's training range: left out.
  assert blessing['compared_tests'] == ['2018-05-13..2018-05-19', '2018-05-06..2018-05-12']
  folds = candidate.metadata['prequential']['folds'][:2]
  assert blessing['candidate_average_precision'] == pytest.approx(
      np.mean([fold['model']['average_precision'] for fold in folds]))
  rows = data.read_labelled_rows(open_warehouse(warehouse), datetime.date(2018, 4, 22), datetime.date(2018, 5, 19),
                                 FEATURE_NAMES, FRAUD)
  served = ModelStore(str(tmp_path)).load_model(champion.version)
  champion_aps = []
  for train_start in (datetime.date(2018, 4, 29), datetime.date(2018, 4, 22)):
    test = evaluate.split(rows, evaluate.Protocol(train_start), FRAUD).test
    champion_aps.append(average_precision_score(data.labels(test, FRAUD),
                                                model.predict(served, data.feature_matrix(test, FEATURE_NAMES))))
  assert blessing['champion_average_precision'] == pytest.approx(np.mean(champion_aps))
  assert 'test rows of 2 prequential folds (mean)' in blessing['reason']
  with pytest.raises(ValueError, match='--prequential-folds 2 or more'):
    _train(warehouse, tmp_path, '--gate', 'prequential')


def test_tuning_searches_on_validation_weeks_and_never_on_the_test_range(warehouse, tmp_path):
  # The same search on a copy of the warehouse whose test-range labels are all flipped: any look at the test range
  # would change a trial's figure or the settings chosen.
  flipped = tmp_path / 'flipped.duckdb'
  with open(warehouse.removeprefix('duckdb://'), 'rb') as source, open(flipped, 'wb') as copy:
    copy.write(source.read())
  import duckdb
  with duckdb.connect(str(flipped)) as connection:
    connection.execute("UPDATE labels SET is_fraud = 1 - is_fraud WHERE tx_datetime >= TIMESTAMP '2018-05-13'")
  tuning = ('--model-family', 'trees', '--tune-trials', '4', '--tune-weeks', '2', '--max-trees', '40')
  results = [_train(url, tmp_path / name, *tuning) for url, name in ((warehouse, 'kept'),
                                                                     (f'duckdb://{flipped}', 'flipped'))]

  kept, flipped_result = (result.metadata for result in results)
  assert kept['tuning'] == {**flipped_result['tuning'], 'families': [
      {**found, 'seconds': kept_found['seconds']}
      for found, kept_found in zip(flipped_result['tuning']['families'], kept['tuning']['families'], strict=True)]}
  assert kept['metrics']['average_precision'] != flipped_result['metrics']['average_precision']
  assert kept['tuning']['validation_tests'] == ['2018-04-29..2018-05-05', '2018-04-22..2018-04-28']
  found, = kept['tuning']['families']
  assert found['family'] == 'trees' and found['trials'] == 4
  assert found['given'] == {'tree_depth': 6, 'tree_learning_rate': 0.05}
  assert found['best_average_precision'] >= found['given_average_precision']
  assert kept['model']['tree_depth'] == found['best']['tree_depth']
  assert 'tuned on validation tests 2018-04-29..2018-05-05, 2018-04-22..2018-04-28' in task.summary(
      results[0], str(tmp_path / 'kept'))


def test_the_warehouse_summary_counts_the_transactions_and_the_frauds(warehouse, capsys):
  assert cli.main(['warehouse', 'summary', '--warehouse', warehouse]) == 0
  counts = open_warehouse(warehouse).query('SELECT (SELECT COUNT(*) FROM features) AS events, '
                                           '(SELECT SUM(is_fraud) FROM labels) AS positives').iloc[0]
  out = capsys.readouterr().out
  assert f"{counts['events']:,} transactions with features" in out and f"{int(counts['positives']):,} frauds (" in out
