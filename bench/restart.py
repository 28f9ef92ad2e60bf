"""Restart to first prediction: a streaming scorer killed and started again, after short and long histories.

For each history length (``--days``, 30 and 150 by default) a fresh set of
topics holds that many simulated days. Two scorers run on it, each with its
own consumer group: one saves snapshots of its feature histories
(``--state_snapshot_interval_s``), the baseline does not and rebuilds them
from the beginning of the topics at every start, as every start did before
snapshots. Both score what comes after the history (their groups' offsets are
set at its end). The one with snapshots first reads the whole history until
a snapshot covers it; then each scorer is, ``--restarts`` times, started,
given the next live transactions at once, and killed with SIGKILL once the
first of their predictions came (with snapshots: once a snapshot after it
was saved). The time from the start of the process to that first prediction
is the restart time. The two scorers' restarts are interleaved.

The summary gives, per history length and scorer, the median restart time
and the spread, and the ratio of the long history's median to the short's:
with snapshots it should stay near 1 (the goal is at most 1.2), without them
it grows with the history.

Run: ``python -m bench.restart`` (part of ``make bench``).
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional

from confluent_kafka import TopicPartition

from bench.common import local_broker
from kbml import simulator
from kbml.kafka_client import create_topics, fetched_end_offset, list_partitions, new_consumer
from tests.pipeline_process import PipelineProcess
from tests.scoring_models import publish_model
from tests.test_scoring import TopicReader
from transforms.snapshots import StateSnapshots
from use_cases.fraud import simulator as fraud_simulator
from use_cases.fraud.features import DEFAULT_LABEL_DELAY_DAYS, snapshot_identity
from use_cases.fraud.simulator import SimulationConfig, simulate

SCORERS = ('snapshots', 'rebuild')
LIVE_EVENTS = 40


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--days', type=int, nargs='+', default=[30, 150], help='History lengths, in days.')
  parser.add_argument('--customers', type=int, default=500)
  parser.add_argument('--restarts', type=int, default=3, help='Restarts measured per scorer and history.')
  parser.add_argument('--snapshot-interval-s', type=float, default=5.0)
  parser.add_argument('--timeout-s', type=float, default=900.0, help='Longest wait for a scorer to catch up.')
  return parser.parse_args(argv)


class ScorerUnderTest:
  """A streaming scorer on given topics, with or without snapshots, killed and restarted on demand."""

  def __init__(self, bootstrap: str, topics: Dict[str, str], model_dir: str, name: str, folder: str,
               snapshot_interval_s: float):
    self.group = f'restart-{name}-{topics["transactions"]}'
    path = f'{folder}/{name}.features'
    self.snapshots = StateSnapshots(path, snapshot_identity(DEFAULT_LABEL_DELAY_DAYS, topics['transactions'],
                                                            topics['labels'])) if name == 'snapshots' else None
    self.process = PipelineProcess('pipelines.scoring', [
        '--bootstrap_servers', bootstrap, '--model_dir', model_dir, '--consumer_group', self.group,
        '--state_snapshot_interval_s', str(snapshot_interval_s if self.snapshots else 0), '--state_snapshot', path,
        *[f'--{role.replace("-", "_")}_topic={topic}' for role, topic in topics.items()]], f'{folder}/{name}.log')

  def wait_for_a_snapshot(self, covering: Optional[int] = None, after: float = 0.0, timeout_s: float = 900.0):
    """Waits for a snapshot saved after ``after`` (epoch seconds), of at least ``covering`` transactions."""
    deadline = time.monotonic() + timeout_s
    while True:
      header = self.snapshots.header()
      applied = sum(offset for (kind, _), offset in header.offsets.items() if kind == 'Transaction') if header else 0
      if header and header.saved_at > after and applied >= (covering or 0):
        return
      if time.monotonic() > deadline or not self.process.running():
        raise RuntimeError(f'no snapshot of the history:\n{self.process.log_tail()}')
      time.sleep(0.5)


def _commit_end_offsets(bootstrap: str, group: str, topic: str):
  """Commits the topic's end offsets for the group: its scorer scores only what comes after the history."""
  consumer = new_consumer({'bootstrap.servers': bootstrap, 'group.id': group})
  ends = [TopicPartition(t, p, fetched_end_offset(consumer, t, p, 0)) for t, p in list_partitions(consumer, [topic])]
  consumer.commit(offsets=ends, asynchronous=False)
  consumer.close()


