"""Runs the trainer as a Vertex AI custom job: ``kbml train --vertex [Vertex AI options] [trainer args]``.

By default the job runs this project's training container (``trainer/Dockerfile``: Python 3.11, the package
and its pinned dependencies, TensorFlow with its CUDA wheels), ``python -m trainer.task`` with the trainer's
arguments, less the Vertex AI options. Its image lives in the project's Artifact Registry, tagged with a
digest of the sources it holds: a submission builds and pushes it with Cloud Build (``gcloud builds submit``)
when that tag is not there yet (``--build-image`` rebuilds it anyway). ``--dry-run`` prints the job spec as
JSON and submits nothing; it needs no project, bucket or credentials.

Why a custom container: Vertex AI runs a Python package only in one of its prebuilt training images, and no
prebuilt TensorFlow image has Python 3.11, which this package requires (``python_requires``; pandas 3 and
numpy 2.4 too): the newest, TensorFlow 2.17 with CUDA 12, has Python 3.10. ``--container-image`` naming a
prebuilt image (``.../vertex-ai/training/...``) still takes that path: the package is built from the checkout,
uploaded to the staging bucket (or ``--package-uri``) and installed in the image, and an image whose tag names
another Python (``.py310``) is refused before anything is uploaded.

Example::

    kbml train --vertex --project my-project --staging-bucket gs://my-bucket/kbml \\
        --train-start 2018-07-25 --train-end 2018-07-31 --model-dir gs://my-bucket/models
"""

import argparse
import copy
import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TRAINER_MODULE = 'trainer.task'
DIST_NAME = 'kafka-beam-ml'
# The newest prebuilt TensorFlow training images (TensorFlow 2.17, CUDA 12): the closest to our TensorFlow 2.21 and
# Keras 3 among the images Vertex AI runs a Python package in. But they have Python 3.10, which our package
# excludes: see the module docstring.
PREBUILT_IMAGE = '{host}-docker.pkg.dev/vertex-ai/training/tf-{kind}.2-17.py310:latest'
PREBUILT_IMAGES = '-docker.pkg.dev/vertex-ai/training/'
# This project's training container, in the job's project and region; SOURCES is a digest of what it holds.
TRAINING_IMAGE = '{region}-docker.pkg.dev/{project}/kbml/trainer:{sources}'
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = PROJECT_ROOT / 'trainer' / 'Dockerfile'
# What the training container's image is built from, beside the Dockerfile: a change to any of them is a new tag.
IMAGE_SOURCES = ('setup.py', 'constraints.txt', 'kbml', 'pipelines', 'transforms', 'trainer')
NO_ACCELERATOR = ('NONE', 'ACCELERATOR_TYPE_UNSPECIFIED')
STAGING_PLACEHOLDER = 'gs://STAGING_BUCKET'
NO_CREDENTIALS = ('no Google Cloud credentials found: run `gcloud auth application-default login`, or set '
                  'GOOGLE_APPLICATION_CREDENTIALS to a service account key file (--dry-run needs neither)')
_GCE_PRODUCT_FILE = '/sys/class/dmi/id/product_name'


