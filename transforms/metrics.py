"""Model monitoring metrics as partial sums, and what is derived from them.

The monitoring pipeline (``pipelines/monitoring.py``) writes, for each event-
time window, model version and role (the champion, whose decisions are
published, or a shadow challenger), counts that add up: several rows for the
same window, version, role, metric and bin are summed when read. Each flush of
the pipeline writes its own rows (its own ``part``), so repeated bounded runs
and repeated firings of a streaming job add up to the metrics of one run.

Metrics (``metric`` column; ``bin`` 0 unless said):

- ``predictions``, ``flagged``: predictions made, and those above the
  model's threshold;
- ``score``: all predictions by score bin (bin ``i`` holds scores in
  ``[i / SCORE_BINS, (i + 1) / SCORE_BINS)``);
- ``labelled``, ``positives``, ``true_positives``, ``false_positives``: the
  predictions whose label has arrived (positives: frauds, failures, ... as the
  use case says);
- ``positive_score``, ``negative_score``: the labelled predictions by score
  bin, from which precision-recall curves and average precision are computed;
- ``drift:NAME``: the champion's predictions by the bins of feature NAME (or
  ``score``) in the version's training statistics (``feature_statistics`` and
  ``score_statistics`` in its metadata), for the population stability index.

Average precision from score bins equals scikit-learn's
``average_precision_score`` of the scores rounded down to their bins: the
curve's steps are the bins.

The labelled predictions are also written one row per event and role
(``labelled_predictions``, with the use case's id, time, ranked key and label
columns: :func:`labelled_predictions_schema`), keyed, so that a duplicate
replaces itself: precision@k of the ranked entities (fraud's cards) needs each
one's best score of a day, which no sum gives.

Tables written before the use-case API named the positives ``frauds``,
``fraud_score`` and ``genuine_score``; they are read under the new names.
"""

import math
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from kbml.warehouse import TableSchema, Warehouse
from transforms.use_case import UseCase

if TYPE_CHECKING:
  import pandas

METRICS_TABLE = 'monitoring_metrics'
LABELLED_PREDICTIONS_TABLE = 'labelled_predictions'
CHAMPION = 'champion'
CHALLENGER = 'challenger'
SCORE_BINS = 1000
DRIFT_PREFIX = 'drift:'
SCORE_DRIFT = DRIFT_PREFIX + 'score'
# PSI floors empty bins at this share, as is usual, so that a bin empty on one side does not make it infinite.
PSI_FLOOR = 1e-4

METRICS_SCHEMA = TableSchema(
    columns=(('window_start', 'TIMESTAMP'), ('window_end', 'TIMESTAMP'), ('model_version', 'STRING'),
             ('role', 'STRING'), ('metric', 'STRING'), ('bin', 'INT64'), ('value', 'FLOAT64'), ('part', 'STRING'),
             ('written_at', 'TIMESTAMP')),
    key=('part', 'window_start', 'model_version', 'role', 'metric', 'bin'))

SCALAR_METRICS = ('predictions', 'flagged', 'labelled', 'positives', 'true_positives', 'false_positives')
# The metrics' names in tables written before the use-case API, when fraud was the only case.
_FORMER_METRIC_NAMES = {'frauds': 'positives', 'fraud_score': 'positive_score', 'genuine_score': 'negative_score'}

WindowKey = Tuple[float, float, str, str]  # window start, window end (epoch seconds), model version, role
Sums = Dict[Tuple[str, int], float]  # (metric, bin) -> value


def score_bin(score: float) -> int:
  return min(SCORE_BINS - 1, max(0, int(math.floor(score * SCORE_BINS))))


def statistic_bin(value: float, bin_edges: Sequence[float]) -> int:
  """The training-statistics bin of a value (``trainer.data.feature_statistics``: right-closed inner edges)."""
  return int(np.searchsorted(bin_edges, value, side='right'))


