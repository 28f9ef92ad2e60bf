"""The scoring pipeline against a hand-written consume -> features -> batch predict -> produce loop.

Both score the same simulated transactions (with their labels, which feed
the terminal features) from the same local broker with the same Keras model
(the trainer's default shape: the mean of 3 networks of 128 and 64 units),
and write the same JSON prediction per transaction (``pipelines.scoring.prediction_message``):

- throughput: each reader scores a backlog, from the moment it is ready
  (its model loaded, its consumer assigned) to the last prediction, so
  neither the process start nor the model load counts; with the CPU time
  each spent per transaction, which varies less than the wall clock on a
  busy machine (both are one Python process). The loop is started
  on filled topics. The scorer is started on empty ones, and the backlog is
  produced once it has scored a probe: a Beam pipeline is ready only once
  it runs, and its first bundle would otherwise read most of the backlog
  before its first prediction. The loop applies the feature classes of
  ``use_cases/fraud/features.py`` in event-time order per fetched batch and
  predicts batches of up to 1,024 rows.
- latency: the scorer runs live while transactions are produced at a steady
  rate; each transaction's latency runs from its send to the arrival of its
  prediction at a consumer. A new model, published before the traffic
  starts, is promoted halfway: the swap time is from the promotion to the
  first prediction by the new version.

Run: ``make bench`` or ``python -m bench.scoring --customers 2000 --days 10``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Tuple

import numpy as np
from apache_beam.ml.inference.base import PredictionResult
from confluent_kafka import TopicPartition

from bench.common import cpu_seconds, local_broker
from bench.features import plain_loop
from kbml import simulator
from kbml.kafka_client import AcknowledgedProducer, create_topics, list_partitions, new_consumer
from pipelines.scoring import prediction_message
from tests.scoring_models import publish_model
from trainer.model import DEFAULT_ENSEMBLE, DEFAULT_HIDDEN_UNITS
from trainer.registry import ModelStore
from transforms.inference import Score
from use_cases.fraud import simulator as fraud_simulator
from use_cases.fraud.features import FEATURE_NAMES, Histories
from use_cases.fraud.records import LABEL_SCHEMA, TRANSACTION_SCHEMA
from use_cases.fraud.simulator import SimulationConfig, simulate

TOPICS = ('transactions', 'labels', 'predictions', 'dead-letter', 'alerts')


class PredictionClock:
  """Consumes a predictions topic in a thread; records when each transaction's first prediction arrived."""

  def __init__(self, bootstrap: str, topic: str):
    self.arrived = {}
    self.versions = {}
    self._stop = threading.Event()
    self._consumer = new_consumer({'bootstrap.servers': bootstrap})
    self._consumer.assign([TopicPartition(t, p, 0) for t, p in list_partitions(self._consumer, [topic])])
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.is_set():
      for message in self._consumer.consume(1000, 0.05):
        if not message.error():
          now = time.time()
          prediction = json.loads(message.value())
          self.arrived.setdefault(prediction['transaction_id'], now)
          self.versions.setdefault(prediction['transaction_id'], prediction['model_version'])

  def wait_for(self, count: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while len(self.arrived) < count and time.monotonic() < deadline:
      time.sleep(0.1)
    return len(self.arrived) >= count

  def stop(self):
    self._stop.set()
    self._thread.join()


def hand_written_loop(bootstrap: str, topics, model_dir: str, transactions: int) -> Tuple[float, float]:
  """Consume -> features in event-time order -> batch predict -> produce; returns transactions/s and CPU s."""
  store = ModelStore(model_dir)
  version = store.current()
  network = store.load_model(version)
  consumer = new_consumer({'bootstrap.servers': bootstrap})
  consumer.assign([TopicPartition(t, p, 0) for t, p in list_partitions(
      consumer, [topics['transactions'], topics['labels']])])
  producer = AcknowledgedProducer({'bootstrap.servers': bootstrap})
  histories = Histories()
  scored = 0
  ready, cpu_at_ready = time.perf_counter(), cpu_seconds(os.getpid())
  while scored < transactions:
    events = []
    for message in consumer.consume(5000, 0.2):
      if message.error():
        continue
      source = (message.partition(), message.offset(), message.timestamp()[1])
      if message.topic() == topics['labels']:
        label = LABEL_SCHEMA.parse(message.value(), source)
        events.append((label.known_time, 0, label))
      else:
        transaction = TRANSACTION_SCHEMA.parse(message.value(), source)
        events.append((transaction.tx_time, 1, transaction))
    rows = plain_loop(sorted(events, key=lambda e: e[:2]), histories)
    for start in range(0, len(rows), 1024):
      batch = rows[start:start + 1024]
      features = np.array([[row[name] for name in FEATURE_NAMES] for row in batch], dtype=np.float32)
      scores = np.asarray(network.predict_on_batch(features)).reshape(-1)
      scored_at = time.time()
      for row, score in zip(batch, scores.tolist(), strict=True):
        key, value = prediction_message(PredictionResult(row, Score(score, score >= 0.5, 0.5, scored_at), version))
        producer.send(topics['predictions'], value, key)
      producer.flush(60)
      scored += len(batch)
  return scored / (time.perf_counter() - ready), cpu_seconds(os.getpid()) - cpu_at_ready


def start_scorer(bootstrap: str, topics, model_dir: str, *extra) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, '-m', 'pipelines.scoring', '--bootstrap_servers', bootstrap, '--model_dir', model_dir,
       '--consumer_group', f'bench-{uuid.uuid4().hex[:8]}',
       *[f'--{name.replace("-", "_")}_topic={topic}' for name, topic in topics.items()], *extra],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def fresh_topics(bootstrap: str):
  topics = {name: f'bench-{name}-{uuid.uuid4().hex[:8]}' for name in TOPICS}
  create_topics({'bootstrap.servers': bootstrap}, topics.values(), 4)
  return topics


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--customers', type=int, default=2_000, help='Customers (terminals: twice as many).')
  parser.add_argument('--days', type=int, default=10, help='Days of backlog for the throughput figure.')
  parser.add_argument('--rate', type=float, default=2_000, help='Live transactions per second (labels extra).')
  parser.add_argument('--live-seconds', type=float, default=30)
  args = parser.parse_args(argv)
  simulation = simulate(SimulationConfig(customers=args.customers, terminals=2 * args.customers, days=args.days))
  events = list(fraud_simulator.events(simulation))
  transactions = len(simulation.transactions)
  with local_broker() as bootstrap, tempfile.TemporaryDirectory() as model_dir:
    config = {'bootstrap.servers': bootstrap}
    publish_model(model_dir, seed=0, hidden_units=DEFAULT_HIDDEN_UNITS, ensemble=DEFAULT_ENSEMBLE)
    print(f'{transactions:,} transactions ({len(events):,} events with the labels), {args.customers:,} customers, '
          f'{args.days} days; model: mean of {DEFAULT_ENSEMBLE} networks {DEFAULT_HIDDEN_UNITS}')

    topics = fresh_topics(bootstrap)
    simulator.produce(events, config, topics['transactions'], topics['labels'])
    loop_rate, loop_cpu = hand_written_loop(bootstrap, topics, model_dir, transactions)
    print(f'{"hand-written consume -> features -> predict -> produce":58}{loop_rate:>9,.0f} transactions/s, '
          f'{loop_cpu / transactions * 1e6:,.0f} us of CPU each')

    topics = fresh_topics(bootstrap)
    clock = PredictionClock(bootstrap, topics['predictions'])
    scorer = start_scorer(bootstrap, topics, model_dir)
    try:
      wait_until_scoring(bootstrap, topics, clock, simulation)
      ready, cpu_at_ready = time.time(), cpu_seconds(scorer.pid)
      simulator.produce(events, config, topics['transactions'], topics['labels'])
      complete = clock.wait_for(transactions, 1800)
      beam_cpu = cpu_seconds(scorer.pid) - cpu_at_ready
    finally:
      scorer.kill()
      clock.stop()
    beam_rate = len(clock.arrived) / (max(clock.arrived.values()) - ready)
    print(f'{"kbml score (pipelines/scoring.py) on FnApiRunner":58}{beam_rate:>9,.0f} transactions/s, '
          f'{beam_cpu / transactions * 1e6:,.0f} us of CPU each: {beam_rate / loop_rate:.2f}x the loop\'s throughput, '
          f'{loop_cpu / beam_cpu:.2f}x its CPU efficiency{"" if complete else " (INCOMPLETE)"}')

    live_latency(bootstrap, model_dir, args, simulation)


