"""What the simulators of the use cases share: their records in event-time order, produced to Kafka.

A use case's simulator module (fraud's ``use_cases/fraud/simulator.py``,
IoT's ``use_cases/iot/simulator.py``) draws its events and labels, merges
them with :func:`merged_in_event_time` and declares what ``kbml loop`` runs
(:class:`LoopScenario`); :func:`produce` sends them to the topics.
"""

import time
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from transforms.records import DAY_SECONDS


class LoopScenario(NamedTuple):
  """What ``kbml loop`` runs for a use case by default: its simulator module declares one as ``LOOP_SCENARIO``.

  Attributes:
    simulation: ``kbml simulate`` flags of the simulated traffic (the loop's own flags override them).
    drift_field: the simulation's field of the day its drift starts (``--drift-from-day`` sets it).
    live_from_day: days before this one are history; the first model trains on them.
    drift_from_day: the day the drift starts.
    rate: live events per second.
    first_model: ``kbml train`` flags of the first model's split, on the history's last labelled days.
    retrain: more ``kbml retrain --on-drift`` flags (its split, how many drifted days it waits for).
  """
  simulation: Tuple[str, ...]
  drift_field: str
  live_from_day: int
  drift_from_day: int
  rate: float
  first_model: Tuple[str, ...]
  retrain: Tuple[str, ...] = ()


class Event(NamedTuple):
  """One record to produce: to the events or the labels topic."""
  is_label: bool
  timestamp_ms: int
  key: bytes
  value: bytes


def merged_in_event_time(event_ms: np.ndarray, label_ms: np.ndarray, keys: List[bytes], event_values: List[bytes],
                         label_values: List[bytes], start_ms: int, from_day: Optional[float] = None,
                         until_day: Optional[float] = None) -> Iterator[Event]:
  """Events and their labels (the i-th label is the i-th event's) as one stream in time order, labels first at an
  instant; ``from_day`` and ``until_day`` (days after ``start_ms``, the end excluded) select a time range.

  Args:
    event_ms: each event's time, in epoch milliseconds.
    label_ms: when each event's label becomes known.
    keys: each event's record key, its label's too.
    event_values: the events' records.
    label_values: the labels' records.
    start_ms: the simulation's start.
  """
  times = np.concatenate([label_ms, event_ms])
  is_label = np.concatenate([np.ones(len(event_ms), bool), np.zeros(len(event_ms), bool)])
  rows = np.concatenate([np.arange(len(event_ms)), np.arange(len(event_ms))])
  order = np.lexsort((rows, ~is_label, times))  # by time; at one instant, labels first
  day_ms = DAY_SECONDS * 1000
  in_range = np.ones(len(order), bool)
  if from_day is not None:
    in_range &= times[order] >= start_ms + from_day * day_ms
  if until_day is not None:
    in_range &= times[order] < start_ms + until_day * day_ms
  values = (event_values, label_values)
  for i in order[in_range]:
    row, label = rows[i], bool(is_label[i])
    yield Event(label, int(times[i]), keys[row], values[label][row])


def produce(simulated: Iterable[Event], producer_config: Dict[str, str], events_topic: str, labels_topic: str,
            rate: Optional[float] = None, progress: Optional[Callable[[int, int], None]] = None) -> Tuple[int, int]:
  """Produces events in order, as fast as possible or at ``rate`` events per second.

  Each record's Kafka timestamp is its event time. Returns the numbers of
  events and labels produced, all acknowledged.

  Raises:
    RuntimeError: some records were not delivered.
  """
  from kbml.kafka_client import AcknowledgedProducer
  producer = AcknowledgedProducer(producer_config)
  producer.check_reachable()
  counts = [0, 0]
  started = time.monotonic()
  last_report = started
  for event in simulated:
    producer.send(labels_topic if event.is_label else events_topic, event.value, event.key,
                  timestamp_ms=event.timestamp_ms)
    counts[event.is_label] += 1
    sent = counts[0] + counts[1]
    if rate and sent % 50 == 0:
      time.sleep(max(0.0, started + sent / rate - time.monotonic()))
    if progress and sent % 1000 == 0 and time.monotonic() - last_report >= 1:
      progress(*counts)
      last_report = time.monotonic()
  undelivered, reasons = producer.flush(60)
  if undelivered:
    raise RuntimeError(f'{undelivered} simulated records were not delivered to Kafka: {"; ".join(reasons)}. The '
                       'broker is down, or the producer is stuck after a broker restart: check the broker '
                       '(`kbml local status`), then produce again')
  if progress:
    progress(*counts)
  return counts[0], counts[1]
