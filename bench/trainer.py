"""The handbook's protocol end to end, and the time to train and evaluate one week.

Simulates the standard run (5,000 customers, 10,000 terminals, 183 days from
2018-04-01) with the handbook's own draws by default, so that it is the
dataset the published figures were measured on (1,754,155 transactions),
produces it to a local broker, ingests it with the ingest
pipeline (bounded) into an embedded warehouse, then trains and evaluates with
the trainer on the handbook's split: train 2018-07-25..07-31, 7 days of
delay, test 2018-08-08..08-14. It prints the test figures of each feature
set next to the handbook's published ones (FRAUD.md), and the time of
training + evaluation (target: 60 s on 2 cores) against the time of the
logistic-regression baseline's fit on the same rows, measured in the same
run. Run: ``make bench`` or ``python -m bench.trainer``.
"""

import argparse
import datetime
import os
import tempfile
import time

from bench.common import Timer, local_broker
from kbml import simulator
from kbml.warehouse import open_warehouse
from pipelines import ingest
from trainer import data, evaluate, model, task
from trainer.registry import ModelStore
from transforms.use_case import load_use_case
from use_cases.fraud import simulator as fraud_simulator
from use_cases.fraud.features import FEATURE_NAMES, HANDBOOK_FEATURES

FRAUD = load_use_case('fraud')
PUBLISHED = [  # FRAUD.md: model, AUC ROC, average precision, card precision@100, source
    ('logistic regression', 0.871, 0.606, 0.291, 'ch.3'),
    ('random forest', 0.867, 0.658, 0.287, 'ch.3'),
    ('XGBoost, tuned', 0.872, 0.692, 0.304, 'ch.5'),
    ('feed-forward network', 0.876, 0.675, 0.303, 'ch.7'),
]
# FRAUD.md: the handbook's chapter 7 summary of prequential test figures (AUC ROC, average precision, CP@100).
PUBLISHED_PREQUENTIAL = [
    ('XGBoost', 0.869, 0.687, 0.303),
    ('random forest', 0.870, 0.678, 0.299),
    ('feed-forward network', 0.876, 0.675, 0.303),
]
TARGET_SECONDS = 60


def build_warehouse(url: str, days: int, draws: str):
  config = fraud_simulator.SimulationConfig(days=days, draws=draws)
  with Timer() as simulated:
    simulation = fraud_simulator.simulate(config)
  with local_broker() as bootstrap:
    with Timer() as produced:
      simulator.produce(fraud_simulator.events(simulation), {'bootstrap.servers': bootstrap}, 'transactions', 'labels')
    with Timer() as ingested:
      ingest.run(['--bootstrap_servers', bootstrap, '--warehouse', url, '--stop_at_end'])
  count = len(simulation.transactions)
  print(f'{count:,} transactions ({simulation.transactions["is_fraud"].mean():.3%} fraudulent): simulated in '
        f'{simulated.seconds:.0f} s, produced with their labels in {produced.seconds:.0f} s, ingested in '
        f'{ingested.seconds:.0f} s ({2 * count / ingested.seconds:,.0f} events/s)', flush=True)


