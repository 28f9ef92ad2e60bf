"""``kbml simulate``: a use case's simulated events and their labels, produced to Kafka in event-time order.

The use case names its simulator module (``UseCase.simulator``; fraud's is
``use_cases/fraud/simulator.py``, IoT's ``use_cases/iot/simulator.py``), which provides:

- ``SimulationConfig``, a dataclass whose fields are this command's flags
  (``machines`` -> ``--machines``, with its default, its help from the
  docstring's ``Attributes``);
- ``simulate(config)``: the simulation, in memory;
- ``events(simulation, from_day, until_day)``: its records, events and labels
  merged in event-time order (:class:`kbml.simulator.Event`);
- ``describe(simulation)``: one line of what it holds; ``size(simulation)``:
  how many events (each with its label);
- optionally ``write_files(simulation, folder)``: the records as files
  (``--output-dir``).

Examples::

    kbml simulate --days 30 --customers 500
    kbml simulate --use-case iot --machines 50 --days 30 --leaks-from-day 20 --rate 2000
"""

import argparse
import dataclasses
import importlib
import re
import sys
import time
import typing
from types import ModuleType
from typing import Dict, List, Optional

from kbml.kafka_args import add_kafka_arguments, kafka_config_from_args
from kbml.produce import print_produced, progress_line
from kbml.simulator import produce
from transforms.use_case import UseCase, load_use_case


def simulator_of(use_case: UseCase) -> ModuleType:
  """The use case's simulator module; ValueError if it declares none."""
  if not use_case.simulator:
    raise ValueError(f'The use case {use_case.name} declares no simulator: produce its events from files instead '
                     '(`kbml produce`).')
  return importlib.import_module(use_case.simulator)


def _attribute_help(docstring: Optional[str]) -> Dict[str, str]:
  """The ``Attributes:`` section of a Google-style docstring: name -> its text, continuation lines joined."""
  helps: Dict[str, str] = {}
  section, name = False, None
  for line in (docstring or '').splitlines():
    stripped = line.strip()
    if stripped == 'Attributes:':
      section = True
    elif section and (match := re.match(r'(\w+): (.*)', stripped)) and line.startswith(' ' * 4) \
        and not line.startswith(' ' * 6):
      name = match.group(1)
      helps[name] = match.group(2)
    elif section and stripped and name:
      helps[name] += ' ' + stripped
    elif section and not stripped and helps:
      break
  return helps


def _value_type(hint) -> type:
  """The type a flag parses: the hint, or its inner type for an Optional."""
  inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
  return inner[0] if typing.get_origin(hint) is typing.Union and len(inner) == 1 else hint


def build_parser(use_case: UseCase) -> argparse.ArgumentParser:
  """The flags of ``kbml simulate`` for ``use_case``: its simulation's, then where the records go."""
  simulator = simulator_of(use_case)
  config_type = simulator.SimulationConfig
  parser = argparse.ArgumentParser(
      prog='kbml simulate', description=__doc__.split('\n\n', 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--use-case', default=use_case.name,
                      help='fraud (the default), iot, or the dotted name of a module of yours that declares a '
                      'USE_CASE with a simulator.')
  simulation = parser.add_argument_group(f'The simulation ({use_case.simulator}.SimulationConfig)')
  helps, hints = _attribute_help(config_type.__doc__), typing.get_type_hints(config_type)
  for field in dataclasses.fields(config_type):
    described = helps.get(field.name, '').rstrip('.')
    simulation.add_argument(f'--{field.name.replace("_", "-")}', type=_value_type(hints[field.name]),
                            default=field.default, help=f'{described} (default: {field.default}).'.lstrip())
  output = parser.add_argument_group('Where the records go')
  output.add_argument('--from-day', type=float, help='Produce only the events from this day on (days since the '
                      'start): the live part of a simulation whose history was produced with --until-day.')
  output.add_argument('--until-day', type=float, help='Produce only the events before this day.')
  output.add_argument('--rate', type=float, help='Events per second (default: as fast as possible).')
  output.add_argument('--output-dir', help='Also write the records as files here (the simulators that can).')
  output.add_argument('--no-kafka', action='store_true', help='Only write files (with --output-dir).')
  output.add_argument('--events-topic', '--transactions-topic', dest='events_topic', default=use_case.events_topic,
                      help='Default: %(default)s.')
  output.add_argument('--labels-topic', default=use_case.labels_topic, help='Default: %(default)s.')
  add_kafka_arguments(output)
  return parser


def parse_args(argv: List[str]) -> argparse.Namespace:
  """``kbml simulate`` arguments, with the flags of the use case that ``--use-case`` names (default: fraud)."""
  use_case_only = argparse.ArgumentParser(add_help=False)
  use_case_only.add_argument('--use-case')
  chosen, _ = use_case_only.parse_known_args(argv)
  return build_parser(load_use_case(chosen.use_case)).parse_args(argv)


def simulation_config(args: argparse.Namespace, simulator: ModuleType):
  """The ``SimulationConfig`` of ``simulator`` (the use case's module) from parsed arguments."""
  config_type = simulator.SimulationConfig
  return config_type(**{field.name: getattr(args, field.name) for field in dataclasses.fields(config_type)})


def run(argv: Optional[List[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.no_kafka and not args.output_dir:
    raise ValueError('--no-kafka writes the simulation only to files: give --output-dir too.')
  use_case = load_use_case(args.use_case)
  simulator = simulator_of(use_case)
  started = time.monotonic()
  simulation = simulator.simulate(simulation_config(args, simulator))
  print(f'{simulator.describe(simulation)}, in {time.monotonic() - started:.1f} s')
  if args.output_dir:
    if not hasattr(simulator, 'write_files'):
      raise ValueError(f'The {use_case.name} simulator writes no files: leave out --output-dir.')
    print('wrote ' + ' and '.join(simulator.write_files(simulation, args.output_dir)))
  if args.no_kafka:
    return 0
  config = kafka_config_from_args(args)
  started = time.monotonic()
  size = simulator.size(simulation)
  counts = produce(simulator.events(simulation, args.from_day, args.until_day), config, args.events_topic,
                   args.labels_topic, args.rate, progress_line(size, size, use_case.event_noun))
  print_produced(counts, use_case.event_noun, args.events_topic, args.labels_topic, config,
                 time.monotonic() - started)
  return 0

