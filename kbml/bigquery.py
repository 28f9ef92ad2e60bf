"""The one place that builds BigQuery clients.

Against Google's service the clients use Application Default Credentials. To
talk to an emulator instead, set ``BIGQUERY_EMULATOR_HOST`` to its REST URL
(google-cloud-bigquery's own variable) and, for reads through the Storage Read
API, ``KBML_BIGQUERY_STORAGE_EMULATOR_HOST`` to its gRPC ``host:port``
(plain-text gRPC, as emulators speak it).
"""

import os

EMULATOR_HOST_ENV = 'BIGQUERY_EMULATOR_HOST'
STORAGE_EMULATOR_HOST_ENV = 'KBML_BIGQUERY_STORAGE_EMULATOR_HOST'


def bigquery_client(project: str):
  """A BigQuery client for ``project``, on the emulator when one is configured."""
  from google.cloud import bigquery
  endpoint = os.environ.get(EMULATOR_HOST_ENV)
  if endpoint:
    from google.auth.credentials import AnonymousCredentials
    return bigquery.Client(project=project, credentials=AnonymousCredentials(),
                           client_options={'api_endpoint': endpoint})
  return bigquery.Client(project=project)


def bigquery_storage_client():
  """A Storage Read API client, on the emulator's plain gRPC port when one is configured."""
  from google.cloud import bigquery_storage_v1
  address = os.environ.get(STORAGE_EMULATOR_HOST_ENV)
  if address:
    import grpc
    from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport
    return bigquery_storage_v1.BigQueryReadClient(
        transport=BigQueryReadGrpcTransport(channel=grpc.insecure_channel(address)))
  return bigquery_storage_v1.BigQueryReadClient()
