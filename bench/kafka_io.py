"""The Beam Kafka IO (Kafka -> Beam -> Kafka) against a hand-written client loop.

Both copy the same records from one topic to another with confluent-kafka:
the baseline is a plain consume -> produce loop, the measured pipeline is
``pipelines.mirror``'s graph (ReadFromKafka -> Map -> WriteToKafka) on the
pinned local runner, start-up included. Run: ``make bench`` or
``python -m bench.kafka_io --records 200000``.
"""

import apache_beam as beam
import confluent_kafka
from apache_beam.options.pipeline_options import PipelineOptions

from bench.common import Timer, best_of, local_broker, message, new_topic, parse_bench_args
from bench.kafka_clients import confluent_produce
from pipelines import mirror
from pipelines.options import LOCAL_RUNNER


def client_loop(bootstrap, source, sink, records):
  consumer = confluent_kafka.Consumer({'bootstrap.servers': bootstrap, 'group.id': 'loop',
                                       'enable.auto.commit': False})
  producer = confluent_kafka.Producer({'bootstrap.servers': bootstrap, 'linger.ms': 5, 'enable.idempotence': True})
  partitions = consumer.list_topics(source, timeout=10).topics[source].partitions
  consumer.assign([confluent_kafka.TopicPartition(source, p, 0) for p in partitions])
  copied = 0
  with Timer() as timer:
    while copied < records:
      for m in consumer.consume(1000, 1.0):
        while True:
          try:
            producer.produce(sink, m.value(), key=m.key(), headers=m.headers())
            break
          except BufferError:
            producer.poll(0.01)
        copied += 1
      producer.poll(0)
    assert producer.flush(60) == 0
  consumer.close()
  return timer.seconds


def beam_pipeline(bootstrap, source, sink):
  options = PipelineOptions(flags=[], runner=LOCAL_RUNNER, bootstrap_servers=bootstrap, input_topic=source,
                            output_topic=sink, stop_at_end=True)
  with Timer() as timer:
    with beam.Pipeline(options=options) as pipeline:
      mirror.build_pipeline(pipeline, options)
  return timer.seconds


def main(argv=None):
  args = parse_bench_args(__doc__, argv)
  with local_broker() as bootstrap:
    source = new_topic(bootstrap)
    confluent_produce(bootstrap, source, args.records)
    loop_s = best_of(args.repeats, lambda: client_loop(bootstrap, source, new_topic(bootstrap), args.records))
    beam_s = best_of(args.repeats, lambda: beam_pipeline(bootstrap, source, new_topic(bootstrap)))
  print(f'copy {args.records:,} records of {len(message(0))} bytes between 4-partition topics, best of {args.repeats}')
  print(f'client loop (confluent-kafka)   {args.records / loop_s:>9,.0f} r/s  {loop_s:6.2f} s')
  print(f'Beam mirror ({LOCAL_RUNNER})    {args.records / beam_s:>9,.0f} r/s  {beam_s:6.2f} s (start-up included)')
  print(f'Beam / client loop throughput: {loop_s / beam_s:.2f}x')


if __name__ == '__main__':
  main()