def prediction_sums(score: float, flagged: bool, drift_bins: Mapping[str, int] = None) -> Sums:
  """The counts one prediction adds (``drift_bins``: its bin of each feature and of the score)."""
  sums = {('predictions', 0): 1.0, ('flagged', 0): float(flagged), ('score', score_bin(score)): 1.0}
  for name, index in (drift_bins or {}).items():
    sums[(DRIFT_PREFIX + name, index)] = 1.0
  return sums


def labelled_predictions_schema(use_case: UseCase) -> TableSchema:
  """The labelled predictions' table of a use case: its event's id, time and ranked key, the score, the label."""
  types = dict(use_case.features_table.columns)
  ranked = use_case.key_columns[0]
  return TableSchema(
      columns=((use_case.id_column, types[use_case.id_column]), (use_case.time_column, 'TIMESTAMP'),
               (ranked, types[ranked]), ('model_version', 'STRING'), ('role', 'STRING'), ('score', 'FLOAT64'),
               ('flagged', 'INT64'), (use_case.label_column, 'INT64')),
      key=(use_case.id_column, 'role'))


def labelled_sums(score: float, flagged: bool, positive: bool) -> Sums:
  """The counts one prediction adds once its label is known."""
  return {('labelled', 0): 1.0, ('positives', 0): float(positive),
          ('true_positives', 0): float(flagged and positive), ('false_positives', 0): float(flagged and not positive),
          ('positive_score' if positive else 'negative_score', score_bin(score)): 1.0}


def add_sums(total: Sums, more: Mapping[Tuple[str, int], float]):
  for key, value in more.items():
    total[key] = total.get(key, 0.0) + value


def metric_rows(sums_by_window: Mapping[WindowKey, Sums], part: str, written_at: str) -> List[Dict[str, object]]:
  """Warehouse rows of partial sums (zero counts are left out)."""
  from transforms.records import utc_iso
  return [{'window_start': utc_iso(start), 'window_end': utc_iso(end), 'model_version': version, 'role': role,
           'metric': metric, 'bin': index, 'value': value, 'part': part, 'written_at': written_at}
          for (start, end, version, role), sums in sums_by_window.items()
          for (metric, index), value in sums.items() if value]


def read_sums(warehouse: Warehouse, where: str = 'TRUE', table: str = METRICS_TABLE) -> 'pandas.DataFrame':
  """The summed metrics: one row per window, version, role, metric and bin (``where``: a SQL condition)."""
  if table not in warehouse.tables():
    import pandas
    return pandas.DataFrame(columns=['window_start', 'window_end', 'model_version', 'role', 'metric', 'bin', 'value'])
  metric = ('CASE metric ' + ' '.join(f"WHEN '{former}' THEN '{name}'" for former, name in _FORMER_METRIC_NAMES.items())
            + ' ELSE metric END')
  return warehouse.query(
      f'SELECT window_start, window_end, model_version, role, metric, bin, SUM(value) AS value FROM ('
      f'SELECT window_start, window_end, model_version, role, {metric} AS metric, bin, value '
      f'FROM {warehouse.table_ref(table)} WHERE {where}) '
      f'GROUP BY window_start, window_end, model_version, role, metric, bin '
      f'ORDER BY window_start, model_version, role, metric, bin')


def histogram(sums: 'pandas.DataFrame', metric: str, bins: int) -> np.ndarray:
  """The counts of a binned metric, from rows of one window, version and role."""
  counts = np.zeros(bins)
  rows = sums[sums['metric'] == metric]
  np.add.at(counts, rows['bin'].to_numpy(dtype=np.int64), rows['value'].to_numpy(dtype=np.float64))
  return counts


