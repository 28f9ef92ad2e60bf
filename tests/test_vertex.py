"""The Vertex AI custom job of `kbml train --vertex`: its spec, and the fast failures before submitting.

Nothing here reaches Google Cloud: the dry run needs no credentials, and the other runs stop before uploading.
"""

import argparse
import importlib.metadata
import json
import re
import socket
import tarfile
import time

import pytest
from google.cloud import aiplatform_v1
from packaging.specifiers import SpecifierSet

from trainer import vertex

# Trainer and Vertex AI arguments mixed, both spellings of options with values.
ARGV = ['--train-start', '2018-07-25', '--vertex', '--project', 'my-project', '--region=europe-west4',
        '--staging-bucket', 'gs://my-bucket/kbml', '--train-end=2018-07-31', '--machine-type', 'g2-standard-8',
        '--accelerator-type=NVIDIA_L4', '--accelerator-count', '2', '--dry-run', '--epochs', '20',
        '--display-name', 'kbml-test']
TRAINER_ARGS = ['--train-start', '2018-07-25', '--train-end=2018-07-31', '--epochs', '20']
PREBUILT = ['--container-image', 'europe-docker.pkg.dev/vertex-ai/training/tf-gpu.2-17.py310:latest']
# Everything a submission needs but credentials; a custom image, which needs no Python check and no build.
SUBMIT = ['--vertex', '--project', 'p', '--staging-bucket', 'gs://b', '--container-image',
          'us-docker.pkg.dev/my-project/images/trainer:latest']


