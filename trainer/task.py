"""Trains, evaluates and publishes a use case's model (fraud by default): ``kbml train`` / ``python -m trainer.task``.

Reads the labelled feature rows of a train / delay / test split from the
warehouse (trainer.evaluate.Protocol), fits the model families with early
stopping on the validation split and a logistic-regression baseline on the
same rows, chooses the decision threshold on the validation split (with
``--refit``, fits them again with the lengths found on the whole training
range, training and validation days), evaluates both on the test range,
and publishes the model to the model store with its metadata and plots. The
new version is promoted to ``current`` only if its average precision on the
test range is not worse than the champion's on the same rows (the blessing
gate).

Examples::

    kbml train --train-start 2018-07-25 --train-end 2018-07-31   # the handbook's split
    kbml train --last-days 7                                      # the most recent data
    kbml train --vertex --dry-run --last-days 7                   # the Vertex AI job spec
"""

import argparse
import dataclasses
import datetime
import functools
import math
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from kbml.local_state import default_model_dir
from kbml.warehouse import open_warehouse
from trainer import data, evaluate, model, trees, tune, vertex
from trainer.registry import ModelStore, new_version
from transforms.use_case import DEFAULT_USE_CASE, UseCase, load_use_case

# What a version's model is: one family, or several joined with '+' whose scores it averages. keras: networks;
# trees: gradient-boosted trees; forest: a random forest (the trees served as a Keras layer).
MODEL_FAMILIES = ('keras', 'trees', 'forest')
# Earlier names, still taken.
MODEL_FAMILY_ALIASES = {'ensemble': 'keras+trees'}
# The best on the three weeks before the handbook's test week (BENCHMARKS.md).
DEFAULT_MODEL_FAMILY = 'keras+trees+forest'
GATES = ('test', 'prequential')


