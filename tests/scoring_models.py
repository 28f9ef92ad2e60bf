"""Small real Keras models published to a model store, for the scoring tests."""

import os
import tempfile

import numpy as np

from trainer.model import build_model
from trainer.registry import ModelStore, new_version
from transforms.features import FEATURE_NAMES


def publish_model(model_dir: str, seed: int = 0, threshold: float = 0.5, promote: bool = True) -> str:
  """Publishes (and promotes) a small untrained network over all features; returns its version.

  Its normalisation is fitted on random rows: the scores are arbitrary but real model outputs.
  """
  rng = np.random.default_rng(seed)
  network = build_model(rng.normal(size=(64, len(FEATURE_NAMES))).astype(np.float32), hidden_units=(8,), seed=seed)
  store = ModelStore(model_dir)
  version = new_version()
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'model.keras')
    network.save(path)
    store.publish(version, path, {'threshold': threshold, 'features': FEATURE_NAMES}, {})
  if promote:
    store.promote(version)
  return version
