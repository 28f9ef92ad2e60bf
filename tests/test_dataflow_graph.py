"""The mirror pipeline builds a Dataflow job offline, with our Kafka source and sink in its graph."""

import apache_beam as beam
import pytest
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import mirror
from pipelines.options import pipeline_options

DATAFLOW_DRY_RUN = ['--runner=DataflowRunner', '--dry_run=True', '--no_auth', '--project=test-project',
                    '--region=us-central1', '--temp_location=gs://bkt/tmp', '--sdk_location=container']
MIRROR = ['--bootstrap_servers=broker-1:9092', '--input_topic=transactions', '--output_topic=copy',
          '--consumer_group=mirror']


def _dry_run_graph(extra_args):
  options = pipeline_options(DATAFLOW_DRY_RUN + MIRROR + extra_args)
  pipeline = beam.Pipeline(options=options)
  mirror.build_pipeline(pipeline, options)
  components = pipeline.run().job.proto_pipeline.components
  return components, {t.unique_name: t for t in components.transforms.values()}


@pytest.mark.parametrize('extra_args, boundedness', [
    (['--streaming'], beam_runner_api_pb2.IsBounded.UNBOUNDED),
    (['--stop_at_end'], beam_runner_api_pb2.IsBounded.BOUNDED),
])
def test_dataflow_job_contains_the_kafka_source_and_sink(extra_args, boundedness):
  components, transforms = _dry_run_graph(extra_args)

  source = transforms['ReadInput/ReadPartitions']
  payload = beam_runner_api_pb2.ParDoPayload.FromString(source.spec.payload)
  assert payload.restriction_coder_id, 'the source is a splittable DoFn'
  assert payload.requests_finalization, 'offsets are committed in bundle finalization'
  (records,) = source.outputs.values()
  assert components.pcollections[records].is_bounded == boundedness
  assert 'ReadInput/ListPartitions' in transforms
  assert transforms['WriteOutput/Produce'].spec.urn == 'beam:transform:pardo:v1'


def test_pipeline_options_pin_the_local_runner_unless_one_is_given():
  assert pipeline_options([]).get_all_options()['runner'] == 'FnApiRunner'
  assert pipeline_options(['--runner=PrismRunner']).get_all_options()['runner'] == 'PrismRunner'
