"""Retrains a use case's model on the freshest labelled data: ``kbml retrain``.

A retrain is ``kbml train`` on the most recent labelled days, its evaluation,
the blessing gate (the new version is promoted only if its average precision
on the test rows is not worse than the champion's) and the promotion, which
running scorers take live (only if the champion it was compared with is still
in service: a version promoted meanwhile, by hand or by another retrain,
stays). Its split differs from ``kbml train``'s: the test range is the last
3 labelled days and the training range the 14 days before, with no gap,
because a model meant to learn a new pattern must have seen it.
Each version a retrain publishes records why in its metadata (``retrain``:
the trigger, manual, schedule or drift; the alert that caused it; when it
started and finished); ``kbml status`` shows the newest as the last retrain.

When:

- no option: once, now; exits 2 when the data is missing or incomplete;
- ``--every 6h``: now and then every 6 hours, in the foreground; a failed run
  is reported and the schedule goes on;
- ``--on-drift``: listens to the alerts topic with a consumer group (from its
  committed offsets; on the group's first start from the end, as earlier
  alerts are history) and retrains when the monitor reports drift, or
  precision or recall below their floor. Labels arrive days late, so the
  retrain waits until the warehouse has ``--drift-labelled-days`` days of
  labels from the day the alert's window started. One drift episode raises
  many alerts (several features, several windows): after the first, alerts
  are ignored while its retrain waits and for ``--cooldown`` after it.

``--every`` and ``--on-drift`` combine.

Examples::

    kbml retrain                                  # once, now
    kbml retrain --every 6h                       # now and every 6 hours, until Ctrl-C
    kbml retrain --on-drift --cooldown 12h        # when the monitor reports drift
    kbml retrain --every 1d --on-drift --last-days 21 --epochs 20

Scheduling without a process that stays up: cron runs a one-off retrain at
each time (``crontab -e``)::

    0 */6 * * * cd /path/to/kafka-beam-ml && .venv/bin/kbml retrain >> .kbml/retrain.log 2>&1

On Google Cloud, Cloud Scheduler can create a Vertex AI custom job running
the trainer with the retrain's split. ``kbml train --vertex`` builds that job;
``--dry-run`` prints its spec, which runs the project's training container (a
real submission builds it first if its tag is missing)::

    kbml train --vertex --dry-run --project PROJECT --region us-central1 \\
        --staging-bucket gs://BUCKET/kbml --warehouse bigquery://PROJECT/DATASET --model-dir gs://BUCKET/models \\
        --last-days 14 --delay-days 0 --test-days 3 > retrain-job.json
    gcloud scheduler jobs create http kbml-retrain --location us-central1 --schedule '0 */6 * * *' \\
        --uri https://us-central1-aiplatform.googleapis.com/v1/projects/PROJECT/locations/us-central1/customJobs \\
        --http-method POST --headers Content-Type=application/json --message-body-from-file retrain-job.json \\
        --oauth-service-account-email SCHEDULER_ACCOUNT@PROJECT.iam.gserviceaccount.com

The job trains, gates and promotes like this command but records no
``retrain`` entry. ``--on-drift`` needs a process that stays up and reaches
Kafka (a VM, or a GKE deployment running ``kbml retrain --on-drift``).
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import multiprocessing
import re
import sys
import time
from typing import Callable, Dict, List, Optional

from confluent_kafka import KafkaException, TopicPartition

from kbml.alerts import ALERTS_TOPIC, DRIFT, PRECISION_BELOW_FLOOR, RECALL_BELOW_FLOOR
from kbml.kafka_args import add_kafka_arguments, kafka_config_from_args
from kbml.kafka_client import STALL_S, StallWatch, group_start_offsets, new_consumer, records_only
from kbml.warehouse import WarehouseError, open_warehouse
from pipelines.stopping import stop_on_signals
from trainer import data, task
from trainer.registry import ModelStore
from transforms.use_case import load_use_case

# The alerts that say the model no longer fits the data: a retrain may fix them.
TRIGGERING_KINDS = (DRIFT, PRECISION_BELOW_FLOOR, RECALL_BELOW_FLOOR)
# Days after a drift that a drift retrain trains on, beyond its test and validation days.
DRIFT_TRAINING_DAYS = 2
MANUAL, SCHEDULE, DRIFT_TRIGGER = 'manual', 'schedule', 'drift'
# What a retrain in a loop survives: data not there yet, an unreadable warehouse or store.
RETRAIN_ERRORS = (ValueError, WarehouseError, OSError)
# After a first alert, how long to gather the rest of its burst before deciding.
BURST_S = 0.2

_DURATION = re.compile(r'(\d+(?:\.\d+)?)([smhd])')
_UNIT_SECONDS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}

Say = Callable[[str], None]


def _say(line: str):
  print(line, flush=True)


def parse_duration(text: str) -> datetime.timedelta:
  """Reads a duration written as a number and a unit: ``30s``, ``15m``, ``6h``, ``1d`` (``1.5h`` too).

  Raises:
    argparse.ArgumentTypeError: anything else, or a duration of zero.
  """
  match = _DURATION.fullmatch(text.strip().lower())
  if not match or float(match.group(1)) == 0:
    raise argparse.ArgumentTypeError(
        f'expected a duration above zero: a number and a unit, s, m, h or d (30s, 15m, 6h, 1d), got {text!r}')
  return datetime.timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def format_duration(duration: datetime.timedelta) -> str:
  """A duration for people, in its largest whole unit: ``6h``, ``90m``, ``45s``."""
  seconds = duration.total_seconds()
  for unit in ('d', 'h', 'm'):
    if seconds >= _UNIT_SECONDS[unit] and seconds % _UNIT_SECONDS[unit] == 0:
      return f'{seconds // _UNIT_SECONDS[unit]:.0f}{unit}'
  return f'{seconds:g}s'


def build_parser() -> argparse.ArgumentParser:
  """The trainer's parser with the retrain's defaults and its options of when to retrain."""
  parser = task.build_parser()
  parser.prog = 'kbml retrain'
  parser.description = __doc__.split('\n\n', 1)[1]
  parser.set_defaults(last_days=14, delay_days=0, test_days=3, validation_days=2)
  for action in parser._actions:  # a retrain always takes the most recent days: a fixed range is refused
    if action.dest in ('train_start', 'train_end'):
      action.help = argparse.SUPPRESS
    elif action.dest == 'last_days':
      action.help = ('Train on this many days, placed so that the test range ends on the most recent labelled day '
                     '(default: %(default)s).')
  when = parser.add_argument_group('When to retrain', 'Without --every or --on-drift: once, now.')
  when.add_argument('--every', type=parse_duration, metavar='DURATION',
                    help='Retrain now, then every DURATION (30s, 15m, 6h, 1d) until stopped.')
  when.add_argument('--on-drift', action='store_true',
                    help=f'Retrain when the alerts topic reports {", ".join(TRIGGERING_KINDS)}.')
  when.add_argument('--cooldown', type=parse_duration, default='6h', metavar='DURATION',
                    help='After a drift retrain, ignore further alerts for this long (default: %(default)s).')
  when.add_argument('--drift-labelled-days', type=int, metavar='N',
                    help='A drift retrain waits until the warehouse has labels for N days from the day the alert\'s '
                    f'window started (default: the test and validation days and {DRIFT_TRAINING_DAYS} more, so that '
                    'the new model learns from, picks its threshold on and is tested on days after the drift).')
  when.add_argument('--check-interval-s', type=float, default=10.0,
                    help='Seconds between checks of the warehouse\'s labels while a drift retrain waits '
                    '(default: %(default)s).')
  when.add_argument('--max-retrains', type=int, metavar='N', help='Stop after N retrains (default: never).')
  when.add_argument('--seconds', type=float, help='Stop after this long (default: until Ctrl-C).')
  alerts = parser.add_argument_group('Alerts (--on-drift)')
  alerts.add_argument('--alerts-topic', default=ALERTS_TOPIC, help='Default: %(default)s.')
  alerts.add_argument('--consumer-group', default='kbml-retrain',
                      help='Its committed offsets say which alerts were handled (default: %(default)s).')
  add_kafka_arguments(alerts)
  return parser


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace):
  if args.vertex or args.dry_run:
    parser.error('--vertex and --dry-run belong to `kbml train`: to retrain on Vertex AI, schedule '
                 '`kbml train --vertex --last-days 14 ...` (see the Cloud Scheduler example in --help)')
  if args.train_start or args.train_end:
    parser.error('a retrain trains on the most recent days (--last-days); --train-start and --train-end are for '
                 '`kbml train`')
  looping = args.every or args.on_drift
  if not looping and (args.max_retrains is not None or args.seconds is not None):
    parser.error('--max-retrains and --seconds apply to --every and --on-drift')
  if args.max_retrains is not None and args.max_retrains < 1:
    parser.error('--max-retrains must be at least 1')
  if args.drift_labelled_days is None:
    args.drift_labelled_days = args.test_days + args.validation_days + DRIFT_TRAINING_DAYS
  if args.drift_labelled_days < 1 or args.check_interval_s <= 0:
    parser.error('--drift-labelled-days must be at least 1 and --check-interval-s above zero')


def _utc_now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


class Retrainer:
  """Runs retrains and records in each published version why it ran.

  Args:
    args: the parsed arguments (the trainer's among them).
    say: where progress lines go.
  """

  def __init__(self, args: argparse.Namespace, say: Say = _say):
    self._args = args
    self._say = say
    self.attempts = 0

  def retrain(self, trigger: str, alert: Optional[Dict] = None) -> task.Result:
    """Trains, evaluates, gates and promotes one version; records ``retrain`` in its metadata.

    Args:
      trigger: ``manual``, ``schedule`` or ``drift``.
      alert: the alert record that caused it, for a drift retrain.

    Raises:
      ValueError, WarehouseError: the warehouse lacks the data or cannot be read (see ``trainer.task.train``).
    """
    self.attempts += 1
    started, started_monotonic = _utc_now(), time.monotonic()
    cause = f': {alert["kind"]} alert, "{alert.get("message")}"' if alert else ''
    self._say(f'{started:%Y-%m-%d %H:%M:%S} UTC  retrain {self.attempts} ({trigger}{cause}): test on the last '
              f'{self._args.test_days} labelled days, train on the {self._args.last_days} before')
    # The child trains, publishes and gates; the promotion is made here, against the version in service then.
    trained = train_in_a_child_process(argparse.Namespace(**{**vars(self._args), 'no_promote': True}))
    store = ModelStore(self._args.model_dir)
    blessing = self._promote_if_blessed(store, trained.version, trained.metadata['blessing'])
    record = {'trigger': trigger, 'alert': alert, 'started_at': started.isoformat(),
              'finished_at': _utc_now().isoformat()}
    store.update_metadata(trained.version, blessing=blessing, retrain=record)
    result = task.Result(trained.version, store.metadata(trained.version), blessing['promoted'])
    self._say(task.summary(result, self._args.model_dir))
    outcome = 'promoted: running scorers take it live' if result.promoted else 'not promoted'
    self._say(f'retrain {self.attempts} done in {time.monotonic() - started_monotonic:.0f} s: version '
              f'{result.version} {outcome}')
    return result

  def _promote_if_blessed(self, store: ModelStore, version: str, blessing: Dict) -> Dict:
    """Promotes a blessed version if the champion it was compared with is still in service; returns the blessing.

    A person (``kbml promote``) or another retrain may have put a version in
    service while this one trained: it was not compared with that one, so it
    is not promoted; the next retrain compares with it.
    """
    if not blessing['blessed'] or self._args.no_promote:
      return blessing
    champion = blessing.get('champion')
    if store.promote_replacing(version, champion) is not None:
      return {**blessing, 'promoted': True}
    return {**blessing, 'blessed': False, 'promoted': False,
            'reason': f'{blessing["reason"]}; but version {store.current()} was put in service while this one '
                      f'trained (it was compared with {champion or "no champion"}), so it stays'}

  def retrain_surviving(self, trigger: str, alert: Optional[Dict] = None) -> Optional[task.Result]:
    """:meth:`retrain`, reporting a failure instead of raising it: a loop goes on after a bad run."""
    try:
      return self.retrain(trigger, alert)
    except RETRAIN_ERRORS as e:
      self._say(f'retrain {self.attempts} ({trigger}) failed: {e}')
      return None


def train_in_a_child_process(args: argparse.Namespace) -> task.Result:
  """``trainer.task.train(args)`` in a fresh Python process, which exits with it.

  A listener runs for days: what a training loads and keeps (TensorFlow, the
  rows, the models) goes with the child instead of staying in the listener
  (one retrain left about 800 MB behind in the soak benchmark). The child's
  errors are raised here.
  """
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as child:
    return child.submit(task.train, args).result()


@dataclasses.dataclass
class PendingRetrain:
  """A drift retrain waiting for labels.

  Attributes:
    alert: the alert record that asked for it.
    labelled_through: the warehouse's last labelled day must be this day or later; None: retrain at once.
  """
  alert: Dict
  labelled_through: Optional[datetime.date]


def _window_day(alert: Dict) -> Optional[datetime.date]:
  """The UTC day the alert's window started (its ``window_start``), or None without a readable one."""
  try:
    start = datetime.datetime.fromisoformat(str(alert['window_start']))
  except (KeyError, ValueError):
    return None
  if start.tzinfo is None:
    start = start.replace(tzinfo=datetime.timezone.utc)
  return start.astimezone(datetime.timezone.utc).date()


class DriftTrigger:
  """Turns a stream of alerts into drift retrains, one per episode.

  The first triggering alert makes a retrain pending; alerts are then ignored
  while it is pending and for the cool-down after it ran.

  Args:
    cooldown: how long alerts are ignored after a drift retrain.
    labelled_days: days of labels, from the day the alert's window started, that the retrain needs.
  """

  def __init__(self, cooldown: datetime.timedelta, labelled_days: int):
    self._cooldown_s = cooldown.total_seconds()
    self._labelled_days = labelled_days
    self._quiet_until = -math.inf
    self.pending: Optional[PendingRetrain] = None

  def consider(self, alert: Dict, now: float) -> str:
    """Decides about one alert at ``now`` (the monotonic clock); returns the decision as a sentence."""
    kind = alert.get('kind')
    if kind not in TRIGGERING_KINDS:
      return f'ignored a {kind} alert: not a retrain trigger'
    window = _window_day(alert)
    about = f'{kind} alert (window from {alert.get("window_start", "?")})'
    if self.pending is not None:
      return f'ignored a {about}: a drift retrain is already pending'
    if now < self._quiet_until:
      left = datetime.timedelta(seconds=math.ceil(self._quiet_until - now))
      return f'ignored a {about}: in the cool-down after the last drift retrain ({left} left)'
    needed = window + datetime.timedelta(days=self._labelled_days - 1) if window else None
    self.pending = PendingRetrain(alert, needed)
    if needed is None:
      return f'{about}: retraining now (no readable window_start, so no labels to wait for)'
    return f'{about}: "{alert.get("message")}"; a retrain is due once the warehouse has labels through {needed}'

  def retrained(self, now: float):
    """The pending retrain ran (or failed) at ``now``: the cool-down starts."""
    self.pending = None
    self._quiet_until = now + self._cooldown_s


class AlertListener:
  """Reads the alerts topic as a consumer group and commits what was handled.

  It starts at the group's committed offsets; a group without any starts at
  the end, and commits that at once, so that alerts raised after this first
  start are the group's to handle even if the listener stops before one came.

  Args:
    config: Kafka client settings.
    topic: the alerts topic.
    group: the consumer group.
    say: where progress lines go.
  """

  def __init__(self, config: Dict[str, str], topic: str, group: str, say: Say = _say):
    self._say = say
    self._config = {**config, 'group.id': group}
    # A first start begins at the end of the topic (earlier alerts are history) and commits it at once.
    starts = group_start_offsets(config, group, topic, 'latest')
    # (topic, partition) -> the offset after the last alert handled; whether the group has not committed them yet.
    self._positions = {(topic, partition): offset for partition, offset in starts.items()}
    self._uncommitted = True
    self._stall = StallWatch(self._config)
    self._consumer = self._assigned_consumer()
    try:
      self.commit()
    except BaseException:
      self._consumer.close()
      raise
    self.description = (f'topic {topic!r}, group {group!r}, from offsets '
                        + ', '.join(f'{partition}:{offset}' for partition, offset in starts.items()))

  def _assigned_consumer(self):
    consumer = new_consumer(self._config)
    consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in self._positions.items()])
    return consumer

  def poll(self, timeout_s: float) -> List[Dict]:
    """The alerts that arrive within ``timeout_s`` (returns soon after some do); they count as handled."""
    first = self._consumer.poll(max(timeout_s, 0.0))  # returns on the first record, unlike consume()
    if first is None:
      if self._stall.stalled(self._positions):
        self._say(f'the alerts consumer fetched nothing for {STALL_S:.0f} s although the broker holds alerts past '
                  f'its offsets {self._positions} (a client stuck after a broker restart): reconnecting')
        self._consumer.close()
        self._consumer = self._assigned_consumer()
      return []
    # The rest of a burst (one episode raises several alerts at once) is decided on together.
    messages = records_only([first, *self._consumer.consume(num_messages=100, timeout=BURST_S)], self._say)
    alerts = []
    for message in messages:
      self._positions[(message.topic(), message.partition())] = message.offset() + 1
      self._uncommitted = True
      try:
        record = json.loads(message.value())
      except ValueError:
        record = None
      if not isinstance(record, dict):
        self._say(f'skipped an unreadable alert record at partition {message.partition()}, offset {message.offset()}')
        continue
      alerts.append(record)
    return alerts

  def commit(self):
    """Commits the offsets after the handled alerts; a failure is reported and retried on the next commit."""
    if not self._uncommitted:
      return
    try:
      self._consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in self._positions.items()],
                            asynchronous=False)
      self._uncommitted = False
    except KafkaException as e:
      self._say(f'could not commit the alert offsets (will retry): {e}')

  def close(self):
    self._consumer.close()
    self._stall.close()


