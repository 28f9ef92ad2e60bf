"""``kbml status``: the state of the whole system in one screen.

One look at everything a person running the demo or the service asks first:

- the broker: its address, and whether it answers;
- the topics: their end offsets, and the events per second on the
  events and the predictions (two samples ``--sample-s`` apart); the events
  and labels topics are the use case's (``--use-case``; default: the use
  case of the model in service, else fraud: ``transactions``, ``labels``);
- each pipeline's consumer lag: end offset minus the group's committed
  offset, summed over the partitions it has committed;
- the model in service, its test metrics, the challenger, the last retrain;
- the live metrics the monitoring pipeline wrote to the warehouse: the
  latest window with predictions and the latest with labels;
- the alerts: counts by kind, how many are open, the newest few.

Each part is read on its own and says what is missing (no broker, no model
store, no warehouse), so that ``kbml status`` is useful on a fresh machine
too. The exit status is 1 when the broker cannot be reached, else 0.
``--json`` prints the same as one JSON object.

Example::

    kbml status
    kbml status --use-case iot
    kbml status --bootstrap-servers broker:9092 --model-dir gs://bucket/models --json
"""

import argparse
import collections
import contextlib
import datetime
import json
import logging
import math
import re
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from kbml.kafka_args import add_kafka_arguments, kafka_config_from_args
from kbml.kafka_client import (
  Partition,
  cluster_metadata,
  committed_offsets,
  fetched_end_offset,
  listed_offsets,
  new_consumer,
  new_probe_consumer,
)
from kbml.kafka_config import KafkaConfigError
from kbml.local_stack import SHARED_TOPICS, PartitionOffsets, StackStatus, local_bootstrap_servers
from kbml.local_state import default_model_dir
from kbml.warehouse import default_warehouse_url
from transforms.use_case import DEFAULT_USE_CASE, load_use_case

# The events and labels topics are named by the use case; the others are the same for every one.
TOPIC_ROLES = ('events', 'labels', *SHARED_TOPICS)
# Pipeline -> (its default consumer group, the topic roles it reads); pipelines/ingest.py and scoring.py
# declare the same group names.
PIPELINES = {
    'ingest': ('kbml-ingest', ('events', 'labels')),
    'scoring': ('kbml-scoring', ('events',)),
    'monitoring': ('kbml-monitoring', ('predictions', 'labels')),
}
RATE_TOPIC_ROLES = ('events', 'predictions')
NEWEST_ALERTS = 5
MESSAGE_WIDTH = 80
_CLIENT_LOGGER = 'kbml.kafka.client'


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='kbml status', allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
      description=__doc__.split('\n\n', 1)[1])
  add_kafka_arguments(parser)
  parser.add_argument('--timeout-s', type=float, default=5.0,
                      help='How long to wait for the broker to answer (default: %(default)s).')
  parser.add_argument('--model-dir', help='The model store (default: $KBML_STATE_DIR/models, i.e. .kbml/models).')
  parser.add_argument('--warehouse', help='Where `kbml monitor` writes its metrics: duckdb:///path/file.duckdb '
                      '(default: .kbml/warehouse.duckdb) or bigquery://PROJECT/DATASET.')
  parser.add_argument('--sample-s', type=float, default=1.0,
                      help='Seconds between the two offset samples that give events/s; 0: no rates '
                      '(default: %(default)s).')
  parser.add_argument('--alerts-hours', type=float, default=24.0,
                      help='An alert raised within this many hours counts as open (default: %(default)s).')
  parser.add_argument('--use-case', help='Whose events and labels topics to show: fraud, iot or the dotted name of a '
                      'module of yours that declares a USE_CASE (default: the use case of the model in service, '
                      'else fraud).')
  parser.add_argument('--events-topic', '--transactions-topic', dest='events_topic',
                      help='Default: the use case\'s (transactions for fraud).')
  parser.add_argument('--labels-topic', help='Default: the use case\'s (labels for fraud).')
  for role in SHARED_TOPICS:
    parser.add_argument(f'--{role}-topic', default=role, dest=_topic_option(role))
  for pipeline, (group, _) in PIPELINES.items():
    parser.add_argument(f'--{pipeline}-group', default=group, help=f'The {pipeline} pipeline\'s consumer group.')
  parser.add_argument('--json', action='store_true', help='Print one JSON object instead of the screen.')
  return parser