def _date(text: str) -> datetime.date:
  try:
    return datetime.date.fromisoformat(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a date YYYY-MM-DD, got {text!r}') from None


def model_family(text: str) -> str:
  """A --model-family value: families of MODEL_FAMILIES joined with '+', each once, or an alias."""
  text = MODEL_FAMILY_ALIASES.get(text, text)
  families = text.split('+')
  unknown = [family for family in families if family not in MODEL_FAMILIES]
  if unknown or len(set(families)) < len(families):
    raise argparse.ArgumentTypeError(
        f'expected one or more of {", ".join(MODEL_FAMILIES)}, each once, joined with "+" (for example '
        f'{DEFAULT_MODEL_FAMILY}), got {text!r}')
  return text


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='kbml train', allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
      description=__doc__.split('\n\n', 1)[1])
  data_args = parser.add_argument_group('Data')
  data_args.add_argument('--use-case', default=DEFAULT_USE_CASE,
                         help='fraud (the default), iot, or the dotted name of a module of yours that declares a '
                         'USE_CASE (transforms/use_case.py): its tables\' columns, features and metrics.')
  data_args.add_argument('--warehouse', help='duckdb:///path/file.duckdb (default: .kbml/warehouse.duckdb) or '
                         'bigquery://PROJECT/DATASET.')
  data_args.add_argument('--features-table', default='features')
  data_args.add_argument('--labels-table', default='labels')
  data_args.add_argument('--feature-set', default='all',
                         help='One of the use case\'s feature sets. Fraud: all, the handbook\'s 15 features and the '
                         '8 streaming ones; handbook, the 15 only (default: %(default)s).')
  split = parser.add_argument_group('Split (days in UTC)')
  split.add_argument('--train-start', type=_date, help='First day of the training range.')
  split.add_argument('--train-end', type=_date, help='Last day of the training range (included).')
  split.add_argument('--last-days', type=int,
                     help='Instead: train on this many days, placed so that the test range ends on the most recent '
                     'labelled day.')
  split.add_argument('--delay-days', type=int,
                     help='Days skipped between training and test: the label delay (default: the use case\'s, in '
                     'whole days: 7 for fraud).')
  split.add_argument('--test-days', type=int, default=7, help='Days of the test range (default: %(default)s).')
  split.add_argument('--validation-days', type=int, default=2,
                     help='The last days of the training range, held out for early stopping and the threshold '
                     '(default: %(default)s).')
  split.add_argument('--prequential-folds', type=int, default=1,
                     help='Also fit and test the same recipe on this many splits in all, each a test range before '
                     'the last (the handbook\'s prequential validation), and report the mean and standard '
                     'deviation of the test figures; the published model is the one of the named split '
                     '(default: %(default)s, the named split only).')
  fitting = parser.add_argument_group('Model')
  fitting.add_argument('--model-family', type=model_family, default=DEFAULT_MODEL_FAMILY,
                       help='keras: the mean of --ensemble networks; trees: gradient-boosted trees (XGBoost); '
                       'forest: a random forest (scikit-learn); trees and forests are served as a Keras layer. '
                       'Several joined with "+" score the mean of their scores (ensemble: keras+trees). Default: '
                       '%(default)s, the best on the weeks before the handbook\'s test week (BENCHMARKS.md).')
  fitting.add_argument('--refit', action='store_true',
                       help='Once early stopping has chosen each family\'s length on the validation days (epochs of '
                       'each network, boosted trees), fit each again with that length on the training and validation '
                       'days together, the whole training range, as the handbook\'s models are; the threshold and '
                       'the score statistics come from the first fit, which did not see the validation days. Better '
                       'on the weeks before the handbook\'s test week (BENCHMARKS.md), for twice the fitting time: '
                       'off by default, so that a retrain after drift is not slowed.')
  fitting.add_argument('--epochs', type=int, default=40, help='At most this many epochs (default: %(default)s).')
  fitting.add_argument('--patience', type=int, default=5, help='Stop after this many epochs without a better '
                       'validation average precision (default: %(default)s).')
  fitting.add_argument('--batch-size', type=int, default=512)
  fitting.add_argument('--hidden-units', default=','.join(map(str, model.DEFAULT_HIDDEN_UNITS)),
                       help='Sizes of the hidden layers (default: %(default)s).')
  fitting.add_argument('--learning-rate', type=float, default=1e-3)
  fitting.add_argument('--positive-weight', '--fraud-weight', dest='positive_weight', type=float,
                       default=model.DEFAULT_POSITIVE_WEIGHT, help='Weight of a positive (a fraud, a failure) in the '
                       'loss, against 1 for a negative (default: %(default)s).')
  fitting.add_argument('--ensemble', type=int, default=model.DEFAULT_ENSEMBLE,
                       help='Networks fitted from different random starts; the model scores their mean (default: '
                       '%(default)s).')
  fitting.add_argument('--seed', type=int, default=0)
  fitting.add_argument('--max-trees', type=int, default=trees.DEFAULT_TREE_PARAMS['n_estimators'],
                       help='Trees: at most this many, fewer when the validation average precision stops improving '
                       '(default: %(default)s).')
  fitting.add_argument('--tree-depth', type=int, default=trees.DEFAULT_TREE_PARAMS['max_depth'],
                       help='Trees: the deepest (default: %(default)s).')
  fitting.add_argument('--tree-learning-rate', type=float, default=trees.DEFAULT_TREE_PARAMS['learning_rate'],
                       help='Trees: the weight of each new tree (default: %(default)s).')
  fitting.add_argument('--forest-trees', type=int, default=trees.DEFAULT_FOREST_TREES,
                       help='Forest: its number of trees (default: %(default)s).')
  fitting.add_argument('--forest-depth', type=int, default=trees.DEFAULT_FOREST_DEPTH,
                       help='Forest: the deepest a tree grows (default: %(default)s).')
  tuning = parser.add_argument_group('Tuning (trainer/tune.py)')
  tuning.add_argument('--tune-trials', type=int, default=0,
                      help='Before the final fit, search each model family\'s settings with at most this many trials '
                      'on validation weeks (the test range is never used); the given settings are the first trial '
                      '(default: %(default)s, no search).')
  tuning.add_argument('--tune-seconds', type=float, default=0,
                      help='Start no trial after this many seconds of a family\'s search (alone: trials until then; '
                      'default: %(default)s, no limit).')
  tuning.add_argument('--tune-weeks', type=int, default=tune.DEFAULT_TUNE_WEEKS,
                      help='Validation splits a trial fits and tests on: the first tests on the training range, '
                      'each further one a test range earlier (default: %(default)s).')
  store = parser.add_argument_group('Model store')
  store.add_argument('--model-dir', default=default_model_dir(),
                     help='The model store: a folder or gs:// prefix (default: .kbml/models).')
  store.add_argument('--tolerance', type=float, default=0.0,
                     help='Promote when the new average precision is at least the champion\'s minus this '
                     '(default: %(default)s).')
  store.add_argument('--gate', choices=GATES, default='test',
                     help='test: compare the average precision of the new version and the champion on the test '
                     'range; prequential: their mean over the --prequential-folds test ranges that begin after the '
                     'champion\'s training range (each fold\'s fit of the new recipe against the champion), the '
                     'test range alone when none does (default: %(default)s).')
  store.add_argument('--no-promote', action='store_true', help='Publish the version, never make it current.')
  vertex.add_vertex_arguments(parser)
  return parser


