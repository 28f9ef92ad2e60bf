"""Kafka client settings: parsing, environment expansion and redaction.

Settings pass through to the Kafka client unchanged, so SASL, TLS and every
other librdkafka property work as in any Kafka client. Secrets are read from
the environment (``${VAR}`` in a value) or from a properties file, and are
never printed: use :func:`redact` before logging a configuration.
"""

import os
import re
from typing import Dict, Iterable, Mapping, Optional

_ENV_REFERENCE = re.compile(r'\$\{([A-Za-z_][A-Za-z0-9_]*)\}')
_SECRET_KEY_PARTS = ('password', 'secret', 'jaas', 'token', 'credentials', 'key.pem', 'keystore', 'private')


class KafkaConfigError(ValueError):
  """A Kafka client setting could not be parsed or resolved."""


def _expand_env(key: str, value: str) -> str:
  def substitute(match):
    name = match.group(1)
    if name not in os.environ:
      raise KafkaConfigError(
          f'Kafka setting {key!r} refers to ${{{name}}}, but the environment variable {name} is not set.')
    return os.environ[name]

  return _ENV_REFERENCE.sub(substitute, value)


def _split_pair(pair: str, origin: str) -> tuple:
  key, sep, value = pair.partition('=')
  if not sep or not key.strip():
    raise KafkaConfigError(f'{origin}: expected key=value, got {pair!r}.')
  return key.strip(), value.strip()


def read_properties_file(path: str) -> Dict[str, str]:
  """Reads a Java-style ``.properties`` file (``key=value``, ``#`` comments).

  Args:
    path: the file to read.

  Returns:
    The settings in file order.

  Raises:
    KafkaConfigError: the file is missing or a line is not ``key=value``.
  """
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise KafkaConfigError(f'Cannot read Kafka properties file {path!r}: {e.strerror}.') from e
  settings = {}
  for number, line in enumerate(lines, start=1):
    stripped = line.strip()
    if stripped and not stripped.startswith(('#', '!')):
      key, value = _split_pair(stripped, f'{path}:{number}')
      settings[key] = value
  return settings


def kafka_client_config(
    bootstrap_servers: Optional[str] = None,
    pairs: Iterable[str] = (),
    properties_file: Optional[str] = None) -> Dict[str, str]:
  """Builds a Kafka client configuration from the command-line forms.

  Later sources win: the properties file, then ``key=value`` pairs, then
  ``bootstrap_servers``. ``${VAR}`` references are expanded from the
  environment.

  Args:
    bootstrap_servers: ``host:port[,host:port]``; overrides the other sources.
    pairs: ``key=value`` strings, as given to ``--kafka-config``.
    properties_file: a ``.properties`` file with more settings.

  Returns:
    A dict of librdkafka settings.
  """
  settings = read_properties_file(properties_file) if properties_file else {}
  for pair in pairs:
    key, value = _split_pair(pair, '--kafka-config')
    settings[key] = value
  if bootstrap_servers:
    settings['bootstrap.servers'] = bootstrap_servers
  if not settings.get('bootstrap.servers'):
    raise KafkaConfigError(
        'No Kafka bootstrap servers: pass --bootstrap-servers host:port '
        '(for the local broker, run `kbml local up` and use the address it prints).')
  return {key: _expand_env(key, value) for key, value in settings.items()}


def redact(config: Mapping[str, object]) -> Dict[str, object]:
  """Returns a copy of ``config`` that is safe to print or log."""
  return {
      key: ('***' if any(part in key.lower() for part in _SECRET_KEY_PARTS) else value)
      for key, value in config.items()
  }
