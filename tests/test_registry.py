"""The model store under concurrent promotions: several processes promote into one store at once."""

import json
import multiprocessing
import os

from tests.scoring_models import publish_model
from trainer.registry import ModelStore

PROMOTIONS = 200
ROUNDS = 40


def _promote_again_and_again(model_dir: str, version: str, start, times: int):
  store = ModelStore(model_dir)
  start.wait()
  for _ in range(times):
    store.promote(version)


def _promote_in_rounds(model_dir: str, version: str, in_service: str, barrier, rounds: int, promoted):
  """Promotes ``version`` once a round, as the gate does (if ``in_service`` is still in service); counts successes."""
  store = ModelStore(model_dir)
  for _ in range(rounds):
    barrier.wait()
    if store.promote_replacing(version, in_service) is not None:
      promoted.value += 1
    barrier.wait()


def _start(target, argument_lists):
  """A spawned process per argument list (spawned: the test process has TensorFlow's threads)."""
  processes = [multiprocessing.get_context('spawn').Process(target=target, args=arguments)
               for arguments in argument_lists]
  for process in processes:
    process.start()
  return processes


def _finish(processes):
  for process in processes:
    process.join(60)
    assert process.exitcode == 0


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def test_concurrent_promotions_keep_the_pointer_and_the_history_in_step(tmp_path):
  model_dir = str(tmp_path / 'models')
  versions = [publish_model(model_dir, seed=seed, promote=seed == 0) for seed in range(2)]
  store = ModelStore(model_dir)
  start = multiprocessing.get_context('spawn').Barrier(len(versions) + 1, timeout=60)
  promoters = _start(_promote_again_and_again, [(model_dir, version, start, PROMOTIONS) for version in versions])
  start.wait()

  # Each promotion is recorded, then the pointer moved. Were a promotion's pointer written after that of a
  # promotion recorded later, the pointer would go back in time and the history's last record be out of service.
  latest, back_in_time = '', 0
  while any(promoter.is_alive() for promoter in promoters):
    promoted_at = _read_json(os.path.join(model_dir, 'current'))['promoted_at']
    back_in_time += promoted_at < latest
    latest = max(latest, promoted_at)
  _finish(promoters)

  history = store.promotions()
  assert back_in_time == 0
  assert len(history) == 1 + len(versions) * PROMOTIONS, 'a promotion record was lost'
  assert _read_json(os.path.join(model_dir, 'current')) == _read_json(history[-1].path)


def test_of_promotions_gated_against_the_same_champion_only_one_goes_in_service(tmp_path):
  model_dir = str(tmp_path / 'models')
  champion = publish_model(model_dir, seed=0)
  candidates = [publish_model(model_dir, seed=seed, promote=False) for seed in (1, 2)]
  store = ModelStore(model_dir)
  context = multiprocessing.get_context('spawn')
  barrier = context.Barrier(len(candidates) + 1, timeout=60)
  counts = [context.Value('i', 0) for _ in candidates]
  promoters = _start(_promote_in_rounds, [(model_dir, candidate, champion, barrier, ROUNDS, count)
                                          for candidate, count in zip(candidates, counts, strict=True)])

  promoted_per_round, promoted_so_far = [], 0
  for _ in range(ROUNDS):
    barrier.wait()  # the candidates are promoted at once
    barrier.wait()  # both tried
    promoted = sum(count.value for count in counts)
    promoted_per_round.append(promoted - promoted_so_far)
    promoted_so_far = promoted
    store.promote(champion)  # in service again for the next round
  _finish(promoters)

  # Each round one candidate replaced the champion; the other then found a version it was not compared with.
  assert promoted_per_round == [1] * ROUNDS
