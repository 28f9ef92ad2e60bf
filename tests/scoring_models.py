"""Small real Keras models published to a model store, for the scoring tests."""

import os
import tempfile

import numpy as np

from trainer.model import average, build_model
from trainer.registry import ModelStore, new_version
from transforms.features import FEATURE_NAMES


def publish_model(model_dir: str, seed: int = 0, threshold: float = 0.5, promote: bool = True,
                  hidden_units=(8,), ensemble: int = 1) -> str:
  """Publishes (and promotes) an untrained model over all features, the mean of ``ensemble`` networks.

  Its normalisation is fitted on random rows: the scores are arbitrary but real model outputs, and inference
  costs what a trained model of the same shape costs.
  """
  rng = np.random.default_rng(seed)
  statistics = rng.normal(size=(64, len(FEATURE_NAMES))).astype(np.float32)
  network = average([build_model(statistics, hidden_units, seed=seed + i) for i in range(ensemble)])
  store = ModelStore(model_dir)
  version = new_version()
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'model.keras')
    network.save(path)
    store.publish(version, path, {'threshold': threshold, 'features': FEATURE_NAMES}, {})
  if promote:
    store.promote(version)
  return version