def add_vertex_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the "Vertex AI" argument group: ``--vertex``, ``--dry-run`` and the job's settings."""
  group = parser.add_argument_group('Vertex AI', 'Run the training as a Vertex AI custom job; the other arguments '
                                    'go to the trainer in the job.')
  group.add_argument('--vertex', action='store_true', help='Run as a Vertex AI custom job instead of locally.')
  group.add_argument('--dry-run', action='store_true', help='With --vertex: print the job spec (JSON), submit nothing.')
  group.add_argument('--project', default=os.environ.get('GOOGLE_CLOUD_PROJECT'),
                     help='Google Cloud project of the job (default: $GOOGLE_CLOUD_PROJECT).')
  group.add_argument('--region', default='us-central1', help='Vertex AI region (default: %(default)s).')
  group.add_argument('--staging-bucket', help='gs://BUCKET[/PREFIX] for the trainer package and the job outputs '
                     '(required to submit).')
  group.add_argument('--machine-type', default='n1-standard-8', help='Machine of the job (default: %(default)s).')
  group.add_argument('--accelerator-type', default='NVIDIA_TESLA_T4',
                     help='GPU, as Vertex AI names it (NVIDIA_L4, NVIDIA_TESLA_A100, ...), or "none" for CPU only '
                     '(default: %(default)s).')
  group.add_argument('--accelerator-count', type=int, default=1, help='GPUs per machine (default: %(default)s).')
  group.add_argument('--container-image',
                     help='The job\'s image (default: this project\'s training container, trainer/Dockerfile, '
                     + TRAINING_IMAGE.format(region='REGION', project='PROJECT', sources='SOURCES_DIGEST')
                     + ', built with Cloud Build when missing). A prebuilt Vertex AI training image '
                     '(' + PREBUILT_IMAGE.format(host='us', kind='gpu') + ', say) installs the trainer package '
                     'instead; one without Python 3.11 is refused.')
  group.add_argument('--build-image', action='store_true',
                     help='Build and push the training container even if its tag exists (Cloud Build).')
  group.add_argument('--package-uri', help='With a prebuilt image: gs:// URI of the trainer\'s source distribution '
                     '(default: built from this checkout and uploaded to STAGING_BUCKET/packages/DISPLAY_NAME/).')
  group.add_argument('--service-account', help='Service account the job runs as (default: Vertex AI\'s).')
  group.add_argument('--display-name', default=datetime.datetime.now(datetime.UTC).strftime('kbml-train-%Y%m%d-%H%M%S'),
                     help='Name of the job (default: kbml-train-YYYYmmdd-HHMMSS, UTC).')


def trainer_arguments(argv: list[str]) -> list[str]:
  """Returns ``argv`` (the trainer's command line) without the Vertex AI options and their values.

  The options must be spelled in full (``--staging-bucket``, not an abbreviation), as ``--option value`` or
  ``--option=value``.
  """
  parser = argparse.ArgumentParser(add_help=False)
  add_vertex_arguments(parser)
  takes_value = {option: action.nargs != 0 for action in parser._actions for option in action.option_strings}
  kept, skip = [], False
  for i, arg in enumerate(argv):
    if skip:
      skip = False
    elif arg == '--':
      return kept + argv[i:]
    elif arg.split('=', 1)[0] in takes_value:
      skip = takes_value[arg.split('=', 1)[0]] and '=' not in arg
    else:
      kept.append(arg)
  return kept


def _accelerator(name: str) -> str | None:
  """The Vertex AI accelerator type named (case-insensitively) by ``name``; None for CPU only."""
  from google.cloud.aiplatform_v1 import AcceleratorType
  name = (name or 'none').upper()
  if name in NO_ACCELERATOR:
    return None
  if name not in AcceleratorType.__members__:
    names = ', '.join(n for n in AcceleratorType.__members__ if n not in NO_ACCELERATOR)
    raise ValueError(f'unknown --accelerator-type {name}: use none or one of {names}')
  return name


def _sdist_name() -> str:
  try:
    version = importlib.metadata.version(DIST_NAME)
  except importlib.metadata.PackageNotFoundError:
    version = 'VERSION'
  return f'{DIST_NAME.replace("-", "_")}-{version}.tar.gz'


def sources_digest() -> str:
  """A digest of what the training container holds (IMAGE_SOURCES and the Dockerfile): its image's tag."""
  digest = hashlib.sha256()
  paths = [DOCKERFILE]
  for name in IMAGE_SOURCES:
    path = PROJECT_ROOT / name
    paths.extend(sorted(path.rglob('*.py')) if path.is_dir() else [path])
  for path in paths:
    digest.update(str(path.relative_to(PROJECT_ROOT)).encode() + b'\0' + path.read_bytes() + b'\0')
  return digest.hexdigest()[:16]