def protocol_of(args, warehouse) -> evaluate.Protocol:
  """The split the arguments name."""
  use_case = load_use_case(args.use_case)
  delay_days = math.ceil(use_case.default_label_delay_days) if args.delay_days is None else args.delay_days
  days = dict(delay_days=delay_days, test_days=args.test_days, validation_days=args.validation_days)
  if args.last_days is not None:
    if args.train_start or args.train_end:
      raise ValueError('Give either --last-days or --train-start/--train-end, not both.')
    last_day = data.last_labelled_day(warehouse, use_case, args.features_table, args.labels_table)
    if last_day is None:
      raise ValueError(f'The warehouse {warehouse.url} holds no labelled {use_case.event_noun}: run `kbml ingest` '
                       'first.')
    return evaluate.Protocol.ending_at(last_day, train_days=args.last_days, **days)
  if not (args.train_start and args.train_end):
    raise ValueError('Name the training range: --train-start and --train-end, or --last-days.')
  if args.train_end < args.train_start:
    raise ValueError(f'--train-end {args.train_end} is before --train-start {args.train_start}.')
  return evaluate.Protocol(args.train_start, train_days=(args.train_end - args.train_start).days + 1, **days)


def _checked_split(rows, protocol: evaluate.Protocol, warehouse_url: str, use_case: UseCase) -> evaluate.Split:
  split = evaluate.split(rows, protocol, use_case)
  for name, part in (('training', split.train), ('validation', split.validation), ('test', split.test)):
    positives = int(data.labels(part, use_case).sum()) if len(part) else 0
    if positives == 0:
      ranges = ', '.join(f'{range_name} {days}' for range_name, days in protocol.describe().items())
      raise ValueError(f'The {name} range has {len(part):,} labelled {use_case.event_noun} and {positives} '
                       f'{use_case.positive_noun} in {warehouse_url} ({ranges}); it needs both. Ingest more days or '
                       'choose other dates.')
  return split


@dataclasses.dataclass
class Evaluation:
  """The recipe fitted on one split, and the test figures of it and of the logistic baseline."""
  network: object
  devices: List[str]
  fitted: Dict[str, object]  # what the fit found: epochs run per network, trees kept
  fit_seconds: float
  threshold: float
  validation_scores: np.ndarray
  test_scores: np.ndarray
  metrics: Dict[str, object]
  baseline_scores: np.ndarray
  baseline_metrics: Dict[str, object]


def fit_and_evaluate(args, split: evaluate.Split, feature_names: List[str]) -> Evaluation:
  """Fits the model families (early stopping on the validation split) and the baseline on the split's training
  rows, chooses each one's threshold on the validation split, fits both again on the training and validation rows
  with ``args.refit``, and tests both on its test range."""
  use_case = load_use_case(args.use_case)
  train = data.feature_matrix(split.train, feature_names), data.labels(split.train, use_case)
  validation = data.feature_matrix(split.validation, feature_names), data.labels(split.validation, use_case)
  whole = tuple(map(np.concatenate, zip(train, validation, strict=True))) if args.refit else None
  test_x = data.feature_matrix(split.test, feature_names)
  fit_started = time.monotonic()
  network, devices, fitted, validation_scores = _fit_model(args, train, validation, whole)
  fit_seconds = time.monotonic() - fit_started
  validation_x, validation_y = validation
  threshold = evaluate.choose_threshold(validation_y, validation_scores)
  test_scores = model.predict(network, test_x)
  baseline = model.train_baseline(*train, args.seed)
  baseline_threshold = evaluate.choose_threshold(validation_y, baseline.predict_proba(validation_x)[:, 1])
  if whole:
    baseline = model.train_baseline(*whole, args.seed)
  baseline_scores = baseline.predict_proba(test_x)[:, 1]
  return Evaluation(network, devices, fitted, fit_seconds, threshold, validation_scores, test_scores,
                    evaluate.test_metrics(split.test, test_scores, threshold, use_case), baseline_scores,
                    evaluate.test_metrics(split.test, baseline_scores, baseline_threshold, use_case))


