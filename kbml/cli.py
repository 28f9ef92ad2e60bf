"""The ``kbml`` command line."""

import argparse
import importlib
import logging
import sys
import time
from typing import List, Optional

from kbml import __version__
from kbml.kafka_args import add_kafka_arguments, kafka_config_from_args
from kbml.local_stack import BROKERS, DEFAULT_PARTITIONS, DEFAULT_PORT, SHARED_TOPICS, LocalStack, LocalStackError
from kbml.local_state import default_model_dir, local_state_dir
from kbml.warehouse import WarehouseError


def _local(args) -> int:
  topics = SHARED_TOPICS
  if args.action == 'up':
    from transforms.use_case import load_use_case
    use_case = load_use_case(args.use_case)
    topics = (use_case.events_topic, use_case.labels_topic, *SHARED_TOPICS)
  stack = LocalStack(args.state_dir, topics=topics, partitions=getattr(args, 'partitions', DEFAULT_PARTITIONS),
                     broker=getattr(args, 'broker', None))
  if args.action == 'up':
    running = stack.bootstrap_servers()
    bootstrap = stack.up(port=args.port)
    print(f"local broker ({stack.status().broker}) {'already running' if running else 'started'} at {bootstrap} "
          f'(state and log in {stack.state_dir}); topics: {", ".join(stack.topics)}')
  elif args.action == 'down':
    print('local broker stopped' if stack.down() else 'local broker was not running')
  else:
    status = stack.status()
    print(status.render())
    return 0 if status.reachable or not status.running else 1
  return 0


def _produce(args) -> int:
  from kbml import produce
  from transforms.use_case import load_use_case
  use_case = load_use_case(args.use_case)
  events = produce.read_table(args.events)
  labels = produce.read_table(args.labels) if args.labels else None
  print(f'read {len(events):,} {use_case.event_noun} from {args.events}'
        + (f' and {len(labels):,} labels from {args.labels}' if labels is not None else ''))
  config = kafka_config_from_args(args)
  events_topic, labels_topic = args.events_topic or use_case.events_topic, args.labels_topic or use_case.labels_topic
  started = time.monotonic()
  counts = produce.produce_frames(
      events, labels, config, events_topic, labels_topic, args.label_delay_days, args.key_column, args.rate,
      produce.progress_line(len(events), 0 if labels is None else len(labels), use_case.event_noun), use_case)
  produce.print_produced(counts, use_case.event_noun, events_topic, labels_topic, config,
                         time.monotonic() - started)
  return 0


