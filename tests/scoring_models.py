"""Small real Keras models published to a model store, for the scoring tests."""

import os
import tempfile

import numpy as np

from trainer import trees
from trainer.model import average, build_model
from trainer.registry import ModelStore, new_version
from use_cases.fraud.features import FEATURE_NAMES


def publish_model(model_dir: str, seed: int = 0, threshold: float = 0.5, promote: bool = True,
                  hidden_units=(8,), ensemble: int = 1, with_trees: bool = False) -> str:
  """Publishes (and promotes) an untrained model over all features, the mean of ``ensemble`` networks (and,
  ``with_trees``, of gradient-boosted trees: the ensemble family).

  Its normalisation is fitted on random rows, and the trees on random rows and labels: the scores are arbitrary
  but real model outputs, and inference costs what a trained model of the same shape costs.
  """
  rng = np.random.default_rng(seed)
  statistics = rng.normal(size=(64, len(FEATURE_NAMES))).astype(np.float32)
  members = [build_model(statistics, hidden_units, seed=seed + i) for i in range(ensemble)]
  if with_trees:
    rows = rng.normal(size=(2_000, len(FEATURE_NAMES))).astype(np.float32)
    labels = (rows[:, 0] + rng.normal(size=len(rows)) > 1.5).astype(int)
    booster = trees.fit(rows, labels, rows, labels, {**trees.DEFAULT_TREE_PARAMS, 'n_estimators': 50}, seed)
    members.append(trees.boosted_to_keras(booster, rows))
  return publish_keras(model_dir, average(members), threshold, promote)


def publish_keras(model_dir: str, served, threshold: float = 0.5, promote: bool = True,
                  feature_names=FEATURE_NAMES) -> str:
  """Publishes (and promotes) the Keras model ``served`` over ``feature_names`` (fraud's); returns its version."""
  store = ModelStore(model_dir)
  version = new_version()
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'model.keras')
    served.save(path)
    store.publish(version, path, {'threshold': threshold, 'features': list(feature_names)}, {})
  if promote:
    store.promote(version)
  return version
