"""Alerts: JSON records on the ``alerts`` topic that a person or a job acts on.

Every alert has a ``kind`` (``model_refused``, ``drift``, ...), the time it was raised,
a sentence that says what happened and what to do, and the details of its
kind. The key is the kind, so that one kind's alerts stay in order.
"""

import json
import logging
import time
from typing import Mapping

from kbml.kafka_client import AcknowledgedProducer

_LOG = logging.getLogger(__name__)

ALERTS_TOPIC = 'alerts'
MODEL_REFUSED = 'model_refused'
DRIFT = 'drift'  # a feature's or the score's distribution moved away from the training data's
PRECISION_BELOW_FLOOR = 'precision_below_floor'
RECALL_BELOW_FLOOR = 'recall_below_floor'
DEAD_LETTER_RATE = 'dead_letter_rate'
SCORER_LAG = 'scorer_lag'


def alert_record(kind: str, message: str, **details) -> bytes:
  """The value of an alert record."""
  return json.dumps({'kind': kind, 'raised_at': time.time(), 'message': message, **details}).encode()


class AlertSink:
  """Sends alerts to a Kafka topic, each one acknowledged before :meth:`send` returns.

  Args:
    producer_config: Kafka producer settings, passed through.
    topic: the alerts topic.
    timeout_s: how long to wait for the acknowledgement.
  """

  def __init__(self, producer_config: Mapping[str, str], topic: str = ALERTS_TOPIC, timeout_s: float = 15.0):
    self._config = dict(producer_config)
    self._topic = topic
    self._timeout_s = timeout_s
    self._producer = None

  def __getstate__(self):
    return {**self.__dict__, '_producer': None}

  def send(self, kind: str, message: str, **details):
    """Logs the alert and writes it to the topic; raises if Kafka did not acknowledge it."""
    _LOG.error('alert %s: %s', kind, message)
    if self._producer is None:
      self._producer = AcknowledgedProducer(self._config)
    self._producer.send(self._topic, alert_record(kind, message, **details), kind.encode())
    undelivered, reasons = self._producer.flush(self._timeout_s)
    if undelivered:
      raise RuntimeError(f'The {kind} alert was not delivered to Kafka topic {self._topic!r}: {"; ".join(reasons)}')