def job_image(args: argparse.Namespace) -> str:
  """The image the job runs: ``--container-image``, else this project's training container."""
  return args.container_image or TRAINING_IMAGE.format(region=args.region, project=args.project or 'PROJECT',
                                                      sources=sources_digest())


def is_prebuilt(image: str) -> bool:
  """Whether ``image`` is one of Vertex AI's prebuilt training images, which run a Python package."""
  return PREBUILT_IMAGES in image


def dockerfile_python() -> str:
  """The Python version (``3.11``) of the training container's base image."""
  match = re.search(r'^FROM python:(3\.\d+)', DOCKERFILE.read_text(), re.MULTILINE)
  if not match:
    raise ValueError(f'{DOCKERFILE} does not start from a python:3.X image')
  return match.group(1)


def custom_job_spec(args: argparse.Namespace, trainer_args: list[str]) -> dict:
  """The custom job as a plain dict in the shape of Vertex AI's ``CustomJob``, checked against its proto.

  Args:
    args: parsed arguments of a parser given ``add_vertex_arguments``.
    trainer_args: the trainer's arguments (Vertex AI options are dropped).

  Raises:
    ValueError: an unknown accelerator, a bucket or package not on gs://, or a spec the proto rejects.
  """
  from google.cloud import aiplatform_v1
  staging = (args.staging_bucket or STAGING_PLACEHOLDER).rstrip('/')
  package = args.package_uri or f'{staging}/packages/{args.display_name}/{_sdist_name()}'
  for option, uri in (('--staging-bucket', staging), ('--package-uri', package)):
    if not uri.startswith('gs://'):
      raise ValueError(f'{option} must be a gs:// URI, not {uri}')
  image = job_image(args)
  accelerator = _accelerator(args.accelerator_type)
  machine_spec = {'machine_type': args.machine_type}
  if accelerator:
    if args.accelerator_count < 1:
      raise ValueError(f'--accelerator-count must be at least 1 with {accelerator} (or use --accelerator-type none)')
    machine_spec.update(accelerator_type=accelerator, accelerator_count=args.accelerator_count)
  # Stripped again: a --vertex reaching the job would make it submit another job.
  job_args = trainer_arguments(list(trainer_args))
  if is_prebuilt(image):
    code = {'python_package_spec': {'executor_image_uri': image, 'package_uris': [package],
                                    'python_module': TRAINER_MODULE, 'args': job_args}}
  else:
    code = {'container_spec': {'image_uri': image, 'args': job_args}}
  job_spec = {
      'worker_pool_specs': [{'machine_spec': machine_spec, 'replica_count': 1, **code}],
      'base_output_directory': {'output_uri_prefix': f'{staging}/{args.display_name}'},
  }
  if args.service_account:
    job_spec['service_account'] = args.service_account
  spec = {'display_name': args.display_name, 'job_spec': job_spec}
  try:
    aiplatform_v1.CustomJob(spec)  # fails on a misspelt field or an unknown enum name
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'invalid Vertex AI job spec: {e}') from e
  return spec


def python_mismatch(image: str) -> str | None:
  """Why ``image`` cannot install this package, when its tag names a Python (``.py310``) the package excludes."""
  from packaging.specifiers import SpecifierSet
  match = re.search(r'\.(?:py|cp)3(\d+)\b', image)
  try:
    requires = importlib.metadata.metadata(DIST_NAME)['Requires-Python']
  except importlib.metadata.PackageNotFoundError:
    return None
  if not (match and requires) or SpecifierSet(requires).contains(f'3.{match.group(1)}'):
    return None
  return (f'{image} has Python 3.{match.group(1)} but {DIST_NAME} requires Python {requires}, so pip would not install '
          'it in the job: pass --container-image naming a prebuilt image with such a Python')