def scoring_microseconds(served, features, repeats: int = 3) -> float:
  """The best of ``repeats`` times to score ``features`` in batches of 1,024 rows, in microseconds per row."""
  model.predict(served, features[:1024], batch_size=1024)  # traced once, as the scorer's loader does
  times = []
  for _ in range(repeats):
    with Timer() as scored:
      model.predict(served, features, batch_size=1024)
    times.append(scored.seconds)
  return min(times) / len(features) * 1e6


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--warehouse', help='Where to keep the ingested run (default: a temporary file); when it '
                      'already holds one, the simulation and the ingest are skipped.')
  parser.add_argument('--days', type=int, default=fraud_simulator.SimulationConfig().days,
                      help='Simulated days (default: the standard run\'s %(default)s; 136 reach the test week\'s end).')
  parser.add_argument('--draws', choices=fraud_simulator.DRAWS, default='handbook',
                      help='How the simulator draws (default: %(default)s, the handbook\'s own run; vectorised: '
                      'the same rules, other numbers).')
  parser.add_argument('--families', default='keras',
                      help=f'Model families trained on the {len(FEATURE_NAMES)} features, comma-separated (each a '
                      '--model-family of `kbml train`: keras, trees, forest or several joined with "+"; default: '
                      '%(default)s); the 15 handbook features are trained with keras.')
  parser.add_argument('--prequential-folds', type=int, default=1,
                      help='Also test each family on this many weeks in all, ending with the test week, and print '
                      'the mean and standard deviation (default: %(default)s, the test week only).')
  args = parser.parse_args(argv)
  runs = [('handbook', 'keras')] + [('all', family) for family in args.families.split(',')]
  with tempfile.TemporaryDirectory() as scratch:
    url = args.warehouse or f'duckdb://{scratch}/warehouse.duckdb'
    if 'features' not in open_warehouse(url).tables():
      build_warehouse(url, args.days, args.draws)
    results = {}
    for feature_set, family in runs:
      model_dir = os.path.join(scratch, f'models-{feature_set}-{family}')
      train_args = task.build_parser().parse_args(
          ['--warehouse', url, '--model-dir', model_dir, '--train-start', '2018-07-25', '--train-end', '2018-07-31',
           '--feature-set', feature_set, '--model-family', family, '--prequential-folds',
           str(args.prequential_folds if feature_set == 'all' else 1)])
      started = time.perf_counter()
      result = task.train(train_args)
      results[(feature_set, family)] = (result, time.perf_counter() - started, model_dir)

    split = result.metadata['training']
    rows = data.read_labelled_rows(open_warehouse(url), datetime.date(2018, 7, 25), datetime.date(2018, 7, 29),
                                   HANDBOOK_FEATURES, FRAUD)
    with Timer() as baseline:
      model.train_baseline(data.feature_matrix(rows, HANDBOOK_FEATURES), data.labels(rows, FRAUD))
    test_features = data.feature_matrix(
        data.read_labelled_rows(open_warehouse(url), datetime.date(2018, 8, 8), datetime.date(2018, 8, 14),
                                FEATURE_NAMES, FRAUD), FEATURE_NAMES)
    scoring_us = {family: scoring_microseconds(ModelStore(model_dir).load_model(result.version), test_features)
                  for (feature_set, family), (result, _, model_dir) in results.items() if feature_set == 'all'}

  print(f"\nhandbook protocol: train {split['train']} + validation {split['validation']}, delay "
        f"{split['delay_days']} days, test {split['test']}")
  print(f"{'model':46}{'AUC ROC':>9}{'avg prec':>10}{'CP@100':>8}")
  for name, auc, ap, cp, source in PUBLISHED:
    print(f'{"published: " + name + " (" + source + ")":46}{auc:>9.3f}{ap:>10.3f}{cp:>8.3f}')
  for (_, family), (result, _, _) in results.items():
    features = len(result.metadata['features'])
    for name, figures in ((f'{family}, {features} features', result.metadata['metrics']),
                          (f'logistic baseline, {features} features', result.metadata['baseline']['metrics'])):
      print(f"{'ours: ' + name:46}{figures['auc_roc']:>9.3f}{figures['average_precision']:>10.3f}"
            f"{figures['card_precision_at_100']:>8.3f}")
  prequential_runs = [(family, result.metadata['prequential']) for (_, family), (result, _, _) in results.items()
                      if 'prequential' in result.metadata]
  if prequential_runs:
    tests = [fold['test'] for fold in prequential_runs[0][1]['folds']]
    print(f'\nprequential, {len(tests)} test weeks from {tests[-1]} to {tests[0]}: mean (standard deviation)')
    print(f"{'model':46}{'AUC ROC':>15}{'avg prec':>15}{'CP@100':>15}")
    for name, auc, ap, cp in PUBLISHED_PREQUENTIAL:
      print(f'{"published: " + name + " (ch.7)":46}{auc:>15.3f}{ap:>15.3f}{cp:>15.3f}')
    for family, prequential in prequential_runs:
      for name, key in ((f'{family}, {len(FEATURE_NAMES)} features', 'model'),
                        (f'logistic baseline, {len(FEATURE_NAMES)} features', 'baseline')):
        print(f"{'ours: ' + name:46}" + evaluate.mean_and_spread_text(prequential[key]))
        print(f"{'':46}per week: " + ', '.join(f"{fold[key]['average_precision']:.3f}"
                                               for fold in prequential['folds']) + ' (average precision)')
  for (_, family), (result, total_seconds, _) in results.items():
    weeks = len(result.metadata.get('prequential', {}).get('folds', [None]))
    seconds = total_seconds / weeks
    print(f"train + evaluate, {family}, {len(result.metadata['features'])} features: {seconds:.1f} s a week"
          + (f' ({total_seconds:.0f} s for {weeks} weeks)' if weeks > 1 else '') + ' '
          f"({seconds / TARGET_SECONDS:.2f}x the {TARGET_SECONDS} s target; {seconds / baseline.seconds:.0f}x the "
          f"{baseline.seconds:.2f} s logistic-regression fit on the same rows); "
          f"{task.describe_fit(result.metadata['model'])}")
  reference = runs[1][1]
  for family, microseconds in scoring_us.items():
    print(f'scoring, {family}: {microseconds:.1f} us a row in batches of 1,024 '
          f'({microseconds / scoring_us[reference]:.2f}x {reference})')


if __name__ == '__main__':
  main()