def _topic_option(role: str) -> str:
  return f"{role.replace('-', '_')}_topic"


# ---------------------------------------------------------------------------------------------------------------
# Kafka: broker, topics, lag, events/s, alerts


class _LastClientError(logging.Handler):
  """Keeps librdkafka's last warning or error instead of printing it: an unreachable broker logs one per retry."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.message: Optional[str] = None

  def emit(self, record):
    self.message = record.getMessage()


@contextlib.contextmanager
def _quiet_client_log() -> Iterator[_LastClientError]:
  logger = logging.getLogger(_CLIENT_LOGGER)
  handler = _LastClientError()
  propagate = logger.propagate
  logger.addHandler(handler)
  logger.propagate = False
  try:
    yield handler
  finally:
    logger.removeHandler(handler)
    logger.propagate = propagate


def _partition_offsets(config: Mapping[str, str], topics: Sequence[str],
                       partitions_of: Mapping[str, Sequence[int]]) -> Dict[Partition, PartitionOffsets]:
  """Low and true end offset of every partition of ``topics``, read by a fresh probe consumer.

  A fresh consumer each time, so that no end offset is one cached from an earlier fetch.
  """
  consumer = new_probe_consumer(config)
  try:
    offsets = {}
    for topic in topics:
      for partition in partitions_of[topic]:
        low, _ = listed_offsets(consumer, topic, partition)
        offsets[(topic, partition)] = PartitionOffsets(
            partition, low, fetched_end_offset(consumer, topic, partition, low))
    return offsets
  finally:
    consumer.close()


def _end_offset(offsets: Mapping[Partition, PartitionOffsets], topic: str) -> int:
  return sum(o.high for (t, _), o in offsets.items() if t == topic)


def _consumer_lag(config: Mapping[str, str], group: str, topics: Sequence[str],
                  offsets: Mapping[Partition, PartitionOffsets], timeout_s: float) -> Dict[str, Any]:
  """A group's lag on ``topics``: end minus committed, over the partitions it committed (None: none)."""
  pairs = [pair for pair in offsets if pair[0] in topics]
  consumer = new_probe_consumer({**config, 'group.id': group})
  try:
    committed = committed_offsets(consumer, pairs, timeout_s)
  finally:
    consumer.close()
  done = {pair: offset for pair, offset in committed.items() if offset >= 0}
  return {'group': group, 'topics': list(topics), 'partitions': len(pairs), 'partitions_committed': len(done),
          'lag': sum(max(offsets[pair].high - offset, 0) for pair, offset in done.items()) if done else None}


def _read_alerts(config: Mapping[str, str], topic: str, offsets: Mapping[Partition, PartitionOffsets],
                 timeout_s: float) -> Tuple[List[Dict[str, Any]], bool]:
  """Every alert record on the topic up to the sampled end offsets, in no particular order; and whether all came."""
  remaining = {pair: o for pair, o in offsets.items() if pair[0] == topic and o.high > o.low}
  if not remaining:
    return [], True
  from confluent_kafka import TopicPartition
  consumer = new_consumer(config)
  consumer.assign([TopicPartition(t, p, o.low) for (t, p), o in remaining.items()])
  alerts = []
  deadline = time.monotonic() + timeout_s
  try:
    while remaining and time.monotonic() < deadline:
      for message in consumer.consume(num_messages=500, timeout=0.1):
        if message.error():
          continue
        pair = (message.topic(), message.partition())
        try:
          alerts.append(json.loads(message.value()))
        except (TypeError, ValueError):
          alerts.append({'kind': '(unreadable)', 'message': repr(message.value()[:60])})
        if pair in remaining and message.offset() + 1 >= remaining[pair].high:
          del remaining[pair]
  finally:
    consumer.close()
  return alerts, not remaining