class RetrainScheduler:
  """Retrains on a schedule (``--every``) and on drift alerts (``--on-drift``) until stopped.

  Args:
    args: the parsed arguments.
    say: where progress lines go.
  """

  def __init__(self, args: argparse.Namespace, say: Say = _say):
    self._args = args
    self._say = say
    self._retrainer = Retrainer(args, say)
    self._drift = DriftTrigger(args.cooldown, args.drift_labelled_days) if args.on_drift else None
    self._warehouse = open_warehouse(args.warehouse)

  def run(self) -> int:
    """Loops until ``--seconds`` passed, ``--max-retrains`` ran or Ctrl-C; returns the exit status (0)."""
    args = self._args
    started = time.monotonic()
    deadline = started + args.seconds if args.seconds is not None else math.inf
    next_scheduled = started if args.every else math.inf
    last_label_check = -math.inf
    listener = None
    try:
      if args.on_drift:
        listener = AlertListener(kafka_config_from_args(args), args.alerts_topic, args.consumer_group, self._say)
        self._say(f'listening for {", ".join(TRIGGERING_KINDS)} alerts on {listener.description}; cool-down '
                  f'{format_duration(args.cooldown)}; a retrain waits for {args.drift_labelled_days} days of labels in '
                  f'{self._warehouse.url}')
      if args.every:
        self._say(f'retraining every {format_duration(args.every)}, the first now')
      while True:
        now = time.monotonic()
        if now >= deadline:
          self._say(f'stopping: --seconds {args.seconds:g} passed')
          break
        if self._retrained_enough():
          self._say(f'stopping: --max-retrains {args.max_retrains} reached')
          break
        if now >= next_scheduled:
          self._retrainer.retrain_surviving(SCHEDULE)
          while next_scheduled <= time.monotonic():  # a retrain longer than the period skips the runs it overlapped
            next_scheduled += args.every.total_seconds()
          if not self._retrained_enough():
            due = _utc_now() + datetime.timedelta(seconds=next_scheduled - time.monotonic())
            self._say(f'next scheduled retrain at {due:%Y-%m-%d %H:%M:%S} UTC')
          continue
        pending = self._drift.pending if self._drift else None
        if pending is not None and now - last_label_check >= args.check_interval_s:
          last_label_check = now
          if self._labels_arrived(pending):
            self._retrainer.retrain_surviving(DRIFT_TRIGGER, pending.alert)
            self._drift.retrained(time.monotonic())
            listener.commit()
            continue
        wait_s = min(args.check_interval_s, next_scheduled - now, deadline - now)
        if listener is None:
          time.sleep(max(wait_s, 0.0))
          continue
        if pending is not None:  # wake up for the next label check
          wait_s = min(wait_s, last_label_check + args.check_interval_s - now)
        for alert in listener.poll(wait_s):
          was_pending = self._drift.pending is not None
          self._say(f'{_utc_now():%H:%M:%S} {self._drift.consider(alert, time.monotonic())}')
          if not was_pending and self._drift.pending is not None:
            last_label_check = -math.inf  # check the labels at once
        # While a retrain is pending its alert stays uncommitted: a listener restarted meanwhile reads it again.
        if self._drift.pending is None:
          listener.commit()
    except KeyboardInterrupt:
      self._say('stopped')
    finally:
      if listener is not None:
        listener.close()
    return 0

  def _retrained_enough(self) -> bool:
    return self._args.max_retrains is not None and self._retrainer.attempts >= self._args.max_retrains

  def _labels_arrived(self, pending: PendingRetrain) -> bool:
    """Whether the pending drift retrain can learn the new pattern; says what it waits for if not."""
    if pending.labelled_through is None:
      return True
    try:
      last_day = data.last_labelled_day(self._warehouse, load_use_case(self._args.use_case),
                                        self._args.features_table, self._args.labels_table)
    except WarehouseError as e:
      self._say(f'waiting for labels before the drift retrain: cannot read {self._warehouse.url}: {e}')
      return False
    if last_day is not None and last_day >= pending.labelled_through:
      return True
    self._say(f'{_utc_now():%H:%M:%S} waiting for labels before the drift retrain: labelled through '
              f'{last_day or "no day yet"}, the retrain needs {pending.labelled_through} '
              f'({self._args.drift_labelled_days} days from the drift window of {_window_day(pending.alert)})')
    return False


def run(argv: Optional[List[str]] = None) -> int:
  """``kbml retrain ARGS``: returns the exit status (2 when a one-off retrain or the listener's start fails)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  _check_arguments(parser, args)
  try:
    if args.every or args.on_drift:
      stop_on_signals()  # a listener runs for days: Ctrl-C and SIGTERM must end it
      return RetrainScheduler(args).run()
    Retrainer(args).retrain(MANUAL)
    return 0
  except (ValueError, WarehouseError, ConnectionError) as e:
    print(f'kbml retrain: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(run())
