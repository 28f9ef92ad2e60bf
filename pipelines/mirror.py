"""Copies records from one Kafka topic to another.

The smallest pipeline through both Kafka transforms: it is how the Kafka IO is
checked end to end, benchmarked, and built for Dataflow. Keys, values and
headers are copied unchanged.

Example::

    python -m pipelines.mirror --input-topic transactions --output-topic copy \\
        --consumer-group mirror-1
"""

import logging
from typing import List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import KafkaOptions, kafka_config, pipeline_options
from pipelines.stopping import stop_on_signals
from transforms.kafka_io import KafkaRecord, read_from_kafka, write_to_kafka


class MirrorOptions(PipelineOptions):
  """What to copy (where from and when to stop: KafkaOptions)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--input_topic', help='Topic to read (required).')
    parser.add_argument('--output_topic', help='Topic to write (required).')


def to_message(record: KafkaRecord):
  return record.key, record.value, record.headers


class MirrorTopic(beam.PTransform):
  """Copies ``--input-topic`` to ``--output-topic``; applied to a pipeline's beginning, returns the copied records.

  Args:
    options: the pipeline's options (MirrorOptions, KafkaOptions).

  Raises:
    ValueError: a topic is not given.
  """

  def __init__(self, options: PipelineOptions):
    super().__init__()
    mirror = options.view_as(MirrorOptions)
    if not (mirror.input_topic and mirror.output_topic):
      raise ValueError('The mirror needs --input-topic and --output-topic.')
    self._options = options

  def expand(self, pbegin):
    kafka = self._options.view_as(KafkaOptions)
    mirror = self._options.view_as(MirrorOptions)
    config = kafka_config(self._options)
    consumer_config = {**config, 'group.id': kafka.consumer_group} if kafka.consumer_group else config
    records = pbegin | 'ReadInput' >> read_from_kafka(
        kafka.kafka_io, consumer_config, [mirror.input_topic], expansion_service=kafka.kafka_expansion_service,
        stop_at_end=kafka.stop_at_end, idle_timeout_s=kafka.idle_timeout_s)
    _ = (records
         | 'ToMessages' >> beam.Map(to_message)
         | 'WriteOutput' >> write_to_kafka(kafka.kafka_io, config, mirror.output_topic,
                                           expansion_service=kafka.kafka_expansion_service))
    return records


def build_pipeline(pipeline: beam.Pipeline, options: PipelineOptions) -> beam.PCollection:
  """Applies :class:`MirrorTopic` to ``pipeline``; returns the copied records."""
  return pipeline | 'MirrorTopic' >> MirrorTopic(options)


def run(argv: Optional[List[str]] = None):
  stop_on_signals()
  options = pipeline_options(argv, [MirrorOptions], prog='python -m pipelines.mirror')
  with beam.Pipeline(options=options) as pipeline:
    build_pipeline(pipeline, options)


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.INFO)
  run()