@dataclasses.dataclass
class Result:
  """What a training run produced and decided."""
  version: str
  metadata: Dict[str, object]
  promoted: bool


def train(args) -> Result:
  """Trains, evaluates and publishes one version (see the module docstring)."""
  started = time.monotonic()
  if args.gate == 'prequential' and args.prequential_folds < 2:
    raise ValueError('--gate prequential compares prequential folds: give --prequential-folds 2 or more.')
  warehouse = open_warehouse(args.warehouse)
  use_case = load_use_case(args.use_case)
  protocol = protocol_of(args, warehouse)
  feature_names = feature_names_of(use_case, args.feature_set)
  protocols = evaluate.prequential_protocols(protocol, args.prequential_folds)
  tuned = bool(args.tune_trials or args.tune_seconds)
  validation_protocols = tune.validation_protocols(protocol, args.tune_weeks) if tuned else []
  first_day = min(earlier.train_start for earlier in [*protocols, *validation_protocols])
  rows = data.read_labelled_rows(warehouse, first_day, protocol.test_end, feature_names, use_case,
                                 args.features_table, args.labels_table)
  split = _checked_split(rows, protocol, warehouse.url, use_case)
  earlier_splits = [_checked_split(rows, earlier, warehouse.url, use_case) for earlier in protocols[1:]]
  ranges = ', '.join(f'{part} {days}' for part, days in protocol.describe().items())
  print(f'read {len(rows):,} labelled {use_case.event_noun} from {warehouse.url} in '
        f'{time.monotonic() - started:.1f} s; {ranges}', flush=True)

  searches = []
  if tuned:
    validation_splits = [_checked_split(rows, validation, warehouse.url, use_case)
                         for validation in validation_protocols]
    print(f'tuning on {len(validation_splits)} validation split(s), tests '
          f'{", ".join(validation.describe()["test"] for validation in validation_protocols)}', flush=True)
    for family in args.model_family.split('+'):
      found = tune.search(family, functools.partial(_validation_average_precision, args, family, validation_splits,
                                                    feature_names),
                          {name: getattr(args, name) for name in tune.SEARCHED_SETTINGS[family]},
                          args.tune_trials or None, args.tune_seconds or None, args.seed)
      searches.append(found)
      args = argparse.Namespace(**{**vars(args), **found.best})

  evaluation = fit_and_evaluate(args, split, feature_names)
  network, threshold, test_scores, metrics = (evaluation.network, evaluation.threshold, evaluation.test_scores,
                                              evaluation.metrics)
  prequential = None
  folds = [evaluation]
  if earlier_splits:
    for number, (earlier, earlier_split) in enumerate(zip(protocols[1:], earlier_splits, strict=True), start=2):
      print(f'prequential fold {number} of {len(protocols)}: test {earlier.describe()["test"]}', flush=True)
      folds.append(fit_and_evaluate(args, earlier_split, feature_names))
    summarized = evaluate.summarized_metrics(use_case)
    prequential = {
        'folds': [{'test': fold_protocol.describe()['test'],
                   'model': {name: fold.metrics[name] for name in summarized},
                   'baseline': {name: fold.baseline_metrics[name] for name in summarized}}
                  for fold_protocol, fold in zip(protocols, folds, strict=True)],
        'model': evaluate.mean_and_spread([fold.metrics for fold in folds], summarized),
        'baseline': evaluate.mean_and_spread([fold.baseline_metrics for fold in folds], summarized)}
  train_y, validation_y, test_y = (data.labels(split.train, use_case), data.labels(split.validation, use_case),
                                   data.labels(split.test, use_case))
  store = ModelStore(args.model_dir)
  champion = store.current()
  score_champion = _champion_scorer(store, champion)
  champion_scores = score_champion(split.test) if score_champion else None

  version = new_version()
  metadata = {
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(),
      'use_case': use_case.name,
      'model': {'kind': 'keras', 'family': args.model_family, 'name': network.name, **_family_parameters(args),
                **evaluation.fitted, 'fit_seconds': round(evaluation.fit_seconds, 1), 'devices': evaluation.devices},
      'training': {'warehouse': warehouse.url, 'features_table': args.features_table,
                   'labels_table': args.labels_table, **protocol.describe(),
                   'rows': {'train': len(split.train), 'validation': len(split.validation), 'test': len(split.test)},
                   use_case.positive_noun: {'train': int(train_y.sum()), 'validation': int(validation_y.sum()),
                                            'test': int(test_y.sum())}},
      'features': feature_names,
      'feature_statistics': data.feature_statistics(data.feature_matrix(split.train, feature_names), feature_names),
      'score_statistics': data.feature_statistics(evaluation.validation_scores[:, None], ['score'])['score'],
      'threshold': threshold,
      'metrics': metrics,
      'baseline': {'kind': 'logistic regression (scikit-learn)', 'metrics': evaluation.baseline_metrics},
      'parent_version': champion,
  }
  if prequential:
    metadata['prequential'] = prequential
  if searches:
    metadata['tuning'] = {'validation_tests': [validation.describe()['test'] for validation in validation_protocols],
                          'families': [found.describe() for found in searches]}
  with tempfile.TemporaryDirectory() as scratch:
    plots = {'pr_curve.png': os.path.join(scratch, 'pr_curve.png'),
             'score_histogram.png': os.path.join(scratch, 'score_histogram.png')}
    curves = {'this model': test_scores, 'logistic baseline': evaluation.baseline_scores}
    if champion_scores is not None:
      curves[f'champion {champion}'] = champion_scores
    evaluate.plot_precision_recall(test_y, curves, plots['pr_curve.png'])
    evaluate.plot_score_histogram(test_y, test_scores, threshold, plots['score_histogram.png'], use_case)
    model_file = os.path.join(scratch, 'model.keras')
    network.save(model_file)
    store.publish(version, model_file, metadata, plots)

  decision = _gate(args, store, champion, score_champion, champion_scores,
                   list(zip(protocols, [split, *earlier_splits], folds, strict=True)))
  promoted = decision['blessed'] and not args.no_promote
  store.update_metadata(version, blessing={**decision, 'promoted': promoted})
  # Gated against the champion read before training: promoted only if that one is still in service.
  if promoted and store.promote_replacing(version, champion) is None:
    promoted = False
    store.update_metadata(version, blessing={**decision, 'promoted': False, 'reason': (
        f'{decision["reason"]}; not promoted: version {store.current()} went in service while this one trained')})
  return Result(version, store.metadata(version), promoted)