def _alerts_summary(alerts: Sequence[Mapping[str, Any]], complete: bool, open_hours: float) -> Dict[str, Any]:
  open_since = time.time() - open_hours * 3600
  raised = [a for a in alerts if isinstance(a.get('raised_at'), (int, float))]
  newest = sorted(raised, key=lambda a: a['raised_at'], reverse=True)[:NEWEST_ALERTS]
  return {
      'total': len(alerts), 'complete': complete,
      'by_kind': dict(collections.Counter(str(a.get('kind')) for a in alerts).most_common()),
      'open_hours': open_hours, 'open': sum(a['raised_at'] >= open_since for a in raised),
      'newest': [{'raised_at': _iso(a['raised_at']), 'kind': a.get('kind'), 'message': a.get('message')}
                 for a in newest],
  }


def kafka_status(config: Optional[Mapping[str, str]], topics: Mapping[str, str], groups: Mapping[str, str],
                 sample_s: float, alerts_hours: float, timeout_s: float) -> Dict[str, Any]:
  """The broker, topic, lag, rate and alert parts of the status (``config`` None: no broker configured)."""
  if config is None:
    return {'broker': {'bootstrap_servers': None, 'reachable': False,
                       'message': StackStatus(running=False).render()}}
  address = config['bootstrap.servers']
  broker = {'bootstrap_servers': address, 'reachable': False, 'local': address == local_bootstrap_servers()}
  with _quiet_client_log() as client_log:
    probe = new_probe_consumer(config)
    try:
      metadata = cluster_metadata(probe, timeout_s)
    except ConnectionError as e:
      probe.poll(0)  # serves the client's queued log lines, whose last one says why (refused, TLS, SASL...)
      reason = re.sub(r'^\w+ (\[[^\]]*\]:? )*', '', client_log.message) if client_log.message else str(e)
      broker['message'] = f'NOT reachable within {timeout_s:g} s: {reason}'
      return {'broker': broker}
    finally:
      probe.close()
    present = [t for t in topics.values() if t in metadata.topics]
    partitions_of = {t: sorted(metadata.topics[t].partitions) for t in present}
    try:
      sampled_at = time.monotonic()
      offsets = _partition_offsets(config, present, partitions_of)
      sampled_at = (sampled_at + time.monotonic()) / 2
      lag = {pipeline: _consumer_lag(config, groups[pipeline], [topics[r] for r in roles if topics[r] in present],
                                     offsets, timeout_s)
             for pipeline, (_, roles) in PIPELINES.items()}
      alerts = _alerts_summary(*_read_alerts(config, topics['alerts'], offsets, max(timeout_s, 10.0)), alerts_hours)
      rates = _event_rates(config, topics, partitions_of, offsets, sampled_at, sample_s)
    except ConnectionError as e:
      broker['message'] = f'answered, then stopped answering: {e}'
      return {'broker': broker}
  broker['reachable'] = True
  topic_status = {role: {'topic': topic, 'exists': topic in partitions_of,
                         'partitions': len(partitions_of.get(topic, ())),
                         'end_offset': _end_offset(offsets, topic) if topic in partitions_of else None}
                  for role, topic in topics.items()}
  for role, rate in rates.items():
    topic_status[role]['events_per_s'] = rate
  return {'broker': broker, 'topics': topic_status, 'lag': lag, 'alerts': alerts}


