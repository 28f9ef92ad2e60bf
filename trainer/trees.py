"""Gradient-boosted trees: fitted with XGBoost, served as a Keras layer.

The scorer serves every model the same way: one ``.keras`` file that its
model handler loads and reloads (``transforms/inference.py``). So a fitted
XGBoost booster becomes a Keras layer that walks the trees with tensor
operations. Each tree is padded to a complete binary tree of the booster's
depth (a leaf above that depth becomes a node that always goes left, to
copies of itself), so that one gather per level moves every row down every
tree at once. The layer gives the booster's own margins: the same float32
comparisons (a row goes left when its feature is below the split), the same
leaf values, the booster's base margin; ``to_keras`` checks them against
XGBoost's on the rows it is given.
"""

from typing import Dict, List, Tuple

import keras
import numpy as np
from keras import ops

DEFAULT_TREE_PARAMS = {'n_estimators': 400, 'max_depth': 6, 'learning_rate': 0.05, 'subsample': 0.8,
                       'colsample_bytree': 0.8, 'min_child_weight': 1.0}
# Boosting stops when the validation average precision has not improved for this many trees.
EARLY_STOPPING_TREES = 40


def fit(train_x: np.ndarray, train_y: np.ndarray, validation_x: np.ndarray, validation_y: np.ndarray,
        params: Dict[str, float], seed: int = 0):
  """Boosts trees on the training rows, stopping on the validation split's average precision; returns the
  booster cut at its best number of trees."""
  import xgboost
  classifier = xgboost.XGBClassifier(
      **params, objective='binary:logistic', eval_metric='aucpr', early_stopping_rounds=EARLY_STOPPING_TREES,
      tree_method='hist', random_state=seed, n_jobs=0)
  classifier.fit(train_x, train_y, eval_set=[(validation_x, validation_y)], verbose=False)
  return classifier.get_booster()[:classifier.best_iteration + 1]


def _complete_trees(booster) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """The booster's trees as complete binary trees of one depth: per tree, each internal node's feature and
  split (breadth first), and the leaf values."""
  frame = booster.trees_to_dataframe()
  nodes = {row.ID: row for row in frame.itertuples(index=False)}
  tree_ids = sorted(frame['Tree'].unique())

  def depth(node_id: str) -> int:
    node = nodes[node_id]
    return 0 if node.Feature == 'Leaf' else 1 + max(depth(node.Yes), depth(node.No))

  levels = max(1, max(depth(f'{tree}-0') for tree in tree_ids))
  internal = 2 ** levels - 1
  features = np.zeros((len(tree_ids), internal), np.int32)
  splits = np.full((len(tree_ids), internal), np.inf, np.float32)
  leaves = np.zeros((len(tree_ids), 2 ** levels), np.float32)

  def place(tree: int, node_id: str, position: int):
    node = nodes[node_id]
    if position >= internal:
      leaves[tree, position - internal] = node.Gain  # a leaf's value
    elif node.Feature == 'Leaf':
      place(tree, node_id, 2 * position + 1)  # split +inf: every row goes left
      place(tree, node_id, 2 * position + 2)
    else:
      features[tree, position] = int(node.Feature.removeprefix('f'))
      splits[tree, position] = np.float32(node.Split)
      place(tree, node.Yes, 2 * position + 1)
      place(tree, node.No, 2 * position + 2)

  for index, tree in enumerate(tree_ids):
    place(index, f'{tree}-0', 0)
  return features, splits, leaves, levels


def to_keras(booster, check_rows: np.ndarray, name: str = 'fraud_trees'):
  """A Keras model whose output is the booster's fraud probability.

  Raises:
    ValueError: the layer's margins differ from XGBoost's on ``check_rows`` (beyond float32 rounding).
  """
  import xgboost
  features, splits, leaves, levels = _complete_trees(booster)
  rows = check_rows.astype(np.float32)
  margins = booster.predict(xgboost.DMatrix(rows), output_margin=True)
  inputs = keras.Input(shape=(check_rows.shape[1],), name='features')
  layer = TreeEnsemble(features.shape[0], levels, name='trees')
  score = keras.layers.Activation('sigmoid', name='fraud_probability')(layer(inputs))
  model = keras.Model(inputs, score, name=name)
  # The booster's base margin is what its margins add to the leaves the rows reach.
  layer.set_weights([features, splits, leaves, np.float32([0.0])])
  base_margin = np.median(margins - np.asarray(layer(rows)).reshape(-1))
  layer.set_weights([features, splits, leaves, np.float32([base_margin])])
  walked = np.asarray(layer(rows)).reshape(-1)
  worst = float(np.max(np.abs(walked - margins))) if len(margins) else 0.0
  if worst > 1e-4 * max(1.0, float(np.max(np.abs(margins)))):
    raise ValueError(f'the Keras trees differ from XGBoost by up to {worst:.2e} in margin')
  return model


@keras.saving.register_keras_serializable(package='kbml')
class TreeEnsemble(keras.layers.Layer):
  """Complete binary trees of one depth, walked together: the sum of the leaves each row reaches, plus a bias.

  Weights (not trained): each internal node's feature index and split (rows
  at or above it go right), breadth first; each tree's leaf values; the
  base margin.
  """

  def __init__(self, trees: int, levels: int, **kwargs):
    super().__init__(**kwargs)
    self.trees, self.levels = trees, levels

  def build(self, input_shape):
    internal = 2 ** self.levels - 1
    self.features = self.add_weight(shape=(self.trees * internal,), dtype='int32', initializer='zeros',
                                    trainable=False, name='features')
    self.splits = self.add_weight(shape=(self.trees * internal,), initializer='zeros', trainable=False,
                                  name='splits')
    self.leaves = self.add_weight(shape=(self.trees * 2 ** self.levels,), initializer='zeros', trainable=False,
                                  name='leaves')
    self.base_margin = self.add_weight(shape=(1,), initializer='zeros', trainable=False, name='base_margin')

  def set_weights(self, weights: List[np.ndarray]):
    features, splits, leaves, base_margin = weights
    super().set_weights([features.reshape(-1), splits.reshape(-1), leaves.reshape(-1), base_margin])

  def call(self, rows):
    internal = 2 ** self.levels - 1
    rows = ops.cast(rows, 'float32')
    first_node = ops.expand_dims(ops.arange(self.trees, dtype='int32') * internal, 0)
    position = ops.zeros((ops.shape(rows)[0], self.trees), 'int32')
    for _ in range(self.levels):
      node = first_node + position
      values = ops.take_along_axis(rows, ops.take(self.features, node), axis=1)
      position = 2 * position + 1 + ops.cast(ops.greater_equal(values, ops.take(self.splits, node)), 'int32')
    first_leaf = ops.expand_dims(ops.arange(self.trees, dtype='int32') * 2 ** self.levels, 0)
    reached = ops.take(self.leaves, first_leaf + position - internal)
    return ops.sum(reached, axis=1, keepdims=True) + self.base_margin

  def get_config(self):
    return {**super().get_config(), 'trees': self.trees, 'levels': self.levels}
