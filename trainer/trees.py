"""Tree models: gradient-boosted trees (XGBoost) and a random forest (scikit-learn), served as a Keras layer.

The scorer serves every model the same way: one ``.keras`` file that its
model handler loads and reloads (``transforms/inference.py``). So a fitted
booster or forest becomes a Keras layer that walks the trees with tensor
operations. Each tree is padded to a complete binary tree of the deepest
tree's depth (a leaf above that depth becomes a node that always goes left,
to copies of itself), so that one gather per level moves every row down
every tree at once. The layer gives the model's own outputs: the same float32
comparisons, the same leaf values; ``boosted_to_keras`` and
``forest_to_keras`` check them against XGBoost's margins and scikit-learn's
probabilities on the rows they are given.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import keras
import numpy as np
from keras import ops

DEFAULT_TREE_PARAMS = {'n_estimators': 400, 'max_depth': 6, 'learning_rate': 0.05, 'subsample': 0.8,
                       'colsample_bytree': 0.8, 'min_child_weight': 1.0}
# Boosting stops when the validation average precision has not improved for this many trees.
EARLY_STOPPING_TREES = 40
# The forest chosen on the three weeks before the handbook's test week (BENCHMARKS.md): fully grown trees scored
# lower than trees of depth 10, which also keep the padded layer small (1,024 leaves a tree).
DEFAULT_FOREST_TREES = 100
DEFAULT_FOREST_DEPTH = 10


def fit(train_x: np.ndarray, train_y: np.ndarray, validation_x: Optional[np.ndarray],
        validation_y: Optional[np.ndarray], params: Dict[str, float], seed: int = 0):
  """Boosts trees on the training rows. With validation rows, boosting stops on their average precision and the
  booster is cut at its best number of trees; without (None), it boosts ``params['n_estimators']`` trees."""
  import xgboost
  stopping = {} if validation_x is None else {'early_stopping_rounds': EARLY_STOPPING_TREES}
  classifier = xgboost.XGBClassifier(**params, **stopping, objective='binary:logistic', eval_metric='aucpr',
                                     tree_method='hist', random_state=seed, n_jobs=0)
  if validation_x is None:
    return classifier.fit(train_x, train_y, verbose=False).get_booster()
  classifier.fit(train_x, train_y, eval_set=[(validation_x, validation_y)], verbose=False)
  return classifier.get_booster()[:classifier.best_iteration + 1]


def fit_forest(train_x: np.ndarray, train_y: np.ndarray, trees: int = DEFAULT_FOREST_TREES,
               depth: int = DEFAULT_FOREST_DEPTH, seed: int = 0):
  """A random forest of ``trees`` trees at most ``depth`` deep on the training rows (all cores)."""
  from sklearn.ensemble import RandomForestClassifier
  return RandomForestClassifier(n_estimators=trees, max_depth=depth, n_jobs=-1, random_state=seed).fit(
      train_x, train_y)


class _Tree(NamedTuple):
  """One tree's nodes (root first): a row goes to ``right`` when its ``feature`` is at or above ``split``, else
  to ``left``; a leaf has ``left`` -1 and its ``value``."""
  feature: np.ndarray
  split: np.ndarray  # float32
  left: np.ndarray
  right: np.ndarray
  value: np.ndarray


def _boosted_trees(booster) -> List[_Tree]:
  """A booster's trees. XGBoost sends a row left when its feature is below the split: the same comparison."""
  frame = booster.trees_to_dataframe()
  trees = []
  for _, nodes in frame.groupby('Tree', sort=True):
    index = {node_id: position for position, node_id in enumerate(nodes['ID'])}
    leaf = (nodes['Feature'] == 'Leaf').to_numpy()
    trees.append(_Tree(
        feature=nodes['Feature'].str.removeprefix('f').where(~leaf, '0').astype(int).to_numpy(),
        split=nodes['Split'].fillna(np.inf).to_numpy(np.float32),
        left=np.array([-1 if is_leaf else index[yes] for is_leaf, yes in zip(leaf, nodes['Yes'], strict=True)]),
        right=np.array([-1 if is_leaf else index[no] for is_leaf, no in zip(leaf, nodes['No'], strict=True)]),
        value=nodes['Gain'].to_numpy(np.float32)))  # a leaf's value
  return trees


def _positive_column(forest) -> int:
  """The column of the positive class in the forest's probabilities."""
  return list(forest.classes_).index(1)


