"""Long-running pipelines left idle keep their memory flat.

Beam's FnApiRunner of 2.77 kept each bundle's metrics in a chain of
generators, and an idle read starts bundles back to back: an idle mirror grew
by about 8 MB/s and an idle scorer by about 19 MB/s (``bench.soak`` measures
every pipeline over longer runs).
"""

import time

import pytest

from kbml import simulator
from kbml.kafka_client import group_lag
from tests.conftest import consume
from tests.pipeline_process import PipelineProcess
from tests.scoring_models import publish_model
from tests.test_scoring import TOPICS, Scorer, TopicReader
from use_cases.fraud import simulator as fraud_simulator
from use_cases.fraud.simulator import SimulationConfig, simulate

SETTLE_S = 20  # after the first outputs, before the first measure
IDLE_S = 90
MAX_GROWTH_MB = 100


@pytest.mark.timeout(480)
def test_an_idle_mirror_and_an_idle_scorer_keep_their_memory_flat(bootstrap, new_topic, group_id, tmp_path):
  topics = {name: new_topic(suffix=f'-{name}') for name in TOPICS}
  copies_topic = new_topic(suffix='-copies')
  config = {'bootstrap.servers': bootstrap}
  simulation = simulate(SimulationConfig(customers=200, terminals=400, days=15, seed=5))
  split_ms = int(simulation.config.start.timestamp() * 1000) + 14 * 86_400_000
  events = list(fraud_simulator.events(simulation))
  history = [event for event in events if event.timestamp_ms < split_ms]
  live = [event for event in events if event.timestamp_ms >= split_ms][:300]
  simulator.produce(history, config, topics['transactions'], topics['labels'])
  model_dir = str(tmp_path / 'models')
  publish_model(model_dir)
  scorer = Scorer(bootstrap, topics, model_dir, group_id, str(tmp_path / 'scorer.log'))
  mirror = PipelineProcess('pipelines.mirror', [
      '--bootstrap_servers', bootstrap, '--input_topic', topics['transactions'], '--output_topic', copies_topic,
      '--consumer_group', f'{group_id}-mirror'], str(tmp_path / 'mirror.log'))
  pipelines = {'mirror': mirror, 'scorer': scorer}
  try:
    for pipeline in pipelines.values():
      pipeline.start()
    history_transactions = sum(not event.is_label for event in history)
    assert len(consume(bootstrap, copies_topic, history_transactions, 120)) == history_transactions, \
        mirror.log_tail()
    deadline = time.monotonic() + 180
    while group_lag(config, group_id, [topics['transactions'], topics['labels']]) != 0:
      assert time.monotonic() < deadline and scorer.running(), f'the scorer never caught up:\n{scorer.log_tail()}'
      time.sleep(1)
    simulator.produce(live, config, topics['transactions'], topics['labels'])
    assert TopicReader(bootstrap, topics['predictions']).read_until(len, 60), scorer.log_tail()

    time.sleep(SETTLE_S)
    warm = {name: pipeline.resident_mb() for name, pipeline in pipelines.items()}
    cpu = {name: pipeline.cpu_seconds() for name, pipeline in pipelines.items()}
    time.sleep(IDLE_S)
    idle = {name: pipeline.resident_mb() for name, pipeline in pipelines.items()}
    report = ', '.join(f'{name} {warm[name]:.0f} -> {idle[name]:.0f} MB, '
                       f'{100 * (pipeline.cpu_seconds() - cpu[name]) / IDLE_S:.1f}% CPU'
                       for name, pipeline in pipelines.items())
    print(f'idle for {IDLE_S} s: {report}')
    assert all(idle[name] - warm[name] < MAX_GROWTH_MB for name in pipelines), report
  finally:
    for pipeline in pipelines.values():
      if pipeline.running():
        pipeline.kill()
