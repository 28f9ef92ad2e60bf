"""The Beam feature transform against a plain loop over the same feature classes.

All compute the features of the same simulated events: the baseline
applies CustomerHistory and TerminalHistory (use_cases/fraud/features.py) in one
event-time-ordered Python loop; the measured ones are ComputeFeatures on the
pinned local runner, start-up included, in each of its forms: keyed state
(a stream on Dataflow or Flink), ordered bundles (a stream on the local
runner; here the whole input is one bundle) and grouped (bounded input). Run: ``make bench`` or
``python -m bench.features --customers 5000 --days 3``.
"""

import argparse

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from bench.common import Timer
from pipelines.options import LOCAL_RUNNER
from transforms.feature_forms import FORMS
from use_cases.fraud.features import DEFAULT_LABEL_DELAY_DAYS, ComputeFeatures, Histories
from use_cases.fraud.records import Label, Transaction
from use_cases.fraud.simulator import SimulationConfig, simulate


def simulated_events(customers: int, days: int):
  """Transactions and labels of a simulation, in event-time order (labels first at one instant)."""
  simulation = simulate(SimulationConfig(customers=customers, terminals=2 * customers, days=days))
  delay = DEFAULT_LABEL_DELAY_DAYS * 86_400
  events = []
  for row in simulation.transactions.itertuples():
    tx_time = row.tx_datetime.timestamp()
    events.append((tx_time, 1, Transaction(row.transaction_id, tx_time, row.customer_id, row.terminal_id,
                                           row.amount)))
    events.append((tx_time + delay, 0, Label(row.transaction_id, tx_time, row.customer_id, row.terminal_id,
                                             row.is_fraud, row.fraud_scenario, tx_time + delay)))
  events.sort(key=lambda e: (e[0], e[1], e[2].transaction_id))
  return events


def plain_loop(events, histories=None):
  """Feature rows of (time, kind, event) tuples in order; ``histories``: kept across calls."""
  histories = Histories() if histories is None else histories
  rows = (histories.apply(event) for _, _, event in events)
  return [row for row in rows if row is not None]


def beam_transform(events, form: str):
  timestamped = [beam.window.TimestampedValue(event, at) for at, _, event in events]
  with beam.Pipeline(options=PipelineOptions(flags=[], runner=LOCAL_RUNNER)) as pipeline:
    _ = (pipeline
         | beam.Create([timestamped])
         | 'InOrder' >> beam.FlatMap(lambda listed: listed)
         | ComputeFeatures(form=form))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--customers', type=int, default=5_000, help='Customers (terminals: twice as many).')
  parser.add_argument('--days', type=int, default=3)
  args = parser.parse_args(argv)
  events = simulated_events(args.customers, args.days)
  with Timer() as loop:
    rows = plain_loop(events)
  print(f'features of {len(rows):,} transactions ({len(events):,} events with the labels), '
        f'{args.customers:,} customers, {2 * args.customers:,} terminals, {args.days} days')
  print(f'{"plain loop over the feature classes":52}{len(events) / loop.seconds:>9,.0f} events/s  '
        f'{loop.seconds:7.2f} s')
  for form in FORMS:
    with Timer() as pipeline:
      beam_transform(events, form)
    print(f'{f"ComputeFeatures, {form}, on {LOCAL_RUNNER}":52}{len(events) / pipeline.seconds:>9,.0f} events/s  '
          f'{pipeline.seconds:7.2f} s (start-up included): {loop.seconds / pipeline.seconds:.4f}x the plain loop')


if __name__ == '__main__':
  main()
