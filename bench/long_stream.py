"""A long stream through the streaming scorer: resident memory against the simulated days it has scored.

The standard simulated run (FRAUD.md: 5,000 customers, 10,000 terminals, 183
days, about 1.75 million transactions and their labels) is produced to a
fresh local broker, and one streaming scorer (``python -m pipelines.scoring``,
``--score_from earliest``, state snapshots every minute) scores all of it as
fast as it can. Its resident memory (VmRSS) is sampled every ``--sample-s``
with the day it has reached (the share of the transactions its consumer group
committed, times the days: the simulator's daily volume is even).

The histories hold each customer's last 60 days and each terminal's last 37
(the label delay and the 30-day window), so once the stream is past its first
60 days the state should stop growing: the summary gives the memory at day
60, its range after it and how far that range is from the median after day 60
(the goal: within 10 %). The samples go to ``--csv`` and the curve to
``--plot``.

Run: ``python -m bench.long_stream`` (about 15 minutes on 2 cores; part of
``make bench``), or ``--days 40`` for a quick look.
"""

import argparse
import csv
import os
import tempfile
import time

import numpy as np

from bench.common import local_broker
from kbml import simulator
from kbml.kafka_client import create_topics, group_lag
from tests.pipeline_process import PipelineProcess
from tests.scoring_models import publish_model
from use_cases.fraud import simulator as fraud_simulator
from use_cases.fraud.simulator import SimulationConfig, simulate

STEADY_FROM_DAY = 60


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--customers', type=int, default=5_000)
  parser.add_argument('--terminals', type=int, default=10_000)
  parser.add_argument('--days', type=int, default=183)
  parser.add_argument('--sample-s', type=float, default=5.0)
  parser.add_argument('--timeout-s', type=float, default=3600.0, help='Longest run of the scorer.')
  parser.add_argument('--csv', default='bench/results/long_stream.csv')
  parser.add_argument('--plot', default='docs/long-stream-memory.png')
  return parser.parse_args(argv)


def _plot(samples, path: str, title: str):
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot
  days, memory = zip(*[(sample['day'], sample['resident_mb']) for sample in samples], strict=True)
  figure, axes = pyplot.subplots(figsize=(8, 4))
  axes.plot(days, memory)
  axes.axvline(STEADY_FROM_DAY, color='grey', linestyle=':', label=f'day {STEADY_FROM_DAY}')
  axes.set_xlabel('simulated day scored')
  axes.set_ylabel('scorer resident memory (MiB)')
  axes.set_ylim(bottom=0)
  axes.set_title(title)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def main(argv=None):
  args = parse_args(argv)
  simulation = simulate(SimulationConfig(customers=args.customers, terminals=args.terminals, days=args.days))
  transactions = len(simulation.transactions)
  print(f'{transactions:,} transactions over {args.days} days', flush=True)
  with local_broker() as bootstrap, tempfile.TemporaryDirectory() as folder:
    topics = {role: f'long-{role}' for role in ('transactions', 'labels', 'predictions', 'dead-letter', 'alerts')}
    create_topics({'bootstrap.servers': bootstrap}, topics.values(), 4)
    started = time.monotonic()
    simulator.produce(fraud_simulator.events(simulation), {'bootstrap.servers': bootstrap}, topics['transactions'],
                      topics['labels'])
    print(f'produced in {time.monotonic() - started:.0f} s', flush=True)
    model_dir = os.path.join(folder, 'models')
    publish_model(model_dir, seed=1)
    group = 'long-stream'
    scorer = PipelineProcess('pipelines.scoring', [
        '--bootstrap_servers', bootstrap, '--model_dir', model_dir, '--consumer_group', group, '--score_from',
        'earliest', '--state_snapshot', os.path.join(folder, 'scorer.features'),
        *[f'--{role.replace("-", "_")}_topic={topic}' for role, topic in topics.items()]],
        os.path.join(folder, 'scorer.log'))
    samples = []
    started = time.monotonic()
    scorer.start()
    try:
      lag = None
      while lag != 0:
        time.sleep(args.sample_s)
        if not scorer.running() or time.monotonic() - started > args.timeout_s:
          raise RuntimeError(f'the scorer stopped or ran out of time:\n{scorer.log_tail()}')
        lag = group_lag({'bootstrap.servers': bootstrap}, group, [topics['transactions']])
        done = transactions - lag if lag is not None else 0
        samples.append({'elapsed_s': round(time.monotonic() - started, 1), 'day': args.days * done / transactions,
                        'resident_mb': round(scorer.resident_mb(), 1), 'cpu_s': round(scorer.cpu_seconds(), 1)})
        if len(samples) % 12 == 0:
          print(f'  {samples[-1]["elapsed_s"]:6.0f} s: day {samples[-1]["day"]:5.1f}, '
                f'{samples[-1]["resident_mb"]:7.1f} MiB', flush=True)
    finally:
      scorer.kill()
  os.makedirs(os.path.dirname(args.csv) or '.', exist_ok=True)
  with open(args.csv, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(samples[0]))
    writer.writeheader()
    writer.writerows(samples)
  steady = np.array([s['resident_mb'] for s in samples if s['day'] >= STEADY_FROM_DAY])
  at_steady = next(s['resident_mb'] for s in samples if s['day'] >= STEADY_FROM_DAY)
  median = float(np.median(steady))
  elapsed = samples[-1]['elapsed_s']
  print(f'\n{args.days} days ({transactions:,} transactions) scored in {elapsed:.0f} s '
        f'({transactions / elapsed:,.0f} transactions/s)')
  print(f'resident memory: {samples[0]["resident_mb"]:.0f} MiB at the first sample, {at_steady:.0f} MiB at day '
        f'{STEADY_FROM_DAY}, {steady.min():.0f} to {steady.max():.0f} MiB after it (median {median:.0f}: '
        f'{100 * (steady.min() / median - 1):+.1f} % to {100 * (steady.max() / median - 1):+.1f} %), '
        f'{samples[-1]["resident_mb"]:.0f} MiB at the end')
  _plot(samples, args.plot, f'Streaming scorer, {args.days} simulated days ({transactions / 1e6:.2f} M transactions)')
  print(f'samples: {args.csv}; plot: {args.plot}')


if __name__ == '__main__':
  main()