def average_precision(positive_counts: np.ndarray, negative_counts: np.ndarray) -> float:
  """Average precision of binned scores, as scikit-learn computes it (each bin one threshold)."""
  positives = positive_counts[::-1].cumsum()
  flagged = positives + negative_counts[::-1].cumsum()
  total = positives[-1] if len(positives) else 0
  if total == 0:
    return float('nan')
  nonempty = (positive_counts + negative_counts)[::-1] > 0
  recall_steps = np.diff(np.concatenate([[0.0], positives[nonempty]])) / total
  precision = positives[nonempty] / flagged[nonempty]
  return float(np.sum(recall_steps * precision))


def precision_recall_curve(positive_counts: np.ndarray, negative_counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(precision, recall) at each score bin taken as the threshold, from the highest bin down."""
  positives = positive_counts[::-1].cumsum()
  flagged = positives + negative_counts[::-1].cumsum()
  nonempty = flagged > 0
  total = max(positives[-1], 1.0) if len(positives) else 1.0
  return positives[nonempty] / flagged[nonempty], positives[nonempty] / total


def population_stability_index(live_counts: Sequence[float], training_fractions: Sequence[float]) -> float:
  """PSI = sum over bins of (live share - training share) * ln(live share / training share)."""
  live = np.asarray(live_counts, dtype=np.float64)
  if live.sum() == 0:
    return float('nan')
  live = np.maximum(live / live.sum(), PSI_FLOOR)
  expected = np.maximum(np.asarray(training_fractions, dtype=np.float64), PSI_FLOOR)
  return float(np.sum((live - expected) * np.log(live / expected)))


def training_distributions(metadata: Mapping[str, object]) -> Dict[str, Dict[str, List[float]]]:
  """Each drift statistic's training bins of a version: its features' and its score's."""
  distributions = dict(metadata.get('feature_statistics') or {})
  if metadata.get('score_statistics'):
    distributions['score'] = metadata['score_statistics']
  return distributions


def drift_by_statistic(sums: 'pandas.DataFrame', metadata: Mapping[str, object]) -> Dict[str, float]:
  """PSI of each feature and of the score, from rows of one window and version, against its training data."""
  drift = {}
  for name, distribution in training_distributions(metadata).items():
    fractions = distribution['bin_fractions']
    counts = histogram(sums, DRIFT_PREFIX + name, len(fractions))
    if counts.sum():
      drift[name] = population_stability_index(counts, fractions)
  return drift


def _ratio(numerator: float, denominator: float) -> float:
  return numerator / denominator if denominator else float('nan')


def window_summary(sums: 'pandas.DataFrame') -> Dict[str, float]:
  """The headline figures of rows of one window, version and role."""
  scalars = {metric: float(sums.loc[sums['metric'] == metric, 'value'].sum()) for metric in SCALAR_METRICS}
  return {
      **scalars,
      'flagged_rate': _ratio(scalars['flagged'], scalars['predictions']),
      'precision': _ratio(scalars['true_positives'], scalars['true_positives'] + scalars['false_positives']),
      'recall': _ratio(scalars['true_positives'], scalars['positives']),
      'average_precision': average_precision(histogram(sums, 'positive_score', SCORE_BINS),
                                             histogram(sums, 'negative_score', SCORE_BINS)),
  }


def summaries(sums: 'pandas.DataFrame', group_by: Iterable[str] = ('window_start', 'window_end', 'model_version',
                                                                    'role')) -> 'pandas.DataFrame':
  """:func:`window_summary` of each group of summed rows (default: each window, version and role)."""
  import pandas
  group_by = list(group_by)
  rows = [{**dict(zip(group_by, key if isinstance(key, tuple) else (key,), strict=True)), **window_summary(group)}
          for key, group in sums.groupby(group_by, sort=True)]
  return pandas.DataFrame(rows, columns=[*group_by, *SCALAR_METRICS, 'flagged_rate', 'precision', 'recall',
                                         'average_precision'])


def ranked_precision_at_k(warehouse: Warehouse, use_case: UseCase, k: Optional[int] = None, role: str = CHAMPION,
                          table: str = LABELLED_PREDICTIONS_TABLE) -> 'pandas.DataFrame':
  """Per day and model version: the share of positives among the k entities with the highest scores that day.

  The entities are the use case's ranked key (fraud: cards; k its
  ``ranking_k`` unless given), each with its highest score of the day; the
  handbook's daily card precision, on the labelled live predictions (without
  its removal of cards already known to be compromised, which live
  monitoring does not know of). Columns: day, model_version, entities,
  precision_at_k.
  """
  import pandas
  k = k or use_case.ranking_k
  columns = ['day', 'model_version', 'entities', 'precision_at_k']
  if table not in warehouse.tables():
    return pandas.DataFrame(columns=columns)
  entities = warehouse.query(
      f'SELECT CAST({use_case.time_column} AS DATE) AS day, model_version, {use_case.key_columns[0]}, '
      f'MAX(score) AS score, MAX({use_case.label_column}) AS positive FROM {warehouse.table_ref(table)} '
      f"WHERE role = '{role}' GROUP BY day, model_version, {use_case.key_columns[0]}")
  rows = []
  for (day, version), group in entities.groupby(['day', 'model_version'], sort=True):
    top = group.sort_values('score', ascending=False, kind='stable').head(k)
    rows.append({'day': day, 'model_version': version, 'entities': len(group),
                 'precision_at_k': float(top['positive'].sum()) / k})
  return pandas.DataFrame(rows, columns=columns)


def window_drift(warehouse: Warehouse, metadata_of, version: Optional[str] = None,
                 table: str = METRICS_TABLE) -> 'pandas.DataFrame':
  """PSI per statistic of each window and champion version (``metadata_of(version)`` gives its metadata)."""
  import pandas
  sums = read_sums(warehouse, f"role = '{CHAMPION}' AND metric LIKE '{DRIFT_PREFIX}%'"
                   + (f" AND model_version = '{version}'" if version else ''), table)
  rows = []
  for (start, end, model_version), group in sums.groupby(['window_start', 'window_end', 'model_version'], sort=True):
    for name, psi in drift_by_statistic(group, metadata_of(model_version)).items():
      rows.append({'window_start': start, 'window_end': end, 'model_version': model_version, 'statistic': name,
                   'psi': psi})
  return pandas.DataFrame(rows, columns=['window_start', 'window_end', 'model_version', 'statistic', 'psi'])


def shadow_comparison(warehouse: Warehouse, use_case: UseCase, champion: str, challenger: str,
                      table: str = LABELLED_PREDICTIONS_TABLE) -> Dict[str, float]:
  """The champion's and the challenger's average precision on the same labelled events.

  Only the events both scored count: those since the challenger entered the
  shadow, whose labels have arrived. Keys: labelled, positives,
  champion_average_precision, challenger_average_precision.
  """
  from sklearn.metrics import average_precision_score
  if table not in warehouse.tables():
    return {'labelled': 0, 'positives': 0, 'champion_average_precision': float('nan'),
            'challenger_average_precision': float('nan')}
  rows = warehouse.query(
      f'SELECT champion.score AS champion_score, challenger.score AS challenger_score, '
      f'champion.{use_case.label_column} AS positive '
      f'FROM {warehouse.table_ref(table)} AS champion JOIN {warehouse.table_ref(table)} AS challenger '
      f'ON champion.{use_case.id_column} = challenger.{use_case.id_column} '
      f"WHERE champion.role = '{CHAMPION}' AND champion.model_version = '{champion}' "
      f"AND challenger.role = '{CHALLENGER}' AND challenger.model_version = '{challenger}'")
  positives = int(rows['positive'].sum())
  both_classes = 0 < positives < len(rows)
  return {'labelled': len(rows), 'positives': positives,
          **{f'{role}_average_precision': float(average_precision_score(rows['positive'], rows[f'{role}_score']))
             if both_classes else float('nan') for role in (CHAMPION, CHALLENGER)}}