def _add_produce_parser(commands):
  from kbml import produce
  command = commands.add_parser(
      'produce', help='Produce a use case\'s events and labels from files (JSON Lines, CSV, Parquet) to Kafka.',
      description=produce.__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  command.add_argument('--use-case',
                       help='fraud (the default), iot, or the dotted name of a module of yours that declares a '
                       'USE_CASE: the fields of its records, its time column, keys, topics and label delay.')
  command.add_argument('--events', '--transactions', dest='events', required=True, metavar='FILE',
                       help='The events: a column per field of the use case\'s event records (fraud: '
                       'transaction_id, tx_datetime, customer_id, terminal_id, amount; the time in UTC, ISO 8601), '
                       'and any others, passed through.')
  command.add_argument('--labels', metavar='FILE', help='Labels: a column per field of the use case\'s label records '
                       '(fraud: transaction_id, tx_datetime, customer_id, terminal_id, is_fraud, fraud_scenario), '
                       f'optionally {produce.KNOWN_TIME_COLUMN} (when the label became known).')
  command.add_argument('--label-delay-days', type=float,
                       help=f'Without {produce.KNOWN_TIME_COLUMN}, a label is known this long after its event '
                       '(default: the use case\'s label delay, 7 days for fraud).')
  command.add_argument('--key-column',
                       help='The Kafka key of each record, which keeps its events in order (default: the use '
                       'case\'s first key column: customer_id for fraud, machine_id for iot).')
  command.add_argument('--rate', type=float, help='Events per second (default: as fast as possible).')
  command.add_argument('--events-topic', '--transactions-topic', dest='events_topic',
                       help='Default: the use case\'s (transactions for fraud).')
  command.add_argument('--labels-topic', help='Default: the use case\'s (labels for fraud).')
  add_kafka_arguments(command)
  command.set_defaults(handler=_produce)


def _warehouse_summary(args) -> int:
  from kbml.warehouse import open_warehouse, training_data_summary
  from transforms.use_case import load_use_case
  use_case = load_use_case(args.use_case)
  warehouse = open_warehouse(args.warehouse)
  summary = training_data_summary(warehouse, use_case.id_column, use_case.time_column, use_case.label_column,
                                  args.features_table, args.labels_table)
  print(f'warehouse {warehouse.url}: tables {", ".join(warehouse.tables())}')
  if not summary['events']:
    print(f'no rows in {args.features_table} yet: run `kbml ingest`')
    return 0
  print(f"{summary['events']:,} {use_case.event_noun} with features, {summary['first_event']} to "
        f"{summary['last_event']}; {summary['labelled']:,} labelled, {int(summary['positives'] or 0):,} "
        f"{use_case.positive_noun} ({float(summary['positive_rate'] or 0):.3%} of the labelled)")
  return 0


def _add_warehouse_parser(commands):
  warehouse = commands.add_parser('warehouse', help='Inspect the warehouse that holds the training data.')
  actions = warehouse.add_subparsers(dest='action', required=True, metavar='ACTION')
  summary = actions.add_parser('summary', help='Row counts, time range and share of positives (frauds, failures) '
                               'of the training data.')
  summary.add_argument('--use-case', help='fraud (the default), iot, or the dotted name of a module of yours that '
                       'declares a USE_CASE: the columns of its tables.')
  summary.add_argument('--warehouse', help='duckdb:///path/file.duckdb (default: .kbml/warehouse.duckdb) or '
                       'bigquery://PROJECT/DATASET.')
  summary.add_argument('--features-table', '--features_table', dest='features_table', default='features')
  summary.add_argument('--labels-table', '--labels_table', dest='labels_table', default='labels')
  summary.set_defaults(handler=_warehouse_summary)


def _promote(args) -> int:
  from trainer.registry import ModelStore
  store = ModelStore(args.model_dir or default_model_dir())
  if args.if_better:
    return _promote_challenger_if_better(store, args)
  if not args.version:
    raise ValueError('Name the version to promote, or give --if-better to promote the challenger on its live '
                     'record.')
  store.verified_model_bytes(args.version)
  if args.challenger:
    store.set_challenger(args.version)
    print(f'version {args.version} is the challenger in {store.root}: running scorers score every event with it '
          f'too, in the shadow of {store.current()}; `kbml monitor` records both, and `kbml promote --if-better` '
          'promotes it once it has proved better')
    return 0
  previous = store.current()
  store.promote(args.version)
  print(f'version {args.version} is in service in {store.root} (was {previous}); running scorers take it '
        'within seconds')
  return 0


def _promote_challenger_if_better(store, args) -> int:
  """Promotes the challenger if its live average precision beats the champion's on the same labelled events."""
  from kbml.warehouse import open_warehouse
  from transforms.metrics import shadow_comparison
  from transforms.use_case import load_use_case
  champion, challenger = store.current(), store.challenger()
  if challenger is None:
    raise ValueError(f'No challenger in {store.root}: put one in the shadow first (`kbml promote VERSION '
                     '--challenger`).')
  use_case = load_use_case(store.use_case_in_service())
  live = shadow_comparison(open_warehouse(args.warehouse), use_case, champion, challenger)
  record = (f"on {live['labelled']:,} labelled {use_case.event_noun} ({live['positives']:,} "
            f"{use_case.positive_noun}) both scored: challenger {challenger} average precision "
            f"{live['challenger_average_precision']:.4f}, champion {champion} {live['champion_average_precision']:.4f}")
  if live['labelled'] < args.min_labelled or not live['positives']:
    print(f'not promoted: too few labelled events yet ({live["labelled"]:,} < {args.min_labelled:,}, or no '
          f'{use_case.positive_noun}); {record}')
    return 0
  if not live['challenger_average_precision'] > live['champion_average_precision']:
    print(f'not promoted: the challenger is not better; {record}')
    return 0
  store.verified_model_bytes(challenger)
  # Compared with the champion read above: if another version went in service since, this comparison says nothing.
  if store.promote_replacing(challenger, champion) is None:
    print(f'not promoted: version {store.current()} was put in service while the challenger was compared with '
          f'{champion}; run again to compare it with the one in service now. {record}')
    return 0
  print(f'promoted {challenger}: {record}')
  return 0


def _add_promote_parser(commands):
  promote = commands.add_parser(
      'promote', help='Put a published model version in service (a rollback too), or in the shadow.',
      description='Puts a published model version in service: running scorers switch to it without a restart. '
      'The version\'s model file is checked against its metadata first. With --challenger the version is scored '
      'in the shadow of the one in service instead; --if-better promotes that challenger once its live average '
      'precision beats the champion\'s on the same labelled events.')
  promote.add_argument('version', nargs='?',
                       help='The version, as `kbml train` printed it (a folder of MODEL_DIR/versions).')
  promote.add_argument('--model-dir', help='The model store (default: .kbml/models).')
  promote.add_argument('--challenger', action='store_true', help='Score the version in the shadow; act on the '
                       'champion\'s decisions.')
  promote.add_argument('--if-better', action='store_true',
                       help='Promote the challenger if it beats the champion on live labels (`kbml monitor` '
                       'records them).')
  promote.add_argument('--min-labelled', type=int, default=1000,
                       help='--if-better decides on at least this many labelled events (default: %(default)s).')
  promote.add_argument('--warehouse', help='Where `kbml monitor` writes (default: .kbml/warehouse.duckdb).')
  promote.set_defaults(handler=_promote)


def _watch(args) -> int:
  from kbml.watch import watch_predictions
  watch_predictions(kafka_config_from_args(args), args.predictions_topic, args.alerts_topic, args.seconds,
                    args.interval)
  return 0


def _add_watch_parser(commands):
  watch = commands.add_parser(
      'watch', help='Follow the predictions as they arrive: events/s, model versions, flags, alerts.',
      description='Reads the predictions and alerts topics from now on and prints, every few seconds, the '
      'predictions per second, the model versions that made them, how many were flagged and the alerts so far.')
  watch.add_argument('--seconds', type=float, help='Stop after this long (default: until Ctrl-C).')
  watch.add_argument('--interval', type=float, default=2.0, help='Seconds between lines.')
  watch.add_argument('--predictions-topic', default='predictions')
  watch.add_argument('--alerts-topic', default='alerts')
  add_kafka_arguments(watch)
  watch.set_defaults(handler=_watch)


# Commands that run a module's run(argv): every argument after the name is the module's own.
MODULE_COMMANDS = {
    'simulate': ('kbml.simulate', 'Simulate a use case\'s events and their late labels (fraud: card transactions '
                 'after the Fraud Detection Handbook), and produce them to Kafka in event-time order'),
    'ingest': ('pipelines.ingest', 'Validate a use case\'s events and labels from Kafka, compute features, write '
               'training rows (a Beam pipeline)'),
    'mirror': ('pipelines.mirror', 'Copy one Kafka topic to another (a Beam pipeline)'),
    'train': ('trainer.task', 'Train, evaluate and publish a use case\'s model; promote it if it beats the one in '
              'service'),
    'score': ('pipelines.scoring', 'Score a use case\'s events from Kafka with the model in service, taking new '
              'models live; predictions to Kafka (a Beam pipeline)'),
    'monitor': ('pipelines.monitoring', 'Windowed metrics of the predictions per model version, accuracy as labels '
                'arrive, drift against the training data; alerts to Kafka (a Beam pipeline)'),
    'retrain': ('trainer.retrain', 'Retrain on the most recent days and promote if better: now, on a schedule '
                '(--every) or when drift is reported (--on-drift)'),
    'status': ('kbml.status', 'The state of the system in one screen: broker, lag, events/s, model, alerts'),
    'loop': ('kbml.loop', 'The whole loop on live simulated traffic with drift: history, training, live scoring, '
             'monitoring, drift alerts, retraining and the swap (what `make demo` runs)'),
    'report': ('kbml.report', 'Write an HTML report with plots of the live metrics, drift and PR curves'),
}


def _run_module(name: str, module_args: List[str]) -> int:
  module_name, _ = MODULE_COMMANDS[name]
  if module_name.startswith('pipelines.'):
    logging.getLogger().setLevel(logging.INFO)
  return importlib.import_module(module_name).run(module_args) or 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='kbml', description='Machine learning on Kafka event streams with Apache Beam.')
  parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  local = commands.add_parser('local', help='Start, stop or inspect the embedded local stack (Kafka broker).',
                              description='The embedded local stack: a Kafka broker on a loopback port, with the '
                              'project topics created: Apache Kafka (its data kept in the state folder across down '
                              'and up) or Tansu (in memory, starts at once).')
  local_actions = local.add_subparsers(dest='action', required=True, metavar='ACTION')
  up = local_actions.add_parser('up', help='Start the broker (harmless if it runs) and create the topics.')
  up.add_argument('--port', type=int, default=DEFAULT_PORT, help='Loopback port; 0 picks a free one.')
  up.add_argument('--partitions', type=int, default=DEFAULT_PARTITIONS, help='Partitions of each created topic.')
  up.add_argument('--use-case', help='Whose events and labels topics to create besides predictions, alerts and '
                  'dead-letter: fraud (the default), iot, or the dotted name of a module of yours that declares a '
                  'USE_CASE.')
  up.add_argument('--broker', choices=BROKERS, help='kafka: Apache Kafka, from the jars `make kafka` fetches, with '
                  'Java 17+; its topics, records and group offsets survive down and up. tansu: in memory, starts in '
                  'a tenth of a second, for a quick look. Default: $KBML_BROKER, else kafka.')
  local_actions.add_parser('down', help='Stop the broker (Tansu\'s in-memory data is lost; Apache Kafka\'s is kept).')
  local_actions.add_parser('status', help='Show whether the broker answers, and each topic\'s offsets.')
  for action in local_actions.choices.values():
    action.add_argument('--state-dir', default=local_state_dir(),
                        help='Folder for the broker\'s pid, port and log (default: $KBML_STATE_DIR or .kbml).')
    action.set_defaults(handler=_local)

  _add_produce_parser(commands)
  _add_warehouse_parser(commands)
  _add_promote_parser(commands)
  _add_watch_parser(commands)
  for name, (_, summary) in MODULE_COMMANDS.items():
    commands.add_parser(name, help=f'{summary}: `kbml {name} --help`.', add_help=False)
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    if argv and argv[0] in MODULE_COMMANDS:
      return _run_module(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)
  except (LocalStackError, WarehouseError, ConnectionError, ValueError) as e:  # ModelStoreError is a ValueError
    print(f'kbml: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