def _on_google_cloud() -> bool:
  """Whether a metadata server can answer here: Compute Engine (GKE nodes too) or Cloud Run."""
  if os.environ.get('NO_GCE_CHECK') == 'true':
    return False
  if os.environ.get('K_SERVICE') or os.environ.get('CLOUD_RUN_JOB'):
    return True
  try:
    return Path(_GCE_PRODUCT_FILE).read_text().startswith('Google')
  except OSError:
    return False


def check_credentials():
  """Returns the Application Default Credentials; raises ValueError at once, saying how to get some, if none.

  google.auth.default() ends by probing the Compute Engine metadata server, which off Google Cloud takes 12 s
  where the address drops packets (3 tries of 3 s, measured): it runs only where a key file, gcloud's
  credentials or a metadata server can be found.
  """
  import google.auth
  import google.auth.exceptions
  from google.auth import _cloud_sdk  # where gcloud keeps the credentials, CLOUDSDK_CONFIG included
  key_file = os.environ.get('GOOGLE_APPLICATION_CREDENTIALS')
  if key_file and not os.path.isfile(key_file):
    raise ValueError(f'GOOGLE_APPLICATION_CREDENTIALS names {key_file}, which does not exist: point it to a service '
                     'account key file, or unset it and run `gcloud auth application-default login`')
  if not (key_file or os.path.isfile(_cloud_sdk.get_application_default_credentials_path()) or _on_google_cloud()):
    raise ValueError(NO_CREDENTIALS)
  try:
    credentials, _ = google.auth.default(scopes=['https://www.googleapis.com/auth/cloud-platform'])
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise ValueError(f'{NO_CREDENTIALS}: {" ".join(str(e).split())}') from e
  return credentials


def build_sdist(out_dir: str) -> str:
  """Builds this project's source distribution into ``out_dir``; returns its path."""
  # egg_info would otherwise write into the checkout, which may be shared.
  command = [sys.executable, 'setup.py', '-q', 'egg_info', '--egg-base', out_dir, 'sdist', '--dist-dir', out_dir]
  done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
  built = sorted(Path(out_dir).glob('*.tar.gz'))
  if done.returncode or len(built) != 1:
    raise ValueError(f'building the trainer package failed: {(done.stderr.strip().splitlines() or ["?"])[-1]}')
  # Older setuptools keep the dashes of the name; the spec names the package as PEP 625 does.
  return str(built[0].rename(Path(out_dir) / _sdist_name()))


def write_build_context(out_dir: str) -> list[str]:
  """Writes what ``trainer/Dockerfile`` copies into ``out_dir``: itself, the constraints and the package."""
  shutil.copy(DOCKERFILE, Path(out_dir) / 'Dockerfile')
  shutil.copy(PROJECT_ROOT / 'constraints.txt', Path(out_dir) / 'constraints.txt')
  with tempfile.TemporaryDirectory() as sdist_dir:
    shutil.move(build_sdist(sdist_dir), Path(out_dir) / 'kafka_beam_ml.tar.gz')
  return sorted(path.name for path in Path(out_dir).iterdir())


def _gcloud(*command: str) -> subprocess.CompletedProcess:
  gcloud = shutil.which('gcloud')
  if not gcloud:
    raise ValueError('building the training container needs the Google Cloud CLI (gcloud, '
                     'https://cloud.google.com/sdk/docs/install): install it, or build trainer/Dockerfile, push the '
                     'image and pass --container-image (the Dockerfile says what its context holds)')
  return subprocess.run([gcloud, *command], capture_output=True, text=True)


