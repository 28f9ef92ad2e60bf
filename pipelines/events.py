"""The events every fraud pipeline reads: transactions and labels from Kafka, validated, in event time."""

from typing import Dict, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from kbml.kafka_client import PartitionOffsets
from pipelines.options import LOCAL_RUNNER, KafkaOptions
from transforms.features import DEFAULT_LABEL_DELAY_DAYS, GROUPED, HISTORY_DAYS, KEYED_STATE, ORDERED_BUNDLES
from transforms.kafka_io import read_from_kafka, write_to_kafka
from transforms.records import (
  DEAD_LETTER_TAG,
  LABEL_SCHEMA,
  TRANSACTION_SCHEMA,
  DeadLetter,
  ParseRecords,
  Transaction,
  dead_letter_message,
  transaction_record,
)


class EventOptions(PipelineOptions):
  """The topics of the events every fraud pipeline reads, and the features' label delay."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--transactions_topic', default='transactions')
    parser.add_argument('--labels_topic', default='labels', help='Labels feed the terminal features.')
    parser.add_argument('--dead_letter_topic', default='dead-letter', help='Where invalid records go, with the reason.')
    parser.add_argument('--label_delay_days', type=float, default=DEFAULT_LABEL_DELAY_DAYS,
                        help='The delay d of the terminal features (a model is scored with the one it was trained '
                        'with).')


def feature_form(options: PipelineOptions, bounded: bool) -> str:
  """How ComputeFeatures runs (transforms/features.py): grouped for bounded input; for a stream, in bundles read
  in event-time step on the local runner (``align_partitions``), in keyed state elsewhere."""
  if bounded:
    return GROUPED
  return ORDERED_BUNDLES if options.view_as(StandardOptions).runner == LOCAL_RUNNER else KEYED_STATE


def read_events(pipeline: beam.Pipeline, options: PipelineOptions, config: Dict[str, str], group: Optional[str],
                form: str, first_new: Optional[Dict[str, PartitionOffsets]] = None,
                **read_bounds) -> beam.PCollection:
  """Reads the transactions and labels topics; invalid records go to the dead-letter topic with the reason.

  Args:
    pipeline: the pipeline to add the steps to.
    options: its options (EventOptions, KafkaOptions).
    config: the Kafka client settings (:func:`pipelines.options.kafka_config`).
    group: the consumer group whose offsets the read starts from and commits; None: no group.
    form: the form of ComputeFeatures the events feed (:func:`feature_form`). ``ORDERED_BUNDLES`` reads the
      partitions in event-time step, and in Batches (:class:`~transforms.kafka_io.ReadFromKafka`'s ``batched``),
      which that form takes.
    first_new: per topic and partition, the first offset not read before, when the read starts from the
      beginning of the topics to rebuild state: the invalid records before it were sent to the dead-letter
      topic when they were first read, and are not sent again.
    **read_bounds: :class:`~transforms.kafka_io.ReadFromKafka` stop and alignment settings.

  Returns:
    The valid :class:`~transforms.records.Transaction` and :class:`~transforms.records.Label` events, with
    their records' Kafka timestamps (in :class:`~transforms.batches.Batch` elements for ``ORDERED_BUNDLES``).
  """
  kafka = options.view_as(KafkaOptions)
  events = options.view_as(EventOptions)
  if form == ORDERED_BUNDLES:
    read_bounds.update(align_partitions=True, batched=True)
  records = pipeline | 'ReadTransactionsAndLabels' >> read_from_kafka(
      kafka.kafka_io, {**config, 'group.id': group} if group else config,
      [events.transactions_topic, events.labels_topic], expansion_service=kafka.kafka_expansion_service,
      idle_timeout_s=kafka.idle_timeout_s, **read_bounds)
  parsed = records | 'ParseRecords' >> ParseRecords(
      {events.transactions_topic: TRANSACTION_SCHEMA, events.labels_topic: LABEL_SCHEMA})
  first_new = first_new or {}
  new_dead_letters = parsed[DEAD_LETTER_TAG] | 'NewDeadLetters' >> beam.Filter(
      lambda dead: dead.record.offset >= first_new.get(dead.record.topic, {}).get(dead.record.partition, 0))
  write_dead_letters(new_dead_letters, options, config)
  return parsed['records']


def write_dead_letters(letters: beam.PCollection, options: PipelineOptions, config: Dict[str, str], name: str = ''):
  """Writes :class:`~transforms.records.DeadLetter` elements to the dead-letter topic (steps named after ``name``)."""
  kafka = options.view_as(KafkaOptions)
  _ = (letters
       | f'{name}ToDeadLetterMessages' >> beam.Map(dead_letter_message)
       | f'Write{name}DeadLetters' >> write_to_kafka(kafka.kafka_io, config,
                                                     options.view_as(EventOptions).dead_letter_topic,
                                                     expansion_service=kafka.kafka_expansion_service))


def repeat_dead_letter(transaction: Transaction, transactions_topic: str) -> DeadLetter:
  return DeadLetter(transaction_record(transaction, transactions_topic),
                    f'repeated transaction_id {transaction.transaction_id}: customer {transaction.customer_id} '
                    f'already has a transaction with this id within its {HISTORY_DAYS} days of history, and the '
                    'first one wins (this one got no features, no prediction and no warehouse row)')


def write_repeats_to_dead_letters(repeated: beam.PCollection, options: PipelineOptions, config: Dict[str, str],
                                  first_new: Optional[PartitionOffsets] = None):
  """Sends ComputeFeatures' repeated transactions to the dead-letter topic, those at or after ``first_new``.

  Args:
    repeated: :class:`~transforms.features.FeatureOutputs` ``repeated``.
    options: the pipeline's options (EventOptions, KafkaOptions).
    config: the Kafka client settings.
    first_new: per transactions partition, the first offset not read before (see :func:`read_events`).
  """
  first_new = first_new or {}
  topic = options.view_as(EventOptions).transactions_topic
  letters = (repeated
             | 'NewRepeats' >> beam.Filter(
                 lambda transaction: transaction.kafka_offset >= first_new.get(transaction.kafka_partition, 0))
             | 'RepeatsToDeadLetters' >> beam.Map(repeat_dead_letter, topic))
  write_dead_letters(letters, options, config, 'Repeated')
