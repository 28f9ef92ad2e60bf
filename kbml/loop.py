"""The whole loop on live simulated traffic with drift: ``kbml loop`` (what ``make demo`` runs).

1. History: the first days of a simulation are produced to Kafka at full
   speed, ingested into the warehouse, and a model is trained and promoted.
2. Live: the scorer, the monitor, a streaming ingest and ``kbml retrain
   --on-drift`` start as processes of their own, as a user runs them, and the
   rest of the simulation is produced at ``--rate`` events/s. From
   ``--drift-from-day`` a new fraud pattern starts (simulator scenario 4: a
   cash-out wave, stolen cards drained in bursts at night far from home,
   about a quarter of the transactions with the defaults: the size at which
   the features' PSI crosses 0.2 in the wave's first day).
3. The monitor reports drift, the retrain waits for the labels of the
   drifted days, trains on them and promotes a better model, and the scorer
   takes it live. Once the labels of the new model's predictions are in, the
   loop stops the processes and prints what happened: the first drift alert,
   the retrain, and the labelled precision, recall and average precision of
   each model version per window, and per phase (the first model before and
   in the drift, the retrained one).

Each process logs to ``LOG_DIR/NAME.log``.
"""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pandas

from kbml.local_stack import local_state_dir
from kbml.simulator import SimulationConfig
from transforms.features import HISTORY_DAYS
from transforms.metrics import CHAMPION, read_sums, summaries

DAY_S = 86_400
PHASES = ('first model, before the drift', 'first model, in the drift', 'retrained model, in the drift')
# The first model trains on the 10 days before the 3 last labelled days of the history, and is tested on those:
# the split of `kbml retrain` (no delay), on fewer days so that the history needed before them is shorter.
FIRST_MODEL_SPLIT = ('--last-days', '10', '--delay-days', '0', '--test-days', '3')