def _forest_trees(forest) -> List[_Tree]:
  """A forest's trees, each leaf's value its positive fraction over the number of trees (their sum: the forest's
  probability). scikit-learn sends a row left when its float32 feature is at most the float64 threshold, that is
  right when at or above the smallest float32 over the threshold."""
  trees = []
  positive_column = _positive_column(forest)
  for estimator in forest.estimators_:
    tree = estimator.tree_
    threshold = tree.threshold.astype(np.float32)
    not_above = threshold.astype(np.float64) <= tree.threshold
    split = np.where(not_above, np.nextafter(threshold, np.float32(np.inf)), threshold)
    fractions = tree.value[:, 0, :] / tree.value[:, 0, :].sum(axis=1, keepdims=True)
    leaf_values = (fractions[:, positive_column] / len(forest.estimators_)).astype(np.float32)
    trees.append(_Tree(tree.feature.clip(min=0), split.astype(np.float32), tree.children_left,
                       tree.children_right, leaf_values))
  return trees


def _complete_trees(trees: List[_Tree]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """The trees as complete binary trees of one depth: per tree, each internal node's feature and split (breadth
  first), and the leaf values."""

  def depth(tree: _Tree, node: int) -> int:
    return 0 if tree.left[node] < 0 else 1 + max(depth(tree, tree.left[node]), depth(tree, tree.right[node]))

  levels = max(1, max(depth(tree, 0) for tree in trees))
  internal = 2 ** levels - 1
  features = np.zeros((len(trees), internal), np.int32)
  splits = np.full((len(trees), internal), np.inf, np.float32)
  leaves = np.zeros((len(trees), 2 ** levels), np.float32)

  def place(index: int, tree: _Tree, node: int, position: int):
    if position >= internal:
      leaves[index, position - internal] = tree.value[node]
    elif tree.left[node] < 0:
      place(index, tree, node, 2 * position + 1)  # split +inf: every row goes left
      place(index, tree, node, 2 * position + 2)
    else:
      features[index, position] = tree.feature[node]
      splits[index, position] = tree.split[node]
      place(index, tree, tree.left[node], 2 * position + 1)
      place(index, tree, tree.right[node], 2 * position + 2)

  for index, tree in enumerate(trees):
    place(index, tree, 0, 0)
  return features, splits, leaves, levels


def _walked(trees: List[_Tree], width: int, name: str, activation: str):
  """A Keras model and its TreeEnsemble layer (no bias yet) that sum the leaves of ``trees`` each row reaches."""
  features, splits, leaves, levels = _complete_trees(trees)
  inputs = keras.Input(shape=(width,), name='features')
  layer = TreeEnsemble(features.shape[0], levels, name='trees')
  score = keras.layers.Activation(activation, name='positive_probability')(layer(inputs))
  layer.set_weights([features, splits, leaves, np.float32([0.0])])
  return keras.Model(inputs, score, name=name), layer, (features, splits, leaves)


def _check(walked: np.ndarray, expected: np.ndarray, what: str):
  worst = float(np.max(np.abs(walked - expected))) if len(expected) else 0.0
  if worst > 1e-4 * max(1.0, float(np.max(np.abs(expected))) if len(expected) else 1.0):
    raise ValueError(f'the Keras trees differ from {what} by up to {worst:.2e}')


def boosted_to_keras(booster, check_rows: np.ndarray, name: str = 'boosted_trees'):
  """A Keras model whose output is the booster's probability of the positive label.

  Raises:
    ValueError: the layer's margins differ from XGBoost's on ``check_rows`` (beyond float32 rounding).
  """
  import xgboost
  rows = check_rows.astype(np.float32)
  served, layer, weights = _walked(_boosted_trees(booster), rows.shape[1], name, 'sigmoid')
  margins = booster.predict(xgboost.DMatrix(rows), output_margin=True)
  # The booster's base margin is what its margins add to the leaves the rows reach.
  base_margin = np.median(margins - np.asarray(layer(rows)).reshape(-1))
  layer.set_weights([*weights, np.float32([base_margin])])
  _check(np.asarray(layer(rows)).reshape(-1), margins, 'XGBoost in margin')
  return served


def forest_to_keras(forest, check_rows: np.ndarray, name: str = 'forest'):
  """A Keras model whose output is the forest's probability of the positive label (the mean of its trees').

  Raises:
    ValueError: the layer's probabilities differ from scikit-learn's on ``check_rows`` (beyond float32 rounding).
  """
  rows = check_rows.astype(np.float32)
  served, layer, _ = _walked(_forest_trees(forest), rows.shape[1], name, 'linear')
  _check(np.asarray(layer(rows)).reshape(-1), probabilities(forest, rows), 'scikit-learn in probability')
  return served


def probabilities(fitted, rows: np.ndarray) -> np.ndarray:
  """A booster's or a forest's own probability of the positive label for each of ``rows`` (as float32, served)."""
  rows = rows.astype(np.float32)
  if hasattr(fitted, 'predict_proba'):
    return fitted.predict_proba(rows)[:, _positive_column(fitted)]
  import xgboost
  return fitted.predict(xgboost.DMatrix(rows))


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