def _validation_average_precision(args, family: str, validation_splits: List[evaluate.Split],
                                  feature_names: List[str], settings: Dict[str, object]) -> float:
  """The mean test average precision over ``validation_splits`` of ``family`` fitted with ``settings``."""
  trial = argparse.Namespace(**{**vars(args), **settings, 'model_family': family})
  return float(np.mean([fit_and_evaluate(trial, validation, feature_names).metrics['average_precision']
                        for validation in validation_splits]))


def _family_parameters(args) -> Dict[str, object]:
  """The settings of the chosen model families, for the metadata."""
  settings = {'keras': {'hidden_units': args.hidden_units, 'ensemble': args.ensemble,
                        'positive_weight': args.positive_weight, 'learning_rate': args.learning_rate},
              'trees': {'max_trees': args.max_trees, 'tree_depth': args.tree_depth,
                        'tree_learning_rate': args.tree_learning_rate},
              'forest': {'forest_trees': args.forest_trees, 'forest_depth': args.forest_depth}}
  return {name: value for family in args.model_family.split('+') for name, value in settings[family].items()}


def _fit_model(args, train: Tuple[np.ndarray, np.ndarray], validation: Tuple[np.ndarray, np.ndarray],
               whole: Optional[Tuple[np.ndarray, np.ndarray]]):
  """Fits the chosen model families, each stopped early on ``validation``, then, given ``whole`` (the training and
  validation rows), each again with the length found.

  Returns the Keras model of the families' mean score, the devices, what the fit found, and the validation rows'
  scores by the first fits, which did not see them.
  """
  fitted: Dict[str, object] = {'refit': whole is not None}
  parts, held_out, devices = [], [], []
  for family in args.model_family.split('+'):
    first, family_devices, found = _fit_family(args, family, train, validation)
    held_out.append(model.predict(first, validation[0]) if family == 'keras'
                    else trees.probabilities(first, validation[0]))
    served = _fit_family(args, family, whole, validation, found)[0] if whole else first
    parts.append(_as_keras(family, served, validation[0]))
    devices.extend(family_devices)
    fitted.update(found)
  return model.average(parts), devices, fitted, np.mean(held_out, axis=0)


