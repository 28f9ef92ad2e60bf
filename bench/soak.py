"""Soak: every long-running pipeline idle, then under steady traffic; resident memory and CPU over time.

The mirror, the streaming scorer, the monitor, the streaming ingest and the
retrain listener (``kbml retrain --on-drift``) run as processes of their own,
started as a user starts them, against a fresh local broker, warehouse and
model store. The broker first holds a simulated history (ingested, and a
first model trained on it, as ``kbml loop`` does), so the pipelines start on
warm features. Then four phases:

1. warm-up: until every pipeline has read what the topics hold (the scorer
   and the ingest rebuild their histories), then ``--warmup-minutes``;
2. idle: ``--idle-minutes`` with no traffic;
3. load warm-up: ``--warmup-minutes`` at ``--rate`` events/s (the rest of the
   simulation: transactions and their late labels);
4. load: ``--load-minutes`` more at that rate.

Each process's resident memory (VmRSS) and CPU time are sampled every
``--sample-s``. The summary gives, per process, the memory at the start, after
each phase, its growth over the idle and the load phases with the growth per
hour (least-squares slope over the phase), and the CPU it used, in % of one
core. The samples go to ``--csv``.

Run: ``make bench`` or ``python -m bench.soak --idle-minutes 3 --load-minutes 3``.
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import numpy as np

from bench.common import cpu_seconds, local_broker, resident_mb
from kbml import cli, simulator
from kbml import simulate as simulate_command
from kbml.kafka_client import create_topics, group_lag
from kbml.kafka_config import kafka_client_config
from kbml.local_stack import DEFAULT_PARTITIONS, SHARED_TOPICS
from pipelines import ingest, scoring
from use_cases.fraud import simulator as fraud_simulator

PIPELINES = ('mirror', 'scorer', 'monitor', 'ingest', 'retrain')
PHASES = ('warm-up', 'idle', 'load warm-up', 'load')


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--customers', type=int, default=2000)
  parser.add_argument('--days', type=int, default=400, help='Days simulated: enough for the load phases.')
  parser.add_argument('--history-days', type=int, default=65, help='Days produced before the pipelines start.')
  parser.add_argument('--epochs', type=int, default=3, help='Epochs of the first model.')
  parser.add_argument('--warmup-minutes', type=float, default=2.0)
  parser.add_argument('--idle-minutes', type=float, default=10.0)
  parser.add_argument('--load-minutes', type=float, default=10.0)
  parser.add_argument('--rate', type=float, default=1000.0, help='Events per second in the load phases.')
  parser.add_argument('--sample-s', type=float, default=10.0)
  parser.add_argument('--ready-timeout-s', type=float, default=900.0,
                      help='Longest wait for the pipelines to read the history.')
  parser.add_argument('--csv', default='bench/results/soak.csv', help='Where the samples go.')
  return parser.parse_args(argv)


class Traffic(threading.Thread):
  """Produces the simulation from a day on at a steady rate until stopped."""

  def __init__(self, simulation: fraud_simulator.Simulation, from_day: float, config: Dict[str, str], rate: float):
    super().__init__(name='soak-traffic', daemon=True)
    self._simulation, self._from_day, self._config, self._rate = simulation, from_day, config, rate
    self.stopped = threading.Event()
    self.sent = 0
    self.error: Optional[Exception] = None

  def _events(self):
    for event in fraud_simulator.events(self._simulation, self._from_day):
      if self.stopped.is_set():
        return
      self.sent += 1
      yield event

  def run(self):
    try:
      simulator.produce(self._events(), self._config, 'transactions', 'labels', self._rate)
    except Exception as e:  # noqa: BLE001 - reported by the main thread
      self.error = e


class Sampler:
  """Samples every process's resident memory and CPU time, labelled with the current phase."""

  def __init__(self, processes: Dict[str, subprocess.Popen]):
    self._processes = processes
    self.phase = PHASES[0]
    self.samples: List[Dict[str, object]] = []
    self._started = time.monotonic()

  def sample(self):
    now = time.monotonic() - self._started
    for name, process in self._processes.items():
      if process.poll() is not None:
        raise RuntimeError(f'{name} exited with {process.returncode} during the {self.phase} phase')
      self.samples.append({'phase': self.phase, 't_s': round(now, 1), 'pipeline': name,
                           'rss_mb': round(resident_mb(process.pid), 1),
                           'cpu_s': round(cpu_seconds(process.pid), 2)})

  def wait(self, phase: str, done, timeout_s: float, sample_s: float):
    """Samples, as part of ``phase``, until ``done()`` is True."""
    self.phase = phase
    print(f'-- {phase}: waiting for every pipeline to read the history', flush=True)
    start = time.monotonic()
    while not done():
      if time.monotonic() - start > timeout_s:
        raise RuntimeError(f'the pipelines did not read the history within {timeout_s:.0f} s')
      self.sample()
      time.sleep(sample_s)
    print(f'   read after {time.monotonic() - start:.0f} s', flush=True)

  def run_phase(self, phase: str, seconds: float, sample_s: float):
    """Samples through a phase of ``seconds``."""
    self.phase = phase
    print(f'-- {phase}: {seconds / 60:.1f} minutes', flush=True)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
      self.sample()
      time.sleep(min(sample_s, max(0.0, seconds - (time.monotonic() - start))))
    self.sample()
    self._print_last()

  def _print_last(self):
    last = {s['pipeline']: s for s in self.samples[-len(self._processes):]}
    print('   ' + '  '.join(f'{name} {last[name]["rss_mb"]:.0f} MB' for name in self._processes), flush=True)