@dataclasses.dataclass
class LoopResult:
  """What the loop saw: alerts, the retrained version, and labelled metrics per window and version."""
  alerts: List[Dict[str, object]]
  first_version: str
  retrained_version: Optional[str]
  windows: pandas.DataFrame
  phases: pandas.DataFrame


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='kbml loop', description=__doc__.split('\n\n', 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--customers', type=int, default=500)
  parser.add_argument('--days', type=int, default=112, help='Days simulated in all (default: %(default)s).')
  parser.add_argument('--live-from-day', type=int, default=82,
                      help='Days before this one are history, produced at once; the first model trains on its last '
                      f'labelled days, which need {HISTORY_DAYS} days before them for warm features '
                      '(default: %(default)s).')
  parser.add_argument('--drift-from-day', type=int, default=85, help='Default: %(default)s.')
  parser.add_argument('--drift-cards-per-day', type=int, default=40,
                      help='Cards the cash-out wave drains each day (default: %(default)s).')
  parser.add_argument('--drift-burst', type=int, default=8,
                      help='Transactions the wave adds on each drained card (default: %(default)s).')
  parser.add_argument('--rate', type=float, default=400, help='Live events per second (default: %(default)s).')
  parser.add_argument('--seed', type=int, default=7)
  parser.add_argument('--epochs', type=int, default=10, help='Training epochs, at most (default: %(default)s).')
  parser.add_argument('--bootstrap-servers', help='Kafka; default: the local broker (`kbml local up`).')
  parser.add_argument('--model-dir', help='Default: .kbml/models.')
  parser.add_argument('--warehouse', help='Default: .kbml/warehouse.duckdb.')
  parser.add_argument('--log-dir', help='Default: .kbml/loop.')
  parser.add_argument('--timeout-s', type=float, default=900, help='Give up after this long (default: %(default)s).')
  return parser


class _Processes:
  """The loop's long-running processes, each logging to a file; all stopped on exit."""

  def __init__(self, log_dir: str):
    self._log_dir = log_dir
    self.running: Dict[str, subprocess.Popen] = {}

  def start(self, name: str, *args: str) -> subprocess.Popen:
    log = open(os.path.join(self._log_dir, f'{name}.log'), 'wb')  # noqa: SIM115 - closed with the process
    process = subprocess.Popen([sys.executable, '-m', 'kbml.cli', *args], stdout=log, stderr=subprocess.STDOUT)
    self.running[name] = process
    return process

  def check(self, *names: str):
    for name in names:
      code = self.running[name].poll()
      if code not in (None, 0):
        raise RuntimeError(f'{name} exited with {code}: see {os.path.join(self._log_dir, name + ".log")}')

  def stop(self):
    for process in self.running.values():
      if process.poll() is None:
        process.send_signal(signal.SIGINT)
    for process in self.running.values():
      try:
        process.wait(timeout=15)
      except subprocess.TimeoutExpired:
        process.kill()


def run_loop(args, out=print) -> LoopResult:
  """Runs the loop (see the module docstring) and returns what it saw."""
  from kbml import cli
  from kbml.kafka_config import kafka_client_config
  from kbml.local_stack import local_bootstrap_servers
  from kbml.warehouse import default_warehouse_url, open_warehouse
  from trainer.registry import ModelStore
  from trainer.task import default_model_dir

  bootstrap = args.bootstrap_servers or local_bootstrap_servers()
  if not bootstrap:
    raise ValueError('No Kafka: start the local broker (`kbml local up`) or give --bootstrap-servers.')
  model_dir = args.model_dir or default_model_dir()
  warehouse = args.warehouse or default_warehouse_url()
  log_dir = args.log_dir or os.path.join(local_state_dir(), 'loop')
  os.makedirs(log_dir, exist_ok=True)
  started = time.monotonic()
  kafka = ['--bootstrap-servers', bootstrap]
  pipeline_kafka = ['--bootstrap_servers', bootstrap]
  simulation = ['--customers', str(args.customers), '--terminals', str(2 * args.customers), '--days', str(args.days),
                '--seed', str(args.seed), '--drift-from-day', str(args.drift_from_day),
                '--drift-cards-per-day', str(args.drift_cards_per_day), '--drift-burst', str(args.drift_burst), *kafka]

  def step(title: str, argv: List[str]):
    out(f'\n== {title}: kbml {" ".join(argv[:1] + [a for a in argv[1:] if not a.startswith(bootstrap)])}')
    if cli.main(argv) != 0:
      raise RuntimeError(f'{title} failed')

  step('history', ['simulate', *simulation, '--until-day', str(args.live_from_day)])
  step('ingest the history', ['ingest', '--stop_at_end', '--warehouse', warehouse, *pipeline_kafka])
  step('train the first model', ['train', *FIRST_MODEL_SPLIT, '--epochs', str(args.epochs), '--warehouse', warehouse,
                                 '--model-dir', model_dir])
  store = ModelStore(model_dir)
  first_version = store.current()
  config = kafka_client_config(bootstrap)
  history_transactions = _end_offsets(config, ['transactions'])['transactions']

  processes = _Processes(log_dir)
  try:
    out(f'\n== live: scorer, monitor, streaming ingest and retrain --on-drift (logs in {log_dir})')
    processes.start('scorer', 'score', '--model_dir', model_dir, *pipeline_kafka)
    processes.start('monitor', 'monitor', '--model_dir', model_dir, '--warehouse', warehouse, *pipeline_kafka)
    processes.start('ingest', 'ingest', '--warehouse', warehouse, *pipeline_kafka)
    retrain = processes.start('retrain', 'retrain', '--on-drift', '--max-retrains', '1', '--epochs', str(args.epochs),
                              '--check-interval-s', '2', '--model-dir', model_dir, '--warehouse', warehouse, *kafka)
    time.sleep(15)  # the pipelines rebuild their state from the topics before the live traffic
    simulate = processes.start('simulate', 'simulate', *simulation, '--from-day', str(args.live_from_day),
                               '--rate', str(args.rate))
    while simulate.poll() is None or retrain.poll() is None:
      processes.check('scorer', 'monitor', 'ingest', 'retrain', 'simulate')
      if time.monotonic() - started > args.timeout_s:
        raise RuntimeError(f'the loop did not finish in {args.timeout_s:.0f} s: see the logs in {log_dir}')
      time.sleep(10)
      ends = _end_offsets(config, ['transactions', 'predictions', 'alerts'])
      out(f'{time.monotonic() - started:5.0f} s  transactions {ends["transactions"]:,}  predictions '
          f'{ends["predictions"]:,}  alerts {ends["alerts"]:,}  model {store.current()}'
          f'{"" if retrain.poll() is None else " (retrain done)"}')
    processes.check('retrain', 'simulate')
    live_transactions = _end_offsets(config, ['transactions'])['transactions'] - history_transactions
    _wait_for_monitor(config, open_warehouse(warehouse), live_transactions, out)
  finally:
    processes.stop()

  alerts = _alerts(config)
  sums = read_sums(open_warehouse(warehouse))
  windows = summaries(sums[sums['role'] == CHAMPION])
  retrained = store.current() if store.current() != first_version else None
  drift_start = pandas.Timestamp(SimulationConfig().start) + pandas.Timedelta(days=args.drift_from_day)
  phases = phase_metrics(sums, first_version, retrained, drift_start)
  out(f'\n== done in {time.monotonic() - started:.0f} s')
  drift = [a for a in alerts if a['kind'] == 'drift']
  if drift:
    first = min(drift, key=lambda a: a['window_start'])
    out(f"first drift alert: window {first['window_start']}, {first['statistic']} PSI {first['psi']:.3f} "
        f"({len(drift)} drift alerts in all)")
  out(f'model in service: {first_version} -> {retrained or "(no retrain promoted)"}')
  labelled = windows[windows['labelled'] > 0]
  out(labelled[['window_start', 'model_version', 'predictions', 'labelled', 'frauds', 'precision', 'recall',
                'average_precision']].to_string(index=False, float_format=lambda x: f'{x:.3f}'))
  out(f'\nlabelled metrics per phase (windows one model scored whole; the drift from {drift_start:%Y-%m-%d}):')
  out(phases[['phase', 'windows', 'labelled', 'frauds', 'precision', 'recall', 'average_precision']].to_string(
      index=False, float_format=lambda x: f'{x:.3f}'))
  return LoopResult(alerts, first_version, retrained, windows, phases)


def phase_metrics(sums: pandas.DataFrame, first_version: str, retrained_version: Optional[str],
                  drift_start: pandas.Timestamp) -> pandas.DataFrame:
  """The champion's labelled metrics per phase: the first model before and in the drift, then the retrained one.

  Each phase pools the windows that one model scored whole (a swap's window
  is left out), so its average precision is that of all its predictions.
  """
  champion = sums[sums['role'] == CHAMPION]
  versions_per_window = champion.groupby('window_start')['model_version'].nunique()
  whole = champion[champion['window_start'].map(versions_per_window) == 1]
  in_drift = whole['window_start'] >= drift_start
  phase = pandas.Series(None, index=whole.index, dtype=object)
  phase[(whole['model_version'] == first_version) & ~in_drift] = PHASES[0]
  phase[(whole['model_version'] == first_version) & in_drift] = PHASES[1]
  phase[whole['model_version'] == retrained_version] = PHASES[2]
  whole = whole.assign(phase=phase).dropna(subset=['phase'])
  metrics = summaries(whole, ['phase'])
  metrics.insert(1, 'windows', metrics['phase'].map(whole.groupby('phase')['window_start'].nunique()))
  return metrics.set_index('phase').reindex([p for p in PHASES if p in set(metrics['phase'])]).reset_index()


def _wait_for_monitor(config: Dict[str, str], warehouse, live_transactions: int, out, timeout_s: float = 180.0):
  """Waits until every live transaction has a prediction and the monitor's labelled counts stop growing."""
  deadline, labelled = time.monotonic() + timeout_s, None
  while time.monotonic() < deadline:
    predictions = _end_offsets(config, ['predictions'])['predictions']
    sums = read_sums(warehouse, "metric = 'labelled'")
    now = float(sums['value'].sum())
    if predictions >= live_transactions and now == labelled:
      return
    out(f'waiting for the pipelines to catch up: {predictions:,} of {live_transactions:,} transactions scored, '
        f'{now:,.0f} labelled predictions counted')
    labelled = now
    time.sleep(10)


def _end_offsets(config: Dict[str, str], topics: List[str]) -> Dict[str, int]:
  """Records in each topic (the sum of its partitions' end offsets)."""
  from kbml.kafka_client import fetched_end_offset, list_partitions, new_probe_consumer
  consumer = new_probe_consumer(config)
  try:
    ends = dict.fromkeys(topics, 0)
    for topic, partition in list_partitions(consumer, topics):
      ends[topic] += fetched_end_offset(consumer, topic, partition, 0)
    return ends
  finally:
    consumer.close()


def _alerts(config: Dict[str, str]) -> List[Dict[str, object]]:
  from confluent_kafka import TopicPartition

  from kbml.kafka_client import list_partitions, new_consumer
  expected = _end_offsets(config, ['alerts'])['alerts']
  consumer = new_consumer(config)
  try:
    consumer.assign([TopicPartition('alerts', p, 0) for _, p in list_partitions(consumer, ['alerts'])])
    records, deadline = [], time.monotonic() + 15
    while len(records) < expected and time.monotonic() < deadline:
      records.extend(json.loads(m.value()) for m in consumer.consume(1000, 0.5) if not m.error())
    return records
  finally:
    consumer.close()


def run(argv: Optional[List[str]] = None) -> int:
  run_loop(build_parser().parse_args(argv))
  return 0
