"""Dataflow jobs built offline: the Kafka source and sink in the graph; dry runs need no broker and no credentials."""

import os
import subprocess
import sys
import tempfile
import time

import apache_beam as beam
import pytest
from apache_beam.portability.api import beam_runner_api_pb2

from pipelines import mirror
from pipelines.events import feature_form
from pipelines.options import KafkaOptions, ModelOptions, dashes_to_underscores, pipeline_options
from pipelines.scoring import RELOAD_POLL, RELOAD_WATCH, model_reload
from tests.pipeline_process import PROJECT_ROOT
from transforms.feature_forms import GROUPED, KEYED_STATE, ORDERED_BUNDLES

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

  source = transforms['MirrorTopic/ReadInput/ReadPartitions']
  payload = beam_runner_api_pb2.ParDoPayload.FromString(source.spec.payload)
  assert payload.restriction_coder_id, 'the source is a splittable DoFn'
  assert payload.requests_finalization, 'offsets are committed in bundle finalization'
  (records,) = source.outputs.values()
  assert components.pcollections[records].is_bounded == boundedness
  assert 'MirrorTopic/ReadInput/ListPartitions' in transforms
  assert transforms['MirrorTopic/WriteOutput/Produce'].spec.urn == 'beam:transform:pardo:v1'


@pytest.mark.parametrize('args, runs_on, form, reload', [
    ([], 'FnApiRunner', ORDERED_BUNDLES, RELOAD_POLL),
    (['--runner=FnApiRunner'], 'FnApiRunner', ORDERED_BUNDLES, RELOAD_POLL),
    (['--runner=DirectRunner'], 'FnApiRunner', ORDERED_BUNDLES, RELOAD_POLL),
    (['--runner=direct'], 'FnApiRunner', ORDERED_BUNDLES, RELOAD_POLL),
    (['--runner=PrismRunner'], 'PrismRunner', KEYED_STATE, RELOAD_POLL),
    (['--runner=FlinkRunner'], 'FlinkRunner', KEYED_STATE, RELOAD_WATCH),
    (['--runner=DataflowRunner', '--bootstrap_servers=broker:9092'], 'DataflowRunner', KEYED_STATE, RELOAD_WATCH),
    (['--model_reload=watch'], 'FnApiRunner', ORDERED_BUNDLES, RELOAD_WATCH),
])
def test_each_runner_gets_the_forms_it_can_run(args, runs_on, form, reload):
  # By what the runner can do, not its name: the DirectRunner, which falls back to the FnApiRunner, used to get
  # the keyed-state features and the side-input reload that never fires there.
  options = pipeline_options(args)
  assert (options.get_all_options()['runner'], feature_form(options, bounded=False), model_reload(options)) == \
      (runs_on, form, reload)
  assert feature_form(options, bounded=True) == GROUPED


REMOTE_SETTINGS = {
    'pipelines.ingest': ['--warehouse=bigquery://test-project/fraud'],
    'pipelines.scoring': ['--model_dir=gs://bkt/models'],
    'pipelines.monitoring': ['--warehouse=bigquery://test-project/fraud', '--model_dir=gs://bkt/models'],
    'pipelines.mirror': ['--input_topic=transactions', '--output_topic=copy'],
}
NO_CREDENTIALS = {'GOOGLE_APPLICATION_CREDENTIALS': '/nonexistent/credentials.json', 'NO_GCE_CHECK': 'True'}


def _dry_run(module: str, *args: str) -> subprocess.CompletedProcess:
  """``python -m MODULE`` as a Dataflow dry run, with no broker at its address and no Google credentials."""
  environment = {**{name: value for name, value in os.environ.items() if not name.startswith('GOOGLE')},
                 **NO_CREDENTIALS, 'CLOUDSDK_CONFIG': tempfile.mkdtemp()}
  return subprocess.run([sys.executable, '-m', module, *DATAFLOW_DRY_RUN, '--streaming', *args], env=environment,
                        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('module', sorted(REMOTE_SETTINGS))
def test_a_dataflow_dry_run_needs_no_broker_and_no_credentials(module):
  started = time.monotonic()
  done = _dry_run(module, '--bootstrap_servers=127.0.0.1:9', *REMOTE_SETTINGS[module])
  assert done.returncode == 0, done.stderr[-3000:]
  print(f'{module}: built in {time.monotonic() - started:.1f} s')


@pytest.mark.parametrize('module, args, refused', [
    ('pipelines.ingest', ['--bootstrap_servers=broker:9092'], '--warehouse bigquery://'),
    ('pipelines.scoring', ['--bootstrap_servers=broker:9092', '--model_dir=/tmp/models'], '--model-dir gs://'),
    ('pipelines.mirror', REMOTE_SETTINGS['pipelines.mirror'], '--bootstrap-servers HOST:PORT'),
])
def test_a_dataflow_job_refuses_what_only_this_machine_can_serve(module, args, refused):
  done = _dry_run(module, *args)
  assert done.returncode != 0 and refused in done.stderr, done.stderr[-3000:]


def test_the_pipelines_take_the_command_lines_dashed_flags_and_beams_underscored_ones():
  dashed = pipeline_options(['--model-dir', '/m', '--bootstrap-servers', 'b:1', '--stop-at-end', '--kafka-config=a=1',
                             '--temp-location', '/t'], [ModelOptions])
  underscored = pipeline_options(['--model_dir', '/m', '--bootstrap_servers', 'b:1', '--stop_at_end',
                                  '--kafka_config=a=1', '--temp_location', '/t'], [ModelOptions])
  for options in (dashed, underscored):
    assert options.view_as(ModelOptions).model_dir == '/m'
    assert options.get_all_options()['bootstrap_servers'] == 'b:1'
    kafka = options.view_as(KafkaOptions)
    assert kafka.stop_at_end and kafka.kafka_config == ['a=1']
    assert options.get_all_options()['temp_location'] == '/t'
  assert dashes_to_underscores('-x') == '-x' and dashes_to_underscores('a-b') == 'a-b'
  help_text = subprocess.run([sys.executable, '-m', 'pipelines.scoring', '--help'], capture_output=True, text=True,
                             timeout=120, cwd=PROJECT_ROOT).stdout
  assert '--model-dir' in help_text and '--state-snapshot' in help_text and '--model_dir' not in help_text