def _as_keras(family: str, fitted, check_rows: np.ndarray):
  """The Keras model that serves a fitted family (the networks' mean already is one)."""
  if family == 'trees':
    return trees.boosted_to_keras(fitted, check_rows)
  if family == 'forest':
    return trees.forest_to_keras(fitted, check_rows)
  return fitted


def _fit_family(args, family: str, rows: Tuple[np.ndarray, np.ndarray], validation: Tuple[np.ndarray, np.ndarray],
                found: Optional[Dict[str, object]] = None):
  """One family fitted on ``rows`` (networks: their Keras mean; trees: an XGBoost booster; forest: scikit-learn's):
  stopped early on ``validation``, or, given what an earlier fit ``found``, with its length. Returns the model, the
  devices and what the fit found."""
  x, y = rows
  if family == 'keras':
    return _fit_networks(args, rows, validation, found and found['best_epochs'])
  if family == 'trees':
    params = {**trees.DEFAULT_TREE_PARAMS, 'n_estimators': found['trees'] if found else args.max_trees,
              'max_depth': args.tree_depth, 'learning_rate': args.tree_learning_rate}
    booster = trees.fit(x, y, *((None, None) if found else validation), params, args.seed)
    count = booster.num_boosted_rounds()
    print(f'boosted {count} trees of depth at most {args.tree_depth} on {len(x):,} rows (XGBoost, CPU)', flush=True)
    return booster, ['CPU (XGBoost)'], {'trees': count}
  forest = trees.fit_forest(x, y, args.forest_trees, args.forest_depth, args.seed)
  print(f'grew a forest of {args.forest_trees} trees of depth at most {args.forest_depth} on {len(x):,} rows '
        '(scikit-learn, CPU)', flush=True)
  return forest, ['CPU (scikit-learn)'], {}


def _fit_networks(args, rows: Tuple[np.ndarray, np.ndarray], validation: Tuple[np.ndarray, np.ndarray],
                  epochs: Optional[List[int]] = None):
  """Fits ``args.ensemble`` networks from consecutive seeds, stopped early on ``validation`` or for the given
  ``epochs`` each; returns their mean, the devices, and the epochs run and kept."""
  strategy, devices = model.distribution_strategy()
  positives = load_use_case(args.use_case).positive_noun
  x, y = rows
  print(f'training on {", ".join(devices)} ({type(strategy).__name__}): {len(x):,} rows, {int(y.sum()):,} '
        f'{positives}; ' + (f'validation {len(validation[0]):,} rows, {int(validation[1].sum()):,} {positives}'
                            if epochs is None else f'{"+".join(map(str, epochs))} epochs'), flush=True)
  batch_size = args.batch_size * strategy.num_replicas_in_sync
  validation_dataset = data.to_dataset(*validation, batch_size) if epochs is None else None
  members, epochs_run, best_epochs = [], [], []
  for number, seed in enumerate(range(args.seed, args.seed + args.ensemble)):
    with strategy.scope():
      member = model.build_model(x, [int(units) for units in args.hidden_units.split(',')],
                                 learning_rate=args.learning_rate, seed=seed)
    history = model.fit(member, data.to_dataset(x, y, batch_size, shuffle_seed=seed), validation_dataset,
                        args.epochs if epochs is None else epochs[number], args.patience, args.positive_weight)
    members.append(member)
    epochs_run.append(len(history.history['loss']))
    best_epochs.append(model.best_epoch(history) if epochs is None else epochs[number])
  return model.average(members), devices, {'epochs_run': epochs_run, 'best_epochs': best_epochs}


