"""The long-running pipelines against a broker that stops and starts again under live traffic.

Apache Kafka keeps its data across the restart: the streaming scorer, ingest
and monitor ride through it with no manual restart, and every transaction
produced before, during (buffered by the producer) and after gets its
prediction, its warehouse row and its metrics; the retrain listener hears a
drift alert raised after it. Tansu keeps its data in
memory: after its restart the pipelines stop with a clear error instead of
waiting for offsets that will never come.
"""

import json
import threading
import time

import pytest

from kbml import simulator
from kbml.alerts import DRIFT, AlertSink
from kbml.kafka_client import group_lag
from kbml.local_stack import APACHE_KAFKA, TANSU, LocalStack
from kbml.warehouse import open_warehouse
from tests.pipeline_process import PipelineProcess
from tests.scoring_models import publish_model
from tests.test_scoring import TopicReader
from transforms.metrics import read_sums, summaries
from use_cases.fraud import simulator as fraud_simulator
from use_cases.fraud.simulator import SimulationConfig, simulate

TOPICS = ('transactions', 'labels', 'predictions', 'dead-letter', 'alerts')
# The retrain listener's own alerts topic: only the alert the test raises, none of the monitor's.
RETRAIN_ALERTS = 'retrain-alerts'
OUTAGE_S = 10
LIVE_S = 40  # the live events are produced over this long: before, during and after the outage


def _pipelines(bootstrap: str, tmp_path) -> dict:
  topics = [f'--{name.replace("-", "_")}_topic={name}' for name in TOPICS]
  common = ['--bootstrap_servers', bootstrap, *topics]
  model_dir = str(tmp_path / 'models')
  return {
      'scorer': PipelineProcess('pipelines.scoring', [
          *common, '--model_dir', model_dir, '--consumer_group', 'scorer', '--score_from', 'earliest'],
          str(tmp_path / 'scorer.log')),
      'ingest': PipelineProcess('pipelines.ingest', [
          *common, '--warehouse', f'duckdb://{tmp_path}/ingest.duckdb', '--consumer_group', 'ingest'],
          str(tmp_path / 'ingest.log')),
      'monitor': PipelineProcess('pipelines.monitoring', [
          *common, '--model_dir', model_dir, '--warehouse', f'duckdb://{tmp_path}/monitor.duckdb',
          '--consumer_group', 'monitor', '--scorer_group', 'scorer'], str(tmp_path / 'monitor.log')),
      'retrain': PipelineProcess('trainer.retrain', [
          '--on-drift', '--bootstrap-servers', bootstrap, '--alerts-topic', RETRAIN_ALERTS, '--consumer-group',
          'retrain', '--model-dir', model_dir, '--warehouse', f'duckdb://{tmp_path}/retrain.duckdb'],
          str(tmp_path / 'retrain.log')),
  }


def _wait_until(condition, timeout_s: float, pipelines: dict, what: str):
  deadline = time.monotonic() + timeout_s
  while not condition():
    for name, pipeline in pipelines.items():
      assert pipeline.running(), f'the {name} stopped:\n{pipeline.log_tail()}'
    assert time.monotonic() < deadline, f'{what} within {timeout_s} s:\n' + '\n'.join(
        f'--- {name}\n{pipeline.log_tail()}' for name, pipeline in pipelines.items())
    time.sleep(1)


