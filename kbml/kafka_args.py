"""The Kafka arguments of the commands that talk to Kafka, and the client settings they give."""

import argparse
from typing import Dict

from kbml.kafka_config import kafka_client_config
from kbml.local_stack import local_bootstrap_servers


def add_kafka_arguments(parser: argparse.ArgumentParser):
  """Adds --bootstrap-servers, --kafka-config and --kafka-config-file to a command's parser."""
  parser.add_argument('--bootstrap-servers', help='Kafka; default: the local broker (`kbml local up`).')
  parser.add_argument('--kafka-config', action='append', default=[], metavar='KEY=VALUE',
                      help='Kafka client setting, passed through (repeatable).')
  parser.add_argument('--kafka-config-file', help='A .properties file of Kafka client settings.')


def kafka_config_from_args(args: argparse.Namespace) -> Dict[str, str]:
  """The Kafka client settings of a command that took :func:`add_kafka_arguments`."""
  return kafka_client_config(args.bootstrap_servers or local_bootstrap_servers(), args.kafka_config,
                             args.kafka_config_file)