def feature_names_of(use_case: UseCase, feature_set: str) -> List[str]:
  """The features of the use case's set ``feature_set``.

  Raises:
    ValueError: the use case has no such set.
  """
  if feature_set not in use_case.feature_sets:
    raise ValueError(f'The {use_case.name} use case has no feature set {feature_set!r}: choose '
                     f'{", ".join(use_case.feature_sets)}.')
  return list(use_case.feature_sets[feature_set])


def _champion_scorer(store: ModelStore, champion: Optional[str]) -> Optional[Callable[..., np.ndarray]]:
  """Scores test rows with the champion, loaded once, for the gate (None without a champion)."""
  if champion is None:
    return None
  champion_features = store.metadata(champion)['features']
  served = store.load_model(champion)

  def score(test) -> np.ndarray:
    missing = sorted(set(champion_features) - set(test.columns))
    if missing:
      raise ValueError(f'The champion {champion} needs features this run did not read: {", ".join(missing)}. '
                       'Train with the same --feature-set, or promote by hand.')
    return model.predict(served, data.feature_matrix(test, champion_features))

  return score


def _gate(args, store: ModelStore, champion: Optional[str], score_champion: Optional[Callable[..., np.ndarray]],
          champion_scores: Optional[np.ndarray],
          folds: List[Tuple[evaluate.Protocol, evaluate.Split, Evaluation]]) -> Dict[str, object]:
  """The blessing gate's decision on the test range (``--gate test``) or on the folds fair to the champion;
  ``champion_scores``: the champion's scores of the first fold's test rows, already computed."""
  if champion is None:
    return bless(folds[0][2].metrics['average_precision'], None, None, args.tolerance)
  compared = folds[:1]
  if args.gate == 'prequential':
    champion_range = store.metadata(champion).get('training', {}).get('validation')
    if champion_range:
      # A fold whose test range the champion was trained on would favour it.
      trained_until = datetime.date.fromisoformat(champion_range.split('..')[1])
      compared = [fold for fold in folds if fold[0].test_start > trained_until] or compared
  from sklearn.metrics import average_precision_score
  first_split = folds[0][1]
  use_case = load_use_case(args.use_case)
  champion_aps = [average_precision_score(data.labels(fold_split.test, use_case),
                                          champion_scores if fold_split is first_split
                                          else score_champion(fold_split.test))
                  for _, fold_split, _ in compared]
  rows = ('the same test rows' if len(compared) == 1 else
          f'the same test rows of {len(compared)} prequential folds (mean)')
  return {**bless(float(np.mean([fold.metrics['average_precision'] for _, _, fold in compared])), champion,
                  float(np.mean(champion_aps)), args.tolerance, rows),
          'compared_tests': [fold_protocol.describe()['test'] for fold_protocol, _, _ in compared]}


def bless(candidate_ap: float, champion: Optional[str], champion_ap: Optional[float], tolerance: float,
          compared_on: str = 'the same test rows') -> Dict[str, object]:
  """The blessing gate's decision: no champion, or an average precision not worse than its, less the tolerance."""
  if champion is None:
    return {'blessed': True, 'reason': 'no champion yet', 'candidate_average_precision': candidate_ap}
  blessed = candidate_ap >= champion_ap - tolerance
  comparison = '>=' if blessed else '<'
  return {'blessed': blessed, 'champion': champion, 'champion_average_precision': champion_ap,
          'candidate_average_precision': candidate_ap, 'tolerance': tolerance,
          'reason': f'average precision {candidate_ap:.4f} {comparison} champion {champion_ap:.4f} - tolerance '
                    f'{tolerance} on {compared_on}'}


def describe_fit(model_metadata: Dict[str, object]) -> str:
  """What was fitted, how long it took and where, from a version's ``model`` metadata."""
  parts = []
  if 'epochs_run' in model_metadata:
    parts.append(f"{model_metadata['ensemble']} network(s), {'+'.join(map(str, model_metadata['epochs_run']))} "
                 f"epochs (kept {'+'.join(map(str, model_metadata['best_epochs']))})")
  if 'trees' in model_metadata:
    parts.append(f"{model_metadata['trees']} boosted trees of depth at most {model_metadata['tree_depth']}")
  if 'forest_trees' in model_metadata:
    parts.append(f"a forest of {model_metadata['forest_trees']} trees of depth at most "
                 f"{model_metadata['forest_depth']}")
  refit = ', each fitted again on the training and validation days' if model_metadata.get('refit') else ''
  return (f"{' and '.join(parts)}{refit} in {model_metadata['fit_seconds']} s on "
          f"{', '.join(model_metadata['devices'])}")


