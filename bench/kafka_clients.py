"""kafka-python against confluent-kafka, as producer and as consumer, on the local broker.

The faster client carries the data path of transforms/kafka_io.py. Both
clients move the same records with settings that favour throughput
(batching, no per-record waits). Run: ``make bench`` or
``python -m bench.kafka_clients --records 200000``.
"""

import confluent_kafka
import kafka

from bench.common import Timer, best_of, local_broker, message, new_topic, parse_bench_args


def confluent_produce(bootstrap, topic, records):
  producer = confluent_kafka.Producer({'bootstrap.servers': bootstrap, 'linger.ms': 5, 'enable.idempotence': True})
  with Timer() as timer:
    for i in range(records):
      while True:
        try:
          producer.produce(topic, message(i), key=b'%d' % (i % 5000))
          break
        except BufferError:
          producer.poll(0.01)
      if i % 1000 == 0:
        producer.poll(0)
    assert producer.flush(60) == 0
  return timer.seconds


def kafka_python_produce(bootstrap, topic, records):
  producer = kafka.KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks='all', batch_size=65536)
  with Timer() as timer:
    for i in range(records):
      producer.send(topic, message(i), key=b'%d' % (i % 5000))
    producer.flush(60)
  producer.close()
  return timer.seconds


def confluent_consume(bootstrap, topic, records):
  consumer = confluent_kafka.Consumer({'bootstrap.servers': bootstrap, 'group.id': 'bench',
                                       'enable.auto.commit': False})
  partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
  consumer.assign([confluent_kafka.TopicPartition(topic, p, 0) for p in partitions])
  received = 0
  with Timer() as timer:
    while received < records:
      received += len(consumer.consume(1000, 1.0))
  consumer.close()
  return timer.seconds


def kafka_python_consume(bootstrap, topic, records):
  consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=1000)
  partitions = consumer.partitions_for_topic(topic)
  assigned = [kafka.TopicPartition(topic, p) for p in partitions]
  consumer.assign(assigned)
  consumer.seek_to_beginning(*assigned)
  received = 0
  with Timer() as timer:
    while received < records:
      received += sum(len(batch) for batch in consumer.poll(timeout_ms=1000).values())
  consumer.close()
  return timer.seconds


def main(argv=None):
  args = parse_bench_args(__doc__, argv)
  with local_broker() as bootstrap:
    topic = new_topic(bootstrap)
    confluent_produce(bootstrap, topic, args.records)  # the topic both consumers read
    figures = {
        'produce': (best_of(args.repeats, lambda: confluent_produce(bootstrap, new_topic(bootstrap), args.records)),
                    best_of(args.repeats, lambda: kafka_python_produce(bootstrap, new_topic(bootstrap),
                                                                       args.records))),
        'consume': (best_of(args.repeats, lambda: confluent_consume(bootstrap, topic, args.records)),
                    best_of(args.repeats, lambda: kafka_python_consume(bootstrap, topic, args.records))),
    }
  print(f'{args.records:,} records of {len(message(0))} bytes, 4 partitions, best of {args.repeats}')
  print(f"{'':8} {'confluent-kafka':>16} {'kafka-python':>14} {'confluent / kafka-python':>26}")
  for name, (confluent_s, kafka_python_s) in figures.items():
    print(f'{name:8} {args.records / confluent_s:>12,.0f} r/s {args.records / kafka_python_s:>10,.0f} r/s '
          f'{kafka_python_s / confluent_s:>25.2f}x')


if __name__ == '__main__':
  main()
