"""``kbml watch``: follow the predictions topic and the alerts as they arrive."""

import collections
import datetime
import json
import time
from typing import Callable, Dict, Optional

from confluent_kafka import TopicPartition

from kbml.kafka_client import fetched_end_offset, list_partitions, listed_offsets, new_consumer, new_probe_consumer


def _start_offsets(config: Dict[str, str], predictions_topic: str, alerts_topic: str):
  """Predictions from their end (what arrives from now on), alerts from their beginning (every alert so far)."""
  probe = new_probe_consumer(config)
  try:
    starts = []
    for topic, partition in list_partitions(probe, [predictions_topic, alerts_topic]):
      low, _ = listed_offsets(probe, topic, partition)
      start = fetched_end_offset(probe, topic, partition, low) if topic == predictions_topic else low
      starts.append(TopicPartition(topic, partition, start))
    return starts
  finally:
    probe.close()


def watch_predictions(config: Dict[str, str], predictions_topic: str, alerts_topic: str,
                      seconds: Optional[float] = None, interval: float = 2.0, out: Callable[[str], None] = print):
  """Prints a line every ``interval`` seconds (predictions/s, versions, flags, alerts) and each new alert.

  Args:
    config: Kafka client settings.
    predictions_topic: the scorer's output.
    alerts_topic: the alerts topic.
    seconds: stop after this long; None: until interrupted.
    interval: seconds between lines.
    out: where lines go.
  """
  consumer = new_consumer(config)
  consumer.assign(_start_offsets(config, predictions_topic, alerts_topic))
  started = last_line = time.monotonic()
  total = flagged = since_line = 0
  versions = collections.Counter()
  alerts = collections.Counter()
  try:
    while seconds is None or time.monotonic() - started < seconds:
      for message in consumer.consume(num_messages=1000, timeout=0.2):
        if message.error():
          continue
        record = json.loads(message.value())
        if message.topic() == alerts_topic:
          alerts[record.get('kind')] += 1
          out(f'ALERT {record.get("kind")}: {record.get("message")}')
          continue
        total += 1
        since_line += 1
        flagged += bool(record.get('flagged'))
        versions[record.get('model_version')] += 1
      now = time.monotonic()
      if now - last_line >= interval:
        in_service = ', '.join(f'{version} ({count:,})' for version, count in versions.most_common())
        out(f'{datetime.datetime.now():%H:%M:%S}  {since_line / (now - last_line):8,.0f} predictions/s  '
            f'{total:,} in all, {flagged:,} flagged  by model {in_service or "-"}  '
            f'alerts so far: {sum(alerts.values())}{f" {dict(alerts)}" if alerts else ""}')
        last_line, since_line = now, 0
  except KeyboardInterrupt:
    pass
  finally:
    consumer.close()
