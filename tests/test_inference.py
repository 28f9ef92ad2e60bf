"""ModelStoreHandler as a multi-threaded worker runs it: real Keras models, a real store, alerts on a real broker.

Beam gives each DoFn instance of a worker (one per thread) its own copy of
the handler, and all of them the one model that ``load_model`` returned
(RunInference's shared model). The tests do the same: copies of a pickled
handler, scoring with one loaded model from several threads.
"""

import json
import logging
import pickle
import threading
import time
from collections import Counter

from kbml.alerts import MODEL_REFUSED, AlertSink
from tests.conftest import consume
from tests.scoring_models import publish_model
from trainer.registry import ModelStore
from transforms.inference import ModelStoreHandler
from use_cases.fraud.features import FEATURE_NAMES

THREADS = 6
ROWS = [{name: float(i + j) / 10 for j, name in enumerate(FEATURE_NAMES)} for i in range(8)]


def _corrupt(store: ModelStore, version: str):
  """Truncates a published version's model file: its metadata no longer matches it."""
  path = store.model_path(version)
  with open(path, 'rb') as f:
    complete = f.read()
  with open(path, 'wb') as f:
    f.write(complete[:len(complete) // 2])


class ScoringThreads:
  """Threads scoring with their own copy of a handler and one shared model, recording the versions they used."""

  def __init__(self, handler: ModelStoreHandler, threads: int):
    copies = [pickle.loads(pickle.dumps(handler)) for _ in range(threads)]
    self.model = copies[0].load_model()  # RunInference's shared model: loaded once, by one of them
    self.versions_used = [set() for _ in copies]
    self.errors = []
    self._stop = threading.Event()
    self._threads = [threading.Thread(target=self._score, args=(copy, used), daemon=True)
                     for copy, used in zip(copies, self.versions_used, strict=True)]
    for thread in self._threads:
      thread.start()

  def _score(self, handler: ModelStoreHandler, used: set):
    try:
      while not self._stop.is_set():
        used.update(result.model_id for result in handler.run_inference(ROWS, self.model))
    except Exception as e:  # noqa: BLE001 - reported by the test
      self.errors.append(e)

  def wait_until_all_used(self, version: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not all(version in used for used in self.versions_used) and time.monotonic() < deadline:
      time.sleep(0.05)
    return all(version in used for used in self.versions_used)

  def stop(self):
    self._stop.set()
    for thread in self._threads:
      thread.join(30)


def test_threads_of_a_worker_load_each_version_once_and_refuse_a_corrupt_one_once(bootstrap, new_topic, tmp_path,
                                                                                    caplog):
  caplog.set_level(logging.INFO, logger='transforms.inference')
  model_dir = str(tmp_path / 'models')
  first = publish_model(model_dir, seed=0)
  corrupt, sound = (publish_model(model_dir, seed=seed, promote=False) for seed in (1, 2))
  store = ModelStore(model_dir)
  _corrupt(store, corrupt)
  topic = new_topic(partitions=1)
  handler = ModelStoreHandler(model_dir, poll_s=0.0, alerts=AlertSink({'bootstrap.servers': bootstrap}, topic))
  scorers = ScoringThreads(handler, THREADS)
  try:
    assert scorers.wait_until_all_used(first, 30)
    store.promote(corrupt)
    assert consume(bootstrap, topic, 1), 'no refusal'
    store.promote(sound)
    assert scorers.wait_until_all_used(sound, 30), scorers.versions_used
  finally:
    scorers.stop()

  assert scorers.errors == []
  refusals = consume(bootstrap, topic, THREADS, timeout_s=3)
  assert [(alert['kind'], alert['version'], alert['version_in_service'])
          for alert in (json.loads(message.value()) for message in refusals)] == [(MODEL_REFUSED, corrupt, first)]
  loads = Counter(record.args[0] for record in caplog.records if record.msg.startswith('model version %s loaded'))
  assert loads == {first: 1, sound: 1}
  # The threads swapped together, to one loaded model, without a batch scored by the corrupt version.
  assert all(used == {first, sound} for used in scorers.versions_used)


def test_a_slow_challenger_loads_while_the_champion_goes_on_scoring(tmp_path):
  model_dir = str(tmp_path / 'models')
  publish_model(model_dir, seed=0)
  # Wide layers in an ensemble: a model that takes a good half second to check and load.
  challenger = publish_model(model_dir, seed=1, promote=False, hidden_units=(1024, 1024), ensemble=4)
  store = ModelStore(model_dir)
  started = time.monotonic()
  store.load_model(challenger)
  load_s = time.monotonic() - started
  handler = ModelStoreHandler(model_dir, shadow_poll_s=0.0)
  model = handler.load_model()
  list(handler.run_inference(ROWS, model))  # the champion's first batch prepares its predict function

  store.set_challenger(challenger)
  without_challenger, deadline = 0, time.monotonic() + 60
  while True:
    results = handler.run_inference(ROWS, model)
    if results[0].inference.challenger is not None:
      break
    without_challenger += 1
    assert time.monotonic() < deadline, 'the challenger never scored'

  assert {result.inference.challenger.version for result in results} == {challenger}
  # Loaded in the scoring thread, the first batch after the pointer moved would wait for the load and come back
  # with the challenger's scores; loaded in the background, the champion went on scoring meanwhile.
  assert without_challenger >= 1, f'no batch was scored while the challenger loaded ({load_s:.2f} s)'