@pytest.mark.timeout(600)
def test_the_pipelines_ride_through_a_restart_of_apache_kafka(tmp_path):
  stack = LocalStack(str(tmp_path / 'stack'), topics=(*TOPICS, RETRAIN_ALERTS), broker=APACHE_KAFKA)
  bootstrap = stack.up(port=0, timeout_s=30)
  port = int(bootstrap.rsplit(':', 1)[1])
  config = {'bootstrap.servers': bootstrap}
  simulation = simulate(SimulationConfig(customers=150, terminals=300, days=16, seed=4))
  events = list(fraud_simulator.events(simulation))
  split_ms = int(simulation.config.start.timestamp() * 1000) + 10 * 86_400_000
  history, live = [e for e in events if e.timestamp_ms < split_ms], [e for e in events if e.timestamp_ms >= split_ms]
  publish_model(str(tmp_path / 'models'), seed=1)
  simulator.produce(history, config, 'transactions', 'labels')
  pipelines = _pipelines(bootstrap, tmp_path)
  try:
    for pipeline in pipelines.values():
      pipeline.start()
    _wait_until(lambda: group_lag(config, 'scorer', ['transactions']) == 0, 240, pipelines, 'the scorer caught up')
    _wait_until(lambda: 'listening for' in pipelines['retrain'].log_tail(), 60, pipelines, 'the retrain listens')
    producing = threading.Thread(target=simulator.produce,
                                 args=(live, config, 'transactions', 'labels', len(live) / LIVE_S))
    producing.start()
    time.sleep(LIVE_S / 4)
    assert stack.down(grace_s=20)
    time.sleep(OUTAGE_S)
    assert stack.up(port=port, timeout_s=30) == bootstrap
    producing.join()
    AlertSink(config, RETRAIN_ALERTS).send(DRIFT, 'raised after the restart', window_start='2018-04-10T00:00:00+00:00')
    _wait_until(lambda: 'a retrain is due once the warehouse has labels through' in pipelines['retrain'].log_tail(),
                90, pipelines, 'the retrain listener heard the drift alert')
    expected = {json.loads(e.value)['transaction_id'] for e in events if not e.is_label}
    predictions = TopicReader(bootstrap, 'predictions')
    _wait_until(lambda: predictions.read_until(lambda r: expected <= {p['transaction_id'] for p in r}, 1), 300,
                pipelines, 'every transaction scored')
    for group, topics in (('ingest', ['transactions', 'labels']), ('monitor', ['predictions', 'labels'])):
      _wait_until(lambda group=group, topics=topics: group_lag(config, group, topics) == 0, 180, pipelines,
                  f'the {group} caught up')
  finally:
    for pipeline in pipelines.values():
      if pipeline.running():
        pipeline.kill()
    stack.down(grace_s=0)

  rows = open_warehouse(f'duckdb://{tmp_path}/ingest.duckdb').query('SELECT transaction_id FROM features')
  assert set(rows['transaction_id']) == expected and len(rows) == len(expected)
  windows = summaries(read_sums(open_warehouse(f'duckdb://{tmp_path}/monitor.duckdb')))
  assert windows['predictions'].sum() == len(expected)


@pytest.mark.timeout(300)
def test_after_tansu_loses_its_data_the_scorer_stops_with_a_clear_error(tmp_path):
  stack = LocalStack(str(tmp_path / 'stack'), topics=TOPICS, broker=TANSU)
  bootstrap = stack.up(port=0)
  port = int(bootstrap.rsplit(':', 1)[1])
  config = {'bootstrap.servers': bootstrap}
  simulation = simulate(SimulationConfig(customers=100, terminals=200, days=8, seed=4))
  publish_model(str(tmp_path / 'models'), seed=1)
  simulator.produce(fraud_simulator.events(simulation), config, 'transactions', 'labels')
  scorer = _pipelines(bootstrap, tmp_path)['scorer']
  try:
    scorer.start()
    _wait_until(lambda: group_lag(config, 'scorer', ['transactions']) == 0, 180, {'scorer': scorer},
                'the scorer caught up')
    stack.down(grace_s=0)
    stack.up(port=port)  # empty topics again: offsets start over at 0
    deadline = time.monotonic() + 90
    while scorer.running() and time.monotonic() < deadline:
      time.sleep(1)
    assert not scorer.running(), 'the scorer waits for ever on partitions that lost their records'
    assert 'PartitionLostError' in scorer.log_tail() and 'the broker lost its data' in scorer.log_tail()
  finally:
    if scorer.running():
      scorer.kill()
    stack.down(grace_s=0)