def wait_until_scoring(bootstrap, topics, clock: PredictionClock, simulation):
  """Sends the simulation's first transaction every second until a running scorer has scored it."""
  probe = next(e for e in fraud_simulator.events(simulation) if not e.is_label)
  producer = AcknowledgedProducer({'bootstrap.servers': bootstrap})
  deadline = time.monotonic() + 180
  while not clock.arrived:
    if time.monotonic() > deadline:
      raise TimeoutError('the scorer did not score a probe within 180 s')
    producer.send(topics['transactions'], probe.value, probe.key)
    producer.flush(10)
    time.sleep(1)


def live_latency(bootstrap, model_dir, args, simulation):
  """Steady traffic at --rate transactions/s into a running scorer; a promotion halfway."""
  topics = fresh_topics(bootstrap)
  clock = PredictionClock(bootstrap, topics['predictions'])
  scorer = start_scorer(bootstrap, topics, model_dir)
  live = [e for e in fraud_simulator.events(simulation) if not e.is_label]
  producer = AcknowledgedProducer({'bootstrap.servers': bootstrap})
  sent_at = {}
  # Trained and published beforehand (as the trainer does, elsewhere), so that its CPU is not the scorer's.
  new_version = publish_model(model_dir, seed=1, promote=False, hidden_units=DEFAULT_HIDDEN_UNITS,
                              ensemble=DEFAULT_ENSEMBLE)
  try:
    wait_until_scoring(bootstrap, topics, clock, simulation)
    count = min(int(args.rate * args.live_seconds), len(live) - 1)
    started = time.monotonic()
    promotion = None
    for i, event in enumerate(live[1:count + 1]):
      if promotion is None and i >= count // 2:
        promotion = ModelStore(model_dir).promote(new_version)
      time.sleep(max(0.0, started + i / args.rate - time.monotonic()))
      sent_at[json.loads(event.value)['transaction_id']] = time.time()
      producer.send(topics['transactions'], event.value, event.key)
    producer.flush(30)
    achieved = count / (time.monotonic() - started)
    clock.wait_for(count + 1, 120)
  finally:
    scorer.kill()
    clock.stop()
  latencies = np.array([clock.arrived[t] - sent for t, sent in sent_at.items() if t in clock.arrived])
  missing = len(sent_at) - len(latencies)
  swap_s = min(clock.arrived[t] for t, v in clock.versions.items() if v == new_version) - promotion.promoted_at
  print(f'live at {achieved:,.0f} transactions/s for {count / achieved:.0f} s: event -> prediction latency '
        f'p50 {np.percentile(latencies, 50):.3f} s, p99 {np.percentile(latencies, 99):.3f} s, '
        f'max {latencies.max():.3f} s; {missing} missing; model swap {swap_s:.2f} s after the promotion')


if __name__ == '__main__':
  main()
