"""What every benchmark needs: a fresh local broker, a payload, a timer."""

import argparse
import contextlib
import os
import tempfile
import time
import uuid

from kbml.kafka_client import create_topics
from kbml.local_stack import LocalStack

# About the size of one JSON transaction record.
PAYLOAD = b'{"tx_id": "%08d", "customer_id": 1234, "terminal_id": 5678, "amount": 57.16, ' \
          b'"timestamp": "2018-04-01T07:19:05Z", "pad": "' + b'x' * 60 + b'"}'


@contextlib.contextmanager
def local_broker():
  """Yields the bootstrap address of a broker that lives for the benchmark."""
  with tempfile.TemporaryDirectory() as state_dir:
    stack = LocalStack(state_dir, topics=())
    try:
      yield stack.up(port=0)
    finally:
      stack.down(grace_s=0)


def new_topic(bootstrap: str, partitions: int = 4) -> str:
  topic = f'bench-{uuid.uuid4().hex[:8]}'
  create_topics({'bootstrap.servers': bootstrap}, [topic], partitions)
  return topic


def message(i: int) -> bytes:
  return PAYLOAD % i


def cpu_seconds(pid: int) -> float:
  """User and system CPU time of a process so far, all its threads (Linux, from /proc)."""
  fields = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def resident_mb(pid: int) -> float:
  """A process's resident memory (VmRSS) in MiB (Linux, from /proc)."""
  with open(f'/proc/{pid}/status') as status:
    return next(int(line.split()[1]) for line in status if line.startswith('VmRSS:')) / 1024


class Timer:
  def __enter__(self):
    self.start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start


def best_of(repeats: int, measure) -> float:
  """The best (shortest) of ``repeats`` timings: the least disturbed by the rest of the machine."""
  return min(measure() for _ in range(repeats))


def parse_bench_args(description: str, argv=None) -> argparse.Namespace:
  """The options every benchmark takes: how many records, how many repeats."""
  parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--records', type=int, default=200_000, help='Records per measurement.')
  parser.add_argument('--repeats', type=int, default=3, help='Measurements per figure; the best is kept.')
  return parser.parse_args(argv)