def build_training_image(image: str, project: str, region: str, rebuild: bool):
  """Builds and pushes the training container as ``image`` with Cloud Build, unless that tag exists already (or
  ``rebuild``); creates its Artifact Registry repository if missing."""
  if not rebuild and _gcloud('artifacts', 'docker', 'images', 'describe', image, '--project', project).returncode == 0:
    print(f'the training container {image} is there already', file=sys.stderr)
    return
  repository = image.split('/')[2]
  if _gcloud('artifacts', 'repositories', 'describe', repository, '--location', region,
             '--project', project).returncode != 0:
    created = _gcloud('artifacts', 'repositories', 'create', repository, '--repository-format', 'docker',
                      '--location', region, '--project', project)
    if created.returncode != 0:
      raise ValueError(f'could not create the Artifact Registry repository {repository} in {region}: '
                       f'{created.stderr.strip()}')
  print(f'building {image} with Cloud Build (some minutes: TensorFlow and its CUDA wheels)...', file=sys.stderr)
  with tempfile.TemporaryDirectory() as context:
    write_build_context(context)
    built = _gcloud('builds', 'submit', context, '--tag', image, '--project', project, '--region', region)
  if built.returncode != 0:
    raise ValueError(f'building {image} failed: {(built.stderr.strip().splitlines() or ["?"])[-1]}')
  print(f'built and pushed {image}', file=sys.stderr)


def run_vertex(args: argparse.Namespace, trainer_args: list[str]) -> int:
  """Prints the job spec (``--dry-run``), or makes the job's code available and submits the job without waiting.

  The code: this project's training container (built when missing, see :func:`build_training_image`), or with
  a prebuilt image, the trainer package uploaded to the staging bucket.

  Raises:
    ValueError: no project or staging bucket, an unusable spec or image, no credentials, a failed build.
  """
  spec = custom_job_spec(args, trainer_args)
  image = job_image(args)
  mismatch = python_mismatch(image) if is_prebuilt(image) else None
  if args.dry_run:
    print(json.dumps(spec, indent=2))
    if mismatch:
      print(f'warning: {mismatch}', file=sys.stderr)
    if not args.container_image:
      print(f'the training container (trainer/Dockerfile, Python {dockerfile_python()}) is built on submit if its '
            'tag is missing', file=sys.stderr)
    print(f'dry run: nothing was submitted (project {args.project or "not given"}, region {args.region})',
          file=sys.stderr)
    return 0
  if not args.project:
    raise ValueError('--vertex needs a Google Cloud project: pass --project or set GOOGLE_CLOUD_PROJECT')
  if not args.staging_bucket:
    raise ValueError('--vertex needs --staging-bucket gs://BUCKET[/PREFIX], for the trainer package and job outputs')
  if mismatch:
    raise ValueError(mismatch)
  credentials = check_credentials()
  from google.cloud import aiplatform, storage
  if not is_prebuilt(image):
    if args.build_image or not args.container_image:
      build_training_image(image, args.project, args.region, rebuild=args.build_image)
  elif not args.package_uri:
    args = copy.copy(args)
    with tempfile.TemporaryDirectory() as out_dir:
      sdist = build_sdist(out_dir)
      args.package_uri = f'{args.staging_bucket.rstrip("/")}/packages/{args.display_name}/{Path(sdist).name}'
      bucket, _, blob = args.package_uri.removeprefix('gs://').partition('/')
      client = storage.Client(project=args.project, credentials=credentials)
      client.bucket(bucket).blob(blob).upload_from_filename(sdist)
    print(f'uploaded the trainer package to {args.package_uri}', file=sys.stderr)
    spec = custom_job_spec(args, trainer_args)
  job_spec = spec['job_spec']
  job = aiplatform.CustomJob(
      display_name=spec['display_name'], worker_pool_specs=job_spec['worker_pool_specs'],
      base_output_dir=job_spec['base_output_directory']['output_uri_prefix'], project=args.project,
      location=args.region, staging_bucket=args.staging_bucket, credentials=credentials)
  job.submit(service_account=args.service_account)
  print(f'submitted {job.resource_name}')
  # The SDK's own link follows the console's renames (pinned SDK version).
  print(f'console: {job._dashboard_uri()}')
  return 0