def _event_rates(config: Mapping[str, str], topics: Mapping[str, str], partitions_of: Mapping[str, Sequence[int]],
                 first_offsets: Mapping[Partition, PartitionOffsets], first_sampled_at: float,
                 sample_s: float) -> Dict[str, float]:
  """Events per second on the events and predictions topics, from a second sample ``sample_s`` later."""
  sampled = [topics[role] for role in RATE_TOPIC_ROLES if topics[role] in partitions_of]
  if sample_s <= 0 or not sampled:
    return {}
  time.sleep(max(0.0, first_sampled_at + sample_s - time.monotonic()))
  started = time.monotonic()
  offsets = _partition_offsets(config, sampled, partitions_of)
  elapsed = (started + time.monotonic()) / 2 - first_sampled_at
  return {role: (_end_offset(offsets, topics[role]) - _end_offset(first_offsets, topics[role])) / elapsed
          for role in RATE_TOPIC_ROLES if topics[role] in sampled}


# ---------------------------------------------------------------------------------------------------------------
# The model store


def _version_summary(store, version: str) -> Dict[str, Any]:
  """A version's test figures; its ranking metric is its use case's (fraud: ``card_precision_at_100``)."""
  metadata = store.metadata(version)
  metrics = metadata.get('metrics') or {}
  use_case = load_use_case(metadata.get('use_case', DEFAULT_USE_CASE))
  return {'version': version, 'use_case': use_case.name, 'created': metadata.get('created'),
          'threshold': metadata.get('threshold'), 'average_precision': metrics.get('average_precision'),
          'auc_roc': metrics.get('auc_roc'), use_case.ranking_metric: metrics.get(use_case.ranking_metric),
          'ranking': {'metric': use_case.ranking_metric, 'abbreviation': use_case.ranking_abbreviation,
                      'value': metrics.get(use_case.ranking_metric)}}


def _last_retrain(store, versions: Sequence[str]) -> Optional[Dict[str, Any]]:
  """The newest version made by `kbml retrain`, else the newest version (made by `kbml train`)."""
  for version in reversed(versions):
    metadata = store.metadata(version)
    if metadata.get('retrain'):
      retrain, blessing = metadata['retrain'], metadata.get('blessing') or {}
      alert = retrain.get('alert') or {}
      return {'version': version, 'by': 'kbml retrain', 'trigger': retrain.get('trigger'),
              'alert_kind': alert.get('kind'), 'started_at': _iso(retrain.get('started_at')),
              'finished_at': _iso(retrain.get('finished_at')), 'promoted': blessing.get('promoted'),
              'reason': blessing.get('reason')}
  if not versions:
    return None
  metadata = store.metadata(versions[-1])
  blessing = metadata.get('blessing') or {}
  return {'version': versions[-1], 'by': 'kbml train', 'trigger': None, 'finished_at': _iso(metadata.get('created')),
          'promoted': blessing.get('promoted'), 'reason': blessing.get('reason')}


def model_status(model_dir: str) -> Dict[str, Any]:
  """The model in service, its challenger, the number of versions and the last retrain."""
  from trainer.registry import ModelStore, ModelStoreError
  store = ModelStore(model_dir)
  status: Dict[str, Any] = {'model_dir': model_dir}
  try:
    versions = store.versions()
    status['versions'] = len(versions)
    current = store.current()
    if current:
      promotions = [p for p in store.promotions() if p.version == current]
      status['current'] = {**_version_summary(store, current),
                           'promoted_at': _iso(promotions[-1].promoted_at) if promotions else None}
    challenger = store.challenger()
    if challenger:
      status['challenger'] = _version_summary(store, challenger)
    status['last_retrain'] = _last_retrain(store, versions)
  except ModelStoreError as e:
    status['error'] = str(e)
  return status


# ---------------------------------------------------------------------------------------------------------------
# The live metrics in the warehouse