def summary(samples: List[Dict[str, object]]) -> List[Dict[str, object]]:
  """Per pipeline: memory at the start and the end of each phase, growth and CPU over the idle and load phases."""
  rows = []
  for name in PIPELINES:
    mine = [s for s in samples if s['pipeline'] == name]
    row = {'pipeline': name, 'start_mb': mine[0]['rss_mb']}
    for phase in PHASES:
      row[f'after {phase}_mb'] = [s for s in mine if s['phase'] == phase][-1]['rss_mb']
    for phase, before in (('idle', 'warm-up'), ('load', 'load warm-up')):
      during = [[s for s in mine if s['phase'] == before][-1], *[s for s in mine if s['phase'] == phase]]
      t = np.array([s['t_s'] for s in during], dtype=float)
      rss = np.array([s['rss_mb'] for s in during], dtype=float)
      row[f'{phase} growth_mb'] = rss[-1] - rss[0]
      row[f'{phase} mb_per_h'] = np.polyfit(t, rss, 1)[0] * 3600 if len(t) > 2 else float('nan')
      row[f'{phase} cpu_pct'] = 100 * (during[-1]['cpu_s'] - during[0]['cpu_s']) / (t[-1] - t[0])
    rows.append(row)
  return rows


def print_summary(rows: List[Dict[str, object]]):
  print(f'\n{"pipeline":<9} {"start":>7} {"warm":>7} {"idle":>7} {"load":>7} | {"idle +MB":>9} {"MB/h":>7} '
        f'{"CPU%":>5} | {"load +MB":>9} {"MB/h":>7} {"CPU%":>5}')
  for r in rows:
    print(f'{r["pipeline"]:<9} {r["start_mb"]:>7.0f} {r["after warm-up_mb"]:>7.0f} {r["after idle_mb"]:>7.0f} '
          f'{r["after load_mb"]:>7.0f} | {r["idle growth_mb"]:>+9.1f} {r["idle mb_per_h"]:>+7.0f} '
          f'{r["idle cpu_pct"]:>5.1f} | {r["load growth_mb"]:>+9.1f} {r["load mb_per_h"]:>+7.0f} '
          f'{r["load cpu_pct"]:>5.1f}')
  print('(resident MB at the start and after the warm-up, idle and load phases; growth over the idle phase and '
        'over the load phase after its warm-up, per hour by least squares; CPU in % of one core)')