def parse(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--train-start')
  parser.add_argument('--train-end')
  parser.add_argument('--epochs', type=int)
  vertex.add_vertex_arguments(parser)
  return parser.parse_args(argv)


def worker_pool(spec):
  (pool,) = spec['job_spec']['worker_pool_specs']
  return pool


def test_trainer_arguments_drop_the_vertex_options():
  assert vertex.trainer_arguments(ARGV) == TRAINER_ARGS
  assert vertex.trainer_arguments(['--epochs', '3', '--', '--vertex']) == ['--epochs', '3', '--', '--vertex']


def test_spec_has_the_machine_the_training_container_and_only_the_trainer_args():
  args = parse(ARGV)
  assert (args.vertex, args.dry_run, args.epochs) == (True, True, 20)
  spec = vertex.custom_job_spec(args, vertex.trainer_arguments(ARGV))
  pool = worker_pool(spec)
  assert pool['machine_spec'] == {'machine_type': 'g2-standard-8', 'accelerator_type': 'NVIDIA_L4',
                                  'accelerator_count': 2}
  assert pool['replica_count'] == 1
  assert pool['container_spec'] == {
      'image_uri': f'europe-west4-docker.pkg.dev/my-project/kbml/trainer:{vertex.sources_digest()}',
      'args': TRAINER_ARGS}
  assert 'python_package_spec' not in pool
  assert spec['display_name'] == 'kbml-test'
  assert spec['job_spec']['base_output_directory'] == {'output_uri_prefix': 'gs://my-bucket/kbml/kbml-test'}


def test_a_prebuilt_image_installs_the_uploaded_package_and_runs_the_module():
  spec = vertex.custom_job_spec(parse(ARGV + PREBUILT), vertex.trainer_arguments(ARGV))
  package = worker_pool(spec)['python_package_spec']
  assert package['executor_image_uri'] == 'europe-docker.pkg.dev/vertex-ai/training/tf-gpu.2-17.py310:latest'
  assert package['python_module'] == 'trainer.task'
  assert package['args'] == TRAINER_ARGS
  (package_uri,) = package['package_uris']
  assert re.fullmatch(r'gs://my-bucket/kbml/packages/kbml-test/kafka_beam_ml-[\w.]+\.tar\.gz', package_uri)


def test_defaults_are_one_t4_on_n1_standard_8_and_vertex_options_never_reach_the_job(monkeypatch):
  monkeypatch.delenv('GOOGLE_CLOUD_PROJECT', raising=False)  # the default project, which the image names
  spec = vertex.custom_job_spec(parse(['--vertex']), ['--epochs', '1', '--vertex', '--dry-run', '--region', 'x'])
  pool = worker_pool(spec)
  assert pool['machine_spec'] == {'machine_type': 'n1-standard-8', 'accelerator_type': 'NVIDIA_TESLA_T4',
                                  'accelerator_count': 1}
  assert pool['container_spec'] == {
      'image_uri': f'us-central1-docker.pkg.dev/PROJECT/kbml/trainer:{vertex.sources_digest()}',
      'args': ['--epochs', '1']}
  assert re.fullmatch(r'kbml-train-\d{8}-\d{6}', spec['display_name'])


@pytest.mark.parametrize('cpu', ['none', 'ACCELERATOR_TYPE_UNSPECIFIED'])
def test_cpu_only_has_no_accelerator(cpu):
  spec = vertex.custom_job_spec(parse(['--vertex', '--accelerator-type', cpu, '--accelerator-count', '4']), [])
  pool = worker_pool(spec)
  assert pool['machine_spec'] == {'machine_type': 'n1-standard-8'}
  machine = aiplatform_v1.CustomJob(spec).job_spec.worker_pool_specs[0].machine_spec
  assert machine.accelerator_type == aiplatform_v1.AcceleratorType.ACCELERATOR_TYPE_UNSPECIFIED
  assert machine.accelerator_count == 0


@pytest.mark.parametrize('argv, message', [
    (['--accelerator-type', 'NVIDIA_TESLA_T5'], 'unknown --accelerator-type NVIDIA_TESLA_T5: use none or one of'),
    (['--accelerator-count', '0'], '--accelerator-count must be at least 1'),
    (['--staging-bucket', 'my-bucket'], '--staging-bucket must be a gs:// URI'),
    (['--package-uri', '/tmp/trainer.tar.gz'], '--package-uri must be a gs:// URI'),
])
def test_bad_settings_fail_before_anything_runs(argv, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    vertex.custom_job_spec(parse(['--vertex', *argv]), [])


def test_dry_run_prints_json_that_parses_into_a_custom_job(capsys, no_credentials):
  args = parse(ARGV + ['--service-account', 'trainer@my-project.iam.gserviceaccount.com'])
  assert vertex.run_vertex(args, vertex.trainer_arguments(ARGV)) == 0
  out, err = capsys.readouterr()
  job = aiplatform_v1.CustomJob.from_json(out)  # strict: an unknown field fails
  assert job == aiplatform_v1.CustomJob(vertex.custom_job_spec(args, TRAINER_ARGS))
  assert json.loads(out)['display_name'] == 'kbml-test'
  assert list(job.job_spec.worker_pool_specs[0].container_spec.args) == TRAINER_ARGS
  assert job.job_spec.service_account == 'trainer@my-project.iam.gserviceaccount.com'
  assert 'nothing was submitted' in err and f'Python {vertex.dockerfile_python()}' in err


def test_the_training_container_has_the_python_the_package_requires_and_runs_the_trainer():
  requires = importlib.metadata.metadata(vertex.DIST_NAME)['Requires-Python']
  assert SpecifierSet(requires).contains(vertex.dockerfile_python()), (vertex.dockerfile_python(), requires)
  assert 'ENTRYPOINT ["python", "-m", "trainer.task"]' in vertex.DOCKERFILE.read_text()


def test_the_build_context_holds_what_the_dockerfile_copies(tmp_path):
  names = vertex.write_build_context(str(tmp_path))
  (copied,) = re.findall(r'^COPY (.+) \./$', vertex.DOCKERFILE.read_text(), re.MULTILINE)
  assert set(copied.split()) <= set(names) and 'Dockerfile' in names
  assert any(name.endswith('/trainer/task.py') for name in tarfile.open(tmp_path / 'kafka_beam_ml.tar.gz').getnames())


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
  """No key file, no gcloud credentials, not on Google Cloud."""
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.setenv('CLOUDSDK_CONFIG', str(tmp_path / 'gcloud'))
  for name in ('GOOGLE_APPLICATION_CREDENTIALS', 'NO_GCE_CHECK', 'K_SERVICE', 'CLOUD_RUN_JOB'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(vertex, '_GCE_PRODUCT_FILE', str(tmp_path / 'product_name'))


@pytest.fixture
def silent_metadata_server(monkeypatch):
  """A metadata address that takes connections and never answers: google.auth.default() waits 12 s on it."""
  with socket.create_server(('127.0.0.1', 0), backlog=16) as server:
    address = f'127.0.0.1:{server.getsockname()[1]}'
    monkeypatch.setenv('GCE_METADATA_HOST', address)
    monkeypatch.setenv('GCE_METADATA_IP', address)
    yield


def submit(argv):
  started = time.monotonic()
  with pytest.raises(ValueError) as raised:
    vertex.run_vertex(parse(argv), [])
  return str(raised.value), time.monotonic() - started


def test_no_credentials_fails_fast_saying_what_to_do(no_credentials, silent_metadata_server):
  message, seconds = submit(SUBMIT)
  assert 'gcloud auth application-default login' in message and 'GOOGLE_APPLICATION_CREDENTIALS' in message
  assert '\n' not in message
  assert seconds < 5


def test_a_missing_key_file_is_named(no_credentials, monkeypatch, tmp_path):
  monkeypatch.setenv('GOOGLE_APPLICATION_CREDENTIALS', str(tmp_path / 'missing.json'))
  message, seconds = submit(SUBMIT)
  assert str(tmp_path / 'missing.json') in message and 'gcloud auth application-default login' in message
  assert seconds < 5


def test_submitting_needs_a_project_and_a_staging_bucket(no_credentials, monkeypatch):
  monkeypatch.delenv('GOOGLE_CLOUD_PROJECT', raising=False)
  assert 'pass --project or set GOOGLE_CLOUD_PROJECT' in submit(['--vertex', '--staging-bucket', 'gs://b'])[0]
  monkeypatch.setenv('GOOGLE_CLOUD_PROJECT', 'from-env')
  assert 'needs --staging-bucket gs://BUCKET' in submit(['--vertex'])[0]


def test_an_image_without_the_packages_python_is_refused(no_credentials):
  requires = importlib.metadata.metadata(vertex.DIST_NAME)['Requires-Python']
  message, _ = submit(['--vertex', '--project', 'p', '--staging-bucket', 'gs://b', *PREBUILT])
  assert f'has Python 3.10 but kafka-beam-ml requires Python {requires}' in message
  assert vertex.python_mismatch('us-docker.pkg.dev/vertex-ai/training/pytorch-gpu.2-4.py311:latest') is None


def test_the_built_package_is_the_one_the_spec_names(tmp_path):
  sdist = vertex.build_sdist(str(tmp_path))
  package = worker_pool(vertex.custom_job_spec(parse(ARGV + PREBUILT), []))['python_package_spec']
  (package_uri,) = package['package_uris']
  assert package_uri.endswith('/' + sdist.rsplit('/', 1)[1])
  names = tarfile.open(sdist).getnames()
  assert any(name.endswith('/trainer/vertex.py') for name in names)
  assert any(name.endswith('/PKG-INFO') for name in names)