def _window_summary(warehouse, window_start) -> Dict[str, Any]:
  """The champion's headline figures in one window, all its versions together (after a promotion there are two)."""
  from transforms.metrics import CHAMPION, DRIFT_PREFIX, read_sums, summaries
  sums = read_sums(warehouse, f"role = '{CHAMPION}' AND window_start = {warehouse.timestamp(window_start)} "
                   f"AND metric NOT LIKE '{DRIFT_PREFIX}%' AND metric <> 'score'")
  row = summaries(sums, group_by=('window_start', 'window_end')).iloc[0]
  return {'window_start': _iso(row['window_start']), 'window_end': _iso(row['window_end']),
          'model_versions': sorted(sums['model_version'].unique()),
          **{name: _number(row[name]) for name in ('predictions', 'flagged', 'flagged_rate', 'labelled', 'positives',
                                                   'precision', 'recall', 'average_precision')}}


def live_metrics_status(warehouse_url: str) -> Dict[str, Any]:
  """The latest champion window with predictions and the latest with labels, as ``kbml monitor`` wrote them."""
  from kbml.warehouse import open_warehouse
  from transforms.metrics import CHAMPION, METRICS_TABLE, read_sums
  status: Dict[str, Any] = {'warehouse': warehouse_url}
  try:
    warehouse = open_warehouse(warehouse_url)
    if METRICS_TABLE not in warehouse.tables():
      status['message'] = 'no monitoring metrics yet: run `kbml monitor`'
      return status
    # The counts alone first, to find the two windows; then the score bins of those windows only.
    counts = read_sums(warehouse, f"role = '{CHAMPION}' AND metric IN ('predictions', 'labelled') AND value > 0")
    for name, metric in (('latest_predictions', 'predictions'), ('latest_labelled', 'labelled')):
      starts = counts.loc[counts['metric'] == metric, 'window_start']
      status[name] = _window_summary(warehouse, starts.max()) if len(starts) else None
    if not status['latest_predictions']:
      status['message'] = 'no champion predictions in the monitoring metrics yet'
  except Exception as e:  # noqa: BLE001 - any warehouse failure (a lock, BigQuery's errors) is one line of the screen
    status['message'] = f'cannot read the monitoring metrics: {e}'
  return status


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def _iso(moment) -> Optional[str]:
  """A time (epoch seconds, ISO text or datetime) as UTC ISO text; None stays None."""
  if moment is None:
    return None
  if isinstance(moment, (int, float)):
    moment = datetime.datetime.fromtimestamp(moment, datetime.timezone.utc)
  elif isinstance(moment, str):
    try:
      moment = datetime.datetime.fromisoformat(moment.replace('Z', '+00:00'))
    except ValueError:
      return moment
  if moment.tzinfo is None:
    moment = moment.replace(tzinfo=datetime.timezone.utc)
  return moment.astimezone(datetime.timezone.utc).isoformat(timespec='seconds')


def _number(value) -> Optional[float]:
  """A float for JSON: NaN (no data to divide by) becomes None."""
  value = float(value)
  return None if math.isnan(value) else value


def _when(iso: Optional[str]) -> str:
  """'2026-11-21 10:15 UTC (3 h ago)'."""
  if not iso:
    return '-'
  try:
    moment = datetime.datetime.fromisoformat(iso)
  except ValueError:
    return iso
  seconds = time.time() - moment.timestamp()
  if seconds < 120:
    age = f'{seconds:.0f} s'
  elif seconds < 7200:
    age = f'{seconds / 60:.0f} min'
  elif seconds < 2 * 86400:
    age = f'{seconds / 3600:.0f} h'
  else:
    age = f'{seconds / 86400:.0f} d'
  return f'{moment:%Y-%m-%d %H:%M} UTC ({age} ago)'


def _figure(value, digits: int = 3) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def _count(value) -> str:
  return '-' if value is None else f'{value:,.0f}'


def _one_line(text: Any, width: int = MESSAGE_WIDTH) -> str:
  line = ' '.join(str(text or '').split())
  return line if len(line) <= width else line[:width - 3] + '...'


