"""The whole loop on live simulated traffic with drift: ``kbml loop`` (what ``make demo`` runs).

1. History: the first days of a simulation are produced to Kafka at full
   speed, ingested into the warehouse, and a model is trained and promoted.
2. Live: the scorer, the monitor, a streaming ingest and ``kbml retrain
   --on-drift`` start as processes of their own, as a user runs them, and the
   rest of the simulation is produced at ``--rate`` events/s. From
   ``--drift-from-day`` the use case's drift starts: for fraud a new fraud
   pattern (simulator scenario 4: a cash-out wave, stolen cards drained in
   bursts at night far from home, about a quarter of the transactions with
   the defaults: the size at which the features' PSI crosses 0.2 in the
   wave's first day). ``--use-case`` chooses the use case, whose simulator
   declares the scenario (``LOOP_SCENARIO``: the simulated traffic, the
   days, the first model's split).
3. The monitor reports drift, the retrain waits for the labels of the
   drifted days, trains on them and promotes a better model, and the scorer
   takes it live. The live traffic goes on until the new model has scored
   ``--retrained-days`` whole days and their labels are in, however long
   the retrain took (the simulation's ``--days`` caps it). Then the loop stops the processes
   and prints what happened: the first drift alert, the retrain, and the
   labelled precision, recall and average precision of each model version
   per window, and per phase (the first model before and in the drift, the
   retrained one).

Each process logs to ``LOG_DIR/NAME.log``.
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from types import ModuleType
from typing import Callable, Dict, List, Optional

import pandas

from kbml import simulator
from kbml.local_state import default_model_dir, local_state_dir
from transforms.metrics import CHAMPION, read_sums, summaries
from transforms.records import DAY_SECONDS
from transforms.use_case import UseCase, load_use_case

DAY_MS = DAY_SECONDS * 1000
PHASES = ('first model, before the drift', 'first model, in the drift', 'retrained model, in the drift')


@dataclasses.dataclass
class LoopResult:
  """What the loop saw: alerts, the retrained version, and labelled metrics per window and version."""
  alerts: List[Dict[str, object]]
  first_version: str
  retrained_version: Optional[str]
  windows: pandas.DataFrame
  phases: pandas.DataFrame


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='kbml loop', description=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='Any other flag is a flag of `kbml simulate --use-case NAME` (its --help lists them), over the use '
      'case\'s loop scenario (LOOP_SCENARIO in its simulator module): fraud\'s is --customers 500 --terminals 1000 '
      '--days 140 --seed 7 --drift-cards-per-day 40 --drift-burst 8.')
  parser.add_argument('--use-case', help='fraud (the default), iot, or the dotted name of a module of yours that '
                      'declares a USE_CASE whose simulator declares a LOOP_SCENARIO.')
  parser.add_argument('--retrained-days', type=int, default=3,
                      help='Whole days the retrained model scores before the traffic stops (default: %(default)s).')
  parser.add_argument('--live-from-day', type=int,
                      help='Days before this one are history, produced at once; the first model trains on its last '
                      'labelled days, which need the features\' history before them (default: the scenario\'s, 82 '
                      'for fraud).')
  parser.add_argument('--drift-from-day', type=int, help='Default: the scenario\'s, 85 for fraud.')
  parser.add_argument('--rate', type=float, help='Live events per second (default: the scenario\'s, 400 for fraud).')
  parser.add_argument('--epochs', type=int, default=10, help='Training epochs, at most (default: %(default)s).')
  parser.add_argument('--bootstrap-servers', help='Kafka; default: the local broker (`kbml local up`).')
  parser.add_argument('--model-dir', help='Default: .kbml/models.')
  parser.add_argument('--warehouse', help='Default: .kbml/warehouse.duckdb.')
  parser.add_argument('--log-dir', help='Default: .kbml/loop.')
  parser.add_argument('--timeout-s', type=float, default=900, help='Give up after this long (default: %(default)s).')
  return parser


def parse_args(argv: List[str]) -> argparse.Namespace:
  """The loop's flags, with ``simulation`` (the ``kbml simulate`` arguments of its traffic: the use case's
  scenario, then the flags given), ``simulate_args`` (those parsed) and ``scenario`` (the use case's LoopScenario)
  filled in."""
  from kbml import simulate
  args, simulation_flags = build_parser().parse_known_args(argv)
  use_case = load_use_case(args.use_case)
  scenario = getattr(simulate.simulator_of(use_case), 'LOOP_SCENARIO', None)
  if scenario is None:
    raise ValueError(f'The {use_case.name} simulator declares no LOOP_SCENARIO: `kbml loop` does not know what to '
                     'run for it.')
  args.use_case, args.scenario = use_case.name, scenario
  args.live_from_day = scenario.live_from_day if args.live_from_day is None else args.live_from_day
  args.drift_from_day = scenario.drift_from_day if args.drift_from_day is None else args.drift_from_day
  args.rate = scenario.rate if args.rate is None else args.rate
  drift_flag = f'--{scenario.drift_field.replace("_", "-")}'
  args.simulation = ['--use-case', use_case.name, *scenario.simulation, *simulation_flags, drift_flag,
                     str(args.drift_from_day)]
  args.simulate_args = simulate.parse_args(args.simulation)  # an unknown flag fails here, with the usage
  return args


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


class _LiveTraffic(threading.Thread):
  """Produces the live part of a simulation at a steady rate, up to the event time set in ``stop_at_ms``."""

  def __init__(self, simulator: ModuleType, simulation, from_day: float, label_delay_days: float,
               producer_config: Dict[str, str], events_topic: str, labels_topic: str, rate: float):
    super().__init__(name='live-traffic', daemon=True)
    self._simulator = simulator
    self._simulation = simulation
    self._from_day = from_day
    self._produce = (producer_config, events_topic, labels_topic, rate)
    self._start_ms = int(simulation.config.start.timestamp() * 1000)
    self.label_delay_ms = int(label_delay_days * DAY_MS)
    self.stop_at_ms = math.inf
    self.event_time_ms = self._start_ms + int(from_day * DAY_MS)
    self.reached_stop = False
    self.error: Optional[Exception] = None

  def day_start_ms(self, time_ms: int) -> int:
    """The start of the simulated day (a monitoring window) that ``time_ms`` falls in."""
    return self._start_ms + (time_ms - self._start_ms) // DAY_MS * DAY_MS

  def _events(self):
    for event in self._simulator.events(self._simulation, self._from_day):
      if event.timestamp_ms >= self.stop_at_ms:
        self.reached_stop = True
        return
      self.event_time_ms = event.timestamp_ms
      yield event

  def run(self):
    try:
      simulator.produce(self._events(), *self._produce)
    except Exception as e:  # noqa: BLE001 - the loop's thread reports it
      self.error = e


class _ServedTimes:
  """Follows the predictions topic: the first and the last event time each model version scored.

  The scorer swaps versions at one moment, but it does not score in event
  time order: a terminal's events wait until the watermark passes them. The
  first model's last day and the new version's first can overlap.
  """

  def __init__(self, config: Dict[str, str], time_column: str, report: Callable[[str], None]):
    from confluent_kafka import TopicPartition

    from kbml.kafka_client import fetched_end_offset, list_partitions, new_consumer
    self._time_column = time_column
    self._report = report
    self.first_ms: Dict[str, int] = {}
    self.last_ms: Dict[str, int] = {}
    self._consumer = new_consumer(config)
    partitions = list_partitions(self._consumer, ['predictions'])
    self._consumer.assign([TopicPartition(t, p, fetched_end_offset(self._consumer, t, p, 0)) for t, p in partitions])

  def poll(self, budget_s: float = 2.0):
    """Reads the predictions made since the last call, for at most ``budget_s`` (the scorer may never pause)."""
    from kbml.kafka_client import records_only
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline and (
        messages := records_only(self._consumer.consume(1000, 0.2), self._report)):
      for prediction in (json.loads(m.value()) for m in messages):
        version = prediction['model_version']
        time_ms = pandas.Timestamp(prediction[self._time_column]).value // 1_000_000
        self.first_ms[version] = min(time_ms, self.first_ms.get(version, time_ms))
        self.last_ms[version] = max(time_ms, self.last_ms.get(version, time_ms))

  def close(self):
    self._consumer.close()


def _without_kafka(argv: List[str]) -> str:
  """A command line as printed: without the broker's address, which the loop passes to every command."""
  shown = list(argv)
  for flag in ('--bootstrap-servers', '--bootstrap_servers'):
    while flag in shown:
      at = shown.index(flag)
      del shown[at:at + 2]
  return ' '.join(shown)


def _utc(time_ms: float) -> str:
  return f'{pandas.Timestamp(int(time_ms), unit="ms"):%Y-%m-%d %H:%M}'


def run_loop(args, out=print) -> LoopResult:
  """Runs the loop (see the module docstring) and returns what it saw."""
  from kbml import cli
  from kbml import simulate as simulate_command
  from kbml.kafka_client import create_topics
  from kbml.kafka_config import kafka_client_config
  from kbml.local_stack import DEFAULT_PARTITIONS, local_bootstrap_servers
  from kbml.warehouse import default_warehouse_url, open_warehouse
  from trainer.registry import ModelStore

  bootstrap = args.bootstrap_servers or local_bootstrap_servers()
  if not bootstrap:
    raise ValueError('No Kafka: start the local broker (`kbml local up`) or give --bootstrap-servers.')
  model_dir = args.model_dir or default_model_dir()
  warehouse = args.warehouse or default_warehouse_url()
  log_dir = args.log_dir or os.path.join(local_state_dir(), 'loop')
  os.makedirs(log_dir, exist_ok=True)
  started = time.monotonic()
  kafka = ['--bootstrap-servers', bootstrap]
  use_case = load_use_case(args.use_case)
  for_use_case = ['--use-case', use_case.name]
  events_topic = use_case.events_topic
  simulation = [*args.simulation, *kafka]

  def step(title: str, argv: List[str]):
    out(f'\n== {title}: kbml {_without_kafka(argv)}')
    if cli.main(argv) != 0:
      raise RuntimeError(f'{title} failed')

  simulator = simulate_command.simulator_of(use_case)
  simulate_args = args.simulate_args
  simulation_config = simulate_command.simulation_config(simulate_args, simulator)
  config = kafka_client_config(bootstrap)
  # On a broker that `kbml local up --use-case` did not prepare, the use case's topics are made here.
  create_topics(config, [use_case.events_topic, use_case.labels_topic], DEFAULT_PARTITIONS)
  step('history', ['simulate', *simulation, '--until-day', str(args.live_from_day)])
  step('ingest the history', ['ingest', *for_use_case, '--stop-at-end', '--warehouse', warehouse, *kafka])
  step('train the first model', ['train', *for_use_case, *args.scenario.first_model, '--epochs', str(args.epochs),
                                 '--warehouse', warehouse, '--model-dir', model_dir])
  store = ModelStore(model_dir)
  first_version = store.current()
  history_events = _end_offsets(config, [events_topic])[events_topic]

  processes = _Processes(log_dir)
  traffic = _LiveTraffic(simulator, simulator.simulate(simulation_config), args.live_from_day,
                         use_case.default_label_delay_days, config, simulate_args.events_topic,
                         simulate_args.labels_topic, args.rate)
  retrained, served = None, None
  try:
    out(f'\n== live: scorer, monitor, streaming ingest and retrain --on-drift (logs in {log_dir})')
    processes.start('scorer', 'score', *for_use_case, '--model-dir', model_dir, *kafka)
    processes.start('monitor', 'monitor', *for_use_case, '--model-dir', model_dir, '--warehouse', warehouse, *kafka)
    processes.start('ingest', 'ingest', *for_use_case, '--warehouse', warehouse, *kafka)
    processes.start('retrain', 'retrain', *for_use_case, '--on-drift', '--max-retrains', '1', *args.scenario.retrain,
                    '--epochs', str(args.epochs), '--check-interval-s', '2', '--model-dir', model_dir, '--warehouse',
                    warehouse, *kafka)
    _wait_until(lambda: _scorer_rebuilding(config, use_case), 300, out, 'the live traffic starts anyway')
    out(f'live traffic from day {args.live_from_day} at {args.rate:.0f} events/s (kbml simulate '
        f'{_without_kafka(simulation)} --from-day {args.live_from_day} '
        f'--rate {args.rate:.0f})')
    traffic.start()
    served = _ServedTimes(config, use_case.time_column, out)
    reported = time.monotonic()
    while traffic.is_alive():
      traffic.join(1)
      processes.check('scorer', 'monitor', 'ingest', 'retrain')
      if time.monotonic() - started > args.timeout_s:
        raise RuntimeError(f'the loop did not finish in {args.timeout_s:.0f} s: see the logs in {log_dir}')
      current = store.current()
      if retrained is None and current != first_version:
        retrained = current
      served.poll()
      if retrained in served.first_ms:
        # The whole days after the last day the first model scored, then the label delay: their labels are in.
        stop_at_ms = (traffic.day_start_ms(served.last_ms.get(first_version, served.first_ms[retrained]))
                      + (1 + args.retrained_days) * DAY_MS + traffic.label_delay_ms)
        if traffic.stop_at_ms == math.inf or stop_at_ms > traffic.stop_at_ms:
          traffic.stop_at_ms = stop_at_ms
          out(f'the scorer serves {retrained} from {_utc(served.first_ms[retrained])}, the first model served to '
              f'{_utc(served.last_ms.get(first_version, 0))}: the traffic stops at {_utc(stop_at_ms)}, when the '
              f'labels of {args.retrained_days} whole days the new version scored are in')
      if time.monotonic() - reported >= 10:
        reported = time.monotonic()
        out(f'{time.monotonic() - started:5.0f} s  {_utc(traffic.event_time_ms)}  {_progress(config, events_topic)}'
            f'  model {current}')
    if traffic.error:
      raise RuntimeError(f'the live traffic failed: {traffic.error}') from traffic.error
    if retrained not in served.first_ms:
      out(f'the simulation ended (--days {simulation_config.days}) before the scorer served a retrained model')
    elif not traffic.reached_stop:
      out(f'the simulation ended (--days {simulation_config.days}) before the labels of {args.retrained_days} whole '
          'days that the retrained model scored were in: give more --days')
    live_events = _end_offsets(config, [events_topic])[events_topic] - history_events
    _wait_until(lambda: _monitor_counting(config, use_case, live_events), 300, out,
                'the last windows are counted in part')
  finally:
    traffic.stop_at_ms = -math.inf
    if served is not None:
      served.close()
    processes.stop()

  alerts = _alerts(config)
  sums = read_sums(open_warehouse(warehouse))
  windows = summaries(sums[sums['role'] == CHAMPION])
  drift_start = pandas.Timestamp(simulation_config.start) + pandas.Timedelta(days=args.drift_from_day)
  phases = phase_metrics(sums, first_version, retrained, drift_start)
  out(f'\n== done in {time.monotonic() - started:.0f} s')
  drift = [a for a in alerts if a['kind'] == 'drift']
  if drift:
    first = min(drift, key=lambda a: a['window_start'])
    out(f"first drift alert: window {first['window_start']}, {first['statistic']} PSI {first['psi']:.3f} "
        f"({len(drift)} drift alerts in all)")
  out(f'model in service: {first_version} -> {retrained or "(no retrain promoted)"}')
  labelled = windows[windows['labelled'] > 0]
  out(labelled[['window_start', 'model_version', 'predictions', 'labelled', 'positives', 'precision', 'recall',
                'average_precision']].to_string(index=False, float_format=lambda x: f'{x:.3f}'))
  out(f'\nlabelled metrics per phase (windows one model scored whole; the drift from {drift_start:%Y-%m-%d}):')
  out(phases[['phase', 'windows', 'labelled', 'positives', 'precision', 'recall', 'average_precision']].to_string(
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


def _wait_until(pending: Callable[[], Optional[str]], timeout_s: float, out, late: str):
  """Calls ``pending`` every 5 s until it returns None (done) or ``timeout_s`` pass; prints what it returns
  every 15 s."""
  from kbml.kafka_client import KafkaUnreachableError
  deadline, reported = time.monotonic() + timeout_s, -math.inf
  while time.monotonic() < deadline:
    try:
      waiting_for = pending()
    except KafkaUnreachableError as e:  # a broker restarting: the pipelines wait for it, and so does the loop
      waiting_for = f'the broker: {e}'
    if waiting_for is None:
      return
    if time.monotonic() - reported >= 15:
      out(f'waiting for {waiting_for}')
      reported = time.monotonic()
    time.sleep(5)
  out(f'still not done after {timeout_s:.0f} s: {late}')


def _scorer_rebuilding(config: Dict[str, str], use_case: UseCase) -> Optional[str]:
  from kbml.kafka_client import group_lag
  from pipelines.scoring import DEFAULT_CONSUMER_GROUP
  unread = group_lag(config, DEFAULT_CONSUMER_GROUP, [use_case.events_topic, use_case.labels_topic])
  if unread == 0:
    return None
  return ('the scorer to rebuild the histories from the topics: '
          + ('it has not committed a read yet' if unread is None
             else f'{unread:,} {use_case.event_noun} and labels to read'))


def _monitor_counting(config: Dict[str, str], use_case: UseCase, live_events: int) -> Optional[str]:
  from kbml.kafka_client import group_lag
  from pipelines.monitoring import DEFAULT_CONSUMER_GROUP
  predictions = _end_offsets(config, ['predictions'])['predictions']
  uncounted = group_lag(config, DEFAULT_CONSUMER_GROUP, ['predictions', use_case.labels_topic])
  if predictions >= live_events and uncounted == 0:
    return None
  return (f'the pipelines to catch up: {predictions:,} of {live_events:,} {use_case.event_noun} scored, '
          f'{"all" if uncounted is None else f"{uncounted:,}"} predictions and labels not counted yet')


def _progress(config: Dict[str, str], events_topic: str) -> str:
  """The records in the topics the loop follows; or that the broker does not answer (it may be restarting: the
  pipelines and the loop wait for it)."""
  from kbml.kafka_client import KafkaUnreachableError
  try:
    ends = _end_offsets(config, [events_topic, 'predictions', 'alerts'])
  except KafkaUnreachableError as e:
    return f'the broker does not answer, waiting for it ({e})'
  return (f'{events_topic} {ends[events_topic]:,}  predictions {ends["predictions"]:,}  '
          f'alerts {ends["alerts"]:,}')


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
  run_loop(parse_args(sys.argv[1:] if argv is None else argv))
  return 0
