"""The two local brokers side by side: Apache Kafka 4.1 (KRaft, one node) and Tansu (in memory).

For each broker, in alternating rounds (the machine is shared and noisy):
the time ``kbml local up`` takes to answer with the project topics created
and the group coordinator ready, the broker's resident memory once up and
after the records passed, and producer and consumer throughput with
confluent-kafka (the clients of the pipelines). Prints the median of the
rounds and their spread (lowest..highest), and Apache Kafka's figures as a
ratio of Tansu's. Run: ``make bench`` or
``python -m bench.brokers --records 200000 --repeats 3``.
"""

import statistics
import tempfile

from bench.common import Timer, new_topic, parse_bench_args, resident_mb
from bench.kafka_clients import confluent_consume, confluent_produce
from kbml.local_stack import APACHE_KAFKA, SHARED_TOPICS, TANSU, LocalStack

FIGURES = ('up_s', 'memory_up_mb', 'memory_after_mb', 'produce_rps', 'consume_rps')


def measure(broker: str, records: int) -> dict:
  """One round on a fresh broker in a fresh state dir."""
  with tempfile.TemporaryDirectory() as state_dir:
    stack = LocalStack(state_dir, topics=('transactions', 'labels', *SHARED_TOPICS), broker=broker)
    try:
      with Timer() as up:
        bootstrap = stack.up(port=0, timeout_s=60)
      pid = stack.status().pid
      memory_up = resident_mb(pid)
      topic = new_topic(bootstrap)
      produce_s = confluent_produce(bootstrap, topic, records)
      consume_s = confluent_consume(bootstrap, topic, records)
      return {'up_s': up.seconds, 'memory_up_mb': memory_up, 'memory_after_mb': resident_mb(pid),
              'produce_rps': records / produce_s, 'consume_rps': records / consume_s}
    finally:
      stack.down(grace_s=0)


def main(argv=None):
  args = parse_bench_args(__doc__, argv)
  rounds = {APACHE_KAFKA: [], TANSU: []}
  for round_number in range(args.repeats):
    for broker in rounds:
      rounds[broker].append(measure(broker, args.records))
      print(f'round {round_number + 1}/{args.repeats} {broker}: '
            + ', '.join(f'{name} {value:,.2f}' for name, value in rounds[broker][-1].items()), flush=True)
  print(f'\n{args.records:,} records of about 150 bytes, 4 partitions; median of {args.repeats} rounds '
        '(lowest..highest)')
  print(f"{'':16} {'Apache Kafka':>34} {'Tansu':>34} {'Kafka / Tansu':>14}")
  for name in FIGURES:
    cells, medians = [], []
    for broker in rounds:
      values = [r[name] for r in rounds[broker]]
      medians.append(statistics.median(values))
      cells.append(f'{medians[-1]:,.1f} ({min(values):,.1f}..{max(values):,.1f})')
    print(f'{name:16} {cells[0]:>34} {cells[1]:>34} {medians[0] / medians[1]:>13.2f}x')


if __name__ == '__main__':
  main()