def _render_kafka(status: Mapping[str, Any]) -> List[str]:
  broker = status['broker']
  if not broker['bootstrap_servers']:
    return [broker['message']]
  where = f"{broker['bootstrap_servers']}{' (local broker)' if broker.get('local') else ''}"
  if not broker['reachable']:
    return [f'broker        {where}: {broker["message"]}',
            '              for the local broker: `kbml local up`; else check --bootstrap-servers and --kafka-config']
  lines = [f'broker        {where}: reachable', f'{"topics":<16}{"end offset":>12}{"events/s":>12}']
  for role, topic in status['topics'].items():
    renamed = '' if topic['topic'] == role else f"  topic {topic['topic']}"
    if not topic['exists']:
      lines.append(f'  {role:<14}{"missing":>12}{"":>12}{renamed}')
      continue
    rate = topic.get('events_per_s')
    lines.append(f'  {role:<14}{topic["end_offset"]:>12,}{"" if rate is None else f"{rate:,.1f}":>12}{renamed}')
  lines.append(f'{"consumer lag":<16}{"lag":>12}')
  for pipeline, lag in status['lag'].items():
    if lag['lag'] is None:
      value, note = '-', ': nothing committed'
    else:
      value = f"{lag['lag']:,}"
      note = (f": {lag['partitions_committed']} of {lag['partitions']} partitions committed"
              if lag['partitions_committed'] < lag['partitions'] else '')
    lines.append(f"  {pipeline:<14}{value:>12}  {lag['group']} on {', '.join(PIPELINES[pipeline][1])}{note}")
  return lines


def _render_model(model: Mapping[str, Any], retrain: Optional[Mapping[str, Any]]) -> List[str]:
  if model.get('error'):
    return [f"model         {model['model_dir']}: {model['error']}"]
  if not model.get('versions'):
    return [f"model         no model in {model['model_dir']} yet: run `kbml train`"]
  lines = [f"model         {model['versions']} version{'s' if model['versions'] != 1 else ''} in {model['model_dir']}"]
  current = model.get('current')
  for label, summary in (('in service', current), ('challenger', model.get('challenger'))):
    if summary is None:
      hint = '  (put one in service with `kbml promote VERSION`)' if label == 'in service' else ''
      lines.append(f'  {label:<12}none{hint}')
      continue
    since = f"promoted {_when(summary['promoted_at'])}" if 'promoted_at' in summary else ''
    lines.append(f"  {label:<12}{summary['version']}  {since}".rstrip())
    lines.append(f"  {'':<12}threshold {_figure(summary['threshold'])}  test AP {_figure(summary['average_precision'])}"
                 f"  AUC {_figure(summary['auc_roc'])}  {summary['ranking']['abbreviation']} "
                 f"{_figure(summary['ranking']['value'])}")
  if retrain:
    if retrain['by'] == 'kbml retrain':
      trigger = f"{retrain['trigger']}" + (f" ({retrain['alert_kind']} alert)" if retrain.get('alert_kind') else '')
      lines.append(f"last retrain  {retrain['version']}  trigger {trigger}, finished {_when(retrain['finished_at'])}")
    else:
      lines.append(f"last retrain  none; newest version {retrain['version']} created {_when(retrain['finished_at'])}"
                   ' (kbml train)')
    if retrain.get('promoted') is not None:
      verdict = 'promoted' if retrain['promoted'] else 'not promoted'
      lines.append(f"  {'':<12}{verdict}: {_one_line(retrain.get('reason'), 90)}")
  return lines


def _render_live_metrics(live: Mapping[str, Any]) -> List[str]:
  lines = [f"live metrics  {live['warehouse']}"]
  if live.get('message'):
    lines.append(f"  {live['message']}")
  predictions, labelled = live.get('latest_predictions'), live.get('latest_labelled')

  def window(summary):
    return (f"{_iso(summary['window_start'])[:16].replace('T', ' ')}-{_iso(summary['window_end'])[11:16]} UTC "
            f"(model {', '.join(summary['model_versions'])})")

  if predictions:
    rate = predictions['flagged_rate']
    lines.append(f"  predictions {_count(predictions['predictions'])} predictions, "
                 f"{'-' if rate is None else f'{rate:.2%}'} flagged  in {window(predictions)}")
  if predictions and not labelled:
    lines.append('  labelled    no labelled window yet (labels arrive days after the transactions)')
  if labelled:
    lines.append(f"  labelled    {_count(labelled['labelled'])} labelled: precision {_figure(labelled['precision'])}"
                 f"  recall {_figure(labelled['recall'])}  AP {_figure(labelled['average_precision'])}"
                 f"  in {window(labelled)}")
  return lines