def summary(result: Result, model_dir: str) -> str:
  """The end-of-run report, for people."""
  meta = result.metadata
  metrics, baseline = meta['metrics'], meta['baseline']['metrics']
  training = meta['training']
  use_case = load_use_case(meta['use_case'])
  ranking = use_case.ranking_abbreviation
  left_out = (f' ({use_case.ranked_noun}s already known positive left out)' if use_case.known_positives_leave_test
              else '')
  lines = [
      f"model {result.version}: {describe_fit(meta['model'])}; {len(meta['features'])} features",
      f"train {training['train']} ({training['rows']['train']:,} rows), validation {training['validation']}"
      f"{' (then both)' if meta['model'].get('refit') else ''}, delay {training['delay_days']} days, "
      f"test {training['test']}: {metrics[use_case.event_noun]:,} "
      f"{use_case.event_noun}, {metrics[use_case.positive_noun]:,} {use_case.positive_noun}{left_out}",
      f"{'':24}{'AUC ROC':>9}{'avg prec':>10}{ranking:>8}{'threshold':>11}{'precision':>11}{'recall':>8}",
  ]
  for name, figures in ((f"{meta['model']['family']} model", metrics), ('logistic baseline', baseline)):
    lines.append(f"{name:24}{figures['auc_roc']:>9.3f}{figures['average_precision']:>10.3f}"
                 f"{figures[use_case.ranking_metric]:>8.3f}{figures['threshold']:>11.3f}"
                 f"{figures['precision_at_threshold']:>11.3f}{figures['recall_at_threshold']:>8.3f}")
  if 'prequential' in meta:
    prequential = meta['prequential']
    tests = [fold['test'] for fold in prequential['folds']]
    lines.append(f'prequential, {len(tests)} test ranges from {tests[-1]} to {tests[0]}, mean (standard deviation) '
                 f'of AUC ROC, average precision, {ranking}:')
    for name, key in ((f"{meta['model']['family']} model", 'model'), ('logistic baseline', 'baseline')):
      lines.append(f'{name:24}' + evaluate.mean_and_spread_text(prequential[key]))
  if 'tuning' in meta:
    lines.append(f"tuned on validation tests {', '.join(meta['tuning']['validation_tests'])} (mean average "
                 'precision):')
    for found in meta['tuning']['families']:
      settings = tune.settings_text(found['best'])
      lines.append(f"  {found['family']}: {found['trials']} trials in {found['seconds']:.0f} s, "
                   f"{found['given_average_precision']:.4f} as given -> {found['best_average_precision']:.4f} with "
                   f"{settings}")
  blessing = meta['blessing']
  verdict = 'promoted: now current' if blessing['promoted'] else (
      'blessed, not promoted (--no-promote)' if blessing['blessed'] else 'refused: the champion stays current')
  store = ModelStore(model_dir)
  lines += [f"blessing gate: {blessing['reason']} -> {verdict}",
            f"plots: {', '.join(FileSystems.join(store.version_dir(result.version), name) for name in meta['files'])}",
            f"metadata: {FileSystems.join(store.version_dir(result.version), 'metadata.json')}"]
  return '\n'.join(lines)


def run(argv: Optional[List[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  if args.vertex:
    if not (args.model_dir.startswith('gs://') and (args.warehouse or '').startswith('bigquery://')):
      raise ValueError('A Vertex AI job reads and writes only what it can reach: give --warehouse '
                       'bigquery://PROJECT/DATASET and --model-dir gs://BUCKET/PATH.')
    return vertex.run_vertex(args, vertex.trainer_arguments(argv))
  if args.dry_run:
    raise ValueError('--dry-run prints a Vertex AI job spec: use it with --vertex.')
  result = train(args)
  print(summary(result, args.model_dir))
  return 0


if __name__ == '__main__':
  sys.exit(run())
