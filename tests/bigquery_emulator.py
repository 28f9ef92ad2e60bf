"""The BigQuery emulator (local-bigquery) for the tests, and Beam's BigQuery IO pointed at it.

`make test` installs the emulator in its own virtual environment
(tests/install_bigquery_emulator.sh). Beam 2.77 has no endpoint option for
BigQuery, so :func:`redirect_beam_bigquery` points the clients that Beam
builds internally at the emulator, in this process (the pinned local runner
runs pipelines in-process).
"""

import contextlib
import json
import os
import subprocess
import time
import types
import urllib.request

import grpc

from kbml.bigquery import EMULATOR_HOST_ENV, STORAGE_EMULATOR_HOST_ENV
from kbml.local_stack import free_port

EMULATOR_VENV = os.environ.get('KBML_BIGQUERY_EMULATOR_VENV', os.path.join(os.path.dirname(__file__), '..',
                                                                              '.venv-bigquery'))
EMULATOR_EXECUTABLE = os.path.join(EMULATOR_VENV, 'bin', 'local-bigquery')
PROJECT = 'local'


@contextlib.contextmanager
def local_bigquery(data_dir: str, timeout_s: float = 60):
  """Runs `local-bigquery serve` on free loopback ports; yields (REST URL, gRPC host:port)."""
  port, grpc_port = free_port(), free_port()
  rest_url, grpc_address = f'http://127.0.0.1:{port}', f'127.0.0.1:{grpc_port}'
  with open(os.path.join(data_dir, 'emulator.log'), 'w+') as log:
    emulator = subprocess.Popen(
        [EMULATOR_EXECUTABLE, 'serve', '--host', '127.0.0.1', '--port', str(port), '--grpc-port', str(grpc_port),
         '--data-dir', os.path.join(data_dir, 'data'), '--project', PROJECT],
        env={**os.environ, 'HOME': os.path.join(EMULATOR_VENV, 'duckdb-home')}, stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + timeout_s
      while True:
        if emulator.poll() is not None or time.monotonic() > deadline:
          log.seek(0)
          raise RuntimeError(f'The BigQuery emulator did not start:\n{log.read()[-3000:]}')
        try:
          with urllib.request.urlopen(f'{rest_url}/bigquery/v2/projects/{PROJECT}/datasets', timeout=1):
            break
        except OSError:
          time.sleep(0.1)
      with grpc.insecure_channel(grpc_address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
      yield rest_url, grpc_address
    finally:
      emulator.terminate()
      try:
        emulator.wait(10)
      except subprocess.TimeoutExpired:
        emulator.kill()


def redirect_beam_bigquery(rest_url: str, grpc_address: str, credentials_dir: str):
  """Points every BigQuery client of this process, Beam's included, at the emulator.

  - Credentials: a static-token ``authorized_user`` file as Application
    Default Credentials (without any, Beam's auth falls back to an
    interactive login and hangs); the emulator ignores the token.
  - google-cloud-bigquery clients (Beam's streaming inserts, kbml.bigquery):
    ``BIGQUERY_EMULATOR_HOST``, the library's own variable.
  - Beam's apitools client (tables, load and query jobs) is built without a
    URL and falls back to ``BigqueryV2.BASE_URL``: that class attribute.
  - Beam's Storage Read clients (``DIRECT_READ``) are built without
    arguments and speak TLS: the ``bq_storage`` module that Beam's
    bigquery.py sees is replaced by one whose client uses a plain-text
    channel to the emulator (the real module is untouched).

  Returns:
    A function that undoes all of it.
  """
  from apache_beam.io.gcp import bigquery as beam_bigquery
  from apache_beam.io.gcp.internal.clients.bigquery import BigqueryV2
  from google.cloud import bigquery_storage_v1

  from kbml.bigquery import bigquery_storage_client

  credentials = os.path.join(credentials_dir, 'emulator-adc.json')
  with open(credentials, 'w', encoding='utf-8') as f:
    json.dump({'type': 'authorized_user', 'client_id': 'emulator', 'client_secret': 'emulator',
               'refresh_token': 'emulator', 'token': 'emulator', 'expiry': '2999-01-01T00:00:00Z'}, f)
  environment = {'GOOGLE_APPLICATION_CREDENTIALS': credentials, 'GOOGLE_CLOUD_PROJECT': PROJECT,
                 EMULATOR_HOST_ENV: rest_url, STORAGE_EMULATOR_HOST_ENV: grpc_address}
  saved_environment = {name: os.environ.get(name) for name in environment}
  os.environ.update(environment)

  saved_base_url = BigqueryV2.BASE_URL
  BigqueryV2.BASE_URL = f'{rest_url}/bigquery/v2/'

  storage = types.ModuleType(bigquery_storage_v1.__name__)
  storage.__dict__.update(vars(bigquery_storage_v1))
  storage.BigQueryReadClient = lambda *args, **kwargs: bigquery_storage_client()
  saved_storage = beam_bigquery.bq_storage
  beam_bigquery.bq_storage = storage

  def undo():
    beam_bigquery.bq_storage = saved_storage
    BigqueryV2.BASE_URL = saved_base_url
    for name, value in saved_environment.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value

  return undo
