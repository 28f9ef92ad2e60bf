"""Kafka client settings: the command-line forms, the environment, redaction."""

import pytest

from kbml.kafka_config import KafkaConfigError, kafka_client_config, redact
from pipelines.options import kafka_config, pipeline_options
from transforms.kafka_io import KAFKA_IO_JAVA, ReadFromKafka, read_from_kafka, write_to_kafka


def test_pairs_and_properties_file_pass_through_with_later_sources_winning(tmp_path):
  properties = tmp_path / 'client.properties'
  properties.write_text('# SASL over TLS\nsecurity.protocol=SASL_SSL\nsasl.mechanism = PLAIN\n'
                        'bootstrap.servers=file:9092\n\nsasl.username=alice\n')
  config = kafka_client_config('cli:9092', ['sasl.username=bob', 'client.id=kbml'], str(properties))
  assert config == {'security.protocol': 'SASL_SSL', 'sasl.mechanism': 'PLAIN', 'bootstrap.servers': 'cli:9092',
                    'sasl.username': 'bob', 'client.id': 'kbml'}


def test_secrets_come_from_the_environment_and_are_redacted(monkeypatch):
  monkeypatch.setenv('KAFKA_PASSWORD', 's3cret')
  config = kafka_client_config('b:9092', ['sasl.password=${KAFKA_PASSWORD}', 'sasl.username=alice'])
  assert config['sasl.password'] == 's3cret'
  assert redact(config) == {'sasl.password': '***', 'sasl.username': 'alice', 'bootstrap.servers': 'b:9092'}


@pytest.mark.parametrize('pairs, properties, message', [
    (['sasl.password=${NOT_SET_ANYWHERE}'], None, 'environment variable NOT_SET_ANYWHERE is not set'),
    (['no-equals-sign'], None, "expected key=value, got 'no-equals-sign'"),
    ([], '/nonexistent/client.properties', "Cannot read Kafka properties file '/nonexistent/client.properties'"),
])
def test_bad_settings_are_refused_with_the_reason(pairs, properties, message):
  with pytest.raises(KafkaConfigError, match=message):
    kafka_client_config('b:9092', pairs, properties)


def test_missing_bootstrap_servers_says_how_to_get_one(monkeypatch, tmp_path):
  monkeypatch.setenv('KBML_STATE_DIR', str(tmp_path))  # no local broker there
  with pytest.raises(KafkaConfigError, match='kbml local up'):
    kafka_config(pipeline_options([]))


def test_pipeline_options_read_beams_bootstrap_servers_and_the_local_broker(monkeypatch, local_stack):
  assert kafka_config(pipeline_options(['--bootstrap_servers=b:1', '--kafka_config=acks=all'])) == {
      'bootstrap.servers': 'b:1', 'acks': 'all'}
  monkeypatch.setenv('KBML_STATE_DIR', local_stack.state_dir)
  assert kafka_config(pipeline_options([]))['bootstrap.servers'] == local_stack.bootstrap_servers()


def test_java_kafka_io_is_selectable():
  from apache_beam.io import kafka
  read = read_from_kafka(KAFKA_IO_JAVA, {'bootstrap.servers': 'b:9092'}, ['t'], expansion_service='localhost:8097',
                         max_records_per_partition=10)
  assert isinstance(read._read, kafka.ReadFromKafka)
  assert isinstance(write_to_kafka(KAFKA_IO_JAVA, {'bootstrap.servers': 'b:9092'}, 't')._write, kafka.WriteToKafka)
  assert isinstance(read_from_kafka('python', {'bootstrap.servers': 'b:9092'}, ['t']), ReadFromKafka)
  with pytest.raises(ValueError, match='cannot stop at the end offsets'):
    read_from_kafka(KAFKA_IO_JAVA, {'bootstrap.servers': 'b:9092'}, ['t'], stop_at_end=True)