def main(argv=None) -> int:
  args = parse_args(argv)
  with local_broker() as bootstrap, tempfile.TemporaryDirectory() as folder:
    config = kafka_client_config(bootstrap)
    create_topics(config, ['transactions', 'labels', *SHARED_TOPICS, 'soak-mirror'], DEFAULT_PARTITIONS)
    kafka, pipeline_kafka = ['--bootstrap-servers', bootstrap], ['--bootstrap_servers', bootstrap]
    warehouse, model_dir = f'duckdb://{folder}/warehouse.duckdb', os.path.join(folder, 'models')
    simulation_args = ['--customers', str(args.customers), '--terminals', str(2 * args.customers),
                       '--days', str(args.days), '--seed', '5']
    setup = [['simulate', *simulation_args, '--until-day', str(args.history_days), *kafka],
             ['ingest', '--stop_at_end', '--warehouse', warehouse, *pipeline_kafka],
             ['train', *fraud_simulator.LOOP_SCENARIO.first_model, '--epochs', str(args.epochs),
              '--warehouse', warehouse, '--model-dir', model_dir]]
    for step in setup:
      print(f'== kbml {" ".join(step[:1])}', flush=True)
      if cli.main(step) != 0:
        raise RuntimeError(f'kbml {step[0]} failed')
    commands = {
        'mirror': ['mirror', '--input_topic', 'transactions', '--output_topic', 'soak-mirror',
                   '--consumer_group', 'soak-mirror', *pipeline_kafka],
        'scorer': ['score', '--model_dir', model_dir, *pipeline_kafka],
        'monitor': ['monitor', '--model_dir', model_dir, '--warehouse', warehouse, *pipeline_kafka],
        'ingest': ['ingest', '--warehouse', warehouse, *pipeline_kafka],
        'retrain': ['retrain', '--on-drift', '--model-dir', model_dir, '--warehouse', warehouse, *kafka],
    }
    log_dir = tempfile.mkdtemp(prefix='kbml-soak-logs-')
    processes = {}
    for name in PIPELINES:
      log = open(os.path.join(log_dir, f'{name}.log'), 'wb')  # noqa: SIM115 - open while the process runs
      processes[name] = subprocess.Popen([sys.executable, '-m', 'kbml.cli', *commands[name]], stdout=log,
                                         stderr=subprocess.STDOUT)
    print(f'== {", ".join(PIPELINES)} started (logs in {log_dir})', flush=True)
    simulation = fraud_simulator.simulate(simulate_command.simulation_config(
        simulate_command.parse_args(simulation_args), fraud_simulator))
    traffic = Traffic(simulation, args.history_days, config, args.rate)
    sampler = Sampler(processes)
    readers = {'soak-mirror': ['transactions'], scoring.DEFAULT_CONSUMER_GROUP: ['transactions', 'labels'],
               ingest.DEFAULT_CONSUMER_GROUP: ['transactions', 'labels']}

    def read_history() -> bool:
      return all(group_lag(config, group, topics) == 0 for group, topics in readers.items())

    try:
      sampler.wait('warm-up', read_history, args.ready_timeout_s, args.sample_s)
      sampler.run_phase('warm-up', args.warmup_minutes * 60, args.sample_s)
      sampler.run_phase('idle', args.idle_minutes * 60, args.sample_s)
      traffic.start()
      sampler.run_phase('load warm-up', args.warmup_minutes * 60, args.sample_s)
      sampler.run_phase('load', args.load_minutes * 60, args.sample_s)
    finally:
      traffic.stopped.set()
      for process in processes.values():
        process.terminate()
      for process in processes.values():
        process.wait(timeout=30)
    if traffic.error:
      raise RuntimeError(f'the traffic failed: {traffic.error}') from traffic.error
    loaded_s = 60 * (args.warmup_minutes + args.load_minutes)
    print(f'\ntraffic: {traffic.sent:,} events in the load phases ({traffic.sent / loaded_s:,.0f}/s)')
  os.makedirs(os.path.dirname(args.csv) or '.', exist_ok=True)
  with open(args.csv, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(sampler.samples[0]))
    writer.writeheader()
    writer.writerows(sampler.samples)
  print_summary(summary(sampler.samples))
  print(f'samples: {args.csv}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