def _render_alerts(alerts: Optional[Mapping[str, Any]]) -> List[str]:
  if alerts is None:
    return ['alerts        unknown: the broker is not reachable']
  by_kind = ', '.join(f'{kind} {count}' for kind, count in alerts['by_kind'].items())
  lines = [f"alerts        {alerts['open']} open (raised in the last {alerts['open_hours']:g} h), "
           f"{alerts['total']} in all{f': {by_kind}' if by_kind else ''}"
           f"{'' if alerts['complete'] else ' (read incompletely: timed out)'}"]
  for alert in alerts['newest']:
    lines.append(f"  {alert['raised_at'][:19].replace('T', ' ')}  {str(alert['kind']):<22}"
                 f"{_one_line(alert['message'])}")
  return lines


def render(status: Mapping[str, Any]) -> str:
  """Formats the status for a terminal, about 30 lines."""
  lines = [f"kbml status at {status['at'][:19].replace('T', ' ')} UTC, use case {status['use_case']}", '']
  lines += _render_kafka(status) + ['']
  lines += _render_model(status['model'], status['last_retrain'])
  lines += _render_live_metrics(status['live_metrics']) + ['']
  lines += _render_alerts(status['alerts'])
  return '\n'.join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------------------------


def _use_case_in_service(model_dir: str) -> Optional[str]:
  """The use case of the model in service; None (the default) when the store has none or cannot be read (the model
  part of the status says why)."""
  from trainer.registry import ModelStore, ModelStoreError
  try:
    return ModelStore(model_dir).use_case_in_service()
  except ModelStoreError:
    return None


def collect(args: argparse.Namespace) -> Dict[str, Any]:
  """Reads every part of the status, as a JSON-ready dict."""
  try:
    config = kafka_config_from_args(args)
  except KafkaConfigError:
    if args.kafka_config or args.kafka_config_file:
      raise  # a broken setting is an error to show, not a stopped broker
    config = None  # no --bootstrap-servers and no local broker running
  model_dir = args.model_dir or default_model_dir()
  use_case = load_use_case(args.use_case or _use_case_in_service(model_dir))
  topics = {role: getattr(args, _topic_option(role)) for role in TOPIC_ROLES}
  topics['events'] = topics['events'] or use_case.events_topic
  topics['labels'] = topics['labels'] or use_case.labels_topic
  groups = {pipeline: getattr(args, f'{pipeline}_group') for pipeline in PIPELINES}
  at = _iso(time.time())
  kafka = kafka_status(config, topics, groups, args.sample_s, args.alerts_hours, args.timeout_s)
  model = model_status(model_dir)
  return {'at': at, 'use_case': use_case.name, 'broker': kafka['broker'], 'topics': kafka.get('topics'),
          'lag': kafka.get('lag'), 'model': model, 'last_retrain': model.pop('last_retrain', None),
          'live_metrics': live_metrics_status(args.warehouse or default_warehouse_url()),
          'alerts': kafka.get('alerts')}


def run(argv: Optional[List[str]] = None) -> int:
  """``kbml status ARGS``: prints the status; 1 when the broker is not reachable, else 0."""
  args = build_parser().parse_args(argv)
  status = collect(args)
  print(json.dumps(status, indent=2) if args.json else render(status), flush=True)
  return 0 if status['broker']['reachable'] else 1


if __name__ == '__main__':
  raise SystemExit(run())