def measure(bootstrap: str, days: int, args: argparse.Namespace, folder: str) -> Dict[str, List[float]]:
  """The restart times of each scorer after ``days`` of history."""
  topics = {role: f'restart-{days}d-{role}-{int(time.time())}' for role in
            ('transactions', 'labels', 'predictions', 'dead-letter', 'alerts')}
  create_topics({'bootstrap.servers': bootstrap}, topics.values(), 4)
  simulation = simulate(SimulationConfig(customers=args.customers, terminals=2 * args.customers,
                                         days=days + args.restarts * len(SCORERS) + 1, seed=days))
  events = list(fraud_simulator.events(simulation))
  split_ms = int(simulation.config.start.timestamp() * 1000) + days * 86_400_000
  history, live = [e for e in events if e.timestamp_ms < split_ms], [e for e in events if e.timestamp_ms >= split_ms]
  started = time.monotonic()
  simulator.produce(history, {'bootstrap.servers': bootstrap}, topics['transactions'], topics['labels'])
  print(f'{days} days: {len(history):,} events produced in {time.monotonic() - started:.0f} s', flush=True)
  model_dir = f'{folder}/models-{days}'
  publish_model(model_dir, seed=1)
  os.makedirs(f'{folder}/{days}', exist_ok=True)
  scorers = {name: ScorerUnderTest(bootstrap, topics, model_dir, name, f'{folder}/{days}', args.snapshot_interval_s)
             for name in SCORERS}
  for scorer in scorers.values():
    _commit_end_offsets(bootstrap, scorer.group, topics['transactions'])
  first = scorers['snapshots']
  started = time.monotonic()
  first.process.start()
  first.wait_for_a_snapshot(covering=sum(1 for e in history if not e.is_label), timeout_s=args.timeout_s)
  print(f'  snapshots: first snapshot of the history after {time.monotonic() - started:.0f} s', flush=True)
  first.process.kill()
  predictions = TopicReader(bootstrap, topics['predictions'])
  live_transactions = iter([e for e in live if not e.is_label])
  times: Dict[str, List[float]] = {name: [] for name in SCORERS}
  for restart in range(args.restarts):
    for name, scorer in scorers.items():
      batch = [next(live_transactions) for _ in range(LIVE_EVENTS)]
      started = time.monotonic()
      scorer.process.start()
      simulator.produce(batch, {'bootstrap.servers': bootstrap}, topics['transactions'], topics['labels'])
      ids = {json.loads(e.value)['transaction_id'] for e in batch}
      if not predictions.read_until(lambda records, ids=ids: bool(ids & {r['transaction_id'] for r in records}),
                                    args.timeout_s):
        raise RuntimeError(f'no prediction after the restart:\n{scorer.process.log_tail()}')
      times[name].append(time.monotonic() - started)
      print(f'  {name} restart {restart + 1}: first prediction after {times[name][-1]:.1f} s', flush=True)
      if scorer.snapshots is not None:  # the next restart starts from a snapshot taken after this one's batch
        scorer.wait_for_a_snapshot(after=time.time(), timeout_s=args.timeout_s)
      scorer.process.kill()
  return times


def main(argv=None):
  args = parse_args(argv)
  results: Dict[int, Dict[str, List[float]]] = {}
  with local_broker() as bootstrap, tempfile.TemporaryDirectory() as folder:
    for days in args.days:
      results[days] = measure(bootstrap, days, args, folder)
  print(f'\nrestart to first prediction, median (min-max) of {args.restarts}, {args.customers} customers:')
  for name in SCORERS:
    cells = [f'{days} days {statistics.median(results[days][name]):5.1f} s '
             f'({min(results[days][name]):.1f}-{max(results[days][name]):.1f})' for days in args.days]
    ratio = statistics.median(results[args.days[-1]][name]) / statistics.median(results[args.days[0]][name])
    print(f'  {name:<9} ' + '  '.join(cells) + f'  ratio {args.days[-1]}/{args.days[0]} days: {ratio:.2f}x')


if __name__ == '__main__':
  main()
