"""The ``kbml`` command line."""

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from kbml import __version__
from kbml.local_stack import DEFAULT_PARTITIONS, DEFAULT_PORT, DEFAULT_STATE_DIR, LocalStack, LocalStackError


def _state_dir_default() -> str:
  return os.environ.get('KBML_STATE_DIR', DEFAULT_STATE_DIR)


def _local(args) -> int:
  stack = LocalStack(args.state_dir, partitions=getattr(args, 'partitions', DEFAULT_PARTITIONS))
  if args.action == 'up':
    running = stack.bootstrap_servers()
    bootstrap = stack.up(port=args.port)
    print(f"local broker {'already running' if running else 'started'} at {bootstrap} "
          f'(state and log in {stack.state_dir}); topics: {", ".join(stack.topics)}')
  elif args.action == 'down':
    print('local broker stopped' if stack.down() else 'local broker was not running')
  else:
    status = stack.status()
    print(status.render())
    return 0 if status.reachable or not status.running else 1
  return 0


# Commands that run a pipeline module: every argument after the name is a pipeline option.
PIPELINES = {'mirror': 'Copy one Kafka topic to another'}


def _run_pipeline(name: str, pipeline_args: List[str]) -> int:
  logging.getLogger().setLevel(logging.INFO)
  module = importlib.import_module(f'pipelines.{name}')
  module.run(pipeline_args)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='kbml', description='Machine learning on Kafka event streams with Apache Beam.')
  parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  local = commands.add_parser('local', help='Start, stop or inspect the embedded local stack (Kafka broker).',
                              description='The embedded local stack: a Kafka-compatible broker on a loopback '
                              'port, with the project topics created. Its data lives in memory.')
  local_actions = local.add_subparsers(dest='action', required=True, metavar='ACTION')
  up = local_actions.add_parser('up', help='Start the broker (harmless if it runs) and create the topics.')
  up.add_argument('--port', type=int, default=DEFAULT_PORT, help='Loopback port; 0 picks a free one.')
  up.add_argument('--partitions', type=int, default=DEFAULT_PARTITIONS, help='Partitions of each created topic.')
  local_actions.add_parser('down', help='Stop the broker (its in-memory data is lost).')
  local_actions.add_parser('status', help='Show whether the broker answers, and each topic\'s offsets.')
  for action in local_actions.choices.values():
    action.add_argument('--state-dir', default=_state_dir_default(),
                        help='Folder for the broker\'s pid, port and log (default: $KBML_STATE_DIR or .kbml).')
    action.set_defaults(handler=_local)

  for name, summary in PIPELINES.items():
    commands.add_parser(name, help=f'{summary} (a Beam pipeline: `kbml {name} --help`).', add_help=False)
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    if argv and argv[0] in PIPELINES:
      return _run_pipeline(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)
  except (LocalStackError, ConnectionError, ValueError) as e:
    print(f'kbml: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
